//! Errors of the Kubernetes layer.

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
}

impl KubeError {
    /// True for an API answer of 410 Gone (a resource version too old to watch from).
    pub fn is_gone(&self) -> bool {
        matches!(self, KubeError::Api(::kube::Error::Api(s)) if s.code == 410)
    }
}
