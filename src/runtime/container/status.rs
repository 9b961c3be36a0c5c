//! A CRI `ContainerStatus` seen as a task state.

use std::time::Duration;

use k8s_cri::v1::{ContainerState, ContainerStatus};

use crate::runtime::Observed;
use crate::task::model::{Terminated, reason};
use crate::task::time::Time;

/// CRI timestamps are nanoseconds since the epoch; 0 means "not yet".
pub fn time_from_nanos(ns: i64) -> Option<Time> {
    (ns > 0).then(|| Time::from_unix_millis(ns / 1_000_000))
}

pub fn state_of(s: &ContainerStatus) -> ContainerState {
    ContainerState::try_from(s.state).unwrap_or(ContainerState::ContainerUnknown)
}

/// Whether the container ran at least `timeout` (so its stop was the timeout's).
pub fn ran_past(s: &ContainerStatus, timeout: Option<i64>) -> bool {
    match timeout {
        Some(t) if s.started_at > 0 && s.finished_at > 0 => {
            s.finished_at - s.started_at >= t.saturating_mul(1_000_000_000)
        }
        _ => false,
    }
}

/// When a running container's timeout expires, from its real start (survives restarts).
pub fn deadline(s: &ContainerStatus, timeout: Option<i64>) -> Option<Time> {
    let t = timeout?;
    let started = time_from_nanos(s.started_at)?;
    Some(Time::from_unix_millis(
        started.unix_millis() + Duration::from_secs(t as u64).as_millis() as i64,
    ))
}

/// The task state a status shows; `None` while the container is created but not started
/// or in an unknown state.
pub fn observed(s: &ContainerStatus, timeout: Option<i64>, timed_out: bool) -> Option<Observed> {
    match state_of(s) {
        ContainerState::ContainerRunning => Some(Observed::Running {
            started_at: Some(time_from_nanos(s.started_at).unwrap_or_else(Time::now)),
        }),
        ContainerState::ContainerExited => {
            Some(Observed::Terminated(terminated(s, timeout, timed_out)))
        }
        ContainerState::ContainerCreated | ContainerState::ContainerUnknown => None,
    }
}

pub fn terminated(s: &ContainerStatus, timeout: Option<i64>, timed_out: bool) -> Terminated {
    let started_at = time_from_nanos(s.started_at);
    let finished_at = time_from_nanos(s.finished_at).unwrap_or_else(Time::now);
    let message = (!s.message.is_empty()).then(|| s.message.clone());
    if timed_out || (s.exit_code != 0 && ran_past(s, timeout)) {
        return Terminated {
            exit_code: s.exit_code,
            signal: None,
            reason: reason::TIMEOUT.into(),
            message: Some(format!(
                "Task exceeded timeout of {} seconds",
                timeout.unwrap_or_default()
            )),
            started_at,
            finished_at,
        };
    }
    let why = match (s.exit_code, s.reason.as_str()) {
        (_, "OOMKilled") => "OOMKilled",
        (_, r) if r == reason::START_ERROR => reason::START_ERROR,
        (0, _) => reason::SUCCEEDED,
        _ => reason::FAILED,
    };
    Terminated {
        exit_code: s.exit_code,
        signal: None,
        reason: why.into(),
        message,
        started_at: if why == reason::START_ERROR {
            None
        } else {
            started_at
        },
        finished_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32, reason: &str, started_s: i64, finished_s: i64) -> ContainerStatus {
        ContainerStatus {
            state: ContainerState::ContainerExited as i32,
            exit_code: code,
            reason: reason.into(),
            started_at: started_s * 1_000_000_000,
            finished_at: finished_s * 1_000_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn exit_codes_map_to_reasons() {
        let t = terminated(&exited(0, "Completed", 100, 101), None, false);
        assert_eq!((t.exit_code, t.reason.as_str()), (0, "Succeeded"));
        assert_eq!(t.started_at, Some(Time::from_unix_millis(100_000)));
        assert_eq!(t.finished_at, Time::from_unix_millis(101_000));
        let t = terminated(&exited(3, "Error", 100, 101), None, false);
        assert_eq!((t.exit_code, t.reason.as_str()), (3, "Failed"));
        let t = terminated(&exited(137, "OOMKilled", 100, 101), None, false);
        assert_eq!(t.reason, "OOMKilled");
        let t = terminated(&exited(128, "StartError", 0, 101), None, false);
        assert_eq!((t.reason.as_str(), t.started_at), ("StartError", None));
    }

    #[test]
    fn timeouts_are_recognised_after_the_fact() {
        let t = terminated(&exited(137, "Error", 100, 106), Some(5), false);
        assert_eq!(t.reason, "TaskTimeout");
        assert_eq!(
            t.message.as_deref(),
            Some("Task exceeded timeout of 5 seconds")
        );
        let t = terminated(&exited(1, "Error", 100, 103), Some(5), false);
        assert_eq!(t.reason, "Failed");
        let t = terminated(&exited(143, "Error", 100, 103), Some(5), true);
        assert_eq!(t.reason, "TaskTimeout");
    }

    #[test]
    fn deadline_counts_from_the_real_start() {
        let s = ContainerStatus {
            state: ContainerState::ContainerRunning as i32,
            started_at: 100 * 1_000_000_000,
            ..Default::default()
        };
        assert_eq!(deadline(&s, Some(5)), Some(Time::from_unix_millis(105_000)));
        assert_eq!(deadline(&s, None), None);
        assert!(matches!(
            observed(&s, None, false),
            Some(Observed::Running { .. })
        ));
    }
}
