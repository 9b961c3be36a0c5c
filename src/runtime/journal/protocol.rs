//! What a shim says to the agent on its notify pipe (beside the journal, which says the
//! rest): its first word, then, if it could not start the task, why.

use std::io;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// The first thing a shim writes to the agent's notify pipe, before anything else it does:
/// EOF without it means no shim ever ran (the fork server died with the request queued),
/// so nothing of the task started and it may be launched again.
pub const SHIM_HELLO: &str = "shim\n";

/// The line a shim (or the shim server) that could not start the task writes to the
/// agent's notify pipe: `error: MESSAGE`, or `error errno=N: MESSAGE` when nothing of the
/// task was started and the cause is that OS error, so the agent can tell "out of
/// processes" (start it again later) from a failure that must not be retried.
pub fn start_failure_line(e: &io::Error, nothing_started: bool) -> String {
    match e.raw_os_error().filter(|_| nothing_started) {
        Some(errno) => format!("error errno={errno}: {e}\n"),
        None => format!("error: {e}\n"),
    }
}

/// Parses `start_failure_line`: the errno (when nothing started) and the message.
pub fn parse_start_failure(line: &str) -> Option<(Option<i32>, &str)> {
    if let Some(msg) = line.strip_prefix("error: ") {
        return Some((None, msg.trim_end()));
    }
    let rest = line.strip_prefix("error errno=")?;
    let (errno, msg) = rest.split_once(": ")?;
    Some((Some(errno.parse().ok()?), msg.trim_end()))
}

/// What a new shim said first on its notify pipe.
pub(crate) enum Report {
    /// EOF before its first word: no shim ever ran, so nothing of the task started.
    Silent,
    /// An error line: with an errno when nothing of the task started.
    Failed(Option<i32>, String),
    /// Anything else (`started`, or EOF after its first word): the journal tells the rest.
    Spoke,
    TimedOut,
}

/// Reads until the shim said more than its first word (`SHIM_HELLO`), or EOF, for at
/// most `limit`.
pub(crate) async fn first_report(
    pipe: &mut tokio::net::unix::pipe::Receiver,
    limit: Duration,
) -> Report {
    let hello = SHIM_HELLO.as_bytes();
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let n = match tokio::time::timeout_at(deadline, pipe.read(&mut chunk)).await {
            Err(_) => return Report::TimedOut,
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
        };
        if n == 0 {
            return if buf.is_empty() {
                Report::Silent
            } else {
                Report::Spoke
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        let rest = match buf.strip_prefix(hello) {
            Some(rest) => rest,
            None if hello.starts_with(&buf) => continue, // the first word, cut short
            None => &buf[..],
        };
        if rest.is_empty() {
            continue;
        }
        return match std::str::from_utf8(rest).ok().and_then(parse_start_failure) {
            Some((errno, msg)) => Report::Failed(errno, msg.to_string()),
            None => Report::Spoke,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_failure_lines_carry_the_errno_only_when_nothing_started() {
        let eagain = io::Error::from_raw_os_error(11);
        let line = start_failure_line(&eagain, true);
        assert_eq!(
            parse_start_failure(&line),
            Some((Some(11), eagain.to_string().as_str()))
        );
        let line = start_failure_line(&eagain, false);
        assert_eq!(parse_start_failure(&line).unwrap().0, None);
        let other = io::Error::other("no launch record");
        assert_eq!(
            parse_start_failure(&start_failure_line(&other, true)),
            Some((None, "no launch record"))
        );
        assert_eq!(parse_start_failure("started\n"), None);
    }
}
