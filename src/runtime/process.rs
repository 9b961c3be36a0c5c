//! Host-mode process tasks: each task runs under its own shim (see `shim`); the agent
//! learns of its exit through the shim's pipe or pidfds (`exit_watch`), never by polling,
//! and reads how it went from the run journal (`outcome`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use super::containment::{self, Parent};
use super::exit_watch::ExitWatch;
use super::journal_watch::JournalWatch;
use super::launcher::Launcher;
use super::limits;
use super::outcome::{self, settle};
use super::records::{self, HookLaunch, HookPlace, Launch, Target, Unrecorded};
use super::{EventSink, Observed, Runtime, RuntimeError, RuntimeEvent, TaskRef};
use crate::sys::proc_handle::{PidFd, ProcHandle, signal_group};
use crate::sys::procfs::ProcIdentity;
use crate::task::identity::{RunAs, SecurityContext};
use crate::task::model::{ExecMode, HookName};

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
    /// The limit of a hook that sets no positive `timeoutSeconds` (`--hook-timeout`;
    /// `None`: no limit, as upstream).
    hook_timeout: Option<Duration>,
    /// Where each task's cgroup is made (`None`: the agent can make none).
    containment: Option<Parent>,
    /// `--end-task-with-main`.
    end_with_main: bool,
    /// Why this agent can't stop tasks (`proc_handle::check_signalling`), if it can't.
    cannot_signal: Option<std::sync::Arc<str>>,
    /// Tasks without a `seccompProfile` get `RuntimeDefault` (`--task-policy restricted`).
    default_seccomp: bool,
    /// Where tasks' limits and usage are kept (`limits::detect`).
    controllers: std::sync::Arc<limits::Controllers>,
    /// The pids limit of tasks that set none (`--task-pids-limit`; `None`: none).
    default_pids: Option<u64>,
    /// `--task-uid-range` is set: a task without `runAsUser` gets a uid of its own.
    own_uids: bool,
}

impl ProcessRuntime {
    /// `exe` is the agent's own binary, started again in its `shim` role.
    pub fn new(exe: PathBuf, grace: Duration, max_log_bytes: u64) -> Self {
        ProcessRuntime {
            launcher: std::sync::Arc::new(Launcher::new(exe)),
            grace,
            max_log_bytes,
            default_run_as: RunAs::default(),
            hook_timeout: None,
            containment: None,
            cannot_signal: None,
            end_with_main: false,
            default_seccomp: false,
            controllers: std::sync::Arc::new(limits::Controllers::none(
                "the agent was not told where task cgroups go",
            )),
            default_pids: None,
            own_uids: false,
        }
    }

    /// Tasks' limits go to `controllers`; `default_pids` is the pids limit of a task that
    /// sets none; `own_uids`: tasks get uids of their own (`--task-uid-range`).
    pub fn with_limits(
        mut self,
        controllers: limits::Controllers,
        default_pids: Option<u64>,
        own_uids: bool,
    ) -> Self {
        self.controllers = std::sync::Arc::new(controllers);
        self.default_pids = default_pids;
        self.own_uids = own_uids;
        self
    }

    /// What the task's shim does for its `resources` (and the agent's pids default), or
    /// why they can't be enforced here (a 400). `supervisors`: its shim, and its reaper
    /// when something of it runs in the main container; `own_uid`: all of its commands
    /// run as a uid of its own.
    pub(crate) fn plan_limits(
        &self,
        spec: &crate::task::model::TaskSpec,
        supervisors: u64,
        own_uid: bool,
    ) -> Result<Option<limits::LaunchLimits>, RuntimeError> {
        let Some(p) = &spec.process else {
            return Ok(None);
        };
        let asked = match &p.resources {
            Some(r) => r
                .resolve("process.resources")
                .map_err(RuntimeError::Invalid)?,
            None => Default::default(),
        };
        let cx = limits::TaskContext {
            at: "process.resources",
            default_pids: self.default_pids,
            supervisors,
            own_uid,
        };
        self.controllers
            .plan(&asked, cx)
            .map_err(RuntimeError::Invalid)
    }

    /// Whether a new task would have a uid of its own for all of its commands, on this
    /// runtime (tasks in the agent's container only).
    fn would_have_own_uid(&self, spec: &crate::task::model::TaskSpec) -> bool {
        self.own_uids
            && spec
                .process
                .as_ref()
                .and_then(|p| p.security_context.as_ref())
                .is_none_or(|sc| sc.run_as_user.is_none())
    }

    /// Hooks that set no positive `timeoutSeconds` are killed after `limit`.
    pub fn with_hook_timeout(mut self, limit: Option<Duration>) -> Self {
        self.hook_timeout = limit;
        self
    }

    /// What a task's main command leaves running ends when it exits.
    pub fn with_end_with_main(mut self, yes: bool) -> Self {
        self.end_with_main = yes;
        self
    }

    /// The result of `proc_handle::check_signalling`: a failure makes the agent not ready.
    pub fn with_signalling(mut self, checked: Result<(), String>) -> Self {
        self.cannot_signal = checked.err().map(Into::into);
        self
    }

    /// Not ready when it could not stop a task it started.
    pub(crate) fn own_readiness(&self) -> super::Readiness {
        match &self.cannot_signal {
            Some(why) => super::Readiness::NotReady(why.to_string()),
            None => super::Readiness::Ready,
        }
    }

    /// Each task gets a cgroup under `parent` (see `containment`).
    pub fn with_containment(mut self, parent: Option<Parent>) -> Self {
        self.containment = parent;
        self
    }

    /// Tasks without a `seccompProfile` run under `RuntimeDefault`.
    pub fn with_default_seccomp(mut self, on: bool) -> Self {
        self.default_seccomp = on;
        self
    }

    /// Host tasks run as `run_as` unless their securityContext says otherwise.
    pub fn with_default_run_as(mut self, run_as: RunAs) -> Self {
        self.default_run_as = run_as;
        self
    }

    /// Who the task's commands in the agent's container run as unless its securityContext
    /// says: its own uid when it was given one, with the default's gid when
    /// `--task-run-as-user` sets one, else the uid's number; else the default.
    fn host_run_as(&self, task: &TaskRef) -> RunAs {
        match task.host_uid {
            Some(uid) => RunAs {
                uid: Some(uid),
                gid: Some(self.default_run_as.gid.unwrap_or(uid)),
            },
            None => self.default_run_as,
        }
    }

    /// Writes the launch record, starts the shim and waits until the task runs or failed.
    pub(crate) async fn launch(
        &self,
        task: TaskRef,
        target: Option<Target>,
        hook_target: Option<Result<Target, String>>,
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
            // Zero or negative: a deadline already passed, as upstream reads it (the
            // command starts and is stopped at once, `TaskTimeout`).
            timeout_ms: task
                .spec
                .effective_timeout()
                .map(|s| (s.max(0) as u64).saturating_mul(1000)),
            grace_ms: self.grace.as_millis() as u64,
            max_log_bytes: self.max_log_bytes,
            // Commands in the agent's container (the task's or a hook's) start from the
            // agent's default identity, those in the main container from its identity
            // (the shim reads it); the task's securityContext applies over either.
            run_as: sc.map(SecurityContext::run_as).unwrap_or_default(),
            host_run_as: self.host_run_as(&task),
            allow_privilege_escalation: !SecurityContext::no_new_privs(sc),
            seccomp: match sc.and_then(|s| s.seccomp_profile.as_ref()) {
                Some(p) => p.is_runtime_default(),
                None => self.default_seccomp,
            },
            target,
            boot_id: records::boot_id().map(str::to_string),
            pre_start: hook_launch(
                &task,
                HookName::PreStart,
                hook_target.as_ref(),
                self.hook_timeout,
            ),
            post_stop: hook_launch(
                &task,
                HookName::PostStop,
                hook_target.as_ref(),
                self.hook_timeout,
            ),
            nonce: None,
            containment: self.containment.clone(),
            end_with_main: self.end_with_main,
            limits: None,
        };
        // The shim, and its reaper when a command runs in the main container.
        let remote_hook = [&launch.pre_start, &launch.post_stop]
            .into_iter()
            .flatten()
            .any(|h| !matches!(h.place, HookPlace::Local));
        let supervisors = if launch.target.is_some() || remote_hook {
            2
        } else {
            1
        };
        let own_uid = task.host_uid.is_some()
            && launch.target.is_none()
            && !remote_hook
            && launch.run_as.uid.is_none();
        let launch = Launch {
            limits: self.plan_limits(&task.spec, supervisors, own_uid)?,
            ..launch
        };
        let mut attempt = 1;
        let pipe = loop {
            let launch = Launch {
                nonce: Some(new_nonce()),
                ..launch.clone()
            };
            let written =
                records::write_launch(&task.dir, &launch).map_err(RuntimeError::before_launch)?;
            if !written {
                // A shim took an earlier launch (this is a restart's adoption or a retry
                // that found it): the task is never launched again; the journal says how
                // it is.
                tracing::warn!(task = %task.name, "an earlier launch of the task was taken; following it instead of launching again");
                return self.observe(task, events, None).await;
            }
            let mut pipe = self
                .launcher
                .launch(&task.dir, launch.nonce.as_deref())
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
    /// shim's pipe when this agent started it, else on its and the task's pidfds (or, for
    /// a task with hooks, on its journal).
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
                crate::sys::offload::offload(move || judge(&t, true)).await?
            }
        };
        match judged {
            Judged::Done(o) => Ok(o),
            Judged::Alive {
                observed,
                shim,
                main,
                hooks,
                cgroups,
            } => {
                // Its usage is in `/metrics` while it runs.
                limits::track(&task.uid, &task.name, cgroups);
                let watch = match pipe {
                    Some(p) => ExitWatch::Pipe(p),
                    None => adopted_watch(&task, shim, main, hooks),
                };
                spawn_exit_waiter(task, events, watch, hooks, observed.clone());
                Ok(observed)
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
        match start_state(&task.dir) {
            StartState::NotStarted if ran_without_journal(&task.dir) => {
                // Its journal was emptied or lost, yet it bears a claim's mark or the task
                // left output: it ran (maybe still runs, unsupervised). Reported as lost, never run again.
                let t = task.clone();
                Some(
                    crate::sys::offload::offload(move || {
                        tracing::error!(task = %t.name, "the task's launch was claimed but its run journal says nothing; it is not run again");
                        settle_durably(&t, Unrecorded::SupervisorLost, &records::Run::default())
                    })
                    .await,
                )
            }
            StartState::NotStarted => None,
            StartState::Started => Some(self.observe(task, events, None).await),
            // Its shim says soon: the caller adopts it again later (the task shows as
            // waiting meanwhile).
            StartState::Starting => Some(Err(RuntimeError::Journal {
                path: task.dir.join(records::RUN).display().to_string(),
                source: io::Error::other("its supervisor is still starting it"),
            })),
        }
    }

    pub(crate) fn stop_task(
        &self,
        task: TaskRef,
        grace: Duration,
    ) -> BoxFuture<'static, Result<(), RuntimeError>> {
        let limit = self.hook_timeout;
        Box::pin(async move {
            // A stop waits for the task's hooks too: a `preStart` is stopped (with the
            // grace period), a `postStop` runs to its end or timeout (`None`: a hook
            // without one; then the stop waits as long as the shim runs it).
            let hooks: Option<Duration> = task
                .spec
                .lifecycle_hooks()
                .map(|l| {
                    HookName::ALL
                        .iter()
                        .filter_map(|h| l.hook(*h))
                        .map(|h| h.timeout(limit))
                        .sum()
                })
                .unwrap_or(Some(Duration::ZERO));
            stop(&task.dir, grace, hooks).await;
            limits::untrack(&task.uid);
            let (dir, uid) = (task.dir.clone(), task.host_uid);
            crate::sys::offload::offload(move || end_leftovers(&dir, uid))
                .await
                .map_err(RuntimeError::Io)
        })
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn validate(&self, spec: &crate::task::model::TaskSpec) -> Result<(), RuntimeError> {
        // Tasks here run in the agent's container, all of their commands.
        self.plan_limits(spec, 1, self.would_have_own_uid(spec))
            .map(drop)
    }

    fn start(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        let rt = self.clone();
        Box::pin(async move { rt.launch(task, None, None, events).await })
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
                None => rt.launch(task, None, None, events).await,
            }
        })
    }

    fn stop(&self, task: TaskRef, grace: Duration) -> BoxFuture<'static, Result<(), RuntimeError>> {
        self.stop_task(task, grace)
    }

    fn readiness(&self) -> BoxFuture<'static, super::Readiness> {
        let r = self.own_readiness();
        Box::pin(async move { r })
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
    records::read_run(dir).map_err(|source| RuntimeError::Journal {
        path: dir.join(records::RUN).display().to_string(),
        source,
    })
}

/// What the journal says of a task that is not (or no longer) waiting for its shim's
/// first report. Blocking.
enum Judged {
    Done(Observed),
    /// Its shim runs it (or one of its hooks): `observed` is where it stands.
    Alive {
        observed: Observed,
        /// Only an adopted task's: a started one is watched on its pipe.
        shim: Option<ProcIdentity>,
        main: Option<ProcIdentity>,
        /// It has lifecycle hooks: its journal says when it moves on.
        hooks: bool,
        /// Its cgroups (none yet while it is starting).
        cgroups: Vec<PathBuf>,
    },
}

fn judge(task: &TaskRef, adopted: bool) -> Result<Judged, RuntimeError> {
    let run = read_run(&task.dir)?;
    let hooks = run
        .launch
        .as_ref()
        .is_some_and(|l| l.pre_start.is_some() || l.post_stop.is_some());
    if run.finished() {
        return Ok(Judged::Done(outcome::observed(&run, task)));
    }
    if run.launch.as_ref().is_some_and(Launch::from_earlier_boot) {
        // No shim survives a reboot: whatever the journal says, the run is over.
        return Ok(Judged::Done(settle_durably(
            task,
            Unrecorded::NodeRestarted,
            &run,
        )?));
    }
    let shim_of = |run: &records::Run| {
        run.started
            .as_ref()
            .map(|s| s.shim)
            .or_else(|| run.claimed.as_ref().map(|c| c.shim))
    };
    let alive = |main: Option<ProcIdentity>| Judged::Alive {
        observed: outcome::observed(&run, task),
        shim: adopted.then(|| shim_of(&run)).flatten(),
        main,
        hooks,
        cgroups: run
            .claimed
            .as_ref()
            .map(records::Claim::cgroups)
            .unwrap_or_default(),
    };
    if run.exit.is_some() {
        // Its main command is over; its `postStop` hook runs, unless its shim died.
        return Ok(if lock_held(&records::running_lock(&task.dir)) {
            alive(None)
        } else {
            Judged::Done(settle_durably(task, Unrecorded::SupervisorLost, &run)?)
        });
    }
    match &run.started {
        Some(started) if lock_held(&records::running_lock(&task.dir)) => {
            Ok(alive(adopted.then_some(started.main).flatten()))
        }
        // The shim is gone: it just wrote the exit line (`settle` then finds it), or died.
        Some(_) => Ok(Judged::Done(settle_durably(
            task,
            Unrecorded::SupervisorLost,
            &run,
        )?)),
        None => match (&run.claimed, lock_held(&records::shim_lock(&task.dir))) {
            // Still starting (slow, or stopped, or its `preStart` hook runs): it is the
            // shim's; watch it like a running one.
            (_, true) => Ok(alive(None)),
            // It died after claiming the launch: the task may run, it is never run again.
            (Some(_), false) => Ok(Judged::Done(settle_durably(
                task,
                Unrecorded::SupervisorLost,
                &run,
            )?)),
            // No shim took the launch (yet: one may still come, late). It is given up
            // durably, under the journal's lock, before the failure is reported: a shim
            // that comes later finds the exit line and runs nothing.
            (None, false) => {
                let rec = records::ExitRecord {
                    exit_code: Some(128),
                    finished_at: Some(crate::task::time::Time::now()),
                    start_error: Some(NEVER_STARTED.into()),
                    ..Default::default()
                };
                match records::record_outcome(&task.dir, &rec) {
                    Ok((_, true)) => Err(RuntimeError::Launch(io::Error::other(NEVER_STARTED))),
                    // A shim took it meanwhile after all (or recorded its end): its run.
                    Ok(_) => judge(task, adopted),
                    Err(source) => Err(RuntimeError::Journal {
                        path: task.dir.join(records::RUN).display().to_string(),
                        source,
                    }),
                }
            }
        },
    }
}

/// The launch of one of the task's hooks: where it runs (`hook_target`: the main
/// container, or why it was not found, for hooks that run there).
fn hook_launch(
    task: &TaskRef,
    name: HookName,
    hook_target: Option<&Result<Target, String>>,
    hook_timeout: Option<Duration>,
) -> Option<HookLaunch> {
    let h = task.spec.lifecycle_hooks()?.hook(name)?;
    let place = match h.exec_mode() {
        ExecMode::Local => HookPlace::Local,
        ExecMode::Remote => match hook_target {
            Some(Ok(t)) => HookPlace::Remote(t.clone()),
            Some(Err(why)) => HookPlace::Unreachable(why.clone()),
            None => {
                HookPlace::Unreachable("this agent has no way to find the main container".into())
            }
        },
    };
    Some(HookLaunch {
        argv: h.command().to_vec(),
        timeout_ms: h.timeout(hook_timeout).map(|t| t.as_millis() as u64),
        place,
    })
}

/// `settle`, and the outcome it reports only if the journal now holds an exit line: an
/// end that could not be recorded (a full or read-only disk) is never shown, since a
/// restarted agent would report another. Blocking.
fn settle_durably(
    task: &TaskRef,
    why: Unrecorded,
    run: &records::Run,
) -> Result<Observed, RuntimeError> {
    let observed = settle(task, why, run);
    recorded(&task.dir).map(|()| observed)
}

/// Ok when the journal holds an exit line; else a `Journal` error (retried by the caller).
fn recorded(dir: &Path) -> Result<(), RuntimeError> {
    if read_run(dir)?.exit.is_some() {
        Ok(())
    } else {
        Err(RuntimeError::Journal {
            path: dir.join(records::RUN).display().to_string(),
            source: io::Error::other("the task's end could not be recorded"),
        })
    }
}

/// A launch's nonce: unique on this node (time, pid, a counter).
fn new_nonce() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{:x}-{:x}-{:x}",
        crate::task::time::Time::now().unix_millis(),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A shim that ended before it claimed the launch: the task never ran.
const NEVER_STARTED: &str = "the supervisor exited before starting the task (see the agent's log)";

/// The journal names no launch, yet it bears the mark of a claim or the task's output
/// (its logs, their index) is there: what only a run leaves.
fn ran_without_journal(dir: &Path) -> bool {
    let journal_says_nothing = records::read_run(dir).is_ok_and(|r| r.launch.is_none());
    journal_says_nothing
        && (records::claim_marked(dir)
            || [
                records::STDOUT,
                records::STDERR,
                crate::task::layout::OUTPUT_INDEX,
            ]
            .iter()
            .any(|f| dir.join(f).exists()))
}

/// What the journal says about a task found after a restart.
enum StartState {
    /// No shim took its launch: it never ran, and is started now.
    NotStarted,
    /// A shim took it (or the node restarted since): how it went is in the journal.
    Started,
    /// A shim holds the task but has not yet said whether it runs it (no claim, or no
    /// `started` line after its claim): looked at again later, never waited for here, so
    /// that a restart's recovery (and the API behind it) is not held up.
    Starting,
}

/// Never waits: one read of the journal and one lock probe.
fn start_state(dir: &Path) -> StartState {
    let run = records::read_run(dir).unwrap_or_default();
    let rebooted = run.launch.as_ref().is_some_and(Launch::from_earlier_boot);
    if run.started.is_some() || run.exit.is_some() || rebooted {
        return StartState::Started;
    }
    if !lock_held(&records::shim_lock(dir)) {
        return if run.claimed.is_some() {
            StartState::Started
        } else {
            StartState::NotStarted
        };
    }
    let hooks = run
        .launch
        .as_ref()
        .is_some_and(|l| l.pre_start.is_some() || l.post_stop.is_some());
    match (&run.launch, &run.claimed) {
        // A journal emptied under a running shim: it runs the task, and nothing more will
        // be learnt of its start.
        (None, _) => StartState::Started,
        // Its hooks' steps are followed through the journal (a `preStart` may run long).
        (Some(_), Some(_)) if hooks => StartState::Started,
        // Between its claim and its `started` line, or before its claim: moments.
        (Some(_), _) => StartState::Starting,
    }
}

/// How an adopted task's end is awaited: a task with hooks through its journal (and its
/// shim's pidfd: one descriptor); any other through the journal watcher shared by all
/// (none of its own), else, where inotify can't be had, its shim's and main process's
/// pidfds.
fn adopted_watch(
    task: &TaskRef,
    shim: Option<ProcIdentity>,
    main: Option<ProcIdentity>,
    hooks: bool,
) -> ExitWatch {
    let pidfd = |id: Option<ProcIdentity>| id.and_then(|i| PidFd::of(&i));
    if hooks {
        return ExitWatch::Pids {
            shim: pidfd(shim),
            main: None,
        };
    }
    match JournalWatch::new(&records::running_lock(&task.dir)) {
        Ok(w) => ExitWatch::Journal(w),
        Err(e) => {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot watch run journals with inotify; adopted tasks are watched through pidfds");
            }
            ExitWatch::Pids {
                shim: pidfd(shim),
                main: pidfd(main),
            }
        }
    }
}

fn spawn_exit_waiter(
    task: TaskRef,
    events: EventSink,
    watch: ExitWatch,
    hooks: bool,
    shown: Observed,
) {
    tokio::spawn(async move {
        let send = |observed: Observed| {
            let _ = events.send(RuntimeEvent {
                name: task.name.clone(),
                uid: task.uid.clone(),
                observed,
            });
        };
        let journal = records::running_lock(&task.dir);
        let waited = match (watch, hooks) {
            // A task with hooks moves on in steps (preStart, main, postStop): each is told
            // as its shim says it (on the pipe), or as its journal shows it (adopted).
            (ExitWatch::Pipe(p), true) => follow_pipe(p, &task, &send).await,
            (ExitWatch::Pids { shim, .. }, true) => follow_journal(shim, &task, &send, shown).await,
            (watch, _) => watch.wait(&journal).await,
        };
        if let Err(e) = waited {
            tracing::error!(task = %task.name, error = %e, "waiting for task exit failed");
        }
        limits::untrack(&task.uid);
        let observed = match read_run(&task.dir) {
            Ok(run) if run.finished() => Some(outcome::observed(&run, &task)),
            // No journal (no launch line) any more: the task is being deleted.
            Ok(run) if run.launch.is_none() => None,
            // The shim died: what it leaves is recorded durably (rare: off the loop), and
            // shown only once it is: while the disk refuses it, the task shows as it was
            // and the recording is retried.
            Ok(run) => {
                let mut pause = Duration::from_millis(200);
                loop {
                    let (t, r) = (task.clone(), run.clone());
                    let settled = crate::sys::offload::offload(move || {
                        if r.claimed.is_none() {
                            let never = outcome::never_started(&t, NEVER_STARTED);
                            recorded(&t.dir).map(|()| Observed::Terminated(never))
                        } else {
                            settle_durably(&t, Unrecorded::SupervisorLost, &r)
                        }
                    })
                    .await;
                    match settled {
                        Ok(o) => break Some(o),
                        // Deleted meanwhile: nothing to show.
                        Err(_) if !task.dir.join(records::RUN).exists() => break None,
                        Err(e) => {
                            tracing::warn!(task = %task.name, error = %e, retry_in = ?pause, "the task's end can't be recorded; it is shown once it is");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(task = %task.name, error = %e, "unreadable run journal");
                None
            }
        };
        if let Some(o) = observed {
            send(o);
        }
    });
}

/// Reads the shim's pipe until EOF; every line it writes (a hook or the main command
/// started) is a step, told as the journal then shows it.
async fn follow_pipe(
    mut pipe: pipe::Receiver,
    task: &TaskRef,
    send: &impl Fn(Observed),
) -> io::Result<()> {
    let mut sink = [0u8; 256];
    loop {
        if pipe.read(&mut sink).await? == 0 {
            return Ok(());
        }
        if let Ok(run) = read_run(&task.dir)
            && !run.finished()
        {
            send(outcome::observed(&run, task));
        }
    }
}

/// An adopted task with hooks: its journal is read every little while (at most every
/// 250 ms) until the run is over or its shim is gone, and every change is told. Tasks
/// without hooks are watched without any polling (`ExitWatch`).
async fn follow_journal(
    shim: Option<PidFd>,
    task: &TaskRef,
    send: &impl Fn(Observed),
    mut shown: Observed,
) -> io::Result<()> {
    let shim = shim
        .map(|p| {
            // Deprecated because a caller could close a borrowed fd while it is
            // registered; here the AsyncFd owns the fd for as long as it is registered.
            #[allow(deprecated)]
            tokio::io::unix::AsyncFd::with_interest(p.into_fd(), tokio::io::Interest::READABLE)
        })
        .transpose()?;
    let journal = records::running_lock(&task.dir);
    let mut pause = Duration::from_millis(5);
    loop {
        let run = records::read_run(&task.dir)?;
        if run.finished() || !lock_held(&journal) {
            return Ok(());
        }
        let now = outcome::observed(&run, task);
        if now != shown {
            send(now.clone());
            shown = now;
        }
        tokio::select! {
            _ = async {
                match &shim {
                    Some(fd) => { let _ = fd.readable().await; }
                    None => std::future::pending::<()>().await,
                }
            } => return Ok(()), // the shim is gone: its locks with it
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Whether a shim holds the lock on `path`. Only a missing file or a lock granted counts
/// as "no": anything else (out of descriptors, say) is no proof the shim is gone.
pub(crate) fn lock_held(path: &Path) -> bool {
    match crate::sys::fsutil::open_nonblocking(path) {
        Err(e) => e.kind() != io::ErrorKind::NotFound,
        Ok(f) => Flock::lock(f, FlockArg::LockSharedNonblock).is_err(),
    }
}

/// Asks the shim to stop the task's tree (it applies the grace period, then SIGKILL) and
/// waits until the shim is gone. Only cheap non-blocking checks run between sleeps.
async fn stop(dir: &Path, grace: Duration, hooks: Option<Duration>) {
    // No deadline while a hook without a limit may run: the shim is alive and ends it.
    let deadline = hooks.and_then(|h| {
        Instant::now().checked_add(
            grace
                .saturating_add(h)
                .saturating_add(Duration::from_secs(5)),
        )
    });
    let shim_lock = records::shim_lock(dir);
    // The shim's identity: from its `started` line, or from its claim (its `preStart`
    // hook runs, or it is starting).
    let read_rec = || {
        records::read_run(dir).ok().and_then(|r| {
            r.started.or_else(|| {
                r.claimed.map(|c| records::ShimRecord {
                    shim: c.shim,
                    main: None,
                    started_at: None,
                })
            })
        })
    };
    let mut rec = read_rec();
    let mut signalled = false;
    let mut pause = Duration::from_millis(2);
    while lock_held(&shim_lock) {
        if rec.as_ref().is_none_or(|r| r.main.is_none()) {
            rec = read_rec().or(rec);
        }
        if !signalled && let Some(shim) = rec.as_ref().and_then(|r| ProcHandle::of(&r.shim)) {
            // The shim turns this into TERM for the task tree, grace, then KILL.
            let _ = shim.signal(Signal::SIGTERM);
            signalled = true;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if let Some(shim) = rec.as_ref().and_then(|r| ProcHandle::of(&r.shim)) {
                tracing::warn!(dir = %dir.display(), "supervisor ignored the stop request; killing it");
                let _ = shim.signal(Signal::SIGKILL);
            }
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    // Whatever outlived a dead supervisor goes too: without a cgroup, main's group while
    // provably its own, and never once its exit is recorded (its group id may be anyone's
    // by then); with one, `end_leftovers` ends all of it.
    let run = records::read_run(dir).unwrap_or_default();
    let contained = run.claimed.as_ref().is_some_and(|c| c.cgroup.is_some());
    if !contained
        && run.exit.is_none()
        && let Some(main) = rec.and_then(|r| r.main)
    {
        signal_group(&main, Signal::SIGKILL);
    }
}

/// How long a stop waits for a task's cgroup (or uid) to be empty before it reports
/// failure (and is retried): SIGKILLed processes only need to be scheduled to die.
const EMPTY_WAIT: Duration = Duration::from_secs(10);

/// After the shim is gone: ends everything of the task that is left, through its cgroup,
/// else (with a uid of its own) every process of its uid. An error (something is left)
/// keeps the task, and so its uid, until a retry proves it empty. Blocking.
fn end_leftovers(dir: &Path, host_uid: Option<u32>) -> io::Result<()> {
    let run = records::read_run(dir)?;
    let limit_cgroups = run
        .claimed
        .as_ref()
        .map(|c| c.limits.clone())
        .unwrap_or_default();
    let cgroup = run.claimed.and_then(|c| c.cgroup);
    if let Some(cg) = &cgroup
        && !containment::kill(cg, EMPTY_WAIT)?
    {
        return Err(io::Error::other(format!(
            "the task's cgroup {} is not empty after SIGKILL",
            cg.display()
        )));
    }
    // Everything of the task was in its containment cgroup, so these are empty too (one
    // that can't be removed, holding a cgroup the task made, is logged and left).
    if cgroup.is_some() {
        limits::remove(&limit_cgroups);
    }
    if cgroup.is_none()
        && let Some(uid) = host_uid
        && !containment::kill_uid_until_gone(uid, EMPTY_WAIT)
    {
        return Err(io::Error::other(format!(
            "processes of the task's uid {uid} are left after SIGKILL"
        )));
    }
    Ok(())
}
