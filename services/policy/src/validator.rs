//! The validator: a model that decides calls matched by a `validate` rule. It answers
//! allow, deny or escalate; anything else — an error, no verdict, no answer in time —
//! fails closed, to a person (`ask`).

use std::sync::Arc;
use std::time::Duration;

use dispatch_bus::catalogue::Risk;
use dispatch_models::openai::{self, OpenAi, Secret};
use dispatch_models::{JudgeRequest, Provider, Verdict};
use dispatch_proto::run::v1::{Decision, ToolCallRequested};
use dispatch_rules::Document;

#[derive(Debug, Clone, clap::Args)]
pub struct ValidatorArgs {
    /// Base URL of the validator's OpenAI-compatible API (up to and including `/v1`);
    /// unset, the offline validator judges (deterministic, not a language model: it
    /// allows reads and writes, denies external calls and escalates destructive ones).
    #[arg(long, env = "DISPATCH_VALIDATOR_URL")]
    pub validator_url: Option<String>,
    /// The validator's model name on that server.
    #[arg(long, env = "DISPATCH_VALIDATOR_MODEL", default_value = "default")]
    pub validator_model: String,
    /// The environment variable holding the validator's API key, if it wants one.
    #[arg(long, default_value = "DISPATCH_VALIDATOR_API_KEY")]
    pub validator_api_key_env: String,
    /// How long a verdict may take, in milliseconds; past it, the call goes to a person.
    #[arg(long, env = "DISPATCH_VALIDATOR_TIMEOUT_MS", default_value_t = 30_000)]
    pub validator_timeout_ms: u64,
}

impl ValidatorArgs {
    pub fn build(&self) -> Result<Validator, dispatch_models::Error> {
        let timeout = Duration::from_millis(self.validator_timeout_ms.max(1));
        let provider: Arc<dyn Provider> = match &self.validator_url {
            None => Arc::new(dispatch_models::offline::Offline::default()),
            Some(url) => {
                let mut config = openai::Config::new(url, &self.validator_model);
                config.api_key = std::env::var(&self.validator_api_key_env)
                    .ok()
                    .filter(|key| !key.is_empty())
                    .map(Secret::new);
                config.timeout = timeout;
                // One try: the gate does not wait out a struggling validator.
                config.retries = 0;
                Arc::new(OpenAi::new(config)?)
            }
        };
        Ok(Validator { provider, timeout })
    }
}

#[derive(Clone)]
pub struct Validator {
    provider: Arc<dyn Provider>,
    timeout: Duration,
}

/// What the validator made of a call, as the decision records it.
pub struct Judged {
    pub decision: Decision,
    pub validator: String,
    /// `allow`, `deny`, `escalate` or `error`.
    pub verdict: &'static str,
    pub reason: String,
}

impl Validator {
    pub async fn judge(
        &self,
        document: &Document,
        verdict: &dispatch_rules::Verdict,
        call: &ToolCallRequested,
        risk: Risk,
    ) -> Judged {
        let request = JudgeRequest {
            guidance: document.guidance.clone(),
            rule: verdict.rule.clone(),
            rule_reason: document
                .rule(&verdict.rule)
                .map(|r| r.reason.clone())
                .unwrap_or_default(),
            tool: call.tool.clone(),
            risk: risk.word().to_owned(),
            args_json: call.args_json.clone(),
        };
        let validator = self.provider.name().to_owned();
        // The client has the same limit; this one holds any provider to it.
        let limit = self.timeout + Duration::from_millis(250);
        let answer = tokio::time::timeout(limit, self.provider.judge(request)).await;
        let (decision, word, reason) = match answer {
            Ok(Ok(judgement)) => {
                let (decision, said) = match judgement.verdict {
                    Verdict::Allow => (Decision::Allow, "allowed"),
                    Verdict::Deny => (Decision::Deny, "denied"),
                    Verdict::Escalate => (Decision::Ask, "escalated to a person"),
                };
                (
                    decision,
                    judgement.verdict.word(),
                    format!(
                        "{said} by the validator (rule {}): {}",
                        verdict.rule, judgement.reason
                    ),
                )
            }
            Ok(Err(e)) => (
                Decision::Ask,
                "error",
                format!("the validator failed ({e}); a person decides"),
            ),
            Err(_) => (
                Decision::Ask,
                "error",
                format!(
                    "the validator gave no verdict within {} ms; a person decides",
                    self.timeout.as_millis()
                ),
            ),
        };
        tracing::info!(validator, verdict = word, tool = call.tool, "validated");
        Judged {
            decision,
            validator,
            verdict: word,
            reason: dispatch_runlog::slice_chars(&reason, 1024),
        }
    }
}
