//! The agent's own Pod: which container is the main one, and what its ID is now.

use std::fmt;

use ::kube::Api;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;

use super::{KubeClient, KubeError};
use crate::runtime::container::volumes::PodSource;

/// A container ID as the kubelet reports it: `containerd://<id>`, `docker://`, `cri-o://`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerId {
    pub runtime: String,
    pub id: String,
}

impl ContainerId {
    pub fn parse(s: &str) -> Result<Self, KubeError> {
        let bad = || KubeError::BadContainerId(s.to_string());
        let (runtime, id) = s.split_once("://").ok_or_else(bad)?;
        // IDs are hex (containerd, docker, cri-o); allow any alphanumerics, nothing that
        // could match a path separator or a partial cgroup name.
        if runtime.is_empty() || id.len() < 8 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad());
        }
        Ok(ContainerId {
            runtime: runtime.to_string(),
            id: id.to_string(),
        })
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.runtime, self.id)
    }
}

/// The main container as the Pod's status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MainContainer {
    /// `None` until the container has started once.
    pub id: Option<ContainerId>,
    pub restart_count: i32,
}

impl MainContainer {
    /// True when `self` is a later incarnation than `before`: restarted or replaced.
    pub fn replaced(&self, before: &MainContainer) -> bool {
        let id_changed = before.id.is_some() && self.id.is_some() && self.id != before.id;
        id_changed || self.restart_count > before.restart_count
    }
}

/// Reads `status.containerStatuses[name == container]` of `pod`.
pub fn main_container(pod: &Pod, container: &str) -> Result<MainContainer, KubeError> {
    let status = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .ok_or_else(|| KubeError::NoContainerStatus {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            container: container.to_string(),
        })?;
    let id = status
        .container_id
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(ContainerId::parse)
        .transpose()?;
    Ok(MainContainer {
        id,
        restart_count: status.restart_count,
    })
}

/// GETs the Pod and reads its main container.
pub async fn fetch_main_container(
    api: &Api<Pod>,
    pod: &str,
    container: &str,
) -> Result<MainContainer, KubeError> {
    let pod = api.get(pod).await?;
    main_container(&pod, container)
}

/// The agent's own Pod, read with `GET pods/<name>` through the shared client (made on
/// first use, so a missing kubeconfig is an error of that read, not of start-up).
pub struct OwnPod {
    client: KubeClient,
    namespace: String,
    name: String,
}

impl OwnPod {
    pub fn new(client: KubeClient, namespace: String, name: String) -> Self {
        OwnPod {
            client,
            namespace,
            name,
        }
    }

    pub async fn get(&self) -> Result<Pod, KubeError> {
        let api: Api<Pod> = Api::namespaced(self.client.get().await?, &self.namespace);
        Ok(api.get(&self.name).await?)
    }
}

impl PodSource for OwnPod {
    fn fetch(&self) -> BoxFuture<'_, Result<Pod, String>> {
        Box::pin(async move {
            self.get()
                .await
                .map_err(|e| format!("pod {}/{}: {e}", self.namespace, self.name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_runtime_prefixes() {
        for (s, rt) in [
            ("containerd://0123456789abcdef", "containerd"),
            ("docker://0123456789abcdef", "docker"),
            ("cri-o://0123456789abcdef", "cri-o"),
        ] {
            let c = ContainerId::parse(s).unwrap();
            assert_eq!(
                (c.runtime.as_str(), c.id.as_str()),
                (rt, "0123456789abcdef")
            );
            assert_eq!(c.to_string(), s);
        }
        for bad in [
            "",
            "0123456789abcdef",
            "://0123456789abcdef",
            "containerd://",
            "containerd://abc",
            "containerd://../../etc/passwd",
            "containerd://0123456789abcdef/x",
        ] {
            assert!(ContainerId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn pod(statuses: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns"},
            "status": {"containerStatuses": statuses}
        }))
        .unwrap()
    }

    fn status(name: &str, id: Option<&str>, restarts: i32) -> serde_json::Value {
        serde_json::json!({
            "name": name, "image": "x", "imageID": "", "ready": true,
            "restartCount": restarts, "containerID": id
        })
    }

    #[test]
    fn finds_the_main_container_status() {
        let p = pod(serde_json::json!([
            status("sidecar", Some("containerd://1111111111111111"), 0),
            status("main", Some("containerd://2222222222222222"), 3),
        ]));
        let m = main_container(&p, "main").unwrap();
        assert_eq!(m.id.unwrap().id, "2222222222222222");
        assert_eq!(m.restart_count, 3);
        assert!(matches!(
            main_container(&p, "other"),
            Err(KubeError::NoContainerStatus { .. })
        ));
        let not_started = pod(serde_json::json!([status("main", None, 0)]));
        assert_eq!(main_container(&not_started, "main").unwrap().id, None);
    }

    #[test]
    fn replacement_is_a_new_id_or_a_restart() {
        let c = |id: Option<&str>, n| MainContainer {
            id: id.map(|i| ContainerId::parse(&format!("containerd://{i}")).unwrap()),
            restart_count: n,
        };
        let a = c(Some("aaaaaaaaaaaa"), 0);
        assert!(!a.replaced(&a));
        assert!(c(Some("bbbbbbbbbbbb"), 0).replaced(&a));
        assert!(c(Some("aaaaaaaaaaaa"), 1).replaced(&a));
        // First start after the agent: nothing of ours ran in a previous container.
        assert!(!a.replaced(&c(None, 0)));
        assert!(!c(None, 0).replaced(&a));
    }
}
