//! What the manager tells the metrics: the task set counted by kind and state (at each
//! scrape, so the gauge can't drift), and each state change as it is applied.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use super::Manager;
use super::entry::Entry;
use crate::task::model::TaskState;
use crate::task::time::Time;

impl Manager {
    /// Tasks by (kind, state), counted in place: no task is copied.
    pub fn census(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut counts: HashMap<(&'static str, &'static str), u64> = HashMap::new();
        let tasks = self.read_tasks();
        for e in tasks.entries() {
            let kind = e.kind();
            *counts.entry((kind, e.parts().state.name())).or_default() += 1;
        }
        // A task removed before its end was applied leaves its start time behind.
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        if running.len() > tasks.len() {
            let live: std::collections::HashSet<String> =
                tasks.entries().map(|e| e.uid().to_string()).collect();
            running.retain(|uid, _| live.contains(uid));
        }
        drop((running, tasks));
        let mut out: Vec<_> = counts.into_iter().map(|((k, s), n)| (k, s, n)).collect();
        out.sort_unstable();
        out
    }

    /// Every task's recorded usage (an ended one's, as its status shows it), in name
    /// order, read a task at a time as a scrape writes it.
    pub fn usage_listing(&self) -> UsageListing {
        UsageListing(self.read_tasks().entries().cloned().collect())
    }

    /// Whether the task was created since this agent process started (one created
    /// before was re-adopted after a restart).
    fn created_here(&self, entry: &Entry) -> bool {
        crate::metrics::process_start_unix_ms()
            .is_none_or(|t| entry.created_at().unix_millis() >= t)
    }

    /// Counts a state change: a start (with its latency from creation, for tasks created
    /// by this agent process) and an end (by reason, with the time it ran). Durations are measured on the agent's clock as the changes are
    /// applied: the recorded times have the API's second precision.
    pub(super) fn record_metrics(&self, entry: &Entry, from: &TaskState, to: &TaskState) {
        let kind = entry.kind();
        let uid = entry.uid().to_string();
        let started = match to {
            TaskState::Running(_) => true,
            TaskState::Terminated(t) => t.started_at.is_some(),
            TaskState::Waiting(_) => false,
        };
        // Tasks created before this agent process (re-adopted after a restart) started
        // under an earlier one: not counted again.
        let ours = self.created_here(entry);
        if matches!(from, TaskState::Waiting(_)) && started && ours {
            let ns = Time::now()
                .unix_nanos()
                .saturating_sub(entry.created_at().unix_nanos());
            crate::metrics::task_started(kind, Some(Duration::from_nanos(ns.max(0) as u64)));
        }
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        match to {
            TaskState::Running(_) => {
                running.insert(uid, Instant::now());
            }
            TaskState::Terminated(t) => {
                let ran = running.remove(&uid).map(|at| at.elapsed()).or_else(|| {
                    let (s, f) = (t.started_at?.unix_nanos(), t.finished_at.unix_nanos());
                    Some(Duration::from_nanos(f.saturating_sub(s).max(0) as u64))
                });
                crate::metrics::task_terminated(kind, &t.reason, ran);
            }
            TaskState::Waiting(_) => {}
        }
    }
}

/// When each running task was seen to start, by uid (removed when it terminates).
static RUNNING: LazyLock<Mutex<HashMap<String, Instant>>> = LazyLock::new(Default::default);

/// The tasks of one scrape (see `Manager::usage_listing`).
pub struct UsageListing(Vec<std::sync::Arc<Entry>>);

impl UsageListing {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `i`th task's name, and what it used if it ended with a count of it.
    pub fn get(&self, i: usize) -> Option<(&str, Option<crate::task::model::ResourceUsage>)> {
        let e = self.0.get(i)?;
        let usage = e.parts().usage.get();
        Some((e.name(), usage))
    }
}
