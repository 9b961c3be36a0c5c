//! A size-capped log file: when the current file reaches half the budget it is rotated
//! to `NAME.1` (`layout::rotated`, replacing the older one), so a task's log never exceeds the cap. The file
//! is created on the first write: a silent task costs no file. The files hold exactly the
//! bytes the task wrote (no markers): `NAME.1` then `NAME` is the newest part of its
//! output, so `cat` and the logs endpoint both see it unaltered.
//!
//! Each write is also recorded in the task's output index (`tasklog::index`): stream,
//! time and position, for interleaving and timestamps. Rotation happens under the
//! index's lock, with a record of the new file's generation.

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::runtime::tasklog::index::IndexWriter;
use crate::task::layout::{self, TaskDir};

/// Task output: the agent (owner) writes and reads it, its group may read it (a log
/// collector), nobody else: not other tasks, not the task itself when it runs as another
/// user.
pub const LOG_MODE: u32 = 0o640;

/// The index shared by a task's stdout and stderr logs (the shim is single-threaded).
pub type SharedIndex = Rc<RefCell<IndexWriter>>;

/// The output index of the task in `dir`; nothing is created until the first output.
pub fn index(dir: &Path, cap: u64) -> SharedIndex {
    index_at(TaskDir(dir).output_index(), cap)
}

/// An output index at `path` (a hook's log has one of its own).
pub fn index_at(path: PathBuf, cap: u64) -> SharedIndex {
    Rc::new(RefCell::new(IndexWriter::new(path, cap)))
}

pub struct CappedLog {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    per_file: u64,
    /// 0 for stdout, 1 for stderr: the stream's number in the index.
    stream: u8,
    /// Rotations of this log so far.
    generation: u32,
    index: SharedIndex,
}

impl CappedLog {
    pub fn new(path: PathBuf, cap: u64, stream: u8, index: &SharedIndex) -> Self {
        CappedLog {
            path,
            file: None,
            written: 0,
            per_file: (cap / 2).max(1),
            stream,
            generation: 0,
            index: index.clone(),
        }
    }

    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(LOG_MODE)
                .open(&self.path)?;
            self.written = f.metadata()?.len();
            self.generation = self.index.borrow_mut().generation(self.stream);
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
            self.index
                .borrow_mut()
                .append(self.stream, self.generation, self.written);
            buf = &buf[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        // Readers hold the lock shared while they pair files with generations.
        let _lock = self.index.borrow_mut().lock();
        fs::rename(&self.path, layout::rotated(&self.path))?;
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(LOG_MODE)
            .open(&self.path)?;
        self.written = 0;
        self.file = Some(f);
        self.generation += 1;
        self.index
            .borrow_mut()
            .append(self.stream, self.generation, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_the_cap_and_keeps_the_tail_unaltered() {
        let dir = tempfile::tempdir().unwrap();
        let p = TaskDir(dir.path()).stdout();
        let idx = index(dir.path(), 1000);
        let mut log = CappedLog::new(p.clone(), 1000, 0, &idx);
        assert!(!p.exists(), "no file before the first write");
        assert!(!TaskDir(dir.path()).output_index().exists(), "nor an index");
        let mut all = String::new();
        for i in 0..500 {
            let line = format!("line {i:04}\n");
            log.write(line.as_bytes()).unwrap();
            all.push_str(&line);
        }
        let cur = fs::read_to_string(&p).unwrap();
        let old = fs::read_to_string(layout::rotated(&p)).unwrap();
        assert!(cur.len() + old.len() <= 1000);
        assert!(cur.ends_with("line 0499\n"));
        assert!(
            all.ends_with(&format!("{old}{cur}")),
            "the two files are the output's tail, byte for byte"
        );
        let f = File::open(TaskDir(dir.path()).output_index()).unwrap();
        let (_, recs) = crate::runtime::tasklog::index::read_all(&f)
            .unwrap()
            .unwrap();
        let last = recs.last().unwrap();
        assert_eq!((last.stream, last.end), (0, cur.len() as u64));
        assert_eq!(
            last.generation as usize,
            (all.len() - 1) / 500,
            "one generation per rotation"
        );
    }
}
