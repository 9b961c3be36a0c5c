//! Reporting a task's state in its Task's `/status` (merge patches, one writer at a time).

use ::kube::ResourceExt;
use ::kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use super::crd::{Task, TaskCrStatus};
use super::merge_patch::merge_diff;
use super::watch::{TaskWatcher, reason};
use crate::task::model::{TaskState, Terminated};

impl TaskWatcher {
    /// Patches the Task's status to show the manager's view of the task.
    pub(super) async fn sync_status(&self, name: &str) {
        let (owned, finalizing, known) = {
            let st = self.state();
            (
                st.owned.contains(name),
                st.finalizing.contains(name),
                st.known.get(name).cloned(),
            )
        };
        let Some(known) = known.filter(|_| owned) else {
            return;
        };
        match self.manager.get(name) {
            Ok(view) => self.report(name, &view.state).await,
            Err(_) if finalizing => {}
            Err(_) => {
                // Deleted through the HTTP API; the Task object keeps a final word.
                let terminated = matches!(
                    known.status.as_ref().and_then(|s| s.state.as_ref()),
                    Some(TaskState::Terminated(_))
                );
                if !terminated && known.status.as_ref().is_some_and(TaskCrStatus::has_run) {
                    let t = TaskState::Terminated(Terminated::failed_to_start(
                        reason::DELETED,
                        137,
                        "the task was deleted through the HTTP API".into(),
                    ));
                    self.report(name, &t).await;
                }
            }
        }
    }

    /// A Task whose status says it ran, unknown to this agent (data dir lost): not run again.
    pub(super) async fn mark_lost(&self, t: &Task) {
        let name = t.name_any();
        let terminated = matches!(
            t.status.as_ref().and_then(|s| s.state.as_ref()),
            Some(TaskState::Terminated(_))
        );
        if terminated {
            return;
        }
        tracing::warn!(task = %name, "Task says it ran but this agent has no record of it; not running it again");
        let lost = TaskState::Terminated(Terminated::failed_to_start(
            reason::TASK_LOST,
            137,
            "the agent has no record of this task (its data dir was lost); it is not run again"
                .into(),
        ));
        self.report(&name, &lost).await;
    }

    /// Writes `state` into the Task's status unless it already shows it.
    pub(super) async fn report(&self, name: &str, state: &TaskState) {
        let _one_at_a_time = self.reporting.lock().await;
        let Some(known) = self.state().known.get(name).cloned() else {
            return;
        };
        let generation = known
            .status
            .as_ref()
            .and_then(|s| s.observed_generation)
            .or(known.generation);
        let desired = TaskCrStatus::from_state(state, generation);
        if known.status.as_ref() == Some(&desired) {
            return;
        }
        let old = serde_json::to_value(&known.status).unwrap_or(Value::Null);
        let new = serde_json::to_value(&desired).unwrap_or(Value::Null);
        let patch = json!({ "status": merge_diff(&old, &new) });
        match self
            .api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(obj) => {
                tracing::info!(task = name, phase = desired.phase.as_deref().unwrap_or(""), exit_code = ?desired.exit_code, "Task status reported");
                let mut st = self.state();
                if let Some(k) = st.known.get_mut(name) {
                    k.update(&obj);
                }
            }
            Err(::kube::Error::Api(s)) if s.code == 404 => {
                tracing::debug!(task = name, "Task is gone; status not reported");
            }
            Err(e) => tracing::warn!(task = name, error = %e, "cannot report the Task's status"),
        }
    }
}
