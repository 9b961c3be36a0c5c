//! Tasks: the model, their durable store, and the manager that drives them.

pub mod fsutil;
pub mod manager;
pub mod model;
pub mod name;
pub mod store;
pub mod time;

use crate::runtime::RuntimeError;

/// Errors of the task layer; `api::error` maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    InvalidName(String),
    #[error("invalid task spec: {0}")]
    InvalidSpec(String),
    #[error("task {0} already exists")]
    AlreadyExists(String),
    #[error("task {0} not found")]
    NotFound(String),
    #[error("maximum concurrent tasks ({0}) reached")]
    TooManyTasks(usize),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("task store: {0}")]
    Store(#[from] std::io::Error),
}
