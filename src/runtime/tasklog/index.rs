//! The output index: when each chunk of a task's output arrived, and on which stream.
//!
//! The shim appends one 32-byte record per chunk it copies to a log (the stream, the
//! log file's generation, the chunk's end offset in that file, the wall-clock time), so a
//! reader can interleave stdout and stderr in arrival order and give each line a time,
//! while `stdout.log` / `stderr.log` stay byte-identical to what the task wrote.
//!
//! The file is a ring: slot 0 is a header naming the slot count, record `seq` goes to slot
//! `1 + seq % slots`, so the index never grows past `(slots + 1) * 32` bytes, however much
//! the task writes; the oldest records are overwritten (their output is read without
//! times then, see `plain`). Each record carries a checksum, so a torn or stale slot is
//! recognised. A task that writes nothing has no index at all.
//!
//! Rotation of a log happens under an exclusive `flock` of the index, together with a
//! record of the new generation; readers take a shared lock while they map generations to
//! files, so they never pair a file with the wrong generation.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

const SLOT: u64 = 32;
const MAGIC: u64 = 0x3178_6469_6c65_7474; // "ttelidx1"
const END_BITS: u32 = 40;
const GEN_BITS: u32 = 20;
const END_MASK: u64 = (1 << END_BITS) - 1;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;

/// One chunk of output: `end` is the offset in generation `generation` of `stream`'s log just
/// after the chunk. A record with `end == 0` marks a new generation (a rotation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub time_ns: i64,
    pub stream: u8,
    pub generation: u32,
    pub end: u64,
}

fn check(a: u64, b: u64, c: u64) -> u64 {
    (a ^ MAGIC)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(17)
        ^ b.wrapping_mul(0xc2b2_ae3d_27d4_eb4f).rotate_left(31)
        ^ c.wrapping_mul(0x1656_67b1_9e37_79f9)
}

impl Record {
    fn encode(&self) -> [u8; SLOT as usize] {
        let pos = (u64::from(self.stream) << (END_BITS + GEN_BITS))
            | ((u64::from(self.generation) & GEN_MASK) << END_BITS)
            | (self.end & END_MASK);
        let time = self.time_ns as u64;
        let mut out = [0u8; SLOT as usize];
        for (i, v) in [self.seq, time, pos, check(self.seq, time, pos)]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Record> {
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (seq, time, pos, sum) = (w(0), w(1), w(2), w(3));
        (seq != 0 && sum == check(seq, time, pos)).then_some(Record {
            seq,
            time_ns: time as i64,
            stream: (pos >> (END_BITS + GEN_BITS)) as u8,
            generation: ((pos >> END_BITS) & GEN_MASK) as u32,
            end: pos & END_MASK,
        })
    }
}

/// Ring size for a log budget: about one record per 256 bytes of kept output, within
/// 256..=65536 slots (8 KiB to 2 MiB on disk).
pub fn slots_for(max_log_bytes: u64) -> u64 {
    (max_log_bytes / 256).clamp(256, 65536)
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The shim's side. Opens (creates) the index on first use only.
pub struct IndexWriter {
    path: PathBuf,
    slots: u64,
    file: Option<File>,
    /// The index could not be created or opened: output is logged without it.
    broken: bool,
    next_seq: u64,
    /// The newest generation recorded per stream (a shim re-opening an existing index).
    gens: Vec<(u8, u32)>,
}

impl IndexWriter {
    pub fn new(path: PathBuf, max_log_bytes: u64) -> Self {
        IndexWriter {
            path,
            slots: slots_for(max_log_bytes),
            file: None,
            broken: false,
            next_seq: 1,
            gens: Vec::new(),
        }
    }

    fn file(&mut self) -> Option<&File> {
        if self.file.is_none() && !self.broken {
            match self.open() {
                Ok(f) => self.file = Some(f),
                Err(_) => self.broken = true,
            }
        }
        self.file.as_ref()
    }

    fn open(&mut self) -> io::Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640) // as the logs it indexes
            .open(&self.path)?;
        match read_all(&f)? {
            Some((slots, records)) => {
                // Written before (by this task's earlier shim): continue its sequence.
                self.slots = slots;
                if let Some(last) = records.last() {
                    self.next_seq = last.seq + 1;
                }
                for r in &records {
                    self.gens.retain(|(s, _)| *s != r.stream);
                    self.gens.push((r.stream, r.generation));
                }
            }
            None => {
                let mut header = [0u8; SLOT as usize];
                header[..8].copy_from_slice(&MAGIC.to_le_bytes());
                header[8..16].copy_from_slice(&self.slots.to_le_bytes());
                f.write_all_at(&header, 0)?;
            }
        }
        Ok(f)
    }

    /// The generation of `stream`'s current log file, as recorded.
    pub fn generation(&mut self, stream: u8) -> u32 {
        let _ = self.file();
        self.gens
            .iter()
            .find(|(s, _)| *s == stream)
            .map_or(0, |(_, g)| *g)
    }

    /// Records that `stream`'s log file `generation` now ends at `end`. Best effort: the output
    /// itself is already in the log.
    pub fn append(&mut self, stream: u8, generation: u32, end: u64) {
        let (seq, slots) = (self.next_seq, self.slots);
        let Some(f) = self.file() else { return };
        let rec = Record {
            seq,
            time_ns: now_ns(),
            stream,
            generation,
            end,
        };
        if f.write_all_at(&rec.encode(), SLOT * (1 + seq % slots))
            .is_ok()
        {
            self.next_seq += 1;
        }
    }

    /// An exclusive lock on the index for a rotation (see the module doc); `None` when
    /// there is no index.
    pub fn lock(&mut self) -> Option<Flock<File>> {
        let dup = self.file()?.try_clone().ok()?;
        Flock::lock(dup, FlockArg::LockExclusive).ok()
    }
}

/// The slot count and every valid record, oldest first; `None` for an empty file.
pub fn read_all(f: &File) -> io::Result<Option<(u64, Vec<Record>)>> {
    let len = f.metadata()?.len();
    if len < SLOT {
        return Ok(None);
    }
    let mut buf = vec![0u8; len.min(SLOT * (65536 + 1)) as usize];
    let n = super::read_full_at(f, &mut buf, 0)?;
    buf.truncate(n - n % SLOT as usize);
    let header = &buf[..SLOT as usize];
    if u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a task-executor output index",
        ));
    }
    let slots = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes")).max(1);
    let mut records: Vec<Record> = buf[SLOT as usize..]
        .chunks_exact(SLOT as usize)
        .filter_map(Record::decode)
        .collect();
    records.sort_unstable_by_key(|r| r.seq);
    Ok(Some((slots, records)))
}

/// The records after `after`, in order, read from where they must be. `None` when some
/// were overwritten before they could be read (the caller reads everything again).
pub fn read_after(f: &File, slots: u64, after: u64) -> io::Result<Option<Vec<Record>>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; (SLOT * 128) as usize];
    let mut want = after + 1;
    loop {
        let slot = want % slots;
        // Read a run of slots up to the ring's end.
        let run = (slots - slot).min(128);
        let n = super::read_full_at(f, &mut buf[..(run * SLOT) as usize], SLOT * (1 + slot))?;
        let mut got = 0;
        for chunk in buf[..n - n % SLOT as usize].chunks_exact(SLOT as usize) {
            match Record::decode(chunk) {
                Some(r) if r.seq == want => {
                    out.push(r);
                    want += 1;
                    got += 1;
                }
                Some(r) if r.seq > want => return Ok(None),
                _ => return Ok(Some(out)),
            }
        }
        if got < run || out.len() as u64 >= slots {
            return Ok(Some(out));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_torn_ones_are_ignored() {
        let r = Record {
            seq: 7,
            time_ns: 1_781_515_812_345_678_901,
            stream: 1,
            generation: 3,
            end: 123_456,
        };
        let mut b = r.encode();
        assert_eq!(Record::decode(&b), Some(r));
        b[20] ^= 1;
        assert_eq!(Record::decode(&b), None);
        assert_eq!(Record::decode(&[0u8; 32]), None);
    }

    #[test]
    fn the_ring_keeps_the_newest_records_and_readers_catch_up() {
        let d = tempfile::tempdir().unwrap();
        let p = crate::task::layout::TaskDir(d.path()).output_index();
        let mut w = IndexWriter::new(p.clone(), 0); // 256 slots
        assert!(!p.exists(), "nothing is created before the first record");
        for i in 1..=100u64 {
            w.append((i % 2) as u8, 0, i * 10);
        }
        let f = File::open(&p).unwrap();
        let (slots, all) = read_all(&f).unwrap().unwrap();
        assert_eq!((slots, all.len()), (256, 100));
        assert_eq!(read_after(&f, slots, 90).unwrap().unwrap().len(), 10);
        for i in 101..=600u64 {
            w.append(0, 1, i);
        }
        let (_, all) = read_all(&f).unwrap().unwrap();
        assert_eq!(all.len(), 256);
        assert_eq!(all.first().unwrap().seq, 600 - 255);
        assert_eq!(all.last().unwrap().seq, 600);
        assert!(
            read_after(&f, slots, 90).unwrap().is_none(),
            "a reader that fell behind is told so"
        );
        let tail = read_after(&f, slots, 590).unwrap().unwrap();
        assert_eq!(
            tail.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (591..=600).collect::<Vec<_>>()
        );
        assert!(read_after(&f, slots, 600).unwrap().unwrap().is_empty());
        // A later writer on the same index continues its sequence and generations.
        let mut w2 = IndexWriter::new(p, 0);
        assert_eq!(w2.generation(0), 1);
        w2.append(0, 1, 601);
        assert_eq!(read_after(&f, slots, 600).unwrap().unwrap()[0].seq, 601);
    }
}
