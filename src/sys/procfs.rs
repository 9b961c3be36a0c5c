//! Reading /proc: process identity (pid, start time, pidfd inode), stat, environment.

use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;

/// A process as it was when recorded. The pid alone could be reused; the start time
/// (clock ticks, 10 ms) tells processes apart only across ticks; the inode of a pidfd on
/// pidfs (Linux 6.9+) is unique on this boot, so where it was recorded it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcIdentity {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat (clock ticks after boot).
    pub start_time: u64,
    /// The pidfs inode of the process's pidfds (`None`: older kernels, older journals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pidfd_ino: Option<u64>,
}

impl ProcIdentity {
    /// The process that has `pid` now, with its pidfd inode where pidfs gives one.
    pub fn of(pid: i32) -> Option<Self> {
        let fd = pidfd_open(pid);
        let s = stat(pid)?;
        let pidfd_ino = match &fd {
            // The stat read is this pidfd's process only if it still holds the pid: a
            // process that was reaped meanwhile shows no pid in the pidfd's fdinfo.
            Some(fd) if pidfd_holds(fd.as_fd(), pid) => pidfs_inode(fd.as_fd()),
            Some(_) => return None,
            None => None,
        };
        Some(ProcIdentity {
            pid,
            start_time: s.start_time,
            pidfd_ino,
        })
    }

    /// A recorded identity without a pidfd inode (older journals, tests).
    pub fn without_inode(pid: i32, start_time: u64) -> Self {
        ProcIdentity {
            pid,
            start_time,
            pidfd_ino: None,
        }
    }

    /// Whether a pidfd's inode (`now`, of the process that has the pid now) fits this
    /// recorded identity: equal where both are known; where either is not (an older
    /// kernel, an older journal) the start time, checked by the caller, decides alone.
    pub fn inode_matches(&self, now: Option<u64>) -> bool {
        match (self.pidfd_ino, now) {
            (Some(then), Some(now)) => then == now,
            _ => true,
        }
    }

    /// True when the same process (not a reused pid, not a zombie, not exiting) is still
    /// there. An exiting PID-namespace init lingers while its namespace is torn down, so
    /// `PF_EXITING` counts as gone.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start_time == self.start_time
            && s.state != 'Z' && s.state != 'X' && s.flags & PF_EXITING == 0)
    }
}

/// Kernel task flag: the process is exiting.
const PF_EXITING: u64 = 0x4;

/// `PIDFS_MAGIC`: the file system of pidfds from Linux 6.9 (before: anonymous inodes,
/// one inode for all).
pub(crate) const PIDFS_MAGIC: u64 = 0x5049_4446;

/// A pidfd of the process that has `pid` now (`None`: no such process, or no pidfds).
pub fn pidfd_open(pid: i32) -> Option<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// The inode of a pidfd where pidfds live on pidfs: the same for every pidfd of one
/// process, never reused within a boot. `None` on older kernels.
pub fn pidfs_inode(fd: BorrowedFd<'_>) -> Option<u64> {
    let fs = rustix::fs::fstatfs(fd).ok()?;
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between targets
    if fs.f_type as u64 != PIDFS_MAGIC {
        return None;
    }
    Some(rustix::fs::fstat(fd).ok()?.st_ino as u64)
}

/// Whether the pidfd's process still has `pid` (is not reaped), by the pidfd's fdinfo.
fn pidfd_holds(fd: BorrowedFd<'_>, pid: i32) -> bool {
    use std::os::fd::AsRawFd;
    fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).is_ok_and(|info| {
        info.lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|p| p.trim().parse::<i32>().ok())
            == Some(pid)
    })
}

#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub flags: u64,
    pub start_time: u64,
}

pub fn stat(pid: i32) -> Option<Stat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub fn parse_stat(text: &str) -> Option<Stat> {
    // comm may contain spaces and ')', so split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        flags: f.get(6)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

/// The stat of process `pid` of the /proc at `proc`.
pub fn stat_at(proc: BorrowedFd<'_>, pid: i32) -> Option<Stat> {
    use std::io::Read;
    let f = rustix::fs::openat(
        proc,
        format!("{pid}/stat"),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let mut text = String::new();
    fs::File::from(f).read_to_string(&mut text).ok()?;
    parse_stat(&text)
}

/// The pids the /proc at `proc` lists.
pub fn pids_at(proc: BorrowedFd<'_>) -> Vec<i32> {
    let Ok(dir) = rustix::fs::Dir::read_from(proc) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str().ok()?.parse().ok())
        .collect()
}

/// All live pids.
pub fn pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The NUL-separated environment a process was exec'ed with, as bytes.
pub fn environ(pid: i32) -> std::io::Result<Vec<(OsString, OsString)>> {
    let raw = fs::read(format!("/proc/{pid}/environ"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let eq = kv.iter().position(|b| *b == b'=')?;
            (eq > 0).then(|| {
                (
                    OsString::from_vec(kv[..eq].to_vec()),
                    OsString::from_vec(kv[eq + 1..].to_vec()),
                )
            })
        })
        .collect())
}

/// This process's effective capabilities (bit N: capability N).
pub fn own_effective_caps() -> std::io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| std::io::Error::other("no CapEff in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comm_with_parens() {
        let line = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.state, s.ppid, s.pgrp, s.start_time), ('S', 1, 42, 98765));
    }

    #[test]
    fn own_identity_is_alive() {
        let me = ProcIdentity::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        let reused = ProcIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_alive());
    }

    #[test]
    fn identities_carry_the_pidfs_inode_on_this_kernel() {
        // This machine runs Linux 6.18: pidfds are on pidfs, one inode per process.
        let me = ProcIdentity::of(std::process::id() as i32).unwrap();
        let ino = me.pidfd_ino.expect("a pidfs inode");
        assert_eq!(ProcIdentity::of(me.pid).unwrap().pidfd_ino, Some(ino));
        let parent = ProcIdentity::of(std::os::unix::process::parent_id() as i32).unwrap();
        assert_ne!(parent.pidfd_ino, Some(ino));
        assert!(me.inode_matches(Some(ino)) && !me.inode_matches(Some(ino + 1)));
        assert!(ProcIdentity::without_inode(me.pid, me.start_time).inode_matches(Some(ino)));
        // Old journals, without the field, still read.
        let old: ProcIdentity = serde_json::from_str(r#"{"pid":7,"startTime":9}"#).unwrap();
        assert_eq!(old, ProcIdentity::without_inode(7, 9));
        let json = serde_json::to_string(&me).unwrap();
        assert!(json.contains("pidfdIno"), "{json}");
    }
}
