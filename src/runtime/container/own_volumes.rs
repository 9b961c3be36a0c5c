//! A pod-template task's own volumes: each `emptyDir` is a directory in the task's
//! directory (so it goes when the task is deleted), and each `hostPath` is checked or
//! created as its `type` asks, before the container is created.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::runtime::RuntimeError;
use crate::task::layout::TaskDir;
use crate::task::template::{HostPathKind, TemplateVolume, VolumeSource};

/// Where `emptyDir` volume `name` of the task in `task_dir` lives.
pub fn empty_dir(task_dir: &Path, name: &str) -> PathBuf {
    TaskDir(task_dir).volumes().join(name)
}

/// Creates the `emptyDir`s (world-writable, as kubelet makes them, for containers that
/// run as another user) and checks or creates the `hostPath`s. A path that is not what its
/// `type` says ends the task's start with the reason.
pub fn prepare(task_dir: &Path, volumes: &[TemplateVolume]) -> Result<(), RuntimeError> {
    for v in volumes {
        let fail = |what: String| RuntimeError::Io(io::Error::other(what));
        match &v.source {
            VolumeSource::EmptyDir => {
                let dir = empty_dir(task_dir, &v.name);
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)))
                    .map_err(|e| {
                        fail(format!(
                            "emptyDir volume {:?}: creating {}: {e}",
                            v.name,
                            dir.display()
                        ))
                    })?;
            }
            VolumeSource::HostPath { path, kind } => {
                let p = Path::new(path);
                let meta = fs::metadata(p);
                let problem = match (kind, &meta) {
                    (HostPathKind::Any, _) => None,
                    (HostPathKind::Directory | HostPathKind::DirectoryOrCreate, Ok(m))
                        if m.is_dir() =>
                    {
                        None
                    }
                    (HostPathKind::File | HostPathKind::FileOrCreate, Ok(m)) if m.is_file() => None,
                    (HostPathKind::DirectoryOrCreate, Err(e))
                        if e.kind() == io::ErrorKind::NotFound =>
                    {
                        fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o755)
                            .create(p)
                            .err()
                            .map(|e| format!("creating it: {e}"))
                    }
                    (HostPathKind::FileOrCreate, Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                        fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .mode(0o644)
                            .open(p)
                            .err()
                            .map(|e| format!("creating it: {e}"))
                    }
                    (HostPathKind::Directory | HostPathKind::DirectoryOrCreate, _) => {
                        Some("is not a directory".to_string())
                    }
                    (HostPathKind::File | HostPathKind::FileOrCreate, _) => {
                        Some("is not a file".to_string())
                    }
                };
                if let Some(problem) = problem {
                    return Err(fail(format!(
                        "hostPath volume {:?}: {path} {problem}",
                        v.name
                    )));
                }
            }
            VolumeSource::Pod => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, source: VolumeSource) -> TemplateVolume {
        TemplateVolume {
            name: name.into(),
            source,
        }
    }

    fn host(path: &Path, kind: HostPathKind) -> VolumeSource {
        VolumeSource::HostPath {
            path: path.display().to_string(),
            kind,
        }
    }

    #[test]
    fn empty_dirs_are_made_and_host_paths_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let task = tmp.path().join("task");
        fs::create_dir(&task).unwrap();
        let made = tmp.path().join("made/deep");
        let file = tmp.path().join("f");
        prepare(
            &task,
            &[
                vol("scratch", VolumeSource::EmptyDir),
                vol("made", host(&made, HostPathKind::DirectoryOrCreate)),
                vol("file", host(&file, HostPathKind::FileOrCreate)),
                vol("any", host(Path::new("/nonexistent/x"), HostPathKind::Any)),
                vol("pods", VolumeSource::Pod),
            ],
        )
        .unwrap();
        let scratch = empty_dir(&task, "scratch");
        assert_eq!(scratch, task.join("volumes/scratch"));
        let mode = fs::metadata(&scratch).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o777);
        assert!(made.is_dir() && file.is_file());
        // Again: nothing changes, nothing fails.
        prepare(&task, &[vol("scratch", VolumeSource::EmptyDir)]).unwrap();

        let e = prepare(&task, &[vol("d", host(&file, HostPathKind::Directory))]).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        let e = prepare(&task, &[vol("f", host(&made, HostPathKind::File))]).unwrap_err();
        assert!(e.to_string().contains("is not a file"), "{e}");
        let missing = tmp.path().join("missing");
        let e = prepare(&task, &[vol("m", host(&missing, HostPathKind::Directory))]).unwrap_err();
        assert!(e.to_string().contains("hostPath volume \"m\""), "{e}");
    }
}
