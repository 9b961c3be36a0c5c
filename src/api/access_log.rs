//! The access log and the HTTP metrics: one structured line per answer at debug level
//! (method, route template, status, duration, bytes, and the user where the Kubernetes
//! API named one) and the request counter and latency histogram, both labelled by route
//! template. Neither ever holds a path parameter, a query value or a token (a query may
//! carry secrets; a template also keeps label values few).
//!
//! Every answer passes here: the connection's service (`server::conn`) starts an
//! [`Entry`] for each request it hands to the router and finishes it with the answer,
//! so refusals (401, 403, 503 from `auth::caller`), 404, 405, 408, 413 and malformed
//! headers (400) are logged and counted like any answer; what hyper answers itself, to
//! a request head it can't parse (400, 414, 431), the connection reports from hyper's
//! error ([`answered_unread`]). (A warp filter around the router did the same, but
//! measured about 0.1 ms slower per `GET /getTasks` in a debug build.)
//!
//! A streamed answer (a log stream) is logged when its body ends, with its real size and
//! duration: the handler puts a [`StreamMeter`] in the response's extensions and counts
//! what it sends; the line is written when the last handle to it is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body::Body;
use warp::http::{Method, Response};

use super::auth::Caller;
use super::route::Route;

/// An answer written without a request read, `since` the request began to arrive (or
/// the connection was accepted): hyper's own to a head it could not parse, or the
/// server's to a connection it refuses (the connection limit, no descriptors left) or
/// that speaks plain HTTP to the TLS port. Neither method nor route is known.
pub fn answered_unread(status: u16, since: Instant) {
    let entry = Entry {
        method: "unknown",
        route: Route::Unmatched(String::new()).template(),
        start: since,
        user: None,
    };
    entry.count(status);
    entry.log(status, 0);
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// One request, from its arrival.
pub struct Entry {
    method: &'static str,
    route: &'static str,
    start: Instant,
    /// The caller's user name, where the Kubernetes API named one (never a token).
    user: Option<String>,
}

impl Entry {
    /// A request for `path` (without its query) arrived.
    pub fn start(method: &Method, path: &str) -> Entry {
        Entry {
            method: method_label(method),
            route: Route::parse(path).template(),
            start: Instant::now(),
            user: None,
        }
    }

    /// Records the answer: metrics now, the log line now or when a streamed body ends.
    pub fn finish<B: Body>(mut self, resp: &Response<B>) {
        let status = resp.status().as_u16();
        self.count(status);
        if let Some(Caller::User(name)) = resp.extensions().get::<Caller>() {
            self.user = Some(name.clone());
        }
        match resp.extensions().get::<StreamMeter>() {
            Some(meter) => meter.done(self, status),
            None => self.log(status, resp.body().size_hint().exact().unwrap_or(0)),
        }
    }

    fn count(&self, status: u16) {
        crate::metrics::http_request(self.method, self.route, status, self.start.elapsed());
    }

    fn log(&self, status: u16, bytes: u64) {
        tracing::debug!(
            method = self.method,
            route = self.route,
            status,
            duration_ms = self.start.elapsed().as_secs_f64() * 1e3,
            bytes,
            user = self.user.as_deref(),
            "request"
        );
    }
}

/// Counts a streamed body's bytes; logs the request once every handle is dropped.
#[derive(Clone, Default)]
pub struct StreamMeter(Arc<Meter>);

#[derive(Default)]
struct Meter {
    bytes: AtomicU64,
    request: Mutex<Option<(Entry, u16)>>,
}

impl StreamMeter {
    pub fn add(&self, n: u64) {
        self.0.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn done(&self, entry: Entry, status: u16) {
        *self.0.request.lock().unwrap_or_else(|e| e.into_inner()) = Some((entry, status));
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let req = self.request.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some((entry, status)) = req.take() {
            entry.log(status, *self.bytes.get_mut());
        }
    }
}
