//! Reading /proc: process identity (pid + start time), stat, environment.

use std::ffi::OsString;
use std::fs;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStringExt;

/// A process as it was when recorded: the pid alone could be reused, the start time can't.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcIdentity {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat (clock ticks after boot).
    pub start_time: u64,
}

impl ProcIdentity {
    pub fn of(pid: i32) -> Option<Self> {
        stat(pid).map(|s| ProcIdentity {
            pid,
            start_time: s.start_time,
        })
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
}
