//! The query parameters of `GET /tasks/{name}/logs`, named and typed as kubelet's
//! `PodLogOptions` (which `kubectl logs` sends). The same struct parses the query and
//! describes it in the OpenAPI document.

use std::num::NonZeroU64;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::runtime::tasklog::Streams;
use crate::task::model::HookName;
use crate::task::time::Time;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamParam {
    Stdout,
    Stderr,
    /// Both, interleaved in the order the output arrived.
    #[default]
    All,
}

/// Which part of a task's output to return, and how.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    /// `stdout`, `stderr` or `all` (default): `all` interleaves both streams line by line
    /// in arrival order.
    #[serde(default)]
    pub stream: Option<StreamParam>,
    /// Keep the answer open and pass on output as it is written, until the task has
    /// terminated and its output is drained (or the client goes away).
    #[serde(default)]
    pub follow: Option<bool>,
    /// Only the last N lines.
    #[serde(default)]
    pub tail_lines: Option<u64>,
    /// Stop after this many bytes (the last line may be cut).
    #[serde(default)]
    pub limit_bytes: Option<NonZeroU64>,
    /// Only lines written in the last N seconds. Not with `sinceTime`.
    #[serde(default)]
    pub since_seconds: Option<NonZeroU64>,
    /// Only lines written at or after this time (RFC 3339). Not with `sinceSeconds`.
    #[serde(default)]
    pub since_time: Option<Time>,
    /// Prefix every line with the time it was written (RFC 3339, nanoseconds) and a space.
    #[serde(default)]
    pub timestamps: Option<bool>,
    /// The output of this lifecycle hook (`preStart` or `postStop`: its stdout and
    /// stderr, combined, so `stream` does not apply) instead of the main command's. A
    /// follower ends once the hook has ended.
    #[serde(default)]
    pub hook: Option<HookName>,
}

impl LogQuery {
    /// Parses a raw query string; the message names the parameter at fault.
    pub fn parse(query: &str) -> Result<LogQuery, String> {
        let q: LogQuery = match serde_urlencoded::from_str(query) {
            Ok(q) => q,
            Err(e) => {
                // Find the parameter at fault, for a message that names it.
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    if let Err(e) = serde_urlencoded::from_str::<LogQuery>(pair) {
                        return Err(format!("{pair}: {e}"));
                    }
                }
                return Err(format!("invalid query: {e}"));
            }
        };
        if q.since_seconds.is_some() && q.since_time.is_some() {
            return Err("at most one of sinceSeconds and sinceTime may be given".into());
        }
        Ok(q)
    }

    pub fn streams(&self) -> Streams {
        if self.hook.is_some() {
            return Streams::ALL; // one combined stream, logged as stdout
        }
        match self.stream.unwrap_or_default() {
            StreamParam::Stdout => Streams {
                stdout: true,
                stderr: false,
            },
            StreamParam::Stderr => Streams {
                stdout: false,
                stderr: true,
            },
            StreamParam::All => Streams::ALL,
        }
    }

    /// The earliest time (ns since the epoch) a line may have, given `now`.
    pub fn since_ns(&self, now_ns: i64) -> Option<i64> {
        match (self.since_seconds, self.since_time) {
            (Some(s), _) => {
                Some(now_ns.saturating_sub((s.get() as i64).saturating_mul(1_000_000_000)))
            }
            (None, Some(t)) => Some(t.unix_nanos()),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_parameters_parse_and_bad_ones_are_named() {
        let q = LogQuery::parse("stream=stderr&follow=true&tailLines=0&limitBytes=10&sinceSeconds=5&timestamps=false&other=x").unwrap();
        assert_eq!(q.stream, Some(StreamParam::Stderr));
        assert_eq!(q.follow, Some(true));
        assert_eq!(q.tail_lines, Some(0));
        assert_eq!(q.limit_bytes.map(|n| n.get()), Some(10));
        assert_eq!(q.since_ns(10_000_000_000), Some(5_000_000_000));
        assert_eq!(LogQuery::parse("").unwrap(), LogQuery::default());
        assert_eq!(
            LogQuery::parse("hook=postStop").unwrap().hook,
            Some(HookName::PostStop)
        );
        assert!(
            LogQuery::parse("hook=poststop")
                .unwrap_err()
                .contains("hook=poststop")
        );
        let t = LogQuery::parse("sinceTime=2026-01-01T00:00:00.5Z").unwrap();
        assert_eq!(t.since_ns(0), Some(1_767_225_600_500_000_000));
        for (bad, names) in [
            ("stream=both", "stream=both"),
            ("follow=yes", "follow=yes"),
            ("tailLines=-1", "tailLines=-1"),
            ("stream=all&limitBytes=0", "limitBytes=0"),
            ("sinceSeconds=abc", "sinceSeconds=abc"),
            ("sinceTime=yesterday", "sinceTime=yesterday"),
            (
                "sinceSeconds=1&sinceTime=2026-01-01T00:00:00Z",
                "at most one",
            ),
        ] {
            let e = LogQuery::parse(bad).unwrap_err();
            assert!(e.contains(names), "{bad}: {e}");
        }
    }
}
