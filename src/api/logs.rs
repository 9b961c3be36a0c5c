//! `GET /tasks/{name}/logs`: a task's output as plain text, with kubelet's parameters
//! (`stream`, `follow`, `tailLines`, `limitBytes`, `sinceSeconds`/`sinceTime`,
//! `timestamps`), for every kind of task (see `runtime::tasklog` for the formats).
//!
//! The answer is streamed from a task of its own that reads the files in blocking batches.
//! A follower waits on two things only, neither of which polls: the task directory's file
//! changes (`watch`) and the manager's change broadcast, which says when the task has
//! terminated or is gone; then what is left is drained and the answer ends. A client that
//! goes away closes the channel the body is read from, which ends the task and releases
//! its files and watch.

mod query;
mod watch;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::{Reply, Response};

pub use query::{LogQuery, StreamParam};

use super::access_log::StreamMeter;
use super::error::ApiError;
use super::handlers::AppState;
use crate::runtime::tasklog::{LogSet, Piece, Reader, index::now_ns};
use crate::task::model::HookName;

/// Bytes per chunk of the answer (and per blocking read batch).
const BATCH: usize = 64 * 1024;

/// `client_gone`: cancelled once the client has closed its side; a follower ends then.
pub async fn logs(
    state: &Arc<AppState>,
    name: &str,
    query: &str,
    client_gone: tokio_util::sync::CancellationToken,
) -> Result<Response, ApiError> {
    let q = LogQuery::parse(query).map_err(ApiError::bad_request)?;
    let follow = q.follow.unwrap_or(false);
    // Subscribe before looking, so that an end between the two is not missed.
    let changes = follow.then(|| state.manager.subscribe());
    let view = state.manager.get(name)?;
    let ended = has_ended(&view, q.hook);
    let dir = state.manager.store().dir(name);
    let set = match q.hook {
        None => LogSet::of_task(&dir, view.spec.is_container_task()),
        Some(_) if view.spec.is_container_task() => {
            return Err(ApiError::bad_request(format!(
                "hook: task {name} is a container task; lifecycle hooks belong to process tasks"
            )));
        }
        Some(h) => LogSet::of_hook(&dir, h),
    };
    let watch = match follow && !ended {
        true => Some(watch::DirWatch::new(&dir).map_err(|e| match e.kind() {
            // Deleted since it was looked up.
            std::io::ErrorKind::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, format!("task {name} not found"))
            }
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot watch the task's output: {e}"),
            ),
        })?),
        false => None,
    };
    let streams = q.streams();
    let reader = crate::sys::offload::offload(move || set.open(streams))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the task's output: {e}"),
            )
        })?;
    let mut select = Select::new(reader, &q);
    // Output written after a task ended (by daemons it left) is not waited for.
    let flush = !follow || ended;
    select = crate::sys::offload::offload(move || {
        select.skip_to_tail(flush);
        select
    })
    .await;

    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(4);
    let meter = StreamMeter::default();
    let follower = Follower {
        state: state.clone(),
        name: name.to_string(),
        hook: q.hook,
        select,
        tx,
        meter: meter.clone(),
        client_gone,
    };
    tokio::spawn(follower.run(flush, changes.zip(watch)));
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let mut resp = warp::reply::stream(body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.extensions_mut().insert(meter);
    Ok(resp)
}

/// The output asked for is complete: the task has terminated (or, for a hook's output,
/// that hook has ended).
fn has_ended(view: &crate::manager::TaskView, hook: Option<HookName>) -> bool {
    view.state.is_terminated()
        || hook.is_some_and(|h| {
            view.hooks
                .as_ref()
                .and_then(|s| s.get(h))
                .is_some_and(|s| s.is_terminated())
        })
}

struct Follower {
    state: Arc<AppState>,
    name: String,
    hook: Option<HookName>,
    select: Select,
    tx: mpsc::Sender<Result<Bytes, std::convert::Infallible>>,
    meter: StreamMeter,
    client_gone: tokio_util::sync::CancellationToken,
}

type Waiters = (tokio::sync::broadcast::Receiver<String>, watch::DirWatch);

impl Follower {
    async fn run(mut self, flush: bool, waiters: Option<Waiters>) {
        let started = Instant::now();
        if !self.drain(flush).await {
            return;
        }
        let Some((mut changes, mut dir)) = waiters.filter(|_| !flush) else {
            return;
        };
        loop {
            tokio::select! {
                () = self.tx.closed() => return, // the connection is gone
                // The client closed its side: a half-close can't be told from a close
                // until a write fails, and a quiet task may never write again.
                () = self.client_gone.cancelled() => return,
                () = dir.changed() => {}
                change = changes.recv() => match change {
                    Ok(n) if n != self.name => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {}
                },
            }
            let ended = self
                .state
                .manager
                .get(&self.name)
                .map_or(true, |v| has_ended(&v, self.hook));
            if !self.drain(ended).await || ended {
                tracing::debug!(task = %self.name, secs = started.elapsed().as_secs_f64(), "log follower done");
                return;
            }
        }
    }

    /// Sends what is there; false when the answer is complete or the client is gone.
    async fn drain(&mut self, flush: bool) -> bool {
        loop {
            let mut select = std::mem::replace(&mut self.select, Select::empty());
            let (select, chunk) = crate::sys::offload::offload(move || {
                let chunk = select.batch(flush);
                (select, chunk)
            })
            .await;
            self.select = select;
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(task = %self.name, error = %e, "reading the task's output failed");
                    return false;
                }
            };
            if !chunk.is_empty() {
                self.meter.add(chunk.len() as u64);
                if self.tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                    return false;
                }
            }
            if self.select.limit_reached() {
                return false;
            }
            if !self.select.more {
                return true;
            }
        }
    }
}

/// The parameters applied to a reader's pieces: since, tail, limit, timestamps.
struct Select {
    reader: Option<Reader>,
    since_ns: Option<i64>,
    tail: Option<u64>,
    /// Pieces to pass over before output starts (the part before the tail).
    skip: u64,
    limit: Option<u64>,
    sent: u64,
    timestamps: bool,
    /// The last batch was cut short by its size: more is ready.
    more: bool,
}

impl Select {
    fn new(reader: Reader, q: &LogQuery) -> Select {
        Select {
            reader: Some(reader),
            since_ns: q.since_ns(now_ns()),
            tail: q.tail_lines,
            skip: 0,
            limit: q.limit_bytes.map(|n| n.get()),
            sent: 0,
            timestamps: q.timestamps.unwrap_or(false),
            more: false,
        }
    }

    fn empty() -> Select {
        Select {
            reader: None,
            since_ns: None,
            tail: None,
            skip: 0,
            limit: None,
            sent: 0,
            timestamps: false,
            more: false,
        }
    }

    fn wanted(&self, p: &Piece) -> bool {
        self.since_ns.is_none_or(|s| p.time_ns >= s)
    }

    /// For `tailLines`: counts what is there now on a copy of the reader, and skips all
    /// but the last N.
    fn skip_to_tail(&mut self, flush: bool) {
        let (Some(n), Some(reader)) = (self.tail, self.reader.as_ref()) else {
            return;
        };
        let mut look = reader.clone();
        let mut count = 0u64;
        while let Ok(Some(p)) = look.next_piece(flush) {
            if self.wanted(&p) {
                count += 1;
            }
        }
        self.skip = count.saturating_sub(n);
    }

    fn limit_reached(&self) -> bool {
        self.limit.is_some_and(|l| self.sent >= l)
    }

    /// The next part of the answer, up to about `BATCH` bytes; reads what is new first.
    fn batch(&mut self, flush: bool) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let Some(reader) = self.reader.as_mut() else {
            return Ok(out);
        };
        if !self.more {
            reader.refresh()?;
        }
        self.more = false;
        while self
            .limit
            .is_none_or(|l| self.sent + (out.len() as u64) < l)
        {
            if out.len() >= BATCH {
                self.more = true;
                break;
            }
            let Some(p) = reader.next_piece(flush)? else {
                break;
            };
            if self.since_ns.is_some_and(|s| p.time_ns < s) {
                continue;
            }
            if self.skip > 0 {
                self.skip -= 1;
                continue;
            }
            if self.timestamps {
                out.extend_from_slice(format_time(p.time_ns).as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(&p.bytes);
        }
        if let Some(l) = self.limit {
            out.truncate(l.saturating_sub(self.sent) as usize);
        }
        self.sent += out.len() as u64;
        Ok(out)
    }
}

/// RFC 3339 with the fraction as needed (up to nanoseconds), as kubelet prints it.
fn format_time(ns: i64) -> String {
    jiff::Timestamp::from_nanosecond(i128::from(ns))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_nanoseconds_as_needed() {
        assert_eq!(
            format_time(1_767_225_600_000_000_000),
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(
            format_time(1_767_225_600_123_456_789),
            "2026-01-01T00:00:00.123456789Z"
        );
    }
}
