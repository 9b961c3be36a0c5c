//! One task as the manager holds it: its record, its observed state, and the locks that
//! order what happens to it.
//!
//! Each entry keeps its answer as the API renders it (`Entry::rendered`), made once after
//! each change and shared by every reader: `GET /getTasks` of 10,000 tasks copies cached
//! bytes instead of serialising 10,000 tasks. Every change of what a view shows goes
//! through a `Tracked` guard (`marks`, `state`, `hooks`, `usage`), whose mutable use drops
//! the cached answer; a render that raced a change is never cached (`generation`).
//!
//! The record's parts that never change after the create (name, uid, times, where it
//! runs) are plain fields. Its spec never changes either: once the task has finished it is
//! kept only as its JSON (`seal`), read back on the rare paths that need it (a delete, a
//! sync's answer, a view), so a finished task holds its cached answer and little else.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::task::model::{ExecMode, HookStatuses, ResourceUsage, TaskSpec, TaskState, Terminated};
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
    name: Box<str>,
    uid: Box<str>,
    created_at: Time,
    exec_mode: Option<ExecMode>,
    host_uid: Option<u32>,
    /// `host`, `sidecar` or `container`: the runtime it runs on (fixed by its spec).
    kind: &'static str,
    spec: Mutex<Spec>,
    /// The record's parts that change. Locked after `state` when both are.
    marks: Mutex<Marks>,
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

/// The record's parts that change after the create.
#[derive(Default)]
pub(super) struct Marks {
    pub(super) deletion_timestamp: Option<Time>,
    pub(super) final_status: Option<Box<Terminated>>,
}

/// The task's spec: as it was given while the task may run, its JSON once it finished.
enum Spec {
    Open(Box<TaskSpec>),
    Sealed(Box<[u8]>),
}

/// Specs larger than this stay open when their task finishes: the JSON of a spec with a
/// huge environment saves little, and reading it back would cost every view.
const SEAL_MAX: usize = 16 * 1024;

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
    pub(super) fn new(
        record: TaskRecord,
        state: TaskState,
        persisted: Persisted,
        kind: &'static str,
    ) -> Arc<Entry> {
        Arc::new(Entry {
            name: record.name.into(),
            uid: record.uid.into(),
            created_at: record.created_at,
            exec_mode: record.exec_mode,
            host_uid: record.host_uid,
            kind,
            spec: Mutex::new(Spec::Open(Box::new(record.spec))),
            marks: Mutex::new(Marks {
                deletion_timestamp: record.deletion_timestamp,
                final_status: record.final_status.map(Box::new),
            }),
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

    /// The deletion mark and the recorded final status.
    pub(super) fn marks(&self) -> Tracked<'_, Marks> {
        self.tracked(&self.marks)
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

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn uid(&self) -> &str {
        &self.uid
    }

    pub(super) fn created_at(&self) -> Time {
        self.created_at
    }

    pub(super) fn exec_mode(&self) -> Option<ExecMode> {
        self.exec_mode
    }

    pub(super) fn host_uid(&self) -> Option<u32> {
        self.host_uid
    }

    pub(super) fn kind(&self) -> &'static str {
        self.kind
    }

    /// `f` of the spec (read back from its JSON if it is sealed).
    pub(super) fn with_spec<R>(&self, f: impl FnOnce(&TaskSpec) -> R) -> R {
        let spec = lock(&self.spec);
        match &*spec {
            Spec::Open(s) => f(s),
            Spec::Sealed(json) => f(&unseal(json)),
        }
    }

    /// A copy of the spec.
    pub(super) fn spec(&self) -> TaskSpec {
        let spec = lock(&self.spec);
        match &*spec {
            Spec::Open(s) => TaskSpec::clone(s),
            Spec::Sealed(json) => unseal(json),
        }
    }

    /// The record as the store keeps it.
    pub(super) fn record(&self) -> TaskRecord {
        let (deletion_timestamp, final_status) = {
            let m = lock(&self.marks);
            (m.deletion_timestamp, m.final_status.as_deref().cloned())
        };
        TaskRecord {
            name: self.name.to_string(),
            uid: self.uid.to_string(),
            spec: self.spec(),
            exec_mode: self.exec_mode,
            host_uid: self.host_uid,
            created_at: self.created_at,
            deletion_timestamp,
            final_status,
        }
    }

    /// Keeps a finished task's spec as its JSON only (it can't change, and a finished
    /// task is rarely asked for it). Kept open when its JSON would not read back as the
    /// same spec (never seen: the store depends on the same round trip) or is large.
    pub(super) fn seal(&self) {
        if !lock(&self.state).is_terminated() {
            return;
        }
        let mut spec = lock(&self.spec);
        let Spec::Open(open) = &*spec else { return };
        let Ok(json) = serde_json::to_vec(&**open) else {
            return;
        };
        if json.len() > SEAL_MAX
            || serde_json::from_slice::<TaskSpec>(&json).ok().as_ref() != Some(&**open)
        {
            return;
        }
        *spec = Spec::Sealed(json.into_boxed_slice());
    }

    fn invalidate(&self) {
        let mut rendered = lock(&self.rendered);
        self.generation.fetch_add(1, Ordering::Relaxed);
        *rendered = None;
    }

    pub(super) fn view(&self) -> TaskView {
        let (state, hooks, usage, deletion_timestamp) = {
            let state = lock(&self.state);
            let hooks = lock(&self.hooks).as_deref().cloned();
            let usage = lock(&self.usage).as_deref().cloned();
            let deletion = lock(&self.marks).deletion_timestamp;
            (state.clone(), hooks, usage, deletion)
        };
        TaskView {
            name: self.name.to_string(),
            spec: self.spec(),
            state,
            hooks,
            usage,
            deletion_timestamp,
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
        // Copied to its exact size: a rendered `Vec` carries up to as much spare capacity
        // again, held as long as the answer is cached (a finished task's whole life).
        let bytes = Bytes::copy_from_slice(&render(self.view()));
        let mut cached = lock(&self.rendered);
        if self.generation.load(Ordering::Relaxed) == generation {
            *cached = Some(bytes.clone());
        }
        bytes
    }

    /// A deletion was requested and is durable.
    pub(super) fn deletion_requested(&self) -> bool {
        lock(&self.marks).deletion_timestamp.is_some()
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

/// The spec a sealed JSON holds; `seal` checked that it reads back.
fn unseal(json: &[u8]) -> TaskSpec {
    serde_json::from_slice(json).expect("a sealed spec was read back when it was sealed")
}
