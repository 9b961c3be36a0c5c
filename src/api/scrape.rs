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
    let body = crate::metrics::render(&state.manager.census(), usage(state), openmetrics);
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

/// What each task held used: running ones read from their cgroups now, ended ones as
/// their status says.
fn usage(state: &AppState) -> Vec<crate::metrics::TaskUsage> {
    let mut out: Vec<crate::metrics::TaskUsage> = crate::runtime::limits::live_usage()
        .into_iter()
        .map(|(task, u, now)| crate::metrics::TaskUsage {
            task,
            cpu_seconds: u.cpu_seconds,
            memory_peak_bytes: u.memory_peak_bytes,
            memory_bytes: now,
            oom_kills: u.oom_kills,
        })
        .collect();
    let live: std::collections::HashSet<String> = out.iter().map(|o| o.task.clone()).collect();
    let ended = state.manager.usage_census();
    out.reserve(ended.len());
    for (task, u) in ended {
        if !live.contains(&task) {
            out.push(crate::metrics::TaskUsage {
                task,
                cpu_seconds: u.cpu_seconds,
                memory_peak_bytes: u.memory_peak_bytes,
                memory_bytes: None,
                oom_kills: u.oom_kills,
            });
        }
    }
    out
}
