//! Upstream's way to find the main container outside Kubernetes: the process whose
//! environment holds `SANDBOX_MAIN_CONTAINER=<name>`. Any process can set a variable, so
//! the environment only names the container; what makes a process a candidate is its
//! place, which a task can't forge:
//!
//! - it is PID 1 of a PID namespace other than the agent's (a container's init; a task
//!   joined to the main container is never its PID 1), or, in the agent's own PID
//!   namespace (a pod's shared one), its parent is outside that namespace (the runtime
//!   started it; whatever is started or re-parented inside has a parent inside);
//! - that namespace's user namespace is the agent's (a task without privilege can make a
//!   PID namespace only inside a user namespace of its own);
//! - no process running the agent's executable (the agent, a task's supervisor) is among
//!   its ancestors (a privileged `Local` task that made a PID namespace of its own is
//!   still below its supervisor, or below the agent, which is a child subreaper).
//!
//! No variable a task can drop (`TASK_EXECUTOR_TASK`) decides anything. In a pod
//! (`POD_NAME` set) this locator is not used at all: the Pod and CRI say (`kube::locator`).

use std::os::unix::fs::MetadataExt;

use futures::future::BoxFuture;

use super::sidecar::MainContainerLocator;
use crate::sys::procfs::{self, ProcIdentity};

pub struct EnvLocator {
    pub container: String,
}

impl MainContainerLocator for EnvLocator {
    fn locate(&self) -> BoxFuture<'_, Result<ProcIdentity, String>> {
        let container = self.container.clone();
        Box::pin(async move { crate::sys::offload::offload(move || scan_env(&container)).await })
    }
}

/// What the scan compares candidates with: the agent's own namespaces and executable.
struct Own {
    pid: i32,
    pid_ns: Option<std::path::PathBuf>,
    user_ns: Option<std::path::PathBuf>,
    /// (device, inode) of the agent's executable.
    exe: Option<(u64, u64)>,
}

impl Own {
    fn read() -> Own {
        Own {
            pid: std::process::id() as i32,
            pid_ns: ns("self", "pid"),
            user_ns: ns("self", "user"),
            exe: exe_id("self"),
        }
    }
}

fn ns(pid: &str, kind: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()
}

fn exe_id(pid: &str) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn scan_env(container: &str) -> Result<ProcIdentity, String> {
    let want = format!("SANDBOX_MAIN_CONTAINER={container}");
    let own = Own::read();
    let mut best: Option<ProcIdentity> = None;
    let mut refused = Vec::new();
    for pid in procfs::pids() {
        if pid == own.pid {
            continue;
        }
        if !procfs::environ_has(pid, &want) {
            continue;
        }
        if let Err(why) = candidate(pid, &own) {
            refused.push(format!("{pid} ({why})"));
            continue;
        }
        if let Some(p) = ProcIdentity::of(pid)
            && best.is_none_or(|b| p.start_time < b.start_time)
        {
            best = Some(p);
        }
    }
    best.ok_or_else(|| match refused.is_empty() {
        true => format!("no process has {want} in its environment"),
        false => format!(
            "no container init has {want} in its environment (not taken: {})",
            refused.join(", ")
        ),
    })
}

/// Why process `pid` can't be a container's init, if it can't.
fn candidate(pid: i32, own: &Own) -> Result<(), &'static str> {
    let p = pid.to_string();
    let status = procfs::Status::of(pid).map_err(|_| "gone")?;
    let pid_ns = ns(&p, "pid").ok_or("gone")?;
    if Some(&pid_ns) == own.pid_ns.as_ref() {
        // A pod's shared PID namespace (the agent's too): a container's init was started
        // by the runtime from outside it, so its parent is not in the namespace (0);
        // anything started inside it, or re-parented there, has a parent in it.
        if procfs::stat(pid).map(|s| s.ppid) != Some(0) {
            return Err("not started from outside the agent's PID namespace");
        }
    } else if !status.is_namespace_init() {
        return Err("not PID 1 of its PID namespace");
    }
    if ns(&p, "user") != own.user_ns {
        return Err("in another user namespace");
    }
    if below_own_executable(pid, own) {
        return Err("started by the agent or a task");
    }
    Ok(())
}

/// True when an ancestor of `pid` runs the agent's executable (the agent, a supervisor).
fn below_own_executable(pid: i32, own: &Own) -> bool {
    let mut at = procfs::stat(pid).map(|s| s.ppid);
    // A chain is at most as long as there are processes; bound it anyway.
    for _ in 0..4096 {
        let Some(p) = at.filter(|p| *p > 0) else {
            return false;
        };
        if p == own.pid || (own.exe.is_some() && exe_id(&p.to_string()) == own.exe) {
            return true;
        }
        at = procfs::stat(p).map(|s| s.ppid);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_itself_and_its_children_are_never_candidates() {
        let own = Own::read();
        assert!(candidate(own.pid, &own).is_err());
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(below_own_executable(child.id() as i32, &own));
        let _ = child.kill();
        let _ = child.wait();
    }
}
