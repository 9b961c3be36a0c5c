//! Container mode's settings, and the labels that mark what the agent creates.

use std::path::PathBuf;
use std::time::Duration;

use super::sandbox::SandboxMode;

/// Labels on everything the agent creates through CRI.
pub mod labels {
    /// The task's name.
    pub const TASK: &str = "task-executor.io/task";
    /// The task incarnation's uid.
    pub const UID: &str = "task-executor.io/uid";
    /// Which agent made it (a stable hash of its pod, or of its data dir).
    pub const AGENT: &str = "task-executor.io/agent";
    /// On a sandbox the agent created itself.
    pub const OWNED_SANDBOX: &str = "task-executor.io/owned-sandbox";
}

/// Kubelet's container-name label, used to find a `targetContainer` in the pod.
pub const KUBE_CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";

#[derive(Clone, Debug)]
pub struct ContainerRuntimeConfig {
    pub socket: PathBuf,
    pub sandbox: SandboxMode,
    /// Fallback poll interval when the runtime has no event stream.
    pub poll_interval: Duration,
    /// Grace of a timeout stop.
    pub grace: Duration,
    pub max_log_bytes: u64,
    /// `--task-policy restricted`: containers run as this non-root uid and gid instead
    /// of their image's user.
    pub run_as: Option<(u32, u32)>,
}

impl ContainerRuntimeConfig {
    /// The sandbox to use: the pod's own when the agent runs in one (`pod` = name and
    /// namespace), else an agent-owned sandbox keyed by the data dir.
    pub fn sandbox_mode(pod: Option<(&str, &str)>, data_dir: &std::path::Path) -> SandboxMode {
        match pod {
            Some((name, namespace)) if !name.is_empty() && !namespace.is_empty() => {
                SandboxMode::Pod {
                    name: name.to_string(),
                    namespace: namespace.to_string(),
                }
            }
            _ => {
                let dir =
                    std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
                SandboxMode::Owned {
                    agent_id: agent_id(&dir.display().to_string()),
                }
            }
        }
    }
}

/// A stable 16-hex-digit id (FNV-1a 64): the same input gives the same id in every build.
pub fn agent_id(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
