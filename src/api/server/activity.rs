//! Where one connection is (receiving a header, serving a request, idle between
//! requests) and since when, for the watchdog of `conn`; and whether the last exchange
//! ended at a clean message boundary, for parking (see `park`); whether a request on it
//! proved a credential, for the connection limit (see `slots`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ServerOptions;
use crate::api::auth::Proven;

const HEADER: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;

pub struct Activity {
    start: Instant,
    phase: AtomicU8,
    /// Milliseconds from `start` to the phase's start.
    since_ms: AtomicU64,
    pub changed: Notify,
    /// The request being (or last) served asked to keep the connection and its answer
    /// did not close it.
    keep: AtomicBool,
    /// That request's body has been read to its end.
    body_read: AtomicBool,
    /// Requests need a credential (`ServerOptions::guarded`).
    guarded: bool,
    pub proven: Proven,
    /// Cancelled when the connection's slot was given to a newcomer.
    pub evicted: CancellationToken,
    /// Cancelled when the client has sent its FIN (see `ClientGone`).
    pub client_gone: CancellationToken,
}

impl Activity {
    pub fn new(guarded: bool) -> Self {
        // A new connection waits for its first header.
        Activity {
            start: Instant::now(),
            phase: AtomicU8::new(HEADER),
            since_ms: AtomicU64::new(0),
            changed: Notify::new(),
            keep: AtomicBool::new(false),
            body_read: AtomicBool::new(false),
            guarded,
            proven: Proven::default(),
            evicted: CancellationToken::new(),
            client_gone: CancellationToken::new(),
        }
    }

    /// May be closed for a newcomer: no request on it proved a credential, and none is
    /// being served.
    pub fn evictable(&self) -> bool {
        !self.proven.get() && !self.busy()
    }

    /// A request is being served on it.
    pub fn busy(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == BUSY
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

    /// A request was received: it is served now.
    pub fn request(&self, keep: bool, body_read: bool) {
        self.keep.store(keep, Ordering::Relaxed);
        self.body_read.store(body_read, Ordering::Relaxed);
        self.set(BUSY);
    }

    /// The request's body has been read to its end.
    pub fn body_read(&self) {
        self.body_read.store(true, Ordering::Relaxed);
    }

    /// The answer closes the connection.
    pub fn closing(&self) {
        self.keep.store(false, Ordering::Relaxed);
    }

    /// The answer has been handed to hyper in full (or dropped).
    pub fn answered(&self) {
        self.set(IDLE);
    }

    /// Between requests, after an exchange that left the stream at a message boundary.
    pub fn parkable(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == IDLE
            && self.keep.load(Ordering::Relaxed)
            && self.body_read.load(Ordering::Relaxed)
    }

    /// Bytes arrived: on an idle connection, a request header has begun.
    fn read(&self) {
        if self.phase.load(Ordering::Relaxed) == IDLE {
            self.set(HEADER);
        }
    }

    pub fn deadline(&self, opts: &ServerOptions) -> Option<Instant> {
        let limit = match self.phase.load(Ordering::Relaxed) {
            HEADER => opts.header_read_timeout,
            IDLE => self.idle_limit(opts),
            _ => return None,
        };
        let since = Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        Some(self.start + since + limit)
    }

    pub fn expired(&self, opts: &ServerOptions) -> Option<&'static str> {
        let passed = self.deadline(opts).is_some_and(|d| d <= Instant::now());
        match self.phase.load(Ordering::Relaxed) {
            HEADER if passed => Some("request header not received in time"),
            IDLE if passed => Some("idle keep-alive connection"),
            _ => None,
        }
    }
}

/// The connection's stream, noting when request bytes arrive.
pub struct Watched<IO> {
    pub inner: IO,
    pub activity: Arc<Activity>,
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
