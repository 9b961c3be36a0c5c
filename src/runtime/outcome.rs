//! What a process task's run journal says, as the API reports it; and the outcome the
//! agent records, once, for a run no shim can finish (its supervisor died, or the node
//! restarted): appended to the journal as its exit line, with the start time the journal
//! knows, so it reads the same after every later restart.

use nix::sys::signal::Signal;

use super::journal::{self, ExitRecord, HookExit, Leftovers, Run, Unrecorded};
use super::shim::kill;
use super::{Observed, TaskRef};
use crate::sys::proc_handle::{ProcHandle, signal_group};
use crate::sys::procfs::{self, ProcIdentity};
use crate::task::layout::TaskDir;
use crate::task::model::{
    HookName, HookStatuses, Running, TaskState, Terminated, Waiting, reason, signal_name,
};
use crate::task::time::Time;

/// The variable every task's processes carry (see `ProcessRuntime::launch`).
pub const TASK_MARKER: &str = "TASK_EXECUTOR_TASK";

/// How a finished run ended, as the API shows it: the main command's exit line, and
/// what its hooks did to it, as upstream's controller reads it (success is
/// `exitCode == 0` alone). A `preStart` that failed ends the task `PreStartHookFailed`
/// (exit code 1, the hook's end and output tail in the message). A `postStop` that failed
/// after a main command that ran and ended (however: success, failure, timeout) ends the
/// task `PostStopHookFailed` (upstream's stop error), exit code 1 after a success, else
/// the main command's own; the message gives the main command's end, then the hook's.
/// Where the main command never ran (a failed `preStart`, a failed start) or its end is
/// unknown (its supervisor died), the reason and exit code stay and the message gets the
/// hook's end.
pub fn terminated_of(exit: &ExitRecord, run: &Run, task: &TaskRef) -> Terminated {
    let pre_failed = exit.pre_start_failed && exit.unrecorded.is_none();
    let mut t = match run.pre_start.exit.as_ref() {
        Some(pre) if pre_failed => {
            let mut why = hook_failure(pre, run);
            if exit.stop_requested {
                why.push_str("; the task was stopped on request");
            }
            Terminated {
                exit_code: 1,
                signal: None,
                reason: reason::PRE_START_HOOK_FAILED.into(),
                message: Some(why),
                started_at: None,
                finished_at: exit.finished_at.unwrap_or(pre.finished_at),
            }
        }
        _ => with_oom_kills(terminated_from(exit, run.leftovers, task), exit, task),
    };
    if let Some(post) = run.post_stop.exit.as_ref().filter(|x| !x.succeeded()) {
        let why = hook_failure(post, run);
        let main_ended = !pre_failed && exit.unrecorded.is_none() && exit.start_error.is_none();
        if main_ended {
            let mut main = format!("main command: {}, exit code {}", t.reason, t.exit_code);
            if let Some(sig) = t.signal {
                main.push_str(&format!(", signal {}", signal_name(sig)));
            }
            if let Some(m) = t.message.take() {
                main.push_str(&format!(": {m}"));
            }
            t.reason = reason::POST_STOP_HOOK_FAILED.into();
            if t.exit_code == 0 {
                t.exit_code = 1;
            }
            t.message = Some(format!("{main}; {why}"));
        } else {
            t.message = Some(match t.message.take() {
                Some(m) => format!("{m}; {why}"),
                None => why,
            });
        }
    }
    t
}

/// A hook's failure, as the task's message and the hook's status say it: how it ended,
/// then the tail of its output.
pub fn hook_failure(x: &HookExit, run: &Run) -> String {
    let name = x.hook.as_str();
    let timeout = run
        .launch
        .as_ref()
        .and_then(|l| l.hook(x.hook))
        .and_then(|h| h.timeout_ms)
        .map(std::time::Duration::from_millis);
    let how = match (
        x.unrecorded,
        &x.start_error,
        x.timed_out,
        x.signal,
        x.exit_code,
    ) {
        (Some(_), _, _, _, _) if x.started_at.is_some() => {
            format!("{name} hook: its supervisor died while it ran; it is not run again")
        }
        (Some(_), _, _, _, _) => {
            format!("{name} hook did not run: its supervisor died before; it is not run again")
        }
        (None, Some(e), _, _, _) => format!("{name} hook could not be started: {e}"),
        (None, None, true, _, _) => match timeout {
            Some(t) => format!(
                "{name} hook timed out after {}; its processes were killed",
                humantime::format_duration(t)
            ),
            None => format!("{name} hook timed out; its processes were killed"),
        },
        (None, None, false, Some(sig), _) => format!(
            "{name} hook failed: terminated by signal {}",
            signal_name(sig)
        ),
        (None, None, false, None, Some(c)) => format!("{name} hook failed: exit code {c}"),
        (None, None, false, None, None) => format!("{name} hook failed: exit status unknown"),
    };
    if x.output.is_empty() {
        how
    } else {
        format!("{how}; output: {}", x.output)
    }
}

/// Each hook's status as its journal lines tell it (`None` for a task without hooks).
pub fn hook_statuses(run: &Run) -> Option<HookStatuses> {
    let launch = run.launch.as_ref()?;
    if launch.pre_start.is_none() && launch.post_stop.is_none() {
        return None;
    }
    let mut out = HookStatuses::default();
    for h in HookName::ALL {
        let r = run.hook(h);
        *out.slot(h) = match (&r.exit, &r.started) {
            (Some(x), _) => Some(TaskState::Terminated(hook_terminated(x, run))),
            (None, Some(s)) => Some(TaskState::Running(Running {
                started_at: Some(s.started_at),
            })),
            (None, None) => None,
        };
    }
    Some(out)
}

fn hook_terminated(x: &HookExit, run: &Run) -> Terminated {
    let ok = x.succeeded();
    let exit_code = match (x.exit_code, x.signal) {
        (_, Some(sig)) => 128 + sig,
        (Some(c), None) => c,
        (None, None) => 128,
    };
    Terminated {
        exit_code,
        signal: x.signal,
        reason: if ok {
            reason::SUCCEEDED.into()
        } else {
            x.hook.failed_reason().into()
        },
        message: (!ok).then(|| hook_failure(x, run)),
        started_at: x.started_at,
        finished_at: x.finished_at,
    }
}

/// What a run shows now: terminated once it is over, else where it stands (its
/// `preStart` hook runs: waiting; the main command started: running; only its `postStop`
/// hook runs after a main command that never started: waiting), with its hooks'
/// statuses for a task that has hooks.
pub fn observed(run: &Run, task: &TaskRef) -> Observed {
    let state = match (&run.exit, run.finished()) {
        (Some(x), true) => Observed::Terminated(terminated_of(x, run, task)),
        _ => match (&run.started, &run.exit) {
            (Some(s), _) => Observed::Running {
                started_at: s.started_at,
            },
            (None, Some(_)) => Observed::Waiting(Waiting {
                reason: Some(reason::POST_STOP_HOOK_RUNNING.into()),
                message: Some("the main command did not run; the postStop hook runs".into()),
            }),
            (None, None) if run.launch.as_ref().is_some_and(|l| l.pre_start.is_some()) => {
                Observed::Waiting(Waiting {
                    reason: Some(reason::PRE_START_HOOK_RUNNING.into()),
                    message: Some(
                        "the preStart hook runs; the main command starts once it succeeded".into(),
                    ),
                })
            }
            // Its shim runs it, but the journal lost the line saying since when (it was
            // emptied): unknown, never the time this agent looked.
            (None, None) => Observed::Running { started_at: None },
        },
    };
    let state = match hook_statuses(run) {
        Some(h) => Observed::WithHooks(Box::new(state), h),
        None => state,
    };
    with_usage(state, run)
}

/// `o`, with what the run's cgroups counted once it is over.
pub fn with_usage(o: Observed, run: &Run) -> Observed {
    match run.exit.as_ref().and_then(|x| x.usage.clone()) {
        Some(u) if run.finished() => Observed::WithUsage(Box::new(o), u),
        _ => o,
    }
}

/// A run the kernel's OOM killer reached into (its cgroup counted OOM kills) and that
/// failed ends `OOMKilled` (kubelet's word, as containerd reports a container with an
/// OOM event), its exit code kept (137 for a main command SIGKILLed), the message saying
/// which memory limit was reached. A timeout stays a timeout.
fn with_oom_kills(mut t: Terminated, rec: &ExitRecord, task: &TaskRef) -> Terminated {
    let Some(n) = rec.usage.as_ref().and_then(|u| u.oom_kills) else {
        return t;
    };
    if n == 0 || t.exit_code == 0 || rec.timed_out || rec.start_error.is_some() {
        return t;
    }
    let limit = task
        .spec
        .process
        .as_ref()
        .and_then(|p| p.resources.as_ref())
        .and_then(|r| r.limits.get(crate::task::resources::MEMORY))
        .map(|q| q.0.clone());
    let processes = if n == 1 {
        "a process".to_string()
    } else {
        format!("{n} processes")
    };
    let why = match limit {
        Some(l) => format!("its memory limit ({l}) was reached"),
        None => "the memory of the agent's cgroup (the pod's limit) ran out".into(),
    };
    let oom = format!("the kernel's OOM killer ended {processes} of the task: {why}");
    t.reason = reason::OOM_KILLED.into();
    t.message = Some(match t.message.take() {
        Some(m) => format!("{oom}; {m}"),
        None => oom,
    });
    t
}

/// What the message of a task whose supervisor died says of its processes: "stopped"
/// only when its cgroup was seen empty.
fn leftovers_said(l: Option<Leftovers>) -> &'static str {
    match l {
        Some(Leftovers::CgroupEmpty) => "the task was stopped: its cgroup was killed and is empty",
        Some(Leftovers::CgroupNotEmpty) => {
            "its cgroup was killed but not seen empty yet; it is ended again when the task is \
             deleted"
        }
        Some(Leftovers::NamedKilled) => {
            "the processes its journal names were killed, with their descendants and process \
             groups; without a cgroup nothing proves that all of the task stopped"
        }
        Some(Leftovers::MarkedKilled) => {
            "the processes carrying the task's marker were killed; without a cgroup nothing \
             proves that all of the task stopped"
        }
        None => "whether anything of the task still runs is not known",
    }
}

/// Maps an exit line to the status the API shows (the main command's part); `leftovers`:
/// what stopping a dead supervisor's task proved.
pub fn terminated_from(
    rec: &ExitRecord,
    leftovers: Option<Leftovers>,
    task: &TaskRef,
) -> Terminated {
    if let Some(why) = rec.unrecorded {
        let started = rec.started_at.is_some();
        let lost = |what: &str| format!("{what}; {}", leftovers_said(leftovers));
        let (reason, message) = match (why, started) {
            (Unrecorded::SupervisorLost, true) => (
                reason::SUPERVISOR_LOST,
                lost("the task's supervisor died before recording an exit status"),
            ),
            (Unrecorded::SupervisorLost, false) => (
                reason::SUPERVISOR_LOST,
                lost(
                    "the task's supervisor died while starting the task; it is not started \
                     again, as it may already have run",
                ),
            ),
            (Unrecorded::NodeRestarted, true) => (
                reason::NODE_RESTARTED,
                "the node restarted while the task ran".into(),
            ),
            (Unrecorded::NodeRestarted, false) => (
                reason::NODE_RESTARTED,
                "the node restarted while the task was starting; it is not started again, as \
                 it may already have run"
                    .into(),
            ),
        };
        return Terminated {
            exit_code: 137,
            signal: None,
            reason: reason.into(),
            message: Some(message),
            started_at: rec.started_at,
            finished_at: rec.finished_at.unwrap_or_else(Time::now),
        };
    }
    if let Some(err) = &rec.start_error {
        let (why, msg) = if rec.target_gone {
            (
                reason::TARGET_RESTARTED,
                format!("main container is gone: {err}"),
            )
        } else {
            (reason::PROCESS_START_FAILED, err.clone())
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
        || (rec.stop_requested && TaskDir(&task.dir).target_restarted().exists())
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

/// The run ended without its shim recording how: records why (once, durably; for its
/// hooks too: one that was running is not run again, one that never started is not run
/// at all) and, the first time, stops whatever of the task is provably still running.
/// Returns the observed end. Blocking.
pub fn settle(task: &TaskRef, why: Unrecorded, run: &Run) -> Observed {
    let rec = ExitRecord {
        started_at: run.started.as_ref().and_then(|s| s.started_at),
        finished_at: Some(Time::now()),
        unrecorded: Some(why),
        // What its cgroups counted, read before they are ended: an OOM kill of its
        // supervisor shows as one.
        usage: match (why, &run.claimed) {
            (Unrecorded::SupervisorLost, Some(c)) => {
                let dirs = c.cgroups();
                let dirs: Vec<&std::path::Path> = dirs.iter().map(|d| d.as_path()).collect();
                Some(super::limits::usage(&dirs)).filter(|u| !dirs.is_empty() && !u.is_empty())
            }
            _ => None,
        },
        ..Default::default()
    };
    let wrote = match run.exit.as_ref() {
        Some(_) => false,
        None => match journal::record_outcome(&task.dir, &rec) {
            Ok((_, wrote)) => wrote,
            Err(e) => {
                // Reported, but nothing is stopped on a judgement that could not be recorded.
                tracing::error!(task = %task.name, error = %e, "could not record the task's outcome");
                return Observed::Terminated(terminated_from(&rec, None, task));
            }
        },
    };
    let mut hook_lost = false;
    if run.claimed.is_some()
        && let Some(launch) = &run.launch
    {
        for h in HookName::ALL {
            let r = run.hook(h);
            if launch.hook(h).is_none() || r.exit.is_some() {
                continue;
            }
            let lost = HookExit {
                hook: h,
                exit_code: None,
                signal: None,
                started_at: r.started.as_ref().map(|s| s.started_at),
                finished_at: Time::now(),
                timed_out: false,
                start_error: None,
                output: String::new(),
                unrecorded: Some(why),
            };
            match journal::record_hook_outcome(&task.dir, &lost) {
                // Recorded here: whatever of it runs is ours to stop.
                Ok(x) => hook_lost |= x == lost,
                Err(e) => {
                    tracing::error!(task = %task.name, hook = h.as_str(), error = %e, "could not record the hook's outcome");
                }
            }
        }
    }
    // Read again now that the journal's lock was taken: a process whose shim died while
    // it was being spawned may have named itself (`spawned`) after `run` was read; it
    // held the lock (it shares the journal's open file) until its exec.
    let now = journal::read_run(&task.dir).unwrap_or_else(|_| run.clone());
    if wrote || hook_lost {
        // Once per run: whoever records the outcome counts and stops it.
        match why {
            Unrecorded::SupervisorLost => {
                tracing::warn!(task = %task.name, "task supervisor died without recording an exit status");
                if wrote {
                    crate::metrics::supervisor_lost();
                }
                let known = stop_leftovers(task, run, &now);
                tracing::info!(task = %task.name, leftovers = ?known, "stopped what the task's supervisor left");
                if let Err(e) = journal::record_leftovers(&task.dir, known) {
                    tracing::warn!(task = %task.name, error = %e, "could not record what stopping the task proved");
                }
            }
            Unrecorded::NodeRestarted => {
                tracing::warn!(task = %task.name, "task was cut short by a node restart");
            }
        }
    }
    let now = journal::read_run(&task.dir).unwrap_or_default();
    match now.exit.as_ref() {
        Some(x) => {
            let t = terminated_of(x, &now, task);
            let o = match hook_statuses(&now) {
                Some(h) => Observed::WithHooks(Box::new(Observed::Terminated(t)), h),
                None => Observed::Terminated(t),
            };
            with_usage(o, &now)
        }
        None => Observed::Terminated(terminated_from(&rec, None, task)),
    }
}

/// The shim ended before it claimed the launch: the task never ran. Recorded as a start
/// error (once, durably), like any failed start. Blocking.
pub fn never_started(task: &TaskRef, why: &str) -> Terminated {
    let rec = ExitRecord {
        exit_code: Some(128),
        finished_at: Some(Time::now()),
        start_error: Some(why.to_string()),
        ..Default::default()
    };
    let (effective, _) = journal::record_outcome(&task.dir, &rec).unwrap_or_else(|e| {
        tracing::error!(task = %task.name, error = %e, "could not record the task's outcome");
        (rec, false)
    });
    terminated_from(&effective, None, task)
}

/// Stops what outlived a dead supervisor: each command that had not ended (the main
/// command, a hook), found by the identity the journal gives it (its `started` line, else
/// the `spawned` line its process wrote before it exec'ed, so a shim that died in
/// between leaves nothing unnamed), with its descendants and its group (while it is
/// provably unreaped). Only pids and start times are read (`/proc/PID/stat` and
/// `children`, readable whatever the processes' uid), so this holds for tasks of another
/// user with no more than CAP_KILL. A run whose commands the journal does not name (a
/// journal of an earlier version; a sidecar task, whose reaper kills it when the shim
/// dies) falls back to the task's marker, where environments are readable.
/// `before`: the journal as the shim left it (which hooks had ended); `run`: as it is now.
/// Returns what is known afterwards.
fn stop_leftovers(task: &TaskRef, before: &Run, run: &Run) -> Leftovers {
    let contained = match stop_cgroup(task, run) {
        Some(true) => return Leftovers::CgroupEmpty,
        Some(false) => true,
        None => false,
    };
    let mut named = false;
    for h in HookName::ALL {
        let r = run.hook(h);
        let p = r.started.as_ref().map(|s| s.process).or(r.spawned);
        if let Some(p) = p.filter(|_| before.hook(h).exit.is_none()) {
            stop_tree(&p);
            named = true;
        }
    }
    if let Some(main) = run.started.as_ref().and_then(|s| s.main).or(run.spawned) {
        stop_tree(&main);
        named = true;
    }
    if !named && let Some(claim) = &run.claimed {
        stop_marked(&task.name, claim.shim.start_time);
    }
    match (contained, named) {
        (true, _) => Leftovers::CgroupNotEmpty,
        (false, true) => Leftovers::NamedKilled,
        (false, false) => Leftovers::MarkedKilled,
    }
}

/// Ends the task's cgroup, when its shim made one (see `containment`): everything of the
/// task is in it, also what was re-parented to the dead shim. Whether it was proven empty
/// (otherwise the journal's names are the fallback, and a stop retries the cgroup);
/// `None` without a cgroup.
fn stop_cgroup(task: &TaskRef, run: &Run) -> Option<bool> {
    let cg = run.claimed.as_ref().and_then(|c| c.cgroup.as_ref())?;
    match super::containment::kill(cg, std::time::Duration::from_secs(10)) {
        Ok(true) => {
            // Its limits' cgroups hold nothing of it either now.
            if let Some(c) = &run.claimed {
                super::limits::remove(&c.limits);
            }
            Some(true)
        }
        Ok(false) => {
            tracing::warn!(task = %task.name, cgroup = %cg.display(), "the task's cgroup is not empty after SIGKILL");
            Some(false)
        }
        Err(e) => {
            tracing::warn!(task = %task.name, cgroup = %cg.display(), error = %e, "cannot end the task's cgroup");
            Some(false)
        }
    }
}

/// SIGKILLs a command's process if it is still the recorded one: its descendants first
/// (found through handles while it lives: once it dies they move to a subreaper out of
/// reach), then its group (only while it is unreaped: the group id is its pid), then it.
/// Twice, for what was forked during the first round.
fn stop_tree(p: &ProcIdentity) {
    for _ in 0..2 {
        if let (Some(h), Ok(proc)) = (ProcHandle::of(p), std::fs::File::open("/proc")) {
            use std::os::fd::AsFd;
            kill::signal_descendants_of(proc.as_fd(), h, Signal::SIGKILL);
        }
        signal_group(p, Signal::SIGKILL);
        if let Some(h) = ProcHandle::of(p) {
            let _ = h.signal(Signal::SIGKILL);
        }
    }
}

/// SIGKILLs every process started at or after `since` (clock ticks after boot) whose
/// environment carries this task's marker (unreadable for another user's processes
/// without CAP_SYS_PTRACE: those are skipped).
fn stop_marked(name: &str, since: u64) {
    let want = format!("{TASK_MARKER}={name}");
    let Ok(proc) = std::fs::File::open("/proc") else {
        return;
    };
    for pid in procfs::pids() {
        let Some(start) = procfs::stat(pid)
            .map(|s| s.start_time)
            .filter(|t| *t >= since)
        else {
            continue;
        };
        if !procfs::environ_has(pid, &want) {
            continue;
        }
        use std::os::fd::AsFd;
        if let Ok((h, st)) = ProcHandle::open_at(proc.as_fd(), pid)
            && st.start_time == start
        {
            let _ = h.signal(Signal::SIGKILL);
        }
    }
}
