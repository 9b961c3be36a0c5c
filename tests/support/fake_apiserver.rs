//! An in-process fake Kubernetes API server for the agent's end-to-end tests.
//!
//! No real kube-apiserver (nor envtest, kind, k3s or kwok) can be installed on the machines
//! these tests run on, so this serves the endpoints the agent uses, with real Kubernetes
//! JSON and semantics: opaque resource versions, LIST and WATCH (chunked JSON event lines,
//! replayed from any resource version not yet compacted, `timeoutSeconds` honoured,
//! BOOKMARK events when `allowWatchBookmarks=true`, an expired resource version answered
//! by an in-stream `ERROR` 410 as the apiserver does), merge patches, JSON patches and
//! server-side apply (`application/apply-patch+yaml`, `fieldManager`, managedFields) of
//! objects and of `/status`, finalizers and deletion timestamps, `events.k8s.io/v1` Events
//! (validated as the API validates them), and `Status` errors (404, 409, 410, 415, 422,
//! 503).
//!
//! Resource versions are deliberately opaque: they are numbers that *decrease* with every
//! change, so a client that orders them as numbers goes wrong here (Kubernetes says they
//! are opaque strings, compared for equality only).
//!
//! Served paths (namespaced only):
//! * `/api/v1/namespaces/{ns}/pods[/{name}]`: get, list, watch (`fieldSelector`
//!   `metadata.name=`)
//! * `/apis/task-executor.io/v1alpha1/namespaces/{ns}/tasks[/{name}[/status]]`: get, list,
//!   watch (`labelSelector` `k=v,...`), create, patch, delete
//! * `/apis/events.k8s.io/v1/namespaces/{ns}/events[/{name}]`: create, merge patch, list
//!
//! Tests drive the server directly (`put_pod`, `create_task`, `delete_task`, ...), and can
//! end every open watch (`end_watches`), stall them (`stall_watches`: they stay open and
//! say nothing, as a half-open connection does), take the server down (`set_down`: every
//! request answers 503) and compact its history (`compact`). Every request is recorded.

#[path = "fake_apiserver/patches.rs"]
mod patches;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use warp::Filter;
use warp::Reply;
use warp::http::{Method, StatusCode};
use warp::reply::Response;

const TASKS_PREFIX: &str = "/apis/task-executor.io/v1alpha1/namespaces/";
const EVENTS_PREFIX: &str = "/apis/events.k8s.io/v1/namespaces/";
const PODS_PREFIX: &str = "/api/v1/namespaces/";

/// Resource versions count down from here (see the module comment).
const RV_BASE: u64 = 1_000_000_000_000;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: String,
}

impl Recorded {
    pub fn is_watch(&self) -> bool {
        self.param("watch").is_some_and(|v| v == "true" || v == "1")
    }

    /// A query parameter, decoded.
    pub fn param(&self, key: &str) -> Option<String> {
        query_param(&self.query, key)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Pods,
    Tasks,
    Events,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::Pods => "v1",
            Kind::Tasks => "task-executor.io/v1alpha1",
            Kind::Events => "events.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Pods => "Pod",
            Kind::Tasks => "Task",
            Kind::Events => "Event",
        }
    }

    fn resource(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Tasks => "tasks",
            Kind::Events => "events",
        }
    }
}

type Key = (Kind, String, String);

struct Watcher {
    id: u64,
    kind: Kind,
    ns: String,
    labels: Vec<(String, String)>,
    name: Option<String>,
    bookmarks: bool,
    /// Says nothing more and is never ended by the server (a half-open connection).
    stalled: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    /// The revision of the last change (resource versions are derived from it).
    seq: u64,
    /// Watches from a revision older than this get 410 Gone.
    compacted: u64,
    uid_seq: u64,
    watch_seq: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change not compacted yet, for watches that start at an older version.
    history: Vec<(u64, Kind, String, &'static str, Value)>,
    watchers: Vec<Watcher>,
    /// The last configuration each field manager applied, per object and subresource.
    applied: HashMap<(Key, String, bool), Value>,
    requests: Vec<Recorded>,
    down: bool,
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
                    .and(warp::header::optional::<String>("content-type"))
                    .and(warp::body::bytes())
                    .map(
                        move |m: Method,
                              p: warp::path::FullPath,
                              q: String,
                              ct: Option<String>,
                              b: Bytes| {
                            handle(&st, m, p.as_str(), &q, ct.unwrap_or_default(), &b)
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

    /// The server's URL, for a client of one's own.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
        let (code, body) = st.merge_patch(Kind::Tasks, ns, name, false, &json!({ "spec": spec }));
        assert_eq!(code, StatusCode::OK, "update_task_spec: {body}");
    }

    /// Deletes a Task as the API does: with finalizers it only gets a deletionTimestamp.
    pub fn delete_task(&self, ns: &str, name: &str) {
        let mut st = self.state();
        let (code, body) = st.delete(Kind::Tasks, ns, name);
        assert_eq!(code, StatusCode::OK, "delete_task: {body}");
    }

    /// Removes a Task whatever its finalizers say, as `kubectl patch` (finalizers: null)
    /// followed by `kubectl delete` does.
    pub fn force_delete_task(&self, ns: &str, name: &str) {
        let mut st = self.state();
        let patch = json!({"metadata": {"finalizers": null}});
        let (code, body) = st.merge_patch(Kind::Tasks, ns, name, false, &patch);
        assert_eq!(code, StatusCode::OK, "force_delete_task: {body}");
        if st
            .objects
            .contains_key(&(Kind::Tasks, ns.to_string(), name.to_string()))
        {
            let (code, body) = st.delete(Kind::Tasks, ns, name);
            assert_eq!(code, StatusCode::OK, "force_delete_task: {body}");
        }
    }

    pub fn get_task(&self, ns: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&(Kind::Tasks, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// The Events (`events.k8s.io/v1`) whose `regarding` names `name` in `ns`, oldest first.
    pub fn events_for(&self, ns: &str, name: &str) -> Vec<Value> {
        let mut events: Vec<Value> = self
            .state()
            .objects
            .iter()
            .filter(|((k, n, _), e)| {
                *k == Kind::Events && n == ns && e["regarding"]["name"].as_str() == Some(name)
            })
            .map(|(_, e)| e.clone())
            .collect();
        events.sort_by(|a, b| {
            a["eventTime"].as_str().cmp(&b["eventTime"].as_str()).then(
                a["metadata"]["name"]
                    .as_str()
                    .cmp(&b["metadata"]["name"].as_str()),
            )
        });
        events
    }

    /// Ends every open watch stream (as an API server restart or timeout would).
    pub fn end_watches(&self) {
        self.state().watchers.retain(|w| w.stalled);
    }

    /// Open watch streams stop delivering and are never ended by the server, as over a
    /// half-open connection; new watches work normally.
    pub fn stall_watches(&self) {
        for w in &mut self.state().watchers {
            w.stalled = true;
        }
    }

    /// Down: every request answers 503 and open watches end. Up again: back to normal.
    pub fn set_down(&self, down: bool) {
        let mut st = self.state();
        st.down = down;
        if down {
            st.watchers.retain(|w| w.stalled);
        }
    }

    /// Drops the change history (as etcd compaction does): a watch from any resource
    /// version issued so far gets 410 Gone, and its client must list again.
    pub fn compact(&self) {
        let mut st = self.state();
        st.compacted = st.seq;
        st.history.clear();
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Number of open, delivering watch streams on Tasks (`true`) or Pods.
    pub fn open_watches(&self, kind_tasks: bool) -> usize {
        let kind = if kind_tasks { Kind::Tasks } else { Kind::Pods };
        let mut st = self.state();
        st.watchers.retain(|w| !w.tx.is_closed());
        st.watchers
            .iter()
            .filter(|w| w.kind == kind && !w.stalled)
            .count()
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

fn failure(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    (code, status(code, reason, message))
}

fn not_found(kind: Kind, name: &str) -> (StatusCode, Value) {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{}.{} \"{name}\" not found", kind.resource(), group(kind)),
    )
}

fn group(kind: Kind) -> &'static str {
    kind.api_version().split_once('/').map_or("", |(g, _)| g)
}

fn invalid(message: &str) -> (StatusCode, Value) {
    failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
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

fn rv(seq: u64) -> String {
    (RV_BASE - seq).to_string()
}

fn seq_of(rv: &str) -> Option<u64> {
    rv.parse::<u64>().ok().and_then(|v| RV_BASE.checked_sub(v))
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

fn watch_line(event: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event, "object": obj})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

/// The metadata fields the API server drops when empty (`omitempty`).
fn normalize(obj: &mut Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["finalizers", "labels", "annotations", "managedFields"] {
            let empty = match m.get(field) {
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(o)) => o.is_empty(),
                Some(Value::Null) => true,
                _ => false,
            };
            if empty {
                m.remove(field);
            }
        }
    }
}

impl State {
    /// Stores `obj` under a new resource version and tells the watchers.
    fn store(&mut self, key: Key, mut obj: Value, event: &'static str) {
        self.seq += 1;
        let seq = self.seq;
        obj["metadata"]["resourceVersion"] = json!(rv(seq));
        if obj["metadata"]["uid"].is_null() {
            self.uid_seq += 1;
            obj["metadata"]["uid"] =
                json!(format!("00000000-0000-4000-8000-{:012x}", self.uid_seq));
        }
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!(now());
        }
        normalize(&mut obj);
        if event == "DELETED" {
            self.objects.remove(&key);
            self.applied.retain(|(k, _, _), _| *k != key);
        } else {
            self.objects.insert(key.clone(), obj.clone());
        }
        self.history
            .push((seq, key.0, key.1.clone(), event, obj.clone()));
        let line = watch_line(event, &obj);
        self.watchers.retain(|w| {
            if w.stalled {
                return true;
            }
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
            return invalid("metadata.name: Required value: name or generateName is required");
        };
        let key = (kind, ns.clone(), name.clone());
        if self.objects.contains_key(&key) {
            return failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!(
                    "{}.{} \"{name}\" already exists",
                    kind.resource(),
                    group(kind)
                ),
            );
        }
        obj["metadata"]["namespace"] = json!(ns);
        if kind == Kind::Tasks {
            obj["metadata"]["generation"] = json!(1);
            if let Some(m) = obj.as_object_mut() {
                m.remove("status"); // the status subresource: ignored on create
            }
        }
        self.store(key.clone(), obj, "ADDED");
        (StatusCode::CREATED, self.objects[&key].clone())
    }

    /// Stores a patched object: bumps the generation on a spec change, and removes an
    /// object that is being deleted and has no finalizers left.
    fn commit(&mut self, key: Key, before: &Value, mut obj: Value) -> (StatusCode, Value) {
        normalize(&mut obj);
        if obj == *before {
            return (StatusCode::OK, obj); // no change: no new resource version
        }
        if obj["spec"] != before["spec"] {
            let g = before["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        let finalizers_empty = obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if !obj["metadata"]["deletionTimestamp"].is_null() && finalizers_empty {
            self.store(key.clone(), obj, "DELETED");
            let gone = self.history.last().map(|h| h.4.clone()).unwrap_or_default();
            return (StatusCode::OK, gone);
        }
        self.store(key.clone(), obj, "MODIFIED");
        (StatusCode::OK, self.objects[&key].clone())
    }

    fn merge_patch(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        status_sub: bool,
        patch: &Value,
    ) -> (StatusCode, Value) {
        let key = (kind, ns.to_string(), name.to_string());
        let Some(before) = self.objects.get(&key).cloned() else {
            return not_found(kind, name);
        };
        let mut patch = patch.clone();
        if let Some(want) = patch["metadata"]["resourceVersion"].as_str()
            && before["metadata"]["resourceVersion"].as_str() != Some(want)
        {
            return conflict(kind, name);
        }
        // (`get_mut`, not `patch["metadata"]`: indexing would insert a `null` that deletes
        // the whole metadata.)
        if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let mut obj = before.clone();
        if status_sub {
            // The status subresource changes only .status.
            let s = patch.get("status").cloned().unwrap_or(Value::Null);
            let mut cur = obj.get("status").cloned().unwrap_or(Value::Null);
            patches::merge(&mut cur, &s);
            obj["status"] = cur;
        } else {
            if kind == Kind::Tasks
                && let Some(m) = patch.as_object_mut()
            {
                m.remove("status"); // the main resource ignores status changes
            }
            patches::merge(&mut obj, &patch);
        }
        self.commit(key, &before, obj)
    }

    fn json_patch(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        status_sub: bool,
        ops: &Value,
    ) -> (StatusCode, Value) {
        let key = (kind, ns.to_string(), name.to_string());
        let Some(before) = self.objects.get(&key).cloned() else {
            return not_found(kind, name);
        };
        let mut obj = before.clone();
        if let Err(why) = patches::json_patch(&mut obj, ops) {
            return invalid(&format!(
                "the server rejected our request due to an error in our request: {why}"
            ));
        }
        // A subresource keeps only its part of the change; the main resource not the status.
        if status_sub {
            let status = obj["status"].clone();
            obj = before.clone();
            obj["status"] = status;
        } else if kind == Kind::Tasks {
            obj["status"] = before["status"].clone();
            if before.get("status").is_none()
                && let Some(m) = obj.as_object_mut()
            {
                m.remove("status");
            }
        }
        self.commit(key, &before, obj)
    }

    /// Server-side apply of `config` by `manager`.
    fn apply(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        status_sub: bool,
        manager: &str,
        config: &Value,
    ) -> (StatusCode, Value) {
        if config["apiVersion"].as_str() != Some(kind.api_version())
            || config["kind"].as_str() != Some(kind.kind())
        {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!(
                    "apply: apiVersion and kind must be {} {}",
                    kind.api_version(),
                    kind.kind()
                ),
            );
        }
        if let Some(n) = config["metadata"]["name"].as_str()
            && n != name
        {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            );
        }
        let key = (kind, ns.to_string(), name.to_string());
        // A subresource is never created by apply.
        let Some(before) = self.objects.get(&key).cloned() else {
            return not_found(kind, name);
        };
        let part = if status_sub { "status" } else { "spec" };
        let applied_key = (key.clone(), manager.to_string(), status_sub);
        let previous = self.applied.get(&applied_key).cloned();
        let mut obj = before.clone();
        let mut target = obj.get(part).cloned().unwrap_or(Value::Null);
        let new_part = config.get(part).cloned().unwrap_or(json!({}));
        patches::apply(
            &mut target,
            previous.as_ref().and_then(|p| p.get(part)),
            &new_part,
        );
        obj[part] = target;
        // One managedFields entry per manager and subresource.
        let mut managed: Vec<Value> = obj["metadata"]["managedFields"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let subresource = if status_sub { "status" } else { "" };
        let fields = patches::fields_v1(&json!({ part: new_part }));
        let mine = |m: &Value| {
            m["manager"] == manager
                && m["operation"] == "Apply"
                && m["subresource"].as_str().unwrap_or("") == subresource
        };
        if obj[part] == before[part] && managed.iter().any(|m| mine(m) && m["fieldsV1"] == fields) {
            // A no-op apply changes nothing, not even the resource version.
            self.applied.insert(applied_key, config.clone());
            return (StatusCode::OK, before);
        }
        managed.retain(|m| !mine(m));
        let mut entry = json!({
            "manager": manager, "operation": "Apply", "apiVersion": kind.api_version(),
            "time": now(), "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        });
        if status_sub {
            entry["subresource"] = json!("status");
        }
        managed.push(entry);
        obj["metadata"]["managedFields"] = Value::Array(managed);
        self.applied.insert(applied_key, config.clone());
        self.commit(key, &before, obj)
    }

    fn delete(&mut self, kind: Kind, ns: &str, name: &str) -> (StatusCode, Value) {
        let key = (kind, ns.to_string(), name.to_string());
        let Some(mut obj) = self.objects.get(&key).cloned() else {
            return not_found(kind, name);
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

fn conflict(kind: Kind, name: &str) -> (StatusCode, Value) {
    failure(
        StatusCode::CONFLICT,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            kind.resource(),
            group(kind)
        ),
    )
}

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

fn handle(
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
