//! Sidecar mode: process tasks run inside the pod's main container. The shim joins the
//! container's namespaces itself (see `child_setup`), so no nsenter or shell is needed there.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::journal::{self, Target};
use super::process::ProcessRuntime;
use super::{EventSink, Observed, Readiness, Runtime, RuntimeError, TaskRef};
use crate::sys::proc_handle::ProcHandle;
use crate::sys::procfs::ProcIdentity;
use crate::task::layout::TaskDir;
use crate::task::model::{ExecMode, TaskSpec};

/// Finds the main container's init process. Implementations: Kubernetes Pod status and
/// CRI (in `crate::kube`) in a pod, upstream's env-var scan (`sidecar_env`) outside one.
pub trait MainContainerLocator: Send + Sync + 'static {
    /// The main container's PID 1 as this agent sees it, or why it can't be found.
    fn locate(&self) -> BoxFuture<'_, Result<ProcIdentity, String>>;
}

pub use super::sidecar_env::EnvLocator;

/// A locator that can't work as configured; says why on every lookup.
pub struct Unlocatable(pub String);

impl MainContainerLocator for Unlocatable {
    fn locate(&self) -> BoxFuture<'_, Result<ProcIdentity, String>> {
        let why = self.0.clone();
        Box::pin(async move { Err(why) })
    }
}

#[derive(Clone)]
pub struct SidecarRuntime {
    process: ProcessRuntime,
    locator: Arc<dyn MainContainerLocator>,
    container: String,
    join_cgroup: bool,
    run_as_target_user: bool,
    /// Directories of tasks started or adopted here, for `target_changed`.
    tasks: Arc<Mutex<HashSet<PathBuf>>>,
}

impl SidecarRuntime {
    pub fn new(
        process: ProcessRuntime,
        locator: Arc<dyn MainContainerLocator>,
        container: String,
        join_cgroup: bool,
        run_as_target_user: bool,
    ) -> Self {
        SidecarRuntime {
            process,
            locator,
            container,
            join_cgroup,
            run_as_target_user,
            tasks: Arc::default(),
        }
    }

    fn track(&self, dir: &std::path::Path, on: bool) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            tasks.insert(dir.to_path_buf());
        } else {
            tasks.remove(dir);
        }
    }

    /// The main container was replaced (the Pod watch saw a new container ID or restart):
    /// stops every running task whose target is not the current main container, so it is
    /// reported `TargetRestarted` instead of living on in a dead container's namespaces,
    /// and what finished tasks left running there. Returns how many tasks were signalled.
    pub async fn target_changed(&self) -> usize {
        let current = self.locator.locate().await.ok();
        let dirs: Vec<PathBuf> = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let container = self.container.clone();
        let (signalled, finished) = crate::sys::offload::offload(move || {
            let mut signalled = 0;
            let mut finished = Vec::new();
            for dir in dirs {
                match stop_if_stale(&dir, current.as_ref()) {
                    Some(true) => signalled += 1,
                    Some(false) => {}
                    None => finished.push(dir),
                }
            }
            (signalled, finished)
        })
        .await;
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            for d in &finished {
                tasks.remove(d);
            }
        }
        tracing::info!(container = %container, stopped = signalled, "main container replaced; stopped tasks in the old one");
        signalled
    }

    async fn launch(&self, task: TaskRef, events: EventSink) -> Result<Observed, RuntimeError> {
        // Resolved on every start: a PID is never trusted past its container's life. A
        // task that runs in the agent's container comes here only for a hook that runs
        // in the main container; that hook fails if it is not found, the task starts.
        let located = self.locator.locate().await;
        let target = |process| Target {
            container: self.container.clone(),
            process,
            join_cgroup: self.join_cgroup,
            run_as_target_user: self.run_as_target_user,
        };
        let not_found = |detail: String| RuntimeError::TargetNotFound {
            name: self.container.clone(),
            detail,
        };
        let hook_target = Some(
            located
                .clone()
                .map(target)
                .map_err(|d| not_found(d).to_string()),
        );
        let main = match task.exec_mode {
            ExecMode::Remote => Some(target(located.map_err(not_found)?)),
            ExecMode::Local => None,
        };
        self.track(&task.dir, true);
        self.process.launch(task, main, hook_target, events).await
    }
}

impl Runtime for SidecarRuntime {
    fn kind(&self) -> &'static str {
        "sidecar"
    }

    fn validate(&self, spec: &TaskSpec) -> Result<(), RuntimeError> {
        // Something of the task runs in the main container (here only such tasks come),
        // as the main container's user, never as a uid of the task's own.
        let asked = spec
            .process
            .as_ref()
            .and_then(|p| p.resources.as_ref())
            .is_some_and(|r| !r.is_empty());
        if asked && self.join_cgroup {
            return Err(RuntimeError::Invalid(
                "process.resources: this agent can't enforce them for a task with commands in \
                 the main container: --sidecar-join-cgroup moves those into the main \
                 container's cgroups, out of the task's own"
                    .into(),
            ));
        }
        self.process.plan_limits(spec, (2, false), false).map(drop)
    }

    fn start(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        let rt = self.clone();
        Box::pin(async move { rt.launch(task, events).await })
    }

    fn adopt(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        let rt = self.clone();
        Box::pin(async move {
            rt.track(&task.dir, true);
            match rt.process.recover(task.clone(), events.clone()).await {
                Some(observed) => observed,
                None => rt.launch(task, events).await,
            }
        })
    }

    fn stop(&self, task: TaskRef, grace: Duration) -> BoxFuture<'static, Result<(), RuntimeError>> {
        self.track(&task.dir, false);
        self.process.stop_task(task, grace)
    }

    fn finished(&self, task: &TaskRef) -> Option<Observed> {
        let observed = self.process.finished_run(task)?;
        // Tracked as `adopt` would: what a finished task left running in a replaced main
        // container is still stopped.
        self.track(&task.dir, true);
        Some(observed)
    }

    fn readiness(&self) -> BoxFuture<'static, Readiness> {
        let rt = self.clone();
        Box::pin(async move {
            if let Readiness::NotReady(why) = rt.process.own_readiness() {
                return Readiness::NotReady(why);
            }
            match rt.locator.locate().await {
                Ok(_) => Readiness::Ready,
                Err(e) => {
                    Readiness::NotReady(format!("main container {:?} not found: {e}", rt.container))
                }
            }
        })
    }
}

/// Stops the task in `dir` if it runs in a container other than `current`: writes the
/// `target-restarted` marker, then SIGTERMs the shim (which stops the task tree). A
/// finished task's shim that still lives (the task left processes running) is SIGTERMed
/// too, without the marker. `None`: nothing of the task is left to watch.
fn stop_if_stale(dir: &std::path::Path, current: Option<&ProcIdentity>) -> Option<bool> {
    let run = journal::read_run(dir).ok()?;
    if !dir.exists() {
        return None;
    }
    let finished = run.exit.is_some();
    // Records not written yet: the task is starting; keep tracking it.
    let (Some(shim), Some(launch)) = (run.started, run.launch) else {
        return (!finished).then_some(false);
    };
    let target = launch.target?;
    let Some(shim_handle) = ProcHandle::of(&shim.shim) else {
        // A finished task whose shim is gone left nothing behind it could stop.
        return (!finished).then_some(false);
    };
    if current == Some(&target.process) {
        return Some(false);
    }
    if finished {
        // Its shim still supervises what the task left running in the old container:
        // SIGTERM ends that (grace, then SIGKILL); the task's outcome stays as recorded.
        let _ = shim_handle.signal(nix::sys::signal::Signal::SIGTERM);
        tracing::info!(dir = %dir.display(), shim = shim.shim.pid, "stopping what a finished task left in a replaced main container");
        return Some(true);
    }
    use std::os::unix::fs::OpenOptionsExt;
    let marked = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(TaskDir(dir).target_restarted());
    if let Err(e) = marked {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot mark the task as target-restarted");
    }
    let _ = shim_handle.signal(nix::sys::signal::Signal::SIGTERM);
    tracing::info!(dir = %dir.display(), shim = shim.shim.pid, "stopping a task whose main container was replaced");
    Some(true)
}
