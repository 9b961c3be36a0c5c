//! What a task's shim does with its v1 cgroups and limits: makes and joins them before
//! it claims its launch, writes the limits, and leaves and removes them when it ends.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::LaunchLimits;
use crate::task::resources;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
