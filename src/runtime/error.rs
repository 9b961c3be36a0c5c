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
    /// The task was not started because the machine ran out of something (processes,
    /// file descriptors, memory, disk): nothing of it ran, so starting it later is safe.
    #[error("could not start the task: out of {}: {source}", crate::sys::exhaustion::Exhaustion::of(.source).map_or("resources", |x| x.what()))]
    OutOfResources {
        #[source]
        source: io::Error,
    },
    #[error("task record {path}: {source}")]
    Record {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The task was handed to its supervisor (or found handed) but its run journal could
    /// not be read or written (out of descriptors, say): the journal alone says how the
    /// task is, so the caller looks again later and never records an end of its own.
    #[error("run journal {path}: {source}")]
    Journal {
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
    /// The resource the machine ran out of, when that is why this failed (for the API's
    /// answer). Only `OutOfResources` also says that the task did not start.
    pub fn exhaustion(&self) -> Option<crate::sys::exhaustion::Exhaustion> {
        match self {
            RuntimeError::OutOfResources { source: e }
            | RuntimeError::Launch(e)
            | RuntimeError::Io(e)
            | RuntimeError::Record { source: e, .. }
            | RuntimeError::Journal { source: e, .. } => crate::sys::exhaustion::Exhaustion::of(e),
            _ => None,
        }
    }

    /// A failure to hand the task to its supervisor, before anything of it could run:
    /// `OutOfResources` when the machine ran out of something, else `Launch`.
    pub fn before_launch(e: io::Error) -> Self {
        if crate::sys::exhaustion::Exhaustion::of(&e).is_some() {
            RuntimeError::OutOfResources { source: e }
        } else {
            RuntimeError::Launch(e)
        }
    }

    /// The status reason a task shows when this error ends it.
    pub fn task_reason(&self) -> &'static str {
        use crate::task::model::reason;
        match self {
            RuntimeError::TargetNotFound { .. } => reason::TARGET_NOT_FOUND,
            RuntimeError::Cri(_) => reason::RUNTIME_ERROR,
            _ => reason::START_FAILED,
        }
    }
}
