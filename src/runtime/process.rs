//! Host-mode process tasks: each task runs under its own shim (see `shim`); the agent
//! learns of its exit through the shim's pipe or pidfds (`exit_watch`), never by polling,
//! and reads how it went from the run journal (`outcome`).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use super::exit_watch::ExitWatch;
use super::launcher::Launcher;
use super::outcome::{self, settle, terminated_from};
use super::proc_handle::{PidFd, ProcHandle, signal_group};
use super::records::{self, Launch, Target, Unrecorded};
use super::{EventSink, Observed, Runtime, RuntimeError, RuntimeEvent, TaskRef};
use crate::task::identity::{RunAs, SecurityContext};
use crate::task::model::Terminated;
use crate::task::time::Time;

/// How long a freshly spawned shim may take to report the task started.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Launches of one start when no shim ever took the task.
const LAUNCH_ATTEMPTS: u32 = 3;

#[derive(Clone)]
pub struct ProcessRuntime {
    launcher: std::sync::Arc<Launcher>,
    grace: Duration,
    max_log_bytes: u64,
    /// Who host tasks run as unless their securityContext says (`--task-run-as-user`).
    default_run_as: RunAs,
}

impl ProcessRuntime {
    /// `exe` is the agent's own binary, started again in its `shim` role.
    pub fn new(exe: PathBuf, grace: Duration, max_log_bytes: u64) -> Self {
        ProcessRuntime {
            launcher: std::sync::Arc::new(Launcher::new(exe)),
            grace,
            max_log_bytes,
            default_run_as: RunAs::default(),
        }
    }

    /// Host tasks run as `run_as` unless their securityContext says otherwise.
    pub fn with_default_run_as(mut self, run_as: RunAs) -> Self {
        self.default_run_as = run_as;
        self
    }

    /// Writes the launch record, starts the shim and waits until the task runs or failed.
    pub(crate) async fn launch(
        &self,
        task: TaskRef,
        target: Option<Target>,
        events: EventSink,
    ) -> Result<Observed, RuntimeError> {
        let p = task
            .spec
            .process
            .as_ref()
            .ok_or_else(|| RuntimeError::Invalid("not a process task".into()))?;
        let sc = p.security_context.as_ref();
        let launch = Launch {
            argv: p.command.iter().chain(&p.args).cloned().collect(),
            // Marks the task's processes as ours (the sidecar env scan skips them); a task
            // may override it like any other variable.
            env: std::iter::once(crate::task::model::EnvVar {
                name: outcome::TASK_MARKER.into(),
                value: task.name.clone(),
            })
            .chain(p.env.iter().cloned())
            .collect(),
            working_dir: p.working_dir.clone(),
            timeout_ms: task.spec.effective_timeout().map(|s| s as u64 * 1000),
            grace_ms: self.grace.as_millis() as u64,
            max_log_bytes: self.max_log_bytes,
            // Host tasks start from the agent's default identity; sidecar tasks from the
            // main container's (the shim reads it).
            run_as: match target {
                None => self.default_run_as,
                Some(_) => RunAs::default(),
            }
            .overlaid(sc.map(SecurityContext::run_as).unwrap_or_default()),
            allow_privilege_escalation: !SecurityContext::no_new_privs(sc),
            target,
            boot_id: records::boot_id().map(str::to_string),
        };
        let mut attempt = 1;
        let pipe = loop {
            records::write_launch(&task.dir, &launch).map_err(RuntimeError::before_launch)?;
            let mut pipe = self
                .launcher
                .launch(&task.dir)
                .await
                .map_err(RuntimeError::before_launch)?;
            match first_report(&mut pipe).await {
                Report::Silent if attempt < LAUNCH_ATTEMPTS => {
                    // No shim ever ran (the fork server died with the request queued):
                    // nothing of the task started, so launching again is safe.
                    tracing::warn!(task = %task.name, attempt, "no supervisor took the task; launching it again");
                    attempt += 1;
                }
                Report::Silent => {
                    return Err(RuntimeError::Launch(io::Error::other(
                        "no supervisor took the task",
                    )));
                }
                Report::Failed(Some(errno), msg) => {
                    // Nothing started: out of processes and the like is retried later.
                    tracing::warn!(task = %task.name, error = msg, "the supervisor could not start the task");
                    return Err(RuntimeError::before_launch(io::Error::from_raw_os_error(
                        errno,
                    )));
                }
                Report::Failed(None, msg) => {
                    return Err(RuntimeError::Launch(io::Error::other(msg)));
                }
                Report::TimedOut => {
                    tracing::warn!(task = %task.name, "supervisor did not report within {:?}", LAUNCH_TIMEOUT);
                    break pipe;
                }
                Report::Spoke => break pipe,
            }
        };
        self.observe(task, events, Some(pipe)).await
    }

    /// Reads the journal and, for a running task, starts waiting for its exit: on the
    /// shim's pipe when this agent started it, else on its and the task's pidfds.
    async fn observe(
        &self,
        task: TaskRef,
        events: EventSink,
        pipe: Option<pipe::Receiver>,
    ) -> Result<Observed, RuntimeError> {
        let judged = match pipe {
            // A start: a short read of the journal, in line. Handing every start to the
            // blocking pool would spread the work over its threads and their malloc arenas.
            Some(_) => judge(&task, false)?,
            // Recovery: thousands at once, off the event loop's two workers.
            None => {
                let t = task.clone();
                tokio::task::spawn_blocking(move || judge(&t, true))
                    .await
                    .map_err(io::Error::other)??
            }
        };
        match judged {
            Judged::Done(t) => Ok(Observed::Terminated(t)),
            Judged::Running {
                started_at,
                shim,
                main,
            } => {
                let watch = match pipe {
                    Some(p) => ExitWatch::Pipe(p),
                    None => ExitWatch::Pids { shim, main },
                };
                spawn_exit_waiter(task, events, watch);
                Ok(Observed::Running { started_at })
            }
        }
    }

    /// Picks up a task found in the data dir after a restart: `None` when it never
    /// started (the caller starts it), else how it is or ended.
    pub(crate) async fn recover(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> Option<Result<Observed, RuntimeError>> {
        match start_state(&task.dir).await {
            StartState::NotStarted => None,
            StartState::Started => Some(self.observe(task, events, None).await),
        }
    }

    pub(crate) fn stop_task(
        &self,
        task: TaskRef,
        grace: Duration,
    ) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(async move {
            stop(&task.dir, grace).await;
            Ok(())
        })
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn validate(&self, _spec: &crate::task::model::TaskSpec) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn start(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        let rt = self.clone();
        Box::pin(async move { rt.launch(task, None, events).await })
    }

    fn adopt(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        let rt = self.clone();
        Box::pin(async move {
            match rt.recover(task.clone(), events.clone()).await {
                Some(observed) => observed,
                None => rt.launch(task, None, events).await,
            }
        })
    }

    fn stop(&self, task: TaskRef, grace: Duration) -> BoxFuture<'static, Result<(), RuntimeError>> {
        self.stop_task(task, grace)
    }
}

/// What a new shim said first on its notify pipe.
enum Report {
    /// EOF before its first word: no shim ever ran, so nothing of the task started.
    Silent,
    /// An error line: with an errno when nothing of the task started.
    Failed(Option<i32>, String),
    /// Anything else (`started`, or EOF after its first word): the journal tells the rest.
    Spoke,
    TimedOut,
}

/// Reads until the shim said more than its first word (`records::SHIM_HELLO`), or EOF.
async fn first_report(pipe: &mut tokio::net::unix::pipe::Receiver) -> Report {
    let hello = records::SHIM_HELLO.as_bytes();
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let deadline = tokio::time::Instant::now() + LAUNCH_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, pipe.read(&mut chunk)).await {
            Err(_) => return Report::TimedOut,
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
        };
        if n == 0 {
            return if buf.is_empty() {
                Report::Silent
            } else {
                Report::Spoke
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        let rest = match buf.strip_prefix(hello) {
            Some(rest) => rest,
            None if hello.starts_with(&buf) => continue, // the first word, cut short
            None => &buf[..],
        };
        if rest.is_empty() {
            continue;
        }
        return match std::str::from_utf8(rest)
            .ok()
            .and_then(records::parse_start_failure)
        {
            Some((errno, msg)) => Report::Failed(errno, msg.to_string()),
            None => Report::Spoke,
        };
    }
}

fn read_run(dir: &Path) -> Result<records::Run, RuntimeError> {
    records::read_run(dir).map_err(|source| RuntimeError::Record {
        path: dir.join(records::RUN).display().to_string(),
        source,
    })
}

/// What the journal says of a task that is not (or no longer) waiting for its shim's
/// first report. Blocking.
enum Judged {
    Done(Terminated),
    Running {
        started_at: Time,
        shim: Option<PidFd>,
        main: Option<PidFd>,
    },
}

fn judge(task: &TaskRef, adopted: bool) -> Result<Judged, RuntimeError> {
    let run = read_run(&task.dir)?;
    if let Some(x) = &run.exit {
        return Ok(Judged::Done(terminated_from(x, task)));
    }
    if run.launch.as_ref().is_some_and(Launch::from_earlier_boot) {
        // No shim survives a reboot: whatever the journal says, the run is over.
        return Ok(Judged::Done(settle(task, Unrecorded::NodeRestarted, &run)));
    }
    match &run.started {
        Some(started) if lock_held(&records::running_lock(&task.dir)) => Ok(Judged::Running {
            started_at: started.started_at.unwrap_or_else(Time::now),
            // Only an adopted task needs them: a started one is watched on its pipe.
            shim: adopted.then(|| PidFd::of(&started.shim)).flatten(),
            main: adopted
                .then(|| started.main.and_then(|m| PidFd::of(&m)))
                .flatten(),
        }),
        // The shim is gone: it just wrote the exit line (`settle` then finds it), or died.
        Some(_) => Ok(Judged::Done(settle(task, Unrecorded::SupervisorLost, &run))),
        None => match (&run.claimed, lock_held(&records::shim_lock(&task.dir))) {
            // Still starting (slow, or stopped): it is the shim's; watch it like a running one.
            (claim, true) => Ok(Judged::Running {
                started_at: Time::now(),
                shim: adopted
                    .then(|| claim.as_ref().and_then(|c| PidFd::of(&c.shim)))
                    .flatten(),
                main: None,
            }),
            // It died after claiming the launch: the task may run, it is never run again.
            (Some(_), false) => Ok(Judged::Done(settle(task, Unrecorded::SupervisorLost, &run))),
            (None, false) => Err(RuntimeError::Launch(io::Error::other(NEVER_STARTED))),
        },
    }
}

/// A shim that ended before it claimed the launch: the task never ran.
const NEVER_STARTED: &str = "the supervisor exited before starting the task (see the agent's log)";

/// What the journal says about a task found after a restart.
enum StartState {
    /// No shim took its launch: it never ran, and is started now.
    NotStarted,
    /// A shim took it (or the node restarted since): how it went is in the journal.
    Started,
}

async fn start_state(dir: &Path) -> StartState {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let run = records::read_run(dir).unwrap_or_default();
        let rebooted = run.launch.as_ref().is_some_and(Launch::from_earlier_boot);
        if run.started.is_some() || run.exit.is_some() || rebooted {
            return StartState::Started;
        }
        // A shim that holds its lock is starting: wait for its `started` line (or its end).
        let starting = lock_held(&records::shim_lock(dir));
        if !starting || Instant::now() >= deadline {
            return if run.claimed.is_some() || starting {
                StartState::Started
            } else {
                StartState::NotStarted
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_exit_waiter(task: TaskRef, events: EventSink, watch: ExitWatch) {
    tokio::spawn(async move {
        if let Err(e) = watch.wait(&records::running_lock(&task.dir)).await {
            tracing::error!(task = %task.name, error = %e, "waiting for task exit failed");
        }
        let t = match read_run(&task.dir) {
            Ok(run) => match &run.exit {
                Some(x) => Some(terminated_from(x, &task)),
                // No journal (no launch line) any more: the task is being deleted.
                None if run.launch.is_none() => None,
                // The shim died: what it leaves is recorded durably (rare: off the loop).
                None => {
                    let t = task.clone();
                    tokio::task::spawn_blocking(move || {
                        if run.claimed.is_none() {
                            outcome::never_started(&t, NEVER_STARTED)
                        } else {
                            settle(&t, Unrecorded::SupervisorLost, &run)
                        }
                    })
                    .await
                    .ok()
                }
            },
            Err(e) => {
                tracing::error!(task = %task.name, error = %e, "unreadable run journal");
                None
            }
        };
        if let Some(t) = t {
            let _ = events.send(RuntimeEvent {
                name: task.name,
                uid: task.uid,
                observed: Observed::Terminated(t),
            });
        }
    });
}

/// Whether a shim holds the lock on `path`. Only a missing file or a lock granted counts
/// as "no": anything else (out of descriptors, say) is no proof the shim is gone.
pub(crate) fn lock_held(path: &Path) -> bool {
    match File::open(path) {
        Err(e) => e.kind() != io::ErrorKind::NotFound,
        Ok(f) => Flock::lock(f, FlockArg::LockSharedNonblock).is_err(),
    }
}

/// Asks the shim to stop the task's tree (it applies the grace period, then SIGKILL) and
/// waits until the shim is gone. Only cheap non-blocking checks run between sleeps.
async fn stop(dir: &Path, grace: Duration) {
    let deadline = Instant::now() + grace + Duration::from_secs(5);
    let shim_lock = records::shim_lock(dir);
    let read_rec = || records::read_run(dir).ok().and_then(|r| r.started);
    let mut rec = read_rec();
    let mut signalled = false;
    let mut pause = Duration::from_millis(2);
    while lock_held(&shim_lock) {
        if rec.is_none() {
            rec = read_rec();
        }
        if !signalled && let Some(shim) = rec.as_ref().and_then(|r| ProcHandle::of(&r.shim)) {
            // The shim turns this into TERM for the task tree, grace, then KILL.
            let _ = shim.signal(Signal::SIGTERM);
            signalled = true;
        }
        if Instant::now() >= deadline {
            if let Some(shim) = rec.as_ref().and_then(|r| ProcHandle::of(&r.shim)) {
                tracing::warn!(dir = %dir.display(), "supervisor ignored the stop request; killing it");
                let _ = shim.signal(Signal::SIGKILL);
            }
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    // Whatever outlived a dead supervisor goes too (its group, while provably its own).
    if let Some(main) = rec.and_then(|r| r.main) {
        signal_group(&main, Signal::SIGKILL);
    }
}
