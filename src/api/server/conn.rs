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

use super::{ClientGone, ServerOptions};
use crate::api::auth::Proven;

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

/// Serves one accepted connection until it ends, times out, is evicted for a newcomer
/// (see `slots`), or shutdown drains it.
pub async fn serve<S>(
    Accepted { stream, fin, peer }: Accepted,
    service: S,
    tls: Option<TlsAcceptor>,
    activity: Arc<Activity>,
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
        return http(stream, peer, service, activity, fin, opts, stop).await;
    };
    let evicted = activity.evicted.clone();
    // A TLS connection starts with a handshake record (0x16); anything else is most
    // likely plain HTTP sent to the HTTPS port, which gets a plain answer saying so.
    let peeked = tokio::select! {
        p = tokio::time::timeout(opts.header_read_timeout, super::peek_byte(&stream)) => p,
        () = evicted.cancelled() => return,
    };
    match peeked {
        Ok(Ok(Some(0x16))) => {}
        Ok(Ok(Some(_))) => return plain_http_on_tls_port(stream, peer).await,
        _ => return,
    }
    let accepted = tokio::select! {
        a = tokio::time::timeout(opts.header_read_timeout, acceptor.accept(stream)) => a,
        () = evicted.cancelled() => return,
    };
    match accepted {
        Ok(Ok(tls)) => http(tls, peer, service, activity, fin, opts, stop).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

async fn http<IO, S>(
    io: IO,
    peer: SocketAddr,
    service: S,
    activity: Arc<Activity>,
    fin: Option<FinWatch>,
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
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
    });
    let svc = ConnService {
        inner: service,
        activity: activity.clone(),
        peer,
    };
    // A client that half-closes (or closes) right after a complete request still has
    // it carried out and answered: hyper does not drop it at the read side's EOF.
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .half_close(true)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut draining = false;
    let evicted = activity.evicted.clone();
    let mut fin_seen = false;
    loop {
        let deadline = activity.deadline(opts);
        tokio::select! {
            () = FinWatch::wait(fin.as_ref()), if !fin_seen => {
                fin_seen = true;
                activity.client_gone.cancel();
            }
            () = evicted.cancelled(), if !draining => {
                // Between requests: closed now. Chosen while idle but a request came in
                // since: it is answered first.
                if activity.phase.load(Ordering::Relaxed) != BUSY {
                    tracing::debug!(%peer, "closing a connection that never authenticated: its slot is needed");
                    return;
                }
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
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

/// A connection the accept loop took, with its FIN watch (see `FinWatch::of`).
pub struct Accepted {
    pub stream: TcpStream,
    pub fin: Option<FinWatch>,
    pub peer: SocketAddr,
}

/// Notices the client's FIN on the connection's socket (a duplicate of its descriptor,
/// registered on its own for `EPOLLRDHUP`) without reading: hyper reads the requests.
/// With half-close on, hyper itself does not look at the socket while it serves one.
pub struct FinWatch(TcpStream);

impl FinWatch {
    /// `None` where the descriptor can't be duplicated or registered (out of descriptors):
    /// the connection is served without it. Made by the accept loop, never concurrently
    /// by connections: see its reserve descriptor.
    pub fn of(stream: &TcpStream) -> Option<FinWatch> {
        use std::os::fd::AsFd;
        let fd = stream.as_fd().try_clone_to_owned().ok()?;
        TcpStream::from_std(std::net::TcpStream::from(fd))
            .ok()
            .map(FinWatch)
    }

    /// Returns once the client's FIN has arrived; never without a watch.
    async fn wait(fin: Option<&FinWatch>) {
        let Some(FinWatch(socket)) = fin else {
            return std::future::pending().await;
        };
        loop {
            match socket.ready(tokio::io::Interest::READABLE).await {
                Ok(ready) if ready.is_read_closed() => return,
                // Only request bytes, which are hyper's to read: wait for the next event.
                Ok(_) => {
                    // try_io clears the readiness when told the read would block.
                    let _ = socket.try_io(tokio::io::Interest::READABLE, || {
                        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                    });
                }
                Err(_) => return std::future::pending().await,
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
pub fn refuse(stream: &TcpStream, tls: bool, why: &str) {
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
/// requests; and since when; whether a request on it proved a credential.
pub struct Activity {
    start: Instant,
    phase: AtomicU8,
    /// Milliseconds from `start` to the phase's start.
    since_ms: AtomicU64,
    changed: Notify,
    /// Requests need a credential (`ServerOptions::guarded`).
    guarded: bool,
    proven: Proven,
    /// Cancelled when the connection's slot was given to a newcomer.
    evicted: CancellationToken,
    /// Cancelled when the client has sent its FIN (see `ClientGone`).
    client_gone: CancellationToken,
}

impl Activity {
    pub fn new(guarded: bool) -> Self {
        // A new connection waits for its first header.
        Activity {
            start: Instant::now(),
            phase: AtomicU8::new(HEADER),
            since_ms: AtomicU64::new(0),
            changed: Notify::new(),
            guarded,
            proven: Proven::default(),
            evicted: CancellationToken::new(),
            client_gone: CancellationToken::new(),
        }
    }

    /// May be closed for a newcomer: no request on it proved a credential, and none is
    /// being served.
    pub fn evictable(&self) -> bool {
        !self.proven.get() && self.phase.load(Ordering::Relaxed) != BUSY
    }

    /// When the current phase began (the earliest is the longest waiting).
    pub fn phase_since(&self) -> Instant {
        self.start + Duration::from_millis(self.since_ms.load(Ordering::Relaxed))
    }

    pub fn evict(&self) {
        self.evicted.cancel();
    }

    /// An idle connection that never proved a credential, where one is needed, is
    /// closed as soon as a silent new one would be: it serves no caller worth a slot.
    fn idle_limit(&self, opts: &ServerOptions) -> Duration {
        if self.guarded && !self.proven.get() {
            opts.idle_timeout.min(opts.header_read_timeout)
        } else {
            opts.idle_timeout
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
            IDLE => self.idle_limit(opts),
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
        req.extensions_mut().insert(self.activity.proven.clone());
        req.extensions_mut()
            .insert(ClientGone(self.activity.client_gone.clone()));
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
