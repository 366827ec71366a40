//! A leaf executor that fails or panics ends the run `blocked` with the reason.

use std::sync::Arc;
use std::time::Duration;

use dispatch_models::offline::Offline;

/// The offline provider, answering at once.
static OFFLINE: Offline = Offline {
    pace: std::time::Duration::ZERO,
};
use dispatch_models::{AuthorRequest, Provider, TurnReply, TurnRequest};
use dispatch_proto::run::v1::RunStatus;
use dispatch_tests::{Stack, finished};
use futures::FutureExt;
use futures::future::BoxFuture;

const LIMIT: Duration = Duration::from_secs(60);

/// Writes plans offline; in leaves, fails with a long error or panics.
struct Broken {
    panic: bool,
}

impl Provider for Broken {
    fn name(&self) -> &str {
        "broken"
    }

    fn author(
        &self,
        request: AuthorRequest,
    ) -> BoxFuture<'_, Result<dispatch_models::AuthorReply, dispatch_models::Error>> {
        OFFLINE.author(request)
    }

    fn turn(
        &self,
        _request: TurnRequest,
    ) -> BoxFuture<'_, Result<TurnReply, dispatch_models::Error>> {
        let panic = self.panic;
        async move {
            if panic {
                panic!("the model client fell over");
            }
            Err(dispatch_models::Error::Provider {
                provider: "broken".into(),
                message: "x".repeat(1000),
            })
        }
        .boxed()
    }

    fn judge(
        &self,
        request: dispatch_models::JudgeRequest,
    ) -> BoxFuture<'_, Result<dispatch_models::Judgement, dispatch_models::Error>> {
        OFFLINE.judge(request)
    }
}

#[tokio::test]
async fn a_failing_leaf_ends_the_run_blocked_with_the_error_sliced_to_300_characters()
-> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let shutdown = stack
        .dispatcher_in_process(Arc::new(Broken { panic: false }))
        .await?;
    let run_id = stack.submit("Fail loudly", "default", 0).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    shutdown.cancel();
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert!(
        end.reason.starts_with("model provider broken failed: xxx"),
        "{}",
        end.reason
    );
    assert_eq!(end.reason.chars().count(), 300);
    assert_eq!(end.summary.chars().count(), 300);
    Ok(())
}

#[tokio::test]
async fn a_panicking_leaf_ends_the_run_blocked_with_the_panic() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let shutdown = stack
        .dispatcher_in_process(Arc::new(Broken { panic: true }))
        .await?;
    let run_id = stack.submit("Panic", "default", 0).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    shutdown.cancel();
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert_eq!(
        end.reason,
        "leaf executor panicked: the model client fell over"
    );
    Ok(())
}
