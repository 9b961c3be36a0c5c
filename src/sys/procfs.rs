//! Reading /proc, the one place that parses it: process identity (pid, start time,
//! pidfd inode), `stat`, `status` (ids, capability sets), the environment, and the
//! cgroup views (`mountinfo`'s cgroup mounts, `/proc/PID/cgroup`).
//!
//! (The one exception is the pre-exec child in `runtime::child_setup`, which may not
//! allocate and reads `/proc/self/stat` with raw system calls.)

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

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

/// Reads a /proc file whole. Its size shows as 0, so `read_to_string` (an fstat, then
/// reads of 32, 32, 64, ... bytes) took seven calls for a `stat`; with a page of room
/// and no size to go by, it is one read and the one that finds the end. A shim reads
/// several such files for each task it starts.
pub fn read_text(f: impl Into<fs::File>) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::with_capacity(4096);
    // `take` hides the file, and with it the fstat of `File::read_to_string`.
    f.into().take(u64::MAX).read_to_string(&mut text)?;
    Ok(text)
}

/// As `read_text`, by path.
pub fn read_path(path: impl AsRef<std::path::Path>) -> io::Result<String> {
    read_text(fs::File::open(path)?)
}

/// Whether the pidfd's process still has `pid` (is not reaped), by the pidfd's fdinfo.
fn pidfd_holds(fd: BorrowedFd<'_>, pid: i32) -> bool {
    use std::os::fd::AsRawFd;
    read_path(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).is_ok_and(|info| {
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
    /// CPU time in user and kernel mode, clock ticks (fields 14 and 15).
    pub utime: u64,
    pub stime: u64,
    /// Threads of the process (field 20).
    pub threads: u64,
    pub start_time: u64,
}

pub fn stat(pid: i32) -> Option<Stat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&read_path(format!("/proc/{pid}/stat")).ok()?)
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
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
        threads: f.get(17)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

/// The stat of process `pid` of the /proc at `proc`.
pub fn stat_at(proc: BorrowedFd<'_>, pid: i32) -> Option<Stat> {
    let f = rustix::fs::openat(
        proc,
        format!("{pid}/stat"),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    parse_stat(&read_text(f).ok()?)
}

/// The pids the /proc at `proc` lists.
pub fn pids_at(proc: BorrowedFd<'_>) -> Vec<i32> {
    let Ok(dir) = rustix::fs::Dir::read_from(proc) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str().ok()?.parse().ok())
        .collect()
}

/// The inode of this process's PID namespace.
pub fn own_pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// The PID namespaces that have a process, where this process sees every one: in the
/// initial PID namespace, whose /proc lists every process of every namespace. `None`
/// elsewhere, or when the namespace of a process in a nested one can't be read (no right
/// to): then nothing tells a dead namespace from a live one. (A process of the initial
/// namespace whose link can't be read, a protected init, needs none: its `NSpid` says
/// where it is.)
pub fn live_pid_namespaces() -> Option<std::collections::HashSet<u64>> {
    use std::os::unix::fs::MetadataExt;
    // The initial PID namespace's fixed inode (`PROC_PID_INIT_INO`).
    const INITIAL: u64 = 0xEFFF_FFFC;
    if own_pid_namespace()? != INITIAL {
        return None;
    }
    let mut live = std::collections::HashSet::new();
    for pid in pids() {
        match fs::metadata(format!("/proc/{pid}/ns/pid")) {
            Ok(m) => {
                live.insert(m.ino());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // exited meanwhile
            Err(_) => match Status::of(pid).map(|s| s.ids("NSpid:").len()) {
                Ok(1) => {}                                         // the initial one
                Err(e) if e.kind() == io::ErrorKind::NotFound => {} // exited meanwhile
                _ => return None,
            },
        }
    }
    Some(live)
}

/// All live pids.
pub fn pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// This process's children: from each thread's `children` file, or a scan of /proc where
/// the kernel has none (CONFIG_PROC_CHILDREN).
pub fn own_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let lists: Option<Vec<String>> = fs::read_dir("/proc/self/task").ok().and_then(|tasks| {
        tasks
            .map(|t| read_path(t.ok()?.path().join("children")).ok())
            .collect()
    });
    match lists {
        Some(lists) => lists.iter().flat_map(|l| pid_list(l)).collect(),
        None => pids()
            .into_iter()
            .filter(|&p| stat(p).is_some_and(|s| s.ppid == me))
            .collect(),
    }
}

/// The children of process `pid`'s main thread (a shim is single-threaded); none when
/// the kernel can't list them (no `CONFIG_PROC_CHILDREN`).
pub fn children_of(pid: i32) -> Vec<i32> {
    read_path(format!("/proc/{pid}/task/{pid}/children"))
        .map(|l| pid_list(&l).collect())
        .unwrap_or_default()
}

/// The pids of a `children` file: space-separated.
fn pid_list(text: &str) -> impl Iterator<Item = i32> + '_ {
    text.split_ascii_whitespace().filter_map(|p| p.parse().ok())
}

/// The NUL-separated environment a process was exec'ed with, as bytes.
pub fn environ(pid: i32) -> io::Result<Vec<(OsString, OsString)>> {
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

/// Whether process `pid` was exec'ed with `entry` (`KEY=value`) in its environment.
/// False where it is unreadable (gone, or another user's without CAP_SYS_PTRACE).
pub fn environ_has(pid: i32, entry: &str) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == entry.as_bytes()))
}

/// This process's effective capabilities (bit N: capability N).
pub fn own_effective_caps() -> io::Result<u64> {
    Status::own()?
        .mask("CapEff:")
        .ok_or_else(|| io::Error::other("no CapEff in /proc/self/status"))
}

/// A process's five capability sets (bit N: capability N).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
}

/// A `/proc/PID/status` (or another file of `Key: value` lines, such as `smaps_rollup`),
/// read once and looked up by key (`"Uid:"`, `"CapEff:"`, `"VmRSS:"` ...).
pub struct Status {
    text: String,
    /// For error messages: `self/status`, `42/status` ...
    of: String,
}

impl Status {
    pub fn of(pid: i32) -> io::Result<Self> {
        Self::read(&format!("{pid}/status"))
    }

    pub fn own() -> io::Result<Self> {
        Self::read("self/status")
    }

    /// `/proc/PID/<file>`, a file of the same `Key: value` shape.
    pub fn file(pid: i32, file: &str) -> io::Result<Self> {
        Self::read(&format!("{pid}/{file}"))
    }

    fn read(of: &str) -> io::Result<Self> {
        Ok(Self {
            text: read_path(format!("/proc/{of}"))?,
            of: of.to_string(),
        })
    }

    /// The first number of a field (`VmRSS:` in KiB, `Threads:` ...).
    pub fn number(&self, key: &str) -> Option<u64> {
        self.field(key)?.split_whitespace().next()?.parse().ok()
    }

    #[cfg(test)]
    fn parse(text: &str) -> Self {
        Self {
            text: text.to_string(),
            of: "test".into(),
        }
    }

    fn field(&self, key: &str) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix(key))
    }

    /// A list of numbers: `Uid:`/`Gid:` (real, effective, saved, filesystem), `Groups:`.
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.field(key)
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The effective id of `Uid:` or `Gid:`.
    pub fn effective_id(&self, key: &str) -> io::Result<u32> {
        self.ids(key)
            .get(1)
            .copied()
            .ok_or_else(|| self.missing(key))
    }

    /// A hexadecimal mask (`CapEff:` ...).
    pub fn mask(&self, key: &str) -> Option<u64> {
        self.field(key)
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    }

    pub fn caps(&self) -> io::Result<CapSets> {
        let mask = |key: &str| self.mask(key).ok_or_else(|| self.missing(key));
        Ok(CapSets {
            inheritable: mask("CapInh:")?,
            permitted: mask("CapPrm:")?,
            effective: mask("CapEff:")?,
            bounding: mask("CapBnd:")?,
            // Kernels before 4.3 have no ambient set.
            ambient: mask("CapAmb:").unwrap_or(0),
        })
    }

    /// PID 1 of its own PID namespace (the last of `NSpid:`).
    pub fn is_namespace_init(&self) -> bool {
        self.field("NSpid:")
            .and_then(|ids| ids.split_whitespace().last())
            == Some("1")
    }

    fn missing(&self, key: &str) -> io::Error {
        io::Error::other(format!("no {key} in /proc/{}", self.of))
    }
}

/// When the system booted, in seconds since the epoch (`btime` of `/proc/stat`).
pub fn boot_time_seconds() -> Option<u64> {
    fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// A cgroup hierarchy mounted where this process sees it (from `/proc/self/mountinfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    pub point: PathBuf,
    /// The unified (v2) hierarchy; else a v1 one with `options`' controllers.
    pub v2: bool,
    /// The super options (`rw,memory`): a v1 hierarchy's controllers are among them.
    pub options: Vec<String>,
}

impl CgroupMount {
    pub fn has(&self, controller: &str) -> bool {
        self.options.iter().any(|o| o == controller)
    }
}

/// This process's `/proc/self/mountinfo`.
pub fn own_mountinfo() -> io::Result<String> {
    fs::read_to_string("/proc/self/mountinfo")
}

/// The cgroup mounts a `mountinfo` text lists, in its order.
pub fn cgroup_mounts(mountinfo: &str) -> impl Iterator<Item = CgroupMount> + '_ {
    mountinfo.lines().filter_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let (fstype, _source, opts) = (post.next()?, post.next()?, post.next()?);
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => return None,
        };
        Some(CgroupMount {
            point: PathBuf::from(pre.split_whitespace().nth(4)?),
            v2,
            options: opts.split(',').map(str::to_string).collect(),
        })
    })
}

/// `/proc/PID/cgroup` of `pid` (`None`: this process's own).
pub fn cgroups_text(pid: Option<i32>) -> io::Result<String> {
    match pid {
        Some(pid) => read_path(format!("/proc/{pid}/cgroup")),
        None => read_path("/proc/self/cgroup"),
    }
}

/// One line of `/proc/PID/cgroup`: a hierarchy's controllers (empty for v2) and the
/// process's cgroup in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupEntry<'a> {
    pub controllers: &'a str,
    pub path: &'a str,
}

impl CgroupEntry<'_> {
    pub fn is_v2(&self) -> bool {
        self.controllers.is_empty()
    }

    pub fn has(&self, controller: &str) -> bool {
        self.controllers.split(',').any(|c| c == controller)
    }
}

pub fn cgroup_entries(text: &str) -> impl Iterator<Item = CgroupEntry<'_>> {
    text.lines().filter_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, controllers, path) = (p.next()?, p.next()?, p.next()?);
        Some(CgroupEntry { controllers, path })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_whole_short_or_longer_than_a_page() {
        let stat = read_path("/proc/self/stat").unwrap();
        assert!(
            stat.starts_with(&format!("{} (", std::process::id())),
            "{stat}"
        );
        assert!(stat.ends_with('\n'));
        // smaps of a test binary runs to many pages; it must come whole (its last line
        // is the last mapping's VmFlags), not cut at the first page.
        let smaps = read_path("/proc/self/smaps").unwrap();
        assert!(smaps.len() > 4096, "{}", smaps.len());
        assert!(
            smaps
                .trim_end()
                .lines()
                .last()
                .unwrap()
                .starts_with("VmFlags:"),
            "{smaps}"
        );
        assert!(read_path("/proc/self/no-such-file").is_err());
    }

    #[test]
    fn parses_comm_with_parens() {
        let line = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.state, s.ppid, s.pgrp, s.start_time), ('S', 1, 42, 98765));
        assert_eq!(s.threads, 1);
    }

    #[test]
    fn status_ids_masks_and_namespace_init() {
        let st = Status::parse(
            "Name:\tsh\nNSpid:\t4242\t1\nUid:\t0\t1000\t0\t1000\nGid:\t5\t6\t7\t8\n\
             Groups:\t4 24 27 \nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
             CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n",
        );
        assert_eq!(st.effective_id("Uid:").unwrap(), 1000);
        assert_eq!(st.effective_id("Gid:").unwrap(), 6);
        assert_eq!(st.ids("Groups:"), vec![4, 24, 27]);
        let caps = st.caps().unwrap();
        assert_eq!((caps.permitted, caps.ambient), (0x1ff_ffff_ffff, 0));
        assert!(st.is_namespace_init());
        assert!(Status::parse("NSpid:\t4242\n").caps().is_err());
        assert!(!Status::parse("NSpid:\t4242\n").is_namespace_init());
        assert!(!Status::parse("NSpid:\t4242\t7\n").is_namespace_init());
        assert!(!Status::parse("Name:\tx\n").is_namespace_init());
    }

    #[test]
    fn cgroup_mounts_and_entries() {
        let mounts = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let found: Vec<CgroupMount> = cgroup_mounts(mounts).collect();
        assert_eq!(found.len(), 2);
        assert!(!found[0].v2 && found[0].has("memory"));
        assert_eq!(found[1].point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert!(found[1].v2);
        let own = "12:memory:/a/b\n0::/c:d\n";
        let e: Vec<CgroupEntry> = cgroup_entries(own).collect();
        assert!(e[0].has("memory") && !e[0].is_v2());
        assert_eq!((e[1].is_v2(), e[1].path), (true, "/c:d"));
    }

    #[test]
    fn children_are_listed() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let listed = own_children().contains(&pid);
        let _ = child.kill();
        let _ = child.wait();
        assert!(listed);
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
