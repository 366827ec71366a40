//! An OpenAI-compatible chat-completions provider: OpenAI, vLLM, Ollama, llama.cpp's
//! `llama-server`, llama-cpp-python — anything serving `POST {base}/chat/completions`.
//!
//! Answers are streamed (server-sent events, read by [`crate::sse`]): text and
//! `tool_calls` arrive as deltas and are put together here. Native tool calls come
//! first; a model that writes its call as JSON in its text instead — fenced, bare, or in
//! `<tool_call>` tags, as small local models do — is understood too, and the reply says
//! which form it used ([`CallForm`]).
//!
//! The server is not trusted: a line, an event, a whole stream and an answer each have
//! a limit, and passing one fails the call at once, naming it. [`Config::timeout`] is a
//! wall-clock deadline on the whole call, retries and their waits included, however
//! the server sends (or trickles) its bytes. Reading yields to the runtime as it goes
//! (tokio's cooperative budget), so a server that streams as fast as it can does not
//! hold a worker thread that other tasks — other runs' stop watches — need.
//!
//! Transient failures (429, 5xx, a refused or dropped connection, a stream cut short)
//! are retried with jittered exponential backoff, waiting at least what `Retry-After`
//! asks, while the deadline leaves time. The API key is a [`Secret`]: it is sent as a
//! bearer token and nowhere else — not in `Debug`, not in errors (a server that echoes
//! it gets it masked).
//!
//! Dropping a call's future drops its connection: that is how a run's deadline or a
//! stop cancels a model request, streaming or not.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt as _, Stream, StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    AuthorReply, AuthorRequest, CallForm, Error, Exchange, Provider, Retry, ToolCall, ToolSpec,
    TurnReply, TurnRequest, Usage,
};

/// Most bytes of text and tool arguments one answer may stream. An answer is recorded
/// in one event (`ModelTurn`; `PlanAuthored` holds a plan's text and its leaves, about
/// twice that), and an event must fit in a NATS message (1 MiB by default) with room
/// to spare; 2,048 tokens of answer are about 8 KiB.
pub const MAX_ANSWER_BYTES: usize = 128 * 1024;
/// Most tool calls one answer may make.
pub const MAX_CALLS: usize = 16;
/// Most bytes of an error answer read (for its message).
const ERROR_BODY_BYTES: usize = 4096;
/// The most tokens a plan may take: seven headlines with their drawers, bodies and gates
/// fit in well under half of it. A small model that repeats a line until its limit
/// (the 1.5B one, asked for an outline, at 8.7 tokens a second on two cores) is cut
/// off here rather than at the worker's limit, minutes later.
const AUTHOR_MAX_TOKENS: u32 = 1024;

/// The longest `Retry-After` honoured; a server asking for more gets this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A value that must never be shown: its `Debug` and `Display` are `********`.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the secret masked.
    pub fn mask(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_owned()
        } else {
            text.replace(&self.0, "********")
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("********")
    }
}

/// How to reach one model.
#[derive(Debug, Clone)]
pub struct Config {
    /// The API's base URL, up to and including `/v1` (`http://127.0.0.1:8091/v1`).
    pub base_url: String,
    /// The model's name as the server knows it.
    pub model: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<Secret>,
    /// The longest one call may take, from its first request to the whole answer,
    /// retries and the waits between them included: a wall-clock deadline.
    pub timeout: Duration,
    /// The longest a response may go without sending a byte.
    pub idle_timeout: Duration,
    /// `max_tokens` of every request.
    pub max_tokens: u32,
    /// Attempts after the first, for transient failures.
    pub retries: u32,
    /// The first retry's delay; later ones double, with jitter.
    pub backoff: Duration,
    /// The worker's sampling temperature (the author always uses
    /// [`crate::AUTHOR_TEMPERATURE`]).
    pub temperature: f32,
}

impl Config {
    /// A configuration with the defaults for everything but where and what.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            max_tokens: 2048,
            retries: 3,
            backoff: Duration::from_millis(500),
            temperature: 0.2,
        }
    }
}

/// The provider for one configured model.
#[derive(Debug, Clone)]
pub struct OpenAi {
    name: String,
    config: Config,
    http: reqwest::Client,
    endpoint: String,
}

impl OpenAi {
    pub fn new(config: Config) -> Result<Self, Error> {
        let base = config.base_url.trim_end_matches('/');
        let url = reqwest::Url::parse(base)
            .map_err(|e| Error::Config(format!("model URL {base:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Config(format!("model URL {base:?} is not http(s)")));
        }
        if config.model.trim().is_empty() {
            return Err(Error::Config("no model name given".into()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            name: format!("openai:{}", config.model),
            endpoint: format!("{base}/chat/completions"),
            config,
            http,
        })
    }

    /// One chat completion, retried while the failure is transient and the deadline
    /// ([`Config::timeout`], on the whole call) leaves time; the text goes to `deltas`
    /// as it streams in, and a retry after some went says so there.
    async fn complete(
        &self,
        request: &ChatRequest<'_>,
        deltas: Option<&crate::DeltaSink>,
    ) -> Result<Answer, Error> {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let within = || {
            format!(
                "no complete answer within {} ms",
                self.config.timeout.as_millis()
            )
        };
        let mut delays = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(self.config.backoff)
                .with_max_delay(Duration::from_secs(30))
                .with_max_times(self.config.retries as usize)
                .with_jitter(),
        );
        loop {
            let failure =
                match tokio::time::timeout_at(deadline, self.attempt(request, deltas)).await {
                    Ok(Ok(answer)) => return Ok(answer),
                    Ok(Err(failure)) => failure,
                    Err(_) => return Err(self.timed_out(within())),
                };
            let Some(delay) = delays.next().filter(|_| failure.transient) else {
                return Err(self.error(failure.message));
            };
            let delay = delay.max(failure.retry_after.unwrap_or_default());
            if tokio::time::Instant::now() + delay >= deadline {
                return Err(self.timed_out(format!(
                    "{} (not retried: {})",
                    failure.message,
                    within()
                )));
            }
            if let Some(deltas) = deltas {
                let _ = deltas.send(crate::Delta::Restart);
            }
            tracing::warn!(provider = self.name, reason = %self.mask(&failure.message), delay_ms = delay.as_millis() as u64, "model request failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(
        &self,
        request: &ChatRequest<'_>,
        deltas: Option<&crate::DeltaSink>,
    ) -> Result<Answer, Failure> {
        let mut builder = self.http.post(&self.endpoint).json(request);
        if let Some(key) = &self.config.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        let response = builder.send().await.map_err(|e| {
            Failure::transient(format!("cannot reach {}: {}", self.endpoint, plain(&e)))
        })?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let body = read_capped(response, ERROR_BODY_BYTES)
                .await
                .unwrap_or_default();
            let body = String::from_utf8_lossy(&body);
            let message = format!("{} answered {status}: {}", self.endpoint, excerpt(&body));
            let transient = status.as_u16() == 429 || status.is_server_error();
            return Err(Failure {
                message,
                transient,
                retry_after,
            });
        }
        let is_stream = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_stream {
            let body = response.bytes_stream().map_err(|e| plain(&e));
            read_stream(body, self.config.idle_timeout, deltas).await
        } else {
            let body = read_capped(response, MAX_ANSWER_BYTES * 2).await?;
            let completion: Completion = serde_json::from_slice(&body).map_err(|e| {
                Failure::fatal(format!(
                    "not a chat completion: {e}: {}",
                    excerpt(&String::from_utf8_lossy(&body))
                ))
            })?;
            Answer::from_completion(completion).map_err(Failure::fatal)
        }
    }

    fn error(&self, message: String) -> Error {
        Error::Provider {
            provider: self.name.clone(),
            message: self.mask(&message),
        }
    }

    fn timed_out(&self, message: String) -> Error {
        Error::TimedOut {
            provider: self.name.clone(),
            message: self.mask(&message),
        }
    }

    fn mask(&self, text: &str) -> String {
        match &self.config.api_key {
            Some(key) => key.mask(text),
            None => text.to_owned(),
        }
    }
}

impl Provider for OpenAi {
    fn name(&self) -> &str {
        &self.name
    }

    fn author(&self, request: AuthorRequest) -> BoxFuture<'_, Result<AuthorReply, Error>> {
        async move {
            // The tools go with the grammar, in the system message: a small model
            // echoes its user message back, tool list and all.
            let mut system = request.grammar.to_owned();
            if !request.tools.is_empty() {
                system.push_str("\n\nTools the steps can use:");
                for tool in request.tools.iter().take(MAX_TOOLS_LISTED) {
                    let about = tool.description.lines().next().unwrap_or_default();
                    let about: String = about.chars().take(200).collect();
                    system.push_str(&format!("\n- {}: {about}", tool.name));
                }
            }
            let goal = format!("Goal: {}", request.goal);
            // A retry is the same conversation one exchange on: the model sees its own
            // outline and is asked to correct it, rather than to start again. With no
            // answer worth showing, the correction goes with the goal (some chat
            // templates refuse two user messages in a row).
            let messages = match request.retry {
                None => vec![Message::system(system), Message::user(goal)],
                Some(Retry {
                    answer: Some(answer),
                    error,
                }) => vec![
                    Message::system(system),
                    Message::user(goal),
                    Message::assistant(answer),
                    Message::user(error),
                ],
                Some(Retry {
                    answer: None,
                    error,
                }) => vec![
                    Message::system(system),
                    Message::user(format!("{goal}\n\n{error}")),
                ],
            };
            let mut chat = ChatRequest::new(&self.config, messages, &[], request.temperature);
            chat.max_tokens = chat.max_tokens.min(AUTHOR_MAX_TOKENS);
            let answer = self.complete(&chat, None).await?;
            Ok(AuthorReply {
                cut_off: answer.finish_reason.as_deref() == Some("length"),
                text: answer.text,
                usage: answer.usage,
            })
        }
        .boxed()
    }

    fn turn(&self, request: TurnRequest) -> BoxFuture<'_, Result<TurnReply, Error>> {
        async move {
            let messages = conversation(&request);
            let answer = self
                .complete(
                    &ChatRequest::new(
                        &self.config,
                        messages,
                        &request.tools,
                        self.config.temperature,
                    ),
                    request.deltas.as_ref(),
                )
                .await?;
            Ok(answer.into_turn(&request.tools))
        }
        .boxed()
    }

    fn judge(
        &self,
        request: crate::JudgeRequest,
    ) -> BoxFuture<'_, Result<crate::Judgement, Error>> {
        async move {
            let mut call = format!(
                "Policy guidance: {}\n\nRule: {}",
                request.guidance, request.rule
            );
            if !request.rule_reason.is_empty() {
                call.push_str(&format!(" ({})", request.rule_reason));
            }
            call.push_str(&format!(
                "\n\nTool: {}\nRisk: {}\nArguments: {}",
                request.tool, request.risk, request.args_json
            ));
            let messages = vec![
                Message::system(JUDGE_PROMPT.to_owned()),
                Message::user(call),
            ];
            let answer = self
                .complete(&ChatRequest::new(&self.config, messages, &[], 0.0), None)
                .await?;
            let Some((verdict, reason)) = verdict_of(&answer.text) else {
                let said: String = answer.text.chars().take(200).collect();
                return Err(
                    self.error(format!("the validator's answer holds no verdict: {said:?}"))
                );
            };
            Ok(crate::Judgement {
                verdict,
                reason,
                usage: answer.usage,
            })
        }
        .boxed()
    }
}

/// Most tools named to the author.
const MAX_TOOLS_LISTED: usize = 64;

/// The validator's instructions.
const JUDGE_PROMPT: &str = "You are the validator of a permission gate. An agent wants \
to make the tool call below on a real system. Decide, by the policy's guidance and the \
rule that sent the call to you, whether it may go ahead. Answer with one JSON object and \
nothing else: {\"verdict\": \"allow\" | \"deny\" | \"escalate\", \"reason\": \"<one \
sentence>\"}. Choose escalate when a person should decide.";

/// The longest reason a verdict keeps.
const MAX_VERDICT_REASON: usize = 300;

/// Reads the validator's answer: a JSON object with `verdict` and `reason`, perhaps in
/// a code fence or among other words. Anything else is no verdict.
fn verdict_of(text: &str) -> Option<(crate::Verdict, String)> {
    #[derive(serde::Deserialize)]
    struct Answer {
        verdict: crate::Verdict,
        #[serde(default)]
        reason: String,
    }
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    let answer: Answer = serde_json::from_str(text.get(start..=end)?).ok()?;
    let reason: String = answer.reason.chars().take(MAX_VERDICT_REASON).collect();
    Some((answer.verdict, reason))
}

const WORKER_PROMPT: &str = "You carry out one step of a plan. Use the tools to do \
what the step asks; every path is relative to the run's directory, and files you make \
go under scratch/. Call one tool at a time and look at its result before going on. Tools \
take their arguments literally: write the actual text, using what earlier steps found, \
never a placeholder or a shell command such as $(...). When the step is done, answer \
with one short paragraph saying what you did, and call no tool. Never say a step is \
done when a call it needed failed.";

/// The messages of one leaf's turn: instructions, the step, and the turns so far; or
/// of a chat turn: the conversation, then the turns so far.
fn conversation(request: &TurnRequest) -> Vec<Message> {
    if let Some(chat) = &request.chat {
        let hands_off = request.tools.iter().any(|t| t.name == HAND_OFF_TOOL);
        return chat_conversation(chat, &request.history, hands_off);
    }
    let leaf = &request.leaf;
    let mut step = format!("The goal: {}", request.goal);
    if !request.earlier.is_empty() {
        // A step that summarises or builds on what came before has nothing to go on
        // but this: each step's conversation is its own.
        step.push_str("\n\nWhat the earlier steps found:");
        for earlier in &request.earlier {
            step.push_str(&format!(
                "\n\n## {}\n{}",
                earlier.title,
                earlier.found.trim()
            ));
        }
    }
    step.push_str(&format!("\n\nThis step: {}", leaf.title));
    if !leaf.body.trim().is_empty() {
        step.push_str(&format!("\n\n{}", leaf.body.trim()));
    }
    if let Some(gate) = leaf.done_when.as_deref().filter(|g| !g.is_empty()) {
        step.push_str(&format!(
            "\n\nThe step counts as done when this check passes: {gate}"
        ));
    }
    let mut messages = vec![
        Message::system(WORKER_PROMPT.to_owned()),
        Message::user(step),
    ];
    push_exchanges(&mut messages, &request.history, "");
    // Small models answer a tool result by making the same call again; a word after
    // the results reminds them how a step ends. How a step is given up is said only
    // when a call failed: said after calls that all went well, the 1.5B model answers
    // "NOT DONE" to results that show the step done (recorded; see CONTINUE).
    if matches!(request.history.last(), Some(Exchange::ToolResult { .. })) {
        let failed = request
            .history
            .iter()
            .rev()
            .map_while(|e| match e {
                Exchange::ToolResult { result, .. } => Some(result.is_err()),
                _ => None,
            })
            .any(|failed| failed);
        messages.push(Message::user(
            if failed {
                CONTINUE_AFTER_A_FAILURE
            } else {
                CONTINUE
            }
            .to_owned(),
        ));
    }
    messages
}

/// A chat turn's messages: the instructions (saying how many older turns are left
/// out), each earlier turn as it went (its calls' ids made unique to it), the new
/// message (after the notes of errands that ended since), and this turn so far.
fn chat_conversation(chat: &crate::Chat, history: &[Exchange], hands_off: bool) -> Vec<Message> {
    let mut system = CHAT_PROMPT.to_owned();
    if hands_off {
        system.push_str(CHAT_HAND_OFF);
    }
    if chat.left_out > 0 {
        system.push_str(&format!(
            "\n\n({} older turns of this conversation are left out here.)",
            chat.left_out
        ));
    }
    let mut messages = vec![Message::system(system)];
    for (i, turn) in chat.earlier.iter().enumerate() {
        messages.push(Message::user(turn.message.clone()));
        push_exchanges(&mut messages, &turn.exchanges, &format!("h{i}-"));
        if let Some(why) = &turn.cut_short {
            messages.push(Message::assistant(format!(
                "(This turn ended before an answer: {why}.)"
            )));
        }
    }
    let message = if chat.notes.is_empty() {
        chat.message.clone()
    } else {
        format!(
            "[From Dispatch, not typed by the user: errands of this conversation that \
             ended since the last turn]\n{}\n\n[The user's new message]\n{}",
            chat.notes
                .iter()
                .map(|n| format!("- {n}"))
                .collect::<Vec<_>>()
                .join("\n"),
            chat.message
        )
    };
    messages.push(Message::user(message));
    push_exchanges(&mut messages, history, "");
    if matches!(history.last(), Some(Exchange::ToolResult { .. })) {
        messages.push(Message::user(CHAT_CONTINUE.to_owned()));
    }
    messages
}

/// The most of an answer's text shown again beside the calls it made (a call written
/// out in text is a few hundred characters).
const TEXT_WITH_CALLS_CHARS: usize = 1_000;

/// The text of an answer that made calls, as it is shown again: cut after
/// [`TEXT_WITH_CALLS_CHARS`]. The 1.5B model, told a step was not done, wrote the same
/// fetch 35 times over until its token limit; two such answers shown whole took a
/// step's request past the model's 8,192-token context (errands, recorded). The calls
/// themselves go with the message.
fn shown_with_calls(text: &str) -> String {
    match text.char_indices().nth(TEXT_WITH_CALLS_CHARS) {
        Some((at, _)) => format!("{} …", &text[..at]),
        None => text.to_owned(),
    }
}

/// Appends `exchanges` as messages, each call id prefixed with `ids`.
fn push_exchanges(messages: &mut Vec<Message>, exchanges: &[Exchange], ids: &str) {
    for (at, exchange) in exchanges.iter().enumerate() {
        match exchange {
            Exchange::Assistant { text, tool_calls } => messages.push(Message {
                role: "assistant",
                content: Some(if tool_calls.is_empty() {
                    text.clone()
                } else {
                    shown_with_calls(text)
                }),
                tool_calls: tool_calls
                    .iter()
                    .map(|call| WireCall {
                        id: format!("{ids}{}", call.id),
                        kind: "function",
                        function: WireFunction {
                            name: crate::wire_name(&call.tool),
                            arguments: call.args_json.clone(),
                        },
                    })
                    .collect(),
                tool_call_id: None,
            }),
            Exchange::GaveUpUntried => messages.push(Message::user(GAVE_UP_UNTRIED.to_owned())),
            Exchange::DoneUntried => messages.push(Message::user(GATE_FAILED_UNTRIED.to_owned())),
            Exchange::GateFailed { command, detail } => {
                let called = exchanges[..at].iter().any(|e| {
                    matches!(e, Exchange::Assistant { tool_calls, .. } if !tool_calls.is_empty())
                });
                messages.push(Message::user(format!(
                    "The step is not done yet: its check `{command}` does not pass \
                     ({detail}). {}",
                    if called {
                        GATE_FAILED
                    } else {
                        GATE_FAILED_UNTRIED
                    }
                )))
            }
            Exchange::ToolResult {
                call_id, result, ..
            } => messages.push(Message {
                role: "tool",
                content: Some(match result {
                    Ok(output) => output.clone(),
                    Err(reason) => format!("error: {reason}"),
                }),
                tool_calls: Vec::new(),
                tool_call_id: Some(format!("{ids}{call_id}")),
            }),
        }
    }
}

/// A chat turn's instructions.
const CHAT_PROMPT: &str = "You are an assistant in an ongoing conversation. The \
conversation so far comes first; answer the user's newest message, using what was said \
before. Use the tools offered when they help: call one tool at a time and look at its \
result before going on. When you have the answer, reply in plain words and call no \
tool.";

/// The tool that hands work off to a planned run.
const HAND_OFF_TOOL: &str = "dispatch.dispatch";

/// Added to a chat turn's instructions when the hand-off tool is offered.
const CHAT_HAND_OFF: &str = " Work that takes long can be handed off with \
dispatch__dispatch, which returns at once: say that you handed it off; its result \
reaches you in a later turn.";

/// Said after the tool results of a chat turn's last answer. (Told "if you can answer
/// now, reply", the 1.5B model answered "I can answer now.")
const CHAT_CONTINUE: &str = "Those are the results. Now reply to the user in plain \
words, saying what the results show; call another tool only if you still need one, \
and if a call failed, try it another way.";

/// Said after a step's check did not pass.
const GATE_FAILED: &str = "Go on with the step: make the calls it still needs, then answer.";

/// Said instead when the step's model has called no tool (and when it says the step is
/// done before any call): a small model told only the first says the step is done
/// again, turn after turn (recorded with the 1.5B model). It does not name the way to
/// give up, which the 1.5B model then takes (errands, recorded). Nor does it name
/// `tools.search`, which does none of a step's work: told "(tools.search only finds
/// tools)", the 1.5B model answered with a search 10 times in 10; without it, it called
/// the step's write 8 times in 10 (4 with the listing it had, the others with made-up
/// or `$(...)` text), against once with the older "You have called no tool in this
/// step" (errands, recorded).
const GATE_FAILED_UNTRIED: &str = "You have called no tool in this step that does its work, \
so it has made nothing yet: saying it is done does not do it. Make the call the step needs \
now, with the actual text or arguments, then answer.";

/// Said to a model that gave a step up without trying a tool.
const GAVE_UP_UNTRIED: &str = "You have not used a tool for the step yet. Do the step with \
the tools offered: make the call it needs (read the file, fetch the page, write the file) \
and look at the result. Answer NOT DONE: only when a call's result shows the step cannot \
be done.";

/// Said after the tool results of the last turn when every call went well. It does not
/// name the way to give a step up: told "if the step cannot be done, answer starting
/// with NOT DONE", the 1.5B model answered NOT DONE to a page it had fetched whole
/// (HTTP 200, the company's name in it) 10 times in 10 at temperature 0.2, and 29 in
/// 30 over that and two other requests recorded by the errands suite; told this, on
/// the same three requests, 0 in 12 (it named the company, or said the step was done).
const CONTINUE: &str = "Those are the results. If they show the step done, answer with one \
short paragraph saying what you did and call no tool; otherwise make the next call.";

/// Said after the tool results of the last turn when a call failed.
const CONTINUE_AFTER_A_FAILURE: &str = "Those are the results. If the step is done, answer \
with one short paragraph saying what you did and call no tool; if a call failed, try it \
another way; if the step cannot be done, answer starting with NOT DONE: and why; \
otherwise make the next call.";

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Message>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'static str>,
    temperature: f32,
    max_tokens: u32,
    stream: bool,
    stream_options: StreamOptions,
}

impl<'a> ChatRequest<'a> {
    fn new(
        config: &'a Config,
        messages: Vec<Message>,
        tools: &'a [ToolSpec],
        temperature: f32,
    ) -> Self {
        Self {
            model: &config.model,
            messages,
            tool_choice: (!tools.is_empty()).then_some("auto"),
            tools: tools
                .iter()
                .map(|tool| WireTool {
                    kind: "function",
                    function: WireToolFunction {
                        name: tool.wire_name(),
                        description: &tool.description,
                        parameters: &tool.parameters,
                    },
                })
                .collect(),
            temperature,
            max_tokens: config.max_tokens,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        }
    }
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct Message {
    role: &'static str,
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

impl Message {
    fn system(content: String) -> Self {
        Self {
            role: "system",
            content: Some(content),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    fn user(content: String) -> Self {
        Self {
            role: "user",
            ..Self::system(content)
        }
    }

    fn assistant(content: String) -> Self {
        Self {
            role: "assistant",
            ..Self::system(content)
        }
    }
}

#[derive(Serialize)]
struct WireCall {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction,
}

#[derive(Serialize)]
struct WireFunction {
    name: String,
    arguments: String,
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireToolFunction<'a>,
}

#[derive(Serialize)]
struct WireToolFunction<'a> {
    name: String,
    description: &'a str,
    parameters: &'a Value,
}

// Lists are `Option`s: servers send `null` for an empty one (llama-cpp-python's
// `"tool_calls": null` in every text chunk), which a plain `Vec` refuses.

/// A whole (non-streamed) chat completion.
#[derive(Deserialize)]
struct Completion {
    choices: Option<Vec<CompletionChoice>>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    message: CompletionMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct CompletionMessage {
    content: Option<String>,
    tool_calls: Option<Vec<CompletedCall>>,
}

#[derive(Deserialize)]
struct CompletedCall {
    #[serde(default)]
    id: Option<String>,
    function: CallDelta,
}

/// One streamed chunk.
#[derive(Deserialize)]
struct Chunk {
    choices: Option<Vec<ChunkChoice>>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct Delta {
    content: Option<String>,
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    index: Option<usize>,
    id: Option<String>,
    function: Option<CallDelta>,
}

#[derive(Default, Deserialize)]
struct CallDelta {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// An answer as it is put together from deltas.
#[derive(Debug, Default)]
struct Answer {
    text: String,
    calls: Vec<PartialCall>,
    usage: Usage,
    bytes: usize,
    /// Why the model stopped (`stop`, `length`, `tool_calls`), when the server said.
    finish_reason: Option<String>,
}

#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

impl Answer {
    fn from_completion(completion: Completion) -> Result<Self, String> {
        let mut answer = Answer::default();
        if let Some(usage) = completion.usage {
            answer.usage = usage.into();
        }
        let Some(choice) = completion.choices.unwrap_or_default().into_iter().next() else {
            return Err("the completion has no choices".into());
        };
        answer.add_text(choice.message.content.as_deref().unwrap_or_default())?;
        answer.finish_reason = choice.finish_reason;
        let calls = choice.message.tool_calls.unwrap_or_default();
        for (index, call) in calls.into_iter().enumerate() {
            answer.add_call(index, call.id, call.function)?;
        }
        Ok(answer)
    }

    fn take(&mut self, chunk: Chunk) -> Result<(), String> {
        if let Some(usage) = chunk.usage {
            self.usage = usage.into();
        }
        for choice in chunk.choices.unwrap_or_default() {
            if choice.finish_reason.is_some() {
                self.finish_reason = choice.finish_reason;
            }
            let delta = choice.delta.unwrap_or_default();
            if let Some(text) = &delta.content {
                self.add_text(text)?;
            }
            for call in delta.tool_calls.unwrap_or_default() {
                let index = call.index.unwrap_or_default();
                self.add_call(index, call.id, call.function.unwrap_or_default())?;
            }
        }
        Ok(())
    }

    fn add_text(&mut self, text: &str) -> Result<(), String> {
        self.count(text.len())?;
        self.text.push_str(text);
        Ok(())
    }

    fn add_call(
        &mut self,
        index: usize,
        id: Option<String>,
        delta: CallDelta,
    ) -> Result<(), String> {
        if index >= MAX_CALLS {
            return Err(format!("the answer makes more than {MAX_CALLS} tool calls"));
        }
        if self.calls.len() <= index {
            self.calls.resize_with(index + 1, PartialCall::default);
        }
        let name = delta.name.unwrap_or_default();
        let arguments = delta.arguments.unwrap_or_default();
        self.count(name.len() + arguments.len() + id.as_ref().map_or(0, String::len))?;
        let call = &mut self.calls[index];
        if let Some(id) = id {
            call.id = id;
        }
        // OpenAI sends the name once; llama-cpp-python repeats it whole in every delta.
        // A name is never really split, so a repeat of the name so far is not appended.
        if name != call.name {
            call.name.push_str(&name);
        }
        call.arguments.push_str(&arguments);
        Ok(())
    }

    fn count(&mut self, bytes: usize) -> Result<(), String> {
        self.bytes += bytes;
        if self.bytes > MAX_ANSWER_BYTES {
            return Err(format!(
                "the answer is longer than {MAX_ANSWER_BYTES} bytes"
            ));
        }
        Ok(())
    }

    /// The turn: native calls if the model made any, else calls written in its text.
    fn into_turn(self, tools: &[ToolSpec]) -> TurnReply {
        let native: Vec<ToolCall> = self
            .calls
            .into_iter()
            .filter(|c| !c.name.is_empty())
            .map(|c| ToolCall {
                id: c.id,
                // Back from the wire name to the tool's own; a tool not on offer keeps
                // the name the model gave it (and is refused further on).
                tool: crate::resolve(tools, &c.name).map_or(c.name, |t| t.name.clone()),
                args_json: if c.arguments.trim().is_empty() {
                    "{}".into()
                } else {
                    c.arguments
                },
            })
            .collect();
        if !native.is_empty() {
            return TurnReply {
                text: self.text,
                tool_calls: native,
                usage: self.usage,
                form: CallForm::Native,
            };
        }
        let (tool_calls, form) = match crate::textcalls::parse(&self.text, tools) {
            Some((calls, form)) => (calls, form),
            None => (Vec::new(), CallForm::None),
        };
        TurnReply {
            text: self.text,
            tool_calls,
            usage: self.usage,
            form,
        }
    }
}

impl From<WireUsage> for Usage {
    fn from(usage: WireUsage) -> Self {
        Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        }
    }
}

/// Why one attempt failed, and whether another may do better.
struct Failure {
    message: String,
    transient: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn transient(message: String) -> Self {
        Self {
            message,
            transient: true,
            retry_after: None,
        }
    }

    fn fatal(message: String) -> Self {
        Self {
            message,
            transient: false,
            retry_after: None,
        }
    }
}

/// Puts an answer together from an event stream's chunks. Every byte is read once
/// and every buffer is bounded ([`crate::sse`], [`MAX_ANSWER_BYTES`]). The reading
/// spends tokio's cooperative budget as it goes: a body that is always ready (a fast
/// server, its bytes read by another thread) is otherwise read in one poll for as long
/// as it lasts, holding the worker thread, and the call's deadline, checked only
/// between polls, with it.
async fn read_stream(
    mut body: impl Stream<Item = Result<bytes::Bytes, String>> + Unpin,
    idle_timeout: Duration,
    deltas: Option<&crate::DeltaSink>,
) -> Result<Answer, Failure> {
    let mut events = crate::sse::Decoder::default();
    let mut answer = Answer::default();
    loop {
        while let Some(data) = events.next_event() {
            tokio::task::coop::consume_budget().await;
            let data = data.trim();
            if data == "[DONE]" {
                return Ok(answer);
            }
            if data.is_empty() {
                continue;
            }
            let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
                Failure::fatal(format!(
                    "not a chat completion chunk: {e}: {}",
                    excerpt(data)
                ))
            })?;
            let before = answer.text.len();
            answer.take(chunk).map_err(Failure::fatal)?;
            if let Some(deltas) = deltas
                && answer.text.len() > before
            {
                let _ = deltas.send(crate::Delta::Text(answer.text[before..].to_owned()));
            }
        }
        let bytes = match tokio::time::timeout(idle_timeout, body.next()).await {
            Err(_) => {
                return Err(Failure::transient(format!(
                    "the stream sent nothing for {} s",
                    idle_timeout.as_secs()
                )));
            }
            Ok(None) => {
                return Err(Failure::transient("the stream ended without [DONE]".into()));
            }
            Ok(Some(Err(e))) => {
                return Err(Failure::transient(format!("the stream broke: {e}")));
            }
            Ok(Some(Ok(bytes))) => bytes,
        };
        events.feed(&bytes).map_err(Failure::fatal)?;
        tokio::task::coop::consume_budget().await;
    }
}

/// Reads a body, refusing one longer than `max` bytes: a server's answer is held in
/// memory, so its size is ours to bound.
async fn read_capped(response: reqwest::Response, max: usize) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|e| Failure::transient(format!("answer cut short: {}", plain(&e))))?;
        if body.len() + chunk.len() > max {
            return Err(Failure::fatal(format!(
                "the answer is longer than {max} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured: the backoff applies).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// A reqwest error without its URL's query or anything else it may carry.
fn plain(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection refused or failed"
    } else if e.is_body() || e.is_decode() {
        "the body broke off"
    } else {
        "request failed"
    };
    match std::error::Error::source(e) {
        Some(source) => format!("{kind}: {source}"),
        None => kind.to_owned(),
    }
}

/// The start of a response body, for an error message.
fn excerpt(body: &str) -> String {
    const MAX: usize = 200;
    let body = body.trim();
    match body.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &body[..at]),
        None => body.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_is_read_from_json_in_the_answer_or_not_at_all() {
        let (verdict, reason) =
            verdict_of("```json\n{\"verdict\": \"deny\", \"reason\": \"mass email\"}\n```")
                .unwrap();
        assert_eq!(
            (verdict, reason.as_str()),
            (crate::Verdict::Deny, "mass email")
        );
        assert_eq!(
            verdict_of(r#"Sure. {"verdict":"escalate"}"#).unwrap().0,
            crate::Verdict::Escalate
        );
        for unclear in ["allow", r#"{"verdict": "yes"}"#, "{", "}{", ""] {
            assert!(verdict_of(unclear).is_none(), "{unclear}");
        }
        let long = format!(r#"{{"verdict":"allow","reason":"{}"}}"#, "é".repeat(1000));
        assert_eq!(
            verdict_of(&long).unwrap().1.chars().count(),
            MAX_VERDICT_REASON
        );
    }

    /// A body always ready with its next bytes, as a fast server's is when another
    /// thread reads the socket; it notes at which chunk it first saw `other` done.
    fn always_ready(
        chunks: usize,
        other: std::sync::Arc<std::sync::atomic::AtomicBool>,
        seen_at: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> impl Stream<Item = Result<bytes::Bytes, String>> + Unpin {
        use std::sync::atomic::Ordering::SeqCst;
        let nothing = bytes::Bytes::from_static(b"data: {\"choices\":[]}\n\n");
        futures::stream::iter((0..chunks).map(move |i| {
            if other.load(SeqCst) {
                seen_at.fetch_min(i, SeqCst);
            }
            Ok(nothing.clone())
        }))
        .chain(futures::stream::iter([Ok(bytes::Bytes::from_static(
            b"data: [DONE]\n\n",
        ))]))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reading_a_stream_always_ready_lets_other_tasks_run() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        const CHUNKS: usize = 20_000;
        // One thread: the other task runs only if reading gives the thread up.
        let other = Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let other = other.clone();
            async move { other.store(true, SeqCst) }
        });
        let seen_at = Arc::new(AtomicUsize::new(usize::MAX));
        let body = always_ready(CHUNKS, other, seen_at.clone());
        let answer = read_stream(body, Duration::from_secs(60), None)
            .await
            .unwrap_or_else(|f| panic!("{}", f.message));
        assert_eq!(answer.text, "");
        let seen_at = seen_at.load(SeqCst);
        assert!(
            seen_at < CHUNKS / 10,
            "the other task ran only after chunk {} of {CHUNKS} (none: not while reading)",
            if seen_at == usize::MAX {
                "none".to_owned()
            } else {
                seen_at.to_string()
            }
        );
    }

    fn chunk(delta: Value) -> Chunk {
        serde_json::from_value(serde_json::json!({"choices": [{"delta": delta}]})).unwrap()
    }

    #[test]
    fn an_answer_stays_small_enough_for_one_event() {
        let mut answer = Answer::default();
        answer
            .take(chunk(
                serde_json::json!({"content": "x".repeat(MAX_ANSWER_BYTES)}),
            ))
            .unwrap();
        let err = answer
            .take(chunk(serde_json::json!({"content": "x"})))
            .unwrap_err();
        assert!(err.contains("longer than"), "{err}");

        let mut answer = Answer::default();
        let call = |index: usize| {
            chunk(serde_json::json!({"tool_calls": [{"index": index, "function": {"name": "f"}}]}))
        };
        answer.take(call(MAX_CALLS - 1)).unwrap();
        assert!(
            answer
                .take(call(MAX_CALLS))
                .unwrap_err()
                .contains("more than")
        );
    }
}
