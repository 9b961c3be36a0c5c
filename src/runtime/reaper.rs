//! The agent is a child subreaper (it is PID 1 in many pods): orphaned descendants are
//! re-parented to it and reaped here, so none lingers as a zombie.
//!
//! Only orphans are reaped, never a child that code in the agent waits for itself: a
//! `waitpid(-1)` here would take the exit status of, say, a kubeconfig `exec` credential
//! plugin run with `std::process::Command`, whose own wait then fails with ECHILD. The two
//! are told apart by process group. A `Command` child is in the agent's group (`Command`
//! keeps it unless asked otherwise), while orphans never are: shims start sessions of their
//! own, tasks groups of their own, and the shim server the agent starts (with the shims it
//! forks, until they call setsid) is put in a group of its own by the launcher. So an
//! exited child is reaped here, by pid, when its group is not the agent's. (A process that
//! a `Command` child left behind in the agent's group is not reaped here: nothing tells it
//! from the child itself.)
//!
//! A zombie that leads a process group with live members is left unreaped until they are
//! gone. When a task's shim dies, the task's main process and the shim's other orphans (a
//! double-forked `(cmd &)`, no longer a descendant of main) are re-parented here; main may
//! then exit at any moment (its output pipe broke, say), and reaping it at once would make
//! its group unprovable: the agent signals a group only while its leader is unreaped, so
//! a pid reused meanwhile is never taken for the task's group (`signal_group`). Left a
//! zombie, main lets the agent stop its group's survivors. It costs no pid: the kernel
//! keeps a number taken while it is any live process's group id anyway.

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use crate::sys::procfs;

pub fn start() -> std::io::Result<()> {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans go to init");
    }
    let mut sigchld = signal(SignalKind::child())?;
    let own_group = nix::unistd::getpgrp().as_raw();
    tokio::spawn(async move {
        loop {
            reap_orphans(own_group);
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(())
}

/// Reaps every exited child of this process whose process group is not `own_group`;
/// returns how many. Only this function reaps such children, so a zombie seen here stays
/// one (and its pid its own) until the `waitpid` on its pid below.
pub fn reap_orphans(own_group: i32) -> usize {
    let zombies: Vec<i32> = procfs::own_children()
        .into_iter()
        .filter(|&pid| procfs::stat(pid).is_some_and(|s| s.state == 'Z' && s.pgrp != own_group))
        .collect();
    if zombies.is_empty() {
        return 0;
    }
    let led = groups_with_live_members();
    let mut reaped = 0;
    for pid in zombies {
        if led.contains(&pid) {
            continue; // reaped once its group is gone (see the module's doc)
        }
        loop {
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Err(Errno::EINTR) => continue,
                Ok(WaitStatus::StillAlive) => {}
                Ok(_) => reaped += 1,
                Err(e) => tracing::warn!(pid, error = %e, "waitpid failed"),
            }
            break;
        }
    }
    reaped
}

/// The group ids of live (not zombie) processes: one scan of /proc, only when a zombie
/// waits to be reaped.
pub fn groups_with_live_members() -> std::collections::HashSet<i32> {
    procfs::pids()
        .into_iter()
        .filter_map(procfs::stat)
        .filter(|s| s.state != 'Z')
        .map(|s| s.pgrp)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;

    fn state(pid: i32) -> Option<char> {
        procfs::stat(pid).map(|s| s.state)
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_zombie_leading_a_live_group_is_reaped_once_the_group_is_gone() {
        use std::io::Read;
        use std::os::unix::process::CommandExt;
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        let own = nix::unistd::getpgrp().as_raw();
        // A group leader that exits at once, leaving a double-forked member (re-parented
        // to this process, a subreaper).
        // Reaped by `reap_orphans`, which is what is tested.
        #[allow(clippy::zombie_processes)]
        let mut lead = Command::new("sh")
            .args(["-c", "(sleep 37 >/dev/null 2>&1 & echo $!); exit 0"])
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut out = String::new();
        lead.stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let member: i32 = out.trim().parse().unwrap();
        let leader = lead.id() as i32;
        wait_until("the leader to exit", || state(leader) == Some('Z'));
        assert_eq!(procfs::stat(member).unwrap().pgrp, leader);
        reap_orphans(own);
        assert_eq!(state(leader), Some('Z'), "reaped while its group lives");
        nix::sys::signal::kill(Pid::from_raw(member), nix::sys::signal::Signal::SIGKILL).unwrap();
        wait_until("the member to die", || state(member) == Some('Z'));
        assert_eq!(reap_orphans(own), 2);
        assert_eq!((state(leader), state(member)), (None, None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphans_are_reaped_and_a_commands_child_keeps_its_exit_status() {
        start().unwrap();
        // A child of code in the agent that collects its status later (as a `Child` kept
        // by its owner does), and one that collects it at once (as `output()` does).
        let mut kept = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        // An orphan: the shell exits at once; `sleep`, in a session of its own, is
        // re-parented to this process (a subreaper now) and exits a moment later.
        let out = tokio::task::spawn_blocking(|| {
            Command::new("sh")
                .args(["-c", "setsid sleep 0.3 & echo $!; exit 3"])
                .output()
        })
        .await
        .unwrap()
        .expect("a Command's output() gets the child's status");
        assert_eq!(out.status.code(), Some(3));
        let orphan: i32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_until("the orphan to be re-parented and reaped", || {
            state(orphan).is_none()
        });
        // The kept child exited long ago (SIGCHLD came, the reaper ran): still there for
        // its owner's wait.
        let kept_pid = kept.id() as i32;
        wait_until("the kept child to exit", || state(kept_pid) == Some('Z'));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = kept.wait().expect("the child's exit status is still there");
        assert_eq!(status.code(), Some(7));

        // Many at once, while orphans come and go: every status reaches its waiter.
        let waits: Vec<_> = (0..40)
            .map(|i| {
                tokio::task::spawn_blocking(move || {
                    let script = format!("setsid true & exit {}", i % 50);
                    Command::new("sh")
                        .args(["-c", &script])
                        .status()
                        .map(|s| (i, s))
                })
            })
            .collect();
        for w in waits {
            let (i, s) = w.await.unwrap().expect("status");
            assert_eq!(s.code(), Some(i % 50));
        }
        wait_until("no zombie child left outside the own group", || {
            let own = nix::unistd::getpgrp().as_raw();
            procfs::own_children()
                .into_iter()
                .all(|p| procfs::stat(p).is_none_or(|s| s.state != 'Z' || s.pgrp == own))
        });
    }
}
