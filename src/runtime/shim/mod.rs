//! The per-task supervisor: `task-executor shim --task-dir DIR`.
//!
//! One shim per process task, like containerd's shims or conmon. It outlives the agent, so
//! a task's exit code is recorded even while the agent is down. It is deliberately
//! single-threaded and synchronous: joining a mount namespace requires that.
//!
//! Protocol with the agent: the shim's stdout is a pipe the agent reads. The shim writes
//! `started` once the journal (`run.jsonl`) names the running task, and closes the pipe
//! once the exit line is written (or a start failure recorded), so each message means
//! "look at the journal" and EOF means "finished" (or "the shim died"). An agent restarted
//! later has no pipe: it waits on the journal's flock, held until the exit line is
//! written; the task directory's flock is held for the shim's life. The kernel drops both
//! locks and the pipe if the shim dies.

mod kill;
pub(crate) mod logs;
pub mod server;
mod spawn;
mod target;

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use self::logs::CappedLog;
use super::child_setup;
use super::procfs::ProcIdentity;
use super::records::{self, Entry, ExitRecord, Launch, ShimRecord};
use crate::task::time::Time;

/// How often a sidecar task's shim checks that the main container is still there.
const TARGET_CHECK: Duration = Duration::from_secs(1);

/// At most this many reads (of up to 16 KiB) move pipe contents to the logs between the
/// main process's exit and recording it.
const DRAIN_BUDGET: usize = 256;

/// Runs the shim; returns the shim's own exit code.
pub fn run(dir: &Path) -> i32 {
    notify_agent(records::SHIM_HELLO.as_bytes());
    match supervise(dir) {
        Ok(()) => 0,
        Err(e) => {
            // stderr is the agent's log; stdout reaches the agent waiting for the start.
            eprintln!("task-executor shim {}: {e}", dir.display());
            let nothing_started = !TASK_SPAWNED.load(std::sync::atomic::Ordering::Relaxed);
            notify_agent(records::start_failure_line(&e, nothing_started).as_bytes());
            1
        }
    }
}

/// Set once the task's process exists: from then on a failure must not be reported as
/// "nothing started" (the agent would start the task again).
static TASK_SPAWNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// flock needs no write access (directories work too); the journal is opened for appends.
fn lock(path: &Path, append: bool) -> io::Result<Flock<File>> {
    let f = if append {
        OpenOptions::new().append(true).open(path)?
    } else {
        File::open(path)?
    };
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is locked by another supervisor: {e}", path.display()),
        )
    })
}

fn supervise(dir: &Path) -> io::Result<()> {
    // Absolute: a host task's shim changes into the task's working directory.
    let dir = &std::path::absolute(dir)?;
    let _ = nix::unistd::setsid(); // own session: signals to the agent's group don't reach us
    let _shim_lock = lock(&records::shim_lock(dir), false)?;
    // Also the journal we append to: the lock is released by closing it after the exit line.
    let mut running_lock = lock(&records::running_lock(dir), true)?;
    let launch: Launch = records::read_run(dir)?
        .launch
        .ok_or_else(|| io::Error::other("the run journal has no launch record"))?;
    // From here on the task may run: the launch line must survive a power loss, so that a
    // restarted node reports the task instead of running it a second time.
    running_lock.sync_data()?;
    nix::sys::prctl::set_child_subreaper(true)?;

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

    let me = ProcIdentity::of(std::process::id() as i32)
        .ok_or_else(|| io::Error::other("no /proc/self"))?;
    let mut shim_rec = ShimRecord {
        shim: me,
        main: None,
        started_at: None,
    };

    let (out_r, out_w) = io::pipe()?;
    let (err_r, err_w) = io::pipe()?;
    let argv0 = format!("failed to start {:?}", launch.argv[0]);
    let spawned = match &launch.target {
        None => {
            // The shim becomes the task's working directory, so the spawned child starts
            // there (all paths the shim uses are absolute).
            if let Some(d) = launch.working_dir.as_deref().filter(|d| !d.is_empty())
                && let Err(e) = std::env::set_current_dir(d)
            {
                let what = format!("{argv0}: working directory {d:?}");
                return finish_start_error(running_lock, &e, &what, &launch);
            }
            spawn::spawn(&launch.argv, &launch.env, &out_w, &err_w).map(|pid| pid.as_raw())
        }
        Some(t) => {
            let prepared = match target::prepare(t, launch.working_dir.as_deref()) {
                Ok(p) => p,
                Err(e) => return finish_start_error(running_lock, &e, &argv0, &launch),
            };
            child_setup::join_pid_namespace_for_children(&prepared.pid_ns)?;
            let mut cmd = Command::new(&launch.argv[0]);
            cmd.args(&launch.argv[1..])
                .stdin(Stdio::null())
                .stdout(out_w.try_clone()?)
                .stderr(err_w.try_clone()?)
                .process_group(0)
                .env_clear()
                .envs(task_env(prepared.env, &launch));
            child_setup::install(&mut cmd, prepared.join);
            cmd.spawn().map(|c| c.id() as i32) // reaped through waitpid(-1) below
        }
    };
    drop((out_w, err_w)); // only the task holds the write ends now, so EOF can arrive
    let main_pid = match spawned {
        Ok(pid) => pid,
        // Out of processes, memory or file descriptors: nothing started, and the agent
        // starts the task again later rather than failing it for good.
        Err(e) if crate::task::exhaustion::Exhaustion::of(&e).is_some() => return Err(e),
        Err(e) => return finish_start_error(running_lock, &e, &argv0, &launch),
    };
    TASK_SPAWNED.store(true, std::sync::atomic::Ordering::Relaxed);
    let started = Time::now();
    shim_rec.main = ProcIdentity::of(main_pid).or(Some(ProcIdentity {
        pid: main_pid,
        start_time: 0,
    }));
    shim_rec.started_at = Some(started);
    // Not fsynced: the durable launch line already says the task may have run; who runs
    // it only matters until the node restarts. The exit line's fdatasync covers it too.
    records::append(&mut running_lock, &Entry::Started(shim_rec), false)?;
    notify_agent(b"started\n");

    let index = logs::index(dir, launch.max_log_bytes);
    let mut sup = Supervisor {
        launch: &launch,
        main_pid,
        started,
        deadline: launch
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms)),
        kill_at: None,
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
    };
    sup.run(&sigfd, out_r, err_r)
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

fn task_env(base: Vec<(String, String)>, launch: &Launch) -> Vec<(String, String)> {
    let mut env = base;
    for e in &launch.env {
        env.retain(|(k, _)| k != &e.name);
        env.push((e.name.clone(), e.value.clone()));
    }
    env
}

fn finish_start_error(
    mut running_lock: Flock<File>,
    e: &io::Error,
    what: &str,
    launch: &Launch,
) -> io::Result<()> {
    let rec = ExitRecord {
        exit_code: Some(match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
            Errno::ENOENT => 127, // as shells report "command not found"
            Errno::EACCES => 126,
            _ => 128,
        }),
        finished_at: Some(Time::now()),
        // A sidecar target that vanished is reported as a restart, not as a bad command.
        target_gone: launch
            .target
            .as_ref()
            .is_some_and(|t| !t.process.is_alive()),
        start_error: Some(format!("{what}: {e}")),
        ..Default::default()
    };
    records::append(&mut running_lock, &Entry::Exit(rec), true)?;
    drop(running_lock);
    release_agent();
    Ok(())
}

struct Supervisor<'a> {
    launch: &'a Launch,
    main_pid: i32,
    started: Time,
    deadline: Option<Instant>,
    kill_at: Option<Instant>,
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

impl Supervisor<'_> {
    fn run(
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
            if let Some((code, signal)) = self.reap()? {
                self.drain(&mut pipes, &mut buf)?;
                self.main_exited(code, signal)?;
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
                    let sig = info.ssi_signo as i32;
                    if sig != Signal::SIGCHLD as i32 {
                        self.request_stop();
                    }
                }
            }
            let mut idx = 1;
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
        let next = [
            self.deadline.filter(|_| !self.main_done && !self.timed_out),
            self.kill_at,
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
        if self.kill_at.is_none() {
            self.stop_requested = true;
            self.begin_kill();
        }
    }

    fn begin_kill(&mut self) {
        kill::signal_tree(Some(self.main_pid), Signal::SIGTERM);
        self.kill_at = Some(Instant::now() + Duration::from_millis(self.launch.grace_ms));
    }

    fn check_timers(&mut self) {
        let now = Instant::now();
        if !self.main_done && !self.timed_out && self.deadline.is_some_and(|d| now >= d) {
            self.timed_out = true;
            if self.kill_at.is_none() {
                self.begin_kill();
            }
        }
        if let (Some(t), Some(target)) = (self.target_check, self.launch.target.as_ref())
            && now >= t
            && !self.main_done
        {
            self.target_check = Some(now + TARGET_CHECK);
            if !target.process.is_alive() && !self.target_gone {
                // The container the task lives in restarted: the task goes with it.
                self.target_gone = true;
                if self.kill_at.is_none() {
                    self.begin_kill();
                }
            }
        }
        if let Some(k) = self.kill_at
            && now >= k
        {
            // Grace is over: SIGKILL everything left, again every 100 ms until none is.
            kill::signal_tree(Some(self.main_pid), Signal::SIGKILL);
            self.kill_at = Some(now + Duration::from_millis(100));
        }
    }

    /// Reaps every exited descendant; returns the main process's exit (code, signal) once.
    fn reap(&mut self) -> io::Result<Option<(Option<i32>, Option<i32>)>> {
        let mut main = None;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return Ok(main),
                Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == self.main_pid => {
                    main = Some((Some(code), None));
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid.as_raw() == self.main_pid => {
                    main = Some((None, Some(sig as i32)));
                }
                Ok(_) => {}
                Err(Errno::ECHILD) => {
                    self.children_gone = true;
                    if main.is_none() && !self.main_done {
                        // Should not happen: the main process was reaped elsewhere.
                        main = Some((None, None));
                    }
                    return Ok(main);
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn main_exited(&mut self, code: Option<i32>, signal: Option<i32>) -> io::Result<()> {
        self.main_done = true;
        let target_gone = self.target_gone
            || self
                .launch
                .target
                .as_ref()
                .is_some_and(|t| !t.process.is_alive());
        let rec = ExitRecord {
            exit_code: code,
            signal,
            started_at: Some(self.started),
            finished_at: Some(Time::now()),
            timed_out: self.timed_out,
            stop_requested: self.stop_requested,
            target_gone,
            start_error: None,
        };
        if let Some(journal) = self.running_lock.as_mut() {
            records::append(journal, &Entry::Exit(rec), true)?;
        }
        // Releasing the lock and closing the pipe is what tells the agent the task finished.
        self.running_lock = None;
        release_agent();
        Ok(())
    }
}
