//! A task's cached answer, kept small: what it says twice is kept once, and the runs of
//! its shape that every answer spells the same way are kept as a number each.
//!
//! A finished task's answer is cached for the task's whole life, and its bytes were most
//! of what the task cost: a `true` task's 435-byte answer was kept in 300 bytes of heap
//! after its repeats were cut, most of them member names every answer spells the same
//! way. Now in about 100.
//!
//! - Repeats: upstream's `processStatus` and `process` are copies of `status.state` and
//!   `spec.process`, so each (when long enough to be worth it) is kept as a reference to
//!   its first copy. Which ranges are tried is a guess from the shape (the last
//!   `processStatus` and `process` members); a range is replaced only when the same bytes
//!   occur earlier, so a wrong guess costs a search, never a byte of the answer.
//! - Phrases: runs of the API's JSON shape (`"]}},"status":{"state":`) are kept as their
//!   number in `PHRASES`, never across the edge of a copy or of what it copies (each
//!   stretch between such edges is cut into items on its own). The literal is a list of items,
//!   each the bytes before a phrase (with their length) and the phrase's number, so it is
//!   written without a search: a listing of 10,000 answers spends about 0.7 ms more
//!   spelling them out than copying them whole. A shape the list doesn't know costs room,
//!   never a byte.
//!
//! What is sent is the rendered answer, byte for byte; a debug build checks each packed
//! answer against its rendering (so every test that reads an answer checks this).

use std::ops::Range;
use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, MatchKind};
use memchr::memmem;

const PROCESS_STATUS: &[u8] = b",\"processStatus\":";
const PROCESS: &[u8] = b",\"process\":";
const POD_TEMPLATE: &[u8] = b",\"podTemplateSpec\":";
/// Shorter repeats are kept as they are: a reference costs 6 bytes, and the phrases that
/// would span its edges are split in two.
const MIN_REPEAT: usize = 48;
/// A reference: where its copy goes in the literal, where it is read from, how long.
const REF: usize = 6;
/// An item whose bytes no phrase follows (the end of a stretch, or a run of more than 255
/// bytes).
const NO_PHRASE: u8 = u8::MAX;

/// Runs of the API's answer shape (`api::wire::TaskResponse`), found leftmost and
/// longest first: long ones for the common shapes, and the short ones they are made of
/// for where an edge of a repeat splits them.
const PHRASES: &[&[u8]] = &[
    b"{\"name\":\"",
    b"\",\"deletionTimestamp\":\"",
    b"\",\"spec\":{\"process\":{\"command\":[\"",
    b"\",\"spec\":{\"process\":",
    b"\",\"spec\":{\"container\":{\"image\":\"",
    b"\",\"spec\":{\"podTemplateSpec\":",
    b"\",\"spec\":{",
    b"{\"command\":[\"",
    b"\",\"",
    b"\"]}},\"status\":{\"state\":{\"terminated\":{\"exitCode\":",
    b"\"]}},\"status\":{\"state\":{\"running\":{\"startedAt\":\"",
    b"\"]}},\"status\":{\"state\":{\"waiting\":{\"reason\":\"",
    b"\"]}},\"status\":{\"state\":",
    b"\"]}",
    b"\"],\"args\":[\"",
    b",\"env\":[{\"name\":\"",
    b"\",\"value\":\"",
    b"\"},{\"name\":\"",
    b"\"}]}},\"status\":{\"state\":",
    b"\"}]",
    b",\"workingDir\":\"",
    b",\"timeoutSeconds\":",
    b"},\"status\":{\"state\":",
    b"{\"terminated\":{\"exitCode\":",
    b",\"signal\":",
    b",\"reason\":\"Succeeded\",\"startedAt\":\"",
    b",\"reason\":\"Failed\"",
    b",\"reason\":\"",
    b",\"message\":\"",
    b"\",\"startedAt\":\"",
    b",\"startedAt\":\"",
    b",\"startedAt\":null",
    b"\",\"finishedAt\":\"",
    b"\"}},\"usage\":{\"cpuSeconds\":",
    b"\"}}",
    b",\"usage\":{\"cpuSeconds\":",
    b",\"memoryPeakBytes\":",
    b",\"oomKills\":",
    b"}},\"process\":{\"command\":[\"",
    b",\"process\":{\"command\":[\"",
    b",\"process\":",
    b"\"]},\"processStatus\":{\"terminated\":{\"exitCode\":",
    b"\"]},\"processStatus\":{\"running\":{\"startedAt\":\"",
    b"\"]},\"processStatus\":",
    b",\"processStatus\":",
    b",\"podTemplateSpec\":",
    b"{\"running\":{\"startedAt\":\"",
    b"{\"waiting\":{\"reason\":\"",
    b"{\"waiting\":{}}",
    b",\"hooks\":{\"preStart\":",
    b",\"postStop\":",
    b"\"}}}",
];

static FINDER: LazyLock<AhoCorasick> = LazyLock::new(|| {
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(PHRASES)
        .expect("the phrases are a valid set of literals")
});

/// `[n][n references: at, from, len as u16 LE][literal]`: the answer as items (`[len]
/// [len bytes][phrase or NO_PHRASE]`) with `n` (0 to 2) ranges cut out, each to be filled,
/// when written, from an earlier part of the literal.
pub(super) struct Packed(Box<[u8]>);

impl Packed {
    pub(super) fn of(answer: &[u8]) -> Packed {
        let cuts = if u16::try_from(answer.len()).is_ok() {
            repeats(answer)
        } else {
            // Offsets are 16-bit; answers this large (a huge spec) are kept whole.
            Vec::new()
        };
        // The answer without its cuts, and the references that fill them: (where the
        // copy goes, where it is read from, how long), all in the literal. Each copy
        // lies before the first cut, where the literal and the answer are the same.
        let mut literal = Vec::with_capacity(answer.len());
        let mut refs = Vec::with_capacity(cuts.len());
        let mut at = 0;
        for (range, from) in &cuts {
            literal.extend_from_slice(&answer[at..range.start]);
            refs.push((literal.len(), *from, range.len()));
            at = range.end;
        }
        literal.extend_from_slice(&answer[at..]);

        let (text, refs) = into_items(&literal, &refs);
        let mut out = Vec::with_capacity(1 + refs.len() * REF + text.len());
        out.push(refs.len() as u8);
        for (at, from, len) in refs {
            for v in [at, from, len] {
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
        }
        out.extend_from_slice(&text);
        let packed = Packed(out.into_boxed_slice());
        debug_assert_eq!(packed.to_vec(), answer);
        packed
    }

    /// The answer's length.
    pub(super) fn len(&self) -> usize {
        self.pieces()
            .flat_map(items)
            .map(|(bytes, phrase)| bytes.len() + phrase.len())
            .sum()
    }

    /// Appends the answer to `out`.
    pub(super) fn write_to(&self, out: &mut impl bytes::BufMut) {
        for piece in self.pieces() {
            for (bytes, phrase) in items(piece) {
                out.put_slice(bytes);
                out.put_slice(phrase);
            }
        }
    }

    pub(super) fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        self.write_to(&mut out);
        out
    }

    /// The literal's runs and the copies between them, in the answer's order.
    fn pieces(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let literal = self.literal();
        // At most two references (`repeats` has two candidates): five pieces.
        let mut pieces: [&[u8]; 5] = [&[]; 5];
        let (mut n, mut at) = (0, 0);
        for (to, from, len) in self.refs() {
            pieces[n] = &literal[at..to];
            pieces[n + 1] = &literal[from..from + len];
            (n, at) = (n + 2, to);
        }
        pieces[n] = &literal[at..];
        pieces.into_iter().take(n + 1)
    }

    fn refs(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.0[1..1 + self.n_refs() * REF]
            .chunks_exact(REF)
            .map(|r| {
                let v = |i: usize| usize::from(u16::from_le_bytes([r[i], r[i + 1]]));
                (v(0), v(2), v(4))
            })
    }

    fn n_refs(&self) -> usize {
        usize::from(self.0[0])
    }

    fn literal(&self) -> &[u8] {
        &self.0[1 + self.n_refs() * REF..]
    }
}

/// The literal as items, and the references moved to match. The stretches between the
/// references' edges are made items one by one, so each edge falls between items and each
/// copy reads the same items as the range it fills.
fn into_items(
    literal: &[u8],
    refs: &[(usize, usize, usize)],
) -> (Vec<u8>, Vec<(usize, usize, usize)>) {
    let mut edges: Vec<usize> = refs
        .iter()
        .flat_map(|&(at, from, len)| [at, from, from + len])
        .chain([literal.len()])
        .collect();
    edges.sort_unstable();
    edges.dedup();
    let mut out = Vec::with_capacity(literal.len());
    let mut moved = Vec::with_capacity(edges.len());
    let mut start = 0;
    for &edge in &edges {
        let stretch = &literal[start..edge];
        let mut at = 0;
        for m in FINDER.find_iter(stretch) {
            // At most 255 phrases (checked by a test).
            push_item(
                &mut out,
                &stretch[at..m.start()],
                m.pattern().as_usize() as u8,
            );
            at = m.end();
        }
        if at < stretch.len() {
            push_item(&mut out, &stretch[at..], NO_PHRASE);
        }
        moved.push(out.len());
        start = edge;
    }
    // Every reference's positions are edges.
    let to = |p: usize| moved[edges.binary_search(&p).expect("an edge")];
    let refs = refs
        .iter()
        .map(|&(at, from, len)| (to(at), to(from), to(from + len) - to(from)))
        .collect();
    (out, refs)
}

/// Appends `bytes` and the phrase after them as items: one, or more if `bytes` is longer
/// than an item's length byte can say.
fn push_item(out: &mut Vec<u8>, bytes: &[u8], phrase: u8) {
    let mut runs = bytes.chunks(usize::from(u8::MAX)).peekable();
    if runs.peek().is_none() {
        out.extend_from_slice(&[0, phrase]);
    }
    while let Some(run) = runs.next() {
        out.push(run.len() as u8);
        out.extend_from_slice(run);
        out.push(if runs.peek().is_some() {
            NO_PHRASE
        } else {
            phrase
        });
    }
}

/// The items of a piece of the literal: the bytes of each and the phrase after them.
/// Packed bytes are only made by `Packed::of`, so each item is whole and each phrase
/// number names one.
fn items(mut piece: &[u8]) -> impl Iterator<Item = (&[u8], &'static [u8])> {
    std::iter::from_fn(move || {
        let (&len, rest) = piece.split_first()?;
        let (bytes, rest) = rest.split_at(usize::from(len));
        let (&phrase, rest) = rest.split_first()?;
        piece = rest;
        let phrase = match phrase {
            NO_PHRASE => &[][..],
            k => PHRASES[usize::from(k)],
        };
        Some((bytes, phrase))
    })
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

    /// A `true` task's answer as the agent renders it.
    const FINISHED: &[u8] = br#"{"name":"held-0","spec":{"process":{"command":["/bin/true"]}},"status":{"state":{"terminated":{"exitCode":0,"reason":"Succeeded","startedAt":"2026-12-06T23:18:14Z","finishedAt":"2026-12-06T23:18:14Z"}},"usage":{"cpuSeconds":0.001123,"memoryPeakBytes":524288}},"process":{"command":["/bin/true"]},"processStatus":{"terminated":{"exitCode":0,"reason":"Succeeded","startedAt":"2026-12-06T23:18:14Z","finishedAt":"2026-12-06T23:18:14Z"}}}"#;

    #[test]
    fn a_finished_tasks_answer_is_kept_in_a_quarter_of_its_bytes_and_reads_back_the_same() {
        let p = round_trip(FINISHED);
        assert_eq!(p.n_refs(), 1, "processStatus is a copy of status.state");
        // What is left: the name, the command twice, the exit code, two times, the
        // usage, and two bytes for each phrase between them.
        assert!(
            p.0.len() <= 120,
            "{} of {} bytes kept",
            p.0.len(),
            FINISHED.len()
        );
        let mut out = bytes::BytesMut::new();
        p.write_to(&mut out);
        assert_eq!(&out[..], FINISHED);
    }

    #[test]
    fn answers_of_every_shape_read_back_the_same_and_shrink() {
        for answer in [
            &br#"{"name":"w","spec":{"process":{"command":["sleep","100"],"args":["x","y"],"env":[{"name":"A","value":"1"},{"name":"B"}],"workingDir":"/tmp","timeoutSeconds":30}},"status":{"state":{"waiting":{"reason":"Initialized"}}},"process":{"command":["sleep","100"],"args":["x","y"],"env":[{"name":"A","value":"1"},{"name":"B"}],"workingDir":"/tmp","timeoutSeconds":30},"processStatus":{"waiting":{"reason":"Initialized"}}}"#[..],
            br#"{"name":"r","deletionTimestamp":"2026-12-06T23:18:15Z","spec":{"process":{"command":["sleep","100"]}},"status":{"state":{"running":{"startedAt":"2026-12-06T23:18:14Z"}},"hooks":{"preStart":{"terminated":{"exitCode":0,"reason":"Succeeded","startedAt":"2026-12-06T23:18:13Z","finishedAt":"2026-12-06T23:18:14Z"}}}},"process":{"command":["sleep","100"]},"processStatus":{"running":{"startedAt":"2026-12-06T23:18:14Z"}}}"#,
            br#"{"name":"f","spec":{"process":{"command":["/bin/false"]}},"status":{"state":{"terminated":{"exitCode":137,"signal":9,"reason":"Failed","message":"terminated by signal SIGKILL","startedAt":"2026-12-06T23:18:14Z","finishedAt":"2026-12-06T23:18:14Z"}},"usage":{"cpuSeconds":0.5,"memoryPeakBytes":1,"oomKills":1}},"process":{"command":["/bin/false"]},"processStatus":{"terminated":{"exitCode":137,"signal":9,"reason":"Failed","message":"terminated by signal SIGKILL","startedAt":"2026-12-06T23:18:14Z","finishedAt":"2026-12-06T23:18:14Z"}}}"#,
            br#"{"name":"n","spec":{"process":{"command":["/nope"]}},"status":{"state":{"terminated":{"exitCode":127,"reason":"ProcessStartFailed","message":"no such file","startedAt":null,"finishedAt":"2026-12-06T23:18:14Z"}}},"process":{"command":["/nope"]},"processStatus":{"terminated":{"exitCode":127,"reason":"ProcessStartFailed","message":"no such file","startedAt":null,"finishedAt":"2026-12-06T23:18:14Z"}}}"#,
            br#"{"name":"c","spec":{"container":{"image":"busybox","command":["true"]}},"status":{"state":{"waiting":{}}},"processStatus":{"waiting":{}}}"#,
            br#"{"name":"t","spec":{"podTemplateSpec":{"spec":{"containers":[{"name":"main","image":"busybox"}]}}},"status":{"state":{"running":{"startedAt":"2026-12-06T23:18:14Z"}}},"podTemplateSpec":{"spec":{"containers":[{"name":"main","image":"busybox"}]}},"processStatus":{"running":{"startedAt":"2026-12-06T23:18:14Z"}}}"#,
        ] {
            let p = round_trip(answer);
            assert!(
                p.0.len() < answer.len() * 3 / 4,
                "{} of {} bytes kept: {}",
                p.0.len(),
                answer.len(),
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn any_bytes_and_long_runs_without_a_phrase_read_back_the_same() {
        let every_byte: Vec<u8> = (0..=u8::MAX).collect();
        let mut with_bytes = FINISHED.to_vec();
        with_bytes.splice(12..12, every_byte.iter().copied());
        let p = round_trip(&with_bytes);
        assert_eq!(p.n_refs(), 1, "the repeat is still cut");
        for n in [0, 1, 254, 255, 256, 510, 511, 600] {
            let run = "x".repeat(n);
            round_trip(run.as_bytes());
            round_trip(format!(r#"{run}{{"name":"{run}"{run}"#).as_bytes());
            round_trip(&[run.as_bytes(), &every_byte, PHRASES[0], &every_byte].concat());
        }
    }

    #[test]
    fn every_phrase_has_a_number_and_is_worth_one() {
        assert!(PHRASES.len() <= usize::from(NO_PHRASE));
        for p in PHRASES {
            assert!(p.len() > 1, "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn mixtures_of_phrases_and_bytes_read_back_the_same() {
        // Phrases cut short and run together, bytes an item's length or phrase number can
        // take, in many orders: whatever is cut into items and copies reads back the same.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let pieces: Vec<&[u8]> = PHRASES
            .iter()
            .copied()
            .chain([
                &b"}"[..],
                b"{",
                b"\"",
                "\u{e9}\u{2603}".as_bytes(),
                &[0, 1, 0xfe, 0xff],
                b"processStatus",
            ])
            .collect();
        for _ in 0..2000 {
            let mut value = Vec::new();
            for _ in 0..next(12) {
                let p = pieces[next(pieces.len())];
                value.extend_from_slice(&p[..p.len() - next(2).min(p.len())]);
            }
            let v = String::from_utf8_lossy(&value);
            let answer = format!(
                r#"{{"name":"x","spec":{{"process":{v}}},"status":{{"state":{v}}},"process":{v},"processStatus":{v}}}"#
            );
            round_trip(answer.as_bytes());
            round_trip(&value);
        }
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
        assert_eq!(p.n_refs(), 0);
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
