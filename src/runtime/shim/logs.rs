//! A size-capped log file: when the current file reaches half the budget it is rotated
//! to `NAME.1` (replacing the older one), so a task's log never exceeds the cap.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

pub struct CappedLog {
    path: PathBuf,
    file: File,
    written: u64,
    per_file: u64,
}

impl CappedLog {
    pub fn open(path: PathBuf, cap: u64) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok(CappedLog {
            path,
            file,
            written,
            per_file: (cap / 2).max(1),
        })
    }

    pub fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.written >= self.per_file {
                self.rotate()?;
            }
            let room = (self.per_file - self.written) as usize;
            let n = room.min(buf.len());
            self.file.write_all(&buf[..n])?;
            self.written += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        fs::rename(&self.path, &old)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let marker = b"[task-executor: log rotated, earlier output is in the .1 file]\n";
        self.file.write_all(marker)?;
        self.written = marker.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_the_cap_and_keeps_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stdout.log");
        let mut log = CappedLog::open(p.clone(), 1000).unwrap();
        for i in 0..500 {
            log.write(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        let cur = fs::read_to_string(&p).unwrap();
        let old = fs::read_to_string(dir.path().join("stdout.log.1")).unwrap();
        assert!(cur.len() + old.len() <= 1000);
        assert!(cur.ends_with("line 0499\n"));
        assert!(cur.starts_with("[task-executor: log rotated"));
    }
}
