//! Kubernetes Events (`events.k8s.io/v1`) on Task objects, so `kubectl describe task`
//! tells the story: published through kube's event recorder, in order, by one background
//! task, so a slow API server never holds up a reconcile. Events are best-effort: when the
//! queue is full (API server unreachable for long) new ones are dropped and logged.

use ::kube::runtime::events::{Event, EventType, Recorder, Reporter};
use k8s_openapi::api::core::v1::ObjectReference;
use tokio::sync::mpsc;

use super::KubeClient;

/// The reporting controller named in every event.
pub const REPORTING_CONTROLLER: &str = "task-executor";

/// Events waiting to be published; beyond this, new ones are dropped.
const QUEUE: usize = 1024;

/// Reasons (`kubectl describe`'s Reason column) of the events on a Task.
pub mod reason {
    pub const STARTED: &str = "Started";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const TIMED_OUT: &str = "TimedOut";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const WAITING: &str = "TooManyTasks";
    /// The spec has fields the agent does not know (they were ignored).
    pub const UNKNOWN_FIELD: &str = "UnknownField";
}

/// One event about a Task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskEvent {
    pub warning: bool,
    pub reason: &'static str,
    /// What the agent did: `Start`, `Run`, `Validate`, `Schedule`.
    pub action: &'static str,
    pub note: String,
}

/// Largest note the API accepts (1 kB).
const MAX_NOTE: usize = 1024;

impl TaskEvent {
    fn into_event(self) -> Event {
        let mut note = self.note;
        if note.len() > MAX_NOTE {
            let mut cut = MAX_NOTE - 3;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        Event {
            type_: if self.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: self.reason.into(),
            note: Some(note),
            action: self.action.into(),
            secondary: None,
        }
    }
}

/// Where events go: a bounded queue in front of the publisher.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(ObjectReference, TaskEvent)>,
}

impl EventSink {
    /// Publishes through kube's `Recorder`, as `task-executor` from instance `pod`.
    pub fn spawn(client: KubeClient, pod: String) -> Self {
        let (sink, mut rx) = Self::channel();
        tokio::spawn(async move {
            let reporter = Reporter {
                controller: REPORTING_CONTROLLER.into(),
                instance: Some(pod),
            };
            let recorder = Recorder::new(client.wait("events").await, reporter);
            let mut failures = 0u32;
            while let Some((regarding, ev)) = rx.recv().await {
                let reason = ev.reason;
                match recorder.publish(&ev.into_event(), &regarding).await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        let task = regarding.name.as_deref().unwrap_or_default();
                        if failures == 1 {
                            tracing::warn!(task, reason, error = %e, "cannot publish a Kubernetes event");
                        } else {
                            tracing::debug!(task, reason, error = %e, failures, "cannot publish a Kubernetes event");
                        }
                    }
                }
            }
        });
        sink
    }

    /// A sink and the receiving end of its queue (for a publisher of one's own, or tests).
    pub fn channel() -> (Self, mpsc::Receiver<(ObjectReference, TaskEvent)>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (EventSink { tx }, rx)
    }

    /// Queues `ev` about `regarding`; never waits.
    pub fn publish(&self, regarding: ObjectReference, ev: TaskEvent) {
        if let Err(e) = self.tx.try_send((regarding, ev)) {
            let (regarding, ev) = match e {
                mpsc::error::TrySendError::Full(v) | mpsc::error::TrySendError::Closed(v) => v,
            };
            tracing::debug!(
                task = regarding.name.as_deref().unwrap_or_default(),
                reason = ev.reason,
                "event queue full; event dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_to_what_the_api_accepts() {
        let ev = TaskEvent {
            warning: true,
            reason: reason::FAILED,
            action: "Run",
            note: "é".repeat(1000),
        }
        .into_event();
        let note = ev.note.unwrap();
        assert!(note.len() <= MAX_NOTE, "{}", note.len());
        assert!(note.ends_with("..."));
        assert_eq!(ev.type_, EventType::Warning);
        assert_eq!(ev.reason, "Failed");
    }
}
