//! The per-task supervisor (a shim), forked by the shim server for each task.
//!
//! One shim per process task, like containerd's shims or conmon. It outlives the agent, so
//! a task's exit code is recorded even while the agent is down. It is deliberately
//! single-threaded and synchronous: forking (the reaper) and joining namespaces require it.
//!
//! Protocol with the agent: the shim's stdout is a pipe the agent reads. The shim writes
//! `protocol::SHIM_HELLO` before anything else (EOF without it: no shim ever took the task,
//! which may then be launched again), `started` once the journal (`run.jsonl`) names the
//! running task (`preStart` / `postStop` when a lifecycle hook starts), or a start failure line (with an errno when nothing of the task was
//! spawned and its claim was given back: out of processes is retried), and closes the pipe
//! once the exit line is written (or a start failure recorded), so each message means
//! "look at the journal" and EOF means "finished" (or "the shim died"). An agent restarted
//! later has no pipe: it watches the shim's and the task's pidfds and the journal's flock,
//! held until the exit line is written; the task directory's flock is held for the shim's
//! life. The kernel drops both locks and the pipe if the shim dies.

mod cgroup;
mod exec_plan;
mod hooks;
mod hygiene;
pub(in crate::runtime) mod kill;
pub(crate) mod logs;
pub(crate) mod ns_reaper;
mod place;
mod seccomp;
pub mod server;
mod spare;
mod supervisor;
mod target;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use self::place::{MAIN, POST_STOP, PRE_START, Place};
use self::spare::Prepared;
use super::child_setup::{Cwd, ForkServer};
use super::containment;
use super::journal::protocol;
use super::journal::{self, Claim, Entry, ExitRecord, HookPlace, Launch, Unclaim};
use super::limits;
use crate::sys::exhaustion::Exhaustion;
use crate::sys::procfs::ProcIdentity;
use crate::task::model::HookName;
use crate::task::time::Time;

/// Runs the shim for the launch with `nonce` (none from older agents); returns the shim's
/// own exit code. `forker` lets it fork the reaper of a sidecar task; `prepared`: the
/// cgroups a spare shim made ahead (what the launch does not use is removed); `report`:
/// the socket on which the server hears that the task started (see `server::wait`).
fn run(
    dir: &Path,
    nonce: Option<&str>,
    forker: &ForkServer,
    mut prepared: Prepared,
    report: OwnedFd,
) -> i32 {
    notify_agent(protocol::SHIM_HELLO.as_bytes());
    let mut report = Some(report);
    let supervised = supervise(dir, nonce, forker, &mut prepared, &mut report);
    drop(prepared);
    drop(report); // the server hears EOF: nothing of this launch starts any more
    match supervised {
        Ok(()) => 0,
        Err(e) => {
            // stderr is the agent's log; stdout reaches the agent waiting for the start.
            eprintln!("task-executor shim {}: {e}", dir.display());
            let nothing_started = !CLAIM_STANDS.load(Ordering::Relaxed);
            notify_agent(protocol::start_failure_line(&e, nothing_started).as_bytes());
            1
        }
    }
}

/// Set while this shim's claim on the launch stands in the journal (from just before it is
/// written): the task may have started, so a failure must not be reported as "nothing
/// started" (the agent would start the task again). Cleared only when the claim is given
/// back, before anything of the task was spawned.
static CLAIM_STANDS: AtomicBool = AtomicBool::new(false);

/// flock needs no write access (directories work too); the journal is opened for appends.
/// Neither follows a symlink nor blocks in `open` (a FIFO in the journal's place).
fn lock(path: &Path, append: bool) -> io::Result<Flock<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(!append)
        .append(append)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is locked by another supervisor: {e}", path.display()),
        )
    })
}

fn supervise(
    dir: &Path,
    nonce: Option<&str>,
    forker: &ForkServer,
    prepared: &mut Prepared,
    report: &mut Option<OwnedFd>,
) -> io::Result<()> {
    let dir = &std::path::absolute(dir)?;
    let _ = nix::unistd::setsid(); // own session: signals to the agent's group don't reach us
    let _shim_lock = lock(&journal::shim_lock(dir), false)?;
    // Also the journal we append to: the lock is released by closing it after the exit line.
    let running_lock = lock(&journal::running_lock(dir), true)?;
    let run = journal::read_run(dir)?;
    let launch: Launch = run
        .launch
        .ok_or_else(|| io::Error::other("the run journal has no launch record"))?;
    if run.claimed.is_some() {
        // A shim took this launch before and may have started the task: never again.
        return Err(io::Error::other(
            "the launch was already taken by a supervisor",
        ));
    }
    if run.exit.is_some() {
        // The agent gave the launch up (this shim came too late): nothing runs.
        return Err(io::Error::other(
            "the launch was given up before this supervisor took it",
        ));
    }
    if nonce.is_some() && launch.nonce.as_deref() != nonce {
        // The journal holds another launch than the one this shim was started for.
        return Err(io::Error::other(
            "the launch this supervisor was started for was replaced",
        ));
    }
    let me = ProcIdentity::of(std::process::id() as i32)
        .ok_or_else(|| io::Error::other("no /proc/self"))?;
    nix::sys::prctl::set_child_subreaper(true)?;
    hygiene::set_task_limits()?;

    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        mask.add(s);
    }
    mask.thread_block()?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;

    // Before anything of the task (or its reaper) is forked: all of it is born inside.
    let (cgroup, born_into) = make_cgroup(&launch, &me, prepared)?;
    let limit_cgroups = match enter_limits(&launch, cgroup.as_deref(), &me, prepared) {
        Ok(dirs) => dirs,
        Err(e) => {
            if let Some(dir) = &cgroup {
                containment::leave_and_remove(dir);
            }
            return Err(e);
        }
    };
    let left = |cgroup: &Option<std::path::PathBuf>| {
        limits::leave_and_remove(&limit_cgroups);
        if let Some(dir) = cgroup {
            containment::leave_and_remove(dir);
        }
    };
    let place = match place(forker, &launch) {
        Ok(p) => p.born_into(born_into),
        // Out of processes, memory or file descriptors before anything of the task ran
        // (the sidecar reaper is ours): the agent starts it again later.
        Err(e) if Exhaustion::of(&e).is_some() => {
            left(&cgroup);
            return Err(e);
        }
        Err(e) => {
            left(&cgroup);
            let what = format!("failed to start {:?}", launch.argv[0]);
            return finish_start_error(running_lock, &e, &what, &launch);
        }
    };
    let mut sup = supervisor::Supervisor::new(dir, &launch, place, me, running_lock)?
        .with_cgroups(cgroup.iter().chain(&limit_cgroups).cloned().collect());
    let file = sup.journal_file().expect("held until the run ends");
    // From here on the task may run: the launch and the claim must survive a power loss,
    // so that neither a restarted agent nor a restarted node runs it a second time.
    CLAIM_STANDS.store(true, Ordering::Relaxed);
    let claim = Entry::Claimed(Claim {
        shim: me,
        nonce: launch.nonce.clone(),
        cgroup: cgroup.clone(),
        limits: limit_cgroups.clone(),
    });
    // Marked on the journal's inode too, durable with the claim (one fsync for both): an
    // emptied journal still says the task may have run (see `journal::set_claim_mark`).
    // A file system that refuses the mark leaves only the task's logs to say so.
    let _ = journal::set_claim_mark(file, true);
    let claimed = journal::append(file, &claim, false).and_then(|()| file.sync_all());
    if let Err(e) = claimed {
        let e = give_back(dir, file, e);
        left(&cgroup);
        return Err(e);
    }
    let first = sup.start_first();
    if let Some(sock) = report.take() {
        // Started (or failed): the server may now make the next spare ready.
        let _ = nix::unistd::write(&sock, b"s");
    }
    match first {
        Ok(()) => {}
        // Out of processes, memory or file descriptors: nothing of the task ran, and the
        // agent starts it again later rather than failing it for good.
        Err(supervisor::FirstStart::Exhausted(e)) => {
            let file = sup.journal_file().expect("held until the run ends");
            let e = give_back(dir, file, e);
            if !CLAIM_STANDS.load(Ordering::Relaxed) {
                left(&cgroup);
            }
            return Err(e);
        }
        Err(supervisor::FirstStart::Failed(e)) => {
            drop(sup);
            left(&cgroup);
            return Err(e);
        }
    }
    let ran = sup.run(&sigfd);
    // Nothing of the task is left (what they counted is in its exit line): the shim leaves
    // its cgroups and removes them rather than leaving one empty set per task until it is
    // deleted. One a process escaped into stays (rmdir refuses it) for the agent's stop.
    drop(sup);
    left(&cgroup);
    ran
}

/// Makes the task's cgroup (as the launch says): one cgroup v2 its commands are then
/// created into (returned, opened), or one the shim moves itself into now (the v1
/// freezer; a task with commands in the main container, whose reaper the shim forks).
/// Named after the shim's identity, unique on this boot (one a spare made ahead is
/// taken as it is). A cgroup that can't be made fails the start before anything of the
/// task ran: the operator's containment is never silently lost. See `containment`.
fn make_cgroup(
    launch: &Launch,
    me: &ProcIdentity,
    prepared: &mut Prepared,
) -> io::Result<(Option<std::path::PathBuf>, Option<place::IntoCgroup>)> {
    let Some(parent) = &launch.containment else {
        prepared.take_containment(None, false);
        return Ok((None, None));
    };
    let name = containment::task_cgroup_name(me);
    let born_into = parent.kind == containment::Kind::V2 && !launch.needs_reaper();
    let made = prepared.take_containment(Some(parent), !born_into);
    if born_into {
        let dir = match made {
            Some(dir) => dir,
            None => containment::create(parent, &name)?,
        };
        match place::IntoCgroup::open(&dir) {
            Ok(into) => return Ok((Some(dir), Some(into))),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(io::Error::new(
                    e.kind(),
                    format!("task cgroup {}: {e}", dir.display()),
                ));
            }
        }
    }
    match made {
        Some(dir) => Ok((Some(dir), None)),
        None => containment::create_and_enter(parent, &name).map(|dir| (Some(dir), None)),
    }
}

/// Makes the task's cgroups of its limits (as the launch says; named as its containment
/// cgroup), writes its limits and moves the shim in, before anything of the task runs. A
/// limit that can't be set fails the start: it is never silently unenforced. Those a
/// spare made and joined ahead only get the limits written; where one is refused there
/// (a memory limit below what the spare has used since it joined), they are left and
/// made again the usual way, limits first.
fn enter_limits(
    launch: &Launch,
    containment: Option<&Path>,
    me: &ProcIdentity,
    prepared: &mut Prepared,
) -> io::Result<Vec<std::path::PathBuf>> {
    let Some(l) = &launch.limits else {
        prepared.take_v1(&[]);
        return Ok(Vec::new());
    };
    if let Some(made) = prepared.take_v1(&l.v1) {
        let mut dirs: Vec<&Path> = made.iter().map(|d| d.as_path()).collect();
        if l.on_containment {
            dirs.extend(containment);
        }
        let written = if l.on_containment && containment.is_none() {
            Err(io::Error::other("no containment cgroup"))
        } else {
            limits::write_limits(l, &dirs)
        };
        match written {
            Ok(()) => return Ok(made),
            Err(_) => limits::leave_and_remove(&made),
        }
    }
    limits::enter(l, containment, &containment::task_cgroup_name(me))
}

/// Nothing of the task was spawned after all: the claim is given back in the journal, so
/// the launch may be tried again (by this agent, or by one restarted meanwhile) instead of
/// being taken for a run a dead supervisor may have started. Not fsynced: after a power
/// loss the launch is of an earlier boot, never started again anyway. Returns `e`.
fn give_back(dir: &Path, file: &mut Flock<File>, e: io::Error) -> io::Error {
    let back = Entry::Unclaimed(Unclaim { why: e.to_string() });
    let given_back = match journal::append(file, &back, false) {
        Ok(()) => true,
        // A claim that never reached the journal needs no giving back.
        Err(_) => journal::read_run(dir).is_ok_and(|r| r.claimed.is_none()),
    };
    if given_back {
        let _ = journal::set_claim_mark(file, false);
        CLAIM_STANDS.store(false, Ordering::Relaxed);
    } else {
        eprintln!(
            "task-executor shim {}: could not give the launch back; it is not run again",
            dir.display()
        );
    }
    e
}

/// Where the task's commands start (the main command, its hooks): their plans and the
/// places (host, or the main container through a reaper forked there). Every command is
/// planned the same way, so hooks get what the main command gets (environment, working
/// directory, identity).
fn place(forker: &ForkServer, launch: &Launch) -> io::Result<Place> {
    let cwd = exec_plan::working_dir(launch.working_dir.as_deref())?;
    // The main container, if any command runs there (all of them enter the same one).
    let target = launch.target.as_ref().or_else(|| {
        [&launch.pre_start, &launch.post_stop]
            .into_iter()
            .flatten()
            .find_map(|h| match &h.place {
                HookPlace::Remote(t) => Some(t),
                _ => None,
            })
    });
    let argv = |job: usize| -> Option<&Vec<String>> {
        match job {
            MAIN => Some(&launch.argv),
            _ => launch
                .hook(if job == PRE_START {
                    HookName::PreStart
                } else {
                    HookName::PostStop
                })
                .filter(|h| !matches!(h.place, HookPlace::Unreachable(_)))
                .map(|h| &h.argv),
        }
    };
    let inside = |job: usize| -> bool {
        match job {
            MAIN => launch.target.is_some(),
            PRE_START => matches!(
                launch.pre_start.as_ref().map(|h| &h.place),
                Some(HookPlace::Remote(_))
            ),
            _ => matches!(
                launch.post_stop.as_ref().map(|h| &h.place),
                Some(HookPlace::Remote(_))
            ),
        }
    };
    let jobs = [MAIN, PRE_START, POST_STOP];
    let in_container: Vec<bool> = jobs.iter().map(|j| inside(*j)).collect();
    let dup = |c: &Option<Cwd>| -> io::Result<Option<Cwd>> {
        Ok(match c {
            None => None,
            Some(Cwd::Inherit) => Some(Cwd::Inherit),
            Some(Cwd::Path(p)) => Some(Cwd::Path(p.clone())),
            Some(Cwd::Fd(fd)) => Some(Cwd::Fd(fd.try_clone()?)),
        })
    };
    let (host_env, host_identity) = hygiene::host_start(launch);
    let mut host = Vec::new();
    for &job in &jobs {
        host.push(match argv(job).filter(|_| !inside(job)) {
            Some(argv) => Some(exec_plan::plan(
                argv,
                &host_env,
                dup(&cwd)?.unwrap_or(Cwd::Inherit),
                &host_identity,
            )?),
            None => None,
        });
    }
    let reaper = match target.filter(|_| in_container.iter().any(|i| *i)) {
        None => None,
        Some(t) => {
            let prepared = target::prepare(t)?;
            let identity = exec_plan::Identity::of(launch, prepared.creds);
            let env = exec_plan::environment(prepared.env.into_iter(), &launch.env);
            let mut plans = Vec::new();
            for &job in &jobs {
                plans.push(match argv(job).filter(|_| inside(job)) {
                    Some(argv) => {
                        let cwd = match dup(&cwd)? {
                            Some(c) => c,
                            None => match &prepared.target_cwd {
                                Cwd::Fd(fd) => Cwd::Fd(fd.try_clone()?),
                                Cwd::Path(p) => Cwd::Path(p.clone()),
                                Cwd::Inherit => Cwd::Inherit,
                            },
                        };
                        Some(exec_plan::plan(argv, &env, cwd, &identity)?)
                    }
                    None => None,
                });
            }
            Some(ns_reaper::Reaper::start(forker, prepared.entry, plans)?)
        }
    };
    Ok(Place::new(host, reaper, in_container))
}

/// Tells the agent (reading our stdout) something changed; it may be gone (EPIPE is fine).
fn notify_agent(msg: &[u8]) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(msg);
    let _ = std::io::stdout().flush();
}

/// Closes stdout: the agent reads EOF as "finished".
fn release_agent() {
    if let Ok(null) = File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null.as_fd());
    }
}

/// The exit line of a run whose main command could not be started.
fn start_error_record(e: &io::Error, what: &str, launch: &Launch) -> ExitRecord {
    ExitRecord {
        exit_code: Some(supervisor::exec_failure_code(e)),
        finished_at: Some(Time::now()),
        // A sidecar target that vanished is reported as a restart, not as a bad command.
        target_gone: launch
            .target
            .as_ref()
            .is_some_and(|t| !t.process.is_alive()),
        start_error: Some(format!("{what}: {e}")),
        ..Default::default()
    }
}

fn finish_start_error(
    mut running_lock: Flock<File>,
    e: &io::Error,
    what: &str,
    launch: &Launch,
) -> io::Result<()> {
    let rec = start_error_record(e, what, launch);
    journal::append(&mut running_lock, &Entry::Exit(rec), true)?;
    drop(running_lock);
    release_agent();
    Ok(())
}
