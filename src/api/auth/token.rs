//! `--auth-token-file`: the accepted bearer tokens, one a line, re-read when the file
//! changes (see `file_stamp` for how a change is noticed), so a token is rotated by
//! listing the new one beside the old, moving the clients, then removing the old one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use subtle::{Choice, ConstantTimeEq};

use super::{AuthError, digest};
use crate::api::file_stamp::FileStamp;

pub struct TokenFile {
    path: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    /// The version of the file last read; `None` while it can't be looked at.
    stamp: Option<FileStamp>,
    /// Whether the stamp is sure to change with the file (see `FileStamp::settled`).
    trusted: bool,
    /// Digests of the accepted tokens: the last good set.
    digests: Arc<[[u8; 32]]>,
}

impl TokenFile {
    /// Reads the file; a missing, unreadable or empty one is an error (the agent must
    /// not start with a check nobody can pass, nor without the check asked for).
    pub fn open(path: &Path) -> Result<TokenFile, AuthError> {
        let setup =
            |why: String| AuthError::Setup(format!("--auth-token-file {}: {why}", path.display()));
        let stamp = FileStamp::of(path).map_err(|e| setup(e.to_string()))?;
        let digests = read(path).map_err(|e| setup(e.to_string()))?;
        if digests.is_empty() {
            return Err(setup(
                "no token in it (one token a line; # starts a comment)".into(),
            ));
        }
        if let Ok(m) = std::fs::metadata(path)
            && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o004 != 0
        {
            tracing::warn!(path = %path.display(), "token file is readable by every user; make it 0600 (0440 with the agent's group)");
        }
        tracing::info!(path = %path.display(), tokens = digests.len(), "bearer tokens loaded");
        Ok(TokenFile {
            path: path.to_path_buf(),
            state: Mutex::new(Loaded {
                stamp: Some(stamp),
                trusted: stamp.settled(),
                digests,
            }),
        })
    }

    /// Whether `token` is one of the current tokens. Every listed token is compared, in
    /// constant time and as a digest, so neither which one matched nor how long it is
    /// shows in the time taken.
    pub fn accepts(&self, token: &str) -> bool {
        let presented = digest(token);
        let digests = self.current();
        let mut found = Choice::from(0);
        for known in digests.iter() {
            found |= known.ct_eq(&presented);
        }
        found.into()
    }

    /// The current set, re-read first if the file changed. A file that disappears, can't
    /// be read or lists no token leaves the last good set in force (logged once per
    /// change), so a botched edit does not lock every client out.
    fn current(&self) -> Arc<[[u8; 32]]> {
        let mut loaded = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.path.display();
        let kept = loaded.digests.len();
        match FileStamp::of(&self.path) {
            Ok(stamp) if loaded.stamp == Some(stamp) && loaded.trusted => {}
            Ok(stamp) => {
                let changed = loaded.stamp != Some(stamp);
                loaded.stamp = Some(stamp);
                loaded.trusted = stamp.settled();
                match read(&self.path) {
                    Ok(d) if d.is_empty() => {
                        if changed {
                            tracing::warn!(%path, kept, "token file lists no token; keeping the previous tokens");
                        }
                    }
                    Ok(d) => {
                        if d != loaded.digests {
                            tracing::info!(%path, tokens = d.len(), "token file changed; tokens reloaded");
                            loaded.digests = d;
                        }
                    }
                    Err(e) => {
                        if changed {
                            tracing::warn!(%path, error = %e, kept, "cannot read the token file; keeping the previous tokens");
                        }
                    }
                }
            }
            Err(e) => {
                if loaded.stamp.take().is_some() {
                    tracing::warn!(%path, error = %e, kept, "token file is gone; keeping the previous tokens");
                }
            }
        }
        loaded.digests.clone()
    }
}

/// The digests of the tokens a file lists: one a line, blank lines and `#` lines skipped.
fn read(path: &Path) -> std::io::Result<Arc<[[u8; 32]]>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(digest)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_blank_lines_are_not_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            "# rotated 2026-01\n\n  old-token  \nnew-token\n#not-a-token\n",
        )
        .unwrap();
        let f = TokenFile::open(&path).unwrap();
        assert!(f.accepts("old-token") && f.accepts("new-token"));
        assert!(!f.accepts("#not-a-token") && !f.accepts("") && !f.accepts("# rotated 2026-01"));
    }

    #[test]
    fn a_missing_or_empty_file_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let e = TokenFile::open(&path).err().expect("missing file accepted");
        assert!(e.to_string().contains("tokens"), "{e}");
        std::fs::write(&path, "# nothing yet\n\n").unwrap();
        let e = TokenFile::open(&path).err().expect("empty file accepted");
        assert!(e.to_string().contains("no token"), "{e}");
    }

    #[test]
    fn changes_apply_and_a_broken_file_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "a\n").unwrap();
        let f = TokenFile::open(&path).unwrap();
        std::fs::write(&path, "a\nb\n").unwrap();
        assert!(f.accepts("a") && f.accepts("b"));
        std::fs::write(&path, "b\n").unwrap();
        assert!(!f.accepts("a") && f.accepts("b"));
        std::fs::write(&path, "# emptied by mistake\n").unwrap();
        assert!(f.accepts("b"));
        std::fs::remove_file(&path).unwrap();
        assert!(f.accepts("b"));
        std::fs::write(&path, "c\n").unwrap();
        assert!(!f.accepts("b") && f.accepts("c"));
    }
}
