use std::io;

/// Errors of the runtime layer.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spec can't run on this runtime (a 400 at the API).
    #[error("{0}")]
    Invalid(String),
    #[error(
        "container tasks need container mode: start the agent with --enable-container-mode=true"
    )]
    ContainerModeDisabled,
    #[error("main container {name:?} not found: {detail}")]
    TargetNotFound { name: String, detail: String },
    #[error("failed to launch the task supervisor: {0}")]
    Launch(#[source] io::Error),
    #[error("task record {path}: {source}")]
    Record {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("CRI runtime: {0}")]
    Cri(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl RuntimeError {
    /// The status reason a task shows when this error ends it.
    pub fn task_reason(&self) -> &'static str {
        use crate::task::model::reason;
        match self {
            RuntimeError::TargetNotFound { .. } => reason::TARGET_NOT_FOUND,
            RuntimeError::Cri(_) => reason::RUNTIME_ERROR,
            _ => reason::START_ERROR,
        }
    }
}
