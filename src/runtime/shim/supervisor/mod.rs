//! The shim's event loop once the task's run has begun: its commands in order (the
//! `preStart` hook, the main command, the `postStop` hook), logs, timeouts, stop requests,
//! the main container's liveness, reaping, and recording each end in the journal.
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

pub use hook_steps::exec_failure_code;

use super::hooks::{self, HookJob, HookStop, Tail};
use super::kill;
use super::logs::{self, CappedLog};
use super::place::{JobExit, MAIN, Place};
use super::{notify_agent, release_agent};
use crate::runtime::child_setup::{SpawnError, Step};
use crate::runtime::journal::{self, Entry, ExitRecord, Launch, ShimRecord, Unrecorded};
use crate::sys::exhaustion::Exhaustion;
use crate::sys::proc_handle;
use crate::sys::procfs::ProcIdentity;
use crate::task::layout;
use crate::task::model::HookName;
use crate::task::time::Time;

/// How often a sidecar task's shim checks that the main container is still there.
const TARGET_CHECK: Duration = Duration::from_secs(1);

/// At most this many reads (of up to 16 KiB) move pipe contents to the logs between a
/// command's exit and recording it.
const DRAIN_BUDGET: usize = 256;

/// Between SIGKILL rounds while any process of the task is left.
const KILL_AGAIN: Duration = Duration::from_millis(100);

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

/// Where stopping the main command's tree stands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stopping {
    No,
    /// SIGTERM sent; SIGKILL at this time.
    Grace(Instant),
    /// SIGKILL sent; again at this time if anything was left.
    Killing(Instant),
    /// Nothing of the task was left at the last round.
    Done,
}

/// Which command of the run is current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    PreStart,
    Main,
    PostStop,
    /// The run is over and recorded; the shim stays while the task's daemons live.
    Done,
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
    phase: Phase,
    shim: ProcIdentity,
    main: Option<ProcIdentity>,
    started: Option<Time>,
    /// The /proc the task's processes are walked in.
    proc: File,
    me: i32,
    deadline: Option<Instant>,
    stopping: Stopping,
    /// Sidecar tasks: when to next check that the main container still runs.
    target_check: Option<Instant>,
    target_gone: bool,
    timed_out: bool,
    stop_requested: bool,
    main_done: bool,
    children_gone: bool,
    reaper_gone: bool,
    hook: Option<HookJob>,
    running_lock: Option<Flock<File>>,
    logs: [CappedLog; SLOTS],
    tails: [Tail; 2],
    pipes: [Option<io::PipeReader>; SLOTS],
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
            phase: Phase::PreStart,
            shim,
            main: None,
            started: None,
            proc: File::open("/proc")?,
            me: std::process::id() as i32,
            deadline: None,
            stopping: Stopping::No,
            target_check: None,
            target_gone: false,
            timed_out: false,
            stop_requested: false,
            main_done: false,
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
            cgroups: Vec::new(),
        })
    }

    /// The task's cgroups, whose usage (and OOM kills) its exit line records.
    pub fn with_cgroups(mut self, cgroups: Vec<std::path::PathBuf>) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// Appends to the journal. A durable line (an exit) the disk refuses for want of
    /// space or because it went read-only is kept and retried until it is written: the
    /// shim holds on to the run (its locks, so the agent shows it running) rather than die
    /// and leave its outcome unknown. A stop request still ends it (SIGKILL after the
    /// grace period).
    fn journal(&mut self, entry: &Entry, durable: bool) -> io::Result<()> {
        let Some(j) = self.running_lock.as_mut() else {
            return Ok(());
        };
        let mut pause = std::time::Duration::from_millis(50);
        let mut told = false;
        loop {
            match journal::append(j, entry, durable) {
                Err(e) if durable && disk_refused(&e) => {
                    if !told {
                        eprintln!(
                            "task-executor shim {}: the journal can't take a line ({e}); retrying until it can",
                            std::process::id()
                        );
                        told = true;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                }
                r => return r,
            }
        }
    }

    /// The journal's handle while the run lasts (for giving a launch back).
    pub fn journal_file(&mut self) -> Option<&mut Flock<File>> {
        self.running_lock.as_mut()
    }

    /// Starts the run's first command: the `preStart` hook, else the main command. Out of
    /// processes and the like before anything ran is the caller's to give back.
    pub fn start_first(&mut self) -> Result<(), FirstStart> {
        if self.launch.pre_start.is_some() {
            return match self.start_hook(HookName::PreStart, true) {
                Ok(()) => Ok(()),
                Err(e) if Exhaustion::of(&e).is_some() => Err(FirstStart::Exhausted(e)),
                Err(e) => Err(FirstStart::Failed(e)),
            };
        }
        self.phase = Phase::Main;
        match self.start_main(true) {
            Ok(()) => Ok(()),
            Err(e) if Exhaustion::of(&e).is_some() => Err(FirstStart::Exhausted(e)),
            Err(e) => Err(FirstStart::Failed(e)),
        }
    }

    /// Starts the main command and writes its `started` line. A start failure is recorded
    /// as the run's exit (`ProcessStartFailed`), except for a first command out of resources.
    fn start_main(&mut self, first: bool) -> io::Result<()> {
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
            Err(e) => return self.main_start_failed(e),
        };
        self.place.release_after(MAIN);
        let started = Time::now();
        self.main = Some(main);
        self.started = Some(started);
        self.deadline = self
            .launch
            .timeout_ms
            // A deadline past what a clock can hold is no deadline (no overflow panic).
            .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
        self.target_check = self
            .launch
            .target
            .as_ref()
            .map(|_| Instant::now() + TARGET_CHECK);
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
        Ok(())
    }

    fn main_start_failed(&mut self, e: SpawnError) -> io::Result<()> {
        let launch = self.launch;
        let mut what = format!("failed to start {:?}", launch.argv[0]);
        if e.step == Step::Identity {
            what.push_str(": taking the task's identity (securityContext, --task-uid-range, --task-run-as-user)");
        }
        if e.step == Step::WorkingDir {
            match launch.working_dir.as_deref().filter(|d| !d.is_empty()) {
                Some(d) => what.push_str(&format!(": working directory {d:?}")),
                None => what.push_str(": the main container's working directory"),
            }
        }
        let rec = super::start_error_record(&e.error, &what, launch);
        self.record_main(rec)
    }

    pub fn run(&mut self, sigfd: &SignalFd) -> io::Result<()> {
        // Small: zeroing and faulting in a bigger buffer costs every task, chatty or not.
        let mut buf = vec![0u8; 16 * 1024];
        let mut drain_until: Option<Instant> = None;
        loop {
            for exit in self.collect_exits()? {
                self.on_exit(exit, &mut buf)?;
            }
            self.advance()?;
            if self.phase == Phase::Done && self.children_gone {
                // Nobody is left to write; give the pipes a moment to drain, then leave.
                let until =
                    *drain_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
                if self.pipes.iter().all(Option::is_none) || Instant::now() >= until {
                    return Ok(());
                }
            }
            self.check_timers();
            // A timer may have ended a stop (or a hook): the run moves on, and the loop
            // looks again before it sleeps.
            let before = self.phase;
            self.advance()?;
            if self.phase != before {
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
                        self.request_stop();
                    }
                }
            }
            let mut idx = first_pipe;
            for i in 0..SLOTS {
                if self.pipes[i].is_some() {
                    if ready[idx] {
                        self.pump(i, &mut buf)?;
                    }
                    idx += 1;
                }
            }
        }
    }

    /// Reaps every exited child of the shim and gathers the commands' exits: from
    /// `waitpid` on the host, from the reaper's reports in a container. A reaper that is
    /// gone without reporting a running command's exit makes that exit unknown.
    fn collect_exits(&mut self) -> io::Result<Vec<JobExit>> {
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
            self.reaper_gone |= Some(pid) == self.place.spare();
        }
        // Read after reaping: whatever the reaper sent before it died is in the socket.
        exits.extend(self.place.reported_exits());
        let gone = self.reaper_gone || self.children_gone;
        let reported = |job| exits.iter().any(|e: &JobExit| e.job == job);
        if self.place.job_lost(MAIN, gone)
            && self.main.is_some()
            && !self.main_done
            && !reported(MAIN)
        {
            self.main_lost()?;
        }
        if let Some(h) = &self.hook
            && !h.ended
            && h.process.is_some()
            && self.place.job_lost(h.job, gone)
            && !reported(h.job)
        {
            let why = if self.target_gone_now() {
                "the main container is gone"
            } else {
                "its reaper inside the main container died"
            };
            self.end_hook(None, None, Some(why.to_string()))?;
        }
        Ok(exits)
    }

    fn on_exit(&mut self, exit: JobExit, buf: &mut [u8]) -> io::Result<()> {
        if exit.job == MAIN {
            if !self.main_done {
                self.drain(&[0, 1], buf)?;
                self.main_exited(exit)?;
            }
            return Ok(());
        }
        let Some(h) = &self.hook else { return Ok(()) };
        if h.job != exit.job || h.ended {
            return Ok(());
        }
        let (name, timed_out) = (h.name, h.timed_out);
        if timed_out {
            // What the hook started after the last round goes too.
            self.kill_hook(Signal::SIGKILL);
        }
        self.drain(&[slot_of(name)], buf)?;
        self.end_hook(exit.code, exit.signal, None)
    }

    /// Moves the run on: the main command after a `preStart` that succeeded, the
    /// `postStop` hook once the main command's tree has ended, the end of the run.
    fn advance(&mut self) -> io::Result<()> {
        loop {
            match self.phase {
                Phase::PreStart => {
                    let Some(h) = self.hook.as_ref().filter(|h| h.ended) else {
                        return Ok(());
                    };
                    let succeeded = h.succeeded;
                    self.phase = Phase::Main;
                    if succeeded && !self.stop_requested {
                        self.start_main(false)?;
                    } else {
                        // The main command never runs.
                        let rec = ExitRecord {
                            exit_code: Some(1),
                            finished_at: Some(Time::now()),
                            stop_requested: self.stop_requested,
                            pre_start_failed: true,
                            ..Default::default()
                        };
                        self.record_main(rec)?;
                    }
                }
                Phase::Main => {
                    if !self.main_done || !matches!(self.stopping, Stopping::No | Stopping::Done) {
                        return Ok(());
                    }
                    self.phase = Phase::PostStop;
                    self.start_hook(HookName::PostStop, false)?;
                }
                Phase::PostStop => {
                    let pending = self.launch.post_stop.is_some()
                        && !self
                            .hook
                            .as_ref()
                            .is_some_and(|h| h.name == HookName::PostStop && h.ended);
                    if pending {
                        return Ok(());
                    }
                    self.finish();
                }
                Phase::Done => return Ok(()),
            }
        }
    }

    /// The run is over: releasing the journal's lock and closing the pipe is what tells
    /// the agent. A stop requested while the `postStop` hook ran stops what is left now.
    fn finish(&mut self) {
        self.phase = Phase::Done;
        self.place.release();
        self.running_lock = None;
        release_agent();
        if self.stop_requested && self.stopping == Stopping::No {
            self.begin_kill();
        }
    }

    /// Moves one read's worth from a pipe to its log; `None`s the slot at EOF.
    fn pump(&mut self, i: usize, buf: &mut [u8]) -> io::Result<()> {
        let n = self.pipes[i]
            .as_mut()
            .map(|p| p.read(buf))
            .unwrap_or(Ok(0))?;
        if n == 0 {
            self.pipes[i] = None;
        } else {
            // A full disk must not kill the supervisor; the output is lost.
            let _ = self.logs[i].write(&buf[..n]);
            if i >= PRE_START_SLOT {
                self.tails[i - PRE_START_SLOT].push(&buf[..n]);
            }
        }
        Ok(())
    }

    /// Logs what the given pipes already hold. Called once a command has exited and
    /// before its exit is recorded, so that a client who sees it ended finds all the
    /// output it wrote in its log. Bounded, because a background child that outlives the
    /// command may keep writing.
    fn drain(&mut self, slots: &[usize], buf: &mut [u8]) -> io::Result<()> {
        let mut budget = DRAIN_BUDGET;
        while budget > 0 {
            let mut any = false;
            for &i in slots {
                let readable = self.pipes[i].as_ref().is_some_and(|p| {
                    let mut fd = [PollFd::new(p.as_fd(), PollFlags::POLLIN)];
                    matches!(poll(&mut fd, PollTimeout::ZERO), Ok(n) if n > 0)
                });
                if readable {
                    self.pump(i, buf)?;
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
        let kill_at = match self.stopping {
            Stopping::Grace(t) | Stopping::Killing(t) => Some(t),
            Stopping::No | Stopping::Done => None,
        };
        let main_running = self.main.is_some() && !self.main_done;
        let next = [
            self.deadline.filter(|_| main_running && !self.timed_out),
            kill_at,
            self.target_check
                .filter(|_| main_running || self.leftovers_live()),
            drain_until,
            self.hook.as_ref().and_then(HookJob::next_timer),
        ]
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

    /// A stop request (DELETE, or the init stopping the container). While `preStart`
    /// runs it stops the hook (the main command then never runs); while the main
    /// command runs, its tree; while `postStop` runs, nothing yet: the hook runs to its
    /// end or timeout, then what is left is stopped.
    fn request_stop(&mut self) {
        self.stop_requested = true;
        match self.phase {
            Phase::PreStart => {
                if let Some(h) = self
                    .hook
                    .as_mut()
                    .filter(|h| !h.ended && h.stop == HookStop::No)
                {
                    h.stop = HookStop::Grace(
                        Instant::now() + Duration::from_millis(self.launch.grace_ms),
                    );
                    self.kill_hook(Signal::SIGTERM);
                }
            }
            Phase::Main | Phase::Done => self.begin_kill(),
            Phase::PostStop => {}
        }
    }

    /// SIGTERM to the whole task, SIGKILL after the grace period; once only.
    fn begin_kill(&mut self) {
        if self.stopping == Stopping::No {
            self.signal_tree(Signal::SIGTERM);
            self.stopping =
                Stopping::Grace(Instant::now() + Duration::from_millis(self.launch.grace_ms));
        }
    }

    /// Signals every process of the task that is provably still the task's: the groups of
    /// commands not reaped yet, and every descendant of the shim (through handles), the
    /// reaper excepted. Returns how many descendants were left.
    fn signal_tree(&self, sig: Signal) -> usize {
        self.place.signal_groups(None, sig);
        kill::signal_descendants(self.proc.as_fd(), self.me, self.place.spare(), sig)
    }

    fn check_timers(&mut self) {
        let now = Instant::now();
        let main_running = self.main.is_some() && !self.main_done;
        if main_running && !self.timed_out && self.deadline.is_some_and(|d| now >= d) {
            self.timed_out = true;
            self.begin_kill();
        }
        if let (Some(t), Some(target)) = (self.target_check, self.launch.target.as_ref())
            && now >= t
            && (main_running || self.leftovers_live())
        {
            self.target_check = Some(now + TARGET_CHECK);
            if !target.process.is_alive() && !self.target_gone {
                // The container the task lives in restarted: the task goes with it, and so
                // does what a finished task left running there (in a pod's shared PID
                // namespace nothing else would end it).
                self.target_gone = true;
                self.begin_kill();
            }
        }
        match self.stopping {
            Stopping::Grace(t) | Stopping::Killing(t) if now >= t => {
                // Grace is over: SIGKILL everything left, again every 100 ms until none is.
                let left = self.signal_tree(Signal::SIGKILL);
                self.stopping = if left == 0 && self.main_done {
                    Stopping::Done
                } else {
                    Stopping::Killing(now + KILL_AGAIN)
                };
            }
            Stopping::Grace(_) if self.main_done => {
                // The main command ended within the grace period: once nothing of it is
                // left, the run goes on (a `postStop` hook) without waiting out the grace.
                let left = kill::signal_subtrees(
                    self.proc.as_fd(),
                    self.me,
                    self.place.spare(),
                    None,
                    None,
                );
                if left == 0 {
                    self.stopping = Stopping::Done;
                }
            }
            _ => {}
        }
        self.check_hook_timers(now);
    }

    /// The run is over and recorded, and processes it left behind still run.
    fn leftovers_live(&self) -> bool {
        self.phase == Phase::Done && !self.children_gone
    }

    fn target_gone_now(&self) -> bool {
        self.target_gone
            || self
                .launch
                .target
                .as_ref()
                .is_some_and(|t| !t.process.is_alive())
    }

    fn main_exited(&mut self, exit: JobExit) -> io::Result<()> {
        let rec = ExitRecord {
            exit_code: exit.code,
            signal: exit.signal,
            started_at: self.started,
            finished_at: Some(Time::now()),
            timed_out: self.timed_out,
            stop_requested: self.stop_requested,
            target_gone: self.target_gone_now(),
            ..Default::default()
        };
        self.record_main(rec)?;
        self.end_with_main();
        Ok(())
    }

    /// `--end-task-with-main`: what the main command left running is SIGKILLed now (and
    /// again every round until none is left), as runc ends a container with its init.
    fn end_with_main(&mut self) {
        if self.launch.end_with_main && self.stopping == Stopping::No {
            self.signal_tree(Signal::SIGKILL);
            self.stopping = Stopping::Killing(Instant::now() + KILL_AGAIN);
        }
    }

    /// The reaper inside the main container is gone and never reported the task's exit.
    /// If the container went with it, the kernel killed everything in its PID namespace:
    /// the task died of SIGKILL. Otherwise its exit is unknown, and what can be proven
    /// the task's is stopped (its group, while its leader is unreaped).
    fn main_lost(&mut self) -> io::Result<()> {
        let target_gone = self.target_gone_now();
        if !target_gone && let Some(main) = &self.main {
            proc_handle::signal_group(main, Signal::SIGKILL);
        }
        let rec = ExitRecord {
            signal: target_gone.then_some(Signal::SIGKILL as i32),
            started_at: self.started,
            finished_at: Some(Time::now()),
            timed_out: self.timed_out,
            stop_requested: self.stop_requested,
            target_gone,
            unrecorded: (!target_gone).then_some(Unrecorded::SupervisorLost),
            ..Default::default()
        };
        self.record_main(rec)
    }

    /// Writes the main command's exit line (durably); the run goes on with `postStop`.
    fn record_main(&mut self, mut rec: ExitRecord) -> io::Result<()> {
        if !self.cgroups.is_empty() {
            // Read after the main command was reaped: an OOM kill of it is counted by then.
            let dirs: Vec<&Path> = self.cgroups.iter().map(|d| d.as_path()).collect();
            rec.usage = Some(crate::runtime::limits::usage(&dirs)).filter(|u| !u.is_empty());
        }
        self.main_done = true;
        self.journal(&Entry::Exit(rec), true)
    }
}

/// The disk refused a write for now (full, over quota, read-only): worth waiting out.
fn disk_refused(e: &io::Error) -> bool {
    matches!(
        crate::sys::exhaustion::Exhaustion::of(e),
        Some(crate::sys::exhaustion::Exhaustion::Disk)
    ) || e.raw_os_error() == Some(nix::libc::EROFS)
}
