//! The task manager: create / delete / sync / list over the store and the runtimes. It sits
//! above the runtimes (it drives them) and below the API and the Kubernetes integration.
//!
//! Locking: the map lock is held only to look up, insert or remove entries, never across
//! I/O. Each entry has a lifecycle lock that serialises start and stop of that task, and a
//! small state lock for its status. Exit events from runtimes arrive on one channel.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{broadcast, mpsc};

mod census;
pub mod error;

pub use error::ManagerError;

use crate::runtime::{
    EventSink, Observed, Readiness, RuntimeError, RuntimeEvent, Runtimes, TaskRef,
};
use crate::task::model::{self, TaskSpec, TaskState, Terminated};
use crate::task::name;
use crate::task::store::{Store, TaskRecord};
use crate::task::time::Time;

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub stop_grace: Duration,
    /// `None`: unlimited.
    pub max_concurrent: Option<usize>,
}

/// A consistent copy of one task, for the API.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskView {
    pub name: String,
    pub spec: TaskSpec,
    pub state: TaskState,
    pub deletion_timestamp: Option<Time>,
}

struct Entry {
    record: Mutex<TaskRecord>,
    state: Mutex<TaskState>,
    /// Held while the task starts or stops, so a delete waits for a start in flight.
    lifecycle: tokio::sync::Mutex<()>,
}

impl Entry {
    fn new(record: TaskRecord, state: TaskState) -> Arc<Entry> {
        Arc::new(Entry {
            record: Mutex::new(record),
            state: Mutex::new(state),
            lifecycle: tokio::sync::Mutex::new(()),
        })
    }

    /// The record; a panic elsewhere while it was held leaves it usable (no poisoning).
    fn record(&self) -> std::sync::MutexGuard<'_, TaskRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TaskState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn view(&self) -> TaskView {
        // State before record, as `apply` takes them: the opposite order deadlocks.
        let state = self.state().clone();
        let rec = self.record();
        TaskView {
            name: rec.name.clone(),
            spec: rec.spec.clone(),
            state,
            deletion_timestamp: rec.deletion_timestamp,
        }
    }

    fn uid(&self) -> String {
        self.record().uid.clone()
    }

    fn is_active(&self) -> bool {
        let deleting = self.record().deletion_timestamp.is_some();
        !deleting && !self.state().is_terminated()
    }
}

pub struct Manager {
    store: Store,
    runtimes: Runtimes,
    cfg: ManagerConfig,
    tasks: RwLock<HashMap<String, Arc<Entry>>>,
    events: EventSink,
    uid_seq: AtomicU64,
    /// Names of tasks whose view changed (state, deletion mark, removal).
    changes: broadcast::Sender<String>,
}

impl Manager {
    /// Builds the manager and starts its event loop.
    pub fn new(store: Store, runtimes: Runtimes, cfg: ManagerConfig) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mgr = Arc::new(Manager {
            store,
            runtimes,
            cfg,
            tasks: RwLock::new(HashMap::new()),
            events: tx,
            uid_seq: AtomicU64::new(0),
            changes: broadcast::channel(1024).0,
        });
        tokio::spawn(event_loop(Arc::downgrade(&mgr), rx));
        mgr
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Names of tasks as their view changes; a lagging receiver should re-list.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    fn changed(&self, name: &str) {
        let _ = self.changes.send(name.to_string());
    }

    /// Loads every stored task and re-attaches to it (or finishes its deletion).
    pub async fn recover(self: &Arc<Self>) -> Result<usize, ManagerError> {
        let store = self.store.clone();
        let records = tokio::task::spawn_blocking(move || store.load_all())
            .await
            .map_err(std::io::Error::other)??;
        let n = records.len();
        let mut adopt = Vec::new();
        for rec in records {
            let state = match &rec.final_status {
                Some(t) => TaskState::Terminated(t.clone()),
                None => TaskState::initialized(),
            };
            let deleting = rec.deletion_timestamp.is_some();
            let has_final = rec.final_status.is_some();
            let entry = Entry::new(rec.clone(), state);
            self.write_tasks().insert(rec.name.clone(), entry.clone());
            if deleting {
                self.spawn_finalize(entry);
            } else if !has_final {
                adopt.push(entry);
            }
        }
        futures::stream::iter(adopt)
            .for_each_concurrent(32, |entry| {
                let mgr = self.clone();
                async move {
                    let _life = entry.lifecycle.lock().await;
                    mgr.run(&entry, true).await;
                }
            })
            .await;
        tracing::info!(tasks = n, "recovered tasks from the data dir");
        Ok(n)
    }

    pub fn get(&self, name: &str) -> Result<TaskView, ManagerError> {
        self.read_tasks()
            .get(name)
            .map(|e| e.view())
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))
    }

    /// All tasks, ordered by name.
    pub fn list(&self) -> Vec<TaskView> {
        let mut out = Vec::new();
        self.for_each_sorted(|v| out.push(v));
        out
    }

    /// Visits every task in name order, one view at a time (no copy of the whole set).
    pub fn for_each_sorted(&self, mut f: impl FnMut(TaskView)) {
        let mut entries: Vec<(String, Arc<Entry>)> = self
            .read_tasks()
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (_, e) in entries {
            f(e.view());
        }
    }

    pub async fn create(
        self: &Arc<Self>,
        name: String,
        spec: TaskSpec,
    ) -> Result<TaskView, ManagerError> {
        self.validate(&name, &spec)?;
        let entry = self.reserve(&name, spec)?;
        self.start_reserved(entry).await
    }

    /// Declarative sync: create what is missing, delete what is not listed, leave the rest.
    pub async fn sync(
        self: &Arc<Self>,
        desired: Vec<(String, TaskSpec)>,
    ) -> Result<Vec<TaskView>, ManagerError> {
        // Validate everything first so a bad element changes nothing.
        let mut wanted: Vec<(String, TaskSpec)> = Vec::new();
        for (name, spec) in desired {
            self.validate(&name, &spec)?;
            // Upstream semantics: a later duplicate replaces an earlier one.
            wanted.retain(|(n, _)| n != &name);
            wanted.push((name, spec));
        }
        let names: HashSet<&str> = wanted.iter().map(|(n, _)| n.as_str()).collect();
        let (to_delete, to_create): (Vec<String>, Vec<(String, TaskSpec)>) = {
            let tasks = self.read_tasks();
            let del = tasks
                .keys()
                .filter(|n| !names.contains(n.as_str()))
                .cloned()
                .collect();
            let new = wanted
                .iter()
                .filter(|(n, _)| !tasks.contains_key(n))
                .cloned()
                .collect();
            (del, new)
        };
        for name in to_delete {
            self.delete(&name).await?;
        }
        let mut reserved = Vec::new();
        for (name, spec) in to_create {
            match self.reserve(&name, spec) {
                Ok(e) => reserved.push(e),
                Err(ManagerError::AlreadyExists(_)) => {} // created concurrently: leave it alone
                Err(e) => {
                    // Undo the reservations of this call: nothing was started yet.
                    for e in reserved {
                        self.unreserve(&e);
                    }
                    return Err(e);
                }
            }
        }
        let results =
            futures::future::join_all(reserved.into_iter().map(|e| self.start_reserved(e))).await;
        if let Some(err) = results.into_iter().find_map(Result::err) {
            return Err(err);
        }
        Ok(self.list())
    }

    /// Marks the task for deletion and stops it in the background; unknown names are fine.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), ManagerError> {
        let Some(entry) = self.read_tasks().get(name).cloned() else {
            return Ok(());
        };
        let rec = {
            let mut rec = entry.record();
            if rec.deletion_timestamp.is_some() {
                return Ok(());
            }
            rec.deletion_timestamp = Some(Time::now());
            rec.clone()
        };
        // Durable before answering, so a restart finishes the deletion.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.update(&rec))
            .await
            .map_err(std::io::Error::other)??;
        tracing::info!(task = name, "deletion requested");
        self.changed(name);
        self.spawn_finalize(entry);
        Ok(())
    }

    /// Ready when every runtime's dependencies are.
    pub async fn readiness(&self) -> Readiness {
        for rt in self.runtimes.all() {
            if let Readiness::NotReady(why) = rt.readiness().await {
                return Readiness::NotReady(why);
            }
        }
        Readiness::Ready
    }

    fn validate(&self, task_name: &str, spec: &TaskSpec) -> Result<(), ManagerError> {
        if let Some(why) = name::invalid_reason(task_name) {
            return Err(ManagerError::InvalidName(why));
        }
        spec.validate().map_err(ManagerError::InvalidSpec)?;
        self.runtimes.for_spec(spec)?.validate(spec)?;
        Ok(())
    }

    /// Inserts a waiting entry, enforcing uniqueness and the concurrency limit.
    fn reserve(&self, name: &str, spec: TaskSpec) -> Result<Arc<Entry>, ManagerError> {
        let mut tasks = self.write_tasks();
        if tasks.contains_key(name) {
            return Err(ManagerError::AlreadyExists(name.to_string()));
        }
        if let Some(max) = self.cfg.max_concurrent
            && tasks.values().filter(|e| e.is_active()).count() >= max
        {
            return Err(ManagerError::TooManyTasks(max));
        }
        let seq = self.uid_seq.fetch_add(1, Ordering::Relaxed);
        let rec = TaskRecord {
            name: name.to_string(),
            uid: format!(
                "{:x}-{:x}-{seq}",
                Time::now().unix_millis(),
                std::process::id()
            ),
            spec,
            created_at: Time::now(),
            deletion_timestamp: None,
            final_status: None,
        };
        let entry = Entry::new(rec, TaskState::initialized());
        tasks.insert(name.to_string(), entry.clone());
        Ok(entry)
    }

    fn unreserve(&self, entry: &Arc<Entry>) {
        let name = entry.record().name.clone();
        let mut tasks = self.write_tasks();
        if tasks.get(&name).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            tasks.remove(&name);
        }
    }

    /// Persists a reserved entry, then starts it. The record is durable before any answer.
    async fn start_reserved(self: &Arc<Self>, entry: Arc<Entry>) -> Result<TaskView, ManagerError> {
        let _life = entry.lifecycle.lock().await;
        let rec = entry.record().clone();
        let store = self.store.clone();
        let created = tokio::task::spawn_blocking(move || store.create(&rec))
            .await
            .map_err(std::io::Error::other)?;
        if let Err(e) = created {
            self.unreserve(&entry);
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => ManagerError::AlreadyExists(entry.view().name),
                _ => ManagerError::Store(e),
            });
        }
        self.run(&entry, false).await;
        Ok(entry.view())
    }

    /// Starts (or, after a restart, adopts) the task and records what the runtime saw.
    async fn run(&self, entry: &Arc<Entry>, adopt: bool) {
        let task = self.task_ref(entry);
        let name = task.name.clone();
        let result = match self.runtimes.for_spec(&task.spec) {
            Ok(rt) if adopt => rt.adopt(task, self.events.clone()).await,
            Ok(rt) => rt.start(task, self.events.clone()).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(observed) => self.apply(entry, observed),
            Err(e) => self.fail(entry, &e).await,
        }
        tracing::debug!(task = %name, "start finished");
    }

    /// The task could not be run: keep the reason, durably, instead of retrying forever.
    async fn fail(&self, entry: &Arc<Entry>, err: &RuntimeError) {
        let t = Terminated::failed_to_start(err.task_reason(), 128, err.to_string());
        let rec = {
            let mut rec = entry.record();
            rec.final_status = Some(t.clone());
            rec.clone()
        };
        let store = self.store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.update(&rec)).await {
            tracing::error!(task = %entry.view().name, error = %e, "could not persist the start failure");
        }
        self.apply(entry, Observed::Terminated(t));
    }

    fn apply(&self, entry: &Entry, observed: Observed) {
        let new = match observed {
            Observed::Running { started_at } => TaskState::Running(model::Running { started_at }),
            Observed::Terminated(t) => TaskState::Terminated(t),
        };
        let mut state = entry.state();
        if new.rank() <= state.rank() {
            return; // states only move forward; a late "running" never hides an exit
        }
        let name = entry.record().name.clone();
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
        let entry = self.read_tasks().get(&ev.name).cloned();
        if let Some(entry) = entry.filter(|e| e.uid() == ev.uid) {
            self.apply(&entry, ev.observed);
        }
    }

    fn spawn_finalize(self: &Arc<Self>, entry: Arc<Entry>) {
        let mgr = self.clone();
        tokio::spawn(async move { mgr.finalize(entry).await });
    }

    /// Stops the task (retrying on runtime errors), then forgets it.
    async fn finalize(&self, entry: Arc<Entry>) {
        let _life = entry.lifecycle.lock().await;
        let task = self.task_ref(&entry);
        let name = task.name.clone();
        let mut backoff = Duration::from_millis(500);
        loop {
            let stopped = match self.runtimes.for_spec(&task.spec) {
                Ok(rt) => rt.stop(task.clone(), self.cfg.stop_grace).await,
                Err(_) => Ok(()), // its runtime is off now: nothing of ours can be running
            };
            match stopped {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(task = %name, error = %e, retry_in = ?backoff, "stopping the task failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        let store = self.store.clone();
        let n = name.clone();
        match tokio::task::spawn_blocking(move || store.remove(&n)).await {
            Ok(Ok(())) => {}
            other => {
                tracing::error!(task = %name, result = ?other, "could not remove the task directory")
            }
        }
        let mut tasks = self.write_tasks();
        if tasks.get(&name).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
            tasks.remove(&name);
        }
        tracing::info!(task = %name, "task deleted");
        self.changed(&name);
    }

    fn task_ref(&self, entry: &Entry) -> TaskRef {
        let rec = entry.record();
        TaskRef {
            name: rec.name.clone(),
            uid: rec.uid.clone(),
            dir: self.store.dir(&rec.name),
            spec: rec.spec.clone(),
        }
    }

    fn read_tasks(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Entry>>> {
        self.tasks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_tasks(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Entry>>> {
        self.tasks.write().unwrap_or_else(|e| e.into_inner())
    }
}

async fn event_loop(mgr: Weak<Manager>, mut rx: mpsc::UnboundedReceiver<RuntimeEvent>) {
    while let Some(ev) = rx.recv().await {
        let Some(mgr) = mgr.upgrade() else { return };
        mgr.on_event(ev);
    }
}
