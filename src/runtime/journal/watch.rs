//! The moment an adopted task's shim lets go of its journal, for every adopted task at
//! once through one inotify instance: no descriptor per task (two pidfds each made 150
//! re-adopted tasks exhaust a `nofile` of 256, and the API with them).
//!
//! The journal's lock lives on the open file the shim appends to, so it is released
//! exactly when the last descriptor of that open file is closed: when the shim closes it
//! after its exit line, or when the shim dies. That last close of a file opened for
//! writing is an `IN_CLOSE_WRITE` event, so the event is the lock's release (other
//! closes, the agent's own appends say, are merely a reason to look again). The instance and
//! its thread are `sys::inotify`'s, as the log followers' are.

use std::io;
use std::path::Path;

use nix::sys::inotify::AddWatchFlags;

use crate::sys::inotify::{Registry, Shared, Watch};

fn registry() -> io::Result<&'static Registry> {
    static REGISTRY: Shared = Shared::new();
    Registry::shared(
        &REGISTRY,
        "journal-watch",
        "adopted tasks are watched by polling",
    )
}

/// Closes of a journal after writing (and its removal). Dropping it releases the watch.
pub struct JournalWatch(Watch);

impl JournalWatch {
    pub fn new(journal: &Path) -> io::Result<JournalWatch> {
        let mask = AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_DELETE_SELF;
        Ok(JournalWatch(registry()?.watch(journal, mask)?))
    }

    /// Resolves at the next event after the last call (at once if one is pending); `false`
    /// once the watch is gone (the journal removed, or the watcher failed): then the
    /// caller can only poll.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await
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
        assert!(w.0.shares(&again.0), "one watch per journal");
        assert!(super::super::lock_held(&path));
        drop(shim);
        for w in [&mut w, &mut again] {
            let woke = tokio::time::timeout(Duration::from_secs(10), w.changed()).await;
            assert_eq!(woke, Ok(true), "the release is seen");
        }
        assert!(!super::super::lock_held(&path));
    }
}
