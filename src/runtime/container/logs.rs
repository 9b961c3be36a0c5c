//! The container's CRI log file in the task dir, kept within the task's log budget.
//!
//! The runtime writes `container.log` (CRI format: `<RFC3339Nano> <stream> <F|P> <text>`).
//! While the container runs, a file past half the budget is rotated to `container.log.1`
//! (the older half is dropped) and the runtime is asked to reopen its log. Once the
//! container has exited, the files are cut to the budget, oldest output first. A line in
//! the log's own format marks every cut.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use jiff::Timestamp;

use crate::task::layout::{CONTAINER_LOG, ROTATED_SUFFIX, TaskDir, rotated};

fn marker(what: &str) -> String {
    format!("{} stderr F [task-executor] {what}\n", Timestamp::now())
}

fn size(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Rotates a running container's log when it outgrew half of `max` bytes. Returns true
/// when it did, and the runtime must then reopen the log (ReopenContainerLog).
pub fn rotate_if_needed(dir: &Path, max: u64) -> io::Result<bool> {
    let live = TaskDir(dir).container_log();
    if max == 0 || size(&live) <= max / 2 {
        return Ok(false);
    }
    fs::rename(&live, rotated(&live))?;
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&live)?;
    f.write_all(
        marker(&format!(
            "log rotated: earlier output is in {CONTAINER_LOG}{ROTATED_SUFFIX}; older output was dropped (limit {max} bytes)"
        ))
        .as_bytes(),
    )?;
    Ok(true)
}

/// Cuts an exited container's log files to `max` bytes in all, dropping the oldest output.
pub fn enforce_budget(dir: &Path, max: u64) -> io::Result<()> {
    if max == 0 {
        return Ok(());
    }
    let live = TaskDir(dir).container_log();
    let rotated = rotated(&live);
    let (l, r) = (size(&live), size(&rotated));
    if l >= max {
        let _ = fs::remove_file(&rotated);
        if l > max {
            keep_tail(&live, max)?;
        }
    } else if l + r > max {
        keep_tail(&rotated, max - l)?;
    }
    Ok(())
}

/// Rewrites `path` to hold at most `keep` bytes: a marker, then the newest whole lines.
fn keep_tail(path: &Path, keep: u64) -> io::Result<()> {
    let note = marker(&format!("earlier output truncated (limit {keep} bytes)"));
    let budget = keep.saturating_sub(note.len() as u64);
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(budget)))?;
    let mut tail = Vec::with_capacity(budget as usize);
    f.read_to_end(&mut tail)?;
    // Start at a line boundary so no half line survives.
    let start = if len > budget {
        tail.iter()
            .position(|b| *b == b'\n')
            .map_or(tail.len(), |p| p + 1)
    } else {
        0
    };
    let tmp = path.with_extension("trim");
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(&tmp)?;
    out.write_all(note.as_bytes())?;
    out.write_all(&tail[start..])?;
    drop(out);
    fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize) -> String {
        (0..n)
            .map(|i| format!("2026-01-01T00:00:00.000000000Z stdout F line {i:04}\n"))
            .collect()
    }

    #[test]
    fn exited_log_is_cut_to_the_budget_keeping_the_newest_lines() {
        let d = tempfile::tempdir().unwrap();
        fs::write(TaskDir(d.path()).container_log(), lines(100)).unwrap();
        enforce_budget(d.path(), 1000).unwrap();
        let text = fs::read_to_string(TaskDir(d.path()).container_log()).unwrap();
        assert!(text.len() <= 1000, "{}", text.len());
        assert!(text.lines().next().unwrap().contains("truncated"));
        assert!(text.ends_with("line 0099\n"));
        assert!(text.lines().skip(1).all(|l| l.contains(" stdout F line ")));
    }

    #[test]
    fn small_logs_are_left_alone() {
        let d = tempfile::tempdir().unwrap();
        fs::write(TaskDir(d.path()).container_log(), lines(2)).unwrap();
        enforce_budget(d.path(), 10_000).unwrap();
        assert_eq!(
            fs::read_to_string(TaskDir(d.path()).container_log()).unwrap(),
            lines(2)
        );
        assert!(!rotate_if_needed(d.path(), 10_000).unwrap());
    }

    #[test]
    fn rotation_then_budget_trims_the_rotated_file_first() {
        let d = tempfile::tempdir().unwrap();
        fs::write(TaskDir(d.path()).container_log(), lines(20)).unwrap();
        assert!(rotate_if_needed(d.path(), 1000).unwrap());
        assert!(rotated(&TaskDir(d.path()).container_log()).exists());
        let live = fs::read_to_string(TaskDir(d.path()).container_log()).unwrap();
        assert!(live.contains("log rotated"));
        fs::OpenOptions::new()
            .append(true)
            .open(TaskDir(d.path()).container_log())
            .unwrap()
            .write_all(lines(3).as_bytes())
            .unwrap();
        enforce_budget(d.path(), 1000).unwrap();
        let total = size(&TaskDir(d.path()).container_log())
            + size(&rotated(&TaskDir(d.path()).container_log()));
        assert!(total <= 1000, "{total}");
        assert!(
            fs::read_to_string(rotated(&TaskDir(d.path()).container_log()))
                .unwrap()
                .ends_with("line 0019\n")
        );
    }
}
