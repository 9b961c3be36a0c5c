//! Preparing a sidecar task's entry into the main container, in the shim before its
//! reaper is forked: every path under /proc is resolved here, in the shim's own mount
//! namespace, and the results are open descriptors the reaper uses from inside.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;

use nix::sched::CloneFlags;

use super::cgroup;
use super::ns_reaper::Entry;
use crate::runtime::child_setup::{Creds, Cwd};
use crate::runtime::procfs;
use crate::runtime::records::Target;

pub struct Prepared {
    pub entry: Entry,
    /// The main container's environment (its PID 1's), which the task's overlays.
    pub env: Vec<(OsString, OsString)>,
    /// The main container's working directory, for a task that gives none.
    pub target_cwd: Cwd,
    pub creds: Option<Creds>,
}

/// Opens the target's namespaces, working directory and cgroups, reads its environment
/// and identity. Fails when the target is gone or its pid now names another process.
pub fn prepare(target: &Target) -> io::Result<Prepared> {
    let pid = target.process.pid;
    let gone = |what: &str| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("main container {:?} (pid {pid}) {what}", target.container),
        )
    };
    if !target.process.is_alive() {
        return Err(gone("is no longer running"));
    }
    let open = |name: &str| -> io::Result<OwnedFd> {
        Ok(File::open(format!("/proc/{pid}/{name}"))?.into())
    };
    // The mount namespace last: once in it, the reaper resolves no more host paths.
    let namespaces = vec![
        (open("ns/uts")?, CloneFlags::CLONE_NEWUTS),
        (open("ns/ipc")?, CloneFlags::CLONE_NEWIPC),
        (open("ns/net")?, CloneFlags::CLONE_NEWNET),
        (open("ns/mnt")?, CloneFlags::CLONE_NEWNS),
    ];
    let pid_ns = open("ns/pid")?;
    let target_cwd = Cwd::Fd(rustix::fs::open(
        format!("/proc/{pid}/cwd"),
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?);
    let env = procfs::environ(pid)?;
    let cgroup = if target.join_cgroup {
        Some(cgroup::Join::prepare(pid)?)
    } else {
        None
    };
    let creds = if target.run_as_target_user {
        Some(creds(pid)?)
    } else {
        None
    };
    // Checked again after opening: the descriptors now pin the right process's namespaces.
    if !target.process.is_alive() {
        return Err(gone("exited during task start"));
    }
    Ok(Prepared {
        entry: Entry {
            namespaces,
            pid_ns,
            cgroup,
            proc: File::open("/proc")?.into(),
        },
        env,
        target_cwd,
        creds,
    })
}

/// The target's effective uid and gid and its supplementary groups.
fn creds(pid: i32) -> io::Result<Creds> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let ids = |key: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let missing = |key: &str| io::Error::other(format!("no {key} in /proc/{pid}/status"));
    // Uid:/Gid: list real, effective, saved, filesystem ids: the effective one applies.
    let uid = *ids("Uid:").get(1).ok_or_else(|| missing("Uid:"))?;
    let gid = *ids("Gid:").get(1).ok_or_else(|| missing("Gid:"))?;
    Ok(Creds {
        uid,
        gid,
        groups: ids("Groups:"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creds_are_the_effective_ids_and_all_groups() {
        let me = creds(std::process::id() as i32).unwrap();
        assert_eq!(me.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(me.gid, nix::unistd::getegid().as_raw());
        let groups: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(me.groups, groups);
    }
}
