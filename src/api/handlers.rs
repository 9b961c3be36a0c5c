//! Handlers: decode, call the manager, encode. No business rules live here.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::error::ApiError;
use super::unknown_fields::{self, WriteQuery};
use super::wire::{self, Health, TaskRequest, TaskResponse};
use crate::task::fields::{self, Decoded};
use tokio::sync::broadcast::error::RecvError;

use crate::manager::Manager;
use crate::runtime::Readiness;

pub struct AppState {
    pub manager: Arc<Manager>,
    /// Who may call which route (`--auth-mode`).
    pub auth: super::auth::Authenticator,
    pub max_body: usize,
    pub body_timeout: std::time::Duration,
    /// Answers show env values (`--show-task-env`); otherwise names only.
    pub show_task_env: bool,
}

impl AppState {
    /// How a task's answer is made (fixed for the agent's life, so a task's cached answer
    /// is always of this kind).
    fn render(&self) -> crate::manager::Render {
        if self.show_task_env {
            wire::render_task
        } else {
            wire::render_task_without_env_values
        }
    }

    fn response(&self, view: crate::manager::TaskView) -> TaskResponse {
        TaskResponse::of(view, self.show_task_env)
    }
}

/// A JSON body with a trailing newline, like Go's `json.Encoder`.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let mut body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Decodes a body, collecting its unknown fields (`?fieldValidation=`, see
/// `unknown_fields`).
fn decode<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<Decoded<T>, ApiError> {
    fields::decode(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub fn health() -> Response {
    json_response(
        StatusCode::OK,
        &Health {
            status: "healthy",
            reason: None,
        },
    )
}

pub async fn readyz(state: &AppState) -> Response {
    match state.manager.readiness().await {
        Readiness::Ready => json_response(
            StatusCode::OK,
            &Health {
                status: "ready",
                reason: None,
            },
        ),
        Readiness::NotReady(why) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &Health {
                status: "notReady",
                reason: Some(why),
            },
        ),
    }
}

pub async fn create(state: &AppState, body: Bytes, query: &str) -> Result<Response, ApiError> {
    let mode = WriteQuery::parse(query)?;
    let Decoded {
        value: req,
        unknown,
    } = decode::<TaskRequest>(&body)?;
    let mut unknown = unknown;
    unknown.extend(req.template_unknown_fields(""));
    let unknown = unknown_fields::apply(mode, unknown)?;
    let created = match req.into_parts() {
        Ok((name, spec)) => state
            .manager
            .create(name, spec)
            .await
            .map_err(ApiError::from),
        Err(why) => Err(ApiError::bad_request(why)),
    };
    let resp = match created {
        Ok(view) => {
            log_unknown(&view.name, &unknown);
            json_response(StatusCode::CREATED, &state.response(view))
        }
        Err(e) => e.noting_unknown(&unknown).into_response(),
    };
    Ok(unknown_fields::warn(resp, &unknown))
}

/// Once per task: when it is created from a request with unknown fields.
fn log_unknown(task: &str, unknown: &[String]) {
    if !unknown.is_empty() {
        tracing::warn!(task, fields = ?unknown, "the task's request had fields the agent does not know; they were ignored");
    }
}

pub fn get(state: &AppState, name: &str) -> Result<Response, ApiError> {
    let task = state.manager.get_rendered(name, state.render())?;
    let mut body = BytesMut::with_capacity(task.len() + 1);
    body.extend_from_slice(&task);
    body.put_u8(b'\n');
    Ok(json_bytes(body.freeze()))
}

/// A 200 with a JSON body already made.
fn json_bytes(body: Bytes) -> Response {
    let mut resp = Response::new(body.into());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Long-poll: answers as soon as the task has terminated or is being deleted
/// (immediately if it already is; 404 once it is gone), else after `wait`. Clients see an
/// exit the moment it happens instead of polling.
pub async fn get_when_settled(
    state: &AppState,
    name: &str,
    wait: std::time::Duration,
    client_gone: &tokio_util::sync::CancellationToken,
) -> Result<Response, ApiError> {
    // Subscribe before looking, so a change between the two is not missed.
    let mut changes = state.manager.subscribe();
    let settled =
        |v: &crate::manager::TaskView| v.state.is_terminated() || v.deletion_timestamp.is_some();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if settled(&state.manager.get(name)?) {
            return get(state, name);
        }
        loop {
            let changed = tokio::select! {
                c = tokio::time::timeout_at(deadline, changes.recv()) => c,
                // Nobody may be left to read the answer: it is the task as it is.
                () = client_gone.cancelled() => return get(state, name),
            };
            match changed {
                // Timed out (or the agent is going away): answer with the task as it is.
                Err(_) | Ok(Err(RecvError::Closed)) => return get(state, name),
                Ok(Ok(changed)) if changed != name => continue,
                // Our task changed, or we lagged behind: look again.
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => break,
            }
        }
    }
}

pub async fn delete(state: &AppState, name: &str) -> Result<Response, ApiError> {
    state.manager.delete(name).await?;
    let mut resp = Response::new(Vec::new().into());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

/// What one piece of a streamed `GET /getTasks` holds at least (the last holds the rest):
/// large enough that 10,000 tasks are a few dozen writes, small enough that the list of
/// 100,000 never exists as a whole beside the tasks' cached answers.
const LIST_CHUNK: usize = 64 * 1024;

/// All tasks, as a JSON array of their cached answers. A list that fits in one piece is
/// sent with its length; a longer one is streamed (chunked) as it is assembled.
pub fn list(state: &AppState) -> Response {
    let mut pieces = ListPieces {
        tasks: state.manager.list_rendered(state.render()),
        started: false,
        done: false,
    };
    let Some(first) = pieces.next() else {
        return json_bytes(Bytes::from_static(b"[]\n"));
    };
    if pieces.done {
        return json_bytes(first);
    }
    let stream = futures::stream::iter(
        std::iter::once(first)
            .chain(pieces)
            .map(Ok::<_, std::convert::Infallible>),
    );
    let mut resp = warp::reply::Reply::into_response(warp::reply::stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `[`, the tasks' answers separated by commas, `]` and a newline, in pieces of about
/// `LIST_CHUNK` bytes. Each answer is copied once, from its cache into its piece.
struct ListPieces {
    tasks: crate::manager::Listing,
    started: bool,
    done: bool,
}

impl Iterator for ListPieces {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut piece = BytesMut::with_capacity(LIST_CHUNK.min(self.tasks.remaining() * 512 + 8));
        if !self.started {
            piece.put_u8(b'[');
        }
        while piece.len() < LIST_CHUNK {
            if self.tasks.remaining() == 0 {
                piece.extend_from_slice(b"]\n");
                self.done = true;
                break;
            }
            if self.started {
                piece.put_u8(b',');
            }
            self.started = true;
            self.tasks.next_into(&mut piece);
        }
        Some(piece.freeze())
    }
}

pub async fn sync(state: &AppState, body: Bytes, query: &str) -> Result<Response, ApiError> {
    let mode = WriteQuery::parse(query)?;
    // `null` means "no tasks", as upstream decodes it.
    let Decoded {
        value: reqs,
        unknown,
    } = decode::<Option<Vec<TaskRequest>>>(&body)?;
    let reqs = reqs.unwrap_or_default();
    let mut unknown = unknown;
    for (i, r) in reqs.iter().enumerate() {
        unknown.extend(r.template_unknown_fields(&format!("[{i}]")));
    }
    let unknown = unknown_fields::apply(mode, unknown)?;
    // The elements with unknown fields whose task is new: logged once it is created.
    let new_with_unknown: Vec<(String, Vec<String>)> = reqs
        .iter()
        .enumerate()
        .filter(|(_, r)| state.manager.get(&r.name).is_err())
        .filter_map(|(i, r)| {
            let at = format!("[{i}]");
            let mine: Vec<String> = unknown
                .iter()
                .filter(|p| {
                    p.strip_prefix(&at)
                        .is_some_and(|rest| rest.starts_with('.'))
                })
                .cloned()
                .collect();
            (!mine.is_empty()).then(|| (r.name.clone(), mine))
        })
        .collect();
    let synced = match reqs
        .into_iter()
        .map(TaskRequest::into_parts)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(desired) => state.manager.sync(desired).await.map_err(ApiError::from),
        Err(why) => Err(ApiError::bad_request(why)),
    };
    let resp = match synced {
        Ok(views) => {
            for (name, fields) in &new_with_unknown {
                if views.iter().any(|v| &v.name == name) {
                    log_unknown(name, fields);
                }
            }
            let tasks: Vec<TaskResponse> = views.into_iter().map(|v| state.response(v)).collect();
            json_response(StatusCode::OK, &tasks)
        }
        Err(e) => e.noting_unknown(&unknown).into_response(),
    };
    Ok(unknown_fields::warn(resp, &unknown))
}
