//! `GET /metrics`: Prometheus text (or OpenMetrics, when the scraper asks for it).

use warp::http::{HeaderMap, HeaderValue, header};
use warp::reply::Response;

use super::handlers::AppState;

pub fn metrics(state: &AppState, headers: &HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = crate::metrics::render(&state.manager.census(), openmetrics);
    let mut resp = Response::new(body.into());
    let ct = if openmetrics {
        crate::metrics::OPENMETRICS_CONTENT_TYPE
    } else {
        crate::metrics::TEXT_CONTENT_TYPE
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    resp
}
