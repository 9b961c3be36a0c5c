//! Host-mode process tasks: each task runs under its own shim (see `shim`): launched here
//! (the launch line, then the shim), stopped (`stop`), adopted after a restart (`adopt`).
//! The agent learns of its exit through the shim's pipe or pidfds (`exit_watch`), never
//! by polling, and follows it through its run journal (`journal::follow`, `outcome`).

mod adopt;
mod stop;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;

use super::containment::Parent;
use super::journal::follow::observe;
use super::journal::protocol::{Report, first_report};
use super::journal::{self, HookLaunch, HookPlace, Launch, Target};
use super::launcher::Launcher;
use super::limits;
use super::outcome;
use super::{EventSink, Observed, Runtime, RuntimeError, TaskRef};
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
    /// when something of it runs in the main container, and whether the shim stays
    /// outside its containment cgroup; `own_uid`: all of its commands run as a uid of
    /// its own.
    pub(crate) fn plan_limits(
        &self,
        spec: &crate::task::model::TaskSpec,
        (supervisors, shim_outside): (u64, bool),
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
            shim_outside,
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
            boot_id: journal::boot_id().map(str::to_string),
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
        let reaper = launch.needs_reaper();
        let supervisors = if reaper { 2 } else { 1 };
        // A shim without a reaper stays outside a cgroup v2 it creates its task into.
        let shim_outside = !reaper
            && self
                .containment
                .as_ref()
                .is_some_and(|c| c.kind == super::containment::Kind::V2);
        let own_uid = task.host_uid.is_some()
            && launch.target.is_none()
            && !remote_hook
            && launch.run_as.uid.is_none();
        let launch = Launch {
            limits: self.plan_limits(&task.spec, (supervisors, shim_outside), own_uid)?,
            ..launch
        };
        let mut attempt = 1;
        let pipe = loop {
            let launch = Launch {
                nonce: Some(new_nonce()),
                ..launch.clone()
            };
            let written =
                journal::write_launch(&task.dir, &launch).map_err(RuntimeError::before_launch)?;
            if !written {
                // A shim took an earlier launch (this is a restart's adoption or a retry
                // that found it): the task is never launched again; the journal says how
                // it is.
                tracing::warn!(task = %task.name, "an earlier launch of the task was taken; following it instead of launching again");
                return observe(task, events, None).await;
            }
            let mut pipe = self
                .launcher
                .launch(&task.dir, launch.nonce.as_deref())
                .await
                .map_err(RuntimeError::before_launch)?;
            match first_report(&mut pipe, LAUNCH_TIMEOUT).await {
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
        observe(task, events, Some(pipe)).await
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn validate(&self, spec: &crate::task::model::TaskSpec) -> Result<(), RuntimeError> {
        // Tasks here run in the agent's container, all of their commands.
        self.plan_limits(spec, (1, false), self.would_have_own_uid(spec))
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

    fn finished(&self, task: &TaskRef) -> Option<Observed> {
        self.finished_run(task)
    }

    fn readiness(&self) -> BoxFuture<'static, super::Readiness> {
        let r = self.own_readiness();
        Box::pin(async move { r })
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
