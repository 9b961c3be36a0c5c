//! One connection: TLS (where configured), HTTP/1 by hyper, and a watchdog that closes it
//! when a client is too slow to send a request header or stays idle too long.
//!
//! The watchdog is ours, not hyper's `header_read_timeout`: hyper starts that timer
//! whenever a kept-alive connection goes idle, so it can't close a header that trickles
//! in after 10 s and still keep an idle connection for a minute, as a client pool
//! expects (Go's `IdleConnTimeout` is 90 s). hyper has one timer where Go and Envoy have
//! two (a header read timeout and an idle timeout): a server idle timeout is still an
//! open request (hyperium/hyper#1628, hyperium/hyper#2355); the header read timer's start
//! was moved to the connection's opening (hyperium/hyper#3185, whose discussion names the
//! missing idle timeout) and its restart between requests is still open
//! (hyperium/hyper#3828). Idle connections are parked outside hyper (`park`) for the same
//! reason, and because a graceful shutdown used to wait for a connection's first request
//! (hyperium/hyper#2730). The phases are set from three places of the same task: a read
//! (first byte of a request), the service call (request received), and the drop of the
//! response body (response written).
//!
//! What hyper answers itself, to a request head it can't parse (400, 414, 431), never
//! reaches the service: it is logged and counted here from hyper's error
//! (`access_log::answered_unread`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use warp::http::{Request, Response, Version};

use super::activity::{Activity, Watched};
use super::park::{Park, ReqBody, Rewind, says_close};
use super::slots::Slot;
use super::{ClientGone, ServerOptions};

/// The client's address, in each request's extensions (warp's `addr::remote()` only
/// works on warp's own server).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// What serving a connection needs of warp's service.
pub trait WarpService:
    tower_service::Service<
        Request<ReqBody>,
        Response = warp::reply::Response,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + Unpin
    + 'static
{
}

impl<S> WarpService for S where
    S: tower_service::Service<
            Request<ReqBody>,
            Response = warp::reply::Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + Unpin
        + 'static
{
}

/// Serves one accepted connection until it ends, times out, is evicted for a newcomer
/// (see `slots`), or shutdown drains it; its slot is given back then.
///
/// Not an `async fn`: the connection's task is `http`'s future itself, without another
/// layer holding a second copy of its arguments.
pub fn serve<S: WarpService>(
    Accepted {
        stream,
        fin,
        peer,
        slot,
    }: Accepted,
    service: Arc<S>,
    tls: Option<TlsAcceptor>,
    activity: Arc<Activity>,
    opts: Arc<ServerOptions>,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = tls else {
        let held = Held { fin, _slot: slot };
        return Either::Left(http(stream, peer, service, activity, held, opts, stop));
    };
    let evicted = activity.evicted.clone();
    // Boxed: a TLS stream is large, and inline it would size every connection's task.
    Either::Right(Box::pin(async move {
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
            Ok(Ok(tls)) => {
                let held = Held { fin, _slot: slot };
                http(tls, peer, service, activity, held, opts, stop).await
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }))
}

/// The connection's HTTP/1: hyper while a request is on its way or served, and between
/// requests only the stream (parked, see `park`), watched by the timeouts either way.
async fn http<IO: Park, S: WarpService>(
    io: IO,
    peer: SocketAddr,
    service: Arc<S>,
    activity: Arc<Activity>,
    held: Held,
    opts: Arc<ServerOptions>,
    stop: CancellationToken,
) {
    let mut io = io;
    // Bytes a parked hyper had read past the last request (pipelined ones).
    let mut pre = Bytes::new();
    loop {
        if pre.is_empty() {
            loop {
                let deadline = activity.deadline(&opts);
                tokio::select! {
                    () = io.ready() => break,
                    // Between requests: closed now (a request that arrives is first seen
                    // by `io.ready`).
                    () = activity.evicted.cancelled() => {
                        tracing::debug!(%peer, "closing a connection that never authenticated: its slot is needed");
                        return;
                    }
                    () = sleep_until(deadline) => {
                        if let Some(why) = activity.expired(&opts) {
                            tracing::debug!(%peer, why, "closing connection");
                            return;
                        }
                    }
                    () = stop.cancelled() => return,
                }
            }
        }
        let watched = Watched {
            inner: Rewind { pre, inner: io },
            activity: activity.clone(),
        };
        // Boxed: it exists only while a request is on its way, and the task that parks
        // stays small.
        // A client that half-closes (or closes) right after a complete request still has
        // it carried out and answered: hyper does not drop it at the read side's EOF.
        let conn = Box::new(
            hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .half_close(true)
                .serve_connection(
                    TokioIo::new(watched),
                    ConnService {
                        inner: service.clone(),
                        activity: activity.clone(),
                        peer,
                    },
                ),
        );
        // Boxed too: its state (the watchdog's timer and waits) exists only during an
        // exchange, and inline it would size every parked connection's task.
        let exchange = Box::pin(exchange(
            conn,
            peer,
            &activity,
            held.fin.as_ref(),
            &opts,
            &stop,
        ));
        let Some(parts) = exchange.await else {
            return;
        };
        let rewind = parts.io.into_inner().inner;
        io = rewind.inner;
        // Copied, or nothing: a parked connection keeps none of hyper's read buffer
        // (8 KiB), which even an empty `Bytes` frozen from it owns.
        pre = if parts.read_buf.is_empty() && rewind.pre.is_empty() {
            Bytes::new()
        } else {
            let mut both = BytesMut::with_capacity(parts.read_buf.len() + rewind.pre.len());
            both.extend_from_slice(&parts.read_buf);
            both.extend_from_slice(&rewind.pre);
            both.freeze()
        };
    }
}

type Conn<IO, S> =
    hyper::server::conn::http1::Connection<TokioIo<Watched<Rewind<IO>>>, ConnService<S>>;
type Parts<IO, S> = hyper::server::conn::http1::Parts<TokioIo<Watched<Rewind<IO>>>, ConnService<S>>;

/// What a connection holds for its life besides its stream.
struct Held {
    fin: Option<FinWatch>,
    _slot: Slot,
}

/// Runs hyper on the connection until it ends (`None`: closed) or, after a clean
/// exchange, is idle (`Some`: its stream and any bytes it read ahead, to park).
async fn exchange<IO: Park, S: WarpService>(
    mut conn: Box<Conn<IO, S>>,
    peer: SocketAddr,
    activity: &Activity,
    fin: Option<&FinWatch>,
    opts: &ServerOptions,
    stop: &CancellationToken,
) -> Option<Parts<IO, S>> {
    let mut parking = false;
    let mut draining = false;
    // The request hyper may answer itself began to arrive about now (see `io.ready`).
    let since = std::time::Instant::now();
    loop {
        let deadline = activity.deadline(opts);
        tokio::select! {
            // Once seen, the FIN stays: the token says it for the connection's life.
            () = FinWatch::wait(fin), if !activity.client_gone.is_cancelled() => {
                activity.client_gone.cancel();
            }
            () = activity.evicted.cancelled(), if !draining => {
                // Chosen while idle but a request came in since: it is answered first.
                if !activity.busy() {
                    tracing::debug!(%peer, "closing a connection that never authenticated: its slot is needed");
                    return None;
                }
                Pin::new(&mut *conn).graceful_shutdown();
                draining = true;
            }
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                if let Err(e) = result {
                    if let Some(status) = hyper_status(&e) {
                        crate::api::access_log::answered_unread(status, since);
                    }
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                    return None;
                }
                let parts = (*conn).into_parts();
                if parking && !draining {
                    return Some(parts);
                }
                // hyper closed it (the client asked, or shutdown): shut it down as hyper
                // would have.
                let mut io = parts.io.into_inner();
                let _ = tokio::time::timeout(opts.header_read_timeout, io.shutdown()).await;
                return None;
            }
            () = activity.changed.notified() => {
                if !parking && activity.parkable() {
                    // Idle now: hyper ends the connection without shutting the stream.
                    Pin::new(&mut *conn).graceful_shutdown();
                    parking = true;
                }
            }
            () = sleep_until(deadline) => {
                if let Some(why) = activity.expired(opts) {
                    tracing::debug!(%peer, why, "closing connection");
                    return None;
                }
            }
            () = stop.cancelled(), if !draining => {
                // Idle connections close now; a request in flight finishes first.
                Pin::new(&mut *conn).graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// The status hyper answered a request head it could not parse with (its `on_error`):
/// 431 for a head past its buffer, 414 for a URI past its limit (both `is_parse_too_large`;
/// hyper tells them apart only by its message), 400 for the rest but an HTTP/2 preface,
/// which it closes unanswered.
fn hyper_status(e: &hyper::Error) -> Option<u16> {
    if e.is_parse_too_large() {
        Some(if e.to_string().contains("URI") {
            414
        } else {
            431
        })
    } else if e.is_parse() && !e.is_parse_version_h2() {
        Some(400)
    } else {
        None
    }
}

/// A connection the accept loop took, with its FIN watch (see `FinWatch::of`) and its
/// slot.
pub struct Accepted {
    pub stream: TcpStream,
    pub fin: Option<FinWatch>,
    pub peer: SocketAddr,
    pub slot: Slot,
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
        crate::api::access_log::answered_unread(503, std::time::Instant::now());
    }
}

/// Answers plain HTTP on the TLS port, then closes.
async fn plain_http_on_tls_port(mut stream: TcpStream, peer: SocketAddr) {
    tracing::debug!(%peer, "plain HTTP on the TLS port");
    crate::api::access_log::answered_unread(400, std::time::Instant::now());
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

/// warp's service for one connection: marks the connection busy while a request is
/// served, notes whether the exchange can leave the connection parked, tags each
/// request with the client's address, and logs and counts each answer (`access_log`).
/// Made per exchange, around one copy of warp's service for all connections (cloned per
/// request as before): a parked connection holds only a pointer to that copy.
#[derive(Clone)]
struct ConnService<S> {
    inner: Arc<S>,
    activity: Arc<Activity>,
    peer: SocketAddr,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower_service::Service<
            Request<ReqBody>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static,
    B: http_body::Body + Send,
{
    type Response = Response<Tracked<B>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let keep = req.version() == Version::HTTP_11 && !says_close(req.headers());
        self.activity
            .request(keep, http_body::Body::is_end_stream(req.body()));
        let entry = crate::api::access_log::Entry::start(req.method(), req.uri().path());
        let mut req = req.map(|body| ReqBody::new(body, self.activity.clone()));
        req.extensions_mut().insert(PeerAddr(self.peer));
        req.extensions_mut().insert(self.activity.proven.clone());
        req.extensions_mut()
            .insert(ClientGone(self.activity.client_gone.clone()));
        let mut inner = S::clone(&self.inner);
        let activity = self.activity.clone();
        Box::pin(async move {
            let resp = tower_service::Service::call(&mut inner, req).await?;
            entry.finish(&resp);
            if says_close(resp.headers()) {
                activity.closing();
            }
            Ok(resp.map(|body| Tracked {
                body,
                _done: IdleOnDrop(activity),
            }))
        })
    }
}

/// A response body that marks the connection idle once hyper is done with it (written
/// in full, or dropped for a HEAD request or a closed connection). Generic over warp's
/// body, whose type warp 0.4 does not export by name (`reply::Response` is an
/// `http::Response` of a type in a private module).
pub struct Tracked<B> {
    body: B,
    _done: IdleOnDrop,
}

struct IdleOnDrop(Arc<Activity>);

impl Drop for IdleOnDrop {
    fn drop(&mut self) {
        self.0.answered();
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
