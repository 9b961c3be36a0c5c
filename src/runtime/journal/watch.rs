//! The moment an adopted task's shim lets go of its journal, for every adopted task at
//! once through one inotify instance: no descriptor per task (two pidfds each made 150
//! re-adopted tasks exhaust a `nofile` of 256, and the API with them).
//!
//! The journal's lock lives on the open file the shim appends to, so it is released
//! exactly when the last descriptor of that open file is closed: when the shim closes it
//! after its exit line, or when the shim dies. That last close of a file opened for
//! writing is an `IN_CLOSE_WRITE` event, so the event is the lock's release (other
//! closes, the agent's own appends say, are merely a reason to look again). A thread of
//! its own reads the events, as the log followers' watcher does, so nothing depends on
//! which async runtime waits.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::watch;

struct Watched {
    refs: usize,
    tx: watch::Sender<u64>,
}

struct Registry {
    inotify: Inotify,
    files: Mutex<HashMap<WatchDescriptor, Watched>>,
}

impl Registry {
    fn files(&self) -> MutexGuard<'_, HashMap<WatchDescriptor, Watched>> {
        // A map of counters: consistent between statements, whoever panicked.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn registry() -> io::Result<&'static Registry> {
    static REGISTRY: OnceLock<Result<&'static Registry, nix::errno::Errno>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let reg: &'static Registry = Box::leak(Box::new(Registry {
                inotify: Inotify::init(InitFlags::IN_CLOEXEC)?,
                files: Mutex::new(HashMap::new()),
            }));
            std::thread::Builder::new()
                .name("journal-watch".into())
                .spawn(move || dispatch(reg))
                .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
            Ok(reg)
        })
        .as_ref()
        .map(|r| *r)
        .map_err(|e| io::Error::from(*e))
}

fn dispatch(reg: &Registry) {
    loop {
        let events = match reg.inotify.read_events() {
            Ok(ev) => ev,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                // Every waiter is woken for good and falls back to polling.
                tracing::error!(error = %e, "reading journal events failed; adopted tasks are watched by polling");
                reg.files().clear();
                return;
            }
        };
        let mut files = reg.files();
        for ev in events {
            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                // Events were lost: everyone looks again.
                for w in files.values() {
                    w.tx.send_modify(|n| *n = n.wrapping_add(1));
                }
                continue;
            }
            if let Some(w) = files.get(&ev.wd) {
                w.tx.send_modify(|n| *n = n.wrapping_add(1));
            }
            // The journal is gone (its task deleted): its watch went with it, and its
            // waiters, their sender dropped, look again without waiting.
            if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                files.remove(&ev.wd);
            }
        }
    }
}

/// Closes of a journal after writing (and its removal). Dropping it releases the watch.
pub struct JournalWatch {
    wd: WatchDescriptor,
    rx: watch::Receiver<u64>,
}

impl JournalWatch {
    pub fn new(journal: &Path) -> io::Result<JournalWatch> {
        let reg = registry()?;
        let mut files = reg.files();
        let wd = reg.inotify.add_watch(
            journal,
            AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_DELETE_SELF,
        )?;
        // One watch per inode: a second watcher of the same journal shares it.
        let w = files.entry(wd).or_insert_with(|| Watched {
            refs: 0,
            tx: watch::channel(0).0,
        });
        w.refs += 1;
        let rx = w.tx.subscribe();
        Ok(JournalWatch { wd, rx })
    }

    /// Resolves at the next event after the last call (at once if one is pending); `false`
    /// once the watch is gone (the journal removed, or the watcher failed): then the
    /// caller can only poll.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

impl Drop for JournalWatch {
    fn drop(&mut self) {
        let Ok(reg) = registry() else { return };
        let mut files = reg.files();
        if let Some(w) = files.get_mut(&self.wd) {
            w.refs -= 1;
            if w.refs == 0 {
                files.remove(&self.wd);
                let _ = reg.inotify.rm_watch(self.wd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::Duration;

    /// The lock a shim holds on its journal goes with the last close of its open file,
    /// and that close is what wakes the watcher.
    #[tokio::test]
    async fn the_release_of_a_journals_lock_wakes_its_watcher() {
        let d = tempfile::tempdir().unwrap();
        let path = crate::task::layout::TaskDir(d.path()).journal();
        std::fs::write(&path, b"").unwrap();
        let shim = nix::fcntl::Flock::lock(
            std::fs::OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        let mut w = JournalWatch::new(&path).unwrap();
        let mut again = JournalWatch::new(&path).unwrap();
        assert_eq!(w.wd, again.wd, "one watch per journal");
        assert!(super::super::lock_held(&path));
        drop(shim);
        for w in [&mut w, &mut again] {
            let woke = tokio::time::timeout(Duration::from_secs(10), w.changed()).await;
            assert_eq!(woke, Ok(true), "the release is seen");
        }
        assert!(!super::super::lock_held(&path));
        let wd = w.wd;
        drop((w, again));
        assert!(!registry().unwrap().files().contains_key(&wd));
    }
}
