//! The pod sandbox task containers join: the agent's own pod's sandbox inside Kubernetes,
//! else one the agent creates, labels as its own, reuses across restarts and removes on
//! shutdown once it holds no containers.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1::{
    ContainerFilter, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxFilter, PodSandboxMetadata, PodSandboxState,
    PodSandboxStateValue,
};
use tokio::sync::Mutex;

use super::cri::{Cri, cri_error, is_not_found};
use super::labels;
use crate::runtime::RuntimeError;

pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// The CRI namespace of the sandboxes the agent owns.
pub const OWNED_NAMESPACE: &str = "task-executor";

/// Which sandbox to use.
#[derive(Clone, Debug, PartialEq)]
pub enum SandboxMode {
    /// Join the READY sandbox of this Kubernetes pod.
    Pod { name: String, namespace: String },
    /// Create (or find) a host-network sandbox labelled with this agent id.
    Owned { agent_id: String },
}

/// A sandbox ready to take containers.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub id: String,
    /// The config to pass with CreateContainer (its log directory is set per task).
    pub config: PodSandboxConfig,
    pub network: NamespaceMode,
    pub ipc: NamespaceMode,
}

pub struct Sandboxes {
    cri: Arc<dyn Cri>,
    mode: SandboxMode,
    current: Mutex<Option<Sandbox>>,
}

impl Sandboxes {
    pub fn new(cri: Arc<dyn Cri>, mode: SandboxMode) -> Self {
        Sandboxes {
            cri,
            mode,
            current: Mutex::new(None),
        }
    }

    pub fn mode(&self) -> &SandboxMode {
        &self.mode
    }

    /// The sandbox to start containers in, found or created on first use and re-checked
    /// (one PodSandboxStatus) on every later use.
    pub async fn get(&self) -> Result<Sandbox, RuntimeError> {
        let mut current = self.current.lock().await;
        if let Some(sb) = current.as_ref() {
            match self.cri.pod_sandbox_status(&sb.id, false).await {
                Ok(r)
                    if r.status.as_ref().map(|s| s.state)
                        == Some(PodSandboxState::SandboxReady as i32) =>
                {
                    return Ok(sb.clone());
                }
                Ok(_) => tracing::warn!(sandbox = %sb.id, "pod sandbox is no longer ready"),
                Err(s) if is_not_found(&s) => {
                    tracing::warn!(sandbox = %sb.id, "pod sandbox disappeared")
                }
                Err(s) => return Err(cri_error("PodSandboxStatus", &s)),
            }
            *current = None;
        }
        let sb = match &self.mode {
            SandboxMode::Pod { name, namespace } => self.find_pod(name, namespace).await?,
            SandboxMode::Owned { agent_id } => self.find_or_create_owned(agent_id).await?,
        };
        *current = Some(sb.clone());
        Ok(sb)
    }

    async fn find_pod(&self, name: &str, namespace: &str) -> Result<Sandbox, RuntimeError> {
        let filter = PodSandboxFilter {
            id: String::new(),
            state: Some(PodSandboxStateValue {
                state: PodSandboxState::SandboxReady as i32,
            }),
            label_selector: HashMap::from([
                (POD_NAME_LABEL.to_string(), name.to_string()),
                (POD_NAMESPACE_LABEL.to_string(), namespace.to_string()),
            ]),
        };
        let mut items = self
            .cri
            .list_pod_sandbox(filter)
            .await
            .map_err(|s| cri_error("ListPodSandbox", &s))?;
        items.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        let Some(sb) = items.into_iter().next() else {
            return Err(RuntimeError::Cri(format!(
                "no ready pod sandbox for pod {namespace}/{name} on this node's runtime"
            )));
        };
        let resp = self
            .cri
            .pod_sandbox_status(&sb.id, true)
            .await
            .map_err(|s| cri_error("PodSandboxStatus", &s))?;
        let status = resp.status.unwrap_or_default();
        let opts = status
            .linux
            .and_then(|l| l.namespaces)
            .and_then(|n| n.options)
            .unwrap_or_default();
        let cgroup_parent = resp
            .info
            .get("info")
            .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
            .and_then(|v| {
                v.pointer("/config/linux/cgroup_parent")
                    .and_then(|c| c.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let network = NamespaceMode::try_from(opts.network).unwrap_or(NamespaceMode::Pod);
        let ipc = NamespaceMode::try_from(opts.ipc).unwrap_or(NamespaceMode::Pod);
        tracing::info!(sandbox = %sb.id, pod = %format!("{namespace}/{name}"), "joining the pod's sandbox");
        Ok(Sandbox {
            id: sb.id,
            config: PodSandboxConfig {
                metadata: status.metadata.or(sb.metadata),
                labels: status.labels,
                annotations: status.annotations,
                linux: Some(LinuxPodSandboxConfig {
                    cgroup_parent,
                    security_context: Some(LinuxSandboxSecurityContext {
                        namespace_options: Some(NamespaceOption {
                            network: network as i32,
                            pid: NamespaceMode::Container as i32,
                            ipc: ipc as i32,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            network,
            ipc,
        })
    }

    async fn find_or_create_owned(&self, agent_id: &str) -> Result<Sandbox, RuntimeError> {
        let all = self
            .cri
            .list_pod_sandbox(owned_filter(agent_id))
            .await
            .map_err(|s| cri_error("ListPodSandbox", &s))?;
        let mut ready: Vec<_> = all
            .iter()
            .filter(|s| s.state == PodSandboxState::SandboxReady as i32)
            .collect();
        ready.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        if let Some(sb) = ready.first() {
            let attempt = sb.metadata.as_ref().map_or(0, |m| m.attempt);
            tracing::info!(sandbox = %sb.id, "reusing the agent's pod sandbox");
            return Ok(owned_sandbox(sb.id.clone(), agent_id, attempt));
        }
        // A sandbox that is not ready (e.g. after a runtime restart) keeps its name
        // reserved; a new attempt number gets a fresh one.
        let attempt = all
            .iter()
            .filter_map(|s| s.metadata.as_ref().map(|m| m.attempt + 1))
            .max()
            .unwrap_or(0);
        let config = owned_config(agent_id, attempt);
        let id = self
            .cri
            .run_pod_sandbox(config)
            .await
            .map_err(|s| cri_error("RunPodSandbox", &s))?;
        tracing::info!(sandbox = %id, attempt, "created the agent's pod sandbox");
        Ok(owned_sandbox(id, agent_id, attempt))
    }

    /// Removes the agent's own sandboxes that hold no containers. Pod sandboxes belong to
    /// kubelet and are left alone.
    pub async fn shutdown(&self) -> Result<(), RuntimeError> {
        let SandboxMode::Owned { agent_id } = &self.mode else {
            return Ok(());
        };
        let all = self
            .cri
            .list_pod_sandbox(owned_filter(agent_id))
            .await
            .map_err(|s| cri_error("ListPodSandbox", &s))?;
        for sb in all {
            let containers = self
                .cri
                .list_containers(ContainerFilter {
                    pod_sandbox_id: sb.id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| cri_error("ListContainers", &s))?;
            if !containers.is_empty() {
                tracing::info!(sandbox = %sb.id, containers = containers.len(), "keeping the pod sandbox: it still holds task containers");
                continue;
            }
            for (call, r) in [
                ("StopPodSandbox", self.cri.stop_pod_sandbox(&sb.id).await),
                (
                    "RemovePodSandbox",
                    self.cri.remove_pod_sandbox(&sb.id).await,
                ),
            ] {
                if let Some(s) = r.as_ref().err().filter(|s| !is_not_found(s)) {
                    return Err(cri_error(call, s));
                }
            }
            tracing::info!(sandbox = %sb.id, "removed the agent's pod sandbox");
        }
        *self.current.lock().await = None;
        Ok(())
    }
}

fn owned_labels(agent_id: &str) -> HashMap<String, String> {
    HashMap::from([
        (labels::OWNED_SANDBOX.to_string(), "true".to_string()),
        (labels::AGENT.to_string(), agent_id.to_string()),
    ])
}

fn owned_filter(agent_id: &str) -> PodSandboxFilter {
    PodSandboxFilter {
        label_selector: owned_labels(agent_id),
        ..Default::default()
    }
}

/// The agent's own sandbox: host network (NamespaceMode NODE, so no CNI is needed).
pub fn owned_config(agent_id: &str, attempt: u32) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: format!("task-executor-{agent_id}"),
            uid: agent_id.to_string(),
            namespace: OWNED_NAMESPACE.to_string(),
            attempt,
        }),
        labels: owned_labels(agent_id),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn owned_sandbox(id: String, agent_id: &str, attempt: u32) -> Sandbox {
    Sandbox {
        id,
        config: owned_config(agent_id, attempt),
        network: NamespaceMode::Node,
        ipc: NamespaceMode::Pod,
    }
}
