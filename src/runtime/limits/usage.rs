//! What a task's cgroups counted (CPU time, peak memory, OOM kills), for its status at
//! its end and for `/metrics` while it runs.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use crate::task::model::ResourceUsage;

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
}
