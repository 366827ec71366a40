//! Approval requests as people name them: `<run id>.<call id>`, and the whole request
//! (arguments and all) looked up in the run's log, for whoever shows it to a person
//! (`dispatch approvals --full`, `GET /v1/approvals/{id}`) or records the answer.

use dispatch_bus::RunId;
use dispatch_proto::run::v1::{ApprovalRequested, run_event::Body};

use crate::{Error, RunLog};

/// The id people use for the approval of `call_id` in `run_id`.
pub fn approval_id(run_id: &RunId, call_id: &str) -> String {
    format!("{run_id}.{call_id}")
}

/// The run and call an approval id names, if it is one.
pub fn parse_approval_id(id: &str) -> Option<(RunId, String)> {
    let (run, call) = id.split_once('.')?;
    let valid_call = !call.is_empty()
        && call.len() <= 64
        && call
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    Some((run.parse().ok()?, call.to_owned())).filter(|_| valid_call)
}

/// A request as its run's (verified) log holds it, and whether it has been answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub request: ApprovalRequested,
    /// `allow` or `deny` once answered (by a person or the expiry).
    pub answered: Option<String>,
    /// The run has ended.
    pub run_ended: bool,
}

/// The approval request `approval_id` names, read from its run's log; `None` if the id
/// names none.
pub async fn find(log: &RunLog, approval_id: &str) -> Result<Option<Found>, Error> {
    let Some((run_id, call_id)) = parse_approval_id(approval_id) else {
        return Ok(None);
    };
    let run = log.handle(run_id).await?;
    let request = run.bodies().find_map(|b| match b {
        Body::ApprovalRequested(a) if a.call_id == call_id => Some(a.clone()),
        _ => None,
    });
    let Some(request) = request else {
        return Ok(None);
    };
    let answered = run.bodies().find_map(|b| match b {
        Body::ApprovalResolved(r) if r.call_id == call_id => Some(
            match r.decision() {
                dispatch_proto::run::v1::Decision::Allow => "allow",
                _ => "deny",
            }
            .to_owned(),
        ),
        _ => None,
    });
    Ok(Some(Found {
        request,
        answered,
        run_ended: run.is_finished(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_ids_name_a_run_and_a_call() {
        let run = RunId::new();
        let id = approval_id(&run, "l0-t2-c1");
        assert_eq!(parse_approval_id(&id), Some((run, "l0-t2-c1".to_owned())));
        for bad in [
            "",
            "nonsense",
            &format!("{run}."),
            &format!("{run}.a.b"),
            &format!("{run}.a b"),
            "x.l0-t0-c0",
        ] {
            assert_eq!(parse_approval_id(bad), None, "{bad}");
        }
    }
}
