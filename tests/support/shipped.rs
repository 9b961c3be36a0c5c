//! The release binary the image ships (`scripts/build-release`, which `scripts/test` runs
//! before the groups that use it): the tests that need it fail, never skip, without it.

use std::path::{Path, PathBuf};

/// The shipped build: `TASK_EXECUTOR_SHIPPED_BIN`, else `target/dist`.
pub fn shipped_binary() -> PathBuf {
    let path = std::env::var_os("TASK_EXECUTOR_SHIPPED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dist/task-executor"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "the shipped binary {}: {e}\nbuild it with `bash scripts/build-release target/dist` \
             (scripts/test does) or point TASK_EXECUTOR_SHIPPED_BIN at it",
            path.display()
        )
    });
    // A binary with a dynamic loader would not run in the busybox or distroless image.
    let out = std::process::Command::new("file")
        .arg(&path)
        .output()
        .unwrap();
    let kind = String::from_utf8_lossy(&out.stdout);
    assert!(
        kind.contains("statically linked") || kind.contains("static-pie linked"),
        "{} is not static: {kind}",
        path.display()
    );
    assert!(bytes.len() > 1 << 20, "{} is too small", path.display());
    path
}
