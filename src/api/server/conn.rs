//! One connection: TLS (where configured), HTTP/1 by hyper, and a watchdog that closes it
//! when a client is too slow to send a request header or stays idle too long.
//!
//! The watchdog is ours, not hyper's `header_read_timeout`: hyper starts that timer
//! whenever a kept-alive connection goes idle, so it can't close a header that trickles
//! in after 10 s and still keep an idle connection for a minute, as a client pool
//! expects (Go's `IdleConnTimeout` is 90 s). The phases are set from three places of the
//! same task: a read (first byte of a request), the service call (request received), and
//! the drop of the response body (response written).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use warp::http::{Request, Response};

use super::ServerOptions;

/// The client's address, in each request's extensions (warp's `addr::remote()` only
/// works on warp's own server).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// The body type of warp's responses (its type is not exported by name).
type WarpBody = <warp::reply::Response as BodyOf>::Body;
trait BodyOf {
    type Body;
}
impl<B> BodyOf for Response<B> {
    type Body = B;
}

/// Serves one accepted connection until it ends, times out, or shutdown drains it.
pub async fn serve<S>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    tls: Option<TlsAcceptor>,
    opts: &ServerOptions,
    stop: CancellationToken,
) where
    S: tower_service::Service<
            Request<Incoming>,
            Response = warp::reply::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = tls else {
        return http(stream, peer, service, opts, stop).await;
    };
    // A TLS connection starts with a handshake record (0x16); anything else is most
    // likely plain HTTP sent to the HTTPS port, which gets a plain answer saying so.
    match tokio::time::timeout(opts.header_read_timeout, super::peek_byte(&stream)).await {
        Ok(Ok(Some(0x16))) => {}
        Ok(Ok(Some(_))) => return plain_http_on_tls_port(stream, peer).await,
        _ => return,
    }
    match tokio::time::timeout(opts.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => http(tls, peer, service, opts, stop).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

async fn http<IO, S>(
    io: IO,
    peer: SocketAddr,
    service: S,
    opts: &ServerOptions,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<
            Request<Incoming>,
            Response = warp::reply::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
    });
    let svc = ConnService {
        inner: service,
        activity: activity.clone(),
        peer,
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let deadline = activity.deadline(opts);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = activity.changed.notified() => {}
            () = sleep_until(deadline) => {
                if let Some(why) = activity.expired(opts) {
                    tracing::debug!(%peer, why, "closing connection");
                    return;
                }
            }
            () = stop.cancelled(), if !draining => {
                // Idle connections close now; a request in flight finishes first.
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Refuses a connection at once (beyond the limit, or out of descriptors): a 503 saying
/// `why` where the connection is plain HTTP (written only if the socket takes it right
/// away), then close.
pub fn refuse(stream: TcpStream, tls: bool, why: &str) {
    if !tls {
        // Read what already arrived, so closing does not reset the connection before the
        // client has read the answer.
        let mut buf = [0u8; 4096];
        let _ = stream.try_read(&mut buf);
        let _ = stream.try_write(&raw_answer(503, "Service Unavailable", why));
    }
}

/// Answers plain HTTP on the TLS port, then closes.
async fn plain_http_on_tls_port(mut stream: TcpStream, peer: SocketAddr) {
    tracing::debug!(%peer, "plain HTTP on the TLS port");
    let answer = raw_answer(
        400,
        "Bad Request",
        "this port speaks HTTPS: use https:// (the request was not read)",
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        // Drain what the client still sends so the close is not a reset.
        let mut buf = [0u8; 4096];
        while stream.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// A complete HTTP/1.1 answer with the API's JSON error body, for the two cases where
/// hyper is not serving the connection.
fn raw_answer(status: u16, reason: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "code": reason, "message": message }).to_string() + "\n";
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const HEADER: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;

/// Where a connection is: receiving a header, serving a request, or idle between
/// requests; and since when.
struct Activity {
    start: Instant,
    phase: AtomicU8,
    /// Milliseconds from `start` to the phase's start.
    since_ms: AtomicU64,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        // A new connection waits for its first header.
        Activity {
            start: Instant::now(),
            phase: AtomicU8::new(HEADER),
            since_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn set(&self, phase: u8) {
        self.since_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.phase.store(phase, Ordering::Relaxed);
        // A stored permit if the watchdog is not waiting: no change is missed.
        self.changed.notify_one();
    }

    /// Bytes arrived: on an idle connection, a request header has begun.
    fn read(&self) {
        if self.phase.load(Ordering::Relaxed) == IDLE {
            self.set(HEADER);
        }
    }

    fn deadline(&self, opts: &ServerOptions) -> Option<Instant> {
        let limit = match self.phase.load(Ordering::Relaxed) {
            HEADER => opts.header_read_timeout,
            IDLE => opts.idle_timeout,
            _ => return None,
        };
        let since = Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        Some(self.start + since + limit)
    }

    fn expired(&self, opts: &ServerOptions) -> Option<&'static str> {
        let passed = self.deadline(opts).is_some_and(|d| d <= Instant::now());
        match self.phase.load(Ordering::Relaxed) {
            HEADER if passed => Some("request header not received in time"),
            IDLE if passed => Some("idle keep-alive connection"),
            _ => None,
        }
    }
}

/// The connection's stream, noting when request bytes arrive.
struct Watched<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// warp's service for one connection: marks the connection busy while a request is
/// served and tags each request with the client's address.
#[derive(Clone)]
struct ConnService<S> {
    inner: S,
    activity: Arc<Activity>,
    peer: SocketAddr,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower_service::Service<
            Request<Incoming>,
            Response = warp::reply::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.activity.set(BUSY);
        req.extensions_mut().insert(PeerAddr(self.peer));
        let mut inner = self.inner.clone();
        let activity = self.activity.clone();
        Box::pin(async move {
            let resp = tower_service::Service::call(&mut inner, req).await?;
            Ok(resp.map(|body| Tracked {
                body,
                _done: IdleOnDrop(activity),
            }))
        })
    }
}

/// A response body that marks the connection idle once hyper is done with it (written
/// in full, or dropped for a HEAD request or a closed connection).
pub struct Tracked {
    body: WarpBody,
    _done: IdleOnDrop,
}

struct IdleOnDrop(Arc<Activity>);

impl Drop for IdleOnDrop {
    fn drop(&mut self) {
        self.0.set(IDLE);
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = warp::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, warp::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
