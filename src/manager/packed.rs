//! A task's cached answer, with the values it says twice kept once.
//!
//! The wire shape repeats itself: upstream's `process` and `processStatus` are copies of
//! `spec.process` and `status.state`. A finished task's answer is cached for the task's
//! whole life, so each repeated value is kept as a reference to its first copy: about 150
//! of a `true` task's 420 bytes. What is sent is the rendered answer, byte for byte.
//!
//! Which ranges are tried is a guess from the shape (the last `processStatus` and
//! `process` members); a range is replaced only when the same bytes occur earlier, so a
//! wrong guess costs a search, never a byte of the answer.

use std::ops::Range;

use memchr::memmem;

const PROCESS_STATUS: &[u8] = b",\"processStatus\":";
const PROCESS: &[u8] = b",\"process\":";
const POD_TEMPLATE: &[u8] = b",\"podTemplateSpec\":";
/// Shorter repeats are kept as they are: a reference costs 6 bytes.
const MIN_REPEAT: usize = 16;
/// A reference: where its copy goes in the literal, where it is read from, how long.
const REF: usize = 6;

/// `[n][n references: at, from, len as u16 LE][literal]`: the answer with `n` (0 to 2)
/// ranges cut out, each to be filled, when written, from an earlier part of the literal.
pub(super) struct Packed(Box<[u8]>);

impl Packed {
    pub(super) fn of(answer: &[u8]) -> Packed {
        let cuts = if u16::try_from(answer.len()).is_ok() {
            repeats(answer)
        } else {
            // Offsets are 16-bit; answers this large (a huge spec) are kept whole.
            Vec::new()
        };
        let cut: usize = cuts.iter().map(|(r, _)| r.len()).sum();
        let mut out = Vec::with_capacity(1 + cuts.len() * REF + answer.len() - cut);
        out.push(cuts.len() as u8);
        let mut removed = 0;
        for (range, from) in &cuts {
            for v in [range.start - removed, *from, range.len()] {
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
            removed += range.len();
        }
        let mut at = 0;
        for (range, _) in &cuts {
            out.extend_from_slice(&answer[at..range.start]);
            at = range.end;
        }
        out.extend_from_slice(&answer[at..]);
        let packed = Packed(out.into_boxed_slice());
        debug_assert_eq!(packed.to_vec(), answer);
        packed
    }

    /// The answer's length.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.literal().len() + self.refs().map(|(_, _, len)| len).sum::<usize>()
    }

    /// Appends the answer to `out`.
    pub(super) fn write_to(&self, out: &mut impl bytes::BufMut) {
        let literal = self.literal();
        let mut at = 0;
        for (to, from, len) in self.refs() {
            out.put_slice(&literal[at..to]);
            out.put_slice(&literal[from..from + len]);
            at = to;
        }
        out.put_slice(&literal[at..]);
    }

    pub(super) fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 2);
        self.write_to(&mut out);
        out
    }

    fn refs(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let n = usize::from(self.0[0]);
        self.0[1..1 + n * REF].chunks_exact(REF).map(|r| {
            let v = |i: usize| usize::from(u16::from_le_bytes([r[i], r[i + 1]]));
            (v(0), v(2), v(4))
        })
    }

    fn literal(&self) -> &[u8] {
        &self.0[1 + usize::from(self.0[0]) * REF..]
    }
}

/// The ranges of `answer` to cut, in order, each with the start of an earlier copy. Every
/// copy lies before the first cut, where the literal and the answer are the same bytes.
fn repeats(answer: &[u8]) -> Vec<(Range<usize>, usize)> {
    let mut candidates = Vec::with_capacity(2);
    // `processStatus` is the last member: its value runs to the closing brace.
    let Some(status) = memmem::rfind(answer, PROCESS_STATUS) else {
        return Vec::new();
    };
    let process_end = memmem::rfind(&answer[..status], POD_TEMPLATE).unwrap_or(status);
    if let Some(process) = memmem::rfind(&answer[..process_end], PROCESS) {
        candidates.push(process + PROCESS.len()..process_end);
    }
    if answer.last() == Some(&b'}') {
        candidates.push(status + PROCESS_STATUS.len()..answer.len() - 1);
    }
    let mut cuts = Vec::with_capacity(candidates.len());
    let mut before = usize::MAX;
    for range in candidates {
        if range.len() < MIN_REPEAT {
            continue;
        }
        let limit = before.min(range.start);
        if let Some(from) = memmem::find(&answer[..limit], &answer[range.clone()]) {
            before = limit;
            cuts.push((range, from));
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(answer: &[u8]) -> Packed {
        let p = Packed::of(answer);
        assert_eq!(p.to_vec(), answer, "{}", String::from_utf8_lossy(answer));
        assert_eq!(p.len(), answer.len());
        p
    }

    #[test]
    fn a_finished_tasks_answer_keeps_its_repeated_values_once_and_reads_back_the_same() {
        let answer = br#"{"name":"held-0","spec":{"process":{"command":["/bin/true"]}},"status":{"state":{"terminated":{"exitCode":0,"reason":"Succeeded","startedAt":"2026-12-06T23:18:14Z","finishedAt":"2026-12-06T23:18:14Z"}},"usage":{"cpuSeconds":0.001,"memoryPeakBytes":524288}},"process":{"command":["/bin/true"]},"processStatus":{"terminated":{"exitCode":0,"reason":"Succeeded","startedAt":"2026-12-06T23:18:14Z","finishedAt":"2026-12-06T23:18:14Z"}}}"#;
        let p = round_trip(answer);
        let process = br#"{"command":["/bin/true"]}"#.len();
        let state = answer.len() - memmem::rfind(answer, PROCESS_STATUS).unwrap() - 18;
        assert_eq!(p.0.len(), answer.len() - process - state + 1 + 2 * REF);
        let mut out = bytes::BytesMut::new();
        p.write_to(&mut out);
        assert_eq!(&out[..], answer);
    }

    #[test]
    fn answers_without_repeats_or_with_look_alikes_are_kept_as_they_are() {
        for answer in [
            &br#"{}"#[..],
            br#""#,
            br#"{"name":"a","spec":{"container":{"image":"busybox"}},"status":{"state":{"waiting":{}}},"processStatus":{"waiting":{}}}"#,
            // Member names inside values (a client's pod template, an env value).
            br#"{"name":"a","spec":{"podTemplateSpec":{"x":{"y":1,"process":{"command":["/bin/false"]}}}},"status":{"state":{"running":{"startedAt":"2026-12-06T23:18:14Z"}}},"podTemplateSpec":{"x":{"y":1,"process":{"command":["/bin/false"]}}},"processStatus":{"running":{"startedAt":"2026-12-06T23:18:14Z"}}}"#,
            br#"{"name":"a","spec":{"process":{"command":["/bin/sh"],"env":[{"name":"E","value":",\"processStatus\":{\"x\":1}"}]}},"status":{"state":{"running":{"startedAt":"2026-12-06T23:18:14Z"}}},"process":{"command":["/bin/sh"],"env":[{"name":"E","value":",\"processStatus\":{\"x\":1}"}]},"processStatus":{"running":{"startedAt":"2026-12-06T23:18:14Z"}}}"#,
            br#","processStatus":,"process":"#,
            br#","process":,"processStatus":}"#,
            br#"{"process":{"command":["/bin/true","x","y"]},"processStatus":{"command":["/bin/true","x","y"]}}"#,
        ] {
            round_trip(answer);
        }
    }

    #[test]
    fn a_huge_answer_is_kept_whole() {
        let big = "x".repeat(70_000);
        let answer = format!(
            r#"{{"spec":{{"process":{{"command":["{big}"]}}}},"process":{{"command":["{big}"]}},"processStatus":{{}}}}"#
        );
        let p = round_trip(answer.as_bytes());
        assert_eq!(p.0[0], 0);
    }

    #[test]
    fn every_cut_of_a_repetitive_answer_reads_back_the_same() {
        // Repeats everywhere: each candidate is found at many places, overlapping the
        // other candidate's range; whatever is chosen must read back the same.
        let v = r#"{"a":{"a":{"a":1}}}"#;
        for n in 0..6 {
            let pre = v.repeat(n);
            let answer = format!(
                r#"{{"spec":{pre},"status":{v}{v},"process":{v}{pre}{v},"processStatus":{v}{v}{pre}}}"#
            );
            round_trip(answer.as_bytes());
        }
    }
}
