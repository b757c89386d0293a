//! The HTTP/1.1 server under the router, with the limits that keep slow or stalled clients
//! from holding the front: a header read timeout (also the keep-alive idle timeout), a
//! deadline for each request's whole body, a cap on request header bytes answered with a JSON
//! `431`, and a bound on open connections. Graceful shutdown stops accepting, lets requests in
//! flight finish and waits for every connection to close.

use super::ApiError;
use axum::{
    BoxError, Router,
    body::{Body, Bytes},
    http::{Request, StatusCode},
    response::{IntoResponse, Response},
};
use http_body::{Frame, SizeHint};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{
    convert::Infallible,
    future::Future,
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    net::TcpListener,
    sync::Semaphore,
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Largest request header section accepted with a JSON answer, in bytes (names, values and
/// their separators). Larger headers get a JSON `431`; above hyper's own read-buffer limit
/// (about 400 KiB) or past 100 header fields hyper answers a bare `431` and closes.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The server's limits (from `HTTP_HEADER_TIMEOUT_MS`, `HTTP_BODY_TIMEOUT_MS`,
/// `HTTP_MAX_CONNECTIONS`).
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Time to send a request's headers, from the connection's start or the end of the
    /// previous response; past it the connection is closed.
    pub header_timeout: Duration,
    /// Time to send a request's whole body once its headers arrived; past it the body read
    /// fails and the request is answered `408`.
    pub body_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl ServerLimits {
    /// The limits configured in `settings`.
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        Self {
            header_timeout: settings.http_header_timeout,
            body_timeout: settings.http_body_timeout,
            max_connections: settings.http_max_connections,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then waits for the open
/// connections to finish their requests and close.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let max_connections = limits
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        // A connection slot first: at the limit, new clients stay in the backlog unserved.
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, remote) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::error!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let body_timeout = limits.body_timeout;
        let service = service_fn(move |req: Request<Incoming>| {
            handle(router.clone(), req, remote, body_timeout)
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "HTTP connection closed with an error");
            }
        });
    }
    drop(listener);
    // Every connection holds a permit until it has closed.
    let _all = permits.acquire_many(max_connections as u32).await;
    Ok(())
}

/// Errors of one incoming connection that do not affect the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// One request: the client's address into its extensions (`ConnectInfo`), the header-size
/// check, then the router with the body under its deadline.
async fn handle(
    router: Router,
    mut req: Request<Incoming>,
    remote: std::net::SocketAddr,
    body_timeout: Duration,
) -> Result<Response, Infallible> {
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(remote));
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Ok(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("request headers are {header_bytes} bytes; at most {MAX_HEADER_BYTES} allowed"),
        )
        .into_response());
    }
    let req = req.map(|body| Body::new(DeadlineBody::new(body, body_timeout)));
    router.oneshot(req).await
}

/// The request body was not complete within `HTTP_BODY_TIMEOUT_MS` of its headers.
#[derive(Debug, thiserror::Error)]
#[error(
    "the request body was not received within {} ms of its headers (HTTP_BODY_TIMEOUT_MS)",
    .0.as_millis()
)]
pub struct BodyTimeout(pub Duration);

/// A request body that fails with [`BodyTimeout`] once its deadline passes, however the
/// bytes trickle in (unlike a timeout between frames, which every byte resets).
struct DeadlineBody {
    inner: Incoming,
    timeout: Duration,
    deadline: Instant,
    /// Armed on the first read, so bodies nobody reads cost no timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: Instant::now() + timeout,
            sleep: None,
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // Data already here is taken even at the deadline (a body that has fully arrived
        // completes); the deadline fails the read whenever the client makes it wait.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(BoxError::from)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
