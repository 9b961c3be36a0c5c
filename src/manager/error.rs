use std::io;

use crate::runtime::RuntimeError;
use crate::task::exhaustion::Exhaustion;
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
    /// The resource the machine ran out of, when that is why this failed.
    pub fn exhaustion(&self) -> Option<Exhaustion> {
        match self {
            ManagerError::Store(e) => Exhaustion::of(e),
            ManagerError::Runtime(e) => e.exhaustion(),
            _ => None,
        }
    }
}
