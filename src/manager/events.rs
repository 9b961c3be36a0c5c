//! State changes: from a runtime's answer to a start, or from its event channel.

use std::sync::Weak;

use tokio::sync::mpsc;

use super::Manager;
use super::entry::{Entry, Usage};
use crate::runtime::{Observed, RuntimeEvent};
use crate::task::model::{self, TaskState};

/// When a state was seen: as it happened, or as an earlier agent process recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seen {
    Now,
    AtStart,
}

impl Manager {
    /// Moves the task's state forward (never back: a late "running" never hides an exit;
    /// a waiting task may show another reason), and its hooks' states with it.
    pub(super) fn apply(&self, entry: &Entry, observed: Observed) {
        self.apply_seen(entry, observed, Seen::Now);
    }

    /// As `apply`; `Seen::AtStart` for an end an earlier agent process recorded, read at
    /// this one's start: no event of this process, so neither counted in the metrics nor
    /// logged as a state change (a restart with 100,000 finished tasks did both for each).
    pub(super) fn apply_seen(&self, entry: &Entry, observed: Observed, seen: Seen) {
        let (observed, usage) = match observed {
            Observed::WithUsage(o, u) => (*o, Some(u)),
            o => (o, None),
        };
        let (observed, hooks) = match observed {
            Observed::WithHooks(o, h) => (*o, Some(h)),
            o => (o, None),
        };
        let new = match observed {
            Observed::Waiting(w) => TaskState::Waiting(w),
            Observed::Running { started_at } => TaskState::Running(model::Running { started_at }),
            Observed::Terminated(t) => TaskState::Terminated(t),
            // Never nested otherwise.
            Observed::WithHooks(..) | Observed::WithUsage(..) => return,
        };
        let mut parts = entry.parts();
        let mut changed = false;
        if let Some(u) = usage.map(|u| Usage::of(&u))
            && parts.usage != u
        {
            parts.usage = u;
            changed = true;
        }
        if let Some(h) = hooks {
            let mine = &mut parts.hooks;
            let merged = mine.get_or_insert_with(Default::default);
            let before = merged.clone();
            merged.merge(&h);
            changed |= *merged != before;
            if merged.is_empty() {
                *mine = None;
            }
        }
        let state = &parts.state;
        let moves = new.rank() > state.rank()
            || (matches!(
                (state, &new),
                (TaskState::Waiting(_), TaskState::Waiting(_))
            ) && *state != new);
        let name = entry.name();
        if moves {
            match &new {
                TaskState::Terminated(t) if seen == Seen::AtStart => {
                    tracing::debug!(
                        task = %name, exit_code = t.exit_code, reason = %t.reason,
                        "task found ended at start"
                    )
                }
                TaskState::Terminated(t) => tracing::info!(
                    task = %name, from = state.name(), to = "terminated",
                    exit_code = t.exit_code, reason = %t.reason, "task state changed"
                ),
                TaskState::Waiting(w) => tracing::info!(
                    task = %name, from = state.name(), to = "waiting",
                    reason = w.reason.as_deref().unwrap_or(""), "task state changed"
                ),
                _ => {
                    tracing::info!(task = %name, from = state.name(), to = new.name(), "task state changed")
                }
            }
            if seen == Seen::Now {
                self.record_metrics(entry, state, &new);
            }
            parts.state = new;
        }
        drop(parts);
        if moves || changed {
            self.changed(name);
        }
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
