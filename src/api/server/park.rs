//! A kept-alive connection between requests holds its socket and little else: hyper's
//! HTTP/1 state (an 8 KiB read buffer and an 8 KiB header buffer, which hyper never
//! shrinks) is dropped when an exchange ends cleanly and built again when the next
//! request's first bytes arrive. Measured with `task-executor bench`: an idle keep-alive
//! connection cost the agent ~15 KiB resident with hyper's state kept, ~2 KiB parked
//! (nothing of hyper's is kept: bytes it read ahead are copied out, see `conn::http`).
//!
//! Parking is safe only at a message boundary: a request that asked to keep the
//! connection (HTTP/1.1, no `Connection: close`), whose body was read to its end, and
//! whose answer does not close it. Anything else is left to hyper as before.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use warp::http::HeaderMap;
use warp::http::header::CONNECTION;

use super::activity::Activity;

/// A stream a connection can be parked on.
pub trait Park: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves once a read would find bytes, EOF or an error, without reading any.
    fn ready(&mut self) -> impl Future<Output = ()> + Send;
}

impl Park for TcpStream {
    async fn ready(&mut self) {
        let _ = self.peek(&mut [0u8; 1]).await;
    }
}

impl Park for TlsStream<TcpStream> {
    async fn ready(&mut self) {
        let (tcp, tls) = self.get_mut();
        // Records rustls has already taken off the socket may hold a request.
        let buffered = tls
            .process_new_packets()
            .map_or(true, |s| s.plaintext_bytes_to_read() > 0);
        if !buffered {
            let _ = tcp.peek(&mut [0u8; 1]).await;
        }
    }
}

/// Whether a `Connection` header has the `close` option.
pub fn says_close(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|o| o.trim().eq_ignore_ascii_case("close")))
    })
}

/// A stream with bytes already read from it (by a parked connection's hyper) in front.
pub struct Rewind<IO> {
    pub pre: Bytes,
    pub inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pre.has_remaining() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A request's body, telling the connection's activity once it has been read to its end
/// (an unread rest is drained by hyper, or the connection closed: no parking then).
pub struct ReqBody {
    inner: Incoming,
    activity: Arc<Activity>,
}

impl ReqBody {
    pub fn new(inner: Incoming, activity: Arc<Activity>) -> Self {
        ReqBody { inner, activity }
    }
}

impl http_body::Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.activity.body_read(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.activity.body_read(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
