//! The shim's event loop once the task runs: logs, timeout, stop requests, the main
//! container's liveness, reaping, and recording the exit.

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

use super::kill;
use super::logs::{self, CappedLog};
use super::place::{JobExit, MAIN, Place};
use super::release_agent;
use crate::runtime::proc_handle;
use crate::runtime::procfs::ProcIdentity;
use crate::runtime::records::{self, Entry, ExitRecord, Launch, Unrecorded};
use crate::task::time::Time;

/// How often a sidecar task's shim checks that the main container is still there.
const TARGET_CHECK: Duration = Duration::from_secs(1);

/// At most this many reads (of up to 16 KiB) move pipe contents to the logs between the
/// main process's exit and recording it.
const DRAIN_BUDGET: usize = 256;

/// Between SIGKILL rounds while any process of the task is left.
const KILL_AGAIN: Duration = Duration::from_millis(100);

/// Where stopping the task stands.
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

pub struct Supervisor<'a> {
    launch: &'a Launch,
    place: Place,
    main: ProcIdentity,
    started: Time,
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
    running_lock: Option<Flock<File>>,
    stdout: CappedLog,
    stderr: CappedLog,
}

impl<'a> Supervisor<'a> {
    pub fn new(
        dir: &Path,
        launch: &'a Launch,
        place: Place,
        main: ProcIdentity,
        started: Time,
        running_lock: Flock<File>,
    ) -> io::Result<Self> {
        let index = logs::index(dir, launch.max_log_bytes);
        Ok(Supervisor {
            launch,
            place,
            main,
            started,
            proc: File::open("/proc")?,
            me: std::process::id() as i32,
            deadline: launch
                .timeout_ms
                .map(|ms| Instant::now() + Duration::from_millis(ms)),
            stopping: Stopping::No,
            target_check: launch
                .target
                .as_ref()
                .map(|_| Instant::now() + TARGET_CHECK),
            target_gone: false,
            timed_out: false,
            stop_requested: false,
            main_done: false,
            children_gone: false,
            running_lock: Some(running_lock),
            stdout: CappedLog::new(dir.join(records::STDOUT), launch.max_log_bytes, 0, &index),
            stderr: CappedLog::new(dir.join(records::STDERR), launch.max_log_bytes, 1, &index),
        })
    }

    pub fn run(
        &mut self,
        sigfd: &SignalFd,
        out: io::PipeReader,
        err: io::PipeReader,
    ) -> io::Result<()> {
        let mut pipes = [Some(out), Some(err)];
        // Small: zeroing and faulting in a bigger buffer costs every task, chatty or not.
        let mut buf = vec![0u8; 16 * 1024];
        let mut drain_until: Option<Instant> = None;
        loop {
            for exit in self.collect_exits()? {
                if exit.job == MAIN && !self.main_done {
                    self.drain(&mut pipes, &mut buf)?;
                    self.main_exited(exit)?;
                }
            }
            if self.main_done && self.children_gone {
                // Nobody is left to write; give the pipes a moment to drain, then leave.
                let until =
                    *drain_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
                if pipes.iter().all(Option::is_none) || Instant::now() >= until {
                    return Ok(());
                }
            }
            self.check_timers();

            let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
            let reaper = self.place.fd().filter(|_| !self.children_gone);
            fds.extend(reaper.map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
            let first_pipe = fds.len();
            for p in pipes.iter().flatten() {
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
            for (i, slot) in pipes.iter_mut().enumerate() {
                if slot.is_some() {
                    if ready[idx] {
                        self.pump(i, slot, &mut buf)?;
                    }
                    idx += 1;
                }
            }
        }
    }

    /// Reaps every exited child of the shim and gathers the commands' exits: from
    /// `waitpid` on the host, from the reaper's reports in a container. A reaper that is
    /// gone without reporting the main command's exit makes that exit unknown.
    fn collect_exits(&mut self) -> io::Result<Vec<JobExit>> {
        let mut exits = Vec::new();
        let mut reaper_gone = false;
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
            reaper_gone |= Some(pid) == self.place.spare();
        }
        // Read after reaping: whatever the reaper sent before it died is in the socket.
        exits.extend(self.place.reported_exits());
        let main_reported = exits.iter().any(|e| e.job == MAIN);
        if (reaper_gone || self.children_gone) && !self.main_done && !main_reported {
            self.main_lost()?;
        }
        Ok(exits)
    }

    /// Moves one read's worth from a task's pipe to its log; `None`s the slot at EOF.
    fn pump(
        &mut self,
        i: usize,
        slot: &mut Option<io::PipeReader>,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let n = slot.as_mut().map(|p| p.read(buf)).unwrap_or(Ok(0))?;
        if n == 0 {
            *slot = None;
        } else {
            let log = if i == 0 {
                &mut self.stdout
            } else {
                &mut self.stderr
            };
            // A full disk must not kill the supervisor; the output is lost.
            let _ = log.write(&buf[..n]);
        }
        Ok(())
    }

    /// Logs what the pipes already hold. Called once the main process has exited and
    /// before its exit is recorded, so that a client who sees `terminated` finds all the
    /// output the task wrote in its log. Bounded, because a background child that
    /// outlives the task may keep writing.
    fn drain(&mut self, pipes: &mut [Option<io::PipeReader>; 2], buf: &mut [u8]) -> io::Result<()> {
        let mut budget = DRAIN_BUDGET;
        while budget > 0 {
            let mut any = false;
            for (i, slot) in pipes.iter_mut().enumerate() {
                let readable = slot.as_ref().is_some_and(|p| {
                    let mut fd = [PollFd::new(p.as_fd(), PollFlags::POLLIN)];
                    matches!(poll(&mut fd, PollTimeout::ZERO), Ok(n) if n > 0)
                });
                if readable {
                    self.pump(i, slot, buf)?;
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
        let next = [
            self.deadline.filter(|_| !self.main_done && !self.timed_out),
            kill_at,
            self.target_check.filter(|_| !self.main_done),
            drain_until,
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

    fn request_stop(&mut self) {
        self.stop_requested = true;
        self.begin_kill();
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
        self.place.signal_groups(sig);
        kill::signal_descendants(self.proc.as_fd(), self.me, self.place.spare(), sig)
    }

    fn check_timers(&mut self) {
        let now = Instant::now();
        if !self.main_done && !self.timed_out && self.deadline.is_some_and(|d| now >= d) {
            self.timed_out = true;
            self.begin_kill();
        }
        if let (Some(t), Some(target)) = (self.target_check, self.launch.target.as_ref())
            && now >= t
            && !self.main_done
        {
            self.target_check = Some(now + TARGET_CHECK);
            if !target.process.is_alive() && !self.target_gone {
                // The container the task lives in restarted: the task goes with it.
                self.target_gone = true;
                self.begin_kill();
            }
        }
        if let Stopping::Grace(t) | Stopping::Killing(t) = self.stopping
            && now >= t
        {
            // Grace is over: SIGKILL everything left, again every 100 ms until none is.
            let left = self.signal_tree(Signal::SIGKILL);
            self.stopping = if left == 0 && self.main_done {
                Stopping::Done
            } else {
                Stopping::Killing(now + KILL_AGAIN)
            };
        }
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
            started_at: Some(self.started),
            finished_at: Some(Time::now()),
            timed_out: self.timed_out,
            stop_requested: self.stop_requested,
            target_gone: self.target_gone_now(),
            ..Default::default()
        };
        self.record(rec)
    }

    /// The reaper inside the main container is gone and never reported the task's exit.
    /// If the container went with it, the kernel killed everything in its PID namespace:
    /// the task died of SIGKILL. Otherwise its exit is unknown, and what can be proven
    /// the task's is stopped (its group, while its leader is unreaped).
    fn main_lost(&mut self) -> io::Result<()> {
        let target_gone = self.target_gone_now();
        if !target_gone {
            proc_handle::signal_group(&self.main, Signal::SIGKILL);
        }
        let rec = ExitRecord {
            signal: target_gone.then_some(Signal::SIGKILL as i32),
            started_at: Some(self.started),
            finished_at: Some(Time::now()),
            timed_out: self.timed_out,
            stop_requested: self.stop_requested,
            target_gone,
            unrecorded: (!target_gone).then_some(Unrecorded::SupervisorLost),
            ..Default::default()
        };
        self.record(rec)
    }

    fn record(&mut self, rec: ExitRecord) -> io::Result<()> {
        self.main_done = true;
        if let Some(journal) = self.running_lock.as_mut() {
            records::append(journal, &Entry::Exit(rec), true)?;
        }
        // Releasing the lock and closing the pipe is what tells the agent the task finished.
        self.running_lock = None;
        release_agent();
        Ok(())
    }
}
