//! One task as the manager holds it: its record, its observed state, and the locks that
//! order what happens to it.
//!
//! Each entry keeps its answer as the API renders it (`Entry::with_rendered`), made once
//! after each change and copied by every reader: `GET /getTasks` of 10,000 tasks copies
//! cached bytes instead of serialising 10,000 tasks; the values the answer says twice are
//! kept once (`Packed`). Every change of what a view shows
//! goes through the `Tracked` guard of its `Parts`, whose mutable use drops the cached
//! answer; a render that raced a change is never cached (`generation`).
//!
//! The record's parts that never change after the create (name, uid, times, where it
//! runs) are plain fields. Its spec never changes either: it is kept as its JSON, read
//! back on the few paths that need it (a start, a delete, a sync's answer, a view), so a
//! finished task holds its cached answer and little else. The name, the uid and the
//! spec's JSON share one allocation (`Fixed`).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use super::packed::Packed;
use super::turn::TurnLock;
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

/// Wakes the waiters of every entry's `Persisted` (each looks at its own entry again). One
/// for all: a `Notify` an entry cost every task 32 bytes for a flag that changes once, and
/// its waiters are rare (a deletion racing its task's create).
static PERSISTED_CHANGED: Notify = Notify::const_new();

/// The runtime a task runs on (fixed by its spec), as metrics name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Host,
    Sidecar,
    Container,
}

impl Kind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::Sidecar => "sidecar",
            Kind::Container => "container",
        }
    }
}

/// One task. Its size is what every finished task costs beside its answer, so the parts
/// that change share one lock and the rarely used ones are boxed.
pub(super) struct Entry {
    fixed: Fixed,
    created_at: Time,
    host_uid: Option<u32>,
    exec_mode: Option<ExecMode>,
    kind: Kind,
    /// A `Persisted`, its waiters woken by `PERSISTED_CHANGED`.
    persisted: AtomicU8,
    /// What changes: the view's parts and the record's. Locked before `rendered`.
    parts: Mutex<Parts>,
    /// Held while the task starts, stops or its record is rewritten, so those never
    /// overlap: a delete waits for a start in flight, and two updates of `task.json` are
    /// never written at once.
    pub(super) lifecycle: TurnLock,
    /// Serialises deletion requests, so that exactly one makes the marker durable.
    pub(super) deleting: TurnLock,
    /// The rendered answer, until the view changes. Locked last.
    rendered: Mutex<Rendered>,
}

/// The parts of a task that change after its create, under one lock (five locks, as
/// there were, cost 32 bytes a task more). Changed through `Entry::parts`, whose guard
/// drops the cached answer when it was used mutably.
pub(super) struct Parts {
    pub(super) deletion_timestamp: Option<Time>,
    pub(super) final_status: Option<Box<Terminated>>,
    pub(super) state: TaskState,
    /// How its hooks are or ended. Boxed: most tasks have no hooks, and an unboxed pair
    /// of hook states made every entry 200 bytes larger.
    pub(super) hooks: Option<Box<HookStatuses>>,
    /// What the task used, once it ended.
    pub(super) usage: Usage,
}

/// What a task used, inline: a boxed `ResourceUsage` cost every finished task a 64-byte
/// allocation beside its pointer. Each value is kept with a bit that says it is known,
/// and one more says that a count was reported at all (it may hold no value).
#[derive(Clone, Copy, Default, PartialEq)]
pub(super) struct Usage {
    cpu_seconds: f64,
    memory_peak_bytes: u64,
    oom_kills: u64,
    known: u8,
}

impl Usage {
    const CPU: u8 = 1;
    const PEAK: u8 = 2;
    const OOM: u8 = 4;
    const REPORTED: u8 = 8;

    pub(super) fn of(u: &ResourceUsage) -> Usage {
        let bit = |set: bool, b: u8| if set { b } else { 0 };
        Usage {
            cpu_seconds: u.cpu_seconds.unwrap_or_default(),
            memory_peak_bytes: u.memory_peak_bytes.unwrap_or_default(),
            oom_kills: u.oom_kills.unwrap_or_default(),
            known: Self::REPORTED
                | bit(u.cpu_seconds.is_some(), Self::CPU)
                | bit(u.memory_peak_bytes.is_some(), Self::PEAK)
                | bit(u.oom_kills.is_some(), Self::OOM),
        }
    }

    /// `None` until a count of it was reported.
    pub(super) fn get(&self) -> Option<ResourceUsage> {
        let known = |b: u8| self.known & b != 0;
        known(Self::REPORTED).then(|| ResourceUsage {
            cpu_seconds: known(Self::CPU).then_some(self.cpu_seconds),
            memory_peak_bytes: known(Self::PEAK).then_some(self.memory_peak_bytes),
            oom_kills: known(Self::OOM).then_some(self.oom_kills),
        })
    }
}

/// The cached answer, and the count of view changes that a render started before one
/// of them must not be cached under.
#[derive(Default)]
struct Rendered {
    /// Exactly its size, and never shared out: a `Bytes` shared by a listing grew a
    /// 32-byte header of its own for every task that was listed once.
    bytes: Option<Packed>,
    generation: u64,
}

/// What never changes of a task: its name, its uid and its spec, the spec as its JSON (a
/// `TaskSpec` is 632 bytes before its strings, and the hole it left when it was dropped,
/// as it was once the task finished, outlived it among the answers and entries around
/// it). One allocation for all three: three cost 60 bytes more a task. Reading the spec
/// back costs a microsecond or two on the paths that need it, which are few and never a
/// listing.
struct Fixed {
    /// The name, the spec's JSON (empty when it is open) and the uid, one after another.
    text: Box<str>,
    name_len: u16,
    json_len: u16,
    /// A spec kept as it is: large (its JSON would be read back by each view of it), or
    /// one whose JSON would not read back as the same spec (never seen: the store depends
    /// on the same round trip).
    open: Option<Box<TaskSpec>>,
}

/// Specs whose JSON is larger than this are kept open: a spec with a huge environment
/// saves little as JSON, and reading it back would cost every view.
const SEAL_MAX: usize = 16 * 1024;
const _: () = assert!(SEAL_MAX <= u16::MAX as usize);

impl Fixed {
    fn of(name: &str, uid: &str, spec: TaskSpec) -> Fixed {
        let (json, open) = match serde_json::to_string(&spec) {
            Ok(json)
                if json.len() <= SEAL_MAX
                    && serde_json::from_str::<TaskSpec>(&json).ok().as_ref() == Some(&spec) =>
            {
                (json, None)
            }
            _ => (String::new(), Some(Box::new(spec))),
        };
        Fixed {
            // Copied into one exact allocation: a record read by a loader thread would
            // otherwise keep its strings for the task's life in that thread's malloc
            // arena, among the holes its read left.
            text: [name, json.as_str(), uid].concat().into_boxed_str(),
            name_len: u16::try_from(name.len())
                .expect("task names are checked to be at most 253 bytes"),
            json_len: json.len() as u16,
            open,
        }
    }

    fn name(&self) -> &str {
        &self.text[..usize::from(self.name_len)]
    }

    fn uid(&self) -> &str {
        &self.text[usize::from(self.name_len) + usize::from(self.json_len)..]
    }

    /// `f` of the spec (read back from its JSON if it is sealed).
    fn with_spec<R>(&self, f: impl FnOnce(&TaskSpec) -> R) -> R {
        match &self.open {
            Some(s) => f(s),
            None => f(&self.unseal()),
        }
    }

    fn spec(&self) -> TaskSpec {
        match &self.open {
            Some(s) => TaskSpec::clone(s),
            None => self.unseal(),
        }
    }

    /// The spec the sealed JSON holds; `Fixed::of` checked that it reads back.
    fn unseal(&self) -> TaskSpec {
        let at = usize::from(self.name_len);
        let json = &self.text[at..at + usize::from(self.json_len)];
        serde_json::from_str(json).expect("a sealed spec was read back when it was sealed")
    }
}

/// The guard of an entry's `Parts`: using it mutably drops the entry's rendered answer
/// when the guard goes (still under the lock, so no render in between can see the old
/// value and cache it as new).
pub(super) struct Tracked<'a> {
    guard: MutexGuard<'a, Parts>,
    entry: &'a Entry,
    dirty: bool,
}

impl Deref for Tracked<'_> {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.guard
    }
}

impl DerefMut for Tracked<'_> {
    fn deref_mut(&mut self) -> &mut Parts {
        self.dirty = true;
        &mut self.guard
    }
}

impl Drop for Tracked<'_> {
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
        kind: Kind,
    ) -> Arc<Entry> {
        Arc::new(Entry {
            fixed: Fixed::of(&record.name, &record.uid, record.spec),
            created_at: record.created_at,
            exec_mode: record.exec_mode,
            host_uid: record.host_uid,
            kind,
            persisted: AtomicU8::new(persisted as u8),
            parts: Mutex::new(Parts {
                deletion_timestamp: record.deletion_timestamp,
                final_status: record.final_status.map(Box::new),
                state,
                hooks: None,
                usage: Usage::default(),
            }),
            lifecycle: TurnLock::default(),
            deleting: TurnLock::default(),
            rendered: Mutex::new(Rendered::default()),
        })
    }

    /// The parts that change (state, hooks, usage, the deletion mark and the recorded
    /// final status), locked.
    pub(super) fn parts(&self) -> Tracked<'_> {
        Tracked {
            guard: lock(&self.parts),
            entry: self,
            dirty: false,
        }
    }

    pub(super) fn name(&self) -> &str {
        self.fixed.name()
    }

    pub(super) fn uid(&self) -> &str {
        self.fixed.uid()
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

    /// `host`, `sidecar` or `container`.
    pub(super) fn kind(&self) -> &'static str {
        self.kind.as_str()
    }

    /// `f` of the spec (read back from its JSON if it is sealed).
    pub(super) fn with_spec<R>(&self, f: impl FnOnce(&TaskSpec) -> R) -> R {
        self.fixed.with_spec(f)
    }

    /// A copy of the spec.
    pub(super) fn spec(&self) -> TaskSpec {
        self.fixed.spec()
    }

    /// The record as the store keeps it.
    pub(super) fn record(&self) -> TaskRecord {
        let parts = lock(&self.parts);
        TaskRecord {
            name: self.name().to_string(),
            uid: self.uid().to_string(),
            spec: self.spec(),
            exec_mode: self.exec_mode,
            host_uid: self.host_uid,
            created_at: self.created_at,
            deletion_timestamp: parts.deletion_timestamp,
            final_status: parts.final_status.as_deref().cloned(),
        }
    }

    fn invalidate(&self) {
        let mut rendered = lock(&self.rendered);
        rendered.generation += 1;
        rendered.bytes = None;
    }

    pub(super) fn view(&self) -> TaskView {
        let parts = lock(&self.parts);
        TaskView {
            name: self.name().to_string(),
            spec: self.spec(),
            state: parts.state.clone(),
            hooks: parts.hooks.as_deref().cloned(),
            usage: parts.usage.get(),
            deletion_timestamp: parts.deletion_timestamp,
        }
    }

    /// `f` of the task's answer: the cached bytes, or its view rendered now (and cached
    /// unless the view changed meanwhile).
    pub(super) fn with_rendered<R>(&self, render: Render, f: impl FnOnce(&Packed) -> R) -> R {
        let generation = {
            let cached = lock(&self.rendered);
            if let Some(bytes) = &cached.bytes {
                return f(bytes);
            }
            cached.generation
        };
        // Packed to its exact size: a rendered `Vec` carries up to as much spare capacity
        // again, held as long as the answer is cached (a finished task's whole life).
        let bytes = Packed::of(&render(self.view()));
        let mut cached = lock(&self.rendered);
        let out = f(&bytes);
        if cached.generation == generation {
            cached.bytes = Some(bytes);
        }
        out
    }

    /// A deletion was requested and is durable.
    pub(super) fn deletion_requested(&self) -> bool {
        lock(&self.parts).deletion_timestamp.is_some()
    }

    /// Counts against `--max-concurrent-tasks`: neither deleted nor finished.
    pub(super) fn is_active(&self) -> bool {
        let parts = lock(&self.parts);
        parts.deletion_timestamp.is_none() && !parts.state.is_terminated()
    }

    pub(super) fn set_persisted(&self, p: Persisted) {
        self.persisted.store(p as u8, Ordering::Release);
        PERSISTED_CHANGED.notify_waiters();
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
        super::turn::when(&PERSISTED_CHANGED, || match self.persisted() {
            Persisted::Pending => None,
            p => Some(p == Persisted::Yes),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::model::{EnvVar, ProcessSpec};

    fn process(command: &str, env_bytes: usize) -> TaskSpec {
        TaskSpec {
            process: Some(ProcessSpec {
                command: vec![command.into(), "ü".into()],
                env: vec![EnvVar {
                    name: "E".into(),
                    value: "v".repeat(env_bytes),
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_name_uid_and_spec_read_back_as_given_sealed_or_open() {
        for (name, uid, spec, sealed) in [
            ("a", "uid-1", process("/bin/true", 1), true),
            (&*"n".repeat(253), "", process("/bin/sh", 0), true),
            ("big", "ü-uid-ü", process("/bin/true", SEAL_MAX), false),
            ("empty", "x", TaskSpec::default(), true),
        ] {
            let f = Fixed::of(name, uid, spec.clone());
            assert_eq!((f.name(), f.uid()), (name, uid));
            assert_eq!(f.spec(), spec);
            assert_eq!(f.with_spec(|s| s.clone()), spec);
            assert_eq!(f.open.is_none(), sealed, "{name}");
        }
    }

    #[test]
    fn usage_reads_back_as_it_was_reported() {
        assert_eq!(Usage::default().get(), None, "nothing reported");
        for u in [
            ResourceUsage::default(),
            ResourceUsage {
                cpu_seconds: Some(0.001123),
                memory_peak_bytes: Some(524_288),
                oom_kills: None,
            },
            ResourceUsage {
                cpu_seconds: Some(0.0),
                memory_peak_bytes: None,
                oom_kills: Some(0),
            },
            ResourceUsage {
                cpu_seconds: None,
                memory_peak_bytes: Some(u64::MAX),
                oom_kills: Some(3),
            },
        ] {
            assert_eq!(Usage::of(&u).get(), Some(u.clone()));
        }
    }
}
