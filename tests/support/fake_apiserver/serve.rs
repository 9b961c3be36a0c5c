//! The fake's HTTP side: routing, validation of Events, patch media types, and watches.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use warp::Reply;
use warp::http::{Method, StatusCode};
use warp::reply::Response;

use super::{
    EVENTS_PREFIX, Kind, PODS_PREFIX, Recorded, State, TASKS_PREFIX, Watcher, failure, invalid,
    matches, not_found, parse_labels, query_param, reply, rv, seq_of, status, watch_line,
};

/// What the `events.k8s.io/v1` validation of the API server refuses.
fn event_problems(ns: &str, ev: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let text = |f: &str| ev[f].as_str().unwrap_or("");
    for f in [
        "reportingController",
        "reportingInstance",
        "action",
        "reason",
    ] {
        if text(f).is_empty() {
            out.push(format!("{f}: Required value"));
        }
    }
    for f in ["action", "reason"] {
        if text(f).len() > 128 {
            out.push(format!("{f}: Too long: may not be more than 128 bytes"));
        }
    }
    if ev["eventTime"].as_str().is_none_or(str::is_empty) {
        out.push("eventTime: Required value".into());
    }
    if !matches!(text("type"), "Normal" | "Warning") {
        out.push(format!("type: Unsupported value: {:?}", text("type")));
    }
    if text("note").len() > 1024 {
        out.push("note: Too long: may not be more than 1024 bytes".into());
    }
    if ev["regarding"]["namespace"]
        .as_str()
        .is_some_and(|n| n != ns)
    {
        out.push("regarding.namespace: Invalid value: does not match event.namespace".into());
    }
    if ev["metadata"]["namespace"]
        .as_str()
        .is_some_and(|n| n != ns)
    {
        out.push(
            "metadata.namespace: Invalid value: does not match the namespace of the request".into(),
        );
    }
    out
}

pub(super) fn handle(
    state: &Arc<Mutex<State>>,
    method: Method,
    path: &str,
    query: &str,
    content_type: String,
    body: &Bytes,
) -> Response {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.requests.push(Recorded {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        content_type: content_type.clone(),
        body: String::from_utf8_lossy(body).into_owned(),
    });
    if st.down {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
        );
    }
    if let Some((code, v)) = st.reviews.handle(&method, path, body) {
        return reply(code, &v);
    }
    let (kind, rest) = if let Some(r) = path.strip_prefix(TASKS_PREFIX) {
        (Kind::Tasks, r)
    } else if let Some(r) = path.strip_prefix(EVENTS_PREFIX) {
        (Kind::Events, r)
    } else if let Some(r) = path.strip_prefix(PODS_PREFIX) {
        (Kind::Pods, r)
    } else {
        let (code, body) = failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route for {path}"),
        );
        return reply(code, &body);
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let (code, body) = match parts.as_slice() {
        [ns, r] if *r == kind.resource() => {
            let ns = ns.to_string();
            let labels = parse_labels(&query_param(query, "labelSelector").unwrap_or_default());
            let name = query_param(query, "fieldSelector")
                .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_string));
            if matches!(query_param(query, "watch").as_deref(), Some("true" | "1")) {
                return watch(state, &mut st, kind, ns, labels, name, query);
            }
            match method {
                Method::GET => {
                    let items: Vec<Value> = st
                        .objects
                        .iter()
                        .filter(|((k, n, _), o)| {
                            *k == kind && *n == ns && matches(o, &labels, name.as_deref())
                        })
                        .map(|(_, o)| o.clone())
                        .collect();
                    (
                        StatusCode::OK,
                        json!({
                            "apiVersion": kind.api_version(),
                            "kind": format!("{}List", kind.kind()),
                            "metadata": {"resourceVersion": rv(st.seq)},
                            "items": items,
                        }),
                    )
                }
                Method::POST => match serde_json::from_slice::<Value>(body) {
                    Err(_) => failure(StatusCode::BAD_REQUEST, "BadRequest", "invalid JSON"),
                    Ok(obj) if kind == Kind::Events && !event_problems(&ns, &obj).is_empty() => {
                        invalid(&format!(
                            "Event.events.k8s.io is invalid: {}",
                            event_problems(&ns, &obj).join(", ")
                        ))
                    }
                    Ok(mut obj) => {
                        obj["metadata"]["namespace"] = json!(ns);
                        st.create(kind, obj)
                    }
                },
                _ => failure(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "method not allowed",
                ),
            }
        }
        [ns, r, name, sub @ ..] if *r == kind.resource() && sub.len() <= 1 => {
            let status_sub = match sub {
                [] => false,
                ["status"] if kind != Kind::Events => true,
                _ => {
                    let (code, body) =
                        failure(StatusCode::NOT_FOUND, "NotFound", "no such subresource");
                    return reply(code, &body);
                }
            };
            let key = (kind, ns.to_string(), name.to_string());
            match method {
                Method::GET => match st.objects.get(&key) {
                    Some(o) => (StatusCode::OK, o.clone()),
                    None => not_found(kind, name),
                },
                Method::PATCH => patch(
                    &mut st,
                    kind,
                    ns,
                    name,
                    status_sub,
                    &content_type,
                    query,
                    body,
                ),
                Method::DELETE => st.delete(kind, ns, name),
                _ => failure(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "method not allowed",
                ),
            }
        }
        _ => failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route for {path}"),
        ),
    };
    reply(code, &body)
}

#[allow(clippy::too_many_arguments)]
fn patch(
    st: &mut State,
    kind: Kind,
    ns: &str,
    name: &str,
    status_sub: bool,
    content_type: &str,
    query: &str,
    body: &Bytes,
) -> (StatusCode, Value) {
    let media = content_type.split(';').next().unwrap_or("").trim();
    // Apply bodies are YAML; kube sends JSON (which is YAML too), and so this fake reads
    // JSON only.
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "invalid patch body");
    };
    match media {
        "application/merge-patch+json" => st.merge_patch(kind, ns, name, status_sub, &doc),
        "application/json-patch+json" => st.json_patch(kind, ns, name, status_sub, &doc),
        "application/apply-patch+yaml" => match query_param(query, "fieldManager") {
            Some(m) if !m.is_empty() => st.apply(kind, ns, name, status_sub, &m, &doc),
            _ => invalid(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ),
        },
        // Custom resources have no strategic merge patch.
        "application/strategic-merge-patch+json" if kind != Kind::Tasks => {
            st.merge_patch(kind, ns, name, status_sub, &doc)
        }
        other => failure(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format ({other:?}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
            ),
        ),
    }
}

fn watch(
    state: &Arc<Mutex<State>>,
    st: &mut State,
    kind: Kind,
    ns: String,
    labels: Vec<(String, String)>,
    name: Option<String>,
    query: &str,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let stream_reply = |rx| {
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(Ok::<Bytes, std::convert::Infallible>);
        let mut resp = Response::new(warp::reply::stream(stream).into_response().into_body());
        resp.headers_mut().insert(
            "content-type",
            warp::http::HeaderValue::from_static("application/json"),
        );
        resp
    };
    let from = query_param(query, "resourceVersion").unwrap_or_default();
    if from.is_empty() || from == "0" {
        // "Start at most recent" / "any": synthetic ADDED events for what exists now.
        for ((k, n, _), obj) in &st.objects {
            if *k == kind && *n == ns && matches(obj, &labels, name.as_deref()) {
                let _ = tx.send(watch_line("ADDED", obj));
            }
        }
    } else {
        match seq_of(&from).filter(|s| *s >= st.compacted && *s <= st.seq) {
            None => {
                // As the apiserver answers a compacted version: 200, one ERROR event, end.
                let gone = status(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {from}"),
                );
                let _ = tx.send(watch_line("ERROR", &gone));
                drop(tx);
                return stream_reply(rx);
            }
            Some(from) => {
                for (seq, k, n, event, obj) in &st.history {
                    if *seq > from
                        && *k == kind
                        && *n == ns
                        && matches(obj, &labels, name.as_deref())
                    {
                        let _ = tx.send(watch_line(event, obj));
                    }
                }
            }
        }
    }
    st.watch_seq += 1;
    let id = st.watch_seq;
    let bookmarks = query_param(query, "allowWatchBookmarks").as_deref() == Some("true");
    st.watchers.push(Watcher {
        id,
        kind,
        ns,
        labels,
        name,
        bookmarks,
        stalled: false,
        tx,
    });
    if let Some(secs) = query_param(query, "timeoutSeconds").and_then(|s| s.parse::<u64>().ok()) {
        // The server ends the watch after timeoutSeconds, with a bookmark just before.
        let state = state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            let seq = st.seq;
            st.watchers.retain(|w| {
                if w.id != id || w.stalled {
                    return true;
                }
                if w.bookmarks {
                    let mark = json!({"apiVersion": w.kind.api_version(), "kind": w.kind.kind(),
                                      "metadata": {"resourceVersion": rv(seq)}});
                    let _ = w.tx.send(watch_line("BOOKMARK", &mark));
                }
                false
            });
        });
    }
    stream_reply(rx)
}
