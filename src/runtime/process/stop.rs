//! Stopping a process task: its shim is asked to stop the task's tree and waited for,
//! then whatever it left is ended through the task's cgroup (or uid). A stop reports
//! success only once nothing of the task is proven left.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nix::sys::signal::Signal;

use super::ProcessRuntime;
use crate::runtime::journal::{self, lock_held};
use crate::runtime::{RuntimeError, TaskRef, containment, limits};
use crate::sys::proc_handle::{ProcHandle, signal_group};
use crate::task::model::HookName;

impl ProcessRuntime {
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
    let shim_lock = journal::shim_lock(dir);
    // The shim's identity: from its `started` line, or from its claim (its `preStart`
    // hook runs, or it is starting).
    let read_rec = || {
        journal::read_run(dir).ok().and_then(|r| {
            r.started.or_else(|| {
                r.claimed.map(|c| journal::ShimRecord {
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
    let run = journal::read_run(dir).unwrap_or_default();
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
    let run = journal::read_run(dir)?;
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
