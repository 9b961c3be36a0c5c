//! State changes: from a runtime's answer to a start, or from its event channel.

use std::sync::Weak;

use tokio::sync::mpsc;

use super::Manager;
use super::entry::Entry;
use crate::runtime::{Observed, RuntimeEvent};
use crate::task::model::{self, TaskState};

impl Manager {
    /// Moves the task's state forward (never back: a late "running" never hides an exit).
    pub(super) fn apply(&self, entry: &Entry, observed: Observed) {
        let new = match observed {
            Observed::Running { started_at } => TaskState::Running(model::Running { started_at }),
            Observed::Terminated(t) => TaskState::Terminated(t),
        };
        let mut state = entry.state();
        if new.rank() <= state.rank() {
            return;
        }
        let name = entry.name();
        match &new {
            TaskState::Terminated(t) => tracing::info!(
                task = %name, from = state.name(), to = "terminated",
                exit_code = t.exit_code, reason = %t.reason, "task state changed"
            ),
            _ => {
                tracing::info!(task = %name, from = state.name(), to = new.name(), "task state changed")
            }
        }
        self.record_metrics(entry, &state, &new);
        *state = new;
        drop(state);
        self.changed(&name);
    }

    fn on_event(&self, ev: RuntimeEvent) {
        if let Some(entry) = self.entry(&ev.name).filter(|e| e.uid() == ev.uid) {
            self.apply(&entry, ev.observed);
        }
    }
}

pub(super) async fn event_loop(mgr: Weak<Manager>, mut rx: mpsc::UnboundedReceiver<RuntimeEvent>) {
    while let Some(ev) = rx.recv().await {
        let Some(mgr) = mgr.upgrade() else { return };
        mgr.on_event(ev);
    }
}
