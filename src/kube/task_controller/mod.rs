//! `--watch-tasks`: runs the Task objects addressed to this pod through the same manager as
//! the HTTP API, and reports their state in each Task's `/status` and as Kubernetes Events.
//!
//! Built on kube's runtime: `watcher` (list, watch, 410 Gone re-list, default backoff) feeds
//! a reflector store and kube's `applier`, which runs [`reconcile`] once per object at a time,
//! with retries; the `finalizer` helper adds `task-executor.io/stop` before a task starts and
//! removes it once a deleted Task's processes are gone; status is written by server-side
//! apply. The manager's change events trigger the same reconcile, so every status write of
//! a Task is serialised with its other work.
//!
//! * Selection: label `task-executor.io/pod=<pod>` (the API server cannot select on spec
//!   fields of a custom resource), and `spec.podName` must name this pod too.
//! * A new name is created in the manager; a name the manager already has is adopted, never
//!   re-run (restarts, re-lists). Spec changes of a running or finished Task are ignored.
//! * Tasks created over HTTP are not mirrored into the cluster.

mod reconcile;
mod relist;
mod status;

#[cfg(test)]
mod field_tests;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::kube::runtime::reflector::{self, ObjectRef};
use ::kube::runtime::watcher::Event;
use ::kube::runtime::{WatchStreamExt, applier, watcher};
use ::kube::{Api, ResourceExt};
use futures::{Stream, StreamExt, future, stream};
use tokio::sync::broadcast::error::RecvError;

use super::crd::{POD_LABEL, Task, TaskCrStatus};
use super::events::EventSink;
use super::{KubeClient, KubeTimeouts, watch_stream};
use crate::manager::Manager;

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

/// How long a finalized Task's UID is remembered (see `State::finalized`).
const FINALIZED_MEMORY: Duration = Duration::from_secs(600);

/// The field manager of the agent's status writes (server-side apply).
pub const FIELD_MANAGER: &str = "task-executor";

/// Starts watching Tasks for `pod` in `namespace`, in the background, until the process ends.
pub fn start(
    client: KubeClient,
    namespace: String,
    pod: String,
    manager: Arc<Manager>,
    events: EventSink,
) {
    tokio::spawn(async move {
        let api = Api::namespaced(client.wait("task watch").await, &namespace);
        let watcher = TaskWatcher::new(api, namespace.clone(), pod, manager, events);
        tracing::info!(namespace = %namespace, pod = %watcher.pod, "watching Task objects");
        watcher.run(client.timeouts()).await;
    });
}

/// What the agent last wrote into (or found in) a Task's status.
#[derive(Clone, Debug)]
pub(super) struct Written {
    uid: Option<String>,
    status: TaskCrStatus,
}

#[derive(Default)]
pub(super) struct State {
    /// Manager tasks that a Task object stands for (created for it or adopted by it).
    owned: HashSet<String>,
    /// Per Task name. Compared with what is to be written, so each change is written once;
    /// no resource versions are compared (they are opaque strings).
    written: HashMap<String, Written>,
    /// Last generation whose spec change was logged as ignored.
    ignored: HashMap<String, i64>,
    /// Consecutive failed reconciles per Task, for the retry delay.
    failures: HashMap<String, u32>,
    /// Names and UIDs received since the watcher's `Init`, until its `InitDone`.
    listing: Option<HashSet<String>>,
    listed_uids: HashSet<String>,
    /// UIDs of deleted Tasks whose finalizer we removed, and when: a copy from before the
    /// removal (a trigger queued meanwhile, before the reflector saw the object go) must not
    /// be finalized a second time. Kept for [`FINALIZED_MEMORY`], or until a re-list shows
    /// the object gone; not dropped on the `Delete` event, which is seen before the
    /// reflector's store forgets the object.
    finalized: HashMap<String, Instant>,
}

pub struct TaskWatcher {
    api: Api<Task>,
    namespace: String,
    pod: String,
    manager: Arc<Manager>,
    events: EventSink,
    state: Mutex<State>,
}

impl TaskWatcher {
    pub fn new(
        api: Api<Task>,
        namespace: String,
        pod: String,
        manager: Arc<Manager>,
        events: EventSink,
    ) -> Arc<Self> {
        Arc::new(TaskWatcher {
            api,
            namespace,
            pod,
            manager,
            events,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reconciles Tasks as they change and as their tasks change, until the manager goes.
    pub async fn run(self: Arc<Self>, timeouts: KubeTimeouts) {
        let changes = self.manager_changes();
        let (store, writer) = reflector::store();
        let config = watch_stream::config(timeouts).labels(&format!("{POD_LABEL}={}", self.pod));
        let me = self.clone();
        let tasks = watch_stream::watch(self.api.clone(), config, "task")
            .then(move |ev| {
                let me = me.clone();
                async move {
                    if let Ok(ev) = &ev {
                        me.observe(ev).await;
                    }
                    ev
                }
            })
            .reflect(writer)
            .scan(Vec::new(), |listed, ev| {
                future::ready(Some(stream::iter(triggers(listed, ev))))
            })
            .flatten();
        let queue = stream::select(tasks, changes);
        applier(
            |task, me: Arc<Self>| Box::pin(reconcile::reconcile(task, me)),
            reconcile::error_policy,
            self.clone(),
            store,
            queue,
            ::kube::runtime::Config::default(),
        )
        .for_each(|res| async move {
            use ::kube::runtime::controller::Error;
            match res {
                Ok((obj, action)) => tracing::trace!(task = %obj.name, ?action, "reconciled"),
                // Logged by the error policy (reconcile) or the watch (queue).
                Err(Error::ReconcilerFailed(..) | Error::QueueError(_)) => {}
                // A manager change of a Task that is gone: nothing to do.
                Err(Error::ObjectNotFound(obj)) => tracing::trace!(task = %obj.name, "Task gone"),
                Err(e @ Error::RunnerError(_)) => tracing::warn!(error = %e, "Task reconciler"),
            }
        })
        .await;
    }

    /// Names of owned tasks whose state changed in the manager, as Task references; all
    /// owned ones when the receiver lagged.
    fn manager_changes(
        self: &Arc<Self>,
    ) -> impl Stream<Item = Result<ObjectRef<Task>, watcher::Error>> + Send + use<> {
        let rx = self.manager.subscribe();
        let me = self.clone();
        stream::unfold((rx, me), |(mut rx, me)| async move {
            let names: Vec<String> = match rx.recv().await {
                Ok(name) => vec![name],
                Err(RecvError::Lagged(_)) => me.state().owned.iter().cloned().collect(),
                Err(RecvError::Closed) => return None,
            };
            let refs: Vec<ObjectRef<Task>> = {
                let st = me.state();
                names
                    .into_iter()
                    .filter(|n| st.owned.contains(n))
                    .map(|n| ObjectRef::new(&n).within(&me.namespace))
                    .collect()
            };
            Some((stream::iter(refs.into_iter().map(Ok)), (rx, me)))
        })
        .flatten()
    }

    /// Logs (once per generation) that a Task's spec changed after its task started.
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
}

/// The Tasks to reconcile for one watcher event (after the reflector stored it). A re-list's
/// objects are triggered at its end: kube's reflector store only holds them from `InitDone`
/// on, and the applier drops a request for an object not in the store (`ObjectNotFound`),
/// so a Task first seen in a re-list would otherwise wait for its next change.
fn triggers(
    listed: &mut Vec<ObjectRef<Task>>,
    ev: Result<Event<Task>, watcher::Error>,
) -> Vec<Result<ObjectRef<Task>, watcher::Error>> {
    match ev {
        Ok(Event::Apply(t)) => vec![Ok(ObjectRef::from(&t))],
        Ok(Event::Init) => {
            listed.clear();
            Vec::new()
        }
        Ok(Event::InitApply(t)) => {
            listed.push(ObjectRef::from(&t));
            Vec::new()
        }
        Ok(Event::InitDone) => listed.drain(..).map(Ok).collect(),
        Ok(Event::Delete(_)) => Vec::new(),
        Err(e) => vec![Err(e)],
    }
}
