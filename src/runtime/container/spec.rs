//! The CRI `ContainerConfig` for a task: image, argv, env, mounts, labels, log path and
//! namespaces. Pure, so it is unit-tested without a runtime.

use std::collections::HashMap;
use std::path::PathBuf;

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, KeyValue, LinuxContainerConfig, LinuxContainerResources,
    LinuxContainerSecurityContext, Mount, NamespaceMode, NamespaceOption,
};

use super::cri::image_spec;
use super::labels;
use crate::runtime::TaskRef;
use crate::task::layout::CONTAINER_LOG;
use crate::task::model::ContainerSpec;

/// Namespaces a task container gets: network and IPC as its sandbox has them; its own PID
/// namespace, or the target's.
#[derive(Clone, Debug, PartialEq)]
pub struct Namespaces {
    pub network: NamespaceMode,
    pub ipc: NamespaceMode,
    /// The container whose PID namespace to share.
    pub target_id: Option<String>,
}

/// A resolved `volumeMounts` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// The container's name in the sandbox: unique per task incarnation.
pub fn container_name(task: &TaskRef) -> String {
    format!("{}-{}", task.name, task.uid)
}

pub fn container_config(
    task: &TaskRef,
    c: &ContainerSpec,
    agent_id: &str,
    mounts: Vec<HostMount>,
    ns: &Namespaces,
) -> ContainerConfig {
    let mut labels_map = HashMap::new();
    labels_map.insert(labels::TASK.to_string(), task.name.clone());
    labels_map.insert(labels::UID.to_string(), task.uid.clone());
    labels_map.insert(labels::AGENT.to_string(), agent_id.to_string());
    let pid = if ns.target_id.is_some() {
        NamespaceMode::Target
    } else {
        NamespaceMode::Container
    };
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: container_name(task),
            attempt: 0,
        }),
        image: Some(image_spec(&c.image)),
        command: c.command.clone(),
        args: c.args.clone(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs: c
            .env
            .iter()
            .map(|e| KeyValue {
                key: e.name.clone(),
                value: e.value.clone(),
            })
            .collect(),
        mounts: mounts
            .into_iter()
            .map(|m| Mount {
                container_path: m.container_path,
                host_path: m.host_path.display().to_string(),
                readonly: m.read_only,
                ..Default::default()
            })
            .collect(),
        labels: labels_map,
        log_path: CONTAINER_LOG.into(),
        linux: Some(LinuxContainerConfig {
            resources: linux_resources(c, node_cgroup_v2()),
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: ns.network as i32,
                    pid: pid as i32,
                    ipc: ns.ipc as i32,
                    target_id: ns.target_id.clone().unwrap_or_default(),
                    userns_options: None,
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// Whether the node's cgroups are v2 only (`/sys/fs/cgroup` is a cgroup2 mount), as the
/// container runtime then makes them.
pub fn node_cgroup_v2() -> bool {
    static V2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V2.get_or_init(|| std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists())
}

/// Refuses what the container runtime can't be told: a pids limit on a cgroup v1 node
/// (CRI's `LinuxContainerResources` has no pids field; its `unified` map is v2's).
pub fn check_resources(c: &ContainerSpec, at: &str, v2: bool) -> Result<(), String> {
    let l = match &c.resources {
        Some(r) => r.resolve(&format!("{at}.resources"))?,
        None => return Ok(()),
    };
    if l.pids.is_some() && !v2 {
        return Err(format!(
            "{at}.resources.limits[{}]: container tasks get a pids limit only on cgroup v2 \
             nodes (the CRI has no pids field; its unified map is cgroup v2's), and this \
             node has cgroup v1",
            crate::task::resources::PIDS
        ));
    }
    Ok(())
}

/// The container's `resources` as CRI's `LinuxContainerResources`, as kubelet fills them:
/// a CFS quota per 100 ms for `limits.cpu`, shares for `requests.cpu` (else the limit),
/// `memory_limit_in_bytes` with no swap beyond it, the pids limit through `unified`
/// (`pids.max`, cgroup v2). `None`: nothing asked.
pub fn linux_resources(c: &ContainerSpec, v2: bool) -> Option<LinuxContainerResources> {
    use crate::task::resources as r;
    let l = c.resources.as_ref()?.resolve("resources").ok()?;
    if l.is_empty() {
        return None;
    }
    let mut out = LinuxContainerResources::default();
    if let Some(m) = l.cpu_millis {
        out.cpu_period = r::CPU_PERIOD_US as i64;
        out.cpu_quota = r::cpu_quota_us(m) as i64;
    }
    if let Some(m) = l.cpu_request_millis {
        out.cpu_shares = r::cpu_shares(m) as i64;
    }
    if let Some(b) = l.memory_bytes {
        out.memory_limit_in_bytes = b.min(i64::MAX as u64) as i64;
        out.memory_swap_limit_in_bytes = out.memory_limit_in_bytes;
    }
    if let Some(n) = l.pids.filter(|_| v2) {
        out.unified.insert("pids.max".into(), n.to_string());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::model::{EnvVar, TaskSpec};

    #[test]
    fn config_carries_the_spec_labels_and_target() {
        let c = ContainerSpec {
            image: "localhost/busybox:test".into(),
            command: vec!["sh".into(), "-c".into()],
            args: vec!["echo $X".into()],
            env: vec![EnvVar {
                name: "X".into(),
                value: "1".into(),
            }],
            working_dir: Some("/tmp".into()),
            ..Default::default()
        };
        let task = TaskRef {
            name: "t1".into(),
            uid: "u1".into(),
            dir: "/data/t1".into(),
            spec: TaskSpec {
                container: Some(c.clone()),
                ..Default::default()
            },
            exec_mode: crate::task::model::ExecMode::Local,
            host_uid: None,
        };
        let ns = Namespaces {
            network: NamespaceMode::Node,
            ipc: NamespaceMode::Pod,
            target_id: Some("abc".into()),
        };
        let mounts = vec![HostMount {
            host_path: "/srv/data".into(),
            container_path: "/data".into(),
            read_only: true,
        }];
        let cfg = container_config(&task, &c, "agent1", mounts, &ns);
        assert_eq!(cfg.metadata.as_ref().unwrap().name, "t1-u1");
        assert_eq!(cfg.command, vec!["sh", "-c"]);
        assert_eq!(cfg.args, vec!["echo $X"]);
        assert_eq!(cfg.working_dir, "/tmp");
        assert_eq!(cfg.envs[0].key, "X");
        assert_eq!(cfg.labels[labels::TASK], "t1");
        assert_eq!(cfg.labels[labels::UID], "u1");
        assert_eq!(cfg.labels[labels::AGENT], "agent1");
        assert_eq!(cfg.log_path, CONTAINER_LOG);
        assert!(cfg.mounts[0].readonly);
        assert_eq!(cfg.mounts[0].host_path, "/srv/data");
        let nso = cfg
            .linux
            .unwrap()
            .security_context
            .unwrap()
            .namespace_options
            .unwrap();
        assert_eq!(nso.pid, NamespaceMode::Target as i32);
        assert_eq!(nso.target_id, "abc");
        assert_eq!(nso.network, NamespaceMode::Node as i32);
    }

    #[test]
    fn resources_become_cri_linux_resources() {
        use crate::task::resources::{PIDS, Quantity, ResourceRequirements};
        let q = |s: &str| Quantity(s.into());
        let c = ContainerSpec {
            image: "i".into(),
            resources: Some(ResourceRequirements {
                limits: [("cpu", "500m"), ("memory", "64Mi"), (PIDS, "20")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), q(v)))
                    .collect(),
                requests: [("cpu".to_string(), q("250m"))].into_iter().collect(),
            }),
            ..Default::default()
        };
        let r = linux_resources(&c, true).unwrap();
        assert_eq!(
            (r.cpu_period, r.cpu_quota, r.cpu_shares),
            (100_000, 50_000, 256)
        );
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
        assert_eq!(r.memory_swap_limit_in_bytes, 64 << 20);
        assert_eq!(r.unified.get("pids.max").map(String::as_str), Some("20"));
        assert!(check_resources(&c, "container", true).is_ok());
        let e = check_resources(&c, "container", false).unwrap_err();
        assert!(e.starts_with("container.resources.limits[task-executor.io/pids]: container tasks get a pids limit only on cgroup v2"), "{e}");
        let none = ContainerSpec::default();
        assert_eq!(linux_resources(&none, true), None);
    }
}
