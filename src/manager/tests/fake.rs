//! A `Runtime` that runs nothing: each start answers as the test scripted it, and every
//! call is recorded, so the manager's own logic can be tested without processes.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;

use crate::runtime::{EventSink, Observed, Runtime, RuntimeError, RuntimeEvent, TaskRef};
use crate::task::model::{TaskSpec, Terminated};
use crate::task::time::Time;

/// What one start (or adoption) answers.
#[derive(Clone, Debug)]
pub enum Answer {
    Running,
    /// A start failure that is not a lack of resources (e.g. a missing main container).
    Fails(String),
    /// EAGAIN: out of processes, nothing started.
    OutOfProcesses,
    /// The launch was sent, but its journal could not be read (EMFILE).
    JournalUnreadable,
    /// As tokio's `spawn_blocking` does when no thread can be created.
    Panics,
    /// What a runtime observed at once (a task whose `preStart` hook runs, say).
    Observed(Observed),
}

#[derive(Default)]
struct State {
    /// Per task name, the answers of its next starts; `Running` once they run out.
    script: HashMap<String, VecDeque<Answer>>,
    /// Task names whose starts wait for `start_gate`.
    gated_starts: Vec<String>,
    calls: Vec<String>,
    events: Option<EventSink>,
    uids: HashMap<String, String>,
    /// The task uid each task's last start or adoption was given.
    host_uids: HashMap<String, Option<u32>>,
    stop_fails: usize,
}

#[derive(Clone)]
pub struct FakeRuntime {
    state: Arc<Mutex<State>>,
    /// Gated starts take a permit first.
    pub start_gate: Arc<Semaphore>,
    /// Every stop takes a permit first when `gate_stops` is set.
    pub stop_gate: Arc<Semaphore>,
    gate_stops: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeRuntime {
    pub fn new() -> Self {
        FakeRuntime {
            state: Arc::default(),
            start_gate: Arc::new(Semaphore::new(0)),
            stop_gate: Arc::new(Semaphore::new(0)),
            gate_stops: Arc::default(),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn script(&self, name: &str, answers: &[Answer]) {
        self.st()
            .script
            .insert(name.into(), answers.iter().cloned().collect());
    }

    pub fn gate_start_of(&self, name: &str) {
        self.st().gated_starts.push(name.into());
    }

    pub fn gate_stops(&self) {
        self.gate_stops
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn fail_next_stops(&self, n: usize) {
        self.st().stop_fails = n;
    }

    /// Calls so far, as "start NAME", "adopt NAME", "stop NAME".
    pub fn calls(&self) -> Vec<String> {
        self.st().calls.clone()
    }

    /// The task uid the task's last start or adoption was given.
    pub fn host_uid(&self, name: &str) -> Option<u32> {
        self.st().host_uids[name]
    }

    pub fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| *c == call).count()
    }

    /// Reports what a runtime's watcher observed later.
    pub fn report(&self, name: &str, observed: Observed) {
        let st = self.st();
        let ev = RuntimeEvent {
            name: name.into(),
            uid: st.uids[name].clone(),
            observed,
        };
        st.events
            .as_ref()
            .expect("a task was started")
            .send(ev)
            .unwrap();
    }

    /// Reports that a running task exited, as a runtime's exit watcher would.
    pub fn exit(&self, name: &str, code: i32) {
        let st = self.st();
        let ev = RuntimeEvent {
            name: name.into(),
            uid: st.uids[name].clone(),
            observed: Observed::Terminated(Terminated::from_exit(
                Some(code),
                None,
                Some(Time::now()),
                Time::now(),
            )),
        };
        st.events
            .as_ref()
            .expect("a task was started")
            .send(ev)
            .unwrap();
    }

    fn answer(
        &self,
        verb: &str,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        let this = self.clone();
        let verb = verb.to_string();
        Box::pin(async move {
            let gated = this.st().gated_starts.contains(&task.name);
            if gated {
                this.start_gate.acquire().await.unwrap().forget();
            }
            let answer = {
                let mut st = this.st();
                st.calls.push(format!("{verb} {}", task.name));
                st.events = Some(events);
                st.uids.insert(task.name.clone(), task.uid.clone());
                st.host_uids.insert(task.name.clone(), task.host_uid);
                st.script
                    .get_mut(&task.name)
                    .and_then(VecDeque::pop_front)
                    .unwrap_or(Answer::Running)
            };
            match answer {
                Answer::Running => Ok(Observed::Running {
                    started_at: Some(Time::now()),
                }),
                Answer::Fails(why) => Err(RuntimeError::Launch(io::Error::other(why))),
                Answer::Observed(o) => Ok(o),
                Answer::Panics => panic!(
                    "OS can't spawn worker thread: Resource temporarily unavailable (os error 11)"
                ),
                Answer::JournalUnreadable => Err(RuntimeError::Journal {
                    path: format!("{}/run.jsonl", task.name),
                    source: io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32),
                }),
                Answer::OutOfProcesses => Err(RuntimeError::before_launch(
                    io::Error::from_raw_os_error(nix::errno::Errno::EAGAIN as i32),
                )),
            }
        })
    }
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn validate(&self, _spec: &TaskSpec) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn start(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        self.answer("start", task, events)
    }

    fn adopt(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        self.answer("adopt", task, events)
    }

    fn stop(
        &self,
        task: TaskRef,
        _grace: Duration,
    ) -> BoxFuture<'static, Result<(), RuntimeError>> {
        let this = self.clone();
        Box::pin(async move {
            if this.gate_stops.load(std::sync::atomic::Ordering::SeqCst) {
                this.stop_gate.acquire().await.unwrap().forget();
            }
            let mut st = this.st();
            st.calls.push(format!("stop {}", task.name));
            if st.stop_fails > 0 {
                st.stop_fails -= 1;
                return Err(RuntimeError::Cri("stop failed (scripted)".into()));
            }
            Ok(())
        })
    }
}
