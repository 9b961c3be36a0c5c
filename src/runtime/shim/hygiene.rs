//! What a host task starts with besides its command, as a container runtime (runc,
//! containerd) would give it rather than as the shell that started the agent left it:
//!
//! - its environment: the agent's (without its own variables, `exec_plan::host_base_env`),
//!   without the launching shell's bookkeeping (`PWD`, `OLDPWD`, `SHLVL`, `_`), with
//!   `HOME`, `USER` and `LOGNAME` of the user it runs as (from the agent's
//!   `/etc/passwd`; an unknown uid gets `HOME=/` and neither name); then the task's own;
//! - as another user than the agent: no capability at all, the bounding set included
//!   where the agent may drop it (`CAP_SETPCAP`); without it, the agent's own bounding set
//!   (in a pod already the short list the agent was given), which `no_new_privs` keeps
//!   out of reach;
//! - resource limits (set on the shim, which every command of the task inherits):
//!   open files 1024 soft / 524288 hard (containerd's; the hard limit is raised only
//!   where the agent may), no core dumps (hard 0; no field asks for them yet).

use std::ffi::OsString;
use std::io;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use super::exec_plan::Identity;
use crate::runtime::child_setup::{CapSets, Creds};
use crate::runtime::journal::Launch;
use crate::task::model::EnvVar;

/// Variables a shell keeps about itself, never the task's.
const SHELL_VARS: &[&str] = &["PWD", "OLDPWD", "SHLVL", "_"];

/// containerd's `RLIMIT_NOFILE` for containers.
pub const NOFILE_SOFT: u64 = 1024;
pub const NOFILE_HARD: u64 = 524_288;

/// The environment of a host task running as `uid`, with the task's `overlay`.
pub fn host_env(uid: u32, overlay: &[EnvVar]) -> Vec<(OsString, OsString)> {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    let replaced = ["HOME", "USER", "LOGNAME"];
    let base = super::exec_plan::host_base_env()
        .filter(|(k, _)| !SHELL_VARS.iter().chain(&replaced).any(|v| k == v));
    let mut own: Vec<(OsString, OsString)> = Vec::new();
    match user {
        Some(u) => {
            own.push(("HOME".into(), u.dir.into_os_string()));
            own.push(("USER".into(), u.name.clone().into()));
            own.push(("LOGNAME".into(), u.name.into()));
        }
        None => own.push(("HOME".into(), "/".into())),
    }
    super::exec_plan::environment(base.chain(own), overlay)
}

/// The environment and identity of a task's commands in the agent's container.
pub fn host_start(launch: &Launch) -> (Vec<(OsString, OsString)>, Identity) {
    let mut identity = Identity::of(launch, None);
    let own = nix::unistd::geteuid().as_raw();
    if let Some(c) = identity.creds.take() {
        identity.creds = Some(if c.uid == own { c } else { without_caps(c) });
    }
    let uid = identity.creds.as_ref().map_or(own, |c| c.uid);
    // The task's pids limit without a pids cgroup: every process of its own uid is its.
    identity.nproc = launch
        .limits
        .as_ref()
        .and_then(|l| l.nproc)
        .filter(|_| launch.host_run_as.uid == Some(uid) && uid != own);
    (host_env(uid, &launch.env), identity)
}

/// The capability sets of a host task that runs as another user than the agent.
pub fn other_user_caps() -> CapSets {
    const CAP_SETPCAP: u64 = 1 << 8;
    let own_bounding = own_caps("CapBnd:").unwrap_or(0);
    let may_drop = own_caps("CapEff:").is_some_and(|e| e & CAP_SETPCAP != 0);
    CapSets {
        bounding: if may_drop { 0 } else { own_bounding },
        ..CapSets::default()
    }
}

/// `creds` with no capability (see `other_user_caps`), for a changed identity.
pub fn without_caps(creds: Creds) -> Creds {
    Creds {
        caps: Some(other_user_caps()),
        ..creds
    }
}

fn own_caps(key: &str) -> Option<u64> {
    crate::sys::procfs::Status::own().ok()?.mask(key)
}

/// Sets the shim's own limits to the tasks' (inherited by every command it starts): the
/// hard open-file limit is raised to containerd's where the agent may
/// (`CAP_SYS_RESOURCE`), else lowered to it or kept when already lower.
pub fn set_task_limits() -> io::Result<()> {
    if setrlimit(Resource::RLIMIT_NOFILE, NOFILE_SOFT, NOFILE_HARD).is_err() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        let hard = hard.min(NOFILE_HARD);
        setrlimit(Resource::RLIMIT_NOFILE, NOFILE_SOFT.min(hard), hard)?;
    }
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_environment_names_its_user_and_not_the_shell() {
        let env = host_env(
            0,
            &[EnvVar {
                name: "USER".into(),
                value: "chosen".into(),
            }],
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("HOME"), Some("/root".into()));
        assert_eq!(get("LOGNAME"), Some("root".into()));
        assert_eq!(get("USER"), Some("chosen".into()), "the task's own wins");
        for v in SHELL_VARS {
            assert_eq!(get(v), None, "{v}");
        }
        let nobody = host_env(2_000_000_123, &[]);
        assert!(nobody.iter().any(|(k, v)| k == "HOME" && v == "/"));
        assert!(!nobody.iter().any(|(k, _)| k == "USER" || k == "LOGNAME"));
    }
}
