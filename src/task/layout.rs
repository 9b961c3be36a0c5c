//! What a task's directory (`<data-dir>/<name>/`) holds, by name, in one place: the
//! store, the runtimes, the shim and the log readers all find the files here, so a name
//! is spelled once. These names are on disk: a restarted (or older) agent finds its tasks
//! by them, so none may change.
//!
//! A log file rotates to its name with [`ROTATED_SUFFIX`] appended (`stdout.log.1`); the
//! two together are the newest part of its output.

use std::path::{Path, PathBuf};

use super::lifecycle::HookName;

/// The agent's record of the task (`store::TaskRecord`).
pub const TASK_FILE: &str = "task.json";
/// The runtime's journal of the task's run (see `runtime::journal`). Created empty with
/// the record, so that the directory's one fsync at create time also makes the journal's
/// name durable: appends to it later need only an fdatasync of the file.
pub const RUN_JOURNAL: &str = "run.jsonl";
/// Present once a deletion was requested; its mtime is the deletion timestamp. An empty
/// file, not a rewrite of `task.json`: creating it needs an inode but no data block, so a
/// task can still be deleted (and its logs' space freed) when its logs filled the disk.
pub const DELETING: &str = "deleting";
/// A process task's output, one file per stream, bytes as written.
pub const STDOUT: &str = "stdout.log";
pub const STDERR: &str = "stderr.log";
/// The index beside a task's plain logs (see `runtime::tasklog::index`).
pub const OUTPUT_INDEX: &str = "output.idx";
/// A container task's CRI log.
pub const CONTAINER_LOG: &str = "container.log";
/// Written to a container task's dir (empty) before CreateContainer and (with the id)
/// after it, so a recovery can tell "never created" (start it) from "created, then removed
/// behind our back" (report it lost), and a stop of a task that never got a container
/// needs no CRI.
pub const CONTAINER_ID: &str = "container.id";
/// Written by the agent before it stops a sidecar task because the main container was
/// replaced; the exit then reads as `TargetRestarted`.
pub const TARGET_RESTARTED: &str = "target-restarted";
/// A pod-template task's `emptyDir` volumes, one directory each, beside its records and
/// logs (so they go when the task is deleted).
pub const VOLUMES: &str = "volumes";
/// What a rotated log's name gets appended.
pub const ROTATED_SUFFIX: &str = ".1";
/// In the data dir, beside the tasks: where task directories that can't be loaded are
/// kept (see `store::Store::quarantine`).
pub const QUARANTINE: &str = ".quarantine";

/// A hook's log file (its stdout and stderr, combined).
pub fn hook_log(hook: HookName) -> &'static str {
    match hook {
        HookName::PreStart => "prestart.log",
        HookName::PostStop => "poststop.log",
    }
}

/// A hook log's output index (times of its chunks), beside the log.
pub fn hook_index(hook: HookName) -> &'static str {
    match hook {
        HookName::PreStart => "prestart.idx",
        HookName::PostStop => "poststop.idx",
    }
}

/// `path` with [`ROTATED_SUFFIX`] appended: the log's rotated predecessor.
pub fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(ROTATED_SUFFIX);
    PathBuf::from(p)
}

/// A task's directory, and the paths of what it holds.
#[derive(Clone, Copy, Debug)]
pub struct TaskDir<'a>(pub &'a Path);

impl TaskDir<'_> {
    pub fn record(self) -> PathBuf {
        self.0.join(TASK_FILE)
    }

    pub fn journal(self) -> PathBuf {
        self.0.join(RUN_JOURNAL)
    }

    pub fn deleting(self) -> PathBuf {
        self.0.join(DELETING)
    }

    pub fn stdout(self) -> PathBuf {
        self.0.join(STDOUT)
    }

    pub fn stderr(self) -> PathBuf {
        self.0.join(STDERR)
    }

    pub fn output_index(self) -> PathBuf {
        self.0.join(OUTPUT_INDEX)
    }

    pub fn container_log(self) -> PathBuf {
        self.0.join(CONTAINER_LOG)
    }

    pub fn container_id(self) -> PathBuf {
        self.0.join(CONTAINER_ID)
    }

    pub fn target_restarted(self) -> PathBuf {
        self.0.join(TARGET_RESTARTED)
    }

    pub fn volumes(self) -> PathBuf {
        self.0.join(VOLUMES)
    }

    pub fn hook_log(self, hook: HookName) -> PathBuf {
        self.0.join(hook_log(hook))
    }

    pub fn hook_index(self, hook: HookName) -> PathBuf {
        self.0.join(hook_index(hook))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_log_is_its_name_with_dot_one() {
        let dir = TaskDir(Path::new("/data/t"));
        assert_eq!(rotated(&dir.stdout()), Path::new("/data/t/stdout.log.1"));
        assert_eq!(
            rotated(&dir.container_log()),
            Path::new("/data/t/container.log.1")
        );
        assert_eq!(
            dir.hook_log(HookName::PostStop),
            Path::new("/data/t/poststop.log")
        );
    }
}
