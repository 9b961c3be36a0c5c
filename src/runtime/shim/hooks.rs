//! A lifecycle hook as the shim runs it: its process, its log (one file for
//! its stdout and stderr, `prestart.log` / `poststop.log`, with an output index of its
//! own) and the tail of its output kept for the task's status.

use std::path::Path;

use super::logs::{self, CappedLog};
use crate::runtime::journal::HookExit;
use crate::sys::procfs::ProcIdentity;
use crate::task::layout::TaskDir;
use crate::task::model::HookName;
use crate::task::time::Time;

/// How much of a hook's output its status keeps (the end of it).
pub const TAIL_BYTES: usize = 4096;

/// A hook that was started (or failed to start): what the driver holds of it (its
/// timers and stop are the machine's, `supervisor::machine`).
pub struct HookJob {
    pub name: HookName,
    pub job: usize,
    /// `None` when it could not be started.
    pub process: Option<ProcIdentity>,
    pub started: Time,
    /// The trees under the shim when it started (the main command's daemons): not its.
    pub before: Vec<(i32, u64)>,
}

impl HookJob {
    pub fn new(name: HookName, job: usize) -> Self {
        HookJob {
            name,
            job,
            process: None,
            started: Time::now(),
            before: Vec::new(),
        }
    }

    /// The line recording how the hook ended.
    pub fn exit_record(
        &self,
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        start_error: Option<String>,
        output: String,
    ) -> HookExit {
        HookExit {
            hook: self.name,
            exit_code: code,
            signal,
            started_at: self.process.map(|_| self.started),
            finished_at: Time::now(),
            timed_out,
            start_error,
            output,
            unrecorded: None,
        }
    }
}

/// A hook's log: capped like the task's, with its own output index.
pub fn log(dir: &Path, name: HookName, cap: u64) -> CappedLog {
    let index = logs::index_at(TaskDir(dir).hook_index(name), cap);
    CappedLog::new(TaskDir(dir).hook_log(name), cap, 0, &index)
}

/// The last `TAIL_BYTES` of a hook's output.
#[derive(Default)]
pub struct Tail(Vec<u8>);

impl Tail {
    pub fn push(&mut self, bytes: &[u8]) {
        let keep = bytes.len().min(TAIL_BYTES);
        self.0.extend_from_slice(&bytes[bytes.len() - keep..]);
        if self.0.len() > TAIL_BYTES {
            let cut = self.0.len() - TAIL_BYTES;
            self.0.drain(..cut);
        }
    }

    /// As text: a character cut at the start is dropped, other invalid bytes replaced,
    /// so the result is valid UTF-8 of at most `TAIL_BYTES` (plus replacements).
    pub fn text(&self) -> String {
        let mut b = &self.0[..];
        // Skip continuation bytes of a character whose start was cut off.
        let mut skipped = 0;
        while skipped < 3 && b.first().is_some_and(|c| c & 0xC0 == 0x80) {
            b = &b[1..];
            skipped += 1;
        }
        String::from_utf8_lossy(b).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_as_valid_utf8() {
        let mut t = Tail::default();
        t.push("é".repeat(3000).as_bytes()); // 6000 bytes, two per character
        t.push(b"x");
        let s = t.text();
        assert!(s.len() <= TAIL_BYTES, "{}", s.len());
        assert!(s.ends_with("éx"));
        assert!(
            !s.contains('\u{fffd}'),
            "a cut character is dropped, not replaced"
        );
        let mut big = Tail::default();
        big.push(&vec![b'a'; 10_000]);
        assert_eq!(big.text().len(), TAIL_BYTES);
    }
}
