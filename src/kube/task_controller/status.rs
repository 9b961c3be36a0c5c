//! A Task's `/status`, written by server-side apply (this agent is its field manager, so
//! fields it no longer sets are removed), once per change; and the Events that tell each
//! change in `kubectl describe task`.

use ::kube::api::{Patch, PatchParams};
use ::kube::{Resource, ResourceExt};
use serde_json::json;

use super::{FIELD_MANAGER, TaskWatcher, Written, reason};
use crate::kube::KubeError;
use crate::kube::crd::{Task, TaskCrStatus};
use crate::kube::events::{TaskEvent, reason as event};
use crate::task::model::{self, HookStatuses, TaskState, Terminated};

impl TaskWatcher {
    /// Writes `state` into the Task's status unless it already shows it, and publishes the
    /// events of the change.
    pub(super) async fn report(&self, t: &Task, state: &TaskState) -> Result<(), KubeError> {
        self.report_with_hooks(t, state, None).await
    }

    /// As `report`, with the task's lifecycle hooks' states (`status.hooks`).
    pub(super) async fn report_with_hooks(
        &self,
        t: &Task,
        state: &TaskState,
        hooks: Option<&HookStatuses>,
    ) -> Result<(), KubeError> {
        let name = t.name_any();
        let before = self.last_status(t);
        // The generation the task was started for: later spec changes are not applied.
        let generation = before
            .as_ref()
            .and_then(|s| s.observed_generation)
            .or(t.metadata.generation);
        let desired = TaskCrStatus::from_state(state, hooks, generation);
        if before.as_ref() == Some(&desired) {
            self.remember(t, desired);
            return Ok(());
        }
        let apply = json!({
            "apiVersion": Task::api_version(&()),
            "kind": Task::kind(&()),
            "status": &desired,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match self
            .api
            .patch_status(&name, &params, &Patch::Apply(&apply))
            .await
        {
            Ok(_) => {}
            Err(::kube::Error::Api(s)) if s.code == 404 => {
                tracing::debug!(task = %name, "Task is gone; status not reported");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(task = %name, phase = desired.phase.as_deref().unwrap_or(""), exit_code = ?desired.exit_code, "Task status reported");
        let previous = before.and_then(|s| s.state);
        for ev in events_for(previous.as_ref(), state) {
            self.events.publish(t.object_ref(&()), ev);
        }
        self.remember(t, desired);
        Ok(())
    }

    fn remember(&self, t: &Task, status: TaskCrStatus) {
        self.state().written.insert(
            t.name_any(),
            Written {
                uid: t.metadata.uid.clone(),
                status,
            },
        );
    }

    /// The task was deleted through the HTTP API while its Task remains: the Task keeps a
    /// final word if it still shows the task unfinished.
    pub(super) async fn report_deleted(&self, t: &Task) -> Result<(), KubeError> {
        let last = self.last_status(t);
        let running = last.as_ref().is_some_and(TaskCrStatus::has_run)
            && !matches!(
                last.as_ref().and_then(|s| s.state.as_ref()),
                Some(TaskState::Terminated(_))
            );
        if !running {
            return Ok(());
        }
        let deleted = TaskState::Terminated(Terminated::failed_to_start(
            reason::DELETED,
            137,
            "the task was deleted through the HTTP API".into(),
        ));
        self.report(t, &deleted).await
    }

    /// A Task whose status says it ran, unknown to this agent (data dir lost): not run again.
    pub(super) async fn mark_lost(&self, t: &Task) -> Result<(), KubeError> {
        let terminated = matches!(
            self.last_status(t).and_then(|s| s.state),
            Some(TaskState::Terminated(_))
        );
        if terminated {
            return Ok(());
        }
        tracing::warn!(task = %t.name_any(), "Task says it ran but this agent has no record of it; not running it again");
        let lost = TaskState::Terminated(Terminated::failed_to_start(
            reason::TASK_LOST,
            137,
            "the agent has no record of this task (its data dir was lost); it is not run again"
                .into(),
        ));
        self.report(t, &lost).await
    }
}

/// The events that tell the change from `before` to `now`.
pub(super) fn events_for(before: Option<&TaskState>, now: &TaskState) -> Vec<TaskEvent> {
    let started_before = matches!(
        before,
        Some(TaskState::Running(_) | TaskState::Terminated(_))
    );
    let mut out = Vec::new();
    match now {
        TaskState::Waiting(w) => {
            let full = w.reason.as_deref() == Some(reason::TOO_MANY_TASKS);
            let was_full = matches!(before, Some(TaskState::Waiting(b)) if b.reason == w.reason);
            if full && !was_full {
                out.push(TaskEvent {
                    warning: false,
                    reason: event::WAITING,
                    action: "Schedule",
                    note: w.message.clone().unwrap_or_default(),
                });
            }
        }
        TaskState::Running(r) => {
            if !started_before {
                out.push(started(r.started_at.as_ref()));
            }
        }
        TaskState::Terminated(t) => {
            if matches!(before, Some(TaskState::Terminated(_))) {
                return out;
            }
            if let Some(at) = &t.started_at
                && !started_before
            {
                out.push(started(Some(at)));
            }
            out.push(ended(t));
        }
    }
    out
}

fn started(at: Option<&crate::task::time::Time>) -> TaskEvent {
    TaskEvent {
        warning: false,
        reason: event::STARTED,
        action: "Start",
        note: match at {
            Some(at) => format!("task started at {at}"),
            None => "task started (when is unknown)".into(),
        },
    }
}

fn ended(t: &Terminated) -> TaskEvent {
    let message = t
        .message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    match t.reason.as_str() {
        model::reason::SUCCEEDED => TaskEvent {
            warning: false,
            reason: event::SUCCEEDED,
            action: "Run",
            note: "task exited with code 0".into(),
        },
        model::reason::TIMEOUT => TaskEvent {
            warning: true,
            reason: event::TIMED_OUT,
            action: "Run",
            note: format!(
                "task timed out and was stopped (exit code {}){message}",
                t.exit_code
            ),
        },
        reason::INVALID_SPEC => TaskEvent {
            warning: true,
            reason: event::INVALID_SPEC,
            action: "Validate",
            note: format!("Task refused{message}"),
        },
        why => {
            let signal = t
                .signal
                .map(|s| format!(", signal {s}"))
                .unwrap_or_default();
            TaskEvent {
                warning: true,
                reason: event::FAILED,
                action: "Run",
                note: format!("{why}: exit code {}{signal}{message}", t.exit_code),
            }
        }
    }
}
