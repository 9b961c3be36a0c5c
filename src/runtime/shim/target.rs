//! Preparing a sidecar task's entry into the main container, in the shim before its
//! reaper is forked: every path under /proc is resolved here, in the shim's own mount
//! namespace, and the results are open descriptors the reaper uses from inside.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use nix::sched::CloneFlags;

use super::cgroup;
use super::ns_reaper::Entry;
use crate::runtime::child_setup::{CapSets, Creds, Cwd};
use crate::runtime::journal::Target;
use crate::sys::procfs;

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

/// The target's effective uid and gid, its supplementary groups and its capability sets
/// (as far as this process holds them: a task never gets more than its supervisor has).
fn creds(pid: i32) -> io::Result<Creds> {
    let status = procfs::Status::of(pid)?;
    let (theirs, ours) = (status.caps()?, procfs::Status::own()?.caps()?);
    let held = ours.permitted;
    let permitted = theirs.permitted & held;
    let inheritable = theirs.inheritable & (held | ours.inheritable);
    let caps = CapSets {
        inheritable,
        permitted,
        effective: theirs.effective & permitted,
        bounding: theirs.bounding,
        ambient: theirs.ambient & permitted & inheritable,
    };
    Ok(Creds {
        uid: status.effective_id("Uid:")?,
        gid: status.effective_id("Gid:")?,
        groups: status.ids("Groups:"),
        caps: Some(caps),
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
        // Our own sets, read back as they are.
        assert_eq!(
            me.caps,
            Some(procfs::Status::own().unwrap().caps().unwrap())
        );
    }
}
