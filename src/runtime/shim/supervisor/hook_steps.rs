//! The shim's handling of a task's lifecycle hooks: claiming and starting one (in its
//! place, with its own log), recording its end, and killing its tree (what it started,
//! not what the main command left running). When (its timeout, its stop) is the
//! machine's.

use std::io;
use std::os::fd::AsFd;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::Signal;

use super::super::hooks::HookJob;
use super::super::kill;
use super::super::notify_agent;
use super::super::place::hook_job;
use super::machine::Event;
use super::{PRE_START_SLOT, Supervisor, slot_of};
use crate::runtime::child_setup::{SpawnError, Step};
use crate::runtime::journal::{Entry, HookClaim, HookExit, HookPlace, HookStart, Launch};
use crate::sys::exhaustion::Exhaustion;
use crate::task::model::HookName;
use crate::task::time::Time;

impl Supervisor<'_> {
    /// Claims and starts a hook. A hook that can't be started ends at once, failed
    /// (recorded), except for a first command out of resources (`give_back` then).
    pub(super) fn start_hook(&mut self, name: HookName, first: bool) -> io::Result<Event> {
        let Some(spec) = self.launch.hook(name) else {
            return Err(io::Error::other(format!(
                "the launch has no {} hook",
                name.as_str()
            )));
        };
        let job = hook_job(name);
        let mut h = HookJob::new(name, job);
        h.before = kill::subtree_roots(self.proc.as_fd(), self.me, self.place.reaper_pid());
        // From here on the hook may run: never again (durable before it is spawned).
        self.journal(&Entry::HookClaimed(HookClaim { hook: name }), true)?;
        let argv0 = spec.argv.first().cloned().unwrap_or_default();
        // When it was spawned, or how it failed to be.
        let spawned = match &spec.place {
            HookPlace::Unreachable(why) => Err((128, why.clone())),
            HookPlace::Local | HookPlace::Remote(_) => {
                let (r, w) = io::pipe()?;
                let journal = self.running_lock.as_ref().map(|j| j.as_fd());
                let spawned = self.place.start(job, w.as_fd(), w.as_fd(), journal);
                drop(w); // only the hook holds the write end now
                match spawned {
                    Ok(p) => {
                        let now = Instant::now();
                        self.place.release_after(job);
                        h.process = Some(p);
                        h.started = Time::now();
                        self.pipes[slot_of(name)] = Some(r);
                        let rec = HookStart {
                            hook: name,
                            process: p,
                            started_at: h.started,
                        };
                        self.journal(&Entry::HookStarted(rec), false)?;
                        Ok(now)
                    }
                    Err(e) if first && Exhaustion::of(&e.error).is_some() => return Err(e.error),
                    Err(e) => Err((
                        exec_failure_code(&e.error),
                        spawn_failure(&argv0, &e, &spec.place, self.launch),
                    )),
                }
            }
        };
        self.hook = Some(h);
        Ok(match spawned {
            Err((code, why)) => {
                self.end_hook(Some(code), None, Some(why), false)?;
                Event::HookStartFailed
            }
            Ok(now) => {
                notify_agent(format!("{}\n", name.as_str()).as_bytes());
                Event::HookStarted { now }
            }
        })
    }

    /// Records the current hook's end (durably).
    pub(super) fn end_hook(
        &mut self,
        code: Option<i32>,
        signal: Option<i32>,
        start_error: Option<String>,
        timed_out: bool,
    ) -> io::Result<()> {
        let Some(h) = self.hook.as_ref() else {
            return Ok(());
        };
        let output = self.tails[slot_of(h.name) - PRE_START_SLOT].text();
        let rec: HookExit = h.exit_record(code, signal, timed_out, start_error, output);
        self.journal(&Entry::HookExit(rec), true)
    }

    /// Signals the current hook's tree: its group while unreaped (`group`), and every tree
    /// under the shim that was not there when it started (see `signal_subtrees`). Returns
    /// how many are left.
    pub(super) fn kill_hook(&mut self, sig: Signal, group: bool) -> usize {
        let Some(job) = self
            .hook
            .as_ref()
            .filter(|h| h.process.is_some())
            .map(|h| h.job)
        else {
            return 0;
        };
        let groups = if group {
            self.place.signal_groups(Some(job), sig)
        } else {
            Vec::new()
        };
        let Some(h) = &self.hook else { return 0 };
        kill::signal_subtrees(
            self.proc.as_fd(),
            self.me,
            self.place.reaper_pid(),
            Some(&h.before),
            Some(sig),
            &groups,
        )
    }
}

/// The exit code of a command that could not be started, as shells give it.
pub fn exec_failure_code(e: &io::Error) -> i32 {
    match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
        Errno::ENOENT => 127, // as shells report "command not found"
        Errno::EACCES => 126,
        _ => 128,
    }
}

/// Why a hook could not be started, as its status says.
fn spawn_failure(argv0: &str, e: &SpawnError, place: &HookPlace, launch: &Launch) -> String {
    let inside = match place {
        HookPlace::Remote(_) => " inside the main container",
        _ => "",
    };
    match (
        e.step,
        launch.working_dir.as_deref().filter(|d| !d.is_empty()),
    ) {
        (Step::WorkingDir, Some(d)) => {
            format!(
                "failed to start {argv0:?}{inside}: working directory {d:?}: {}",
                e.error
            )
        }
        (Step::WorkingDir, None) => format!(
            "failed to start {argv0:?}{inside}: the main container's working directory: {}",
            e.error
        ),
        (Step::Identity, _) => format!(
            "failed to start {argv0:?}{inside}: taking the task's identity (securityContext, --task-uid-range, --task-run-as-user): {}",
            e.error
        ),
        _ => format!("failed to start {argv0:?}{inside}: {}", e.error),
    }
}
