//! Preparing a sidecar task's entry into the main container (done by the shim, before fork).

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;

use nix::sched::CloneFlags;
use nix::unistd::{Gid, Uid};

use crate::runtime::child_setup::Join;
use crate::runtime::procfs;
use crate::runtime::records::Target;

pub struct Prepared {
    pub join: Join,
    pub pid_ns: OwnedFd,
    pub env: Vec<(String, String)>,
}

/// Opens the target's namespaces and reads its environment. Fails when the target is gone
/// or its pid now names another process.
pub fn prepare(target: &Target, working_dir: Option<&str>) -> io::Result<Prepared> {
    let pid = target.process.pid;
    if !target.process.is_alive() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "main container {:?} (pid {pid}) is no longer running",
                target.container
            ),
        ));
    }
    let ns = |name: &str| -> io::Result<OwnedFd> {
        Ok(File::open(format!("/proc/{pid}/ns/{name}"))?.into())
    };
    // Mount last: after it, /proc paths would resolve inside the target.
    let namespaces = vec![
        (ns("uts")?, CloneFlags::CLONE_NEWUTS),
        (ns("ipc")?, CloneFlags::CLONE_NEWIPC),
        (ns("net")?, CloneFlags::CLONE_NEWNET),
        (ns("mnt")?, CloneFlags::CLONE_NEWNS),
    ];
    let env = procfs::environ(pid)?;
    let cgroup_procs = if target.join_cgroup {
        cgroup_procs_files(pid)?
    } else {
        Vec::new()
    };
    let user = if target.run_as_target_user {
        Some(ids(pid)?)
    } else {
        None
    };
    let working_dir = working_dir
        .filter(|d| !d.is_empty())
        .map(|d| CString::new(d).map_err(io::Error::other))
        .transpose()?;
    // Verify again after opening: the fds now pin the namespaces of the right process.
    if !target.process.is_alive() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "main container exited during task start",
        ));
    }
    Ok(Prepared {
        join: Join {
            cgroup_procs,
            namespaces,
            working_dir,
            user,
        },
        pid_ns: ns("pid")?,
        env,
    })
}

/// The `cgroup.procs` file of each of the target's cgroups (v1 hierarchies or v2).
fn cgroup_procs_files(pid: i32) -> io::Result<Vec<CString>> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let base = if controllers.is_empty() {
            "/sys/fs/cgroup".to_string()
        } else {
            // v1 named hierarchies ("name=systemd") are mounted under their name.
            let c = controllers.trim_start_matches("name=");
            format!("/sys/fs/cgroup/{c}")
        };
        let file = format!("{base}{path}/cgroup.procs");
        if fs::metadata(&file).is_ok() {
            out.push(CString::new(file).map_err(io::Error::other)?);
        }
    }
    Ok(out)
}

fn ids(pid: i32) -> io::Result<(Uid, Gid)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |key: &str| -> io::Result<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().nth(1)) // effective id
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no {key} in /proc/{pid}/status")))
    };
    Ok((Uid::from_raw(field("Uid:")?), Gid::from_raw(field("Gid:")?)))
}
