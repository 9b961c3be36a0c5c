//! The narrow slice of CRI v1 the container runtime uses, as a trait (so error paths can be
//! tested against a fake), and its implementation over tonic + k8s-cri on a unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::timed::Timed;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    Container, ContainerConfig, ContainerEventResponse, ContainerFilter, ContainerStatusRequest,
    ContainerStatusResponse, CreateContainerRequest, GetEventsRequest, ImageSpec,
    ImageStatusRequest, ListContainersRequest, ListPodSandboxRequest, PodSandbox, PodSandboxConfig,
    PodSandboxFilter, PodSandboxStatusRequest, PodSandboxStatusResponse, PullImageRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, ReopenContainerLogRequest,
    RunPodSandboxRequest, StartContainerRequest, StatusRequest, StatusResponse,
    StopContainerRequest, StopPodSandboxRequest, VersionRequest, VersionResponse,
};
use tonic::transport::Endpoint;
use tonic::{Request, Status};

use crate::runtime::RuntimeError;

pub type CriResult<T> = Result<T, Status>;

/// Deadline of an ordinary RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of an image pull (a registry may be slow).
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long dialling the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The CRI calls this crate makes. Every method maps 1:1 to a CRI v1 RPC.
pub trait Cri: Send + Sync + 'static {
    fn version(&self) -> BoxFuture<'_, CriResult<VersionResponse>>;
    fn status(&self) -> BoxFuture<'_, CriResult<StatusResponse>>;
    /// `Ok(false)` when the image is not present on the node.
    fn image_present(&self, image: &str) -> BoxFuture<'_, CriResult<bool>>;
    fn pull_image(&self, image: &str) -> BoxFuture<'_, CriResult<String>>;
    fn run_pod_sandbox(&self, config: PodSandboxConfig) -> BoxFuture<'_, CriResult<String>>;
    fn stop_pod_sandbox(&self, id: &str) -> BoxFuture<'_, CriResult<()>>;
    fn remove_pod_sandbox(&self, id: &str) -> BoxFuture<'_, CriResult<()>>;
    fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> BoxFuture<'_, CriResult<PodSandboxStatusResponse>>;
    fn list_pod_sandbox(
        &self,
        filter: PodSandboxFilter,
    ) -> BoxFuture<'_, CriResult<Vec<PodSandbox>>>;
    fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> BoxFuture<'_, CriResult<String>>;
    fn start_container(&self, id: &str) -> BoxFuture<'_, CriResult<()>>;
    /// Stops with `timeout` (SIGTERM, then SIGKILL after it).
    fn stop_container(&self, id: &str, timeout: Duration) -> BoxFuture<'_, CriResult<()>>;
    fn remove_container(&self, id: &str) -> BoxFuture<'_, CriResult<()>>;
    fn list_containers(&self, filter: ContainerFilter) -> BoxFuture<'_, CriResult<Vec<Container>>>;
    fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> BoxFuture<'_, CriResult<ContainerStatusResponse>>;
    fn reopen_container_log(&self, id: &str) -> BoxFuture<'_, CriResult<()>>;
    /// The runtime's container event stream (`Unimplemented` on containerd < 1.7).
    fn container_events(
        &self,
    ) -> BoxFuture<'_, CriResult<BoxStream<'static, CriResult<ContainerEventResponse>>>>;

    /// The host PID of a running container, from the verbose status' `info["info"].pid`.
    fn container_pid<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<i32, RuntimeError>> {
        Box::pin(async move {
            let resp = self
                .container_status(id, true)
                .await
                .map_err(|s| cri_error("ContainerStatus", &s))?;
            pid_from_info(&resp.info)
                .ok_or_else(|| RuntimeError::Cri(format!("container {id} reports no host pid")))
        })
    }
}

/// Reads `pid` from the JSON document containerd puts in a verbose status' `info`.
pub fn pid_from_info(info: &std::collections::HashMap<String, String>) -> Option<i32> {
    let doc: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    doc.get("pid")?
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 0)
}

/// A `RuntimeError` for a failed RPC, naming the call.
pub fn cri_error(call: &str, status: &Status) -> RuntimeError {
    RuntimeError::Cri(format!(
        "{call}: {} ({:?})",
        status.message(),
        status.code()
    ))
}

pub fn is_not_found(status: &Status) -> bool {
    status.code() == tonic::Code::NotFound
        || status.message().contains("not found")
        || status.message().contains("does not exist")
}

/// CRI over a unix socket; connects lazily, so a runtime that is down is seen per call.
#[derive(Clone, Debug)]
pub struct GrpcCri {
    socket: PathBuf,
    runtime: RuntimeServiceClient<Timed>,
    images: ImageServiceClient<Timed>,
}

impl GrpcCri {
    pub fn new(socket: &Path) -> Result<Self, RuntimeError> {
        let endpoint = Endpoint::from_shared(format!("unix://{}", socket.display()))
            .map_err(|e| RuntimeError::Cri(format!("CRI socket {}: {e}", socket.display())))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = Timed(endpoint.connect_lazy());
        Ok(GrpcCri {
            socket: socket.to_path_buf(),
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn rt(&self) -> RuntimeServiceClient<Timed> {
        self.runtime.clone()
    }
}

fn req<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

impl Cri for GrpcCri {
    fn version(&self) -> BoxFuture<'_, CriResult<VersionResponse>> {
        Box::pin(async move {
            let r = VersionRequest {
                version: "v1".into(),
            };
            Ok(self.rt().version(req(r, RPC_TIMEOUT)).await?.into_inner())
        })
    }

    fn status(&self) -> BoxFuture<'_, CriResult<StatusResponse>> {
        Box::pin(async move {
            let r = StatusRequest { verbose: false };
            Ok(self.rt().status(req(r, RPC_TIMEOUT)).await?.into_inner())
        })
    }

    fn image_present(&self, image: &str) -> BoxFuture<'_, CriResult<bool>> {
        let r = ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        Box::pin(async move {
            let resp = self
                .images
                .clone()
                .image_status(req(r, RPC_TIMEOUT))
                .await?
                .into_inner();
            Ok(resp.image.is_some())
        })
    }

    fn pull_image(&self, image: &str) -> BoxFuture<'_, CriResult<String>> {
        let r = PullImageRequest {
            image: Some(image_spec(image)),
            auth: None,
            sandbox_config: None,
        };
        Box::pin(async move {
            let resp = self
                .images
                .clone()
                .pull_image(req(r, PULL_TIMEOUT))
                .await?
                .into_inner();
            Ok(resp.image_ref)
        })
    }

    fn run_pod_sandbox(&self, config: PodSandboxConfig) -> BoxFuture<'_, CriResult<String>> {
        let r = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        Box::pin(async move {
            let resp = self.rt().run_pod_sandbox(req(r, RPC_TIMEOUT * 4)).await?;
            Ok(resp.into_inner().pod_sandbox_id)
        })
    }

    fn stop_pod_sandbox(&self, id: &str) -> BoxFuture<'_, CriResult<()>> {
        let r = StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        Box::pin(async move {
            self.rt().stop_pod_sandbox(req(r, RPC_TIMEOUT * 4)).await?;
            Ok(())
        })
    }

    fn remove_pod_sandbox(&self, id: &str) -> BoxFuture<'_, CriResult<()>> {
        let r = RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        Box::pin(async move {
            self.rt()
                .remove_pod_sandbox(req(r, RPC_TIMEOUT * 4))
                .await?;
            Ok(())
        })
    }

    fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> BoxFuture<'_, CriResult<PodSandboxStatusResponse>> {
        let r = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose,
        };
        Box::pin(async move {
            Ok(self
                .rt()
                .pod_sandbox_status(req(r, RPC_TIMEOUT))
                .await?
                .into_inner())
        })
    }

    fn list_pod_sandbox(
        &self,
        filter: PodSandboxFilter,
    ) -> BoxFuture<'_, CriResult<Vec<PodSandbox>>> {
        let r = ListPodSandboxRequest {
            filter: Some(filter),
        };
        Box::pin(async move {
            Ok(self
                .rt()
                .list_pod_sandbox(req(r, RPC_TIMEOUT))
                .await?
                .into_inner()
                .items)
        })
    }

    fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> BoxFuture<'_, CriResult<String>> {
        let r = CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        Box::pin(async move {
            Ok(self
                .rt()
                .create_container(req(r, RPC_TIMEOUT * 4))
                .await?
                .into_inner()
                .container_id)
        })
    }

    fn start_container(&self, id: &str) -> BoxFuture<'_, CriResult<()>> {
        let r = StartContainerRequest {
            container_id: id.into(),
        };
        Box::pin(async move {
            self.rt().start_container(req(r, RPC_TIMEOUT * 4)).await?;
            Ok(())
        })
    }

    fn stop_container(&self, id: &str, timeout: Duration) -> BoxFuture<'_, CriResult<()>> {
        let secs = timeout.as_secs_f64().ceil() as i64;
        let r = StopContainerRequest {
            container_id: id.into(),
            timeout: secs,
        };
        Box::pin(async move {
            self.rt()
                .stop_container(req(r, timeout + RPC_TIMEOUT))
                .await?;
            Ok(())
        })
    }

    fn remove_container(&self, id: &str) -> BoxFuture<'_, CriResult<()>> {
        let r = RemoveContainerRequest {
            container_id: id.into(),
        };
        Box::pin(async move {
            self.rt().remove_container(req(r, RPC_TIMEOUT * 2)).await?;
            Ok(())
        })
    }

    fn list_containers(&self, filter: ContainerFilter) -> BoxFuture<'_, CriResult<Vec<Container>>> {
        let r = ListContainersRequest {
            filter: Some(filter),
        };
        Box::pin(async move {
            Ok(self
                .rt()
                .list_containers(req(r, RPC_TIMEOUT))
                .await?
                .into_inner()
                .containers)
        })
    }

    fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> BoxFuture<'_, CriResult<ContainerStatusResponse>> {
        let r = ContainerStatusRequest {
            container_id: id.into(),
            verbose,
        };
        Box::pin(async move {
            Ok(self
                .rt()
                .container_status(req(r, RPC_TIMEOUT))
                .await?
                .into_inner())
        })
    }

    fn reopen_container_log(&self, id: &str) -> BoxFuture<'_, CriResult<()>> {
        let r = ReopenContainerLogRequest {
            container_id: id.into(),
        };
        Box::pin(async move {
            self.rt().reopen_container_log(req(r, RPC_TIMEOUT)).await?;
            Ok(())
        })
    }

    fn container_events(
        &self,
    ) -> BoxFuture<'_, CriResult<BoxStream<'static, CriResult<ContainerEventResponse>>>> {
        Box::pin(async move {
            let stream = self
                .rt()
                .get_container_events(GetEventsRequest {})
                .await?
                .into_inner();
            Ok(stream.boxed())
        })
    }
}

pub fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_is_read_from_verbose_info() {
        let mut info = std::collections::HashMap::new();
        info.insert(
            "info".to_string(),
            r#"{"sandboxID":"abc","pid":4242,"removing":false}"#.to_string(),
        );
        assert_eq!(pid_from_info(&info), Some(4242));
        info.insert("info".into(), r#"{"pid":0}"#.into());
        assert_eq!(pid_from_info(&info), None);
        assert_eq!(pid_from_info(&Default::default()), None);
    }
}
