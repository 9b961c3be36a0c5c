//! `GET /metrics`: Prometheus text (or OpenMetrics, when the scraper asks for it).
//!
//! The per-task families are written a piece at a time as the answer streams, as
//! `GET /getTasks` is: with 10,000 tasks the answer is over a megabyte, never held whole.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use warp::http::{HeaderMap, HeaderValue, header};
use warp::reply::Response;

use super::handlers::AppState;
use crate::manager::UsageListing;
use crate::metrics::{TASK_FAMILIES, TaskUsage};
use crate::task::model::ResourceUsage;

/// What one piece of a streamed answer holds at least (the last holds the rest): below
/// glibc's mmap threshold, so no piece raises it (see `metrics::TaskFamily`).
const CHUNK: usize = 64 * 1024;

pub fn metrics(state: &AppState, headers: &HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let head = crate::metrics::render(&state.manager.census(), openmetrics);
    let mut pieces = Pieces {
        head: Some(head),
        tasks: state.manager.usage_listing(),
        live: live_usage(),
        family: 0,
        at: 0,
        headed: false,
        openmetrics,
        done: false,
    };
    let ct = HeaderValue::from_static(if openmetrics {
        crate::metrics::OPENMETRICS_CONTENT_TYPE
    } else {
        crate::metrics::TEXT_CONTENT_TYPE
    });
    let first = pieces.next().unwrap_or_default();
    let mut resp = if pieces.done {
        Response::new(first.into())
    } else {
        let stream = futures::stream::iter(
            std::iter::once(first)
                .chain(pieces)
                .map(Ok::<_, std::convert::Infallible>),
        );
        warp::reply::Reply::into_response(warp::reply::stream(stream))
    };
    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    resp
}

/// What each running task with cgroups uses now, by name: it has no recorded usage yet.
fn live_usage() -> HashMap<String, TaskUsage> {
    crate::runtime::limits::live_usage()
        .into_iter()
        .map(|(task, u, now)| (task, task_usage(&u, now)))
        .collect()
}

fn task_usage(u: &ResourceUsage, memory_now: Option<u64>) -> TaskUsage {
    TaskUsage {
        cpu_seconds: u.cpu_seconds,
        memory_peak_bytes: u.memory_peak_bytes,
        memory_bytes: memory_now,
        oom_kills: u.oom_kills,
    }
}

/// The exposition: the registry's metrics, then each per-task family over every task
/// (its descriptor before its first sample), then the end.
struct Pieces {
    head: Option<String>,
    tasks: UsageListing,
    live: HashMap<String, TaskUsage>,
    /// The family being written, and the next task of it.
    family: usize,
    at: usize,
    headed: bool,
    openmetrics: bool,
    done: bool,
}

/// The `i`th task's usage: live if it runs, else as recorded at its end.
fn usage<'a>(
    tasks: &'a UsageListing,
    live: &HashMap<String, TaskUsage>,
    i: usize,
) -> Option<(&'a str, TaskUsage)> {
    let (name, recorded) = tasks.get(i)?;
    if let Some(u) = live.get(name) {
        return Some((name, *u));
    }
    Some((name, task_usage(&recorded?, None)))
}

impl Iterator for Pieces {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut piece = BytesMut::with_capacity(CHUNK + 1024);
        if let Some(head) = self.head.take() {
            piece.extend_from_slice(head.as_bytes());
        }
        while piece.len() < CHUNK {
            let Some(family) = TASK_FAMILIES.get(self.family) else {
                piece.extend_from_slice(crate::metrics::end(self.openmetrics).as_bytes());
                self.done = true;
                break;
            };
            if self.at == self.tasks.len() {
                (self.family, self.at, self.headed) = (self.family + 1, 0, false);
                continue;
            }
            let sample = usage(&self.tasks, &self.live, self.at).filter(|(_, u)| family.has(u));
            self.at += 1;
            if let Some((task, u)) = sample {
                if !self.headed {
                    family.write_head(&mut piece, self.openmetrics);
                    self.headed = true;
                }
                family.write_sample(&mut piece, task, &u);
            }
        }
        Some(piece.freeze())
    }
}
