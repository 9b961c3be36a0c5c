//! One inotify instance shared by many waiters, with one counted watch per watched inode.
//!
//! The kernel limits inotify instances per user (128 by default, and a node's other agents
//! use them too), and a descriptor per watched file would make many adopted tasks or log
//! followers exhaust `nofile`. So each user of this module (the journals of adopted
//! tasks, the directories log followers read) has one [`Registry`]: one instance, one
//! thread of its own that blocks reading events and bumps a `tokio::sync::watch` counter
//! per watch (independent of any async runtime; waiters of idle files cost no CPU), and a
//! [`Watch`] per waiter, the inode's watch removed with its last waiter.

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

pub struct Registry {
    inotify: Inotify,
    watches: Mutex<HashMap<WatchDescriptor, Watched>>,
    /// What a failed event thread means for the waiters, for its log line.
    on_failure: &'static str,
}

/// Where a user of this module keeps its registry: started on first use, for good (a
/// failed start is remembered, and each watch then fails with its error).
pub type Shared = OnceLock<Result<&'static Registry, io::ErrorKind>>;

impl Registry {
    /// The registry in `cell`, started on first use (see `start`).
    pub fn shared(
        cell: &'static Shared,
        name: &str,
        on_failure: &'static str,
    ) -> io::Result<&'static Registry> {
        match cell.get_or_init(|| Self::start(name, on_failure).map_err(|e| e.kind())) {
            Ok(reg) => Ok(reg),
            Err(kind) => Err(io::Error::from(*kind)),
        }
    }

    /// Starts the instance and its thread `name`. The registry lives as long as the
    /// process (its thread reads it), so it is leaked: callers keep it in a static.
    pub fn start(name: &str, on_failure: &'static str) -> io::Result<&'static Registry> {
        let reg: &'static Registry = Box::leak(Box::new(Registry {
            inotify: Inotify::init(InitFlags::IN_CLOEXEC)?,
            watches: Mutex::new(HashMap::new()),
            on_failure,
        }));
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || reg.dispatch())?;
        Ok(reg)
    }

    fn watches(&self) -> MutexGuard<'_, HashMap<WatchDescriptor, Watched>> {
        // A map of counters: consistent between statements, whoever panicked.
        self.watches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `path` for `mask`; a second waiter of the same inode shares its watch.
    pub fn watch(&'static self, path: &Path, mask: AddWatchFlags) -> io::Result<Watch> {
        let mut watches = self.watches();
        let wd = self.inotify.add_watch(path, mask)?;
        let w = watches.entry(wd).or_insert_with(|| Watched {
            refs: 0,
            tx: watch::channel(0).0,
        });
        w.refs += 1;
        Ok(Watch {
            registry: self,
            wd,
            rx: w.tx.subscribe(),
        })
    }

    fn dispatch(&self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // Every waiter is woken for good: its `changed` says the watch is gone.
                    tracing::error!(error = %e, "reading inotify events failed; {}", self.on_failure);
                    self.watches().clear();
                    return;
                }
            };
            let mut watches = self.watches();
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: everyone looks again.
                    for w in watches.values() {
                        w.tx.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    continue;
                }
                if let Some(w) = watches.get(&ev.wd) {
                    w.tx.send_modify(|n| *n = n.wrapping_add(1));
                }
                // The file is gone: its watch went with it, and its waiters, their sender
                // dropped, learn so at once.
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    watches.remove(&ev.wd);
                }
            }
        }
    }

    #[cfg(test)]
    fn is_watched(&self, wd: WatchDescriptor) -> bool {
        self.watches().contains_key(&wd)
    }
}

/// One waiter's watch of an inode. Dropping it releases the watch with the last waiter.
pub struct Watch {
    registry: &'static Registry,
    wd: WatchDescriptor,
    rx: watch::Receiver<u64>,
}

impl Watch {
    /// Resolves at the next event after the last call (at once if one is pending); `false`
    /// once the watch is gone (the file removed, or the event thread failed).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Whether `other` shares this one's kernel watch (the same inode).
    pub fn shares(&self, other: &Watch) -> bool {
        self.wd == other.wd
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watches = self.registry.watches();
        if let Some(w) = watches.get_mut(&self.wd) {
            w.refs -= 1;
            if w.refs == 0 {
                watches.remove(&self.wd);
                let _ = self.registry.inotify.rm_watch(self.wd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_share_one_watch_hear_of_writes_and_release_it_with_the_last() {
        let reg = Registry::start("inotify-test", "tests see no more changes").unwrap();
        let d = tempfile::tempdir().unwrap();
        let mask = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MODIFY;
        let mut a = reg.watch(d.path(), mask).unwrap();
        let mut b = reg.watch(d.path(), mask).unwrap();
        assert!(a.shares(&b));
        std::fs::write(d.path().join("x"), "x").unwrap();
        for w in [&mut a, &mut b] {
            let woke = tokio::time::timeout(Duration::from_secs(10), w.changed()).await;
            assert_eq!(woke, Ok(true), "every waiter hears of the write");
        }
        let wd = a.wd;
        drop(a);
        assert!(reg.is_watched(wd), "kept for the other waiter");
        drop(b);
        assert!(!reg.is_watched(wd), "released with the last one");
    }

    #[tokio::test]
    async fn a_removed_file_ends_its_waiters() {
        let reg = Registry::start("inotify-test", "tests see no more changes").unwrap();
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("journal");
        std::fs::write(&f, "").unwrap();
        let mut w = reg
            .watch(
                &f,
                AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_DELETE_SELF,
            )
            .unwrap();
        std::fs::remove_file(&f).unwrap();
        // The removal is an event, then the watch's end.
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            while w.changed().await {}
        })
        .await;
        assert!(end.is_ok(), "the waiter learns that the file is gone");
    }
}
