//! A model driven by the test: an author that answers with the plans it is given, and
//! a worker that is the offline provider or a function of the request, on a dispatcher
//! in the test's process. For what the runtime does with a model's answers whatever
//! the model; what a real model says is replayed by `dispatch_testkit::model`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatch_models::offline::Offline;
use dispatch_models::{AuthorReply, AuthorRequest, Provider, TurnReply, TurnRequest};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::Stack;

/// The offline provider, answering at once.
static OFFLINE: Offline = Offline {
    pace: Duration::ZERO,
};

/// How long [`run_scripted`] waits for the run to end.
const LIMIT: Duration = Duration::from_secs(60);

/// An author model that answers with the given plans in turn and records what it was
/// asked; leaves are driven by the offline provider unless a worker is given.
pub struct Scripted {
    plans: Mutex<VecDeque<String>>,
    pub asked: Mutex<Vec<AuthorRequest>>,
    worker: Option<fn(&TurnRequest) -> TurnReply>,
    pub turns: Mutex<Vec<TurnRequest>>,
}

impl Scripted {
    pub fn new(plans: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            plans: Mutex::new(plans.iter().map(|p| (*p).to_owned()).collect()),
            asked: Mutex::new(Vec::new()),
            worker: None,
            turns: Mutex::new(Vec::new()),
        })
    }

    pub fn with_worker(plans: &[&str], worker: fn(&TurnRequest) -> TurnReply) -> Arc<Self> {
        let mut scripted = Arc::into_inner(Self::new(plans)).expect("just made");
        scripted.worker = Some(worker);
        Arc::new(scripted)
    }
}

impl Provider for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn author(
        &self,
        request: AuthorRequest,
    ) -> BoxFuture<'_, Result<AuthorReply, dispatch_models::Error>> {
        self.asked.lock().unwrap().push(request);
        let text = self.plans.lock().unwrap().pop_front().unwrap_or_default();
        let usage = dispatch_models::Usage::default();
        async move {
            Ok(AuthorReply {
                text,
                usage,
                cut_off: false,
            })
        }
        .boxed()
    }

    fn turn(
        &self,
        request: TurnRequest,
    ) -> BoxFuture<'_, Result<TurnReply, dispatch_models::Error>> {
        let Some(worker) = self.worker else {
            return OFFLINE.turn(request);
        };
        let reply = worker(&request);
        self.turns.lock().unwrap().push(request);
        async move { Ok(reply) }.boxed()
    }

    fn judge(
        &self,
        request: dispatch_models::JudgeRequest,
    ) -> BoxFuture<'_, Result<dispatch_models::Judgement, dispatch_models::Error>> {
        OFFLINE.judge(request)
    }
}

/// Runs `goal` to its end on a dispatcher in this process that `model` drives.
pub async fn run_scripted(
    stack: &Stack,
    model: Arc<Scripted>,
    goal: &str,
) -> anyhow::Result<Vec<dispatch_runlog::StoredEvent>> {
    let shutdown = stack.dispatcher_in_process(model).await?;
    let run_id = stack.submit(goal, "default", 0).await?;
    let events = stack.wait_finished(run_id, LIMIT).await;
    shutdown.cancel();
    events
}
