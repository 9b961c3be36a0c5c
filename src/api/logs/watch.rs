//! Change notification for task directories, for followers of a task's output.
//!
//! One inotify instance serves the whole agent (the kernel limits instances per user to
//! 128 by default, and a node's other agents use them too): each followed directory has
//! one watch however many clients follow it, counted and removed with the last one. A
//! thread of its own blocks reading the events and bumps a `tokio::sync::watch` counter
//! per directory, so followers of idle tasks cost no CPU at all (nothing polls), and the
//! thread is independent of any async runtime.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::watch;

struct Watched {
    refs: usize,
    tx: watch::Sender<u64>,
}

struct Registry {
    inotify: Inotify,
    dirs: Mutex<HashMap<WatchDescriptor, Watched>>,
}

impl Registry {
    fn dirs(&self) -> std::sync::MutexGuard<'_, HashMap<WatchDescriptor, Watched>> {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn registry() -> io::Result<&'static Arc<Registry>> {
    static REGISTRY: OnceLock<Result<Arc<Registry>, nix::errno::Errno>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let reg = Arc::new(Registry {
                inotify: Inotify::init(InitFlags::IN_CLOEXEC)?,
                dirs: Mutex::new(HashMap::new()),
            });
            let r = reg.clone();
            std::thread::Builder::new()
                .name("log-watch".into())
                .spawn(move || dispatch(&r))
                .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
            Ok(reg)
        })
        .as_ref()
        .map_err(|e| io::Error::from(*e))
}

fn dispatch(reg: &Registry) {
    loop {
        let events = match reg.inotify.read_events() {
            Ok(ev) => ev,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "reading file change events failed; log followers see changes only when tasks end");
                return;
            }
        };
        let mut dirs = reg.dirs();
        for ev in events {
            if let Some(w) = dirs.get(&ev.wd) {
                w.tx.send_modify(|n| *n = n.wrapping_add(1));
            }
            // The directory is gone (task deleted): its watch went with it.
            if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                dirs.remove(&ev.wd);
            }
        }
    }
}

/// Changes in one directory (a file written, created or renamed; the directory removed).
/// Dropping it releases the watch.
pub struct DirWatch {
    wd: WatchDescriptor,
    rx: watch::Receiver<u64>,
}

impl DirWatch {
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        let reg = registry()?;
        let mut dirs = reg.dirs();
        let wd = reg.inotify.add_watch(
            dir,
            AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_ONLYDIR,
        )?;
        let w = dirs.entry(wd).or_insert_with(|| Watched {
            refs: 0,
            tx: watch::channel(0).0,
        });
        w.refs += 1;
        let rx = w.tx.subscribe();
        Ok(DirWatch { wd, rx })
    }

    /// Resolves at the next change after the last call (at once if one is pending);
    /// never again once the directory is gone.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        let Ok(reg) = registry() else { return };
        let mut dirs = reg.dirs();
        if let Some(w) = dirs.get_mut(&self.wd) {
            w.refs -= 1;
            if w.refs == 0 {
                dirs.remove(&self.wd);
                let _ = reg.inotify.rm_watch(self.wd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn followers_share_one_watch_and_hear_of_writes() {
        let d = tempfile::tempdir().unwrap();
        let mut a = DirWatch::new(d.path()).unwrap();
        let mut b = DirWatch::new(d.path()).unwrap();
        assert_eq!(a.wd, b.wd);
        std::fs::write(d.path().join("stdout.log"), "x").unwrap();
        tokio::time::timeout(Duration::from_secs(10), a.changed())
            .await
            .expect("a write is seen");
        tokio::time::timeout(Duration::from_secs(10), b.changed())
            .await
            .expect("by every follower");
        drop(a);
        assert!(registry().unwrap().dirs().contains_key(&b.wd));
        drop(b);
        let wd = DirWatch::new(d.path()).unwrap().wd;
        assert!(
            !registry().unwrap().dirs().contains_key(&wd),
            "released with the last one"
        );
    }
}
