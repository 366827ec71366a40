//! Finished runs' reports as resources: `dispatch://runs/<run_id>/report`, listed from
//! the ledger (the newest runs) and read from the run's own verified log (its
//! `RunFinished` report, or its summary when it wrote none).

use std::time::Duration;

use dispatch_bus::{RunId, subject};
use dispatch_proto::api::Reply;
use dispatch_proto::api::v1::{ListRunsRequest, ListRunsResponse, TaskStatus};
use dispatch_proto::run::v1::run_event::Body;
use dispatch_runlog::one_line;
use rmcp::ErrorData;
use rmcp::model::{ListResourcesResult, ReadResourceResult, Resource, ResourceContents};

use crate::{Server, bounded};

const PREFIX: &str = "dispatch://runs/";
const SUFFIX: &str = "/report";

/// How many of the newest runs the listing looks at.
const LISTED: u32 = 50;

/// How long the listing waits for the ledger.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Characters of a goal shown as a resource's name.
const NAME_CHARS: usize = 100;

const MIME: &str = "text/plain";

/// The URI of `run_id`'s report.
pub fn report_uri(run_id: &RunId) -> String {
    format!("{PREFIX}{run_id}{SUFFIX}")
}

/// The run whose report `uri` names, or why it names none.
fn run_of(uri: &str) -> Result<RunId, String> {
    let shown = || one_line(uri, 120);
    let id = uri
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix(SUFFIX))
        .ok_or_else(|| {
            format!(
                "{:?} is not a report: reports are {PREFIX}<run_id>{SUFFIX}",
                shown()
            )
        })?;
    // Only the canonical form, so that one report has one URI.
    match id.parse::<RunId>() {
        Ok(run_id) if run_id.to_string() == id => Ok(run_id),
        _ => Err(format!("{:?} does not name a run by its whole id", shown())),
    }
}

impl Server {
    /// The reports of the newest finished runs.
    pub(crate) async fn reports(&self) -> Result<ListResourcesResult, ErrorData> {
        let request = ListRunsRequest {
            all: true,
            conversation_id: None,
            limit: Some(LISTED),
            after: None,
            origin: None,
        };
        let page: ListRunsResponse = match self
            .bus
            .request_json::<_, Reply<ListRunsResponse>>(
                subject::query::runs(),
                &request,
                QUERY_TIMEOUT,
            )
            .await
        {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => return Err(ErrorData::internal_error(e.to_string(), None)),
            Err(e) => {
                tracing::warn!(error = %e, "the ledger did not answer");
                return Err(ErrorData::internal_error(
                    format!("the ledger did not answer: {e}"),
                    None,
                ));
            }
        };
        let resources = page
            .runs
            .iter()
            // A corrupt run's log does not verify: there is no report to read.
            .filter(|run| run.status().is_terminal() && run.status() != TaskStatus::Corrupt)
            .filter_map(|run| {
                let run_id = run.run_id.parse::<RunId>().ok()?;
                let mut name = one_line(&run.goal, NAME_CHARS);
                if name.is_empty() {
                    name = run_id.to_string();
                }
                Some(
                    Resource::new(report_uri(&run_id), name)
                        .with_description(format!(
                            "the report of run {run_id} ({})",
                            run.status().word()
                        ))
                        .with_mime_type(MIME),
                )
            })
            .collect();
        Ok(ListResourcesResult::with_all_items(resources))
    }

    /// The report of the run `uri` names, from its verified log.
    pub(crate) async fn report(&self, uri: &str) -> Result<ReadResourceResult, ErrorData> {
        let run_id = run_of(uri).map_err(|why| ErrorData::invalid_params(why, None))?;
        let events = self.log.read(&run_id).await.map_err(|e| {
            if e.kind() == dispatch_runlog::ErrorKind::Corrupt {
                ErrorData::internal_error(format!("run {run_id}'s log does not verify: {e}"), None)
            } else {
                tracing::warn!(run_id = %run_id, error = %e, "cannot read a run's log");
                ErrorData::internal_error(format!("run {run_id}'s log cannot be read: {e}"), None)
            }
        })?;
        if events.is_empty() {
            return Err(ErrorData::resource_not_found(
                format!("no run {run_id}"),
                None,
            ));
        }
        let finished = events
            .iter()
            .rev()
            .find_map(|stored| match &stored.event.body {
                Some(Body::RunFinished(finished)) => Some(finished),
                _ => None,
            });
        let Some(finished) = finished else {
            return Err(ErrorData::invalid_params(
                format!("run {run_id} has not finished: its report comes when it ends"),
                None,
            ));
        };
        let text = if finished.report.trim().is_empty() {
            &finished.summary
        } else {
            &finished.report
        };
        let text = bounded(dispatch_runlog::many_lines(text));
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(text, uri).with_mime_type(MIME),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_uri_names_one_run_by_its_whole_id() {
        let run_id = RunId::new();
        let uri = report_uri(&run_id);
        assert_eq!(uri, format!("dispatch://runs/{run_id}/report"));
        assert_eq!(run_of(&uri), Ok(run_id));

        let upper = uri.to_uppercase().replace("DISPATCH://RUNS/", PREFIX);
        let upper = upper.replace("/REPORT", SUFFIX);
        for bad in [
            String::new(),
            "dispatch://runs/".to_owned(),
            format!("dispatch://runs/{run_id}"),
            format!("dispatch://runs/{run_id}/report/"),
            format!("dispatch://runs/{run_id}/log"),
            format!("file://runs/{run_id}/report"),
            format!("dispatch://runs/{}/report", run_id.short()),
            "dispatch://runs/../report".to_owned(),
            upper,
        ] {
            assert!(run_of(&bad).is_err(), "{bad:?} accepted");
        }
    }
}
