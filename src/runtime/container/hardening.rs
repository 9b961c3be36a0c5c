//! What every task container gets, whatever the request says: the defaults kubelet
//! gives an unprivileged container of a pod under the Pod Security Standards, so a task
//! can never reach more of the node than the operator configured.
//!
//! - `no_new_privs` (setuid binaries and file capabilities grant nothing);
//! - containerd's `RuntimeDefault` seccomp profile;
//! - containerd's default capability set (no capability added, never privileged);
//! - kubelet's masked and read-only `/proc` and `/sys` paths (CRI applies none itself
//!   when the lists are empty);
//! - under `--task-policy restricted`, a non-root user (the configured one) instead of
//!   the image's.

use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{ContainerConfig, Int64Value, SecurityProfile};

/// Kubelet's `DefaultMaskedPaths` (pkg/securitycontext).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Kubelet's `DefaultReadonlyPaths`.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Applies the defaults above to `config`; `run_as` is the uid and gid of a non-root
/// user to run as instead of the image's (`restricted`).
pub fn harden(config: &mut ContainerConfig, run_as: Option<(u32, u32)>) {
    let linux = config.linux.get_or_insert_with(Default::default);
    let sc = linux.security_context.get_or_insert_with(Default::default);
    sc.privileged = false;
    sc.no_new_privs = true;
    sc.capabilities = None;
    sc.seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    sc.masked_paths = MASKED_PATHS.iter().map(|p| p.to_string()).collect();
    sc.readonly_paths = READONLY_PATHS.iter().map(|p| p.to_string()).collect();
    if let Some((uid, gid)) = run_as {
        sc.run_as_user = Some(Int64Value {
            value: i64::from(uid),
        });
        sc.run_as_group = Some(Int64Value {
            value: i64::from(gid),
        });
        sc.run_as_username = String::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_container_is_confined_and_restricted_ones_run_as_the_user() {
        let mut c = ContainerConfig::default();
        harden(&mut c, None);
        let sc = c.linux.unwrap().security_context.unwrap();
        assert!(sc.no_new_privs && !sc.privileged && sc.capabilities.is_none());
        assert_eq!(
            sc.seccomp.unwrap().profile_type,
            ProfileType::RuntimeDefault as i32
        );
        assert!(sc.masked_paths.iter().any(|p| p == "/proc/kcore"));
        assert!(sc.run_as_user.is_none(), "the image's user");
        let mut c = ContainerConfig::default();
        harden(&mut c, Some((65534, 65534)));
        let sc = c.linux.unwrap().security_context.unwrap();
        assert_eq!(sc.run_as_user.unwrap().value, 65534);
        assert_eq!(sc.run_as_group.unwrap().value, 65534);
    }
}
