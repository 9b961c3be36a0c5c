//! Host-mode process tasks: each task runs under its own shim (see `shim`), and the agent
//! learns of its exit by waiting on the shim's `running.lock`, never by polling.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

use super::launcher::Launcher;
use super::procfs::ProcIdentity;
use super::records::{self, ExitRecord, Launch, ShimRecord, Target};
use super::{EventSink, Observed, Runtime, RuntimeError, RuntimeEvent, TaskRef};
use crate::task::model::{Terminated, reason};
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
}

impl ProcessRuntime {
    /// `exe` is the agent's own binary, started again in its `shim` role.
    pub fn new(exe: PathBuf, grace: Duration, max_log_bytes: u64) -> Self {
        ProcessRuntime {
            launcher: std::sync::Arc::new(Launcher::new(exe)),
            grace,
            max_log_bytes,
        }
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
        let launch = Launch {
            argv: p.command.iter().chain(&p.args).cloned().collect(),
            // Marks the task's processes as ours (the sidecar env scan skips them); a task
            // may override it like any other variable.
            env: std::iter::once(crate::task::model::EnvVar {
                name: "TASK_EXECUTOR_TASK".into(),
                value: task.name.clone(),
            })
            .chain(p.env.iter().cloned())
            .collect(),
            working_dir: p.working_dir.clone(),
            timeout_ms: task.spec.effective_timeout().map(|s| s as u64 * 1000),
            grace_ms: self.grace.as_millis() as u64,
            max_log_bytes: self.max_log_bytes,
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
        self.observe(task, events, ExitWatch::Pipe(pipe)).await
    }

    /// Reads the records and, for a running task, starts waiting for its exit.
    async fn observe(
        &self,
        task: TaskRef,
        events: EventSink,
        watch: ExitWatch,
    ) -> Result<Observed, RuntimeError> {
        let dir = task.dir.clone();
        let run = read_run(&dir)?;
        if let Some(x) = &run.exit {
            return Ok(Observed::Terminated(terminated_from(x, &task)));
        }
        let rebooted = run.launch.as_ref().is_some_and(Launch::from_earlier_boot);
        match run.started {
            None => Err(RuntimeError::Launch(io::Error::other(
                "the supervisor exited before starting the task (see the agent's log)".to_string(),
            ))),
            Some(ShimRecord { main: None, .. }) => Ok(Observed::Terminated(lost(&task, None))),
            Some(ShimRecord {
                main: Some(main),
                started_at,
                ..
            }) => {
                if !lock_held(&records::running_lock(&dir)) {
                    // The shim is gone: either it just wrote the exit record, or it died.
                    return Ok(Observed::Terminated(match read_exit(&task)? {
                        Some(t) => t,
                        None if rebooted => node_restarted(&task, true),
                        None => lost(&task, Some(main)),
                    }));
                }
                spawn_exit_waiter(task, main, events, watch);
                Ok(Observed::Running {
                    started_at: started_at.unwrap_or_else(Time::now),
                })
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
            StartState::CutShortByReboot => {
                Some(Ok(Observed::Terminated(node_restarted(&task, false))))
            }
            StartState::Started => Some(self.adopt_existing(task, events).await),
        }
    }

    async fn adopt_existing(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> Result<Observed, RuntimeError> {
        self.observe(task, events, ExitWatch::Lock).await
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

fn read_exit(task: &TaskRef) -> Result<Option<Terminated>, RuntimeError> {
    Ok(read_run(&task.dir)?.exit.map(|r| terminated_from(&r, task)))
}

/// Maps the shim's exit record to the status the API shows.
pub fn terminated_from(rec: &ExitRecord, task: &TaskRef) -> Terminated {
    if let Some(err) = &rec.start_error {
        let (why, msg) = if rec.target_gone {
            (
                reason::TARGET_RESTARTED,
                format!("main container is gone: {err}"),
            )
        } else {
            (reason::START_ERROR, err.clone())
        };
        let mut t = Terminated::failed_to_start(why, rec.exit_code.unwrap_or(128), msg);
        t.finished_at = rec.finished_at.unwrap_or(t.finished_at);
        return t;
    }
    let mut t = Terminated::from_exit(
        rec.exit_code,
        rec.signal,
        rec.started_at,
        rec.finished_at.unwrap_or_else(Time::now),
    );
    if rec.timed_out {
        t.reason = reason::TIMEOUT.into();
        t.message = Some(format!(
            "Task exceeded timeout of {} seconds",
            task.spec.effective_timeout().unwrap_or_default()
        ));
    } else if rec.target_gone
        || (rec.stop_requested && task.dir.join(records::TARGET_RESTARTED).exists())
    {
        t.reason = reason::TARGET_RESTARTED.into();
        t.message = Some("the main container restarted while the task ran".into());
    } else if rec.stop_requested {
        // Its supervisor was told to stop it: by a DELETE, or by `task-executor init`
        // when the agent's container stopped (the exit code is the task's own answer).
        let stopped = "stopped on request: the task was being deleted, or the agent's \
                       container stopped";
        t.message = Some(match t.message.take() {
            Some(how) => format!("{stopped}; {how}"),
            None => stopped.into(),
        });
    }
    t
}

/// The supervisor died without recording an exit: say so, and leave nothing running.
/// The task's group is only signalled while its leader is provably the recorded process.
fn lost(task: &TaskRef, main: Option<ProcIdentity>) -> Terminated {
    if let Some(m) = main.filter(|m| m.pid > 1 && m.is_alive()) {
        let _ = killpg(Pid::from_raw(m.pid), Signal::SIGKILL);
    }
    tracing::warn!(task = %task.name, "task supervisor died without recording an exit status");
    crate::metrics::supervisor_lost();
    Terminated {
        exit_code: 137,
        signal: None,
        reason: reason::SUPERVISOR_LOST.into(),
        message: Some(
            "the task's supervisor died before recording an exit status; the task was stopped"
                .into(),
        ),
        started_at: None,
        finished_at: Time::now(),
    }
}

/// What the journal says about a task found after a restart.
enum StartState {
    NotStarted,
    /// Launched in an earlier boot, with no trace of how far it got.
    CutShortByReboot,
    Started,
}

async fn start_state(dir: &Path) -> StartState {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let run = records::read_run(dir).unwrap_or_default();
        if run.started.is_some() || run.exit.is_some() {
            return StartState::Started;
        }
        // A shim that holds its lock but has not written its record yet is starting.
        if !lock_held(&records::shim_lock(dir)) || Instant::now() >= deadline {
            return if run.launch.as_ref().is_some_and(Launch::from_earlier_boot) {
                StartState::CutShortByReboot
            } else {
                StartState::NotStarted
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node restarted after the task's launch was recorded and before its exit was: the
/// task may have run (or still been starting), so it is reported, not started again.
fn node_restarted(task: &TaskRef, started: bool) -> Terminated {
    tracing::warn!(task = %task.name, "task was cut short by a node restart");
    Terminated {
        exit_code: 137,
        signal: None,
        reason: reason::NODE_RESTARTED.into(),
        message: Some(if started {
            "the node restarted while the task ran".into()
        } else {
            "the node restarted while the task was starting; it is not started again, as it \
             may already have run"
                .into()
        }),
        started_at: None,
        finished_at: Time::now(),
    }
}

/// How the agent learns that a running task finished.
enum ExitWatch {
    /// EOF on the stdout pipe of a shim this agent started: no thread, no polling.
    Pipe(tokio::net::unix::pipe::Receiver),
    /// A shim adopted after a restart: wait for its `running.lock` on a small thread of
    /// its own (never on the shared blocking pool, which a thousand tasks would exhaust).
    Lock,
}

fn spawn_exit_waiter(task: TaskRef, main_pid: ProcIdentity, events: EventSink, watch: ExitWatch) {
    tokio::spawn(async move {
        let waited = match watch {
            ExitWatch::Pipe(mut pipe) => {
                let mut sink = [0u8; 64];
                loop {
                    match pipe.read(&mut sink).await {
                        Ok(0) => break Ok(()),
                        Ok(_) => continue,
                        Err(e) => break Err(e),
                    }
                }
            }
            ExitWatch::Lock => {
                let lock_path = records::running_lock(&task.dir);
                let (tx, rx) = tokio::sync::oneshot::channel();
                let spawned = std::thread::Builder::new()
                    .name("exit-wait".into())
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let _ = tx.send(wait_unlocked(&lock_path));
                    });
                match spawned {
                    Ok(_) => rx.await.unwrap_or_else(|e| Err(io::Error::other(e))),
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = waited {
            tracing::error!(task = %task.name, error = %e, "waiting for task exit failed");
        }
        let t = match read_exit(&task) {
            Ok(Some(t)) => t,
            Ok(None) if !task.dir.exists() => return, // deleted meanwhile
            Ok(None) => lost(&task, Some(main_pid)),
            Err(e) => {
                tracing::error!(task = %task.name, error = %e, "unreadable exit record");
                lost(&task, Some(main_pid))
            }
        };
        let _ = events.send(RuntimeEvent {
            name: task.name,
            uid: task.uid,
            observed: Observed::Terminated(t),
        });
    });
}

/// Blocks until nobody holds an exclusive lock on `path`.
fn wait_unlocked(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    let _held = Flock::lock(f, FlockArg::LockShared).map_err(|(_, e)| io::Error::from(e))?;
    Ok(())
}

pub(crate) fn lock_held(path: &Path) -> bool {
    match File::open(path) {
        Err(_) => false,
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
        if !signalled && let Some(r) = rec.as_ref().filter(|r| r.shim.is_alive()) {
            // The shim turns this into TERM for the task tree, grace, then KILL.
            let _ = kill(Pid::from_raw(r.shim.pid), Signal::SIGTERM);
            signalled = true;
        }
        if Instant::now() >= deadline {
            if let Some(r) = rec.as_ref().filter(|r| r.shim.is_alive()) {
                tracing::warn!(dir = %dir.display(), "supervisor ignored the stop request; killing it");
                let _ = kill(Pid::from_raw(r.shim.pid), Signal::SIGKILL);
            }
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    // Whatever outlived a dead supervisor goes too.
    if let Some(main) = rec.and_then(|r| r.main).filter(|m| m.is_alive()) {
        let _ = killpg(Pid::from_raw(main.pid), Signal::SIGKILL);
    }
}
