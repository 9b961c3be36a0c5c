//! A container's CRI log (`<RFC3339Nano> <stdout|stderr> <F|P> <text>` per line), turned
//! back into the plain lines the container wrote: `P` (partial) entries are joined with
//! what follows on their stream up to the `F` entry that ends the line, and every line
//! keeps the runtime's timestamp. The file order is the arrival order.
//!
//! The agent rotates a running container's log to `container.log.1` and, once the
//! container has exited, may rewrite it to fit the budget (a copy holding the newest
//! lines). A reader holds its files open, so it reads on in the file it has; a current
//! file that is neither the one it holds nor that one's successor is read from after the
//! newest timestamp already handed out, which skips a rewritten copy's repeated lines.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;

use jiff::Timestamp;

use super::cursor::{Cursor, open_new};
use super::{MAX_LINE, Piece, Stream, Streams};

#[derive(Clone, Debug)]
struct Seg {
    cur: Cursor,
    /// Entries at or before this time were handed out already (a rewritten copy).
    skip_until: Option<i64>,
}

impl Seg {
    /// The next whole line of the file (without its `\n`), or with `flush` a final line
    /// without one.
    fn next_entry(&mut self, flush: bool) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let start = self.cur.pos;
        loop {
            let size = self.cur.size;
            let avail = self.cur.available(size)?;
            if avail.is_empty() {
                if flush && !line.is_empty() {
                    return Ok(Some(line));
                }
                self.cur.pos = start; // wait for the rest of the entry
                return Ok(None);
            }
            match memchr::memchr(b'\n', avail) {
                Some(i) => {
                    line.extend_from_slice(&avail[..i]);
                    self.cur.pos += i as u64 + 1;
                    return Ok(Some(line));
                }
                None => {
                    line.extend_from_slice(avail);
                    self.cur.pos += avail.len() as u64;
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct CriReader {
    path: PathBuf,
    streams: Streams,
    segs: VecDeque<Seg>,
    /// Per stream (stdout, stderr): the line being joined from partial entries.
    partial: [Vec<u8>; 2],
    partial_time: [i64; 2],
    /// The newest timestamp handed out.
    newest: i64,
}

impl CriReader {
    pub fn open(path: PathBuf, streams: Streams) -> io::Result<Self> {
        let mut r = CriReader {
            path,
            streams,
            segs: VecDeque::new(),
            partial: [Vec::new(), Vec::new()],
            partial_time: [0, 0],
            newest: i64::MIN,
        };
        r.refresh()?;
        Ok(r)
    }

    pub fn refresh(&mut self) -> io::Result<()> {
        let found = open_new(&self.path, self.segs.back().map(|s| s.cur.ino))?;
        // A file of a log rewritten since (or rotated away twice) repeats what was read.
        let skip_until = found.lost.then_some(self.newest);
        self.segs.extend(
            found
                .opened
                .into_iter()
                .map(|(cur, _)| Seg { cur, skip_until }),
        );
        for s in &mut self.segs {
            s.cur.restat()?;
        }
        Ok(())
    }

    pub fn next_piece(&mut self, flush: bool) -> io::Result<Option<Piece>> {
        loop {
            let n = self.segs.len();
            let Some(seg) = self.segs.front_mut() else {
                break;
            };
            let Some(raw) = seg.next_entry(flush || n > 1)? else {
                if n > 1 {
                    self.segs.pop_front();
                    continue;
                }
                break;
            };
            let skip_until = seg.skip_until;
            let Some(e) = parse(&raw) else {
                continue; // not an entry (e.g. cut mid-line): nothing to show
            };
            if skip_until.is_some_and(|t| e.time_ns <= t) {
                continue;
            }
            self.newest = self.newest.max(e.time_ns);
            if !self.streams.has(e.stream) {
                continue;
            }
            let i = e.stream.index() as usize;
            self.partial[i].extend_from_slice(e.text);
            self.partial_time[i] = e.time_ns;
            if !e.partial {
                self.partial[i].push(b'\n');
            }
            if !e.partial || self.partial[i].len() >= MAX_LINE {
                return Ok(Some(self.take(i, e.stream)));
            }
        }
        if flush {
            for (i, s) in [(0, Stream::Stdout), (1, Stream::Stderr)] {
                if !self.partial[i].is_empty() {
                    return Ok(Some(self.take(i, s)));
                }
            }
        }
        Ok(None)
    }

    fn take(&mut self, i: usize, stream: Stream) -> Piece {
        Piece {
            stream,
            time_ns: self.partial_time[i],
            bytes: std::mem::take(&mut self.partial[i]),
        }
    }
}

struct Entry<'a> {
    time_ns: i64,
    stream: Stream,
    partial: bool,
    text: &'a [u8],
}

fn parse(line: &[u8]) -> Option<Entry<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let ts: Timestamp = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    Some(Entry {
        time_ns: ts.as_nanosecond() as i64,
        stream,
        partial,
        text: parts.next().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::LogSet;
    use super::*;
    use crate::task::layout::CONTAINER_LOG;

    fn all(r: &mut super::super::Reader, flush: bool) -> Vec<Piece> {
        let mut out = Vec::new();
        while let Some(p) = r.next_piece(flush).unwrap() {
            out.push(p);
        }
        out
    }

    #[test]
    fn cri_entries_become_the_lines_the_container_wrote() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CONTAINER_LOG);
        std::fs::write(
            &p,
            "2026-01-01T00:00:00.000000001Z stdout F hello world\n\
             2026-01-01T00:00:00.5Z stderr P par\n\
             2026-01-01T00:00:01Z stdout F \n\
             2026-01-01T00:00:02Z stderr F tial\n\
             not a cri line\n\
             2026-01-01T00:00:03Z stdout P no end yet",
        )
        .unwrap();
        let set = LogSet::of_task(d.path(), true);
        let mut r = set.open(Streams::ALL).unwrap();
        let got = all(&mut r, false);
        let text: Vec<(Stream, String)> = got
            .iter()
            .map(|p| (p.stream, String::from_utf8_lossy(&p.bytes).into_owned()))
            .collect();
        assert_eq!(
            text,
            [
                (Stream::Stdout, "hello world\n".to_string()),
                (Stream::Stdout, "\n".to_string()),
                (Stream::Stderr, "partial\n".to_string()),
            ]
        );
        assert_eq!(got[0].time_ns, 1_767_225_600_000_000_001);
        assert_eq!(got[2].time_ns, 1_767_225_602_000_000_000);
        let last = all(&mut r, true);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].bytes, b"no end yet");
        let mut only_err = set
            .open(Streams {
                stdout: false,
                stderr: true,
            })
            .unwrap();
        assert_eq!(all(&mut only_err, true).len(), 1);
    }

    #[test]
    fn rotation_and_a_rewritten_copy_are_read_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CONTAINER_LOG);
        let line = |i: u32| format!("2026-01-01T00:00:{i:02}Z stdout F line {i}\n");
        std::fs::write(&p, line(1) + &line(2)).unwrap();
        let set = LogSet::of_task(d.path(), true);
        let mut r = set.open(Streams::ALL).unwrap();
        assert_eq!(all(&mut r, false).len(), 2);
        // Rotated while running, then more lines.
        std::fs::rename(&p, d.path().join("container.log.1")).unwrap();
        std::fs::write(&p, line(3)).unwrap();
        r.refresh().unwrap();
        assert_eq!(all(&mut r, false)[0].bytes, b"line 3\n");
        // Rewritten after the exit: the newest lines again, plus one new.
        let tmp = d.path().join("trim");
        std::fs::write(&tmp, line(2) + &line(3) + &line(4)).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        r.refresh().unwrap();
        let rest = all(&mut r, true);
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert_eq!(rest[0].bytes, b"line 4\n");
    }
}
