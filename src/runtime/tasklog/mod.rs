//! Reading a task's output back from its log files, for `GET /tasks/{name}/logs`.
//!
//! A task's output is a *log set*: capped files with one rotated predecessor each
//! (`NAME.1` then `NAME`, see `task::layout`), in one of two formats:
//! * plain (process and sidecar tasks, and any other capped log pair the shim writes):
//!   one file per stream holding exactly the bytes written, plus the shim's output index
//!   (`index`) for arrival order and times;
//! * CRI (container tasks): one `container.log` in the CRI format
//!   `<RFC3339Nano> <stdout|stderr> <F|P> <text>`, turned back into plain lines.
//!
//! A [`Reader`] yields the output as [`Piece`]s: a line (with its `\n`), or part of one
//! when it is unterminated at the end or longer than [`MAX_LINE`]. Pieces come in arrival
//! order, each with the time its last byte was written (when a line became complete, as
//! CRI runtimes stamp lines). A reader keeps its files open, so a rotation or a deletion
//! while it reads loses nothing it has started on; [`Reader::refresh`] picks up what was
//! written since.

mod cri;
mod cursor;
pub mod index;
mod plain;

use std::io;
use std::path::{Path, PathBuf};

use crate::task::layout::TaskDir;

/// Lines longer than this are passed on in parts (CRI runtimes split at 16 KiB).
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn index(self) -> u8 {
        self as u8
    }
}

/// Which streams to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streams {
    pub stdout: bool,
    pub stderr: bool,
}

impl Streams {
    pub const ALL: Streams = Streams {
        stdout: true,
        stderr: true,
    };

    pub fn has(self, s: Stream) -> bool {
        match s {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        }
    }
}

/// Part of the output: a whole line, or a part of one (`bytes` then has no final `\n`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub stream: Stream,
    /// When the piece's last byte was written (ns since the Unix epoch).
    pub time_ns: i64,
    pub bytes: Vec<u8>,
}

/// Where a task's output is, and in which format.
#[derive(Clone, Debug)]
pub enum LogSet {
    Plain {
        files: Vec<(Stream, PathBuf)>,
        index: Option<PathBuf>,
    },
    Cri {
        file: PathBuf,
    },
}

impl LogSet {
    /// The output of the task in `dir`: its CRI log for a container task, else the
    /// shim's stdout/stderr logs and index.
    pub fn of_task(dir: &Path, container: bool) -> LogSet {
        let dir = TaskDir(dir);
        if container {
            LogSet::Cri {
                file: dir.container_log(),
            }
        } else {
            LogSet::Plain {
                files: vec![
                    (Stream::Stdout, dir.stdout()),
                    (Stream::Stderr, dir.stderr()),
                ],
                index: Some(dir.output_index()),
            }
        }
    }

    /// The output of one of the task's lifecycle hooks: one file (its stdout and stderr
    /// combined) with an index of its own.
    pub fn of_hook(dir: &Path, hook: crate::task::model::HookName) -> LogSet {
        LogSet::Plain {
            files: vec![(Stream::Stdout, TaskDir(dir).hook_log(hook))],
            index: Some(TaskDir(dir).hook_index(hook)),
        }
    }

    /// Opens what exists now (a task that wrote nothing yet reads as empty).
    pub fn open(&self, streams: Streams) -> io::Result<Reader> {
        Ok(match self {
            LogSet::Plain { files, index } => {
                let files = files
                    .iter()
                    .filter(|(s, _)| streams.has(*s))
                    .cloned()
                    .collect();
                Reader::Plain(plain::PlainReader::open(files, index.clone())?)
            }
            LogSet::Cri { file } => Reader::Cri(cri::CriReader::open(file.clone(), streams)?),
        })
    }
}

/// An open log set and a position in it. Cloning copies the position (the files are
/// shared), so a caller can look ahead (count lines for a tail) and come back.
#[derive(Clone, Debug)]
pub enum Reader {
    Plain(plain::PlainReader),
    Cri(cri::CriReader),
}

impl Reader {
    /// Takes in what was written (and rotated) since the last look.
    pub fn refresh(&mut self) -> io::Result<()> {
        match self {
            Reader::Plain(r) => r.refresh(),
            Reader::Cri(r) => r.refresh(),
        }
    }

    /// The next piece of output, or `None` when there is none yet. With `flush`, what is
    /// there is final: an unterminated last line is passed on too (the task has ended,
    /// or the caller reads once and stops); without it such a line waits for its end.
    pub fn next_piece(&mut self, flush: bool) -> io::Result<Option<Piece>> {
        match self {
            Reader::Plain(r) => r.next_piece(flush),
            Reader::Cri(r) => r.next_piece(flush),
        }
    }
}

/// Reads up to `buf.len()` bytes at `off` (fewer only at the end of the file).
pub(crate) fn read_full_at(f: &std::fs::File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                off += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
