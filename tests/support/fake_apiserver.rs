//! An in-process fake Kubernetes API server for the agent's end-to-end tests.
//!
//! No real kube-apiserver (nor envtest, kind, k3s or kwok) can be installed on the machines
//! these tests run on, so this serves the few endpoints the agent uses, with real
//! Kubernetes JSON and semantics: resource versions, LIST + WATCH (chunked JSON event
//! lines, replayed from any resource version still in the history), JSON merge patches of
//! objects and of `/status`, finalizers and deletion timestamps, 404/409/410 as `Status`.
//!
//! Served paths (namespaced only, and the two review endpoints of `fake_reviews`):
//! * `/api/v1/namespaces/{ns}/pods[/{name}]`: get, list, watch (`fieldSelector`
//!   `metadata.name=`)
//! * `/apis/task-executor.io/v1alpha1/namespaces/{ns}/tasks[/{name}[/status]]`: get, list,
//!   watch (`labelSelector` `k=v,...`), create, merge patch, delete
//!
//! Tests drive the server directly (`put_pod`, `create_task`, `delete_task`, ...) and can
//! end every open watch (`end_watches`) or make the next watch fail with 410 Gone
//! (`gone_next_watch`). Every request is recorded (`requests`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use warp::Filter;
use warp::Reply;
use warp::http::{Method, StatusCode};
use warp::reply::Response;

const TASKS_PREFIX: &str = "/apis/task-executor.io/v1alpha1/namespaces/";
const PODS_PREFIX: &str = "/api/v1/namespaces/";

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
}

impl Recorded {
    pub fn is_watch(&self) -> bool {
        self.query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1")
    }
}

/// How the next watch request fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// HTTP 200, then one `ERROR` event carrying a 410 `Status` (what etcd compaction gives).
    InStream,
    /// The request itself answers 410.
    Http,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Pods,
    Tasks,
}

impl Kind {
    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Pods => ("v1", "PodList"),
            Kind::Tasks => ("task-executor.io/v1alpha1", "TaskList"),
        }
    }
}

type Key = (Kind, String, String);

struct Watcher {
    kind: Kind,
    ns: String,
    labels: Vec<(String, String)>,
    name: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid_seq: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change, for watches that start at an older resource version.
    history: Vec<(u64, Kind, String, &'static str, Value)>,
    watchers: Vec<Watcher>,
    requests: Vec<Recorded>,
    gone_next_watch: Option<Gone>,
    reviews: super::fake_reviews::Reviews,
}

/// The running fake. Dropping it stops the server.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
    _thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts the server on 127.0.0.1 (a free port) on a runtime thread of its own.
    pub fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let routes = warp::method()
                    .and(warp::path::full())
                    .and(warp::query::raw().or(warp::any().map(String::new)).unify())
                    .and(warp::body::bytes())
                    .map(
                        move |m: Method, p: warp::path::FullPath, q: String, b: Bytes| {
                            handle(&st, m, p.as_str(), &q, &b)
                        },
                    );
                warp::serve(routes)
                    .incoming(listener)
                    .graceful(async move {
                        let _ = stop_rx.await;
                    })
                    .run()
                    .await;
            });
            rt.shutdown_background();
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        FakeApiServer {
            addr,
            state,
            _shutdown: stop_tx,
            _thread: Some(thread),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a kubeconfig pointing at this server, with `namespace` as the default.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(path, text).unwrap();
    }

    /// Creates or replaces a Pod (MODIFIED if it existed).
    pub fn put_pod(&self, pod: Value) {
        let ns = pod["metadata"]["namespace"].as_str().unwrap().to_string();
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let mut st = self.state();
        let key = (Kind::Pods, ns, name);
        let event = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.store(key, pod, event);
    }

    /// Creates a Task as `kubectl apply` would (metadata filled in, generation 1).
    pub fn create_task(&self, task: Value) {
        let mut st = self.state();
        let (code, body) = st.create(Kind::Tasks, task);
        assert_eq!(code, StatusCode::CREATED, "create_task: {body}");
    }

    /// Replaces a Task's spec (the generation goes up).
    pub fn update_task_spec(&self, ns: &str, name: &str, spec: Value) {
        let mut st = self.state();
        let (code, body) = st.patch(Kind::Tasks, ns, name, false, &json!({ "spec": spec }));
        assert_eq!(code, StatusCode::OK, "update_task_spec: {body}");
    }

    /// Deletes a Task as the API does: with finalizers it only gets a deletionTimestamp.
    pub fn delete_task(&self, ns: &str, name: &str) {
        let mut st = self.state();
        let (code, body) = st.delete(Kind::Tasks, ns, name);
        assert_eq!(code, StatusCode::OK, "delete_task: {body}");
    }

    pub fn get_task(&self, ns: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&(Kind::Tasks, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Ends every open watch stream (as an API server restart or timeout would).
    pub fn end_watches(&self) {
        self.state().watchers.clear();
    }

    /// The next watch request fails with 410 Gone.
    pub fn gone_next_watch(&self, how: Gone) {
        self.state().gone_next_watch = Some(how);
    }

    /// The TokenReview / SubjectAccessReview answers (`support::fake_reviews`).
    pub fn reviews<T>(&self, f: impl FnOnce(&mut super::fake_reviews::Reviews) -> T) -> T {
        f(&mut self.state().reviews)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Number of open watch streams on `path_part` (e.g. "/tasks").
    pub fn open_watches(&self, kind_tasks: bool) -> usize {
        let kind = if kind_tasks { Kind::Tasks } else { Kind::Pods };
        let mut st = self.state();
        st.watchers.retain(|w| !w.tx.is_closed());
        st.watchers.iter().filter(|w| w.kind == kind).count()
    }

    /// Waits until `cond` holds on the recorded requests.
    pub fn wait_for_request(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Recorded) -> bool,
    ) -> Recorded {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| cond(r)) {
                return r;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Open watch streams would otherwise hold the graceful shutdown forever.
        self.state().watchers.clear();
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    })
}

fn not_found(name: &str) -> (StatusCode, Value) {
    let body = status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{name} not found"),
    );
    (StatusCode::NOT_FOUND, body)
}

fn reply(code: StatusCode, body: &Value) -> Response {
    let mut resp = Response::new(serde_json::to_vec(body).unwrap().into());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        "content-type",
        warp::http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap()
        .to_string()
}

/// RFC 7386.
fn merge_apply(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_apply(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

fn parse_labels(sel: &str) -> Vec<(String, String)> {
    sel.split(',')
        .filter(|s| !s.is_empty())
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((
                k.trim_end_matches('=').to_string(),
                v.trim_start_matches('=').to_string(),
            ))
        })
        .collect()
}

fn matches(obj: &Value, labels: &[(String, String)], name: Option<&str>) -> bool {
    let meta = &obj["metadata"];
    labels
        .iter()
        .all(|(k, v)| meta["labels"][k].as_str() == Some(v.as_str()))
        && name.is_none_or(|n| meta["name"].as_str() == Some(n))
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Stores `obj` under a new resource version and tells the watchers.
    fn store(&mut self, key: Key, mut obj: Value, event: &'static str) {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            self.uid_seq += 1;
            obj["metadata"]["uid"] = json!(format!("uid-{}", self.uid_seq));
        }
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!(now());
        }
        if event == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), obj.clone());
        }
        self.history
            .push((rv, key.0, key.1.clone(), event, obj.clone()));
        let line = watch_line(event, &obj);
        self.watchers.retain(|w| {
            if w.kind != key.0 || w.ns != key.1 || !matches(&obj, &w.labels, w.name.as_deref()) {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
    }

    fn create(&mut self, kind: Kind, mut obj: Value) -> (StatusCode, Value) {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name is required",
                ),
            );
        };
        let key = (kind, ns.clone(), name.clone());
        if self.objects.contains_key(&key) {
            return (
                StatusCode::CONFLICT,
                status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{name} already exists"),
                ),
            );
        }
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["generation"] = json!(1);
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
        self.store(key.clone(), obj, "ADDED");
        (StatusCode::CREATED, self.objects[&key].clone())
    }

    fn patch(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        status_sub: bool,
        patch: &Value,
    ) -> (StatusCode, Value) {
        let key = (kind, ns.to_string(), name.to_string());
        let Some(mut obj) = self.objects.get(&key).cloned() else {
            return not_found(name);
        };
        let mut patch = patch.clone();
        if let Some(want) = patch["metadata"]["resourceVersion"].as_str()
            && obj["metadata"]["resourceVersion"].as_str() != Some(want)
        {
            return (
                StatusCode::CONFLICT,
                status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                ),
            );
        }
        // (`get_mut`, not `patch["metadata"]`: indexing would insert a `null` that deletes
        // the whole metadata.)
        if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        if status_sub {
            // The status subresource changes only .status.
            let s = patch.get("status").cloned().unwrap_or(Value::Null);
            let mut cur = obj.get("status").cloned().unwrap_or(Value::Null);
            merge_apply(&mut cur, &s);
            obj["status"] = cur;
        } else {
            let old_spec = obj["spec"].clone();
            if let Some(m) = patch.as_object_mut() {
                m.remove("status"); // the main resource ignores status changes
            }
            merge_apply(&mut obj, &patch);
            if obj["spec"] != old_spec {
                let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
                obj["metadata"]["generation"] = json!(g + 1);
            }
        }
        let finalizers_empty = obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if !obj["metadata"]["deletionTimestamp"].is_null() && finalizers_empty {
            self.store(key, obj.clone(), "DELETED");
            return (StatusCode::OK, obj);
        }
        self.store(key.clone(), obj, "MODIFIED");
        (StatusCode::OK, self.objects[&key].clone())
    }

    fn delete(&mut self, kind: Kind, ns: &str, name: &str) -> (StatusCode, Value) {
        let key = (kind, ns.to_string(), name.to_string());
        let Some(mut obj) = self.objects.get(&key).cloned() else {
            return not_found(name);
        };
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                self.store(key.clone(), obj, "MODIFIED");
            }
            return (StatusCode::OK, self.objects[&key].clone());
        }
        self.store(key, obj.clone(), "DELETED");
        (StatusCode::OK, obj)
    }
}

fn watch_line(event: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event, "object": obj})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn handle(
    state: &Arc<Mutex<State>>,
    method: Method,
    path: &str,
    query: &str,
    body: &Bytes,
) -> Response {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.requests.push(Recorded {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        body: String::from_utf8_lossy(body).into_owned(),
    });
    if let Some((code, v)) = st.reviews.handle(&method, path, body) {
        return reply(code, &v);
    }
    let (kind, rest) = if let Some(r) = path.strip_prefix(TASKS_PREFIX) {
        (Kind::Tasks, r)
    } else if let Some(r) = path.strip_prefix(PODS_PREFIX) {
        (Kind::Pods, r)
    } else {
        return reply(
            StatusCode::NOT_FOUND,
            &status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route for {path}"),
            ),
        );
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let resource = if kind == Kind::Tasks { "tasks" } else { "pods" };
    match parts.as_slice() {
        [ns, r] if *r == resource => {
            let ns = ns.to_string();
            let watching = matches!(query_param(query, "watch").as_deref(), Some("true" | "1"));
            let labels = parse_labels(&query_param(query, "labelSelector").unwrap_or_default());
            let name = query_param(query, "fieldSelector")
                .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_string));
            if watching {
                return watch(&mut st, kind, ns, labels, name, query);
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
                    let (api_version, list_kind) = kind.list_kind();
                    reply(
                        StatusCode::OK,
                        &json!({
                            "apiVersion": api_version, "kind": list_kind,
                            "metadata": {"resourceVersion": st.rv.to_string()},
                            "items": items,
                        }),
                    )
                }
                Method::POST => {
                    let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                        return reply(
                            StatusCode::BAD_REQUEST,
                            &status(StatusCode::BAD_REQUEST, "BadRequest", "invalid JSON"),
                        );
                    };
                    obj["metadata"]["namespace"] = json!(ns);
                    let (code, v) = st.create(kind, obj);
                    reply(code, &v)
                }
                _ => reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &status(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "MethodNotAllowed",
                        "method not allowed",
                    ),
                ),
            }
        }
        [ns, r, name, sub @ ..] if *r == resource && sub.len() <= 1 => {
            let status_sub = match sub {
                [] => false,
                ["status"] => true,
                _ => {
                    return reply(
                        StatusCode::NOT_FOUND,
                        &status(StatusCode::NOT_FOUND, "NotFound", "no such subresource"),
                    );
                }
            };
            let key = (kind, ns.to_string(), name.to_string());
            match method {
                Method::GET => match st.objects.get(&key) {
                    Some(o) => reply(StatusCode::OK, o),
                    None => reply(
                        StatusCode::NOT_FOUND,
                        &status(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            &format!("{resource} \"{name}\" not found"),
                        ),
                    ),
                },
                Method::PATCH => {
                    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                        return reply(
                            StatusCode::BAD_REQUEST,
                            &status(StatusCode::BAD_REQUEST, "BadRequest", "invalid JSON"),
                        );
                    };
                    let (code, v) = st.patch(kind, ns, name, status_sub, &patch);
                    reply(code, &v)
                }
                Method::DELETE => {
                    let (code, v) = st.delete(kind, ns, name);
                    reply(code, &v)
                }
                _ => reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &status(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "MethodNotAllowed",
                        "method not allowed",
                    ),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            &status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route for {path}"),
            ),
        ),
    }
}

fn watch(
    st: &mut State,
    kind: Kind,
    ns: String,
    labels: Vec<(String, String)>,
    name: Option<String>,
    query: &str,
) -> Response {
    let gone = status(
        StatusCode::GONE,
        "Expired",
        "too old resource version: the watch must re-list",
    );
    match st.gone_next_watch.take() {
        Some(Gone::Http) => return reply(StatusCode::GONE, &gone),
        Some(Gone::InStream) => {
            let line = watch_line("ERROR", &gone);
            return Response::new(line.into());
        }
        None => {}
    }
    let from: u64 = query_param(query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(st.rv);
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    for (rv, k, n, event, obj) in &st.history {
        if *rv > from && *k == kind && *n == ns && matches(obj, &labels, name.as_deref()) {
            let _ = tx.send(watch_line(event, obj));
        }
    }
    st.watchers.push(Watcher {
        kind,
        ns,
        labels,
        name,
        tx,
    });
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(Ok::<Bytes, std::convert::Infallible>);
    let mut resp = Response::new(warp::reply::stream(stream).into_response().into_body());
    resp.headers_mut().insert(
        "content-type",
        warp::http::HeaderValue::from_static("application/json"),
    );
    resp
}
