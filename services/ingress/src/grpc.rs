//! The gRPC front door (tonic), beside HTTP on `--grpc-listen`: the `Dispatch`
//! service of `proto/dispatch/api/v1/api.proto` on the same API keys, the standard
//! health service, and server reflection (grpcurl needs no `.proto` files). Every
//! method goes the way its HTTP twin goes: goals through the same checks and the same
//! submission, runs from the same ledger queries, conversations from the same chunk
//! source as SSE.

use std::pin::Pin;
use std::sync::Arc;

use dispatch_bus::{ConversationId, RunId, subject};
use dispatch_proto::api::v1::dispatch_server::{Dispatch, DispatchServer};
use dispatch_proto::api::v1::{
    self as api, GetRunRequest, ListRunsRequest, ListRunsResponse, RunView,
};
use dispatch_proto::api::{QueryError, Reply};
use dispatch_proto::run::v1::RunEvent;
use dispatch_runlog::submit::{Submission, Submitted};
use futures::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::conversations::{self, Cursor, Start};
use crate::{App, QUERY_TIMEOUT};

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Connections served at once, HTTP/2 streams per connection, and how long a silent
/// peer is kept: the limits the HTTP side has, for the gRPC listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
}

/// Concurrent streams one connection may open.
const MAX_STREAMS: u32 = 64;
/// Pings a peer that has said nothing this long; one that does not answer in
/// [`PING_TIMEOUT`] is closed.
const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(20);
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves gRPC on `listener` until `shutdown`, at most `limits.max_connections`
/// connections at once (the next waits in the kernel's backlog).
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<DispatchServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dispatch_proto::api::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptors compiled with the crate are valid");
    let access = app.access.clone();
    let dispatch = DispatchServer::with_interceptor(Service { app }, move |request| {
        authenticate(&access, request)
    });
    let incoming = accepted(listener, limits.max_connections);
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS)
        .concurrency_limit_per_connection(MAX_STREAMS as usize)
        .http2_keepalive_interval(Some(PING_EVERY))
        .http2_keepalive_timeout(Some(PING_TIMEOUT))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(dispatch)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Connections from `listener`, each holding one of `max` slots until it closes; an
/// accept error (out of descriptors) is waited out, not spun on.
fn accepted(
    listener: tokio::net::TcpListener,
    max: usize,
) -> impl Stream<Item = std::io::Result<Limited>> {
    let slots = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
    futures::stream::unfold((listener, slots), |(listener, slots)| async move {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let limited = Limited {
                        stream,
                        _slot: slot,
                    };
                    return Some((Ok(limited), (listener, slots)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a gRPC connection; waiting");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// A connection and its slot, given back when tonic drops the connection.
pub struct Limited {
    stream: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The same API keys as HTTP: `authorization: Bearer <key>` metadata.
fn authenticate(
    access: &crate::access::Access,
    mut request: Request<()>,
) -> Result<Request<()>, Status> {
    let presented = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match access.caller(presented) {
        Ok(caller) => {
            request
                .extensions_mut()
                .insert(crate::access::Caller(caller));
            Ok(request)
        }
        Err(crate::access::Denied::Missing) => Err(Status::unauthenticated(
            "send an API key as `authorization: Bearer <key>` metadata; create one with \
             `dispatch api-key create`",
        )),
        Err(crate::access::Denied::Unknown) => Err(Status::unauthenticated(
            "the API key is not known (revoked, or mistyped)",
        )),
        Err(crate::access::Denied::Unavailable) => {
            Err(Status::unavailable("the API key store cannot be read"))
        }
    }
}

pub struct Service {
    app: Arc<App>,
}

/// A ledger answer as a gRPC status.
fn ledger<T>(reply: Result<Reply<T>, dispatch_bus::Error>) -> Result<T, Status> {
    match reply {
        Ok(answer) => answer.map_err(refused),
        Err(e) => Err(Status::unavailable(format!(
            "the ledger did not answer: {e}"
        ))),
    }
}

/// Why the ledger could not answer, as a gRPC status.
fn refused(e: QueryError) -> Status {
    match e {
        QueryError::NotFound(m) => Status::not_found(m),
        QueryError::Ambiguous(m) | QueryError::BadRequest(m) => Status::invalid_argument(m),
        QueryError::Unavailable(m) => Status::unavailable(m),
        QueryError::Corrupt(m) => Status::data_loss(m),
    }
}

#[tonic::async_trait]
impl Dispatch for Service {
    async fn submit_goal(
        &self,
        request: Request<api::SubmitGoalRequest>,
    ) -> Result<Response<api::SubmitGoalResponse>, Status> {
        let caller = crate::access::Caller::id(request.extensions().get());
        let body = request.into_inner();
        let conversation = match body.conversation_id.as_str() {
            "" => ConversationId::DEFAULT,
            id => id,
        };
        let goal = dispatch_runlog::submit::Goal::new(
            &body.goal,
            conversation,
            body.timeout_ms,
            crate::ORIGIN,
        )
        .and_then(|goal| goal.with_callback(&body.callback_url))
        .map_err(|e| Status::invalid_argument(format!("{}: {e}", e.code())))?;
        if let Err(refused) = crate::deliverable(&self.app, &goal).await {
            let message = format!("{}: callback_url: {refused}", refused.code());
            return Err(match refused {
                dispatch_secrets::Unsignable::Missing => Status::failed_precondition(message),
                dispatch_secrets::Unsignable::Unknown(_) => Status::unavailable(message),
            });
        }
        let submission = match body.idempotency_key.as_str() {
            "" => Submission::new(goal),
            key if key.len() > 255 || key.chars().any(char::is_control) => {
                return Err(Status::invalid_argument(
                    "idempotency_key: at most 255 printable characters",
                ));
            }
            key => Submission::idempotent(goal, &format!("{caller}\0{key}")),
        };
        let (run_id, replayed) = match crate::store(&self.app, &submission).await {
            Ok(Submitted::Stored(run_id)) => (run_id.to_string(), false),
            Ok(Submitted::Earlier(earlier)) if submission.same_request(&earlier) => {
                (earlier.run_id, true)
            }
            Ok(Submitted::Earlier(_)) => {
                return Err(Status::failed_precondition(
                    "this idempotency_key was used for a different goal; use a new key",
                ));
            }
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "the goal is not known to be stored; submit it again (with an \
                     idempotency_key that never makes a second run): {e}"
                )));
            }
        };
        Ok(Response::new(api::SubmitGoalResponse {
            status_url: format!("/v1/runs/{run_id}"),
            run_id,
            replayed,
        }))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<RunView>, Status> {
        let reply = self
            .app
            .bus
            .request_json(subject::query::run(), request.get_ref(), QUERY_TIMEOUT)
            .await;
        Ok(Response::new(ledger::<RunView>(reply)?))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let reply = self
            .app
            .bus
            .request_json(subject::query::runs(), request.get_ref(), QUERY_TIMEOUT)
            .await;
        Ok(Response::new(ledger::<ListRunsResponse>(reply)?))
    }

    async fn stop_run(
        &self,
        request: Request<api::StopRunRequest>,
    ) -> Result<Response<api::StopRunResponse>, Status> {
        use crate::stops::Refused;
        let caller = crate::access::Caller::id(request.extensions().get());
        let body = request.into_inner();
        let by = crate::stops::requested_by("grpc", &caller);
        match crate::stops::stop(&self.app, &body.run_id, body.grace_ms, body.force, by).await {
            Ok(run_id) => Ok(Response::new(api::StopRunResponse {
                status_url: format!("/v1/runs/{run_id}"),
                run_id,
            })),
            Err(Refused::Query(e)) => Err(refused(e)),
            Err(Refused::Ended { run_id, status }) => Err(Status::failed_precondition(format!(
                "run {run_id} has ended already ({status})"
            ))),
            Err(Refused::BadGrace(m)) => Err(Status::invalid_argument(m)),
            Err(Refused::Unavailable(m)) => Err(Status::unavailable(m)),
        }
    }

    type WatchRunStream = Streamed<RunEvent>;

    async fn watch_run(
        &self,
        request: Request<api::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let body = request.into_inner();
        let run_id: RunId = body
            .run_id
            .parse()
            .map_err(|_| Status::invalid_argument("run_id is a UUID in its hyphenated form"))?;
        let events = match conversations::run_log(&self.app, run_id, body.after_seq).await {
            Ok(events) => events,
            Err(conversations::RunLogError::NoRun) => {
                return Err(Status::not_found(format!("no run {run_id}")));
            }
            Err(conversations::RunLogError::Unavailable(e)) => return Err(Status::unavailable(e)),
        };
        Ok(Response::new(Box::pin(events.map(Ok))))
    }

    type SubscribeConversationStream = Streamed<api::ConversationChunk>;

    async fn subscribe_conversation(
        &self,
        request: Request<api::SubscribeConversationRequest>,
    ) -> Result<Response<Self::SubscribeConversationStream>, Status> {
        let body = request.into_inner();
        let conversation: ConversationId = body.conversation_id.parse().map_err(|_| {
            Status::invalid_argument("a conversation id is 1-128 of A-Z, a-z, 0-9, '-' and '_'")
        })?;
        let start = match (body.cursor.as_str(), body.from) {
            ("", 0) => Start::Oldest,
            ("", seq) => Start::At(seq),
            (cursor, _) => Start::After(Cursor::parse(cursor).ok_or_else(|| {
                Status::invalid_argument("cursor is the id of a chunk this stream sent")
            })?),
        };
        let chunks = conversations::chunks(&self.app, &conversation, start)
            .await
            .map_err(|_| Status::unavailable("the conversation stream cannot be read now"))?;
        Ok(Response::new(Box::pin(chunks.map(|chunk| {
            Ok(api::ConversationChunk {
                id: chunk.id,
                chunk_json: chunk.data,
            })
        }))))
    }
}
