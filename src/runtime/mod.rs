//! Runtimes run a task somewhere: as a host process, inside the main container, or as a
//! CRI container. They share one trait so the manager never knows which one it drives.

pub mod child_setup; // the crate's only `unsafe`: fork licence, task spawn, fd hygiene
#[forbid(unsafe_code)]
pub mod container;
#[forbid(unsafe_code)]
pub mod error;
#[forbid(unsafe_code)]
pub mod exit_watch;
#[forbid(unsafe_code)]
pub mod launcher;
#[forbid(unsafe_code)]
pub mod outcome;
#[forbid(unsafe_code)]
pub mod proc_handle;
#[forbid(unsafe_code)]
pub mod process;
#[forbid(unsafe_code)]
pub mod procfs;
#[forbid(unsafe_code)]
pub mod reaper;
#[forbid(unsafe_code)]
pub mod records;
#[forbid(unsafe_code)]
pub mod shim;
#[forbid(unsafe_code)]
pub mod sidecar;
#[forbid(unsafe_code)]
pub mod tasklog;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

pub use error::RuntimeError;

use crate::task::model::{TaskSpec, Terminated};
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
}

/// A state a runtime observed.
#[derive(Clone, Debug, PartialEq)]
pub enum Observed {
    Running { started_at: Time },
    Terminated(Terminated),
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

    fn readiness(&self) -> BoxFuture<'static, Readiness> {
        Box::pin(async { Readiness::Ready })
    }
}

/// The runtimes an agent has, chosen per task by its spec.
#[derive(Clone)]
pub struct Runtimes {
    pub process: Arc<dyn Runtime>,
    pub container: Option<Arc<dyn Runtime>>,
}

impl Runtimes {
    pub fn for_spec(&self, spec: &TaskSpec) -> Result<&Arc<dyn Runtime>, RuntimeError> {
        if spec.container.is_some() {
            self.container
                .as_ref()
                .ok_or(RuntimeError::ContainerModeDisabled)
        } else {
            Ok(&self.process)
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Runtime>> {
        std::iter::once(&self.process).chain(self.container.iter())
    }
}
