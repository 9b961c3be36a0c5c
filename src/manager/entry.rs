//! One task as the manager holds it: its record, its observed state, and the locks that
//! order what happens to it.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::task::model::{HookStatuses, TaskSpec, TaskState};
use crate::task::store::TaskRecord;
use crate::task::time::Time;

/// A consistent copy of one task, for the API.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskView {
    pub name: String,
    pub spec: TaskSpec,
    pub state: TaskState,
    /// How its lifecycle hooks are or ended (`None` before the first one started).
    pub hooks: Option<HookStatuses>,
    pub deletion_timestamp: Option<Time>,
}

/// Whether the task's record has reached the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Persisted {
    Pending,
    Yes,
    /// Its create failed; the entry is gone from the map.
    No,
}

pub(super) struct Entry {
    record: Mutex<TaskRecord>,
    state: Mutex<TaskState>,
    /// Locked after `state` when both are.
    hooks: Mutex<Option<HookStatuses>>,
    /// Held while the task starts, stops or its record is rewritten, so those never
    /// overlap: a delete waits for a start in flight, and two updates of `task.json` are
    /// never written at once.
    pub(super) lifecycle: tokio::sync::Mutex<()>,
    /// Serialises deletion requests, so that exactly one makes the marker durable.
    pub(super) deleting: tokio::sync::Mutex<()>,
    persisted: watch::Sender<Persisted>,
}

impl Entry {
    pub(super) fn new(record: TaskRecord, state: TaskState, persisted: Persisted) -> Arc<Entry> {
        Arc::new(Entry {
            record: Mutex::new(record),
            state: Mutex::new(state),
            hooks: Mutex::new(None),
            lifecycle: tokio::sync::Mutex::new(()),
            deleting: tokio::sync::Mutex::new(()),
            persisted: watch::channel(persisted).0,
        })
    }

    /// The record; a panic elsewhere while it was held leaves it usable (no poisoning).
    pub(super) fn record(&self) -> MutexGuard<'_, TaskRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn state(&self) -> MutexGuard<'_, TaskState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn hooks(&self) -> MutexGuard<'_, Option<HookStatuses>> {
        self.hooks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn view(&self) -> TaskView {
        // State before record, the order `apply` takes them in: the opposite deadlocks.
        let (state, hooks) = {
            let state = self.state();
            (state.clone(), self.hooks().clone())
        };
        let rec = self.record();
        TaskView {
            name: rec.name.clone(),
            spec: rec.spec.clone(),
            state,
            hooks,
            deletion_timestamp: rec.deletion_timestamp,
        }
    }

    pub(super) fn name(&self) -> String {
        self.record().name.clone()
    }

    pub(super) fn uid(&self) -> String {
        self.record().uid.clone()
    }

    /// A deletion was requested and is durable.
    pub(super) fn deletion_requested(&self) -> bool {
        self.record().deletion_timestamp.is_some()
    }

    /// Counts against `--max-concurrent-tasks`: neither deleted nor finished.
    pub(super) fn is_active(&self) -> bool {
        !self.deletion_requested() && !self.state().is_terminated()
    }

    pub(super) fn set_persisted(&self, p: Persisted) {
        self.persisted.send_replace(p);
    }

    /// Waits until the create that made this entry has stored it (true) or failed (false).
    pub(super) async fn wait_persisted(&self) -> bool {
        let mut rx = self.persisted.subscribe();
        match rx.wait_for(|p| *p != Persisted::Pending).await {
            Ok(p) => *p == Persisted::Yes,
            Err(_) => false,
        }
    }
}
