//! The launch line: everything the shim needs to start the task, written by the agent
//! (see `file::write_launch`).

use serde::{Deserialize, Serialize};

use crate::sys::procfs::ProcIdentity;
use crate::task::identity::RunAs;
use crate::task::model::{EnvVar, HookName};

/// Everything the shim needs to start the task; written by the agent, mode 0600 since it
/// holds the task's environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<EnvVar>,
    pub working_dir: Option<String>,
    pub timeout_ms: Option<u64>,
    pub grace_ms: u64,
    /// Per stream; the log keeps at most this much (current file plus one rotated file).
    pub max_log_bytes: u64,
    /// Sidecar mode: run inside this process's namespaces, with its environment as base.
    pub target: Option<Target>,
    /// The boot this launch was written in. A launch from an earlier boot with no exit
    /// line was cut short by a node restart: the task may have run, so it is reported,
    /// never started again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Identity overrides for the task's processes (its securityContext over the agent's
    /// default), applied by the shim over its own identity or the main container's.
    #[serde(default, skip_serializing_if = "RunAs::is_empty")]
    pub run_as: RunAs,
    /// Who commands in the agent's own container run as unless `run_as` says otherwise
    /// (the task's uid from `--task-uid-range`, else `--task-run-as-user`); a hook of a
    /// `Remote` task may run there too.
    #[serde(default, skip_serializing_if = "RunAs::is_empty")]
    pub host_run_as: RunAs,
    /// The task may gain privileges (setuid binaries); otherwise it runs with
    /// `no_new_privs`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_privilege_escalation: bool,
    /// Unique to this launch: the shim started for it is told it and claims the launch
    /// only if the journal still holds this one (a shim that comes late, after the agent
    /// replaced or gave up the launch, runs nothing). Absent in older agents' launches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Every command of the task runs under the `RuntimeDefault` seccomp filter.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seccomp: bool,
    /// Runs to completion before the main command; the main command runs only if it
    /// succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<HookLaunch>,
    /// Runs once the main command has ended (or could not start, or `preStart` failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_stop: Option<HookLaunch>,
    /// Where the shim makes the task's cgroup (`None`: the agent can make none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containment: Option<crate::runtime::containment::Parent>,
    /// What the main command left running is SIGKILLed when it exits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub end_with_main: bool,
    /// The task's limits and the cgroups that count its usage (`None`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::runtime::limits::LaunchLimits>,
}

impl Launch {
    pub fn hook(&self, name: HookName) -> Option<&HookLaunch> {
        match name {
            HookName::PreStart => self.pre_start.as_ref(),
            HookName::PostStop => self.post_stop.as_ref(),
        }
    }

    /// Whether a command of the task runs in the main container, so that its shim forks a
    /// reaper there (and, for containment, moves itself into the task's cgroup first).
    /// The agent plans the task's pids limit by it; the shim acts on it.
    pub fn needs_reaper(&self) -> bool {
        self.target.is_some()
            || [&self.pre_start, &self.post_stop]
                .into_iter()
                .flatten()
                .any(|h| matches!(h.place, HookPlace::Remote(_)))
    }
}

/// A lifecycle hook as its shim runs it: with the task's environment and working
/// directory, in its own place.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookLaunch {
    pub argv: Vec<String>,
    /// `None`: no limit (launches of earlier versions always have one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub place: HookPlace,
}

/// Where a hook runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HookPlace {
    /// In the agent's container (`Local`).
    Local,
    /// Inside the main container (`Remote`).
    Remote(Target),
    /// `Remote`, but the main container was not found when the task was launched: the
    /// hook fails with this message.
    Unreachable(String),
}
impl Launch {
    pub fn from_earlier_boot(&self) -> bool {
        matches!((self.boot_id.as_deref(), boot_id()), (Some(then), Some(now)) if then != now)
    }
}

/// This boot's id (the kernel's random `boot_id`); `None` where the kernel has none.
pub fn boot_id() -> Option<&'static str> {
    static ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub container: String,
    pub process: ProcIdentity,
    /// Also join the target's cgroups (limits and accounting of the main container).
    #[serde(default)]
    pub join_cgroup: bool,
    /// Run as the target's uid, gid, groups and capabilities instead of the sidecar's.
    #[serde(default)]
    pub run_as_target_user: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_of_another_boot_is_recognised() {
        let mut launch: Launch = serde_json::from_str(
            r#"{"argv":["true"],"env":[],"graceMs":1,"maxLogBytes":1,"bootId":"other"}"#,
        )
        .unwrap();
        assert!(boot_id().is_some(), "Linux has a boot id");
        assert!(launch.from_earlier_boot());
        launch.boot_id = None; // written by an agent that did not record it: no claim
        assert!(!launch.from_earlier_boot());
    }
}
