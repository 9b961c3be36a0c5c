//! Container mode: `spec.container` tasks run as containers through the node's CRI
//! runtime, in the agent's pod sandbox (or one the agent owns outside a cluster).
//!
//! Files: `config` (settings, labels, the agent's id), `cri` (the RPCs used, as a trait), `sandbox` (which sandbox), `spec` (the
//! container config), `status` (CRI status → task state), `monitor` (one watcher for all
//! containers: exits, timeouts, log budget), `volumes` (volume names → host paths),
//! `own_volumes` (a pod template's emptyDir and hostPath volumes), `logs` (the log file in
//! the task dir).

pub mod config;
pub mod cri;
pub mod hardening;
pub mod logs;
pub mod monitor;
pub mod own_volumes;
pub mod sandbox;
pub mod spec;
pub mod status;
mod timed;
pub mod volumes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_cri::v1::{Container, ContainerFilter, ContainerState, ContainerStateValue};
use tokio_util::sync::CancellationToken;

pub use self::config::{ContainerRuntimeConfig, KUBE_CONTAINER_NAME_LABEL, agent_id, labels};
use self::cri::{Cri, GrpcCri, cri_error, is_not_found};
use self::monitor::{Monitor, MonitorConfig, Watch};
use self::sandbox::{SandboxMode, Sandboxes};
use self::spec::{HostMount, Namespaces};
use self::volumes::VolumeResolver;
use super::{EventSink, Observed, Readiness, Runtime, RuntimeError, TaskRef};
use crate::task::layout::TaskDir;
use crate::task::model::{TaskSpec, Terminated, reason};
use crate::task::template::{TemplateTask, VolumeSource};
use crate::task::time::Time;

#[derive(Clone)]
pub struct ContainerRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    cri: Arc<dyn Cri>,
    volumes: Arc<dyn VolumeResolver>,
    sandboxes: Sandboxes,
    monitor: Monitor,
    agent_id: String,
    socket: PathBuf,
    max_log_bytes: u64,
    /// `--task-policy restricted`: the non-root uid and gid containers run as.
    run_as: Option<(u32, u32)>,
    cancel: CancellationToken,
}

impl ContainerRuntime {
    /// Connects (lazily) to the CRI socket. Must be called inside a tokio runtime.
    pub fn connect(
        cfg: ContainerRuntimeConfig,
        volumes: Arc<dyn VolumeResolver>,
    ) -> Result<Self, RuntimeError> {
        let cri: Arc<dyn Cri> = Arc::new(GrpcCri::new(&cfg.socket)?);
        Ok(Self::new(cri, volumes, cfg))
    }

    pub fn new(
        cri: Arc<dyn Cri>,
        volumes: Arc<dyn VolumeResolver>,
        cfg: ContainerRuntimeConfig,
    ) -> Self {
        let agent_id = match &cfg.sandbox {
            SandboxMode::Owned { agent_id } => agent_id.clone(),
            SandboxMode::Pod { name, namespace } => agent_id(&format!("pod:{namespace}/{name}")),
        };
        let cancel = CancellationToken::new();
        let monitor = Monitor::spawn(
            cri.clone(),
            agent_id.clone(),
            MonitorConfig {
                poll_interval: cfg.poll_interval,
                grace: cfg.grace,
                max_log_bytes: cfg.max_log_bytes,
            },
            cancel.clone(),
        );
        ContainerRuntime {
            inner: Arc::new(Inner {
                sandboxes: Sandboxes::new(cri.clone(), cfg.sandbox.clone()),
                cri,
                volumes,
                monitor,
                agent_id,
                socket: cfg.socket,
                max_log_bytes: cfg.max_log_bytes,
                run_as: cfg.run_as,
                cancel,
            }),
        }
    }

    pub fn cri(&self) -> &Arc<dyn Cri> {
        &self.inner.cri
    }

    pub fn agent_id(&self) -> &str {
        &self.inner.agent_id
    }

    /// Stops watching and removes the agent's own sandbox if it holds no containers.
    /// Task containers keep running; the next agent re-adopts them.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        if let Err(e) = self.inner.sandboxes.shutdown().await {
            tracing::warn!(error = %e, "could not clean up the agent's pod sandbox");
        }
    }
}

/// The container to run: `spec.container`, or the one of `spec.podTemplateSpec` with the
/// template's volumes.
fn container_task(spec: &TaskSpec) -> Result<TemplateTask, RuntimeError> {
    spec.container_task()
        .unwrap_or_else(|| Err("not a container task".into()))
        .map_err(RuntimeError::Invalid)
}

impl Inner {
    /// Host paths of the container's mounts. A template's own volumes come first
    /// (`emptyDir` in the task dir `dir`; `None` while only validating), then the pod's
    /// and `--volume`'s.
    fn resolve_mounts(
        &self,
        t: &TemplateTask,
        dir: Option<&Path>,
    ) -> Result<Vec<HostMount>, RuntimeError> {
        t.container
            .volume_mounts
            .iter()
            .map(|m| {
                let own = t.volumes.iter().find(|v| v.name == m.name);
                let host = match own.map(|v| &v.source) {
                    Some(VolumeSource::HostPath { path, .. }) => Some(PathBuf::from(path)),
                    Some(VolumeSource::EmptyDir) => Some(
                        dir.map(|d| own_volumes::empty_dir(d, &m.name))
                            .unwrap_or_default(),
                    ),
                    Some(VolumeSource::Pod) | None => self.volumes.resolve(&m.name),
                };
                let host = host.ok_or_else(|| {
                    let known = self.volumes.names();
                    let known = if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    };
                    RuntimeError::Invalid(match own {
                        Some(_) => format!(
                            "podTemplateSpec: volume {:?} is neither hostPath nor emptyDir, and the pod has no volume of that name (the pod's volumes: {known})",
                            m.name
                        ),
                        None if t.from_template => format!(
                            "podTemplateSpec: volumeMounts names volume {:?}, which is neither in the template's volumes nor one of the pod's (the pod's volumes: {known})",
                            m.name
                        ),
                        None => format!(
                            "container.volumeMounts: unknown volume {:?} (known volumes: {known})",
                            m.name
                        ),
                    })
                })?;
                Ok(HostMount {
                    host_path: host,
                    container_path: m.mount_path.clone(),
                    read_only: m.read_only,
                })
            })
            .collect()
    }

    fn unreachable(&self, call: &str, s: &tonic::Status) -> RuntimeError {
        if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::DeadlineExceeded {
            RuntimeError::Cri(format!(
                "CRI runtime at {} is unreachable ({call}): {}",
                self.socket.display(),
                s.message()
            ))
        } else {
            cri_error(call, s)
        }
    }

    /// The task incarnation's containers, newest first.
    async fn find(&self, task: &TaskRef) -> Result<Vec<Container>, RuntimeError> {
        let filter = ContainerFilter {
            label_selector: HashMap::from([
                (labels::AGENT.to_string(), self.agent_id.clone()),
                (labels::UID.to_string(), task.uid.clone()),
            ]),
            ..Default::default()
        };
        let mut found = self
            .cri
            .list_containers(filter)
            .await
            .map_err(|s| self.unreachable("ListContainers", &s))?;
        found.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Ok(found)
    }

    /// The id of `target`: a kubelet container of the pod, or another of our tasks.
    async fn target_id(&self, sandbox_id: &str, target: &str) -> Result<String, RuntimeError> {
        let running = Some(ContainerStateValue {
            state: ContainerState::ContainerRunning as i32,
        });
        for selector in [
            HashMap::from([(KUBE_CONTAINER_NAME_LABEL.to_string(), target.to_string())]),
            HashMap::from([
                (labels::AGENT.to_string(), self.agent_id.clone()),
                (labels::TASK.to_string(), target.to_string()),
            ]),
        ] {
            let found = self
                .cri
                .list_containers(ContainerFilter {
                    pod_sandbox_id: sandbox_id.to_string(),
                    state: running,
                    label_selector: selector,
                    ..Default::default()
                })
                .await
                .map_err(|s| self.unreachable("ListContainers", &s))?;
            if let Some(c) = found.into_iter().max_by_key(|c| c.created_at) {
                return Ok(c.id);
            }
        }
        Err(RuntimeError::TargetNotFound {
            name: target.to_string(),
            detail: format!("no running container {target:?} in pod sandbox {sandbox_id}"),
        })
    }

    /// Pulls the image if the node lacks it; `Some(terminated)` when it can't be had.
    async fn ensure_image(&self, image: &str) -> Result<Option<Terminated>, RuntimeError> {
        let present = self
            .cri
            .image_present(image)
            .await
            .map_err(|s| self.unreachable("ImageStatus", &s))?;
        if present {
            return Ok(None);
        }
        tracing::info!(image, "pulling image");
        match self.cri.pull_image(image).await {
            Ok(_) => Ok(None),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                Err(self.unreachable("PullImage", &s))
            }
            Err(s) => {
                tracing::warn!(image, error = %s.message(), "image pull failed");
                Ok(Some(Terminated::failed_to_start(
                    reason::IMAGE_PULL_ERROR,
                    128,
                    format!("failed to pull image {image:?}: {}", s.message()),
                )))
            }
        }
    }

    /// Creates and starts the task's container.
    async fn start(&self, task: TaskRef, events: EventSink) -> Result<Observed, RuntimeError> {
        let t = container_task(&task.spec)?;
        let mounts = self.resolve_mounts(&t, Some(&task.dir))?;
        if let Some(t) = self.ensure_image(&t.container.image).await? {
            return Ok(Observed::Terminated(t));
        }
        let (dir, vols) = (task.dir.clone(), t.volumes.clone());
        crate::sys::offload::offload(move || own_volumes::prepare(&dir, &vols)).await?;
        let c = t.container;
        let sb = self.sandboxes.get().await?;
        let target_id = match c.target_container.as_deref() {
            Some(t) => Some(self.target_id(&sb.id, t).await?),
            None => None,
        };
        let ns = Namespaces {
            network: sb.network,
            ipc: sb.ipc,
            target_id,
        };
        let mut config = spec::container_config(&task, &c, &self.agent_id, mounts, &ns);
        hardening::harden(&mut config, self.run_as);
        let mut sandbox_config = sb.config.clone();
        // The runtime writes the log at <log_directory>/<log_path>: the task dir.
        sandbox_config.log_directory = task.dir.display().to_string();
        // An empty marker first: from here on a container may exist.
        write_container_id(&task.dir, "")?;
        let id = self
            .cri
            .create_container(&sb.id, config, sandbox_config)
            .await
            .map_err(|s| self.unreachable("CreateContainer", &s))?;
        write_container_id(&task.dir, &id)?;
        tracing::info!(task = %task.name, container = %id, sandbox = %sb.id, image = %c.image, "container created");
        self.start_created(task, id, events).await
    }

    /// Starts a created container and follows it.
    async fn start_created(
        &self,
        task: TaskRef,
        id: String,
        events: EventSink,
    ) -> Result<Observed, RuntimeError> {
        // Watch first, so an exit event can't slip between start and watch.
        let deadline = task
            .spec
            .effective_timeout()
            .map(|t| Time::from_unix_millis(Time::now().unix_millis() + t.saturating_mul(1000)));
        self.monitor.watch(Watch {
            container_id: id.clone(),
            task: task.clone(),
            events: events.clone(),
            deadline,
        });
        if let Err(s) = self.cri.start_container(&id).await {
            tracing::warn!(task = %task.name, container = %id, error = %s.message(), "starting the container failed");
            if s.code() == tonic::Code::Unavailable {
                self.monitor.unwatch(&id);
                return Err(self.unreachable("StartContainer", &s));
            }
        }
        self.observe(task, id, events).await
    }

    /// Reads the container's status; a running one stays watched.
    async fn observe(
        &self,
        task: TaskRef,
        id: String,
        events: EventSink,
    ) -> Result<Observed, RuntimeError> {
        let timeout = task.spec.effective_timeout();
        let resp = match self.cri.container_status(&id, false).await {
            Ok(r) => r,
            Err(s) => {
                self.monitor.unwatch(&id);
                return Err(self.unreachable("ContainerStatus", &s));
            }
        };
        let st = resp.status.unwrap_or_default();
        match status::observed(&st, timeout, false) {
            Some(Observed::Terminated(t)) => {
                self.monitor.unwatch(&id);
                let (dir, max) = (task.dir.clone(), self.max_log_bytes);
                let _ = crate::sys::offload::offload(move || logs::enforce_budget(&dir, max)).await;
                Ok(Observed::Terminated(t))
            }
            running => {
                // Re-register with the deadline from the container's real start.
                self.monitor.watch(Watch {
                    container_id: id.clone(),
                    task: task.clone(),
                    events,
                    deadline: status::deadline(&st, timeout),
                });
                Ok(running.unwrap_or(Observed::Running {
                    started_at: Some(Time::now()),
                }))
            }
        }
    }

    async fn adopt(&self, task: TaskRef, events: EventSink) -> Result<Observed, RuntimeError> {
        let found = self.find(&task).await?;
        let Some(newest) = found.first() else {
            if read_container_id(&task.dir).is_some_and(|id| !id.is_empty()) {
                tracing::warn!(task = %task.name, "the task's container is gone");
                let mut t = Terminated::failed_to_start(
                    reason::RUNTIME_ERROR,
                    137,
                    "the task's container was removed while the agent was down".into(),
                );
                t.started_at = None;
                return Ok(Observed::Terminated(t));
            }
            tracing::info!(task = %task.name, "container never created; starting it");
            return self.start(task, events).await;
        };
        let id = newest.id.clone();
        // Older duplicates (e.g. from an interrupted start) must not linger.
        for extra in &found[1..] {
            let _ = self.cri.remove_container(&extra.id).await;
        }
        let state =
            ContainerState::try_from(newest.state).unwrap_or(ContainerState::ContainerUnknown);
        tracing::info!(task = %task.name, container = %id, state = state.as_str_name(), "re-adopting container");
        if state == ContainerState::ContainerCreated {
            write_container_id(&task.dir, &id)?;
            return self.start_created(task, id, events).await;
        }
        self.observe(task, id, events).await
    }

    async fn stop(&self, task: TaskRef, grace: Duration) -> Result<(), RuntimeError> {
        if read_container_id(&task.dir).is_none() {
            // CreateContainer was never called for this task: nothing to stop, and no
            // need to reach the runtime (which may be the reason it never ran).
            return Ok(());
        }
        for c in self.find(&task).await? {
            self.monitor.unwatch(&c.id);
            if c.state != ContainerState::ContainerExited as i32
                && let Err(s) = self.cri.stop_container(&c.id, grace).await
                && !is_not_found(&s)
            {
                return Err(self.unreachable("StopContainer", &s));
            }
            if let Err(s) = self.cri.remove_container(&c.id).await
                && !is_not_found(&s)
            {
                return Err(self.unreachable("RemoveContainer", &s));
            }
            tracing::info!(task = %task.name, container = %c.id, "container removed");
        }
        Ok(())
    }

    async fn readiness(&self) -> Readiness {
        match self.cri.status().await {
            Err(s) => Readiness::NotReady(format!(
                "CRI runtime at {} is unreachable: {}",
                self.socket.display(),
                s.message()
            )),
            Ok(r) => {
                let down: Vec<String> = r
                    .status
                    .map(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| c.r#type == "RuntimeReady" && !c.status)
                    .map(|c| format!("{}: {} {}", c.r#type, c.reason, c.message))
                    .collect();
                if down.is_empty() {
                    Readiness::Ready
                } else {
                    Readiness::NotReady(format!("CRI runtime not ready: {}", down.join("; ")))
                }
            }
        }
    }
}

fn read_container_id(dir: &Path) -> Option<String> {
    std::fs::read_to_string(TaskDir(dir).container_id())
        .ok()
        .map(|s| s.trim().to_string())
}

fn write_container_id(dir: &Path, id: &str) -> Result<(), RuntimeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(TaskDir(dir).container_id())
        .and_then(|mut f| f.write_all(id.as_bytes()))
        .map_err(|source| RuntimeError::Record {
            path: TaskDir(dir).container_id().display().to_string(),
            source,
        })
}

impl Runtime for ContainerRuntime {
    fn kind(&self) -> &'static str {
        "container"
    }

    fn validate(&self, spec: &TaskSpec) -> Result<(), RuntimeError> {
        let t = container_task(spec)?;
        let at = if t.from_template {
            "podTemplateSpec.spec.containers[0]"
        } else {
            "container"
        };
        spec::check_resources(&t.container, at, spec::node_cgroup_v2())
            .map_err(RuntimeError::Invalid)?;
        self.inner.resolve_mounts(&t, None).map(|_| ())
    }

    fn start(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.start(task, events).await })
    }

    fn adopt(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.adopt(task, events).await })
    }

    fn stop(&self, task: TaskRef, grace: Duration) -> BoxFuture<'static, Result<(), RuntimeError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.stop(task, grace).await })
    }

    fn readiness(&self) -> BoxFuture<'static, Readiness> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.readiness().await })
    }
}

#[cfg(test)]
mod tests;
