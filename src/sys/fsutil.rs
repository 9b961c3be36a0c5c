//! Durable file writes: the only way task state reaches the disk. And safe reads of
//! what the data dir holds: a FIFO, a device or a symlink where a record should be (a
//! stranger's doing, or a broken volume) is refused at `open` without blocking, and
//! records are read up to a bound, so nothing in the data dir can wedge or exhaust the
//! agent.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes `bytes` to `path` atomically: a temp file is written and fsynced, renamed over
/// `path`, and the directory is fsynced so the rename itself survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_replace(path, bytes, mode, true)
}

/// Like `write_atomic`; with `durable = false` readers still never see a partial file, but
/// an OS crash may lose it (fine for facts that die with the processes they describe).
pub fn write_replace(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_name(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable { sync_dir(dir) } else { Ok(()) }
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A temp file name no other writer uses: two updates of one file at the same time (a
/// delete and a start failure of one task) must not write into each other's temp file or
/// rename it away from under each other. The last rename wins; the file is never torn.
fn temp_name(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T, mode: u32) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_atomic(path, &bytes, mode)
}

/// Writes a new file (it must not exist) and fsyncs it; the caller fsyncs the directory.
pub fn write_new<T: Serialize>(path: &Path, value: &T, mode: u32) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(&bytes)?;
    f.sync_all()
}

/// Creates an empty file (it must not exist) with `reserve` bytes allocated past its end
/// (its size stays 0), so appends up to that much need no new block; the caller fsyncs
/// the directory. Where the file system can't preallocate, the file is created without.
pub fn create_reserved(path: &Path, mode: u32, reserve: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    reserve_space(&f, 0, reserve)
}

/// Allocates `len` bytes from `at` (the end of `f`) without changing its size. ENOSPC and
/// EDQUOT are reported; a file system without preallocation is not an error.
pub fn reserve_space(f: &File, at: u64, len: u64) -> io::Result<()> {
    match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::KEEP_SIZE, at, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates an empty file unless it exists; the caller fsyncs the directory.
pub fn create_or_keep(path: &Path, mode: u32) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(path)
        .map(drop)
}

/// The most a task record is read up to: far above any record a request can make (a
/// request body is at most a few MiB), far below what would hurt the agent.
pub const MAX_RECORD_BYTES: u64 = 64 * 1024 * 1024;

/// Opens `path` read-only, never following a symlink and never blocking in `open` (a
/// FIFO, a device): for a lock probe or a read that checks what it opened.
pub fn open_nonblocking(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Reads a regular file whole, refusing one longer than `max` bytes (`InvalidData`). Opened
/// without following a symlink and without blocking (a FIFO opens at once), and read only
/// if it is a regular file: anything else is `InvalidData`.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let f = open_nonblocking(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    // Sized by its length (one byte more, for the read that finds its end): `take` hides
    // the length from `read_to_end`, which then read a record in reads of 32, 32, 64, ...
    // bytes: 13 reads a task where a restart needs 4.
    let mut bytes = Vec::with_capacity(meta.len().min(max) as usize + 1);
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {max} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// Reads a JSON file (a regular file, see `read_regular`); `Ok(None)` when it does not
/// exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match read_regular(path, MAX_RECORD_BYTES) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The fsync of one directory, shared by concurrent callers (group commit, as databases
/// do with their logs): a caller returns once an fsync that *started after its call*
/// has succeeded, so one fsync serves every caller that arrived while the previous one
/// ran. Every task's create and delete change the data dir; with many clients at once,
/// most of those fsyncs are saved. Blocking: call it from blocking threads.
#[derive(Debug)]
pub struct DirSync {
    dir: PathBuf,
    state: Mutex<SyncState>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Generation of the newest fsync begun, and of the newest that succeeded.
    started: u64,
    succeeded: u64,
    running: bool,
}

impl DirSync {
    pub fn new(dir: &Path) -> Self {
        DirSync {
            dir: dir.to_path_buf(),
            state: Mutex::default(),
            finished: Condvar::new(),
        }
    }

    pub fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        // Changes made before this call are covered by any fsync that begins from now on.
        let needed = st.started + 1;
        loop {
            if st.succeeded >= needed {
                return Ok(());
            }
            if !st.running {
                st.running = true;
                st.started += 1;
                let generation = st.started;
                drop(st);
                let result = sync_dir(&self.dir);
                st = self.lock();
                st.running = false;
                if result.is_ok() {
                    st.succeeded = generation;
                }
                // On failure the waiters wake, find nothing succeeded, and one of them
                // tries again; the error goes to the caller whose fsync failed.
                self.finished.notify_all();
                return result;
            }
            st = self
                .finished
                .wait(st)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        // The state is three counters, always consistent between statements.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::DirSync;
    use std::sync::Arc;

    #[test]
    fn read_regular_reads_a_file_whole_up_to_its_limit_and_nothing_else() {
        use std::io::ErrorKind::InvalidData;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("record");
        let text = "x".repeat(5000);
        std::fs::write(&file, &text).unwrap();
        assert_eq!(super::read_regular(&file, 5000).unwrap(), text.as_bytes());
        assert_eq!(
            super::read_regular(&file, 1 << 20).unwrap(),
            text.as_bytes()
        );
        std::fs::write(&file, "").unwrap();
        assert!(super::read_regular(&file, 10).unwrap().is_empty());
        std::fs::write(&file, &text).unwrap();
        assert_eq!(
            super::read_regular(&file, 4999).unwrap_err().kind(),
            InvalidData
        );
        // Neither a FIFO (read without blocking), a directory nor a symlink is read.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(
            super::read_regular(&fifo, 10).unwrap_err().kind(),
            InvalidData
        );
        assert_eq!(
            super::read_regular(dir.path(), 10).unwrap_err().kind(),
            InvalidData
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(
            super::read_regular(&link, 1 << 20).is_err(),
            "a symlink is not followed"
        );
    }

    #[test]
    fn concurrent_callers_all_return_with_their_fsync_done() {
        let dir = tempfile::tempdir().unwrap();
        let sync = Arc::new(DirSync::new(dir.path()));
        std::thread::scope(|s| {
            for _ in 0..16 {
                let sync = sync.clone();
                s.spawn(move || {
                    for _ in 0..50 {
                        sync.sync().unwrap();
                    }
                });
            }
        });
        let st = sync.lock();
        assert!(!st.running);
        assert_eq!(st.succeeded, st.started);
        assert!(
            st.started >= 50,
            "each thread's calls need fsyncs of their own"
        );
    }

    #[test]
    fn concurrent_replacements_of_one_file_all_succeed_and_leave_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task.json");
        let writers = 8;
        std::thread::scope(|s| {
            for w in 0..writers {
                let path = path.clone();
                s.spawn(move || {
                    for i in 0..200 {
                        let v = serde_json::json!({"writer": w, "i": i, "pad": "x".repeat(4096)});
                        super::write_json_atomic(&path, &v, 0o600)
                            .unwrap_or_else(|e| panic!("writer {w} update {i}: {e}"));
                    }
                });
            }
        });
        let v: serde_json::Value = super::read_json(&path).unwrap().unwrap();
        assert_eq!(v["i"], 199, "the file holds one writer's last update whole");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["task.json"], "no temp file is left behind");
    }

    #[test]
    fn a_failed_fsync_is_reported() {
        let sync = DirSync::new(std::path::Path::new("/nonexistent/task-executor"));
        assert!(sync.sync().is_err());
    }
}
