//! A cgroup per process task: everything a task starts (its main command, hooks, what
//! they daemonise) is in it, so everything of it can be ended at once and
//! proven gone, even after its shim died (a double-forked `setsid` child re-parented to
//! a dead shim has no other trace).
//!
//! The agent picks the hierarchy once at start (`detect`): cgroup v2 where it has
//! `cgroup.kill` (Linux 5.14), else the cgroup v1 freezer. Task cgroups live in a
//! `task-executor` directory under the agent's own cgroup, so a pod's tasks stay within
//! its limits. The shim creates its task's cgroup before it claims the launch (nothing of
//! the task runs yet); the path is journaled in the claim, so a restarted agent still
//! finds it. With cgroup v2 the shim stays outside and its task's commands are created
//! straight into the cgroup (`clone3` with `CLONE_INTO_CGROUP`, see `child_setup`): a
//! move into a cgroup and out again cost a quarter of a short task's run. Where that
//! can't be done (the v1 freezer, another architecture, a seccomp profile that refuses
//! `clone3`), and for a task with commands in the main container (their reaper is
//! forked by the shim), the shim moves itself in first, so every process it forks is
//! born inside. Either way everything of the task is in the cgroup; where the shim stays
//! out, its own memory and CPU are not counted as the task's.
//!
//! Ending (`kill`): v2 writes `cgroup.kill` and waits for `cgroup.events` to read
//! `populated 0`; v1 freezes the cgroup (nothing in it can fork or exit meanwhile, so
//! the pids read are its own), SIGKILLs each, thaws it and waits until `cgroup.procs` is
//! empty. Then the directory is removed. Only "empty" is proof that nothing of the task
//! runs: a caller that got `false` must not hand the task's uid on.
//!
//! Without cgroups, `kill_uid` is the fallback for a task with a uid of its own: every
//! process with that uid is the task's.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::sys::proc_handle::ProcHandle;
use crate::sys::procfs;

/// The directory task cgroups are made in, under the agent's own cgroup.
pub(super) const PARENT_NAME: &str = "task-executor";

/// The agent's own parent of task cgroups, `task-executor` beside the agent in its cgroup
/// `path` of the hierarchy mounted at `mount`, made if missing.
pub(super) fn make_parent(mount: &Path, path: &str) -> Result<PathBuf, String> {
    if path.starts_with("/..") {
        return Err(format!(
            "the agent's cgroup {path} is outside the mounted tree"
        ));
    }
    let dir = mount.join(path.trim_start_matches('/')).join(PARENT_NAME);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    Ok(dir)
}

/// Which kind of cgroup a task gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    /// cgroup v2 with `cgroup.kill`.
    V2,
    /// The cgroup v1 freezer hierarchy.
    V1Freezer,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::V2 => "cgroup-v2",
            Kind::V1Freezer => "cgroup-v1-freezer",
        }
    }
}

/// Where the shim makes its task's cgroup; written by the agent into the launch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Parent {
    pub kind: Kind,
    pub dir: PathBuf,
}

/// The containment this agent gives process tasks: a cgroup per task, or why not.
pub fn detect() -> Result<Parent, String> {
    let mounts = procfs::own_mountinfo().map_err(|e| e.to_string())?;
    let own = procfs::cgroups_text(None).map_err(|e| e.to_string())?;
    let mut why = Vec::new();
    for kind in [Kind::V2, Kind::V1Freezer] {
        match try_kind(kind, &mounts, &own) {
            Ok(p) => return Ok(p),
            Err(e) => why.push(format!("{}: {e}", kind.as_str())),
        }
    }
    Err(why.join("; "))
}

fn try_kind(kind: Kind, mounts: &str, own: &str) -> Result<Parent, String> {
    let mount = mount_point(kind, mounts).ok_or("not mounted")?;
    let path = procfs::cgroup_entries(own)
        .find(|e| match kind {
            Kind::V2 => e.is_v2(),
            Kind::V1Freezer => e.has("freezer"),
        })
        .ok_or("the agent is in no cgroup of it")?
        .path;
    let dir = make_parent(&mount, path)?;
    // (A root cgroup has no `cgroup.kill`; every other one has, from Linux 5.14.)
    if kind == Kind::V2 && !dir.join("cgroup.kill").exists() {
        return Err("no cgroup.kill (Linux 5.14 or later)".into());
    }
    // A probe proves cgroups can be made there (a read-only mount, no delegation).
    let probe = dir.join(format!("probe-{}", std::process::id()));
    fs::create_dir(&probe).map_err(|e| format!("cannot create {}: {e}", probe.display()))?;
    let _ = fs::remove_dir(&probe);
    Ok(Parent { kind, dir })
}

/// Where the hierarchy is mounted (the first mount of it).
fn mount_point(kind: Kind, mounts: &str) -> Option<PathBuf> {
    procfs::cgroup_mounts(mounts)
        .find(|m| match kind {
            Kind::V2 => m.v2,
            Kind::V1Freezer => !m.v2 && m.has("freezer"),
        })
        .map(|m| m.point)
}

/// Creates the task's cgroup `name` under `parent`; returns its path.
pub fn create(parent: &Parent, name: &str) -> io::Result<PathBuf> {
    let dir = parent.dir.join(name);
    fs::create_dir(&dir)
        .map_err(|e| io::Error::new(e.kind(), format!("task cgroup {}: {e}", dir.display())))?;
    Ok(dir)
}

/// Moves the calling process into the cgroup `dir`: everything it forks from now on is
/// born there.
pub fn enter(dir: &Path) -> io::Result<()> {
    fs::write(dir.join("cgroup.procs"), b"0").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("entering task cgroup {}: {e}", dir.display()),
        )
    })
}

/// `enter`, for a shim that planned to stay outside the cgroup v2 `dir` (and found it
/// can't): its pids limit, written for the task alone, is raised by one first, so that
/// the task keeps what it was given with the shim counted in.
pub fn enter_late(dir: &Path) -> io::Result<()> {
    let max = dir.join("pids.max");
    if let Ok(Ok(n)) = fs::read_to_string(&max).map(|t| t.trim().parse::<u64>()) {
        fs::write(&max, n.saturating_add(1).to_string())?;
    }
    enter(dir)
}

/// Creates the task's cgroup `name` under `parent` and moves the calling process into
/// it: everything it forks from now on is born there. Returns its path.
pub fn create_and_enter(parent: &Parent, name: &str) -> io::Result<PathBuf> {
    let dir = create(parent, name)?;
    if let Err(e) = enter(&dir) {
        let _ = fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(dir)
}

/// The name of the task cgroups a shim makes (containment and limits alike): named after
/// the shim, so that what is left of a dead one can be told from a live one's, and after
/// its PID namespace (the inode of `/proc/self/ns/pid`), in which alone its pid means it:
/// agents in other PID namespaces may share the parent cgroup.
pub fn task_cgroup_name(shim: &procfs::ProcIdentity) -> String {
    match procfs::own_pid_namespace() {
        Some(ns) => format!("task-{}-{}-{ns}", shim.pid, shim.start_time),
        None => format!("task-{}-{}", shim.pid, shim.start_time),
    }
}

/// Removes the task cgroups in `parent` that nothing runs in and whose shim is gone: a
/// shim that died before it claimed its launch left the cgroup it had made with no
/// journal naming it, and an agent whose data dir was lost forgot its tasks' cgroups,
/// so nothing else ever removes them. A cgroup whose shim is alive (this agent's, or
/// another's that shares the parent) is kept, as is one anything runs in (its task's
/// stop ends it). A shim's pid means something only in its own PID namespace, which its
/// cgroup's name says: one of another namespace is removed only when that namespace has
/// no process left, which only an agent in the initial PID namespace can see (a spare
/// shim's cgroup waits empty for its launch). Blocking; returns how many were removed.
pub fn sweep_leftovers(parent: &Path) -> usize {
    let Ok(entries) = fs::read_dir(parent) else {
        return 0;
    };
    let ours = procfs::own_pid_namespace();
    let mut live_namespaces: Option<Option<HashSet<u64>>> = None;
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((shim, ns)) = name.to_str().and_then(shim_of) else {
            continue;
        };
        let shim_alive = match ns {
            // Names of earlier versions have no namespace: taken as this one's, as before.
            None => shim.is_alive(),
            Some(ns) if Some(ns) == ours => shim.is_alive(),
            Some(ns) => live_namespaces
                .get_or_insert_with(procfs::live_pid_namespaces)
                .as_ref()
                .is_none_or(|live| live.contains(&ns)),
        };
        let dir = entry.path();
        // A live shim's cgroup may be empty yet: its task is about to be born in it.
        if shim_alive || !is_empty(&dir).unwrap_or(false) {
            continue;
        }
        match fs::remove_dir(&dir) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::debug!(cgroup = %dir.display(), error = %e, "leftover task cgroup kept")
            }
        }
    }
    removed
}

/// The shim a task cgroup's name says made it (`task_cgroup_name`), and its PID
/// namespace where the name has one.
fn shim_of(name: &str) -> Option<(procfs::ProcIdentity, Option<u64>)> {
    let mut parts = name.strip_prefix("task-")?.split('-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    let ns = match parts.next() {
        Some(ns) => Some(ns.parse().ok()?),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((procfs::ProcIdentity::without_inode(pid, start), ns))
}

/// Moves the calling process (the shim) out of the task's cgroup, if it is in it, and
/// removes the cgroup, if nothing else is left in it: a shim whose task never started,
/// or one whose task's processes are all gone, so that no empty cgroup outlives its task.
/// Out to the parent, else (cgroup v2 with controllers enabled there, which allows no
/// process in it) to the agent's own cgroup above it. A cgroup still in use stays (EBUSY)
/// for the stop to end. A shim that never entered (its task's processes were born in the
/// cgroup) is not moved: a move is what costs (see `child_setup::clone3`).
pub fn leave_and_remove(dir: &Path) {
    let me = std::process::id().to_string();
    let inside = fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|procs| procs.lines().any(|l| l.trim() == me));
    let out = inside
        && dir
            .ancestors()
            .skip(1)
            .take(2)
            .any(|up| fs::write(up.join("cgroup.procs"), b"0").is_ok());
    match fs::remove_dir(dir) {
        Ok(()) => tracing::debug!(cgroup = %dir.display(), "task cgroup removed"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::debug!(cgroup = %dir.display(), moved_out = out, error = %e, "task cgroup left for the stop to end")
        }
    }
}

/// The task cgroups (made by `create`) process `pid` is in, as this process's mounts show
/// them: how the init finds its tasks' cgroups from their processes and orphans.
pub fn task_cgroups_of(pid: i32) -> Vec<PathBuf> {
    let (Ok(mounts), Ok(theirs)) = (procfs::own_mountinfo(), procfs::cgroups_text(Some(pid)))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in procfs::cgroup_entries(&theirs) {
        let path = entry.path;
        let kind = match entry {
            e if e.is_v2() => Kind::V2,
            e if e.has("freezer") => Kind::V1Freezer,
            _ => continue,
        };
        let under_ours = Path::new(path)
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == PARENT_NAME);
        if let Some(mount) = mount_point(kind, &mounts).filter(|_| under_ours) {
            out.push(mount.join(path.trim_start_matches('/')));
        }
    }
    out
}

/// Whether nothing runs in the cgroup (a missing cgroup is empty).
pub fn is_empty(dir: &Path) -> io::Result<bool> {
    if dir.join("cgroup.events").exists() {
        let events = match fs::read_to_string(dir.join("cgroup.events")) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e),
        };
        return Ok(events.lines().any(|l| l == "populated 0"));
    }
    match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(t) => Ok(t.trim().is_empty()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Ends every process in the task's cgroup and removes it; waits up to `wait` for it to
/// be empty. Returns whether it was proven empty. Blocking.
pub fn kill(dir: &Path, wait: Duration) -> io::Result<bool> {
    if !dir.exists() {
        return Ok(true);
    }
    let deadline = Instant::now() + wait;
    if dir.join("cgroup.kill").exists() {
        match fs::write(dir.join("cgroup.kill"), b"1") {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e),
        }
    } else {
        kill_frozen(dir, deadline)?;
    }
    let mut pause = Duration::from_millis(1);
    loop {
        if is_empty(dir)? {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // EBUSY: a child cgroup (made by the task) or a process just entering.
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove the task's cgroup")
                }
            }
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        if !dir.join("cgroup.kill").exists() {
            // v1: what was forked while the freezer settled goes too.
            kill_frozen(dir, deadline)?;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// v1: freeze, SIGKILL every member, thaw (the kills are delivered on thawing).
fn kill_frozen(dir: &Path, deadline: Instant) -> io::Result<()> {
    let state = dir.join("freezer.state");
    fs::write(&state, b"FROZEN")?;
    // Freezing takes a moment per process; FREEZING until all are.
    while fs::read_to_string(&state)?.trim() != "FROZEN" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // Frozen, so the pid can't have been freed and reused since it was listed.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    fs::write(&state, b"THAWED")
}

/// The cgroup-less fallback for a task with a uid of its own: SIGKILLs every process
/// whose real, effective or saved uid is `uid` (each through a handle checked to be the
/// process read); returns how many were left.
pub fn kill_uid(uid: u32) -> usize {
    let Ok(proc) = fs::File::open("/proc") else {
        return 0;
    };
    let mut left = 0;
    for pid in procfs::pids() {
        let Ok(status) = procfs::Status::of(pid) else {
            continue;
        };
        let ids = status.ids("Uid:");
        if !ids.iter().take(3).any(|u| *u == uid) {
            continue;
        }
        use std::os::fd::AsFd;
        if let Ok((h, st)) = ProcHandle::open_at(proc.as_fd(), pid)
            && st.state != 'Z'
        {
            left += 1;
            let _ = h.signal(Signal::SIGKILL);
        }
    }
    left
}

/// Ends the uid's processes, SIGKILL rounds until none is left or `wait` passed; whether
/// none is. Blocking.
pub fn kill_uid_until_gone(uid: u32, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if kill_uid(uid) == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found_by_type_and_controller() {
        let mounts = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_point(Kind::V2, mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            mount_point(Kind::V1Freezer, mounts),
            Some(PathBuf::from("/sys/fs/cgroup/freezer"))
        );
        assert_eq!(
            mount_point(Kind::V2, "1 2 0:1 / / rw - ext4 /dev/x rw\n"),
            None
        );
    }

    #[test]
    fn a_task_cgroups_name_says_its_shim_and_the_shims_pid_namespace() {
        let me = procfs::ProcIdentity::of(std::process::id() as i32).unwrap();
        let name = task_cgroup_name(&me);
        let (shim, ns) = shim_of(&name).unwrap();
        assert_eq!((shim.pid, shim.start_time), (me.pid, me.start_time));
        assert_eq!(ns, procfs::own_pid_namespace());
        assert!(ns.is_some(), "{name}");
        // An earlier version's name has no namespace; anything else is no task cgroup.
        assert!(matches!(shim_of("task-12-34"), Some((s, None)) if s.pid == 12));
        for other in [
            "task-12",
            "task-12-x",
            "task-12-34-5-6",
            "probe-12",
            "task-12-34-",
        ] {
            assert!(shim_of(other).is_none(), "{other}");
        }
    }

    #[test]
    fn a_shim_entering_late_raises_the_pids_limit_it_was_not_counted_in() {
        // (A directory standing in for a cgroup v2 with pids: this machine's v2 has no
        // pids controller; the files are what the kernel's are, written the same way.)
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pids.max"), "10\n").unwrap();
        fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        enter_late(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("pids.max")).unwrap(),
            "11"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("cgroup.procs")).unwrap(),
            "0"
        );
        // No limit ("max") stays none.
        fs::write(dir.path().join("pids.max"), "max\n").unwrap();
        enter_late(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("pids.max")).unwrap(),
            "max\n"
        );
    }

    /// Both kinds, on this machine's real hierarchies (it has both): a setsid'd,
    /// double-forked process in a task cgroup is ended, and the cgroup removed.
    #[test]
    fn kill_ends_double_forked_daemons_in_both_kinds() {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        for kind in [Kind::V2, Kind::V1Freezer] {
            let parent = try_kind(kind, &mounts, &own)
                .unwrap_or_else(|e| panic!("this machine has {}: {e}", kind.as_str()));
            let name = format!("unit-{}-{}", std::process::id(), kind.as_str());
            let dir = parent.dir.join(&name);
            fs::create_dir(&dir).unwrap();
            // The shell enters the cgroup itself, then double-forks a setsid'd sleep.
            let mut sh = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo 0 > {}/cgroup.procs && (setsid sleep 4441 &) ; echo ok",
                    dir.display()
                ))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            sh.wait().unwrap();
            let t0 = Instant::now();
            while is_empty(&dir).unwrap() && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(!is_empty(&dir).unwrap(), "the daemon runs in {kind:?}");
            assert!(kill(&dir, Duration::from_secs(10)).unwrap(), "{kind:?}");
            assert!(!dir.exists(), "{kind:?}: the cgroup is removed");
        }
    }
}
