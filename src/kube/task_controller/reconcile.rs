//! One Task, one reconcile at a time (kube's applier guarantees it): the finalizer first,
//! then start or adopt its task and report its state; on deletion, stop the task before the
//! finalizer goes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::kube::runtime::controller::Action;
use ::kube::runtime::finalizer::{Error as FinalizerError, Event as Finalizer, finalizer};
use ::kube::{Resource, ResourceExt};

use super::{FINALIZED_MEMORY, TaskWatcher, reason};
use crate::kube::KubeError;
use crate::kube::crd::{FINALIZER, Task, TaskCrStatus};
use crate::kube::events::{TaskEvent, reason as event};
use crate::manager::ManagerError;
use crate::task::fields::{self, FieldValidation};
use crate::task::model::{TaskState, Terminated, Waiting};

/// How often a Task refused for `TooManyTasks` is tried again.
pub(super) const RETRY_FULL: Duration = Duration::from_secs(2);
/// Retry delays after a failed reconcile: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub(super) async fn reconcile(task: Arc<Task>, w: Arc<TaskWatcher>) -> Result<Action, KubeError> {
    let name = task.name_any();
    // Ours by label and spec; one carrying our finalizer stays ours whatever its spec says
    // now, so its deletion is never stuck.
    if task.spec.pod_name != w.pod && !has_finalizer(&task) {
        tracing::debug!(task = %name, pod = %task.spec.pod_name, "Task is for another pod");
        return Ok(Action::await_change());
    }
    let uid = task.metadata.uid.clone().unwrap_or_default();
    let finalizing = task.metadata.deletion_timestamp.is_some() && has_finalizer(&task);
    if finalizing && w.state().finalized.contains_key(&uid) {
        // A copy from before our finalizer went (a trigger queued meanwhile): done already.
        return Ok(Action::await_change());
    }
    let api = w.api.clone();
    let result = finalizer(&api, FINALIZER, task, |ev| async {
        match ev {
            Finalizer::Apply(t) => w.apply(&t).await,
            Finalizer::Cleanup(t) => w.cleanup(&t).await,
        }
    })
    .await;
    let action = match result {
        Ok(action) => action,
        // Gone before its finalizer could be removed: nothing holds it back any more.
        Err(FinalizerError::RemoveFinalizer(::kube::Error::Api(s))) if s.code == 404 => {
            Action::await_change()
        }
        Err(e) => return Err(e.into()),
    };
    let mut st = w.state();
    st.failures.remove(&name);
    if finalizing {
        let now = Instant::now();
        st.finalized
            .retain(|_, at| now.duration_since(*at) < FINALIZED_MEMORY);
        st.finalized.insert(uid, now);
    }
    Ok(action)
}

/// The unknown fields of the Task's spec to report (as its annotation chooses), or why it
/// is refused: a spec that could not be decoded, or unknown fields under `Strict`.
fn unknown_fields(t: &Task) -> Result<Vec<String>, String> {
    if let Some(why) = &t.spec.invalid {
        return Err(why.clone());
    }
    match t.field_validation()? {
        FieldValidation::Ignore => Ok(Vec::new()),
        FieldValidation::Warn => Ok(t.spec.unknown_fields.clone()),
        FieldValidation::Strict if t.spec.unknown_fields.is_empty() => Ok(Vec::new()),
        FieldValidation::Strict => Err(fields::strict_error(&t.spec.unknown_fields)),
    }
}

/// After a failed reconcile: try again later, sooner the first times.
pub(super) fn error_policy(task: Arc<Task>, err: &KubeError, w: Arc<TaskWatcher>) -> Action {
    let name = task.name_any();
    let n = {
        let mut st = w.state();
        let n = st.failures.entry(name.clone()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = retry_delay(n);
    if n == 1 {
        tracing::warn!(task = %name, error = %err, retry_in = ?delay, "reconciling the Task failed");
    } else {
        tracing::debug!(task = %name, error = %err, failures = n, retry_in = ?delay, "reconciling the Task failed again");
    }
    Action::requeue(delay)
}

pub(super) fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (RETRY_FIRST * 2u32.pow(doublings)).min(RETRY_MAX)
}

pub(super) fn has_finalizer(t: &Task) -> bool {
    t.finalizers().iter().any(|f| f == FINALIZER)
}

impl TaskWatcher {
    /// The Task exists and carries our finalizer: its task runs (or ran) here.
    async fn apply(&self, t: &Task) -> Result<Action, KubeError> {
        let name = t.name_any();
        match self.manager.get(&name) {
            Ok(view) => {
                if self.state().owned.insert(name.clone()) {
                    tracing::info!(task = %name, state = view.state.name(), "adopted task for its Task object");
                }
                self.note_ignored_update(t, &view.spec);
                self.report_with_hooks(t, &view.state, view.hooks.as_ref())
                    .await?;
                Ok(Action::await_change())
            }
            Err(_) if self.state().owned.contains(&name) => {
                // Ran here and was deleted through the HTTP API: not run again.
                self.report_deleted(t).await?;
                Ok(Action::await_change())
            }
            Err(_) if self.last_status(t).is_some_and(|s| s.has_run()) => {
                self.mark_lost(t).await?;
                Ok(Action::await_change())
            }
            Err(_) => self.create(t).await,
        }
    }

    /// Starts the Task's task; a full agent leaves it waiting and tries again.
    async fn create(&self, t: &Task) -> Result<Action, KubeError> {
        let name = t.name_any();
        let unknown = match unknown_fields(t) {
            Ok(unknown) => unknown,
            Err(why) => return self.refuse(t, &why).await,
        };
        // Owned before it can change, so none of its change events is missed.
        self.state().owned.insert(name.clone());
        let result = self.manager.create(name.clone(), t.task_spec()).await;
        if result.is_err() {
            self.state().owned.remove(&name);
        }
        match result {
            Ok(view) => {
                tracing::info!(task = %name, "started task for its Task object");
                if !unknown.is_empty() {
                    tracing::warn!(task = %name, fields = ?unknown, "the Task's spec has fields the agent does not know; they were ignored");
                    let texts: Vec<String> = unknown
                        .iter()
                        .map(|f| fields::unknown_field_text(f))
                        .collect();
                    self.events.publish(
                        t.object_ref(&()),
                        TaskEvent {
                            warning: true,
                            reason: event::UNKNOWN_FIELD,
                            action: "Validate",
                            note: format!("ignored: {}", texts.join(", ")),
                        },
                    );
                }
                self.report_with_hooks(t, &view.state, view.hooks.as_ref())
                    .await?;
                Ok(Action::await_change())
            }
            Err(ManagerError::AlreadyExists(_)) => {
                // Created over HTTP meanwhile: adopted on the next turn.
                Ok(Action::requeue(Duration::ZERO))
            }
            Err(ManagerError::TooManyTasks(max)) => {
                let waiting = TaskState::Waiting(Waiting {
                    reason: Some(reason::TOO_MANY_TASKS.into()),
                    message: Some(format!("maximum concurrent tasks ({max}) reached")),
                });
                if self.last_status(t).and_then(|s| s.state) != Some(waiting.clone()) {
                    tracing::info!(task = %name, max, "agent is full; the task waits");
                }
                self.report(t, &waiting).await?;
                Ok(Action::requeue(RETRY_FULL))
            }
            Err(
                e @ (ManagerError::InvalidName(_)
                | ManagerError::InvalidSpec(_)
                | ManagerError::Runtime(_)),
            ) => self.refuse(t, &e.to_string()).await,
            Err(e) => Err(e.into()),
        }
    }

    /// The Task can't run as it is: it ends `InvalidSpec` with the reason.
    async fn refuse(&self, t: &Task, why: &str) -> Result<Action, KubeError> {
        tracing::warn!(task = %t.name_any(), error = %why, "Task refused");
        let failed = TaskState::Terminated(Terminated::failed_to_start(
            reason::INVALID_SPEC,
            128,
            why.to_string(),
        ));
        self.report(t, &failed).await?;
        Ok(Action::await_change())
    }

    /// The Task is being deleted: stop its task and wait until it is gone; the finalizer
    /// helper then removes the finalizer.
    async fn cleanup(&self, t: &Task) -> Result<Action, KubeError> {
        let name = t.name_any();
        let mut changes = self.manager.subscribe();
        if self.manager.get(&name).is_ok() {
            tracing::info!(task = %name, "Task deleted; stopping its task");
            self.manager.delete(&name).await?;
            while self.manager.get(&name).is_ok() {
                // A missed change costs at most a second.
                let _ = tokio::time::timeout(Duration::from_secs(1), changes.recv()).await;
            }
        }
        // Before the finalizer goes: the DELETED event that follows finds nothing to do.
        self.forget(&name);
        tracing::info!(task = %name, "task stopped; removing the finalizer");
        Ok(Action::await_change())
    }

    /// Drops what is known about `name`; true if it stood for a manager task.
    pub(super) fn forget(&self, name: &str) -> bool {
        let mut st = self.state();
        st.written.remove(name);
        st.ignored.remove(name);
        st.failures.remove(name);
        st.owned.remove(name)
    }

    /// The status as last written by us (if it is this object's) or as the object shows it.
    pub(super) fn last_status(&self, t: &Task) -> Option<TaskCrStatus> {
        let st = self.state();
        st.written
            .get(&t.name_any())
            .filter(|w| w.uid == t.metadata.uid)
            .map(|w| w.status.clone())
            .or_else(|| t.status.clone())
    }
}
