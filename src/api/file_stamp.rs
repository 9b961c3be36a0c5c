//! Noticing that a file changed, for files re-read without a restart (the token file,
//! the TLS certificate and key).
//!
//! A `stat` of the path when the file is used (a request, a new connection), not inotify
//! (`notify`): a Kubernetes Secret volume changes by swapping a `..data` symlink two levels
//! above the file, which an inotify watch on the file misses, while `stat` follows the
//! links and sees the new inode. A `stat` costs about a microsecond, and nothing runs
//! while the agent is idle (no watcher thread, no timer).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What identifies one version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    /// The stamp of the file `path` leads to (symlinks followed).
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            // ctime moves on chmod/chown too, so fixed permissions are noticed.
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

impl FileStamp {
    /// Whether a later change is sure to change the stamp. Timestamps advance in clock
    /// ticks (a few ms on ext4), so a same-size rewrite within the tick of the version
    /// just read would keep its stamp; until a second has passed since the last write, a
    /// reader reads the file again instead of trusting the stamp (git's "racily clean").
    pub fn settled(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        now - self.mtime.0.max(self.ctime.0) >= 2
    }
}

#[cfg(test)]
mod tests {
    use super::FileStamp;

    #[test]
    fn a_rewrite_or_a_replaced_symlink_target_changes_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let link = dir.path().join("link");
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "two").unwrap();
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let first = FileStamp::of(&link).unwrap();
        assert_eq!(FileStamp::of(&link).unwrap(), first);
        // As kubelet updates a Secret volume: a new target behind the same name.
        let tmp = dir.path().join("link.tmp");
        std::os::unix::fs::symlink(&b, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        assert_ne!(FileStamp::of(&link).unwrap(), first);
        assert!(FileStamp::of(&dir.path().join("missing")).is_err());
    }
}
