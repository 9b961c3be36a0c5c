//! Plain logs (one file per stream, bytes as written) with the shim's output index.
//!
//! Each stream is a queue of open files ("segments", oldest first). A piece's place in
//! the interleaving is the index record (`seq`) of the chunk that holds its last byte, so
//! merging the streams by `seq` gives arrival order. A reader only hands out data the
//! index covers while the task may still write (so a piece is never placed before one
//! that arrived earlier); `flush` hands out the rest too. Data no record covers (an index
//! whose oldest records were overwritten, or no index at all) takes the place and time of
//! the next record that exists, else the reader's newest place and the file's mtime.

use std::collections::VecDeque;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};

use super::cursor::{Cursor, open_new};
use super::index::{self, Record};
use super::{MAX_LINE, Piece, Stream};

#[derive(Clone, Debug)]
struct Chunk {
    end: u64,
    seq: u64,
    time_ns: i64,
}

#[derive(Clone, Debug)]
struct Seg {
    cur: Cursor,
    generation: Option<u32>,
    /// Mtime at the last refresh.
    mtime_ns: i64,
    /// Index records of this file not yet passed, ascending.
    chunks: VecDeque<Chunk>,
    /// The end of the newest record of this file.
    indexed: u64,
}

impl Seg {
    fn new((cur, m): (Cursor, Metadata)) -> Seg {
        Seg {
            cur,
            mtime_ns: mtime_ns(&m),
            generation: None,
            chunks: VecDeque::new(),
            indexed: 0,
        }
    }
}

fn mtime_ns(m: &Metadata) -> i64 {
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

#[derive(Clone, Debug)]
struct StreamLog {
    stream: Stream,
    path: PathBuf,
    segs: VecDeque<Seg>,
    /// The newest generation the index names for this stream.
    newest_gen: Option<u32>,
    /// The unfinished line being collected, and the place of its last byte.
    line: Vec<u8>,
    line_key: (u64, i64),
    /// The next piece, looked at but not handed out yet.
    peeked: Option<(u64, Piece)>,
}

#[derive(Clone, Debug)]
pub struct PlainReader {
    index_path: Option<PathBuf>,
    index: Option<Arc<File>>,
    slots: u64,
    last_seq: u64,
    streams: Vec<StreamLog>,
}

impl PlainReader {
    pub fn open(files: Vec<(Stream, PathBuf)>, index: Option<PathBuf>) -> io::Result<Self> {
        let mut r = PlainReader {
            index_path: index,
            index: None,
            slots: 0,
            last_seq: 0,
            streams: files
                .into_iter()
                .map(|(stream, path)| StreamLog {
                    stream,
                    path,
                    segs: VecDeque::new(),
                    newest_gen: None,
                    line: Vec::new(),
                    line_key: (0, 0),
                    peeked: None,
                })
                .collect(),
        };
        r.refresh()?;
        Ok(r)
    }

    pub fn refresh(&mut self) -> io::Result<()> {
        if self.index.is_none()
            && let Some(p) = &self.index_path
        {
            match File::open(p) {
                Ok(f) => self.index = Some(Arc::new(f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // Shared lock: no rotation while files are paired with generations.
        let _lock = match &self.index {
            Some(f) => Some(Flock::lock(f.try_clone()?, FlockArg::LockShared).map_err(|(_, e)| e)?),
            None => None,
        };
        let records = self.new_records()?;
        if let Some(r) = records.last() {
            self.last_seq = r.seq;
        }
        for st in &mut self.streams {
            let idx = st.stream.index();
            if let Some(r) = records.iter().rev().find(|r| r.stream == idx) {
                st.newest_gen = Some(r.generation);
            }
            resync(st)?;
            for r in records.iter().filter(|r| r.stream == idx && r.end > 0) {
                if let Some(seg) = st
                    .segs
                    .iter_mut()
                    .find(|s| s.generation == Some(r.generation))
                    && r.end > seg.indexed
                {
                    seg.indexed = r.end;
                    if r.end > seg.cur.pos {
                        seg.chunks.push_back(Chunk {
                            end: r.end,
                            seq: r.seq,
                            time_ns: r.time_ns,
                        });
                    }
                }
            }
            for seg in &mut st.segs {
                seg.mtime_ns = mtime_ns(&seg.cur.restat()?);
            }
        }
        Ok(())
    }

    fn new_records(&mut self) -> io::Result<Vec<Record>> {
        let Some(f) = &self.index else {
            return Ok(Vec::new());
        };
        if self.slots > 0
            && let Some(recs) = index::read_after(f, self.slots, self.last_seq)?
        {
            return Ok(recs);
        }
        // First look, or we fell behind the ring: read it whole.
        let Some((slots, recs)) = index::read_all(f)? else {
            return Ok(Vec::new());
        };
        self.slots = slots;
        let last = self.last_seq;
        Ok(recs.into_iter().filter(|r| r.seq > last).collect())
    }

    pub fn next_piece(&mut self, flush: bool) -> io::Result<Option<Piece>> {
        let last_seq = self.last_seq;
        for st in &mut self.streams {
            if st.peeked.is_none() {
                st.peeked = next_line(st, flush, last_seq)?;
            }
        }
        let pick = self
            .streams
            .iter()
            .enumerate()
            .filter_map(|(i, st)| st.peeked.as_ref().map(|(seq, _)| (*seq, i)))
            .min();
        Ok(pick.and_then(|(_, i)| self.streams[i].peeked.take().map(|(_, p)| p)))
    }
}

/// Opens the stream's files this reader does not hold yet, oldest first, and pairs them
/// with generations. Runs under the index's shared lock when there is an index.
fn resync(st: &mut StreamLog) -> io::Result<()> {
    let found = open_new(&st.path, st.segs.back().map(|s| s.cur.ino))?;
    st.segs.extend(found.opened.into_iter().map(Seg::new));
    if let Some(g) = st.newest_gen {
        for seg in &mut st.segs {
            if Some(seg.cur.ino) == found.current {
                seg.generation = Some(g);
            } else if Some(seg.cur.ino) == found.rotated && seg.generation.is_none() {
                seg.generation = g.checked_sub(1);
            }
        }
    }
    Ok(())
}

/// The place (seq, time) of byte `off` of segment `i`.
fn place(st: &StreamLog, i: usize, off: u64, last_seq: u64) -> (u64, i64) {
    let seg = &st.segs[i];
    if let Some(c) = seg.chunks.iter().find(|c| c.end > off) {
        return (c.seq, c.time_ns);
    }
    // Not covered: it was written before the next record that exists.
    if let Some(c) = st.segs.iter().skip(i + 1).find_map(|s| s.chunks.front()) {
        return (c.seq, c.time_ns);
    }
    (last_seq, seg.mtime_ns)
}

/// The next piece of one stream, with its seq.
fn next_line(st: &mut StreamLog, flush: bool, last_seq: u64) -> io::Result<Option<(u64, Piece)>> {
    loop {
        let n = st.segs.len();
        let Some(seg) = st.segs.front_mut() else {
            break;
        };
        let newest = n == 1;
        let visible = if !newest || flush || seg.generation.is_none() {
            seg.cur.size
        } else {
            seg.indexed.min(seg.cur.size)
        };
        if seg.cur.pos >= visible {
            if !newest && seg.cur.pos >= seg.cur.size {
                st.segs.pop_front();
                continue;
            }
            break;
        }
        let pos = seg.cur.pos;
        let avail = seg.cur.available(visible)?;
        if avail.is_empty() {
            continue; // shorter than it was (cut by someone else): nothing more here
        }
        let room = MAX_LINE - st.line.len();
        let (take, complete) = match memchr::memchr(b'\n', &avail[..avail.len().min(room)]) {
            Some(i) => (i + 1, true),
            None => (avail.len().min(room), false),
        };
        st.line.extend_from_slice(&avail[..take]);
        let last_byte = pos + take as u64 - 1;
        seg.cur.pos += take as u64;
        st.line_key = place(st, 0, last_byte, last_seq);
        let seg = &mut st.segs[0];
        while seg.chunks.front().is_some_and(|c| c.end <= seg.cur.pos) {
            seg.chunks.pop_front();
        }
        if complete || st.line.len() >= MAX_LINE {
            return Ok(Some(take_line(st)));
        }
    }
    if flush && !st.line.is_empty() {
        return Ok(Some(take_line(st)));
    }
    Ok(None)
}

fn take_line(st: &mut StreamLog) -> (u64, Piece) {
    let (seq, time_ns) = st.line_key;
    (
        seq,
        Piece {
            stream: st.stream,
            time_ns,
            bytes: std::mem::take(&mut st.line),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::super::{LogSet, Reader, Streams};
    use super::*;
    use crate::runtime::shim::logs::{CappedLog, index};
    use crate::task::layout::{OUTPUT_INDEX, STDERR, STDOUT};

    fn all(r: &mut Reader, flush: bool) -> Vec<Piece> {
        let mut out = Vec::new();
        while let Some(p) = r.next_piece(flush).unwrap() {
            out.push(p);
        }
        out
    }

    fn text(pieces: &[Piece]) -> String {
        pieces
            .iter()
            .map(|p| String::from_utf8_lossy(&p.bytes).into_owned())
            .collect()
    }

    #[test]
    fn streams_interleave_in_arrival_order_and_lines_wait_for_their_end() {
        let d = tempfile::tempdir().unwrap();
        let idx = index(d.path(), 1 << 20);
        let mut out = CappedLog::new(d.path().join(STDOUT), 1 << 20, 0, &idx);
        let mut err = CappedLog::new(d.path().join(STDERR), 1 << 20, 1, &idx);
        out.write(b"one\ntw").unwrap();
        err.write(b"e1\n").unwrap();
        out.write(b"o\n").unwrap();
        err.write(b"e2\nunfinished").unwrap();
        let set = LogSet::of_task(d.path(), false);
        let mut r = set.open(Streams::ALL).unwrap();
        let got = all(&mut r, false);
        assert_eq!(text(&got), "one\ne1\ntwo\ne2\n");
        assert_eq!(
            got.iter().map(|p| p.stream).collect::<Vec<_>>(),
            [
                Stream::Stdout,
                Stream::Stderr,
                Stream::Stdout,
                Stream::Stderr
            ]
        );
        assert!(got.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
        // More output arrives; the reader picks it up, and a flush ends the last line.
        err.write(b" now\n").unwrap();
        out.write(b"three").unwrap();
        r.refresh().unwrap();
        assert_eq!(text(&all(&mut r, false)), "unfinished now\n");
        assert_eq!(text(&all(&mut r, true)), "three");
        // One stream alone is the file, byte for byte.
        let mut so = set
            .open(Streams {
                stdout: true,
                stderr: false,
            })
            .unwrap();
        assert_eq!(text(&all(&mut so, true)), "one\ntwo\nthree");
    }

    #[test]
    fn a_follower_crosses_rotations_without_loss_or_repeat() {
        let d = tempfile::tempdir().unwrap();
        let cap = 1000;
        let idx = index(d.path(), cap);
        let mut out = CappedLog::new(d.path().join(STDOUT), cap, 0, &idx);
        let set = LogSet::of_task(d.path(), false);
        let mut r = set.open(Streams::ALL).unwrap();
        let mut seen = String::new();
        let mut written = String::new();
        for i in 0..300 {
            let line = format!("line {i:04}\n");
            out.write(line.as_bytes()).unwrap();
            written.push_str(&line);
            if i % 7 == 0 {
                r.refresh().unwrap();
                seen.push_str(&text(&all(&mut r, false)));
            }
        }
        r.refresh().unwrap();
        seen.push_str(&text(&all(&mut r, true)));
        assert_eq!(seen, written, "every line once, in order");
        // A fresh reader sees what is kept: `.1` then the current file.
        let mut fresh = set.open(Streams::ALL).unwrap();
        let kept = text(&all(&mut fresh, true));
        assert!(
            kept.len() <= cap as usize && written.ends_with(&kept),
            "{kept}"
        );
    }

    #[test]
    fn without_an_index_the_files_are_read_stream_by_stream() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(STDOUT), "a\nb\n").unwrap();
        std::fs::write(d.path().join(STDERR), "c\n").unwrap();
        assert!(!d.path().join(OUTPUT_INDEX).exists());
        let mut r = LogSet::of_task(d.path(), false).open(Streams::ALL).unwrap();
        assert_eq!(text(&all(&mut r, false)), "a\nb\nc\n");
    }

    #[test]
    fn overlong_lines_come_in_parts() {
        let d = tempfile::tempdir().unwrap();
        let idx = index(d.path(), 1 << 22);
        let mut out = CappedLog::new(d.path().join(STDOUT), 1 << 22, 0, &idx);
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        out.write(&long).unwrap();
        out.write(b"\n").unwrap();
        let mut r = LogSet::of_task(d.path(), false).open(Streams::ALL).unwrap();
        let got = all(&mut r, false);
        assert_eq!(
            got.iter().map(|p| p.bytes.len()).collect::<Vec<_>>(),
            [MAX_LINE, MAX_LINE, 11]
        );
    }
}
