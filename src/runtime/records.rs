//! The files a process task's directory holds. Besides the agent's `task.json`, a run is
//! one append-only journal, `run.jsonl`, one JSON object per line: the agent writes the
//! `launch` line; the shim appends `started` (its identity and the task's) and `exit`
//! (how the task ended), each fdatasync'ed. Appending creates no inode, which matters:
//! creating files is the costliest step of a task's start on ext4. A torn last line (a
//! crash mid-write) is not valid JSON and is ignored. `stdout.log`/`stderr.log` appear on
//! the task's first output.
//!
//! The shim's two locks live on files that exist anyway: the task directory (held for the
//! shim's life) and `run.jsonl` (held until the exit line is written).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::procfs::ProcIdentity;
use crate::task::model::EnvVar;
use crate::task::time::Time;

pub const RUN: &str = crate::task::store::RUN_JOURNAL;
pub const STDOUT: &str = "stdout.log";
pub const STDERR: &str = "stderr.log";

/// Locked (flock, exclusive) by the shim for its whole life: free means no supervisor.
pub fn shim_lock(dir: &Path) -> PathBuf {
    dir.to_path_buf()
}

/// Locked (flock, exclusive) by the shim until the exit record is written: free means the
/// task finished (or its supervisor died).
pub fn running_lock(dir: &Path) -> PathBuf {
    dir.join(RUN)
}

/// One line of `run.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Entry {
    Launch(Launch),
    Started(ShimRecord),
    Exit(ExitRecord),
}

/// What the journal says so far.
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub launch: Option<Launch>,
    pub started: Option<ShimRecord>,
    pub exit: Option<ExitRecord>,
}

/// Reads the journal; a missing file is an empty run.
pub fn read_run(dir: &Path) -> io::Result<Run> {
    let text = match std::fs::read(dir.join(RUN)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Run::default()),
        Err(e) => return Err(e),
    };
    let mut run = Run::default();
    for line in text.split(|b| *b == b'\n') {
        // Only complete, valid lines count: a torn write is not a record.
        match serde_json::from_slice::<Entry>(line) {
            Ok(Entry::Launch(l)) => run.launch = Some(l),
            Ok(Entry::Started(s)) => run.started = Some(s),
            Ok(Entry::Exit(x)) => run.exit = Some(x),
            Err(_) => {}
        }
    }
    Ok(run)
}

/// Starts the journal with the launch line (truncating an earlier, never-started one).
/// Not fsynced: after a crash it is rewritten from task.json if the shim never started,
/// and the shim's fdatasync of `started` makes it durable with that line. The file
/// exists already (created with the task's record, its name durable), so this creates no
/// inode.
pub fn write_launch(dir: &Path, launch: &Launch) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600) // holds the task's environment
        .open(dir.join(RUN))?;
    f.write_all(&line(&Entry::Launch(launch.clone()))?)
}

/// Appends a line and makes it durable (the file itself already is).
pub fn append(file: &mut std::fs::File, entry: &Entry) -> io::Result<()> {
    file.write_all(&line(entry)?)?;
    file.sync_data()
}

fn line(entry: &Entry) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(entry).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let launch = Launch {
            argv: vec!["true".into()],
            env: vec![],
            working_dir: None,
            timeout_ms: None,
            grace_ms: 1,
            max_log_bytes: 1,
            target: None,
        };
        write_launch(dir.path(), &launch).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(RUN))
            .unwrap();
        append(
            &mut f,
            &Entry::Exit(ExitRecord {
                exit_code: Some(3),
                ..Default::default()
            }),
        )
        .unwrap();
        f.write_all(b"{\"exit\":{\"exitCode\":4").unwrap(); // crash mid-write
        let run = read_run(dir.path()).unwrap();
        assert_eq!(run.launch.unwrap().argv, ["true"]);
        assert_eq!(run.exit.unwrap().exit_code, Some(3));
        assert!(run.started.is_none());
    }
}
