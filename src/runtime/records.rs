//! The files a process task's directory holds, and who writes each:
//! the agent writes `task.json` and `launch.json`; the shim writes `shim.json` and
//! `exit.json`, and `stdout.log`/`stderr.log` on the task's first output. The shim's two
//! locks live on files that exist anyway (creating a file is the costliest step of a
//! task's start on ext4): the task directory itself, and `launch.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::procfs::ProcIdentity;
use crate::task::model::EnvVar;
use crate::task::time::Time;

pub const LAUNCH: &str = "launch.json";
pub const SHIM: &str = "shim.json";
pub const EXIT: &str = "exit.json";
pub const STDOUT: &str = "stdout.log";
pub const STDERR: &str = "stderr.log";

/// Locked (flock, exclusive) by the shim for its whole life: free means no supervisor.
pub fn shim_lock(dir: &Path) -> PathBuf {
    dir.to_path_buf()
}

/// Locked (flock, exclusive) by the shim until the exit record is written: free means the
/// task finished (or its supervisor died).
pub fn running_lock(dir: &Path) -> PathBuf {
    dir.join(LAUNCH)
}
/// Written by the agent before it stops a sidecar task because the main container was
/// replaced; the exit then reads as `TargetRestarted`.
pub const TARGET_RESTARTED: &str = "target-restarted";

/// Everything the shim needs to start the task; written by the agent, mode 0600 since it
/// holds the task's environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<EnvVar>,
    pub working_dir: Option<String>,
    pub timeout_ms: Option<u64>,
    pub grace_ms: u64,
    /// Per stream; the log keeps at most this much (current file plus one rotated file).
    pub max_log_bytes: u64,
    /// Sidecar mode: run inside this process's namespaces, with its environment as base.
    pub target: Option<Target>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub container: String,
    pub process: ProcIdentity,
    /// Also join the target's cgroups (limits and accounting of the main container).
    #[serde(default)]
    pub join_cgroup: bool,
    /// Run as the target's uid/gid instead of the sidecar's.
    #[serde(default)]
    pub run_as_target_user: bool,
}

/// The shim's identity, and the task's main process once it exists.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShimRecord {
    pub shim: ProcIdentity,
    pub main: Option<ProcIdentity>,
    pub started_at: Option<Time>,
}

/// How the task ended, written once, atomically, by the shim.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: Option<Time>,
    pub finished_at: Option<Time>,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub stop_requested: bool,
    /// The sidecar target died while the task ran (main container restarted).
    #[serde(default)]
    pub target_gone: bool,
    /// The program could not be started (exec or working-dir failure).
    pub start_error: Option<String>,
}

pub fn path(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}
