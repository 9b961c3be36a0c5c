//! The shim's event loop once the task's run has begun: its commands in order (the
//! `preStart` hook, the main command, the `postStop` hook), logs, timeouts, stop requests,
//! the main container's liveness, reaping, and recording each end in the journal.
//!
//! The run's logic is `machine::Machine` (events in, actions out, no I/O); this is its
//! driver: it turns reaping, signals and timers into events and does the actions.
//!
//! The journal's lock is released (and the agent's pipe closed) once the run is over:
//! the main command's exit line written and, if the task has one, the `postStop` hook's
//! end too. What the task left running (daemons) may outlive that, as before.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::Flock;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

mod hook_steps;
mod machine;
mod recording;

pub use hook_steps::exec_failure_code;
use machine::{Action, Cmd, Event, Exit, Machine, Phase};

use super::hooks::{self, HookJob, Tail};
use super::kill;
use super::logs::{self, CappedLog};
use super::place::{JobExit, MAIN, POST_STOP, PRE_START, Place, job_hook};
use super::{notify_agent, release_agent};
use crate::runtime::journal::{Entry, Launch, ShimRecord};
use crate::sys::exhaustion::Exhaustion;
use crate::sys::proc_handle;
use crate::sys::procfs::ProcIdentity;
use crate::task::layout;
use crate::task::model::HookName;
use crate::task::time::Time;

/// At most this many reads (of up to 16 KiB) move pipe contents to the logs between a
/// command's exit and recording it.
const DRAIN_BUDGET: usize = 256;

/// Pipe slots: the main command's stdout and stderr, each hook's combined output.
const SLOTS: usize = 4;
const PRE_START_SLOT: usize = 2;
const POST_STOP_SLOT: usize = 3;

fn slot_of(h: HookName) -> usize {
    match h {
        HookName::PreStart => PRE_START_SLOT,
        HookName::PostStop => POST_STOP_SLOT,
    }
}

/// How the first command of a run failed to start, for the caller's give-back.
pub enum FirstStart {
    /// Out of processes, memory or descriptors before anything of the task ran.
    Exhausted(io::Error),
    Failed(io::Error),
}

pub struct Supervisor<'a> {
    launch: &'a Launch,
    place: Place,
    machine: Machine,
    shim: ProcIdentity,
    main: Option<ProcIdentity>,
    started: Option<Time>,
    /// The /proc the task's processes are walked in.
    proc: File,
    me: i32,
    /// The shim had no child left at the last reaping.
    children_gone: bool,
    /// The reaper inside the main container was reaped.
    reaper_gone: bool,
    hook: Option<HookJob>,
    running_lock: Option<Flock<File>>,
    logs: [CappedLog; SLOTS],
    tails: [Tail; 2],
    pipes: [Option<io::PipeReader>; SLOTS],
    /// What a pipe read lands in. Small: zeroing and faulting in a bigger buffer costs
    /// every task, chatty or not.
    buf: Vec<u8>,
    /// The task's cgroups (containment and limits): what they counted goes into the exit
    /// line.
    cgroups: Vec<std::path::PathBuf>,
}

impl<'a> Supervisor<'a> {
    pub fn new(
        dir: &Path,
        launch: &'a Launch,
        place: Place,
        shim: ProcIdentity,
        running_lock: Flock<File>,
    ) -> io::Result<Self> {
        let index = logs::index(dir, launch.max_log_bytes);
        let cap = launch.max_log_bytes;
        Ok(Supervisor {
            launch,
            place,
            machine: Machine::new(config(launch), Instant::now()),
            shim,
            main: None,
            started: None,
            proc: File::open("/proc")?,
            me: std::process::id() as i32,
            children_gone: false,
            reaper_gone: false,
            hook: None,
            running_lock: Some(running_lock),
            logs: [
                CappedLog::new(dir.join(layout::STDOUT), cap, 0, &index),
                CappedLog::new(dir.join(layout::STDERR), cap, 1, &index),
                hooks::log(dir, HookName::PreStart, cap),
                hooks::log(dir, HookName::PostStop, cap),
            ],
            tails: [Tail::default(), Tail::default()],
            pipes: [None, None, None, None],
            buf: vec![0u8; 16 * 1024],
            cgroups: Vec::new(),
        })
    }

    /// The task's cgroups, whose usage (and OOM kills) its exit line records.
    pub fn with_cgroups(mut self, cgroups: Vec<std::path::PathBuf>) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// The journal's handle while the run lasts (for giving a launch back).
    pub fn journal_file(&mut self) -> Option<&mut Flock<File>> {
        self.running_lock.as_mut()
    }

    /// Starts the run's first command: the `preStart` hook, else the main command. Out of
    /// processes and the like before anything ran is the caller's to give back.
    pub fn start_first(&mut self) -> Result<(), FirstStart> {
        match self.feed(Event::Begin {
            now: Instant::now(),
        }) {
            Ok(()) => Ok(()),
            Err(e) if Exhaustion::of(&e).is_some() => Err(FirstStart::Exhausted(e)),
            Err(e) => Err(FirstStart::Failed(e)),
        }
    }

    /// Hands an event to the machine and does its actions in order, each action's result
    /// fed back before the next action.
    fn feed(&mut self, ev: Event) -> io::Result<()> {
        for action in self.machine.on(ev) {
            if let Some(result) = self.act(action)? {
                self.feed(result)?;
            }
        }
        Ok(())
    }

    fn act(&mut self, action: Action) -> io::Result<Option<Event>> {
        Ok(match action {
            Action::StartHook { name, first } => Some(self.start_hook(name, first)?),
            Action::StartMain { first } => Some(self.start_main(first)?),
            Action::SignalTask(sig) => {
                self.signal_tree(sig);
                None
            }
            Action::KillTaskRound => Some(Event::TaskLeft(self.signal_tree(Signal::SIGKILL))),
            Action::CountTask => Some(Event::TaskCounted(kill::signal_subtrees(
                self.proc.as_fd(),
                self.me,
                self.place.reaper_pid(),
                None,
                None,
                &[],
            ))),
            Action::SignalHook { sig, group } => {
                self.kill_hook(sig, group);
                None
            }
            Action::KillHookRound { group } => {
                Some(Event::HookLeft(self.kill_hook(Signal::SIGKILL, group)))
            }
            Action::KillMainGroup => {
                if let Some(main) = &self.main {
                    proc_handle::signal_group(main, Signal::SIGKILL);
                }
                None
            }
            Action::Drain(Cmd::Main) => {
                self.drain(&[0, 1])?;
                None
            }
            Action::Drain(Cmd::Hook(name)) => {
                self.drain(&[slot_of(name)])?;
                None
            }
            Action::RecordMain { end, marks } => {
                self.record_main(self.exit_record(end, marks))?;
                None
            }
            Action::RecordHook {
                code,
                signal,
                why,
                timed_out,
            } => {
                self.end_hook(code, signal, why, timed_out)?;
                None
            }
            Action::Finish => {
                // Releasing the journal's lock and closing the pipe is what tells the agent.
                self.place.release();
                self.running_lock = None;
                release_agent();
                None
            }
        })
    }

    /// Starts the main command and writes its `started` line. A start failure is recorded
    /// as the run's exit (`ProcessStartFailed`), except for a first command out of resources.
    fn start_main(&mut self, first: bool) -> io::Result<Event> {
        let (out_r, out_w) = io::pipe()?;
        let (err_r, err_w) = io::pipe()?;
        let journal = self.running_lock.as_ref().map(|j| j.as_fd());
        let spawned = self
            .place
            .start(MAIN, out_w.as_fd(), err_w.as_fd(), journal);
        drop((out_w, err_w)); // only the task holds the write ends now, so EOF can arrive
        let main = match spawned {
            Ok(main) => main,
            Err(e) if first && Exhaustion::of(&e.error).is_some() => return Err(e.error),
            Err(e) => {
                self.main_start_failed(e)?;
                return Ok(Event::MainStartFailed);
            }
        };
        let now = Instant::now();
        self.place.release_after(MAIN);
        let started = Time::now();
        self.main = Some(main);
        self.started = Some(started);
        self.pipes[0] = Some(out_r);
        self.pipes[1] = Some(err_r);
        let rec = ShimRecord {
            shim: self.shim,
            main: Some(main),
            started_at: Some(started),
        };
        // Not fsynced: the durable claim already says the task may have run; who runs it
        // only matters until the node restarts. The exit line's fdatasync covers it too.
        self.journal(&Entry::Started(rec), false)?;
        notify_agent(b"started\n");
        Ok(Event::MainStarted { now })
    }

    pub fn run(&mut self, sigfd: &SignalFd) -> io::Result<()> {
        let mut drain_until: Option<Instant> = None;
        loop {
            self.reap()?;
            if self.machine.phase() == Phase::Done && self.children_gone {
                // Nobody is left to write; give the pipes a moment to drain, then leave.
                let until =
                    *drain_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
                if self.pipes.iter().all(Option::is_none) || Instant::now() >= until {
                    return Ok(());
                }
            }
            // A timer may have ended a stop (or a hook): the run moves on, and the loop
            // looks again before it sleeps; so it does for exits read while a signal's
            // answer was awaited.
            let before = self.machine.phase();
            self.tick()?;
            if self.machine.phase() != before || self.place.exits_read() {
                continue;
            }

            let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
            let reaper = self.place.fd().filter(|_| !self.children_gone);
            fds.extend(reaper.map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
            let first_pipe = fds.len();
            for p in self.pipes.iter().flatten() {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, self.poll_timeout(drain_until)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready: Vec<bool> = fds.iter().map(|f| f.any().unwrap_or(false)).collect();
            drop(fds);
            if ready[0] {
                while let Ok(Some(info)) = sigfd.read_signal() {
                    if info.ssi_signo as i32 != Signal::SIGCHLD as i32 {
                        self.feed(Event::StopRequested {
                            now: Instant::now(),
                        })?;
                    }
                }
            }
            let mut idx = first_pipe;
            for i in 0..SLOTS {
                if self.pipes[i].is_some() {
                    if ready[idx] {
                        self.pump(i)?;
                    }
                    idx += 1;
                }
            }
        }
    }

    /// Reaps every exited child of the shim and gathers the commands' exits: from
    /// `waitpid` on the host, from the reaper's reports in a container. A reaper that is
    /// gone without reporting a running command's exit makes that exit unknown.
    fn reap(&mut self) -> io::Result<()> {
        let mut exits = Vec::new();
        // Fresh each time: a command started since the last look is a child again.
        self.children_gone = false;
        loop {
            let (pid, code, signal) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), Some(code), None),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid.as_raw(), None, Some(sig as i32)),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => {
                    self.children_gone = true;
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            exits.extend(self.place.reaped(pid, code, signal));
            self.reaper_gone |= Some(pid) == self.place.reaper_pid();
        }
        // Read after reaping: whatever the reaper sent before it died is in the socket.
        exits.extend(self.place.reported_exits());
        let gone = self.reaper_gone || self.children_gone;
        let lost: Vec<Cmd> = [MAIN, PRE_START, POST_STOP]
            .into_iter()
            .filter(|&job| self.place.job_lost(job, gone) && !exits.iter().any(|e| e.job == job))
            .map(cmd_of)
            .collect();
        // Probed only when it may be recorded.
        let target_dead = (!exits.is_empty() || !lost.is_empty())
            && self
                .launch
                .target
                .as_ref()
                .is_some_and(|t| !t.process.is_alive());
        let exits = exits
            .into_iter()
            .map(|e: JobExit| Exit {
                cmd: cmd_of(e.job),
                code: e.code,
                signal: e.signal,
            })
            .collect();
        self.feed(Event::Reaped {
            now: Instant::now(),
            exits,
            lost,
            target_dead,
        })
    }

    fn tick(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let target_alive = self
            .launch
            .target
            .as_ref()
            .filter(|_| self.machine.target_check_due(now, self.children_gone))
            .map(|t| t.process.is_alive());
        self.feed(Event::Tick { now, target_alive })
    }

    /// Moves one read's worth from a pipe to its log; `None`s the slot at EOF.
    fn pump(&mut self, i: usize) -> io::Result<()> {
        let n = self.pipes[i]
            .as_mut()
            .map(|p| p.read(&mut self.buf))
            .unwrap_or(Ok(0))?;
        if n == 0 {
            self.pipes[i] = None;
        } else {
            // A full disk must not kill the supervisor; the output is lost.
            let _ = self.logs[i].write(&self.buf[..n]);
            if i >= PRE_START_SLOT {
                self.tails[i - PRE_START_SLOT].push(&self.buf[..n]);
            }
        }
        Ok(())
    }

    /// Logs what the given pipes already hold. Called once a command has exited and
    /// before its exit is recorded, so that a client who sees it ended finds all the
    /// output it wrote in its log. Bounded, because a background child that outlives the
    /// command may keep writing.
    fn drain(&mut self, slots: &[usize]) -> io::Result<()> {
        let mut budget = DRAIN_BUDGET;
        while budget > 0 {
            let mut any = false;
            for &i in slots {
                let readable = self.pipes[i].as_ref().is_some_and(|p| {
                    let mut fd = [PollFd::new(p.as_fd(), PollFlags::POLLIN)];
                    matches!(poll(&mut fd, PollTimeout::ZERO), Ok(n) if n > 0)
                });
                if readable {
                    self.pump(i)?;
                    any = true;
                    budget = budget.saturating_sub(1);
                }
            }
            if !any {
                break;
            }
        }
        Ok(())
    }

    fn poll_timeout(&self, drain_until: Option<Instant>) -> PollTimeout {
        let next = [self.machine.next_timer(self.children_gone), drain_until]
            .into_iter()
            .flatten()
            .min();
        match next {
            None => PollTimeout::NONE,
            Some(t) => {
                let ms = t
                    .saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(60_000) as u16;
                PollTimeout::from(ms.max(1))
            }
        }
    }

    /// Signals every process of the task that is provably still the task's: the groups of
    /// commands not reaped yet, and every descendant of the shim (through handles), the
    /// reaper excepted; a member of a group just signalled is not signalled again (but
    /// for SIGKILL). Returns how many descendants were left.
    fn signal_tree(&mut self, sig: Signal) -> usize {
        let groups = self.place.signal_groups(None, sig);
        kill::signal_descendants(
            self.proc.as_fd(),
            self.me,
            self.place.reaper_pid(),
            sig,
            &groups,
        )
    }
}

/// What the launch makes of the run, for its machine.
fn config(launch: &Launch) -> machine::Config {
    let timeout = |ms: Option<u64>| ms.map(Duration::from_millis);
    machine::Config {
        pre_start: launch.pre_start.as_ref().map(|h| timeout(h.timeout_ms)),
        post_stop: launch.post_stop.as_ref().map(|h| timeout(h.timeout_ms)),
        timeout: timeout(launch.timeout_ms),
        grace: Duration::from_millis(launch.grace_ms),
        sidecar: launch.target.is_some(),
        end_with_main: launch.end_with_main,
    }
}

fn cmd_of(job: usize) -> Cmd {
    job_hook(job).map_or(Cmd::Main, Cmd::Hook)
}
