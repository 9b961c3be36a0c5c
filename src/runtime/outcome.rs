//! What a process task's run journal says, as the API reports it; and the outcome the
//! agent records, once, for a run no shim can finish (its supervisor died, or the node
//! restarted): appended to the journal as its exit line, with the start time the journal
//! knows, so it reads the same after every later restart.

use nix::sys::signal::Signal;

use super::TaskRef;
use super::proc_handle::{ProcHandle, signal_group};
use super::procfs;
use super::records::{self, ExitRecord, Run, Unrecorded};
use crate::task::model::{Terminated, reason};
use crate::task::time::Time;

/// The variable every task's processes carry (see `ProcessRuntime::launch`).
pub const TASK_MARKER: &str = "TASK_EXECUTOR_TASK";

/// Maps an exit line to the status the API shows.
pub fn terminated_from(rec: &ExitRecord, task: &TaskRef) -> Terminated {
    if let Some(why) = rec.unrecorded {
        let started = rec.started_at.is_some();
        let (reason, message) = match (why, started) {
            (Unrecorded::SupervisorLost, true) => (
                reason::SUPERVISOR_LOST,
                "the task's supervisor died before recording an exit status; the task was stopped",
            ),
            (Unrecorded::SupervisorLost, false) => (
                reason::SUPERVISOR_LOST,
                "the task's supervisor died while starting the task; it is not started again, \
                 as it may already have run",
            ),
            (Unrecorded::NodeRestarted, true) => (
                reason::NODE_RESTARTED,
                "the node restarted while the task ran",
            ),
            (Unrecorded::NodeRestarted, false) => (
                reason::NODE_RESTARTED,
                "the node restarted while the task was starting; it is not started again, as \
                 it may already have run",
            ),
        };
        return Terminated {
            exit_code: 137,
            signal: None,
            reason: reason.into(),
            message: Some(message.into()),
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

/// The run ended without its shim recording how: records why (once, durably) and, the
/// first time, stops whatever of the task is provably still running. Blocking.
pub fn settle(task: &TaskRef, why: Unrecorded, run: &Run) -> Terminated {
    let rec = ExitRecord {
        started_at: run.started.as_ref().and_then(|s| s.started_at),
        finished_at: Some(Time::now()),
        unrecorded: Some(why),
        ..Default::default()
    };
    let (effective, wrote) = match records::record_outcome(&task.dir, &rec) {
        Ok(recorded) => recorded,
        Err(e) => {
            // Reported, but nothing is stopped on a judgement that could not be recorded.
            tracing::error!(task = %task.name, error = %e, "could not record the task's outcome");
            return terminated_from(&rec, task);
        }
    };
    if wrote {
        // Once per run: whoever records the outcome counts and stops it.
        match why {
            Unrecorded::SupervisorLost => {
                tracing::warn!(task = %task.name, "task supervisor died without recording an exit status");
                crate::metrics::supervisor_lost();
                stop_leftovers(task, run);
            }
            Unrecorded::NodeRestarted => {
                tracing::warn!(task = %task.name, "task was cut short by a node restart");
            }
        }
    }
    terminated_from(&effective, task)
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
    let (effective, _) = records::record_outcome(&task.dir, &rec).unwrap_or_else(|e| {
        tracing::error!(task = %task.name, error = %e, "could not record the task's outcome");
        (rec, false)
    });
    terminated_from(&effective, task)
}

/// Stops what outlived a dead supervisor: the main process and its group (while its
/// leader is provably unreaped), or, when the supervisor died before recording the main
/// process, the processes that carry this task's marker and started after it.
fn stop_leftovers(task: &TaskRef, run: &Run) {
    if let Some(main) = run.started.as_ref().and_then(|s| s.main) {
        signal_group(&main, Signal::SIGKILL);
        if let Some(h) = ProcHandle::of(&main) {
            let _ = h.signal(Signal::SIGKILL);
        }
    } else if let Some(claim) = &run.claimed {
        stop_marked(&task.name, claim.shim.start_time);
    }
}

/// SIGKILLs every process started at or after `since` (clock ticks after boot) whose
/// environment carries this task's marker.
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
        let marked = std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()));
        if !marked {
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
