//! Finding, once at the agent's start, where task cgroups of each controller are made.

use std::fs;
use std::path::{Path, PathBuf};

use super::{CPU, CPUACCT, Controllers, MEMORY, PIDS, Place};
use crate::runtime::containment::{Kind, Parent, make_parent};
use crate::sys::procfs;

/// Finds the controllers task cgroups can have, next to `containment` (the containment
/// cgroups' parent; `None`: no cgroup per task, `why_none` says why). Blocking.
pub fn detect(containment: Option<&Parent>, why_none: &str) -> Controllers {
    let Some(parent) = containment else {
        return Controllers::none(&format!("no cgroup per task: {why_none}"));
    };
    let (Ok(mounts), Ok(own)) = (procfs::own_mountinfo(), procfs::cgroups_text(None)) else {
        return Controllers::none("/proc/self/mountinfo or /proc/self/cgroup unreadable");
    };
    let mut c = Controllers::default();
    let wanted: &[&'static str] = &[MEMORY, CPU, PIDS, CPUACCT];
    for &ctl in wanted {
        // v2: the containment cgroup itself (cpuacct has no v2 controller: `cpu.stat`
        // counts CPU time in every v2 cgroup).
        let v2 = match (parent.kind, ctl) {
            (Kind::V2, CPUACCT) => {
                // Not needed: containment's `cpu.stat` counts it.
                c.missing
                    .insert(ctl, "CPU time is counted by the cgroup v2 cpu.stat".into());
                continue;
            }
            (Kind::V2, _) => enable_v2(&parent.dir, ctl),
            _ => Err("task cgroups are not cgroup v2".to_string()),
        };
        match v2 {
            Ok(()) => {
                c.found.insert(ctl, Place::Containment);
                continue;
            }
            Err(v2_why) => match v1_parent(ctl, &mounts, &own) {
                Ok(dir) => {
                    c.found.insert(ctl, Place::V1(dir));
                }
                Err(v1_why) => {
                    let why = if parent.kind == Kind::V2 {
                        format!("cgroup v2: {v2_why}; cgroup v1: {v1_why}")
                    } else {
                        format!("cgroup v1: {v1_why}")
                    };
                    c.missing.insert(ctl, why);
                }
            },
        }
    }
    c
}

/// Enables `ctl` for the children of the v2 directory `dir` (the task cgroups' parent,
/// which holds no process): it must be available there, which its parent (the agent's
/// cgroup) decides.
fn enable_v2(dir: &Path, ctl: &str) -> Result<(), String> {
    let listed = |file: &str| {
        fs::read_to_string(dir.join(file))
            .map(|t| t.split_whitespace().any(|c| c == ctl))
            .unwrap_or(false)
    };
    if !listed("cgroup.controllers") {
        // The agent's cgroup may enable it for its children unless it holds processes
        // itself (v2's "no internal processes" rule), as it does in most containers.
        let up = dir.parent().unwrap_or(dir);
        if let Err(e) = fs::write(up.join("cgroup.subtree_control"), format!("+{ctl}")) {
            let hint = if e.raw_os_error() == Some(nix::libc::EBUSY) {
                ": it holds processes (cgroup v2 enables a controller only for the children \
                 of a cgroup without processes of its own); run the agent in a leaf cgroup \
                 below one that delegates the controller"
            } else {
                ""
            };
            return Err(format!(
                "the {ctl} controller is not enabled for {} and can't be ({e}){hint}",
                up.display()
            ));
        }
        if !listed("cgroup.controllers") {
            return Err(format!("the {ctl} controller is not available"));
        }
    }
    if !listed("cgroup.subtree_control") {
        fs::write(dir.join("cgroup.subtree_control"), format!("+{ctl}"))
            .map_err(|e| format!("enabling {ctl} in {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The v1 directory for task cgroups of `ctl`: made (and probed) under the agent's own
/// cgroup of the hierarchy that has it.
fn v1_parent(ctl: &str, mounts: &str, own: &str) -> Result<PathBuf, String> {
    let (mount, controllers) = v1_mount(ctl, mounts).ok_or("not mounted")?;
    let mut want: Vec<&str> = controllers.iter().map(String::as_str).collect();
    want.sort_unstable();
    let path = procfs::cgroup_entries(own)
        .find(|e| {
            let mut have: Vec<&str> = e.controllers.split(',').collect();
            have.sort_unstable();
            have == want
        })
        .ok_or("the agent is in no cgroup of it")?
        .path;
    let dir = make_parent(&mount, path)?;
    // Old kernels: a v1 memory cgroup counts against its parent's limit only with this.
    if ctl == MEMORY
        && fs::read_to_string(dir.join("memory.use_hierarchy")).is_ok_and(|t| t.trim() == "0")
    {
        fs::write(dir.join("memory.use_hierarchy"), b"1")
            .map_err(|e| format!("memory.use_hierarchy of {}: {e}", dir.display()))?;
    }
    let probe = dir.join(format!("probe-{}", std::process::id()));
    fs::create_dir(&probe).map_err(|e| format!("cannot create {}: {e}", probe.display()))?;
    let _ = fs::remove_dir(&probe);
    Ok(dir)
}

/// The mount of the v1 hierarchy with `ctl`, and all of its controllers.
fn v1_mount(ctl: &str, mounts: &str) -> Option<(PathBuf, Vec<String>)> {
    const KNOWN: [&str; 14] = [
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "freezer",
        "net_cls",
        "blkio",
        "perf_event",
        "net_prio",
        "hugetlb",
        "pids",
        "rdma",
        "misc",
    ];
    let m = procfs::cgroup_mounts(mounts).find(|m| !m.v2 && m.has(ctl))?;
    let controllers = m
        .options
        .into_iter()
        .filter(|o| KNOWN.contains(&o.as_str()))
        .collect();
    Some((m.point, controllers))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this machine's real hierarchies: the v1 controllers are found (it has them)
    /// and a process entering a task's cgroups gets its limits.
    #[test]
    fn this_machines_v1_controllers_take_limits() {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        for ctl in [MEMORY, CPU, CPUACCT, PIDS] {
            let dir = v1_parent(ctl, &mounts, &own)
                .unwrap_or_else(|e| panic!("this machine has a v1 {ctl} hierarchy: {e}"));
            assert!(
                dir.ends_with(crate::runtime::containment::PARENT_NAME),
                "{}",
                dir.display()
            );
        }
    }
}
