//! A size-capped log file: when the current file reaches half the budget it is rotated
//! to `NAME.1` (replacing the older one), so a task's log never exceeds the cap. The file
//! is created on the first write: a silent task costs no file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

pub struct CappedLog {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    per_file: u64,
}

impl CappedLog {
    pub fn new(path: PathBuf, cap: u64) -> Self {
        CappedLog {
            path,
            file: None,
            written: 0,
            per_file: (cap / 2).max(1),
        }
    }

    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.written = f.metadata()?.len();
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    pub fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        self.file()?;
        while !buf.is_empty() {
            if self.written >= self.per_file {
                self.rotate()?;
            }
            let room = (self.per_file - self.written) as usize;
            let n = room.min(buf.len());
            self.file()?.write_all(&buf[..n])?;
            self.written += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        fs::rename(&self.path, &old)?;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let marker = b"[task-executor: log rotated, earlier output is in the .1 file]\n";
        f.write_all(marker)?;
        self.written = marker.len() as u64;
        self.file = Some(f);
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
        let mut log = CappedLog::new(p.clone(), 1000);
        assert!(!p.exists(), "no file before the first write");
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
