//! Change notification for task directories, for followers of a task's output.
//!
//! One inotify instance (`sys::inotify`) serves every follower: each followed directory
//! has one watch however many clients follow it, counted and removed with the last one,
//! and followers of idle tasks cost no CPU at all (nothing polls).

use std::io;
use std::path::Path;

use nix::sys::inotify::AddWatchFlags;

use crate::sys::inotify::{Registry, Shared, Watch};

fn registry() -> io::Result<&'static Registry> {
    static REGISTRY: Shared = Shared::new();
    Registry::shared(
        &REGISTRY,
        "log-watch",
        "log followers see changes only when tasks end",
    )
}

/// Changes in one directory (a file written, created or renamed; the directory removed).
/// Dropping it releases the watch.
pub struct DirWatch(Watch);

impl DirWatch {
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        let mask = AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        Ok(DirWatch(registry()?.watch(dir, mask)?))
    }

    /// Resolves at the next change after the last call (at once if one is pending);
    /// never again once the directory is gone.
    pub async fn changed(&mut self) {
        if !self.0.changed().await {
            std::future::pending::<()>().await;
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
        assert!(a.0.shares(&b.0));
        std::fs::write(d.path().join("stdout.log"), "x").unwrap();
        tokio::time::timeout(Duration::from_secs(10), a.changed())
            .await
            .expect("a write is seen");
        tokio::time::timeout(Duration::from_secs(10), b.changed())
            .await
            .expect("by every follower");
    }
}
