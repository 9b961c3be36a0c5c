//! In-process test fixtures for the Task watcher: an API server verifier on a tower-test
//! mock (kube-rs/controller-rs's pattern: each test scripts the requests it expects and
//! answers them), a runtime that runs nothing, and builders.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::Client;
use ::kube::client::Body;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::TaskWatcher;
use crate::kube::crd::{FINALIZER, Task};
use crate::kube::events::{EventSink, TaskEvent};
use crate::manager::{Manager, ManagerConfig};
use crate::runtime::{
    EventSink as RuntimeSink, Observed, Runtime, RuntimeError, RuntimeEvent, Runtimes, TaskRef,
};
use crate::task::model::{TaskSpec, Terminated};
use crate::task::store::Store;
use crate::task::time::Time;

pub const NS: &str = "sandbox";
pub const POD: &str = "pod-1";
pub const TASKS: &str = "/apis/task-executor.io/v1alpha1/namespaces/sandbox/tasks";

/// A runtime that starts nothing: a task "runs" until the test ends it with [`exit`].
///
/// [`exit`]: FakeRuntime::exit
#[derive(Default)]
pub struct FakeRuntime {
    pub started: Mutex<Vec<String>>,
    pub stopped: Mutex<Vec<String>>,
    sinks: Mutex<HashMap<String, (String, RuntimeSink)>>,
}

impl FakeRuntime {
    pub fn started(&self) -> Vec<String> {
        self.started.lock().unwrap().clone()
    }

    pub fn stopped(&self) -> Vec<String> {
        self.stopped.lock().unwrap().clone()
    }

    /// Ends the running task `name` with `code`.
    pub fn exit(&self, name: &str, code: i32) {
        let (uid, sink) = self.sinks.lock().unwrap().get(name).cloned().unwrap();
        let t = Terminated::from_exit(Some(code), None, Some(Time::now()), Time::now());
        sink.send(RuntimeEvent {
            name: name.into(),
            uid,
            observed: Observed::Terminated(t),
        })
        .unwrap();
    }
}

impl Runtime for Arc<FakeRuntime> {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn validate(&self, _: &TaskSpec) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn start(
        &self,
        task: TaskRef,
        events: RuntimeSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        self.started.lock().unwrap().push(task.name.clone());
        self.sinks
            .lock()
            .unwrap()
            .insert(task.name, (task.uid, events));
        Box::pin(async {
            Ok(Observed::Running {
                started_at: Some(Time::now()),
            })
        })
    }

    fn adopt(
        &self,
        task: TaskRef,
        events: RuntimeSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        self.start(task, events)
    }

    fn stop(&self, task: TaskRef, _: Duration) -> BoxFuture<'static, Result<(), RuntimeError>> {
        self.stopped.lock().unwrap().push(task.name);
        Box::pin(async { Ok(()) })
    }
}

/// A watcher on a mock API server, a manager over a [`FakeRuntime`], and the events queue.
pub struct Fixture {
    pub watcher: Arc<TaskWatcher>,
    pub manager: Arc<Manager>,
    pub runtime: Arc<FakeRuntime>,
    pub api: ApiServerVerifier,
    pub events: mpsc::Receiver<(k8s_openapi::api::core::v1::ObjectReference, TaskEvent)>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(max_concurrent: Option<usize>) -> Fixture {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NS);
        let dir = tempfile::tempdir().unwrap();
        let runtime = Arc::new(FakeRuntime::default());
        let manager = Manager::new(
            Store::open(dir.path()).unwrap(),
            Runtimes::single(Arc::new(runtime.clone())),
            ManagerConfig {
                stop_grace: Duration::from_secs(1),
                max_concurrent,
                start_retry: Duration::from_secs(1),
                task_uids: None,
                policy: Default::default(),
            },
        );
        let (sink, events) = EventSink::channel();
        let watcher = TaskWatcher::new(
            ::kube::Api::namespaced(client, NS),
            NS.into(),
            POD.into(),
            manager.clone(),
            sink,
        );
        Fixture {
            watcher,
            manager,
            runtime,
            api: ApiServerVerifier(handle),
            events,
            _dir: dir,
        }
    }

    /// Reasons of the events published so far.
    pub fn event_reasons(&mut self) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok((_, ev)) = self.events.try_recv() {
            out.push(ev.reason);
        }
        out
    }
}

/// A Task for [`POD`], with our finalizer when `finalized`.
pub fn task(name: &str, command: &[&str], finalized: bool) -> Task {
    let mut t: Task = serde_json::from_value(json!({
        "apiVersion": "task-executor.io/v1alpha1", "kind": "Task",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                     "generation": 1, "resourceVersion": "7",
                     "labels": {"task-executor.io/pod": POD}},
        "spec": {"podName": POD, "process": {"command": command}}
    }))
    .unwrap();
    if finalized {
        t.metadata.finalizers = Some(vec![FINALIZER.into()]);
    }
    t
}

/// `t` with the status the agent would have written for it.
pub fn with_status(mut t: Task, status: Value) -> Task {
    t.status = Some(serde_json::from_value(status).unwrap());
    t
}

/// `t` being deleted.
pub fn deleting(mut t: Task) -> Task {
    t.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    t
}

/// One request the watcher sent, and the means to answer it.
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
    respond: tower_test::mock::SendResponse<Response<Body>>,
}

impl Call {
    pub fn param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then(|| v.to_string())
        })
    }

    pub fn answer(self, code: StatusCode, body: Value) {
        let resp = Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        self.respond.send_response(resp);
    }

    /// Answers with `obj` as the API server would return it.
    pub fn ok(self, obj: &Task) {
        let v = serde_json::to_value(obj).unwrap();
        self.answer(StatusCode::OK, v);
    }

    pub fn fail(self, code: StatusCode, reason: &str) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": reason, "reason": reason,
                            "code": code.as_u16()});
        self.answer(code, status);
    }
}

/// The scripted API server: each test takes the requests it expects, in order.
pub struct ApiServerVerifier(tower_test::mock::Handle<Request<Body>, Response<Body>>);

impl ApiServerVerifier {
    /// The next request; panics if none comes within 5 s.
    pub async fn next(&mut self) -> Call {
        let (req, respond) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .expect("no request within 5s")
            .expect("the client is gone");
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        Call {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            content_type: parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            respond,
        }
    }

    /// Panics if a request comes within `quiet`.
    pub async fn nothing_for(&mut self, quiet: Duration) {
        if let Ok(Some((req, _))) = tokio::time::timeout(quiet, self.0.next_request()).await {
            panic!("unexpected request: {} {}", req.method(), req.uri());
        }
    }
}
