//! `--watch-tasks`: runs the Task objects addressed to this pod through the same manager as
//! the HTTP API, and reports their state in each Task's `/status`.
//!
//! * Selection: label `task-executor.io/pod=<pod>` (the API server cannot select on spec
//!   fields of a custom resource), and `spec.podName` must name this pod too.
//! * A new name is created in the manager; a name the manager already has is adopted, never
//!   re-run (restarts, re-lists). Spec changes of a running or finished Task are ignored.
//! * The finalizer `task-executor.io/stop` is added before a task starts and removed once a
//!   deleted Task's processes are gone.
//! * Status: a merge patch of `/status` each time the manager's view changes.
//! * Tasks created over HTTP are not mirrored into the cluster.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ::kube::api::{Patch, PatchParams};
use ::kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::KubeError;
use super::crd::{FINALIZER, POD_LABEL, Task, TaskCrStatus};
use super::listwatch::{self, Event, Selector};
use crate::manager::Manager;
use crate::manager::ManagerError;
use crate::task::model::{TaskState, Terminated};

/// Reasons the watcher itself gives in a Task's status (the manager gives all others).
pub mod reason {
    /// The spec was refused (invalid, or needs a mode this agent lacks).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Waiting for a free slot (`--max-concurrent-tasks`).
    pub const TOO_MANY_TASKS: &str = "TooManyTasks";
    /// The status says the task ran, but this agent has no record of it.
    pub const TASK_LOST: &str = "TaskLost";
    /// Deleted through the HTTP API while its Task object remains.
    pub const DELETED: &str = "TaskDeleted";
}

/// How often a Task refused for `TooManyTasks` is tried again.
const RETRY_FULL: Duration = Duration::from_secs(2);

/// Starts watching Tasks for `pod` in `namespace`, in the background, until the process ends.
pub fn spawn(namespace: String, pod: String, manager: Arc<Manager>) {
    tokio::spawn(async move {
        let client = loop {
            match super::client().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "no kubernetes client for the task watch; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        let watcher = TaskWatcher::new(Api::namespaced(client, &namespace), pod, manager);
        tracing::info!(namespace = %namespace, pod = %watcher.pod, "watching Task objects");
        watcher.run().await;
    });
}

/// The Task object as last seen (watch event or our own patch's answer).
#[derive(Clone, Debug, Default)]
pub(super) struct Known {
    uid: Option<String>,
    pub(super) status: Option<TaskCrStatus>,
    pub(super) generation: Option<i64>,
    /// Of the newest copy seen; an older event (one that crossed our own patch) must not
    /// replace a newer status.
    resource_version: Option<u64>,
}

impl Known {
    /// Takes `t`'s status unless a newer copy was already seen.
    pub(super) fn update(&mut self, t: &Task) {
        let rv = t
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok());
        if let (Some(seen), Some(new)) = (self.resource_version, rv)
            && new < seen
        {
            return;
        }
        self.resource_version = rv;
        self.status = t.status.clone();
        self.generation = t.metadata.generation;
    }
}

#[derive(Default)]
pub(super) struct State {
    /// Manager tasks that a Task object stands for.
    pub(super) owned: HashSet<String>,
    pub(super) known: HashMap<String, Known>,
    /// Deleted Tasks whose processes are being stopped.
    pub(super) finalizing: HashSet<String>,
    /// UIDs of deleted Tasks already finalized, until the object is gone: a late event
    /// still carrying our finalizer must not finalize (and patch) it a second time.
    finalized: HashSet<String>,
    /// Tasks whose start is in flight.
    creating: HashSet<String>,
    /// Last generation whose spec change was reported as ignored.
    ignored: HashMap<String, i64>,
}

pub struct TaskWatcher {
    pub(super) api: Api<Task>,
    pod: String,
    pub(super) manager: Arc<Manager>,
    state: Mutex<State>,
    /// Serialises status writes, so two writers never both patch the same change.
    pub(super) reporting: tokio::sync::Mutex<()>,
}

impl TaskWatcher {
    pub fn new(api: Api<Task>, pod: String, manager: Arc<Manager>) -> Arc<Self> {
        Arc::new(TaskWatcher {
            api,
            pod,
            manager,
            state: Mutex::new(State::default()),
            reporting: tokio::sync::Mutex::new(()),
        })
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reconciles Task events and reports manager changes until either source ends.
    pub async fn run(self: Arc<Self>) {
        let mut changes = self.manager.subscribe();
        let selector = Selector {
            labels: Some(format!("{POD_LABEL}={}", self.pod)),
            fields: None,
        };
        let mut events = listwatch::spawn(self.api.clone(), selector, "task");
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => return,
                },
                ch = changes.recv() => match ch {
                    Ok(name) => self.sync_status(&name).await,
                    Err(RecvError::Lagged(_)) => {
                        let names: Vec<String> = self.state().owned.iter().cloned().collect();
                        for name in names {
                            self.sync_status(&name).await;
                        }
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }

    async fn on_event(self: &Arc<Self>, ev: Event<Task>) {
        match ev {
            Event::Listed(items) => {
                let names: HashSet<String> = items.iter().map(|t| t.name_any()).collect();
                let uids: HashSet<String> = items
                    .iter()
                    .filter_map(|t| t.metadata.uid.clone())
                    .collect();
                self.state().finalized.retain(|u| uids.contains(u));
                tracing::debug!(tasks = items.len(), "listed Task objects");
                for t in items {
                    self.apply(t).await;
                }
                // Task objects that vanished while no watch was open (finalizer removed by
                // someone else): their tasks go too.
                let gone: Vec<String> = {
                    let st = self.state();
                    st.owned
                        .iter()
                        .filter(|n| !names.contains(*n) && !st.finalizing.contains(*n))
                        .cloned()
                        .collect()
                };
                for name in gone {
                    self.forget_and_delete(&name).await;
                }
            }
            Event::Applied(t) => self.apply(t).await,
            Event::Deleted(t) => {
                if let Some(uid) = &t.metadata.uid {
                    self.state().finalized.remove(uid);
                }
                if t.metadata.deletion_timestamp.is_none() && has_finalizer(&t) {
                    // Still exists but no longer carries our label: not ours any more.
                    tracing::warn!(task = %t.name_any(), "Task no longer selects this pod; its task is left as it is");
                    self.state().known.remove(&t.name_any());
                    return;
                }
                self.forget_and_delete(&t.name_any()).await;
            }
        }
    }

    async fn forget_and_delete(&self, name: &str) {
        let owned = {
            let mut st = self.state();
            st.known.remove(name);
            st.ignored.remove(name);
            st.owned.remove(name)
        };
        if owned {
            tracing::info!(task = name, "Task object is gone; deleting its task");
            if let Err(e) = self.manager.delete(name).await {
                tracing::warn!(task = name, error = %e, "deleting the task failed");
            }
        }
    }

    async fn apply(self: &Arc<Self>, t: Task) {
        let name = t.name_any();
        tracing::debug!(task = %name, generation = ?t.metadata.generation, resource_version = ?t.metadata.resource_version, deleting = t.metadata.deletion_timestamp.is_some(), "Task event");
        if t.spec.pod_name != self.pod {
            tracing::debug!(task = %name, pod = %t.spec.pod_name, "Task is for another pod");
            return;
        }
        {
            let mut st = self.state();
            let known = st.known.entry(name.clone()).or_default();
            if known.uid.is_some() && known.uid != t.metadata.uid {
                // A new object under an old name: its status starts over.
                *known = Known::default();
            }
            known.uid = t.metadata.uid.clone();
            known.update(&t);
        }
        if t.metadata.deletion_timestamp.is_some() {
            if has_finalizer(&t) {
                let uid = t.metadata.uid.clone().unwrap_or_default();
                let mut st = self.state();
                if !st.finalized.contains(&uid) && st.finalizing.insert(name.clone()) {
                    drop(st);
                    let me = self.clone();
                    tokio::spawn(async move { me.finalize(name, uid).await });
                }
            } else {
                self.forget_and_delete(&name).await;
            }
            return;
        }
        match self.manager.get(&name) {
            Ok(view) => {
                let adopted = self.state().owned.insert(name.clone());
                if adopted {
                    tracing::info!(task = %name, state = view.state.name(), "adopted task for its Task object");
                }
                self.note_ignored_update(&t, &view.spec);
                if let Err(e) = self.ensure_finalizer(&t).await {
                    tracing::warn!(task = %name, error = %e, "cannot add the finalizer");
                }
                self.sync_status(&name).await;
            }
            Err(_) => {
                let (owned, creating) = {
                    let st = self.state();
                    (st.owned.contains(&name), st.creating.contains(&name))
                };
                if creating {
                    return;
                }
                if owned {
                    // Ran here and was deleted through the HTTP API: not run again.
                    self.sync_status(&name).await;
                    return;
                }
                if t.status.as_ref().is_some_and(TaskCrStatus::has_run) {
                    self.mark_lost(&t).await;
                    return;
                }
                {
                    let mut st = self.state();
                    st.owned.insert(name.clone());
                    st.creating.insert(name.clone());
                }
                let me = self.clone();
                tokio::spawn(async move { me.create(t).await });
            }
        }
    }

    fn note_ignored_update(&self, t: &Task, running: &crate::task::model::TaskSpec) {
        if t.spec.task == *running {
            return;
        }
        let generation = t.metadata.generation.unwrap_or_default();
        let mut st = self.state();
        if st.ignored.get(&t.name_any()) != Some(&generation) {
            st.ignored.insert(t.name_any(), generation);
            tracing::info!(task = %t.name_any(), generation, "Task spec changed; a started task is never re-run, the change is ignored");
        }
    }

    /// Adds the finalizer, then starts the task (retrying while the agent is full).
    async fn create(self: Arc<Self>, t: Task) {
        let name = t.name_any();
        let mut backoff = Duration::from_millis(500);
        while let Err(e) = self.ensure_finalizer(&t).await {
            tracing::warn!(task = %name, error = %e, retry_in = ?backoff, "cannot add the finalizer; not starting yet");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            if !self.still_wanted(&name) {
                self.state().creating.remove(&name);
                return;
            }
        }
        let mut reported_full = false;
        loop {
            match self.manager.create(name.clone(), t.task_spec()).await {
                Ok(_) | Err(ManagerError::AlreadyExists(_)) => break,
                Err(ManagerError::TooManyTasks(max)) => {
                    if !reported_full {
                        reported_full = true;
                        tracing::info!(task = %name, max, "agent is full; the task waits");
                        let waiting = TaskState::Waiting(crate::task::model::Waiting {
                            reason: Some(reason::TOO_MANY_TASKS.into()),
                            message: Some(format!("maximum concurrent tasks ({max}) reached")),
                        });
                        self.report(&name, &waiting).await;
                    }
                    tokio::time::sleep(RETRY_FULL).await;
                    if !self.still_wanted(&name) {
                        break;
                    }
                }
                Err(e) => {
                    let why = match e {
                        ManagerError::InvalidName(_)
                        | ManagerError::InvalidSpec(_)
                        | ManagerError::Runtime(_) => reason::INVALID_SPEC,
                        _ => crate::task::model::reason::RUNTIME_ERROR,
                    };
                    tracing::warn!(task = %name, error = %e, "Task refused");
                    let failed =
                        TaskState::Terminated(Terminated::failed_to_start(why, 128, e.to_string()));
                    self.report(&name, &failed).await;
                    break;
                }
            }
        }
        // Running/terminated reach the status through the manager's change events.
        self.state().creating.remove(&name);
    }

    fn still_wanted(&self, name: &str) -> bool {
        let st = self.state();
        st.known.contains_key(name) && !st.finalizing.contains(name)
    }

    /// Stops a deleted Task's task, then removes the finalizer.
    async fn finalize(self: Arc<Self>, name: String, uid: String) {
        let mut changes = self.manager.subscribe();
        if self.manager.get(&name).is_ok() {
            tracing::info!(task = %name, "Task deleted; stopping its task");
            if let Err(e) = self.manager.delete(&name).await {
                tracing::warn!(task = %name, error = %e, "deleting the task failed");
            }
            while self.manager.get(&name).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(1), changes.recv()).await;
            }
        }
        // Before the finalizer goes: the DELETED event that follows finds nothing to do.
        self.state().owned.remove(&name);
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.remove_finalizer(&name).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(task = %name, error = %e, retry_in = ?backoff, "cannot remove the finalizer");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        {
            let mut st = self.state();
            st.finalized.insert(uid);
            st.finalizing.remove(&name);
            st.owned.remove(&name);
            st.known.remove(&name);
            st.ignored.remove(&name);
        }
        tracing::info!(task = %name, "task stopped; finalizer removed");
    }

    async fn ensure_finalizer(&self, t: &Task) -> Result<(), KubeError> {
        if has_finalizer(t) {
            return Ok(());
        }
        self.edit_finalizers(&t.name_any(), true).await
    }

    async fn remove_finalizer(&self, name: &str) -> Result<(), KubeError> {
        self.edit_finalizers(name, false).await
    }

    /// Adds or removes our finalizer with a merge patch guarded by the resource version;
    /// on a conflict, reads the object again and retries.
    async fn edit_finalizers(&self, name: &str, add: bool) -> Result<(), KubeError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(t) = self.api.get_opt(name).await? else {
                return Ok(()); // gone: nothing to hold back
            };
            let mut finalizers: Vec<String> = t.finalizers().to_vec();
            let present = finalizers.iter().any(|f| f == FINALIZER);
            if present == add {
                return Ok(());
            }
            if add {
                finalizers.push(FINALIZER.to_string());
            } else {
                finalizers.retain(|f| f != FINALIZER);
            }
            let patch = json!({"metadata": {
                "finalizers": finalizers,
                "resourceVersion": t.resource_version(),
            }});
            match self
                .api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::debug!(task = name, add, "finalizer updated");
                    return Ok(());
                }
                Err(::kube::Error::Api(s)) if s.code == 409 && attempt < 5 => continue,
                Err(::kube::Error::Api(s)) if s.code == 404 => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn has_finalizer(t: &Task) -> bool {
    t.finalizers().iter().any(|f| f == FINALIZER)
}
