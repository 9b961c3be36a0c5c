//! Handles that stay bound to one process: a signal sent through one reaches that process
//! or nobody, however its pid is reused meanwhile.
//!
//! `ProcHandle` is an open `/proc/PID` directory: reading `stat` through it reads that
//! process (ESRCH once it has been reaped), and `pidfd_send_signal` accepts it like a
//! pidfd (Linux 5.1). It works with any /proc (the reaper holds the shim's while it lives
//! inside the main container). `PidFd` is a pollable pidfd (`pidfd_open`, Linux 5.3):
//! readable once the process has exited.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::signal::Signal;
use rustix::fs::{Mode, OFlags, openat};

use super::procfs::{self, ProcIdentity, Stat};

pub struct ProcHandle {
    fd: OwnedFd,
    pub pid: i32,
}

impl ProcHandle {
    /// Opens process `pid` of the /proc at `proc` and reads its stat through the handle.
    pub fn open_at(proc: BorrowedFd<'_>, pid: i32) -> io::Result<(ProcHandle, Stat)> {
        let fd = openat(
            proc,
            pid.to_string(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let h = ProcHandle { fd, pid };
        let stat = h.stat()?;
        Ok((h, stat))
    }

    /// The recorded process, if it is still there (a zombie counts: its pid is not free).
    /// Where its pidfd inode was recorded, a pidfd opened after the handle must show the
    /// same one: the recorded process then held the pid from its record until now, so
    /// the handle is its own, even when another process got the pid within the same
    /// clock tick (same start time).
    pub fn of(id: &ProcIdentity) -> Option<ProcHandle> {
        if id.pid <= 0 {
            return None;
        }
        let proc = File::open("/proc").ok()?;
        let (h, stat) = Self::open_at(proc.as_fd(), id.pid).ok()?;
        if stat.start_time != id.start_time {
            return None;
        }
        if id.pidfd_ino.is_some() {
            let now = procfs::pidfd_open(id.pid).and_then(|fd| procfs::pidfs_inode(fd.as_fd()));
            if !id.inode_matches(now) {
                return None;
            }
        }
        Some(h)
    }

    /// The process's stat now; an error (ESRCH) once it has been reaped.
    pub fn stat(&self) -> io::Result<Stat> {
        let f = openat(
            &self.fd,
            "stat",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        procfs::parse_stat(&procfs::read_text(f)?)
            .ok_or_else(|| io::Error::other("unparsable stat"))
    }

    /// The pids of its children (as its /proc shows them), from each of its threads'
    /// `children` file, read through this handle: a dead process has none, never those of
    /// a process that reused its pid. `None` where the kernel has no such file
    /// (CONFIG_PROC_CHILDREN).
    pub fn children(&self) -> Option<Vec<i32>> {
        let task = openat(
            &self.fd,
            "task",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let mut out = Vec::new();
        for tid in procfs::pids_at(task.as_fd()) {
            let f = match openat(
                &task,
                format!("{tid}/children"),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(f) => f,
                Err(rustix::io::Errno::NOENT) if tid == self.pid => return None,
                Err(_) => continue, // a thread that just ended
            };
            if let Ok(text) = procfs::read_text(f) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
        Some(out)
    }

    /// True until the process has been reaped (its pid, and a group it leads, stay taken).
    pub fn unreaped(&self) -> bool {
        self.stat().is_ok()
    }

    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        let raw = rustix::process::Signal::from_named_raw(sig as i32)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        match rustix::process::pidfd_send_signal(&self.fd, raw) {
            // Before Linux 5.1: checked through the handle a moment before, by pid.
            Err(rustix::io::Errno::NOSYS) => {
                self.stat()?;
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig)?;
                Ok(())
            }
            other => other.map_err(io::Error::from),
        }
    }
}

/// Whether this process can signal through handles (`pidfd_send_signal`): a seccomp
/// profile older than the call answers EPERM, and every stop would then be a silent
/// no-op. Checked on a child of its own (SIGKILLed through a handle, then reaped).
pub fn check_signalling() -> Result<(), String> {
    let mut child = std::process::Command::new("/proc/self/exe")
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .or_else(|_| {
            std::process::Command::new("sleep")
                .arg("1")
                .stdout(std::process::Stdio::null())
                .spawn()
        })
        .map_err(|e| format!("cannot start a process to check signalling: {e}"))?;
    let id = ProcIdentity::of(child.id() as i32);
    let sent = id
        .as_ref()
        .and_then(ProcHandle::of)
        .map(|h| h.signal(Signal::SIGKILL));
    let _ = child.kill();
    let _ = child.wait();
    match sent {
        // Gone already: the check says nothing either way, so it passes (rare).
        None => Ok(()),
        Some(Ok(())) => Ok(()),
        Some(Err(e)) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        Some(Err(e)) => Err(format!(
            "the agent cannot signal processes through pidfd_send_signal ({e}): stopping \
             tasks would fail silently; allow pidfd_open and pidfd_send_signal in the \
             container's seccomp profile"
        )),
    }
}

/// A pidfd of a recorded process, for waiting on its exit without a thread.
pub struct PidFd(OwnedFd);

impl PidFd {
    /// A pidfd of the recorded process if it is still there (exited but unreaped counts).
    /// The identity is checked after opening: a pidfd opened on a reused pid would show
    /// another start time, so a match proves the pidfd is the recorded process's.
    /// Where its pidfd inode was recorded, the pidfd's own inode must match it too.
    pub fn of(id: &ProcIdentity) -> Option<PidFd> {
        let pid = rustix::process::Pid::from_raw(id.pid)?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).ok()?;
        let same = procfs::stat(id.pid).is_some_and(|s| s.start_time == id.start_time)
            && id.inode_matches(procfs::pidfs_inode(fd.as_fd()));
        same.then_some(PidFd(fd))
    }

    /// Its pid in this process's PID namespace, or `None` once the process was reaped
    /// (from the pidfd's fdinfo, so it is the process's own, never a reused pid's).
    pub fn pid(&self) -> Option<i32> {
        let proc = File::open("/proc").ok()?;
        pidfd_pid_at(proc.as_fd(), self.0.as_fd())
    }

    pub fn into_fd(self) -> OwnedFd {
        self.0
    }
}

/// The pid a pidfd (of this process) refers to, in the PID namespace of the /proc at
/// `proc`; `None` once the process was reaped.
pub fn pidfd_pid_at(proc: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let f = openat(
        proc,
        format!("self/fdinfo/{}", fd.as_raw_fd()),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let info = procfs::read_text(f).ok()?;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()?;
    (pid > 0).then_some(pid)
}

/// Sends `sig` to every process of the group `leader` leads, provided the group is
/// provably still the leader's: its members are found and each is pinned by a handle
/// while the leader is unreaped, and the leader is checked again afterwards. While the
/// leader is unreaped its pid is taken, so no other process can have created a group of
/// that number in between. A leader already reaped: nothing is signalled (the group id
/// may name someone else's group by now). Returns how many processes were signalled.
pub fn signal_group(leader: &ProcIdentity, sig: Signal) -> usize {
    let Some(lead) = ProcHandle::of(leader) else {
        return 0;
    };
    let Ok(proc) = File::open("/proc") else {
        return 0;
    };
    let members: Vec<ProcHandle> = procfs::pids()
        .into_iter()
        .filter(|p| procfs::stat(*p).is_some_and(|s| s.pgrp == leader.pid))
        .filter_map(|p| {
            let (h, st) = ProcHandle::open_at(proc.as_fd(), p).ok()?;
            (st.pgrp == leader.pid).then_some(h)
        })
        .collect();
    if !lead.unreaped() {
        return 0;
    }
    members.iter().filter(|h| h.signal(sig).is_ok()).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_handle_never_reaches_a_reaped_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = ProcIdentity::of(child.id() as i32).unwrap();
        let h = ProcHandle::of(&id).expect("live child");
        let pidfd = PidFd::of(&id).expect("pidfd");
        assert_eq!(pidfd.pid(), Some(id.pid));
        assert!(h.unreaped());
        h.signal(Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(!h.unreaped());
        assert!(
            h.signal(Signal::SIGKILL).is_err(),
            "ESRCH, whoever has the pid now"
        );
        assert_eq!(pidfd.pid(), None);
        assert!(ProcHandle::of(&id).is_none());
        let wrong = ProcIdentity {
            start_time: id.start_time + 1,
            ..ProcIdentity::of(std::process::id() as i32).unwrap()
        };
        assert!(ProcHandle::of(&wrong).is_none() && PidFd::of(&wrong).is_none());
    }

    /// A pid reused within one clock tick shows the recorded start time: only the pidfd
    /// inode tells the processes apart. Staged with a live process recorded with its own
    /// pid and start time but another inode: it is never reached.
    #[test]
    fn a_recorded_inode_that_differs_is_another_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let id = ProcIdentity::of(child.id() as i32).unwrap();
        let ino = id.pidfd_ino.expect("pidfs on this kernel");
        let other = ProcIdentity {
            pidfd_ino: Some(ino + 1),
            ..id
        };
        assert!(ProcHandle::of(&other).is_none());
        assert!(PidFd::of(&other).is_none());
        assert_eq!(signal_group(&other, Signal::SIGKILL), 0);
        assert!(ProcHandle::of(&id).is_some() && PidFd::of(&id).is_some());
        // An identity recorded without an inode falls back to the start time.
        let old = ProcIdentity::without_inode(id.pid, id.start_time);
        assert!(ProcHandle::of(&old).is_some());
        assert!(child.try_wait().unwrap().is_none(), "never signalled");
        assert_eq!(signal_group(&id, Signal::SIGKILL), 1);
        child.wait().unwrap();
    }
}
