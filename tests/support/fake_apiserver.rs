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
//! Served paths (namespaced only, and the two review endpoints of `fake_reviews`):
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
#[path = "fake_apiserver/serve.rs"]
mod serve;
#[path = "fake_apiserver/state.rs"]
mod state;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use warp::Filter;
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
    reviews: super::fake_reviews::Reviews,
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
                            serve::handle(&st, m, p.as_str(), &q, ct.unwrap_or_default(), &b)
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

    /// The TokenReview / SubjectAccessReview answers (`support::fake_reviews`).
    pub fn reviews<T>(&self, f: impl FnOnce(&mut super::fake_reviews::Reviews) -> T) -> T {
        f(&mut self.state().reviews)
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
