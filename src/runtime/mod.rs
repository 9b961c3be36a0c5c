//! Runtimes run a task somewhere: as a host process, inside the main container, or as a
//! CRI container. They share one trait so the manager never knows which one it drives.

pub mod child_setup; // the crate's only `unsafe`: the permission to fork, task spawn, fd hygiene
#[forbid(unsafe_code)]
pub mod container;
#[forbid(unsafe_code)]
pub mod containment; // a cgroup per process task: ending all of it, proving it gone
#[forbid(unsafe_code)]
pub mod error;
#[forbid(unsafe_code)]
pub mod exit_watch;
#[forbid(unsafe_code)]
pub mod first_use;
#[forbid(unsafe_code)]
pub mod journal; // a process task's run journal: its lines, their rules, following it
#[forbid(unsafe_code)]
pub mod launcher;
#[forbid(unsafe_code)]
pub mod limits; // resource limits and usage per process task, through its cgroups
#[forbid(unsafe_code)]
pub mod outcome;
#[forbid(unsafe_code)]
pub mod process;
#[forbid(unsafe_code)]
pub mod reaper;
#[forbid(unsafe_code)]
pub mod shim;
#[forbid(unsafe_code)]
pub mod sidecar;
#[forbid(unsafe_code)]
pub mod sidecar_env;
#[forbid(unsafe_code)]
pub mod tasklog;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

pub use error::RuntimeError;

use crate::task::model::{
    ExecMode, HookName, HookStatuses, ResourceUsage, TaskSpec, Terminated, Waiting,
};
use crate::task::time::Time;

/// What a runtime needs to know about one incarnation of a task.
#[derive(Clone, Debug)]
pub struct TaskRef {
    pub name: String,
    /// Unique per incarnation, so a late event never touches a re-created task of the same name.
    pub uid: String,
    /// The task's own directory under the data dir (records, logs).
    pub dir: PathBuf,
    pub spec: TaskSpec,
    /// Where its process runs (decided when it was created; `Local` for container tasks).
    pub exec_mode: ExecMode,
    /// Its own uid (from `--task-uid-range`) for its commands in the agent's container,
    /// instead of the agent's default user; its securityContext still wins.
    pub host_uid: Option<u32>,
}

/// A state a runtime observed.
#[derive(Clone, Debug, PartialEq)]
pub enum Observed {
    /// Not started yet, for the reason given (its `preStart` hook runs, say).
    Waiting(Waiting),
    Running {
        /// `None`: unknown (see `model::Running`).
        started_at: Option<Time>,
    },
    Terminated(Terminated),
    /// One of the above, with how the task's lifecycle hooks are or ended.
    WithHooks(Box<Observed>, HookStatuses),
    /// One of the above (hooks included), with what the task used (its end's).
    WithUsage(Box<Observed>, ResourceUsage),
}

/// Sent by a runtime when a task's state changes after `start`/`adopt` returned.
#[derive(Clone, Debug)]
pub struct RuntimeEvent {
    pub name: String,
    pub uid: String,
    pub observed: Observed,
}

pub type EventSink = mpsc::UnboundedSender<RuntimeEvent>;

/// Readiness of a runtime's dependencies (main container found, CRI socket reachable).
#[derive(Clone, Debug, PartialEq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

pub trait Runtime: Send + Sync + 'static {
    /// Short name for logs and errors ("process", "sidecar", "container").
    fn kind(&self) -> &'static str;

    /// Checks what only this runtime can judge (e.g. volume names); an error is a 400.
    fn validate(&self, spec: &TaskSpec) -> Result<(), RuntimeError>;

    /// Starts the task and returns once it runs or has failed to start. Later changes are
    /// sent to `events`.
    fn start(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>>;

    /// Re-attaches to a task after an agent restart, starting it if it never started.
    fn adopt(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>>;

    /// Stops everything the task started (grace, then force) and releases its resources.
    /// Returns when nothing of it is left.
    fn stop(&self, task: TaskRef, grace: Duration) -> BoxFuture<'static, Result<(), RuntimeError>>;

    /// How a task found after a restart ended, when its own files say its run is over
    /// (nothing of it runs or is left to follow, so `adopt` would only read the same):
    /// the caller shows this and adopts it no further. `None`: it is adopted. Blocking,
    /// but never waits and writes nothing, so that a restart settles its finished tasks
    /// in a few off-loaded jobs instead of one per task.
    fn finished(&self, _task: &TaskRef) -> Option<Observed> {
        None
    }

    fn readiness(&self) -> BoxFuture<'static, Readiness> {
        Box::pin(async { Readiness::Ready })
    }
}

/// The runtimes an agent has, chosen per task: container tasks (`container`,
/// `podTemplateSpec`) by the container runtime; process tasks by their exec mode, `Local`
/// on the host runtime and `Remote` inside the main container.
#[derive(Clone)]
pub struct Runtimes {
    /// `Local` process tasks: in the agent's own container.
    pub host: Arc<dyn Runtime>,
    /// `Remote` process tasks: inside the pod's main container. Built in every agent, as
    /// any task may ask for it.
    pub sidecar: Arc<dyn Runtime>,
    pub container: Option<Arc<dyn Runtime>>,
    /// The exec mode of a process task that sets none (`--enable-sidecar-mode`: `Remote`).
    pub default_exec_mode: ExecMode,
}

impl Runtimes {
    /// One runtime for every process task (tests).
    pub fn single(process: Arc<dyn Runtime>) -> Self {
        Runtimes {
            host: process.clone(),
            sidecar: process,
            container: None,
            default_exec_mode: ExecMode::Local,
        }
    }

    /// Where a new process task runs: its own exec mode, else the agent's default. `None`
    /// for container tasks.
    pub fn exec_mode_for(&self, spec: &TaskSpec) -> Option<ExecMode> {
        if spec.is_container_task() {
            return None;
        }
        let own = spec.process.as_ref().and_then(|p| p.exec_mode);
        Some(own.unwrap_or(self.default_exec_mode))
    }

    /// The runtime of a task: `decided` is the exec mode recorded when it was created
    /// (absent in older records: decided now, as then).
    pub fn for_task(
        &self,
        spec: &TaskSpec,
        decided: Option<ExecMode>,
    ) -> Result<&Arc<dyn Runtime>, RuntimeError> {
        if spec.is_container_task() {
            return self
                .container
                .as_ref()
                .ok_or(RuntimeError::ContainerModeDisabled);
        }
        let mode = decided
            .or_else(|| self.exec_mode_for(spec))
            .unwrap_or(ExecMode::Local);
        // A task with a hook inside the main container needs the runtime that finds it.
        let remote_hook = spec.lifecycle_hooks().is_some_and(|l| {
            HookName::ALL
                .iter()
                .filter_map(|h| l.hook(*h))
                .any(|h| h.exec_mode() == ExecMode::Remote)
        });
        match mode {
            ExecMode::Remote => Ok(&self.sidecar),
            ExecMode::Local if remote_hook => Ok(&self.sidecar),
            ExecMode::Local => Ok(&self.host),
        }
    }

    /// The runtime a new task would get.
    pub fn for_spec(&self, spec: &TaskSpec) -> Result<&Arc<dyn Runtime>, RuntimeError> {
        self.for_task(spec, None)
    }

    /// The runtimes whose dependencies the agent's readiness stands for: the default
    /// process runtime, and the container runtime. (A `Remote` task in a host-mode agent
    /// ends `TargetNotFound` when there is no main container; the agent stays ready.)
    pub fn gating(&self) -> impl Iterator<Item = &Arc<dyn Runtime>> {
        let process = match self.default_exec_mode {
            ExecMode::Local => &self.host,
            ExecMode::Remote => &self.sidecar,
        };
        std::iter::once(process).chain(self.container.iter())
    }
}
