//! The access log and the HTTP metrics: one structured line per request at debug level
//! (method, route template, status, duration, bytes) and the request counter and latency
//! histogram, both labelled by route template. Neither ever holds a path parameter or a
//! query value (a query may carry secrets; a template also keeps label values few).
//!
//! A streamed answer (a log stream) is logged when its body ends, with its real size and
//! duration: the handler puts a [`StreamMeter`] in the response's extensions and counts
//! what it sends; the line is written when the last handle to it is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use warp::http::Method;
use warp::hyper::body::Body as _;
use warp::reply::Response;

use super::route::Route;

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
pub struct Access {
    method: &'static str,
    route: &'static str,
    start: Instant,
}

impl Access {
    pub fn start(method: &Method, route: &Route) -> Access {
        Access {
            method: method_label(method),
            route: route.template(),
            start: Instant::now(),
        }
    }

    /// Records the answer: metrics now, the log line now or when a streamed body ends.
    pub fn finish(self, resp: &Response) {
        let status = resp.status().as_u16();
        crate::metrics::http_request(self.method, self.route, status, self.start.elapsed());
        match resp.extensions().get::<StreamMeter>() {
            Some(meter) => meter.done(self, status),
            None => self.log(status, resp.body().size_hint().exact().unwrap_or(0)),
        }
    }

    fn log(&self, status: u16, bytes: u64) {
        tracing::debug!(
            method = self.method,
            route = self.route,
            status,
            duration_ms = self.start.elapsed().as_secs_f64() * 1e3,
            bytes,
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
    request: Mutex<Option<(Access, u16)>>,
}

impl StreamMeter {
    pub fn add(&self, n: u64) {
        self.0.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn done(&self, access: Access, status: u16) {
        *self.0.request.lock().unwrap_or_else(|e| e.into_inner()) = Some((access, status));
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let req = self.request.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some((access, status)) = req.take() {
            access.log(status, *self.bytes.get_mut());
        }
    }
}
