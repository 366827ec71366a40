//! The accept loop: HTTP/1.1 connections with every limit a public socket needs.
//!
//! `axum::serve` holds a connection as long as the client likes and accepts until the
//! process runs out of file descriptors. This loop does not:
//! - at most [`Limits::max_connections`] connections are served at once; one more is
//!   answered `503` with `Retry-After` and closed at once, so descriptors stay bounded;
//! - a client must send a request's headers within [`Limits::header_timeout`], which
//!   hyper also applies while a kept-alive connection waits for its next request, so
//!   slow-header (slowloris) and idle clients are closed;
//! - a request body that stops sending for [`Limits::body_timeout`] fails the request
//!   (the handler answers `408`), and the whole request is bounded by the router's own
//!   timeout;
//! - on shutdown, connections finish their current request and close.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// A connection's share of [`Limits::max_connections`], in every request's extensions:
/// a handler that takes the connection over (a WebSocket) keeps it for as long as it
/// uses the connection.
#[derive(Clone)]
pub struct ConnectionSlot {
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

/// The limits the loop enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown`, then drains open connections for
/// at most `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let service = ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .service(router);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or the like: say so, and let some go first
                    // instead of spinning on the error.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "connection limit reached; answering 503");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true);
        // With upgrades: WebSockets (`/v1/conversations/{id}/ws`) take over their
        // connection, still holding its slot until they end.
        let slot = ConnectionSlot {
            _permit: Arc::new(slot),
        };
        let connection = http
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(
                    ServiceBuilder::new()
                        .layer(tower_http::add_extension::AddExtensionLayer::new(
                            slot.clone(),
                        ))
                        .layer(tower_http::add_extension::AddExtensionLayer::new(
                            axum::extract::ConnectInfo(peer),
                        ))
                        .service(service.clone()),
                ),
            )
            .with_upgrades();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.cancelled() => {
                    // Finish the request in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
            drop(slot);
        });
    }
    drop(listener);
    // Every connection gives its slot back when it ends.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
    }
}

/// Answers a connection over the limit and closes it.
async fn refuse(mut stream: TcpStream) {
    let body = crate::problem::Problem::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "the server is at its connection limit; retry shortly",
    )
    .json();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    })
    .await;
}
