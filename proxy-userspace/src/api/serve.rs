//! Serving a router on TCP (optionally TLS) or on a Unix socket, with the
//! bounds of `[api.limits]` / `[admin.limits]`: a connection cap, a header
//! read timeout (which also bounds the TLS handshake and idle keep-alive),
//! an idle timeout for stalled bodies and readers, and a body limit.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::{ClientAddr, tls::TlsFiles};
use crate::config::HttpLimits;
use crate::metrics::Metrics;

/// Which of the two HTTP servers: the metric label and log name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Api,
    Admin,
}

impl Server {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Server::Api => "api",
            Server::Admin => "admin",
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The socket file is removed when the server stops.
    Unix(UnixListener, SocketFile),
}

/// Removes the socket file when dropped: when the server stops, or when
/// the runtime drops its task at exit. Only the file this agent bound: a
/// successor that took over binds its own socket at the same path, and a
/// draining predecessor must not remove that one.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket file bound.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    /// The socket file just bound at `path`.
    #[must_use]
    pub fn bound(path: &std::path::Path) -> Self {
        Self {
            path: path.to_owned(),
            id: file_id(path),
        }
    }
}

fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a server needs besides its listener and router.
#[derive(Clone)]
pub struct ServeOptions {
    pub server: Server,
    pub limits: HttpLimits,
    pub tls: Option<Arc<TlsFiles>>,
    pub metrics: Arc<Metrics>,
}

/// Serves `router` on `listener`, one task per connection, until `stop`
/// changes.
pub async fn serve(
    listener: Listener,
    router: Router,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
) {
    let router = router.layer(axum::middleware::from_fn_with_state(
        Bounds {
            metrics: Arc::clone(&options.metrics),
            server: options.server,
            max_body: options.limits.max_body,
        },
        bound_requests,
    ));
    let slots = Arc::new(Semaphore::new(options.limits.max_connections));
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            _ = stop.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(server = options.server.as_str(), error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Closed at once when full: a flood costs an accept, not a task.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            options
                .metrics
                .http_limit_hit(options.server.as_str(), "max_connections");
            drop(stream);
            continue;
        };
        let mut app = router.clone();
        if let Some(peer) = peer {
            app = app.layer(axum::Extension(ClientAddr(peer)));
        }
        let options = options.clone();
        tokio::spawn(async move {
            let _slot = slot;
            connection(stream, app, &options).await;
        });
    }
}

/// An accepted stream of either kind.
enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, Option<SocketAddr>)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok((Stream::Tcp(s), Some(peer)))
        }
        Listener::Unix(l, _) => Ok((Stream::Unix(l.accept().await?.0), None)),
    }
}

async fn connection(stream: Stream, app: Router, options: &ServeOptions) {
    let limits = &options.limits;
    let hit = |limit| {
        options
            .metrics
            .http_limit_hit(options.server.as_str(), limit)
    };
    match (stream, &options.tls) {
        (Stream::Tcp(tcp), Some(tls)) => {
            let acceptor = tls.acceptor();
            match tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls_stream)) => http(tls_stream, app, limits, &hit).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => hit("header_timeout"),
            }
        }
        (Stream::Tcp(tcp), None) => http(tcp, app, limits, &hit).await,
        (Stream::Unix(unix), _) => http(unix, app, limits, &hit).await,
    }
}

/// HTTP/1.1 on `io` until the client is done or a bound cuts it.
async fn http<T>(io: T, app: Router, limits: &HttpLimits, hit: &(dyn Fn(&'static str) + Sync))
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let last = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let io = Activity {
        inner: io,
        start,
        last: Arc::clone(&last),
    };
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // Validated to at least hyper's minimum (8192).
        .max_buf_size(limits.max_header_bytes)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    loop {
        let idle_until =
            start + Duration::from_millis(last.load(Ordering::Relaxed)) + limits.idle_timeout;
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    if e.is_timeout() {
                        hit("header_timeout");
                    } else if e.is_parse_too_large() {
                        hit("max_header_bytes");
                    }
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(idle_until) => {
                let quiet = Duration::from_millis(last.load(Ordering::Relaxed));
                if start + quiet + limits.idle_timeout <= Instant::now() {
                    hit("idle_timeout");
                    return;
                }
            }
        }
    }
}

#[derive(Clone)]
struct Bounds {
    metrics: Arc<Metrics>,
    server: Server,
    max_body: usize,
}

/// Refuses a declared body over `max_body` before reading any of it, and
/// counts the refusals made inside the router: a body over the limit
/// without a declared length (413, from axum's `DefaultBodyLimit`) and a
/// missing or wrong admin token (401).
async fn bound_requests(
    axum::extract::State(bounds): axum::extract::State<Bounds>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let server = bounds.server.as_str();
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > bounds.max_body as u64) {
        bounds.metrics.http_limit_hit(server, "max_body");
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    }
    let response = next.run(request).await;
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE => bounds.metrics.http_limit_hit(server, "max_body"),
        StatusCode::UNAUTHORIZED if bounds.server == Server::Admin => {
            bounds.metrics.http_limit_hit(server, "unauthorized");
        }
        _ => {}
    }
    response
}

/// An IO that records when bytes last moved, in milliseconds since
/// `start`, for the idle timeout.
struct Activity<T> {
    inner: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Activity<T> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
