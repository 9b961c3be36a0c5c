//! The Kubernetes integration: the main container found through the own Pod (sidecar
//! mode), and the `Task` custom resource run by `--watch-tasks`.

pub mod crd;
pub mod error;
pub mod listwatch;
pub mod locator;
pub mod merge_patch;
pub mod pod;
pub mod review;
pub mod watch;
mod watch_status;

pub use error::KubeError;

/// A client from the in-cluster service account, or from `KUBECONFIG` / `~/.kube/config`.
pub async fn client() -> Result<::kube::Client, KubeError> {
    ::kube::Client::try_default().await.map_err(KubeError::Api)
}
