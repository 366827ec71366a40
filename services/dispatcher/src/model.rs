//! Which model writes plans (the author) and which drives leaves (the worker).
//!
//! Without `--model-url` both are the offline provider, which is not a language model
//! (see `dispatch_models::offline`), so the pipeline runs with no model at all. With it,
//! both roles talk to that OpenAI-compatible server, and the author can be pointed
//! elsewhere. The API key is read from the environment variable `--model-api-key-env`
//! names: it is never a flag or a file setting, so it never lands in `dispatch.toml`,
//! a process listing or a log of the command line.

use std::sync::Arc;
use std::time::Duration;

use dispatch_models::Provider;
use dispatch_models::openai::{self, OpenAi, Secret};

/// The roles' providers.
#[derive(Clone)]
pub struct Providers {
    pub author: Arc<dyn Provider>,
    pub worker: Arc<dyn Provider>,
}

impl Providers {
    /// One provider in both roles.
    pub fn both(provider: Arc<dyn Provider>) -> Self {
        Self {
            author: provider.clone(),
            worker: provider,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Base URL of an OpenAI-compatible API, up to and including `/v1` (e.g.
    /// `http://127.0.0.1:8091/v1`); unset, runs use the offline provider, which is not
    /// a language model.
    #[arg(long, env = "DISPATCH_MODEL_URL")]
    pub model_url: Option<String>,
    /// The model's name on that server.
    #[arg(long, env = "DISPATCH_MODEL", default_value = "default")]
    pub model: String,
    /// The environment variable holding the API key, if the server wants one.
    #[arg(long, default_value = "DISPATCH_MODEL_API_KEY")]
    pub model_api_key_env: String,
    /// The longest one model call may take, in milliseconds: a wall-clock deadline from
    /// its first request to the whole answer, retries and their waits included.
    #[arg(long, default_value_t = 300_000)]
    pub model_timeout_ms: u64,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 2048)]
    pub model_max_tokens: u32,
    /// Retries of a request that failed for a passing reason (429, 5xx, connection).
    #[arg(long, default_value_t = 3)]
    pub model_retries: u32,
    /// The author's base URL, if not the worker's.
    #[arg(long, env = "DISPATCH_AUTHOR_MODEL_URL")]
    pub author_model_url: Option<String>,
    /// The author's model name, if not the worker's.
    #[arg(long, env = "DISPATCH_AUTHOR_MODEL")]
    pub author_model: Option<String>,
    /// Without a model: how long the offline provider takes per word of its answers,
    /// so they stream as a model's would (0: each answer at once).
    #[arg(long, env = "DISPATCH_OFFLINE_PACE_MS", default_value_t = 0)]
    pub offline_pace_ms: u64,
    /// The most model turns one leaf may take before it fails.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_turns: u32,
}

impl ModelArgs {
    /// No model: the offline provider in both roles (the defaults otherwise).
    pub fn offline() -> Self {
        Self {
            model_url: None,
            model: "default".into(),
            model_api_key_env: "DISPATCH_MODEL_API_KEY".into(),
            model_timeout_ms: 300_000,
            model_max_tokens: 2048,
            model_retries: 3,
            author_model_url: None,
            author_model: None,
            offline_pace_ms: 0,
            max_turns: 8,
        }
    }

    /// The providers these settings describe; a URL or name that cannot work is an
    /// error naming it.
    pub fn providers(&self) -> Result<Providers, dispatch_models::Error> {
        let Some(url) = &self.model_url else {
            return Ok(Providers::both(Arc::new(
                dispatch_models::offline::Offline {
                    pace: Duration::from_millis(self.offline_pace_ms),
                },
            )));
        };
        let api_key = std::env::var(&self.model_api_key_env)
            .ok()
            .filter(|key| !key.is_empty())
            .map(Secret::new);
        let config = |url: &str, model: &str| {
            let mut config = openai::Config::new(url, model);
            config.api_key = api_key.clone();
            config.timeout = Duration::from_millis(self.model_timeout_ms.max(1));
            config.max_tokens = self.model_max_tokens.max(1);
            config.retries = self.model_retries;
            config
        };
        let worker = Arc::new(OpenAi::new(config(url, &self.model))?);
        let author = match (&self.author_model_url, &self.author_model) {
            (None, None) => worker.clone(),
            (author_url, author_model) => Arc::new(OpenAi::new(config(
                author_url.as_deref().unwrap_or(url),
                author_model.as_deref().unwrap_or(&self.model),
            ))?),
        };
        Ok(Providers { author, worker })
    }
}
