//! Serving the API: accepts TCP connections (TLS where configured), caps how many are
//! open, times out slow and idle clients, and drains on shutdown.
//!
//! warp's own server has none of this (no TLS, no limits, no timeouts), so its filter is
//! served here as a service on hyper's HTTP/1 connections.

mod activity;
mod conn;
mod park;
mod slots;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::Filter;
use warp::reply::Response;

pub use conn::PeerAddr;

/// In each request's extensions: cancelled once the client has closed its sending side
/// (a FIN: a full close or a half-close, SHUT_WR, which TCP can't tell apart). A request
/// is still carried out and answered then; what only waits for the client (a log
/// follower, a `?wait=` long-poll) ends, so a client that went away holds nothing.
#[derive(Clone, Debug)]
pub struct ClientGone(pub CancellationToken);
pub use tls::TlsFiles;

/// How connections are served.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Connections open at once; more are refused as they arrive.
    pub max_connections: usize,
    /// Time to receive a request header, from the connection's opening or from the first
    /// byte of a request on a kept-alive connection (and the time for a TLS handshake).
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time in-flight requests get to finish once shutdown starts.
    pub shutdown_grace: Duration,
    /// Requests need a credential (`--auth-mode` other than `none`): a connection on
    /// which none was proven is closed after `header_read_timeout` idle, and gives way to
    /// a new connection at the limit (see `slots`).
    pub guarded: bool,
}

/// Serves `filter` on `listener` until `stop` is cancelled, then stops accepting, lets
/// in-flight requests finish (at most `shutdown_grace`) and returns.
pub async fn serve<F>(
    listener: TcpListener,
    filter: F,
    tls: Option<Arc<TlsFiles>>,
    opts: ServerOptions,
    stop: CancellationToken,
) where
    F: Filter<Extract = (Response,), Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + Unpin
        + 'static,
{
    // One copy of warp's service for all connections (see `conn::ConnService`).
    let service = Arc::new(warp::service(filter));
    let slots = slots::Slots::new(opts.max_connections, opts.guarded);
    // Shared by the connections.
    let opts = Arc::new(opts);
    let connections = TaskTracker::new();
    let saturated = AtomicBool::new(false);
    // A descriptor kept for the moment the agent runs out of them (the classic accept
    // trick): given up so that a waiting client can be accepted and told so, instead of
    // waiting unanswered in the backlog until descriptors are freed.
    let mut reserve = open_reserve();
    let mut starved = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) if out_of_descriptors(&e) && reserve.is_some() => {
                if !std::mem::replace(&mut starved, true) {
                    tracing::warn!(error = %e, "out of file descriptors: new connections are answered 503 until some are freed");
                }
                reserve = None;
                continue;
            }
            Err(e) => {
                accept_failed(&e).await;
                continue;
            }
        };
        if reserve.is_none() {
            reserve = open_reserve();
            if reserve.is_none() {
                // Still out of descriptors: this client is told, and its descriptor
                // becomes the reserve again.
                conn::refuse(
                    &stream,
                    tls.is_some(),
                    "the agent is out of file descriptors; try again later",
                );
                // Its descriptor, shut down, is the reserve now: one freed by closing it
                // could be taken at once by another connection's own (see `conn`), and
                // the listener would be left with no reserve while out of descriptors.
                reserve = stream.into_std().ok().map(|s| {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    std::os::fd::OwnedFd::from(s)
                });
                continue;
            }
        }
        if std::mem::replace(&mut starved, false) {
            tracing::info!("file descriptors are free again; accepting connections");
        }
        let (slot, activity) = match slots.admit() {
            slots::Admitted::Yes(slot, activity) => {
                if saturated.swap(false, Ordering::Relaxed) {
                    tracing::info!("below the connection limit again; accepting connections");
                }
                (slot, activity)
            }
            slots::Admitted::Evicting(slot, activity) => (slot, activity),
            slots::Admitted::No => {
                if !saturated.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        max = opts.max_connections,
                        "connection limit reached; refusing new connections"
                    );
                }
                conn::refuse(
                    &stream,
                    tls.is_some(),
                    "too many connections; try again later",
                );
                continue;
            }
        };
        // The TLS files are looked at per connection, so a renewed certificate is used
        // from the next connection on.
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let service = service.clone();
        let stop = stop.clone();
        // Here, one connection at a time, so that no connection takes a descriptor the
        // accept loop just freed for its reserve.
        let fin = conn::FinWatch::of(&stream);
        let accepted = conn::Accepted {
            stream,
            fin,
            peer,
            slot,
        };
        connections.spawn(conn::serve(
            accepted,
            service,
            acceptor,
            activity,
            opts.clone(),
            stop,
        ));
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(opts.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "connections still open after {:?}; closing them",
            opts.shutdown_grace
        );
    }
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The reserve descriptor (see `serve`); `None` when none can be had now.
fn open_reserve() -> Option<std::os::fd::OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(Into::into)
}

/// An `accept` that failed. Out of file descriptors (EMFILE/ENFILE) the pending
/// connection stays queued and accept would fail again at once: pause briefly instead of
/// spinning.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A stream's first byte without consuming it; `None` at EOF.
async fn peek_byte(stream: &TcpStream) -> std::io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    let n = stream.peek(&mut b).await?;
    Ok((n == 1).then_some(b[0]))
}
