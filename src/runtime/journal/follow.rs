//! The agent following a process task through its journal, from its launch (or its
//! adoption after a restart) until its run is over: what the journal says of it now
//! (`judge`), then a waiter per running task that tells each step and the end, never
//! polling a task without hooks (`ExitWatch`). An end is shown only once the journal
//! holds it: a restarted agent reports the same.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use super::watch::JournalWatch;
use super::{Claim, ExitRecord, Launch, Run, Unrecorded, lock_held, running_lock, shim_lock};
use crate::runtime::exit_watch::ExitWatch;
use crate::runtime::outcome::{self, settle};
use crate::runtime::{EventSink, Observed, RuntimeError, RuntimeEvent, TaskRef, limits};
use crate::sys::proc_handle::PidFd;
use crate::sys::procfs::ProcIdentity;
use crate::task::layout::TaskDir;

/// Reads the journal and, for a running task, starts waiting for its exit: on the
/// shim's pipe when this agent started it, else on its and the task's pidfds (or, for
/// a task with hooks, on its journal).
pub(crate) async fn observe(
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

/// The journal, or a `Journal` error naming it.
fn read_run(dir: &Path) -> Result<Run, RuntimeError> {
    super::read_run(dir).map_err(|source| RuntimeError::Journal {
        path: TaskDir(dir).journal().display().to_string(),
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
    let shim_of = |run: &Run| {
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
        cgroups: run.claimed.as_ref().map(Claim::cgroups).unwrap_or_default(),
    };
    if run.exit.is_some() {
        // Its main command is over; its `postStop` hook runs, unless its shim died.
        return Ok(if lock_held(&running_lock(&task.dir)) {
            alive(None)
        } else {
            Judged::Done(settle_durably(task, Unrecorded::SupervisorLost, &run)?)
        });
    }
    match &run.started {
        Some(started) if lock_held(&running_lock(&task.dir)) => {
            Ok(alive(adopted.then_some(started.main).flatten()))
        }
        // The shim is gone: it just wrote the exit line (`settle` then finds it), or died.
        Some(_) => Ok(Judged::Done(settle_durably(
            task,
            Unrecorded::SupervisorLost,
            &run,
        )?)),
        None => match (&run.claimed, lock_held(&shim_lock(&task.dir))) {
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
                let rec = ExitRecord {
                    exit_code: Some(128),
                    finished_at: Some(crate::task::time::Time::now()),
                    start_error: Some(NEVER_STARTED.into()),
                    ..Default::default()
                };
                match super::record_outcome(&task.dir, &rec) {
                    Ok((_, true)) => Err(RuntimeError::Launch(io::Error::other(NEVER_STARTED))),
                    // A shim took it meanwhile after all (or recorded its end): its run.
                    Ok(_) => judge(task, adopted),
                    Err(source) => Err(RuntimeError::Journal {
                        path: TaskDir(&task.dir).journal().display().to_string(),
                        source,
                    }),
                }
            }
        },
    }
}

/// `settle`, and the outcome it reports only if the journal now holds an exit line: an
/// end that could not be recorded (a full or read-only disk) is never shown, since a
/// restarted agent would report another. Blocking.
pub(crate) fn settle_durably(
    task: &TaskRef,
    why: Unrecorded,
    run: &Run,
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
            path: TaskDir(dir).journal().display().to_string(),
            source: io::Error::other("the task's end could not be recorded"),
        })
    }
}

/// A shim that ended before it claimed the launch: the task never ran.
const NEVER_STARTED: &str = "the supervisor exited before starting the task (see the agent's log)";

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
    match JournalWatch::new(&running_lock(&task.dir)) {
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
        let journal = running_lock(&task.dir);
        let waited = match (watch, hooks) {
            // A task with hooks moves on in steps (preStart, main, postStop): each is reported
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
                        Err(_) if !TaskDir(&task.dir).journal().exists() => break None,
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
/// started) is a step, reported as the journal then shows it.
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
/// 250 ms) until the run is over or its shim is gone, and every change is reported. Tasks
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
    let journal = running_lock(&task.dir);
    let mut pause = Duration::from_millis(5);
    loop {
        let run = super::read_run(&task.dir)?;
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
