//! Error and recovery paths of the container runtime against a fake at the `Cri` trait.
//! (The happy paths run against a real containerd in tests/containerd/container.rs.)

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use k8s_cri::v1::*;
use tonic::Status;

use super::cri::{Cri, CriResult};
use super::sandbox::SandboxMode;
use super::volumes::StaticVolumes;
use super::*;
use crate::task::model::{ContainerSpec, TaskSpec};

#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    images: Mutex<HashSet<String>>,
    containers: Mutex<HashMap<String, ContainerStatus>>,
    /// RPC name → the error it answers with.
    fail: Mutex<HashMap<&'static str, Status>>,
}

impl Fake {
    fn call(&self, name: &'static str) -> CriResult<()> {
        self.calls.lock().unwrap().push(name.to_string());
        match self.fail.lock().unwrap().get(name) {
            Some(s) => Err(s.clone()),
            None => Ok(()),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn add(&self, id: &str, uid: &str, state: ContainerState) {
        let labels = HashMap::from([
            (labels::UID.to_string(), uid.to_string()),
            (labels::AGENT.to_string(), "agent".to_string()),
        ]);
        self.containers.lock().unwrap().insert(
            id.into(),
            ContainerStatus {
                id: id.into(),
                state: state as i32,
                labels,
                ..Default::default()
            },
        );
    }
}

fn ready<T: Send + 'static>(v: CriResult<T>) -> BoxFuture<'static, CriResult<T>> {
    Box::pin(async move { v })
}

impl Cri for Fake {
    fn version(&self) -> BoxFuture<'_, CriResult<VersionResponse>> {
        ready(self.call("Version").map(|_| VersionResponse::default()))
    }
    fn status(&self) -> BoxFuture<'_, CriResult<StatusResponse>> {
        ready(self.call("Status").map(|_| StatusResponse::default()))
    }
    fn image_present(&self, image: &str) -> BoxFuture<'_, CriResult<bool>> {
        let present = self.images.lock().unwrap().contains(image);
        ready(self.call("ImageStatus").map(|_| present))
    }
    fn pull_image(&self, image: &str) -> BoxFuture<'_, CriResult<String>> {
        let r = self.call("PullImage").map(|_| image.to_string());
        if r.is_ok() {
            self.images.lock().unwrap().insert(image.into());
        }
        ready(r)
    }
    fn run_pod_sandbox(&self, _: PodSandboxConfig) -> BoxFuture<'_, CriResult<String>> {
        ready(self.call("RunPodSandbox").map(|_| "sb1".to_string()))
    }
    fn stop_pod_sandbox(&self, _: &str) -> BoxFuture<'_, CriResult<()>> {
        ready(self.call("StopPodSandbox"))
    }
    fn remove_pod_sandbox(&self, _: &str) -> BoxFuture<'_, CriResult<()>> {
        ready(self.call("RemovePodSandbox"))
    }
    fn pod_sandbox_status(
        &self,
        _: &str,
        _: bool,
    ) -> BoxFuture<'_, CriResult<PodSandboxStatusResponse>> {
        ready(
            self.call("PodSandboxStatus")
                .map(|_| PodSandboxStatusResponse {
                    status: Some(PodSandboxStatus::default()),
                    ..Default::default()
                }),
        )
    }
    fn list_pod_sandbox(&self, _: PodSandboxFilter) -> BoxFuture<'_, CriResult<Vec<PodSandbox>>> {
        ready(self.call("ListPodSandbox").map(|_| Vec::new()))
    }
    fn create_container(
        &self,
        _: &str,
        config: ContainerConfig,
        _: PodSandboxConfig,
    ) -> BoxFuture<'_, CriResult<String>> {
        let r = self.call("CreateContainer");
        if r.is_ok() {
            let uid = config.labels[labels::UID].clone();
            self.add("new", &uid, ContainerState::ContainerCreated);
        }
        ready(r.map(|_| "new".to_string()))
    }
    fn start_container(&self, id: &str) -> BoxFuture<'_, CriResult<()>> {
        let r = self.call("StartContainer");
        if r.is_ok()
            && let Some(c) = self.containers.lock().unwrap().get_mut(id)
        {
            c.state = ContainerState::ContainerRunning as i32;
            c.started_at = 1_000_000_000;
        }
        ready(r)
    }
    fn stop_container(&self, _: &str, _: Duration) -> BoxFuture<'_, CriResult<()>> {
        ready(self.call("StopContainer"))
    }
    fn remove_container(&self, id: &str) -> BoxFuture<'_, CriResult<()>> {
        self.containers.lock().unwrap().remove(id);
        ready(self.call("RemoveContainer"))
    }
    fn list_containers(&self, f: ContainerFilter) -> BoxFuture<'_, CriResult<Vec<Container>>> {
        let found = self
            .containers
            .lock()
            .unwrap()
            .values()
            .filter(|c| {
                f.label_selector
                    .iter()
                    .all(|(k, v)| c.labels.get(k) == Some(v))
            })
            .map(|c| Container {
                id: c.id.clone(),
                state: c.state,
                labels: c.labels.clone(),
                ..Default::default()
            })
            .collect();
        ready(self.call("ListContainers").map(|_| found))
    }
    fn container_status(
        &self,
        id: &str,
        _: bool,
    ) -> BoxFuture<'_, CriResult<ContainerStatusResponse>> {
        let st = self.containers.lock().unwrap().get(id).cloned();
        ready(self.call("ContainerStatus").and_then(|_| match st {
            Some(s) => Ok(ContainerStatusResponse {
                status: Some(s),
                ..Default::default()
            }),
            None => Err(Status::not_found("no such container")),
        }))
    }
    fn reopen_container_log(&self, _: &str) -> BoxFuture<'_, CriResult<()>> {
        ready(self.call("ReopenContainerLog"))
    }
    fn container_events(
        &self,
    ) -> BoxFuture<'_, CriResult<BoxStream<'static, CriResult<ContainerEventResponse>>>> {
        ready(Err(Status::unimplemented("no events")))
    }
}

struct Setup {
    fake: Arc<Fake>,
    rt: ContainerRuntime,
    task: TaskRef,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let fake = Arc::new(Fake::default());
    let rt = ContainerRuntime::new(
        fake.clone(),
        Arc::new(StaticVolumes::default()),
        ContainerRuntimeConfig {
            socket: "/run/fake.sock".into(),
            sandbox: SandboxMode::Owned {
                agent_id: "agent".into(),
            },
            poll_interval: Duration::from_millis(50),
            grace: Duration::from_secs(1),
            max_log_bytes: 1 << 20,
            run_as: None,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let task = TaskRef {
        name: "t".into(),
        uid: "u1".into(),
        dir: dir.path().to_path_buf(),
        spec: TaskSpec {
            container: Some(ContainerSpec {
                image: "example.com/img:1".into(),
                command: vec!["true".into()],
                ..Default::default()
            }),
            ..Default::default()
        },
        exec_mode: crate::task::model::ExecMode::Local,
        host_uid: None,
    };
    Setup {
        fake,
        rt,
        task,
        _dir: dir,
    }
}

fn sink() -> EventSink {
    tokio::sync::mpsc::unbounded_channel().0
}

#[tokio::test]
async fn failed_pull_terminates_with_err_image_pull_naming_the_image() {
    let s = setup();
    s.fake
        .fail
        .lock()
        .unwrap()
        .insert("PullImage", Status::unknown("manifest unknown"));
    let o = s.rt.start(s.task.clone(), sink()).await.unwrap();
    let Observed::Terminated(t) = o else {
        panic!("{o:?}")
    };
    assert_eq!(t.reason, "ErrImagePull");
    let msg = t.message.unwrap();
    assert!(
        msg.contains("example.com/img:1") && msg.contains("manifest unknown"),
        "{msg}"
    );
    assert!(!s.fake.calls().contains(&"CreateContainer".to_string()));
    // Nothing was created, so deleting the task needs no CRI call.
    let before = s.fake.calls().len();
    s.rt.stop(s.task.clone(), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(s.fake.calls().len(), before);
}

#[tokio::test]
async fn unreachable_runtime_is_an_error_naming_the_socket() {
    let s = setup();
    s.fake
        .fail
        .lock()
        .unwrap()
        .insert("ImageStatus", Status::unavailable("connection refused"));
    let err = s.rt.start(s.task.clone(), sink()).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("/run/fake.sock") && msg.contains("unreachable"),
        "{msg}"
    );
    assert_eq!(err.task_reason(), "RuntimeError");
    s.fake
        .fail
        .lock()
        .unwrap()
        .insert("Status", Status::unavailable("connection refused"));
    match s.rt.readiness().await {
        Readiness::NotReady(why) => assert!(why.contains("/run/fake.sock"), "{why}"),
        r => panic!("{r:?}"),
    }
}

#[tokio::test]
async fn adopt_starts_a_half_created_container() {
    let s = setup();
    s.fake.add("c1", "u1", ContainerState::ContainerCreated);
    let o = s.rt.adopt(s.task.clone(), sink()).await.unwrap();
    assert!(matches!(o, Observed::Running { .. }), "{o:?}");
    let calls = s.fake.calls();
    assert!(calls.contains(&"StartContainer".to_string()), "{calls:?}");
    assert!(!calls.contains(&"CreateContainer".to_string()), "{calls:?}");
}

#[tokio::test]
async fn adopt_starts_a_never_created_task_and_reports_a_vanished_one() {
    let s = setup();
    s.fake
        .images
        .lock()
        .unwrap()
        .insert("example.com/img:1".into());
    let o = s.rt.adopt(s.task.clone(), sink()).await.unwrap();
    assert!(matches!(o, Observed::Running { .. }), "{o:?}");
    assert!(s.fake.calls().contains(&"CreateContainer".to_string()));
    // The container disappears behind the agent's back.
    s.fake.containers.lock().unwrap().clear();
    let o = s.rt.adopt(s.task.clone(), sink()).await.unwrap();
    let Observed::Terminated(t) = o else {
        panic!("{o:?}")
    };
    assert_eq!(t.reason, "RuntimeError");
}

#[tokio::test]
async fn adopt_reports_the_real_exit_of_an_exited_container() {
    let s = setup();
    s.fake.add("c1", "u1", ContainerState::ContainerExited);
    if let Some(c) = s.fake.containers.lock().unwrap().get_mut("c1") {
        c.exit_code = 42;
        c.started_at = 1_000_000_000;
        c.finished_at = 2_000_000_000;
    }
    let Observed::Terminated(t) = s.rt.adopt(s.task.clone(), sink()).await.unwrap() else {
        panic!()
    };
    assert_eq!((t.exit_code, t.reason.as_str()), (42, "Failed"));
}
