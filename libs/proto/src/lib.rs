//! The wire types of Dispatch, generated from the `.proto` files under `proto/`: run
//! events (`dispatch.run.v1`), commands (`dispatch.command.v1`), the ledger's and the
//! policy's own records and requests, and the front doors' contract (`dispatch.api.v1`:
//! the run views, the queries and their answers, the gRPC service).
//!
//! This crate owns only the generated types and tiny conveniences on them; how events
//! are chained, appended and read belongs to `dispatch-runlog`, and where they travel
//! belongs to `dispatch-bus`.

pub mod run {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/dispatch.run.v1.rs"));

        /// The rule a `PolicyDecided` names when the dispatcher refuses a call the run
        /// saw denied already (no check is made): the one decision the dispatcher, not
        /// policy, may write, and only as a denial.
        pub const MEMO_RULE: &str = "denial-memo";

        impl RunStatus {
            /// The lowercase word people see (`done`, `blocked`, `stopped`).
            pub fn word(self) -> &'static str {
                match self {
                    RunStatus::Unspecified => "unknown",
                    RunStatus::Done => "done",
                    RunStatus::Blocked => "blocked",
                    RunStatus::Stopped => "stopped",
                }
            }
        }

        impl Risk {
            /// The lowercase word the catalogue and the policy use (`read`, `write`,
            /// `destructive`, `external`); unrecorded is unknown, and unknown is risky.
            pub fn word(self) -> &'static str {
                match self {
                    Risk::Read => "read",
                    Risk::Write => "write",
                    Risk::External => "external",
                    Risk::Destructive | Risk::Unspecified => "destructive",
                }
            }
        }

        impl run_event::Body {
            /// A stable snake_case name for the event kind, used in logs and JSON output.
            pub fn kind(&self) -> &'static str {
                use run_event::Body;
                match self {
                    Body::RunRequested(_) => "run_requested",
                    Body::PlanAuthored(_) => "plan_authored",
                    Body::PlanRejected(_) => "plan_rejected",
                    Body::RunStarted(_) => "run_started",
                    Body::LeafStarted(_) => "leaf_started",
                    Body::ModelTurn(_) => "model_turn",
                    Body::ToolCallRequested(_) => "tool_call_requested",
                    Body::PolicyDecided(_) => "policy_decided",
                    Body::ToolCallStarted(_) => "tool_call_started",
                    Body::StopRequested(_) => "stop_requested",
                    Body::CommandAbandoned(_) => "command_abandoned",
                    Body::ToolCallCompleted(_) => "tool_call_completed",
                    Body::ToolCallFailed(_) => "tool_call_failed",
                    Body::GateChecked(_) => "gate_checked",
                    Body::LeafFinished(_) => "leaf_finished",
                    Body::FeedbackQueued(_) => "feedback_queued",
                    Body::RunFinished(_) => "run_finished",
                    Body::ApprovalRequested(_) => "approval_requested",
                    Body::ApprovalResolved(_) => "approval_resolved",
                    Body::OutputDelta(_) => "output_delta",
                    Body::ServiceWoken(_) => "service_woken",
                    Body::TurnOrdered(_) => "turn_ordered",
                    Body::TurnContext(_) => "turn_context",
                }
            }
        }
    }
}

pub mod api;

pub mod command {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/dispatch.command.v1.rs"));
    }
}

pub mod ledger {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/dispatch.ledger.v1.rs"));
    }
}

pub mod policy {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/dispatch.policy.v1.rs"));
    }
}

pub use prost::Message;
