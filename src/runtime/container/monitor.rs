//! One watcher for every task container (many subscribers, one event source), like
//! containerd's monitor: it reports exits, enforces timeouts and keeps logs in budget.
//!
//! Exits are learnt from the CRI `GetContainerEvents` stream when the runtime has one; on a
//! runtime without it (containerd 1.6 answers Unimplemented) the monitor polls instead,
//! with a single ListContainers per interval for all watched containers, and only while
//! there are any.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_cri::v1::{ContainerEventType, ContainerFilter, ContainerState};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cri::{Cri, is_not_found};
use super::{labels, logs, status};
use crate::runtime::{EventSink, Observed, RuntimeEvent, TaskRef};
use crate::task::model::{Terminated, reason};
use crate::task::time::Time;

/// How often running containers' log files are checked against the budget.
const LOG_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// First look at a new container when polling.
const FIRST_POLL: Duration = Duration::from_millis(10);
/// Wait before re-subscribing to a broken event stream.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(2);

/// One container to follow until it exits.
pub struct Watch {
    pub container_id: String,
    pub task: TaskRef,
    pub events: EventSink,
    /// When the task's timeout expires (wall clock, from the container's start).
    pub deadline: Option<Time>,
}

enum Cmd {
    Watch(Box<Watch>),
    Unwatch(String),
    /// Look at this container now (an event, or a timeout stop that finished).
    Check(String),
    /// The event stream is up (true: check everything once) or unavailable (false: poll).
    Events(bool),
}

#[derive(Clone)]
pub struct Monitor {
    tx: mpsc::UnboundedSender<Cmd>,
}

#[derive(Clone, Copy)]
pub struct MonitorConfig {
    pub poll_interval: Duration,
    pub grace: Duration,
    pub max_log_bytes: u64,
}

impl Monitor {
    pub fn spawn(
        cri: Arc<dyn Cri>,
        agent_id: String,
        cfg: MonitorConfig,
        cancel: CancellationToken,
    ) -> Monitor {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(subscribe(cri.clone(), tx.clone(), cancel.clone()));
        let state = State {
            cri,
            agent_id,
            cfg,
            tx: tx.clone(),
            watches: HashMap::new(),
            events_live: false,
            events_known: None,
        };
        tokio::spawn(state.run(rx, cancel));
        Monitor { tx }
    }

    pub fn watch(&self, w: Watch) {
        let _ = self.tx.send(Cmd::Watch(Box::new(w)));
    }

    pub fn unwatch(&self, container_id: &str) {
        let _ = self.tx.send(Cmd::Unwatch(container_id.to_string()));
    }
}

struct Entry {
    watch: Watch,
    timed_out: bool,
    /// Polling only: when this container is next looked at, and the step after that.
    /// A new container is looked at soon (most short tasks end quickly), then less and
    /// less often, up to the poll interval.
    next_poll: Instant,
    backoff: Duration,
}

struct State {
    cri: Arc<dyn Cri>,
    agent_id: String,
    cfg: MonitorConfig,
    tx: mpsc::UnboundedSender<Cmd>,
    watches: HashMap<String, Entry>,
    events_live: bool,
    events_known: Option<bool>,
}

impl State {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, cancel: CancellationToken) {
        let mut next_log_check = Instant::now() + LOG_CHECK_INTERVAL;
        loop {
            let wake = self.next_wake(next_log_check);
            tokio::select! {
                () = cancel.cancelled() => return,
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Cmd::Watch(w)) => {
                        let id = w.container_id.clone();
                        tracing::debug!(task = %w.task.name, container = %id, "watching container");
                        let backoff = FIRST_POLL.min(self.cfg.poll_interval);
                        self.watches.insert(id, Entry {
                            watch: *w,
                            timed_out: false,
                            next_poll: Instant::now() + backoff,
                            backoff,
                        });
                    }
                    Some(Cmd::Unwatch(id)) => { self.watches.remove(&id); }
                    Some(Cmd::Check(id)) => self.check(&id).await,
                    Some(Cmd::Events(live)) => {
                        if self.events_known != Some(live) {
                            if live {
                                tracing::info!("following CRI container events");
                            } else {
                                tracing::info!(interval = ?self.cfg.poll_interval, "CRI container events unavailable; polling container status");
                            }
                        }
                        self.events_known = Some(live);
                        self.events_live = live;
                        if live {
                            // Exits while the stream was down are caught up here.
                            let ids: Vec<String> = self.watches.keys().cloned().collect();
                            for id in ids { self.check(&id).await; }
                        }
                    }
                },
                () = sleep_until(wake) => {
                    let now = Instant::now();
                    if !self.events_live && self.watches.values().any(|e| e.next_poll <= now) {
                        self.poll().await;
                        let max = self.cfg.poll_interval;
                        for e in self.watches.values_mut().filter(|e| e.next_poll <= now) {
                            e.backoff = (e.backoff * 2).min(max);
                            e.next_poll = now + e.backoff;
                        }
                    }
                    if now >= next_log_check {
                        self.check_logs().await;
                        next_log_check = now + LOG_CHECK_INTERVAL;
                    }
                    self.enforce_deadlines();
                }
            }
        }
    }

    /// The next time there is work: a poll, a log check or a deadline; none when idle.
    fn next_wake(&self, next_log_check: Instant) -> Option<Instant> {
        if self.watches.is_empty() {
            return None;
        }
        let mut wake = next_log_check;
        if !self.events_live
            && let Some(p) = self.watches.values().map(|e| e.next_poll).min()
        {
            wake = wake.min(p);
        }
        let now_wall = Time::now().unix_millis();
        for e in self.watches.values().filter(|e| !e.timed_out) {
            if let Some(d) = e.watch.deadline {
                let ms = (d.unix_millis() - now_wall).max(0) as u64;
                wake = wake.min(Instant::now() + Duration::from_millis(ms));
            }
        }
        Some(wake)
    }

    /// One ListContainers for all of the agent's containers; exited or vanished ones
    /// are looked at closely.
    async fn poll(&mut self) {
        let filter = ContainerFilter {
            label_selector: HashMap::from([(labels::AGENT.to_string(), self.agent_id.clone())]),
            ..Default::default()
        };
        let listed = match self.cri.list_containers(filter).await {
            Ok(l) => l,
            Err(s) => {
                tracing::warn!(error = %s.message(), "polling container states failed");
                return;
            }
        };
        let states: HashMap<&str, i32> = listed.iter().map(|c| (c.id.as_str(), c.state)).collect();
        let done: Vec<String> = self
            .watches
            .keys()
            .filter(|id| {
                states
                    .get(id.as_str())
                    .is_none_or(|s| *s == ContainerState::ContainerExited as i32)
            })
            .cloned()
            .collect();
        for id in done {
            self.check(&id).await;
        }
    }

    /// Reports the container's exit if it has exited.
    async fn check(&mut self, id: &str) {
        let Some(entry) = self.watches.get(id) else {
            return;
        };
        let timeout = entry.watch.task.spec.effective_timeout();
        let t = match self.cri.container_status(id, false).await {
            Ok(r) => match r
                .status
                .as_ref()
                .and_then(|s| status::observed(s, timeout, entry.timed_out))
            {
                Some(Observed::Terminated(t)) => t,
                _ => return,
            },
            Err(s) if is_not_found(&s) => Terminated {
                exit_code: 137,
                signal: None,
                reason: reason::RUNTIME_ERROR.into(),
                message: Some(format!(
                    "container {id} was removed outside the agent before it reported an exit"
                )),
                started_at: None,
                finished_at: Time::now(),
            },
            Err(s) => {
                tracing::warn!(container = %id, error = %s.message(), "container status failed");
                return;
            }
        };
        let Some(entry) = self.watches.remove(id) else {
            return;
        };
        let w = entry.watch;
        let (dir, max) = (w.task.dir.clone(), self.cfg.max_log_bytes);
        let _ = crate::sys::offload::offload(move || logs::enforce_budget(&dir, max)).await;
        tracing::info!(task = %w.task.name, container = %id, exit_code = t.exit_code, reason = %t.reason, "container exited");
        let _ = w.events.send(RuntimeEvent {
            name: w.task.name,
            uid: w.task.uid,
            observed: Observed::Terminated(t),
        });
    }

    /// Starts stopping every container whose timeout passed; its exit is reported as a
    /// timeout once the stop completes.
    fn enforce_deadlines(&mut self) {
        let now = Time::now();
        for (id, e) in self.watches.iter_mut() {
            if e.timed_out || e.watch.deadline.is_none_or(|d| d > now) {
                continue;
            }
            e.timed_out = true;
            tracing::info!(task = %e.watch.task.name, container = %id, timeout_s = e.watch.task.spec.effective_timeout().unwrap_or_default(), "task timed out; stopping its container");
            let (cri, tx, id, grace) = (
                self.cri.clone(),
                self.tx.clone(),
                id.clone(),
                self.cfg.grace,
            );
            tokio::spawn(async move {
                if let Err(s) = cri.stop_container(&id, grace).await {
                    tracing::warn!(container = %id, error = %s.message(), "stopping a timed-out container failed");
                }
                let _ = tx.send(Cmd::Check(id));
            });
        }
    }

    async fn check_logs(&mut self) {
        let max = self.cfg.max_log_bytes;
        let dirs: Vec<(String, std::path::PathBuf)> = self
            .watches
            .iter()
            .map(|(id, e)| (id.clone(), e.watch.task.dir.clone()))
            .collect();
        for (id, dir) in dirs {
            let rotated = crate::sys::offload::offload(move || logs::rotate_if_needed(&dir, max))
                .await
                .unwrap_or(false);
            if rotated && let Err(s) = self.cri.reopen_container_log(&id).await {
                tracing::warn!(container = %id, error = %s.message(), "reopening the container log failed");
            }
        }
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Follows the runtime's container events and turns stops into checks. Gives up for good
/// when the runtime does not implement the stream.
async fn subscribe(cri: Arc<dyn Cri>, tx: mpsc::UnboundedSender<Cmd>, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            s = cri.container_events() => s,
        };
        match stream {
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                let _ = tx.send(Cmd::Events(false));
                return;
            }
            Err(s) => {
                tracing::debug!(error = %s.message(), "CRI event stream unavailable");
                let _ = tx.send(Cmd::Events(false));
            }
            Ok(mut stream) => {
                let _ = tx.send(Cmd::Events(true));
                loop {
                    let ev = tokio::select! {
                        () = cancel.cancelled() => return,
                        ev = stream.next() => ev,
                    };
                    match ev {
                        Some(Ok(ev)) => {
                            let stopped = ev.container_event_type
                                == ContainerEventType::ContainerStoppedEvent as i32
                                || ev.container_event_type
                                    == ContainerEventType::ContainerDeletedEvent as i32;
                            if stopped && tx.send(Cmd::Check(ev.container_id)).is_err() {
                                return;
                            }
                        }
                        Some(Err(s)) => {
                            tracing::warn!(error = %s.message(), "CRI event stream broke");
                            break;
                        }
                        None => break,
                    }
                }
                let _ = tx.send(Cmd::Events(false));
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
        }
    }
}
