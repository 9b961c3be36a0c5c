//! The durable task store: `<data-dir>/<name>/task.json`, written atomically, plus
//! whatever the runtime keeps beside it (shim records, logs). Task directories that can't
//! be loaded are moved to `.quarantine/`, never deleted; the store opens on a full or
//! read-only data dir (reads are served; `unwritable` says why changes can't be).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::layout::{self, QUARANTINE, TaskDir};
use super::model::{ExecMode, TaskSpec, Terminated};
use super::name;
use super::time::Time;
use crate::sys::fsutil;
use crate::sys::io_workers::IoWorkers;

/// Space kept for the journal from the task's create on (allocated past its end, its size
/// unchanged), so that its lines (the launch, the claim, the exit, those of hooks) need no
/// new block when the disk fills up later: the exit of a task that ran is never lost to a
/// full disk. A create that can't get it fails (507) before anything is promised. A launch
/// line longer than this (a task with a huge environment) grows the journal as before.
pub const JOURNAL_RESERVE: u64 = 16 * 1024;
/// Threads for the store's blocking work; as many as the blocking pool used to have, so
/// concurrent creates still share their data-dir fsyncs.
const IO_THREADS: usize = 8;

/// What the agent itself persists about a task.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    pub name: String,
    pub uid: String,
    pub spec: TaskSpec,
    /// Where a process task runs, decided when it was created (its own `execMode`, else
    /// the agent's `--enable-sidecar-mode` then), so an agent restarted with other flags
    /// re-adopts it where it runs. Absent in records of older agents: the flags decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_mode: Option<ExecMode>,
    /// The uid its commands in the agent's container run as, given from
    /// `--task-uid-range` when it was created and held until it is forgotten, so a
    /// restarted agent re-adopts it as the same user and never gives that uid to another
    /// task. Absent: none was given (no range, a `runAsUser` of its own, no command in the
    /// agent's container, or an older agent's record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_uid: Option<u32>,
    pub created_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Time>,
    /// Set when the task ended without a runtime record (e.g. its main container was
    /// never found), so the reason survives restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_status: Option<Terminated>,
}

#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    /// Concurrent creates and deletes share the data dir's fsyncs.
    root_sync: Arc<fsutil::DirSync>,
    workers: Arc<IoWorkers>,
}

impl Store {
    /// Opens (creating if needed) the data dir, checks that it is writable, and starts the
    /// threads that do its blocking work.
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(root)?;
        if let Err(e) = restrict(root, DIR_MODE) {
            // Not ours to change (a volume another user owns): say so, run anyway.
            tracing::warn!(path = %root.display(), error = %e, "the data dir is open to other users and can't be restricted to 0700");
        }
        // Checked without allocating anything: a full data dir must not keep the agent
        // from starting (it is how a DELETE frees the space), nor may a read-only one
        // (reads are served; `/readyz` says why it is not ready).
        match rustix::fs::access(root, rustix::fs::Access::WRITE_OK) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::ROFS => {
                tracing::error!(path = %root.display(), "the data dir is read-only: tasks are served but none can be created, changed or deleted");
            }
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = fs::remove_file(root.join(".write-test")) {
            // The probe an earlier version wrote and could not remove (a full disk).
            if e.kind() != io::ErrorKind::NotFound {
                tracing::debug!(error = %e, "an earlier version's write probe stays");
            }
        }
        Ok(Store {
            root: root.to_path_buf(),
            root_sync: Arc::new(fsutil::DirSync::new(root)),
            workers: IoWorkers::start(IO_THREADS, "store-io")?,
        })
    }

    /// Runs blocking store work on the store's own threads (never a new thread, see
    /// `io_workers`). The work finishes even if the caller stops waiting.
    pub async fn io<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let store = self.clone();
        self.workers.run(move || f(&store)).await
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Why the store can't take changes now, if it can't: its file system is mounted
    /// read-only. One `statvfs`, no allocation.
    pub fn unwritable(&self) -> Option<String> {
        match rustix::fs::statvfs(&self.root) {
            Ok(st) if st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) => Some(format!(
                "the data dir {} is on a read-only file system",
                self.root.display()
            )),
            Ok(_) => None,
            Err(e) => Some(format!("the data dir {}: {e}", self.root.display())),
        }
    }

    /// The task's directory; `name` must already be validated.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates the task's directory and its record; durable when this returns.
    ///
    /// The record is written in place, not through a temp file (one file creation less
    /// per task): the directory is new, and a crash mid-write leaves a torn record beside
    /// nothing else, which recovery recognises as a create that was never answered.
    pub fn create(&self, rec: &TaskRecord) -> io::Result<PathBuf> {
        let dir = self.dir(&rec.name);
        fs::DirBuilder::new().mode(DIR_MODE).create(&dir)?;
        let written = fsutil::write_new(&TaskDir(&dir).record(), rec, 0o600)
            .and_then(|()| {
                fsutil::create_reserved(&TaskDir(&dir).journal(), 0o600, JOURNAL_RESERVE)
            })
            .and_then(|()| fsutil::sync_dir(&dir))
            .and_then(|()| self.root_sync.sync());
        if let Err(e) = written {
            // Undone by path, with no descriptor (out of them is one reason to be here): a
            // directory left behind would refuse its name with 409 until a restart.
            let _ = fs::remove_file(TaskDir(&dir).record());
            let _ = fs::remove_file(TaskDir(&dir).journal());
            if let Err(rm) = fs::remove_dir(&dir) {
                tracing::error!(task = %rec.name, error = %rm, "could not undo a failed create");
            }
            return Err(e);
        }
        Ok(dir)
    }

    /// Replaces the record atomically. Callers serialise updates of one task (the
    /// manager holds the task's lifecycle lock); concurrent ones would still each leave a
    /// whole record, the last one winning.
    pub fn update(&self, rec: &TaskRecord) -> io::Result<()> {
        fsutil::write_json_atomic(&TaskDir(&self.dir(&rec.name)).record(), rec, 0o600)
    }

    /// Makes the deletion request durable; returns its time. Idempotent.
    pub fn mark_deleting(&self, name: &str) -> io::Result<Time> {
        let dir = self.dir(name);
        let marker = TaskDir(&dir).deleting();
        fsutil::create_or_keep(&marker, 0o600)?;
        fsutil::sync_dir(&dir)?;
        Ok(marker_time(&marker).unwrap_or_else(Time::now))
    }

    /// Removes the task's directory (records and logs).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.dir(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.root_sync.sync()
    }

    /// Moves a task directory the agent can't load to `.quarantine/<name>.<ms>` (a name no
    /// task can have), reported once in the log; left where it is if even that fails.
    fn quarantine(&self, name: &str, dir: &Path, why: &str) {
        let to = self
            .root
            .join(QUARANTINE)
            .join(format!("{name}.{}", Time::now().unix_millis()));
        let moved = fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(self.root.join(QUARANTINE))
            .or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .and_then(|()| fs::rename(dir, &to))
            .and_then(|()| self.root_sync.sync());
        match moved {
            Ok(()) => {
                tracing::error!(task = name, reason = why, moved_to = %to.display(), "task directory quarantined: its name is free, its files are kept")
            }
            Err(e) => {
                tracing::error!(task = name, reason = why, error = %e, "task directory can't be loaded nor quarantined; leaving it alone")
            }
        }
    }

    /// Every stored task. A directory without a record is what a crash during creation
    /// leaves (the request was never answered), so it is removed; one that holds more
    /// than an empty journal, or a record that can't be read (torn, empty, not a regular
    /// file), is quarantined (see `quarantine`).
    ///
    /// The directories are listed first, then loaded by a few threads at once (each
    /// task's files are its own): 100,000 tasks are 400,000 file-system calls and as
    /// many JSON documents, which one thread reads in seconds.
    pub fn load_all(&self) -> io::Result<Vec<TaskRecord>> {
        let mut dirs = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let fname = entry.file_name();
            let Some(n) = fname.to_str() else { continue };
            if !entry.file_type()?.is_dir() || name::invalid_reason(n).is_some() {
                continue;
            }
            dirs.push(entry);
        }
        // Not bounded by the CPUs: reading a cold data dir (after a reboot, or once the
        // kernel dropped its pages) waits on the disk, one read at a time per thread.
        let threads = LOAD_THREADS;
        let per_thread = dirs.len().div_ceil(threads).max(LOAD_MIN_PER_THREAD);
        std::thread::scope(|scope| {
            let mut chunks = dirs.chunks(per_thread);
            let first = chunks.next().unwrap_or_default();
            let helpers: Vec<_> = chunks
                .map(|chunk| {
                    std::thread::Builder::new()
                        .name("store-load".into())
                        .stack_size(512 * 1024)
                        .spawn_scoped(scope, || self.load_dirs(chunk))
                        // No thread (a pids limit): this one loads the chunk too.
                        .map_err(|_| chunk)
                })
                .collect();
            let mut out = self.load_dirs(first)?;
            for helper in helpers {
                let loaded = match helper {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("loading task records panicked"))),
                    Err(chunk) => self.load_dirs(chunk),
                };
                out.extend(loaded?);
            }
            Ok(out)
        })
    }

    /// `load_all` of some of the task directories.
    fn load_dirs(&self, dirs: &[fs::DirEntry]) -> io::Result<Vec<TaskRecord>> {
        let mut out = Vec::with_capacity(dirs.len());
        for entry in dirs {
            let fname = entry.file_name();
            let Some(n) = fname.to_str() else { continue };
            if let Err(e) = restrict_task_dir(&entry.path()) {
                tracing::warn!(task = n, error = %e, "cannot restrict the task directory's permissions");
            }
            let path = TaskDir(&entry.path()).record();
            match fsutil::read_json::<TaskRecord>(&path) {
                Ok(Some(_)) if strange_journal(&entry.path()) => {
                    self.quarantine(n, &entry.path(), "its run.jsonl is not a regular file");
                }
                Ok(Some(mut rec)) if rec.name == n => {
                    if rec.deletion_timestamp.is_none() {
                        rec.deletion_timestamp = marker_time(&TaskDir(&entry.path()).deleting());
                    }
                    out.push(rec)
                }
                Err(e) if nothing_but_the_record(&entry.path()) => {
                    // A torn record alone in its directory: the create it belonged to was
                    // interrupted before anything started, so it was never answered.
                    tracing::warn!(task = n, error = %e, "removing a torn record of an interrupted create");
                    let _ = fs::remove_dir_all(entry.path());
                }
                Ok(Some(_)) | Err(_) => {
                    // Never delete what we can't read: it may hold a result. Moved aside,
                    // so the name is free again (a create, a sync naming it) and nothing
                    // of it is lost.
                    self.quarantine(n, &entry.path(), "its task.json is unreadable");
                }
                Ok(None) if nothing_but_the_record(&entry.path()) => {
                    tracing::warn!(
                        task = n,
                        "removing a task directory left by an interrupted create"
                    );
                    let _ = fs::remove_dir_all(entry.path());
                }
                Ok(None) => {
                    // Logs or a journal without a record: kept, out of the tasks' way.
                    self.quarantine(n, &entry.path(), "it has no task.json");
                }
            }
        }
        Ok(out)
    }
}

/// Threads `load_all` reads the task directories with, at most: reads in flight when
/// the data dir is cold (measured: see docs/benchmark.md).
const LOAD_THREADS: usize = 16;
/// Fewer directories than this are not worth a thread.
const LOAD_MIN_PER_THREAD: usize = 1024;

/// The data dir and every task directory: the agent's alone (tasks running as another
/// user can't list, read or write anything in them).
const DIR_MODE: u32 = 0o700;

/// Takes group and other permissions off `path` beyond `max` (for a directory an earlier
/// version, or the volume it is, made more open), keeping the owner's.
fn restrict(path: &Path, max: u32) -> io::Result<()> {
    let mode = fs::symlink_metadata(path)?.permissions().mode();
    if mode & 0o077 & !max != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & (0o7700 | max)))?;
    }
    Ok(())
}

/// A task directory an earlier version created (0755, logs 0644): made what this one
/// creates (0700; files at most 0640, records 0600 already). One stat for a directory
/// that is right already, so the start of an agent with many tasks stays cheap.
fn restrict_task_dir(dir: &Path) -> io::Result<()> {
    if fs::symlink_metadata(dir)?.permissions().mode() & 0o077 == 0 {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            restrict(&entry.path(), 0o040)?;
        }
    }
    restrict(dir, 0)
}

/// The deletion marker's time, if there is one.
fn marker_time(marker: &Path) -> Option<Time> {
    let modified = fs::metadata(marker).ok()?.modified().ok()?;
    let ms = modified
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis();
    Some(Time::from_unix_millis(i64::try_from(ms).ok()?))
}

/// The journal's place holds something else than a regular file (a FIFO, a symlink, a
/// device): nothing the agent reads or writes. One `lstat`.
fn strange_journal(dir: &Path) -> bool {
    fs::symlink_metadata(TaskDir(dir).journal()).is_ok_and(|m| !m.file_type().is_file())
}

/// True when `dir` holds the record and at most an empty journal: nothing ever ran.
fn nothing_but_the_record(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().all(|e| {
            let name = e.file_name();
            name == layout::TASK_FILE
                || (name == layout::RUN_JOURNAL && e.metadata().is_ok_and(|m| m.len() == 0))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// A bare record of task `name`.
    fn record(name: &str) -> TaskRecord {
        TaskRecord {
            name: name.into(),
            uid: "u".into(),
            spec: TaskSpec::default(),
            exec_mode: None,
            host_uid: None,
            created_at: Time::from_unix_millis(1_000),
            deletion_timestamp: None,
            final_status: None,
        }
    }

    /// Out of descriptors, a create fails (503 at the API) and leaves nothing: a
    /// directory left behind would refuse the name (409) until a restart.
    #[test]
    fn a_create_that_runs_out_of_descriptors_leaves_no_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        // The lowest free descriptor number becomes the limit: the next open fails.
        let lowest = std::os::fd::AsRawFd::as_raw_fd(&fs::File::open("/dev/null").unwrap());
        let before = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let tight = rustix::process::Rlimit {
            current: Some(lowest as u64),
            maximum: before.maximum,
        };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, tight).unwrap();
        let created = store.create(&record("t"));
        rustix::process::setrlimit(rustix::process::Resource::Nofile, before).unwrap();
        let e = created.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EMFILE), "{e}");
        assert!(
            !store.dir("t").exists(),
            "the failed create left its directory"
        );
        store.create(&record("t")).unwrap();
    }

    #[test]
    fn the_data_dir_and_task_dirs_are_the_agents_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        let store = Store::open(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
        let rec = record("t");
        let dir = store.create(&rec).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&TaskDir(&dir).record()), 0o600);
        assert_eq!(mode(&TaskDir(&dir).journal()), 0o600);
        store.mark_deleting("t").unwrap();
        assert_eq!(mode(&TaskDir(&dir).deleting()), 0o600);
    }

    #[test]
    fn an_earlier_versions_open_data_dir_is_restricted_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        let old = root.join("old");
        fs::create_dir_all(&old).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        let rec = record("old");
        fsutil::write_new(&old.join(layout::TASK_FILE), &rec, 0o600).unwrap();
        for (f, m) in [
            (layout::STDOUT, 0o644),
            (layout::OUTPUT_INDEX, 0o666),
            (layout::RUN_JOURNAL, 0o600),
        ] {
            fs::write(old.join(f), "x").unwrap();
            fs::set_permissions(old.join(f), fs::Permissions::from_mode(m)).unwrap();
        }
        let store = Store::open(&root).unwrap();
        assert_eq!(store.load_all().unwrap(), [rec]);
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&old), 0o700);
        assert_eq!(mode(&old.join(layout::STDOUT)), 0o640);
        assert_eq!(mode(&old.join(layout::OUTPUT_INDEX)), 0o640);
        assert_eq!(mode(&old.join(layout::RUN_JOURNAL)), 0o600);
        assert_eq!(mode(&old.join(layout::TASK_FILE)), 0o600);
    }

    /// Every field of a task, upstream's newer ones included, comes back from the disk.
    #[test]
    fn a_record_round_trips_with_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let spec: TaskSpec = serde_json::from_value(serde_json::json!({
            "process": {"command": ["sh"], "args": ["-c", "true"],
                        "env": [{"name": "A", "value": "b"}], "workingDir": "/w",
                        "timeoutSeconds": 5, "execMode": "Remote",
                        "lifecycle": {"preStart": {"exec": {"command": ["true"]},
                                                   "execMode": "Local", "timeoutSeconds": 3},
                                      "postStop": {"exec": {"command": ["false"]}}}},
            "podTemplateSpec": {"metadata": {"labels": {"a": "b"}},
                                "spec": {"containers": [{"name": "c", "image": "i"}]}},
            "timeoutSeconds": 7
        }))
        .unwrap();
        let rec = TaskRecord {
            name: "t".into(),
            uid: "u".into(),
            spec,
            exec_mode: Some(ExecMode::Remote),
            host_uid: Some(100000),
            created_at: Time::from_unix_millis(1_000),
            deletion_timestamp: None,
            final_status: None,
        };
        store.create(&rec).unwrap();
        assert_eq!(store.load_all().unwrap(), std::slice::from_ref(&rec));
        // An older agent's record (no execMode) still loads.
        let mut v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["hostUid"], 100000);
        v.as_object_mut().unwrap().remove("execMode");
        v.as_object_mut().unwrap().remove("hostUid");
        let old: TaskRecord = serde_json::from_value(v).unwrap();
        assert_eq!((old.exec_mode, old.host_uid), (None, None));
    }
}
