//! One task as the manager holds it: its record, its observed state, and the locks that
//! order what happens to it.
//!
//! Each entry keeps its answer as the API renders it (`Entry::rendered`), made once after
//! each change and shared by every reader: `GET /getTasks` of 10,000 tasks copies cached
//! bytes instead of serialising 10,000 tasks. Every change of what a view shows goes
//! through a `Tracked` guard (`record`, `state`, `hooks`), whose mutable use drops the
//! cached answer; a render that raced a change is never cached (`generation`).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::task::model::{HookStatuses, ResourceUsage, TaskSpec, TaskState};
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
    /// What it used, once it ended (`None`: not known).
    pub usage: Option<ResourceUsage>,
    pub deletion_timestamp: Option<Time>,
}

/// How a task's view becomes the bytes of an answer (the API's one JSON shape). The
/// manager caches what it returns per task; there is one renderer per agent.
pub type Render = fn(TaskView) -> Bytes;

/// Whether the task's record has reached the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Persisted {
    Pending = 0,
    Yes = 1,
    /// Its create failed; the entry is gone from the map.
    No = 2,
}

pub(super) struct Entry {
    record: Mutex<TaskRecord>,
    state: Mutex<TaskState>,
    /// Locked after `state` when both are. Boxed: most tasks have no hooks, and an
    /// unboxed pair of hook states made every entry 200 bytes larger.
    hooks: Mutex<Option<Box<HookStatuses>>>,
    /// What the task used, once it ended. Locked after `hooks`; boxed as they are.
    usage: Mutex<Option<Box<ResourceUsage>>>,
    /// Held while the task starts, stops or its record is rewritten, so those never
    /// overlap: a delete waits for a start in flight, and two updates of `task.json` are
    /// never written at once.
    pub(super) lifecycle: tokio::sync::Mutex<()>,
    /// Serialises deletion requests, so that exactly one makes the marker durable.
    pub(super) deleting: tokio::sync::Mutex<()>,
    /// A `Persisted`, and its waiters (no channel: a watch channel's shared state cost
    /// every task about 400 bytes of heap for a flag that changes once).
    persisted: AtomicU8,
    persisted_changed: Notify,
    /// The rendered answer, until the view changes. Locked last.
    rendered: Mutex<Option<Bytes>>,
    /// Bumped (under `rendered`'s lock) by every change of the view.
    generation: AtomicU64,
}

/// A lock guard of one part of an entry's view: using it mutably drops the entry's
/// rendered answer when the guard goes (still under the lock, so no render in between
/// can see the old value and cache it as new).
pub(super) struct Tracked<'a, T> {
    guard: MutexGuard<'a, T>,
    entry: &'a Entry,
    dirty: bool,
}

impl<T> Deref for Tracked<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for Tracked<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.dirty = true;
        &mut self.guard
    }
}

impl<T> Drop for Tracked<'_, T> {
    fn drop(&mut self) {
        if self.dirty {
            self.entry.invalidate();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while it was held leaves it usable (no poisoning).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Entry {
    pub(super) fn new(record: TaskRecord, state: TaskState, persisted: Persisted) -> Arc<Entry> {
        Arc::new(Entry {
            record: Mutex::new(record),
            state: Mutex::new(state),
            hooks: Mutex::new(None),
            usage: Mutex::new(None),
            lifecycle: tokio::sync::Mutex::new(()),
            deleting: tokio::sync::Mutex::new(()),
            persisted: AtomicU8::new(persisted as u8),
            persisted_changed: Notify::new(),
            rendered: Mutex::new(None),
            generation: AtomicU64::new(0),
        })
    }

    fn tracked<'a, T>(&'a self, m: &'a Mutex<T>) -> Tracked<'a, T> {
        Tracked {
            guard: lock(m),
            entry: self,
            dirty: false,
        }
    }

    /// The record.
    pub(super) fn record(&self) -> Tracked<'_, TaskRecord> {
        self.tracked(&self.record)
    }

    pub(super) fn state(&self) -> Tracked<'_, TaskState> {
        self.tracked(&self.state)
    }

    pub(super) fn hooks(&self) -> Tracked<'_, Option<Box<HookStatuses>>> {
        self.tracked(&self.hooks)
    }

    pub(super) fn usage(&self) -> Tracked<'_, Option<Box<ResourceUsage>>> {
        self.tracked(&self.usage)
    }

    fn invalidate(&self) {
        let mut rendered = lock(&self.rendered);
        self.generation.fetch_add(1, Ordering::Relaxed);
        *rendered = None;
    }

    pub(super) fn view(&self) -> TaskView {
        // State before record, the order `apply` takes them in: the opposite deadlocks.
        let (state, hooks, usage) = {
            let state = lock(&self.state);
            let hooks = lock(&self.hooks).as_deref().cloned();
            (state.clone(), hooks, lock(&self.usage).as_deref().cloned())
        };
        let rec = lock(&self.record);
        TaskView {
            name: rec.name.clone(),
            spec: rec.spec.clone(),
            state,
            hooks,
            usage,
            deletion_timestamp: rec.deletion_timestamp,
        }
    }

    /// The task's answer: the cached bytes, or its view rendered now (and cached unless
    /// the view changed meanwhile).
    pub(super) fn rendered(&self, render: Render) -> Bytes {
        let generation = {
            let cached = lock(&self.rendered);
            if let Some(bytes) = cached.as_ref() {
                return bytes.clone();
            }
            self.generation.load(Ordering::Relaxed)
        };
        let bytes = render(self.view());
        let mut cached = lock(&self.rendered);
        if self.generation.load(Ordering::Relaxed) == generation {
            *cached = Some(bytes.clone());
        }
        bytes
    }

    pub(super) fn name(&self) -> String {
        lock(&self.record).name.clone()
    }

    pub(super) fn uid(&self) -> String {
        lock(&self.record).uid.clone()
    }

    /// A deletion was requested and is durable.
    pub(super) fn deletion_requested(&self) -> bool {
        lock(&self.record).deletion_timestamp.is_some()
    }

    /// Counts against `--max-concurrent-tasks`: neither deleted nor finished.
    pub(super) fn is_active(&self) -> bool {
        !self.deletion_requested() && !lock(&self.state).is_terminated()
    }

    pub(super) fn set_persisted(&self, p: Persisted) {
        self.persisted.store(p as u8, Ordering::Release);
        self.persisted_changed.notify_waiters();
    }

    fn persisted(&self) -> Persisted {
        match self.persisted.load(Ordering::Acquire) {
            0 => Persisted::Pending,
            1 => Persisted::Yes,
            _ => Persisted::No,
        }
    }

    /// Waits until the create that made this entry has stored it (true) or failed (false).
    pub(super) async fn wait_persisted(&self) -> bool {
        loop {
            // Registered before looking, so a change between the two wakes it.
            let changed = self.persisted_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.persisted() {
                Persisted::Pending => changed.await,
                p => return p == Persisted::Yes,
            }
        }
    }
}
