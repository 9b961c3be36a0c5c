//! What the plain and CRI readers share: an open log file with a position and a
//! read-ahead (a [`Cursor`]), and finding a log's files after a rotation by inode
//! ([`open_new`]).
//!
//! A cursor holds its file open, so what it has started on survives a rotation or a
//! deletion. A file shorter than its cursor thought (cut by someone else) has nothing
//! more to give: its size becomes the position, nothing is read twice.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::read_full_at;
use crate::task::layout::rotated;

const READ_AHEAD: usize = 64 * 1024;

/// An open log file and a position in it. Cloning shares the file, copies the position.
#[derive(Clone, Debug)]
pub(super) struct Cursor {
    file: Arc<File>,
    pub ino: u64,
    /// The file's size at the last look.
    pub size: u64,
    /// The next byte to hand out.
    pub pos: u64,
    /// Read-ahead: file bytes from `buf_off`.
    buf: Vec<u8>,
    buf_off: u64,
}

impl Cursor {
    /// Opens `path` at its start, with its metadata then; `None` when there is no file.
    pub fn open(path: &Path) -> io::Result<Option<(Cursor, Metadata)>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let m = file.metadata()?;
        let cursor = Cursor {
            file: Arc::new(file),
            ino: m.ino(),
            size: m.len(),
            pos: 0,
            buf: Vec::new(),
            buf_off: 0,
        };
        Ok(Some((cursor, m)))
    }

    /// Looks at the file again: its size now, and its metadata.
    pub fn restat(&mut self) -> io::Result<Metadata> {
        let m = self.file.metadata()?;
        self.size = m.len();
        Ok(m)
    }

    /// The bytes from the position on, up to `end` (a read-ahead's worth at most), read in
    /// when the read-ahead does not hold them. Empty when there are none: at `end`, or
    /// the file is shorter than it was (its size is then the position).
    pub fn available(&mut self, end: u64) -> io::Result<&[u8]> {
        if self.pos >= end {
            return Ok(&[]);
        }
        let buf_end = self.buf_off + self.buf.len() as u64;
        if self.pos < self.buf_off || self.pos >= buf_end {
            let want = (end - self.pos).min(READ_AHEAD as u64) as usize;
            self.buf.resize(want, 0);
            let got = read_full_at(&self.file, &mut self.buf, self.pos)?;
            self.buf.truncate(got);
            self.buf_off = self.pos;
            if got == 0 {
                self.size = self.pos;
                return Ok(&[]);
            }
        }
        let from = (self.pos - self.buf_off) as usize;
        let to = (self.buf.len() as u64).min(end - self.buf_off) as usize;
        Ok(&self.buf[from..to])
    }
}

/// A log's files as a reader finds them on a look (see [`open_new`]).
pub(super) struct NewFiles {
    /// The inodes of the current file and of the rotated one, now.
    pub current: Option<u64>,
    pub rotated: Option<u64>,
    /// The newest file the reader held is neither of them: the log was rotated twice
    /// since, or its file replaced (a rewritten copy).
    pub lost: bool,
    /// The files opened, oldest first, each with its metadata then.
    pub opened: Vec<(Cursor, Metadata)>,
}

/// Opens the files of the log at `path` that a reader whose newest file is `held` (its
/// inode) does not hold yet, oldest first: the rotated file when the reader holds neither
/// file (it holds nothing yet, or `lost`), then the current file unless it is the newest
/// the reader has.
pub(super) fn open_new(path: &Path, held: Option<u64>) -> io::Result<NewFiles> {
    let old_path = rotated(path);
    let (current, old) = (inode(path), inode(&old_path));
    let lost = held.is_some_and(|h| Some(h) != current && Some(h) != old);
    let mut opened = Vec::new();
    let mut newest = held;
    if (held.is_none() || lost)
        && old.is_some()
        && let Some(c) = Cursor::open(&old_path)?
    {
        newest = Some(c.0.ino);
        opened.push(c);
    }
    if current.is_some()
        && newest != current
        && let Some(c) = Cursor::open(path)?
    {
        opened.push(c);
    }
    Ok(NewFiles {
        current,
        rotated: old,
        lost,
        opened,
    })
}

/// The inode of `path`, if it exists.
fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(c: &mut Cursor) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let size = c.size;
            let got = c.available(size).unwrap().to_vec();
            if got.is_empty() {
                return out;
            }
            c.pos += got.len() as u64;
            out.extend(got);
        }
    }

    #[test]
    fn a_cursor_reads_what_grows_and_stops_where_a_cut_file_ends() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stdout.log");
        let big: Vec<u8> = (0..READ_AHEAD * 2 + 7).map(|i| i as u8).collect();
        std::fs::write(&p, &big).unwrap();
        let (mut c, _) = Cursor::open(&p).unwrap().unwrap();
        assert_eq!(read_all(&mut c), big, "across read-aheads, byte for byte");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .set_len(big.len() as u64 + 3)
            .unwrap();
        assert!(read_all(&mut c).is_empty(), "nothing new before a look");
        c.restat().unwrap();
        assert_eq!(read_all(&mut c), [0, 0, 0]);
        // Cut under the cursor (its size not looked at again): nothing more, nothing twice.
        c.pos = 10;
        c.size = 20;
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(5)
            .unwrap();
        assert!(c.available(20).unwrap().is_empty());
        assert_eq!(c.size, 10, "its size is where it stood");
        assert!(Cursor::open(&d.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn a_reader_finds_the_files_it_does_not_hold_by_inode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("container.log");
        assert!(open_new(&p, None).unwrap().opened.is_empty(), "no log yet");
        std::fs::write(&p, "a").unwrap();
        std::fs::rename(&p, rotated(&p)).unwrap();
        std::fs::write(&p, "b").unwrap();
        // A new reader: `.1`, then the current file.
        let first = open_new(&p, None).unwrap();
        let inos: Vec<u64> = first.opened.iter().map(|(c, _)| c.ino).collect();
        assert_eq!(inos, [first.rotated.unwrap(), first.current.unwrap()]);
        assert!(!first.lost);
        let held = first.current;
        assert!(open_new(&p, held).unwrap().opened.is_empty(), "nothing new");
        // Rotated once: only the new current file is new (`.1` is the one it holds).
        std::fs::rename(&p, rotated(&p)).unwrap();
        std::fs::write(&p, "c").unwrap();
        let once = open_new(&p, held).unwrap();
        assert_eq!(once.rotated, held);
        assert_eq!(once.opened.len(), 1);
        assert_eq!(once.opened[0].0.ino, once.current.unwrap());
        // Rotated twice more: both files are new to it, and it knows it lost its place.
        let held = once.current;
        for text in ["d", "e"] {
            std::fs::rename(&p, rotated(&p)).unwrap();
            std::fs::write(&p, text).unwrap();
        }
        let twice = open_new(&p, held).unwrap();
        assert!(twice.lost);
        assert_eq!(twice.opened.len(), 2);
    }
}
