//! The task manager: create / delete / sync / list over the store and the runtimes. It sits
//! above the runtimes (it drives them) and below the API and the Kubernetes integration.
//!
//! Locking: the map lock is held only to look up, insert or remove entries, never across
//! I/O. Each entry has a lifecycle lock that serialises start, stop and record rewrites of
//! that task, and a small state lock for its status. Exit events from runtimes arrive on
//! one channel.
//!
//! Work that changes tasks (create, sync, delete) runs in tasks of its own, not in the
//! caller's future: a client that disconnects mid-request cancels its wait for the answer,
//! never the work, so a durable record is always started and a durable deletion marker is
//! always followed through. Syncs run one at a time (`syncing`), each reserving every name
//! it creates before it deletes anything, so a sync that fails changes nothing and two
//! overlapping ones leave one's set.

mod backoff;
mod census;
mod create;
mod delete;
mod entry;
pub mod error;
mod events;
mod packed;
mod recover;
mod start;
mod tasks;
#[cfg(test)]
mod tests;
mod turn;
mod uids;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};

pub use census::UsageListing;
pub use entry::{Render, TaskView};
pub use error::ManagerError;

use self::entry::{Entry, Kind};
use self::tasks::Tasks;
use crate::runtime::{EventSink, Readiness, Runtime, RuntimeError, Runtimes, TaskRef};
use crate::task::identity::UidRange;
use crate::task::model::TaskSpec;
use crate::task::policy::TaskPolicy;
use crate::task::store::Store;

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub stop_grace: Duration,
    /// `None`: unlimited.
    pub max_concurrent: Option<usize>,
    /// How long a task whose start failed for lack of processes, file descriptors, memory
    /// or disk is retried (waiting, `ResourcesExhausted`) before it ends `StartFailed`.
    pub start_retry: Duration,
    /// `--task-uid-range`: each task with a command in the agent's container gets a uid
    /// of its own from it. `None`: they run as the runtime's default user.
    pub task_uids: Option<UidRange>,
    /// `--task-policy` and its allowlists: what a request may ask for.
    pub policy: TaskPolicy,
}

impl ManagerConfig {
    pub const DEFAULT_START_RETRY: Duration = Duration::from_secs(300);
}

pub struct Manager {
    store: Store,
    runtimes: Runtimes,
    cfg: ManagerConfig,
    tasks: RwLock<Tasks>,
    events: EventSink,
    uid_seq: AtomicU64,
    /// The task uids held, with `--task-uid-range` (locked after `tasks` when both are).
    host_uids: Option<Mutex<uids::UidPool>>,
    /// Names of tasks whose view changed (state, deletion mark, removal).
    changes: broadcast::Sender<String>,
    /// Held by a sync from its first look at the tasks to its answer: two overlapping
    /// syncs leave what one of them, run alone, would (never the union of both).
    syncing: tokio::sync::Mutex<()>,
}

impl Manager {
    /// Builds the manager and starts its event loop.
    pub fn new(store: Store, runtimes: Runtimes, cfg: ManagerConfig) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let host_uids = cfg.task_uids.map(|r| Mutex::new(uids::UidPool::new(r)));
        let mgr = Arc::new(Manager {
            store,
            runtimes,
            cfg,
            host_uids,
            tasks: RwLock::new(Tasks::default()),
            events: tx,
            uid_seq: AtomicU64::new(0),
            changes: broadcast::channel(1024).0,
            syncing: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(events::event_loop(Arc::downgrade(&mgr), rx));
        mgr
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Names of tasks as their view changes; a lagging receiver should re-list.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Loads every stored task and re-attaches to it (or finishes its deletion).
    pub async fn recover(self: &Arc<Self>) -> Result<usize, ManagerError> {
        let mgr = self.clone();
        detached(async move { mgr.recover_all().await }).await
    }

    pub fn get(&self, name: &str) -> Result<TaskView, ManagerError> {
        self.read_tasks()
            .get(name)
            .map(|e| e.view())
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))
    }

    /// The task's answer as `render` makes it, from the task's cache when its view has not
    /// changed since the last render. `render` is the agent's one answer shape.
    pub fn get_rendered(&self, name: &str, render: Render) -> Result<Bytes, ManagerError> {
        self.entry(name)
            .map(|e| e.with_rendered(render, |answer| Bytes::from(answer.to_vec())))
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))
    }

    /// All tasks, ordered by name.
    pub fn list(&self) -> Vec<TaskView> {
        self.snapshot().iter().map(|e| e.view()).collect()
    }

    /// Every task's answer in name order, rendered (or taken from its cache) as the
    /// listing is consumed: the set of tasks is fixed when this is called, each task's
    /// answer when it is reached. Holds one reference per task, never a copy of them.
    pub fn list_rendered(&self, render: Render) -> Listing {
        Listing {
            entries: self.snapshot().into_iter(),
            render,
        }
    }

    fn snapshot(&self) -> Vec<Arc<Entry>> {
        self.read_tasks().entries().cloned().collect()
    }

    /// Creates the task: its record is durable and its start was tried when this returns.
    pub async fn create(
        self: &Arc<Self>,
        name: String,
        spec: TaskSpec,
    ) -> Result<TaskView, ManagerError> {
        self.validate(&name, &spec)?;
        let entry = self.reserve(&name, spec, 0)?;
        let mgr = self.clone();
        detached(async move { mgr.start_reserved(entry).await }).await
    }

    /// Declarative sync: create what is missing, delete what is not listed, leave the rest.
    pub async fn sync(
        self: &Arc<Self>,
        desired: Vec<(String, TaskSpec)>,
    ) -> Result<Vec<TaskView>, ManagerError> {
        let mgr = self.clone();
        detached(async move { mgr.sync_all(desired).await }).await
    }

    /// Requests the task's deletion; unknown names are fine. `Ok` means the deletion is
    /// durable and will be carried out (stop, then removal, retried until they succeed);
    /// an error leaves the task as it was, so the request can be repeated.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), ManagerError> {
        let mgr = self.clone();
        let name = name.to_string();
        detached(async move { mgr.request_deletion(&name).await }).await
    }

    /// Ready when the store can take changes and every runtime's dependencies are there.
    /// (A full data dir is no reason: a DELETE is how its space is freed.)
    pub async fn readiness(&self) -> Readiness {
        if let Some(why) = self.store.unwritable() {
            return Readiness::NotReady(why);
        }
        for rt in self.runtimes.gating() {
            if let Readiness::NotReady(why) = rt.readiness().await {
                return Readiness::NotReady(why);
            }
        }
        Readiness::Ready
    }

    fn changed(&self, name: &str) {
        let _ = self.changes.send(name.to_string());
    }

    fn entry(&self, name: &str) -> Option<Arc<Entry>> {
        self.read_tasks().get(name).cloned()
    }

    /// Drops `entry` from the map unless the name has been taken by a newer entry, and
    /// frees its uid (once: only the removal from the map does).
    fn forget(&self, entry: &Arc<Entry>) {
        let name = entry.name();
        let mut tasks = self.write_tasks();
        if tasks.get(name).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            tasks.remove(name);
            if let (Some(uid), Some(mut pool)) = (entry.host_uid(), self.uid_pool()) {
                pool.release(uid);
            }
        }
    }

    /// The held task uids, when the agent gives them out.
    fn uid_pool(&self) -> Option<std::sync::MutexGuard<'_, uids::UidPool>> {
        self.host_uids
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The runtime the task was created for (see `Runtimes::for_task`).
    fn runtime_of(&self, entry: &Entry) -> Result<&Arc<dyn Runtime>, RuntimeError> {
        entry.with_spec(|spec| self.runtimes.for_task(spec, entry.exec_mode()))
    }

    /// `host`, `sidecar` or `container`: the runtime a task of `spec` runs on (fixed for
    /// the agent's life, so each entry keeps it).
    fn kind_for(&self, spec: &TaskSpec, exec_mode: Option<crate::task::model::ExecMode>) -> Kind {
        match self.runtimes.for_task(spec, exec_mode).map(|rt| rt.kind()) {
            Ok("sidecar") => Kind::Sidecar,
            Ok("container") | Err(_) => Kind::Container,
            Ok(_) => Kind::Host,
        }
    }

    fn task_ref(&self, entry: &Entry) -> TaskRef {
        let spec = entry.spec();
        TaskRef {
            name: entry.name().to_string(),
            uid: entry.uid().to_string(),
            dir: self.store.dir(entry.name()),
            exec_mode: entry
                .exec_mode()
                .or_else(|| self.runtimes.exec_mode_for(&spec))
                .unwrap_or(crate::task::model::ExecMode::Local),
            spec,
            host_uid: entry.host_uid(),
        }
    }

    fn read_tasks(&self) -> std::sync::RwLockReadGuard<'_, Tasks> {
        self.tasks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_tasks(&self) -> std::sync::RwLockWriteGuard<'_, Tasks> {
        self.tasks.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The answers of a set of tasks, in name order (see `Manager::list_rendered`).
pub struct Listing {
    entries: std::vec::IntoIter<Arc<Entry>>,
    render: Render,
}

impl Listing {
    /// Tasks not yet reached.
    pub fn remaining(&self) -> usize {
        self.entries.len()
    }

    /// Appends the next task's answer to `out`; false when every task was reached. The
    /// answer is copied from the task's cache under its lock, never shared out of it.
    pub fn next_into(&mut self, out: &mut impl bytes::BufMut) -> bool {
        match self.entries.next() {
            Some(e) => {
                e.with_rendered(self.render, |answer| answer.write_to(out));
                true
            }
            None => false,
        }
    }
}

/// Runs `work` as a task of its own and waits for it: dropping the wait (a client that went
/// away) leaves the work running to its end. Spawning a task creates no thread.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, ManagerError>> + Send + 'static,
) -> Result<T, ManagerError> {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| Err(ManagerError::Internal(e.to_string())))
}
