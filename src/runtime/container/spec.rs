//! The CRI `ContainerConfig` for a task: image, argv, env, mounts, labels, log path and
//! namespaces. Pure, so it is unit-tested without a runtime.

use std::collections::HashMap;
use std::path::PathBuf;

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, Mount, NamespaceMode, NamespaceOption,
};

use super::cri::image_spec;
use super::labels;
use super::logs::LOG_FILE;
use crate::runtime::TaskRef;
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
        log_path: LOG_FILE.into(),
        linux: Some(LinuxContainerConfig {
            resources: None,
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
        assert_eq!(cfg.log_path, LOG_FILE);
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
}
