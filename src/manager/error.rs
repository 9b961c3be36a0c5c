use std::io;

use crate::runtime::RuntimeError;
use crate::sys::exhaustion::Exhaustion;
use crate::task::identity::UidRange;

/// Errors of the manager layer; `api::error` maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    InvalidName(String),
    #[error("invalid task spec: {0}")]
    InvalidSpec(String),
    /// The task asks for more than `--task-policy` and the configured identity allow.
    #[error("{0}")]
    Refused(String),
    #[error("task {0} already exists")]
    AlreadyExists(String),
    /// A sync lists a task whose deletion was requested and is being carried out (as the
    /// Kubernetes API server answers a create of an object being deleted).
    #[error("task {0} is being deleted; it can be created again once it is gone")]
    BeingDeleted(String),
    #[error("task {0} not found")]
    NotFound(String),
    #[error("maximum concurrent tasks ({0}) reached")]
    TooManyTasks(usize),
    /// Every uid of `--task-uid-range` is held by a task the agent holds.
    #[error(
        "no free task uid: all {size} of --task-uid-range {range} are held by tasks of this agent; delete finished tasks to free theirs"
    )]
    NoTaskUid { range: UidRange, size: u64 },
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("task store: {0}")]
    Store(#[from] io::Error),
    /// A bug: work the manager started ended without a result.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ManagerError {
    /// The data dir's file system is read-only (EROFS): nothing can change until it is
    /// writable again.
    pub fn read_only_store(&self) -> bool {
        let os = |e: &io::Error| e.raw_os_error() == Some(nix::libc::EROFS);
        match self {
            ManagerError::Store(e) => os(e),
            ManagerError::Runtime(
                RuntimeError::Launch(e)
                | RuntimeError::OutOfResources { source: e }
                | RuntimeError::Io(e)
                | RuntimeError::Record { source: e, .. }
                | RuntimeError::Journal { source: e, .. },
            ) => os(e),
            _ => false,
        }
    }

    /// The resource the machine ran out of, when that is why this failed.
    pub fn exhaustion(&self) -> Option<Exhaustion> {
        match self {
            ManagerError::Store(e) => Exhaustion::of(e),
            ManagerError::Runtime(e) => e.exhaustion(),
            _ => None,
        }
    }
}
