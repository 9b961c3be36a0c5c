//! Errors of the Kubernetes layer.

use crate::manager::ManagerError;

/// What can go wrong talking to the API server or resolving the main container.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    #[error("kubernetes API: {0}")]
    Api(#[from] ::kube::Error),
    #[error("pod {namespace}/{name} has no status for container {container:?}")]
    NoContainerStatus {
        namespace: String,
        name: String,
        container: String,
    },
    #[error("container {container:?} has no container ID yet (not started)")]
    NoContainerId { container: String },
    #[error("container ID {0:?} is not of the form <runtime>://<id>")]
    BadContainerId(String),
    #[error("no process found for container {id}: {detail}")]
    NoProcess { id: String, detail: String },
    #[error("kubernetes API did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("serializing: {0}")]
    Serialize(String),
    /// Reconciling a Task: adding or removing the finalizer, or the work between.
    #[error(transparent)]
    Finalizer(Box<::kube::runtime::finalizer::Error<KubeError>>),
    /// The manager refused an operation a Task asked for (other than a refused spec).
    #[error("task manager: {0}")]
    Manager(#[from] ManagerError),
}

impl From<::kube::runtime::finalizer::Error<KubeError>> for KubeError {
    fn from(e: ::kube::runtime::finalizer::Error<KubeError>) -> Self {
        KubeError::Finalizer(Box::new(e))
    }
}
