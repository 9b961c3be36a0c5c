//! Serving the API: accepts TCP connections (TLS where configured), caps how many are
//! open, times out slow and idle clients, and drains on shutdown.
//!
//! warp's own server has none of this (no TLS, no limits, no timeouts), so its filter is
//! served here as a service on hyper's HTTP/1 connections.

mod activity;
mod conn;
mod park;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::Filter;
use warp::reply::Response;

pub use conn::PeerAddr;
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
    let service = warp::service(filter);
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let connections = TaskTracker::new();
    let saturated = AtomicBool::new(false);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                accept_failed(&e).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !saturated.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = opts.max_connections,
                    "connection limit reached; refusing new connections"
                );
            }
            conn::refuse(stream, tls.is_some());
            continue;
        };
        if saturated.swap(false, Ordering::Relaxed) {
            tracing::info!("below the connection limit again; accepting connections");
        }
        // The TLS files are looked at per connection, so a renewed certificate is used
        // from the next connection on.
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let service = service.clone();
        let opts = opts.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            conn::serve(stream, peer, service, acceptor, &opts, stop).await;
            drop(slot);
        });
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
