//! Resource limits and usage per process task, through its cgroups (see `containment`
//! for the cgroup that ends it).
//!
//! At start the agent finds, for each controller it uses (`detect`), where task cgroups
//! of it are made: in the containment cgroup itself where that is cgroup v2 and the
//! controller is enabled for it (`memory.max`, `cpu.max`, `cpu.weight`, `pids.max`,
//! `memory.peak`, `cpu.stat`, `memory.events`), else in the controller's cgroup v1
//! hierarchy, in a `task-executor` directory under the agent's own cgroup there
//! (`memory.limit_in_bytes`, `cpu.cfs_quota_us`, `cpu.shares`, `pids.max`,
//! `memory.max_usage_in_bytes`, `cpuacct.usage`, `memory.oom_control`). A machine with
//! both (v1 controllers beside a v2 hierarchy without them) uses v1 for the controllers
//! and v2 for containment.
//!
//! For each task the agent plans (`Controllers::plan`) what its shim does: which v1
//! hierarchies it joins and which limits it writes. Every contained task joins the memory
//! controller (its peak memory and OOM kills are counted) and the pids one (the agent's
//! default pids limit); the cpu controller only when the task asks for CPU (on v1; on v2
//! it is enabled for every task cgroup); cpuacct where CPU time has no other source (no
//! v2 cgroup). The shim makes the task's cgroups, writes their limits and moves itself in
//! before it claims the launch (`enter`), as it does for containment, and journals their
//! paths in the claim. Its own process counts against the task's pids limit (the limit
//! written is the task's plus its supervisors), its few pages against its memory limit,
//! in each cgroup it is in: not in a cgroup v2 its task's commands are created into
//! (`containment`), whose pids limit is the task's own.
//!
//! A task that asks for a limit this agent can't enforce is refused (a 400 saying why).
//! Without a pids controller, a task with a uid of its own (`--task-uid-range`) gets its
//! pids limit as `RLIMIT_NPROC`: every process of that uid is the task's.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use serde::{Deserialize, Serialize};

use super::containment::{Kind, Parent, make_parent};
use crate::sys::procfs;
use crate::task::model::ResourceUsage;
use crate::task::resources::{self, TaskLimits};

pub const MEMORY: &str = "memory";
pub const CPU: &str = "cpu";
pub const CPUACCT: &str = "cpuacct";
pub const PIDS: &str = "pids";

/// Where task cgroups of one controller are made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// In the task's containment cgroup (cgroup v2, the controller enabled for it).
    Containment,
    /// In this cgroup v1 directory (`<mount>/<agent's cgroup>/task-executor`).
    V1(PathBuf),
}

/// The controllers this agent can give tasks, found once at start.
#[derive(Clone, Debug, Default)]
pub struct Controllers {
    found: BTreeMap<&'static str, Place>,
    /// Why a controller can't be used.
    missing: BTreeMap<&'static str, String>,
}

/// What a task's shim does with its cgroups, written by the agent into the launch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchLimits {
    /// cgroup v1 directories the shim makes a cgroup of the task's in, and joins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub v1: Vec<PathBuf>,
    /// The limits go on the containment cgroup too (cgroup v2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_containment: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CFS quota per `resources::CPU_PERIOD_US`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_us: Option<u64>,
    /// v1 `cpu.shares` (v2: converted to `cpu.weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_shares: Option<u64>,
    /// `pids.max`: the task's limit plus its supervisors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// `RLIMIT_NPROC` for the commands that run as the task's own uid (no pids cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nproc: Option<u64>,
}

/// What a plan needs to know of the task beyond its `resources`.
#[derive(Clone, Copy, Debug)]
pub struct TaskContext<'a> {
    /// The path of its resources in the request, for messages.
    pub at: &'a str,
    /// The agent's pids limit for tasks that set none (`--task-pids-limit`).
    pub default_pids: Option<u64>,
    /// Processes of the task's supervision in its cgroups (its shim, its reaper).
    pub supervisors: u64,
    /// The shim stays outside the task's containment cgroup (see `containment`): a pids
    /// limit there counts the task alone.
    pub shim_outside: bool,
    /// Every command of the task runs as a uid of its own (`RLIMIT_NPROC` holds).
    pub own_uid: bool,
}

impl Controllers {
    /// No controller at all, for `why`.
    pub fn none(why: &str) -> Controllers {
        Controllers {
            found: BTreeMap::new(),
            missing: [MEMORY, CPU, CPUACCT, PIDS]
                .into_iter()
                .map(|c| (c, why.to_string()))
                .collect(),
        }
    }

    /// Where the controller's task cgroups are, or why there are none.
    pub fn place(&self, controller: &str) -> Result<&Place, &str> {
        match self.found.get(controller) {
            Some(p) => Ok(p),
            None => Err(self
                .missing
                .get(controller)
                .map_or("not looked for", |s| s.as_str())),
        }
    }

    /// The cgroup v1 directories task cgroups are made in.
    pub fn v1_parents(&self) -> impl Iterator<Item = &Path> {
        self.found.values().filter_map(|p| match p {
            Place::V1(dir) => Some(dir.as_path()),
            Place::Containment => None,
        })
    }

    /// One line for the start log: where each controller is.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (c, p) in &self.found {
            parts.push(match p {
                Place::Containment => format!("{c}: cgroup v2"),
                Place::V1(d) => format!("{c}: cgroup v1 {}", d.display()),
            });
        }
        for (c, why) in &self.missing {
            parts.push(format!("{c}: none ({why})"));
        }
        parts.join("; ")
    }

    /// What the task's shim does for `limits`, or why they can't be enforced here (a
    /// message for a 400). `None`: nothing (no cgroup, no limit).
    pub fn plan(
        &self,
        limits: &TaskLimits,
        cx: TaskContext<'_>,
    ) -> Result<Option<LaunchLimits>, String> {
        let at = cx.at;
        let refuse = |field: &str, controller: &str, why: &str| {
            format!(
                "{at}.{field}: this agent can't enforce it: no {controller} cgroup for tasks \
                 ({why})"
            )
        };
        let mut out = LaunchLimits::default();
        let join = |out: &mut LaunchLimits, p: &Place| match p {
            Place::Containment => out.on_containment = true,
            Place::V1(d) => {
                if !out.v1.contains(d) {
                    out.v1.push(d.clone());
                }
            }
        };
        // Counted for every task that can be: its peak memory and OOM kills.
        if let Ok(p) = self.place(MEMORY) {
            join(&mut out, p);
        }
        if let Some(bytes) = limits.memory_bytes {
            let p = self
                .place(MEMORY)
                .map_err(|why| refuse("limits.memory", MEMORY, why))?;
            join(&mut out, p);
            out.memory_bytes = Some(bytes);
        }
        if limits.wants_cpu() {
            let field = if limits.cpu_millis.is_some() {
                "limits.cpu"
            } else {
                "requests.cpu"
            };
            let p = self.place(CPU).map_err(|why| refuse(field, CPU, why))?;
            join(&mut out, p);
            out.cpu_quota_us = limits.cpu_millis.map(resources::cpu_quota_us);
            out.cpu_shares = limits.cpu_request_millis.map(resources::cpu_shares);
        }
        // CPU time, where the containment cgroup (v2's `cpu.stat`) does not count it.
        if let Ok(p @ Place::V1(_)) = self.place(CPUACCT) {
            join(&mut out, p);
        }
        let pids = limits.pids.or(cx.default_pids);
        if let Some(n) = pids {
            match self.place(PIDS) {
                Ok(p) => {
                    let inside = match p {
                        Place::Containment if cx.shim_outside => cx.supervisors - 1,
                        _ => cx.supervisors,
                    };
                    join(&mut out, p);
                    out.pids_max = Some(n.saturating_add(inside));
                }
                Err(_) if cx.own_uid => out.nproc = Some(n),
                // The agent's default holds where it can; a task's own limit must.
                Err(why) if limits.pids.is_some() => {
                    return Err(format!(
                        "{}; a task whose commands all run as a uid of its own (the agent's \
                         --task-uid-range, no securityContext.runAsUser, nothing in the main \
                         container) would get it as RLIMIT_NPROC",
                        refuse(&format!("limits[{}]", resources::PIDS), PIDS, why)
                    ));
                }
                Err(_) => {}
            }
        }
        Ok((out != LaunchLimits::default()).then_some(out))
    }
}

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

/// One setting: the files it goes to and their values, in cgroup v1 and in v2 (a file
/// ending in `?` is written only where it exists).
struct Setting {
    v1: Vec<(&'static str, String)>,
    v2: Vec<(&'static str, String)>,
    what: &'static str,
}

fn settings(l: &LaunchLimits) -> Vec<Setting> {
    let mut out = Vec::new();
    if let Some(b) = l.memory_bytes {
        // No swap beyond the limit (kubelet's default: swap off); the swap files exist
        // only with swap accounting. v1's takes memory plus swap, v2's the swap alone.
        out.push(Setting {
            v1: vec![
                ("memory.limit_in_bytes", b.to_string()),
                ("memory.memsw.limit_in_bytes?", b.to_string()),
            ],
            v2: vec![
                ("memory.max", b.to_string()),
                ("memory.swap.max?", "0".into()),
            ],
            what: "memory limit",
        });
    }
    if let Some(q) = l.cpu_quota_us {
        let period = resources::CPU_PERIOD_US;
        out.push(Setting {
            v1: vec![
                ("cpu.cfs_period_us", period.to_string()),
                ("cpu.cfs_quota_us", q.to_string()),
            ],
            v2: vec![("cpu.max", format!("{q} {period}"))],
            what: "CPU limit",
        });
    }
    if let Some(s) = l.cpu_shares {
        out.push(Setting {
            v1: vec![("cpu.shares", s.to_string())],
            v2: vec![("cpu.weight", resources::cpu_weight(s).to_string())],
            what: "CPU weight",
        });
    }
    if let Some(n) = l.pids_max {
        out.push(Setting {
            v1: vec![("pids.max", n.to_string())],
            v2: vec![("pids.max", n.to_string())],
            what: "pids limit",
        });
    }
    out
}

/// Writes each limit of `l` into whichever of `dirs` has its files (v1: the hierarchy of
/// its controller; v2: the task's cgroup). A limit no directory takes is an error: it
/// would not hold.
pub fn write_limits(l: &LaunchLimits, dirs: &[&Path]) -> io::Result<()> {
    let is_v2 = |d: &Path| d.join("cgroup.controllers").exists();
    for s in settings(l) {
        // The first file of a setting tells which directory has its controller.
        let target = dirs.iter().find_map(|d| {
            let files = if is_v2(d) { &s.v2 } else { &s.v1 };
            d.join(files[0].0).exists().then_some((*d, files))
        });
        let Some((dir, files)) = target else {
            return Err(io::Error::other(format!(
                "no cgroup of the task takes its {} ({} / {})",
                s.what, s.v1[0].0, s.v2[0].0
            )));
        };
        for (file, value) in files {
            let (file, optional) = match file.strip_suffix('?') {
                Some(f) => (f, true),
                None => (*file, false),
            };
            let path = dir.join(file);
            if optional && !path.exists() {
                continue;
            }
            fs::write(&path, value.as_bytes()).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{} {value} into {}: {e}", s.what, path.display()),
                )
            })?;
        }
    }
    Ok(())
}

/// In the shim, after it entered its containment cgroup (`containment`, when v2 takes
/// the limits): makes the task's v1 cgroups named `name`, writes the limits and moves the
/// calling process into them. Returns the v1 cgroups made (the caller journals them). On
/// failure nothing is left behind.
pub fn enter(l: &LaunchLimits, containment: Option<&Path>, name: &str) -> io::Result<Vec<PathBuf>> {
    let mut made: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for parent in &l.v1 {
            let dir = parent.join(name);
            fs::create_dir(&dir).map_err(|e| {
                io::Error::new(e.kind(), format!("task cgroup {}: {e}", dir.display()))
            })?;
            made.push(dir);
        }
        let mut dirs: Vec<&Path> = made.iter().map(PathBuf::as_path).collect();
        if l.on_containment {
            dirs.push(containment.ok_or_else(|| {
                io::Error::other("the task's limits need its cgroup v2, which it has not")
            })?);
        }
        write_limits(l, &dirs)?;
        for dir in &made {
            fs::write(dir.join("cgroup.procs"), b"0").map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("entering task cgroup {}: {e}", dir.display()),
                )
            })?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(made),
        Err(e) => {
            leave_and_remove(&made);
            Err(e)
        }
    }
}

/// Moves the calling process back to each cgroup's parent and removes the cgroups (a
/// shim whose task never started).
pub fn leave_and_remove(dirs: &[PathBuf]) {
    for dir in dirs {
        if let Some(parent) = dir.parent() {
            let _ = fs::write(parent.join("cgroup.procs"), b"0");
        }
        let _ = fs::remove_dir(dir);
    }
}

/// Removes the task's v1 cgroups once nothing runs in them (after its containment cgroup
/// was proven empty, they are). Whether all are gone. Blocking (a moment: a process
/// just killed leaves its cgroups once it is reaped).
pub fn remove(dirs: &[PathBuf]) -> bool {
    let mut all = true;
    for dir in dirs {
        let mut tries = 0;
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(_) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove the task's cgroup");
                    all = false;
                    break;
                }
            }
        }
    }
    all
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`cpu.stat`, `memory.events`).
fn keyed(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// What the task's cgroups (`dirs`: its containment cgroup and its v1 ones) counted so
/// far. Only what a cgroup counts is given.
pub fn usage(dirs: &[&Path]) -> ResourceUsage {
    let mut u = ResourceUsage::default();
    for d in dirs {
        if u.cpu_seconds.is_none() {
            u.cpu_seconds = keyed(&d.join("cpu.stat"), "usage_usec")
                .map(|us| us as f64 / 1e6)
                .or_else(|| read_u64(&d.join("cpuacct.usage")).map(|ns| ns as f64 / 1e9));
        }
        if u.memory_peak_bytes.is_none() {
            u.memory_peak_bytes = read_u64(&d.join("memory.peak"))
                .or_else(|| read_u64(&d.join("memory.max_usage_in_bytes")));
        }
        if u.oom_kills.is_none() {
            u.oom_kills = keyed(&d.join("memory.events"), "oom_kill")
                .or_else(|| keyed(&d.join("memory.oom_control"), "oom_kill"));
        }
    }
    u.oom_kills = u.oom_kills.filter(|n| *n > 0);
    u
}

/// The memory the task's cgroups hold now, in bytes.
pub fn memory_now(dirs: &[&Path]) -> Option<u64> {
    dirs.iter().find_map(|d| {
        read_u64(&d.join("memory.current")).or_else(|| read_u64(&d.join("memory.usage_in_bytes")))
    })
}

/// A running task's name and cgroups.
type Live = (String, Vec<PathBuf>);

/// The cgroups of running tasks, by incarnation (`TaskRef::uid`), for `/metrics`.
static LIVE: LazyLock<Mutex<HashMap<String, Live>>> = LazyLock::new(Default::default);

/// The task (`uid`, named `name`) runs in `cgroups`: `/metrics` shows their usage.
pub fn track(uid: &str, name: &str, cgroups: Vec<PathBuf>) {
    if cgroups.is_empty() {
        return;
    }
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(uid.to_string(), (name.to_string(), cgroups));
}

/// The task ended (or is being deleted): its usage is in its status from now on.
pub fn untrack(uid: &str) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
}

/// The usage of every running task with cgroups, read now: (name, usage, memory now).
pub fn live_usage() -> Vec<(String, ResourceUsage, Option<u64>)> {
    let live: Vec<(String, Vec<PathBuf>)> = LIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    live.into_iter()
        .filter_map(|(name, dirs)| {
            let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
            // A cgroup gone meanwhile (the task just ended) counts nothing.
            let u = usage(&dirs);
            (!u.is_empty()).then(|| (name, u, memory_now(&dirs)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(default_pids: Option<u64>, own_uid: bool) -> TaskContext<'static> {
        TaskContext {
            at: "process.resources",
            default_pids,
            supervisors: 1,
            shim_outside: false,
            own_uid,
        }
    }

    fn hybrid() -> Controllers {
        let mut c = Controllers::default();
        for (ctl, d) in [
            (MEMORY, "/m/te"),
            (CPU, "/c/te"),
            (CPUACCT, "/a/te"),
            (PIDS, "/p/te"),
        ] {
            c.found.insert(ctl, Place::V1(d.into()));
        }
        c
    }

    #[test]
    fn plans_join_what_is_asked_and_counted() {
        let c = hybrid();
        let none = c
            .plan(&TaskLimits::default(), cx(None, false))
            .unwrap()
            .unwrap();
        assert_eq!(
            none.v1,
            [PathBuf::from("/m/te"), PathBuf::from("/a/te")],
            "memory and CPU time are counted; no cpu group unless asked"
        );
        let l = TaskLimits {
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(500),
            cpu_request_millis: Some(500),
            pids: Some(10),
            ..Default::default()
        };
        let p = c.plan(&l, cx(Some(4096), false)).unwrap().unwrap();
        assert_eq!(p.v1.len(), 4);
        assert_eq!(p.memory_bytes, Some(64 << 20));
        assert_eq!(p.cpu_quota_us, Some(50_000));
        assert_eq!(p.cpu_shares, Some(512));
        assert_eq!(p.pids_max, Some(11), "the task's 10 and its shim");
        let d = c
            .plan(&TaskLimits::default(), cx(Some(4096), false))
            .unwrap()
            .unwrap();
        assert_eq!(d.pids_max, Some(4097), "the agent's default");
    }

    #[test]
    fn a_pids_limit_counts_the_shim_only_in_the_cgroups_it_is_in() {
        // Pure cgroup v2: pids on the containment cgroup, which a shim without a reaper
        // stays out of (its task is created into it): the limit is the task's alone.
        let mut v2 = Controllers::default();
        v2.found.insert(PIDS, Place::Containment);
        let l = TaskLimits {
            pids: Some(10),
            ..Default::default()
        };
        let outside = TaskContext {
            shim_outside: true,
            ..cx(None, false)
        };
        assert_eq!(v2.plan(&l, outside).unwrap().unwrap().pids_max, Some(10));
        assert_eq!(
            v2.plan(&l, cx(None, false)).unwrap().unwrap().pids_max,
            Some(11),
            "a shim inside counts"
        );
        // v1 pids beside v2 containment: the shim is in the task's v1 cgroups.
        let p = hybrid().plan(&l, outside).unwrap().unwrap();
        assert_eq!(p.pids_max, Some(11));
    }

    #[test]
    fn what_cant_be_enforced_is_refused_unless_nproc_holds_it() {
        let mut c = Controllers::none("--task-cgroups=false");
        let mem = TaskLimits {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        };
        let e = c.plan(&mem, cx(None, true)).unwrap_err();
        assert!(
            e.starts_with("process.resources.limits.memory: this agent can't enforce it: no memory cgroup for tasks (--task-cgroups=false)"),
            "{e}"
        );
        let pids = TaskLimits {
            pids: Some(5),
            ..Default::default()
        };
        let e = c.plan(&pids, cx(None, false)).unwrap_err();
        assert!(
            e.contains("limits[task-executor.io/pids]") && e.contains("RLIMIT_NPROC"),
            "{e}"
        );
        let p = c.plan(&pids, cx(None, true)).unwrap().unwrap();
        assert_eq!((p.nproc, p.pids_max), (Some(5), None));
        // The default holds where it can, and is no reason to refuse.
        assert_eq!(
            c.plan(&TaskLimits::default(), cx(Some(9), false)).unwrap(),
            None
        );
        let p = c
            .plan(&TaskLimits::default(), cx(Some(9), true))
            .unwrap()
            .unwrap();
        assert_eq!(p.nproc, Some(9));
        c.found.insert(CPU, Place::Containment);
        let cpu = TaskLimits {
            cpu_request_millis: Some(100),
            ..Default::default()
        };
        let p = c.plan(&cpu, cx(None, false)).unwrap().unwrap();
        assert!(p.on_containment && p.v1.is_empty());
        assert_eq!((p.cpu_shares, p.cpu_quota_us), (Some(102), None));
    }

    #[test]
    fn limits_go_to_the_files_of_each_version() {
        let v1 = tempfile::tempdir().unwrap();
        let v2 = tempfile::tempdir().unwrap();
        for f in [
            "memory.limit_in_bytes",
            "memory.memsw.limit_in_bytes",
            "cpu.cfs_period_us",
            "cpu.cfs_quota_us",
            "cpu.shares",
            "pids.max",
        ] {
            fs::write(v1.path().join(f), "").unwrap();
        }
        for f in [
            "cgroup.controllers",
            "memory.max",
            "cpu.max",
            "cpu.weight",
            "pids.max",
        ] {
            fs::write(v2.path().join(f), "").unwrap();
        }
        let l = LaunchLimits {
            memory_bytes: Some(1 << 26),
            cpu_quota_us: Some(50_000),
            cpu_shares: Some(1024),
            pids_max: Some(11),
            ..Default::default()
        };
        let read = |d: &Path, f: &str| fs::read_to_string(d.join(f)).unwrap();
        write_limits(&l, &[v1.path()]).unwrap();
        assert_eq!(read(v1.path(), "memory.limit_in_bytes"), "67108864");
        assert_eq!(read(v1.path(), "memory.memsw.limit_in_bytes"), "67108864");
        assert_eq!(read(v1.path(), "cpu.cfs_period_us"), "100000");
        assert_eq!(read(v1.path(), "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(v1.path(), "cpu.shares"), "1024");
        assert_eq!(read(v1.path(), "pids.max"), "11");
        write_limits(&l, &[v2.path()]).unwrap();
        assert_eq!(read(v2.path(), "memory.max"), "67108864");
        assert!(!v2.path().join("memory.swap.max").exists(), "optional");
        assert_eq!(read(v2.path(), "cpu.max"), "50000 100000");
        assert_eq!(read(v2.path(), "cpu.weight"), "39");
        assert_eq!(read(v2.path(), "pids.max"), "11");
        let empty = tempfile::tempdir().unwrap();
        let e = write_limits(&l, &[empty.path()]).unwrap_err().to_string();
        assert!(
            e.contains("no cgroup of the task takes its memory limit"),
            "{e}"
        );
    }

    #[test]
    fn usage_reads_both_versions() {
        let v1 = tempfile::tempdir().unwrap();
        fs::write(v1.path().join("cpuacct.usage"), "2500000000\n").unwrap();
        fs::write(v1.path().join("memory.max_usage_in_bytes"), "1048576\n").unwrap();
        fs::write(
            v1.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        let u = usage(&[v1.path()]);
        assert_eq!(
            u,
            ResourceUsage {
                cpu_seconds: Some(2.5),
                memory_peak_bytes: Some(1 << 20),
                oom_kills: Some(1),
            }
        );
        let v2 = tempfile::tempdir().unwrap();
        fs::write(
            v2.path().join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1\n",
        )
        .unwrap();
        fs::write(v2.path().join("memory.peak"), "4096\n").unwrap();
        fs::write(
            v2.path().join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n",
        )
        .unwrap();
        let u = usage(&[v2.path()]);
        assert_eq!(
            (u.cpu_seconds, u.memory_peak_bytes, u.oom_kills),
            (Some(1.5), Some(4096), None)
        );
    }

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
