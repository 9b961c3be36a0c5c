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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::task::resources::{self, TaskLimits};

mod cgroups;
mod detect;
mod usage;

pub use cgroups::{enter, leave_and_remove, remove, write_limits};
pub use detect::detect;
pub use usage::{live_usage, memory_now, track, untrack, usage};

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
}
