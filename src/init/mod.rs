//! `task-executor init`: the first process of the agent's container.
//!
//! In a pod, the container's first process decides the fate of every task: when it exits,
//! the kernel kills its PID namespace (host mode, the agent's own namespace), or
//! containerd's runc shim kills every process in the container's cgroup (a PID namespace
//! shared across the pod, as sidecar mode has). With the agent itself in that place, its
//! panic, OOM kill or `kill -9` would end every running task. So the container runs this
//! small supervisor instead, and the agent as its child:
//!
//! - it starts the shim server, then the agent, handing the agent the server's socket as
//!   its stdin (see `runtime::launcher`);
//! - it restarts the agent when it dies: at once, then with capped exponential backoff
//!   while it keeps dying (one log line per restart); the new agent re-adopts the running
//!   tasks exactly as after a crash on a bare machine;
//! - it raises the agent's `oom_score_adj` (no privilege needed), so the OOM killer picks
//!   the agent, which loses nothing by a restart, before the init;
//! - it reaps every orphan: it is PID 1 of the container's namespace or, in a shared one,
//!   a child subreaper;
//! - SIGTERM or SIGINT (the container is stopping) is forwarded to the agent, which gets
//!   `--agent-stop-timeout` before a SIGKILL. Then, as the container and everything in it
//!   is about to go, each remaining supervisor is asked to stop its task (SIGTERM to the
//!   shim: SIGTERM to the task's tree, the grace period, SIGKILL, exit recorded), and the
//!   init exits with the agent's status once they are gone, after ending the cgroup of
//!   every task it saw a supervisor or orphan of (what runs outside its tree, what a
//!   supervisor killed at the deadline left). Other signals are forwarded to the agent
//!   as they are.
//!
//! Why the init, not the agent, owns the shim server: the shims then descend from the init,
//! not from the agent, so they keep the container's OOM score (only the agent's is
//! raised), an agent's death leaves the server and every shim untouched, and a restarted
//! agent starts with a server already there. The server is the same single-threaded fork
//! server the agent would otherwise start; if it dies, the running agent starts one of its
//! own (as it always could) and the next agent start gets a new one from the init.
//!
//! The init must not be the process that fails: it is single-threaded and synchronous (no
//! async runtime), allocates little, never touches the data dir, and all it does between
//! signals is fork/exec, wait and kill.

pub mod backoff;
pub mod procs;
mod start_child;

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use self::procs::Exit;
use crate::runtime::launcher::{SERVER_ON_STDIN_ENV, TASK_OOM_SCORE_ADJ_ENV};

/// How often the stop sequence looks for supervisors newly re-parented to the init.
const DRAIN_TICK: Duration = Duration::from_millis(250);

#[derive(Clone, Debug)]
pub struct Options {
    /// The binary started as the agent and as the shim server (this one).
    pub exe: PathBuf,
    /// The agent's command-line arguments.
    pub agent_args: Vec<OsString>,
    pub restart: backoff::Policy,
    /// How long a stopping agent may take before it is killed.
    pub agent_stop_timeout: Duration,
    /// How long the supervisors may take to stop their tasks before they are killed (the
    /// tasks' grace period and a margin).
    pub drain_timeout: Duration,
}

/// Runs the init until it is told to stop; returns the exit code for the container.
pub fn run(opts: Options) -> i32 {
    // What the init's caller left open is not the agent's (nor its tasks').
    if let Err(e) = crate::runtime::child_setup::cloexec_inherited() {
        tracing::warn!(error = %e, "cannot mark inherited descriptors close-on-exec");
    }
    match Init::new(opts) {
        Ok(mut init) => init.run(),
        Err(e) => {
            tracing::error!(error = %e, "task-executor init cannot start");
            1
        }
    }
}

struct Agent {
    pid: Pid,
    started: Instant,
}

struct Server {
    pid: Pid,
    /// The agents' end of the server's socket; each agent gets a copy as its stdin. Held
    /// here so the server outlives agents; dropping it makes the server exit.
    socket: OwnedFd,
}

enum Phase {
    /// The agent runs, or is due to start again at `next_start`.
    Supervising { next_start: Option<Instant> },
    /// A stop was requested; the agent has until `deadline`.
    StoppingAgent { deadline: Instant, killed: bool },
    /// The agent is gone; the supervisors left are stopping their tasks.
    Draining {
        deadline: Instant,
        signalled: Vec<i32>,
        killed: bool,
    },
}

struct Init {
    opts: Options,
    signals: SignalFd,
    agent: Option<Agent>,
    server: Option<Server>,
    backoff: backoff::Backoff,
    phase: Phase,
    /// The agent's last exit: the init's own exit code once it stops.
    last_exit: Exit,
    restarts: u64,
    /// Set when wait(2) reports that the init has no child left.
    childless: bool,
    /// While draining: the task cgroups its children (shims, orphans) were seen in.
    task_cgroups: Vec<PathBuf>,
}

impl Init {
    fn new(opts: Options) -> std::io::Result<Self> {
        // Orphans come to us when we are not PID 1 (a PID namespace shared by the pod).
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper; orphans go to the namespace's init");
        }
        // Every signal is taken from a signalfd: none can kill the init by its default
        // action (which PID 1 of a namespace is spared, but an init in a shared namespace
        // is not), and none interrupts it mid-step. Children start with an empty mask
        // (see `spawn`).
        let all = SigSet::all();
        all.thread_block()?;
        let signals = SignalFd::with_flags(&all, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        Ok(Init {
            backoff: backoff::Backoff::new(opts.restart),
            opts,
            signals,
            agent: None,
            server: None,
            phase: Phase::Supervising {
                next_start: Some(Instant::now()),
            },
            last_exit: Exit {
                code: 0,
                signal: None,
            },
            restarts: 0,
            childless: false,
            task_cgroups: Vec::new(),
        })
    }

    fn run(&mut self) -> i32 {
        loop {
            self.reap();
            self.step();
            if matches!(self.phase, Phase::Draining { .. }) && self.childless {
                // What of a task is outside the init's tree (inside a main container's
                // PID namespace) or was left by a supervisor killed at the deadline.
                self.end_task_cgroups();
                tracing::info!(exit_code = self.last_exit.code, "task-executor init exits");
                return self.last_exit.code;
            }
            let timeout = self.timeout();
            let mut fds = [PollFd::new(
                std::os::fd::AsFd::as_fd(&self.signals),
                PollFlags::POLLIN,
            )];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "poll failed");
                    std::thread::sleep(Duration::from_millis(100)); // no busy loop
                }
            }
            while let Ok(Some(info)) = self.signals.read_signal() {
                if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                    self.on_signal(sig);
                }
            }
        }
    }

    /// Acts on deadlines: the agent's (re)start, a stop timeout, the stop sequence.
    fn step(&mut self) {
        let now = Instant::now();
        match &mut self.phase {
            Phase::Supervising { next_start } => {
                if self.agent.is_none() && next_start.is_some_and(|t| now >= t) {
                    *next_start = None;
                    self.start_agent();
                }
            }
            Phase::StoppingAgent { deadline, killed } => {
                if let Some(a) = &self.agent
                    && !*killed
                    && now >= *deadline
                {
                    tracing::warn!(
                        agent_pid = a.pid.as_raw(),
                        timeout_ms = self.opts.agent_stop_timeout.as_millis() as u64,
                        "the agent did not stop in time; killing it"
                    );
                    let _ = kill(a.pid, Signal::SIGKILL);
                    *killed = true;
                }
            }
            Phase::Draining {
                deadline,
                signalled,
                killed,
            } => {
                // Supervisors re-parented to us since the last look get their stop request
                // too. A pid listed here is our unreaped child, so it can't be reused. A
                // task's cgroup is found from its orphans, or from its shim's children (a
                // shim may stay outside its task's cgroup, see `containment`).
                let children = crate::sys::procfs::own_children();
                let theirs = children
                    .iter()
                    .flat_map(|&c| crate::sys::procfs::children_of(c));
                for c in children.iter().copied().chain(theirs) {
                    for cg in crate::runtime::containment::task_cgroups_of(c) {
                        if !self.task_cgroups.contains(&cg) {
                            self.task_cgroups.push(cg);
                        }
                    }
                }
                if now >= *deadline {
                    if !*killed && !children.is_empty() {
                        tracing::warn!(
                            remaining = children.len(),
                            timeout_ms = self.opts.drain_timeout.as_millis() as u64,
                            "supervisors still running after the stop timeout; killing them"
                        );
                        *killed = true;
                    }
                    for &c in &children {
                        let _ = kill(Pid::from_raw(c), Signal::SIGKILL);
                    }
                    if !children.is_empty() {
                        self.end_task_cgroups();
                    }
                } else {
                    for c in children {
                        if !signalled.contains(&c) {
                            let _ = kill(Pid::from_raw(c), Signal::SIGTERM);
                            signalled.push(c);
                        }
                    }
                }
            }
        }
    }

    /// Ends every task cgroup seen while draining (everything in it, SIGKILL) and removes
    /// it: nothing of a task outlives the container's stop. Bounded: a second each.
    fn end_task_cgroups(&mut self) {
        for cg in std::mem::take(&mut self.task_cgroups) {
            match crate::runtime::containment::kill(&cg, Duration::from_secs(1)) {
                Ok(true) => tracing::debug!(cgroup = %cg.display(), "task cgroup ended"),
                Ok(false) => {
                    tracing::warn!(cgroup = %cg.display(), "task cgroup not empty after SIGKILL")
                }
                Err(e) => {
                    tracing::warn!(cgroup = %cg.display(), error = %e, "cannot end a task cgroup")
                }
            }
        }
    }

    /// Until the next deadline, or indefinitely while only signals can change anything.
    fn timeout(&self) -> PollTimeout {
        let now = Instant::now();
        let until = match &self.phase {
            Phase::Supervising { next_start } => next_start.filter(|_| self.agent.is_none()),
            Phase::StoppingAgent { deadline, killed } => (!killed).then_some(*deadline),
            Phase::Draining { deadline, .. } => Some((*deadline).max(now).min(now + DRAIN_TICK)),
        };
        match until {
            None => PollTimeout::NONE,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_millis().min(60_000) as u16;
                PollTimeout::from(ms)
            }
        }
    }

    fn on_signal(&mut self, sig: Signal) {
        match sig {
            Signal::SIGCHLD => {} // reaped at the top of the loop
            Signal::SIGTERM | Signal::SIGINT => self.stop(sig),
            // Job control is not for the init (it would stop supervising).
            Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU => {}
            other => {
                if let Some(a) = &self.agent {
                    tracing::debug!(signal = other.as_str(), "forwarding a signal to the agent");
                    let _ = kill(a.pid, other);
                }
            }
        }
    }

    fn stop(&mut self, sig: Signal) {
        match self.phase {
            Phase::Supervising { .. } => {
                tracing::info!(
                    signal = sig.as_str(),
                    "stop requested: stopping the agent, then the tasks' supervisors"
                );
                match &self.agent {
                    Some(a) => {
                        let _ = kill(a.pid, sig);
                        self.phase = Phase::StoppingAgent {
                            deadline: after(self.opts.agent_stop_timeout),
                            killed: false,
                        };
                    }
                    None => self.drain(),
                }
            }
            Phase::StoppingAgent { .. } => {
                if let Some(a) = &self.agent {
                    let _ = kill(a.pid, sig);
                }
            }
            Phase::Draining { .. } => {}
        }
    }

    /// The agent is gone and won't be restarted: let the shim server go (it exits when its
    /// socket closes) and ask every supervisor to stop its task.
    fn drain(&mut self) {
        self.server = None;
        self.phase = Phase::Draining {
            deadline: after(self.opts.drain_timeout),
            signalled: Vec::new(),
            killed: false,
        };
        self.childless = false; // re-checked by the next reap
    }

    /// Reaps each exited child by its pid, not with `waitpid(-1)`: a zombie orphan that
    /// leads a process group with live members (a task's main process whose shim died,
    /// re-parented here) is kept until they are gone, so the agent can still prove the
    /// group is the task's and stop it (see `runtime::reaper`). The agent and the shim
    /// server are reaped at once whatever their groups hold.
    fn reap(&mut self) {
        use crate::runtime::reaper;
        use crate::sys::procfs;
        let zombies: Vec<i32> = procfs::own_children()
            .into_iter()
            .filter(|&p| procfs::stat(p).is_some_and(|s| s.state == 'Z'))
            .collect();
        let led = match zombies.is_empty() {
            true => Default::default(),
            false => reaper::groups_with_live_members(),
        };
        for pid in zombies {
            let ours = [
                self.agent.as_ref().map(|a| a.pid),
                self.server.as_ref().map(|s| s.pid),
            ]
            .contains(&Some(Pid::from_raw(pid)));
            if led.contains(&pid) && !ours {
                continue;
            }
            loop {
                match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    Err(Errno::EINTR) => continue,
                    Ok(ws) => {
                        if let Some((pid, exit)) = Exit::of(ws) {
                            self.exited(pid, exit);
                        }
                    }
                    Err(e) => tracing::warn!(pid, error = %e, "waitpid failed"),
                }
                break;
            }
        }
        self.childless = procfs::own_children().is_empty();
    }

    fn exited(&mut self, pid: Pid, exit: Exit) {
        if let Phase::Draining { signalled, .. } = &mut self.phase {
            signalled.retain(|p| *p != pid.as_raw());
        }
        if self.agent.as_ref().is_some_and(|a| a.pid == pid) {
            let agent = self.agent.take().expect("checked above");
            self.agent_exited(agent, exit);
        } else if self.server.as_ref().is_some_and(|s| s.pid == pid) {
            self.server = None;
            tracing::warn!(
                server_pid = pid.as_raw(),
                status = %exit,
                "the shim server exited; the agent starts one of its own, and its next start \
                 gets a new one"
            );
        } else {
            tracing::debug!(pid = pid.as_raw(), status = %exit, "reaped");
        }
    }

    fn agent_exited(&mut self, agent: Agent, exit: Exit) {
        self.last_exit = exit;
        match &mut self.phase {
            Phase::Supervising { next_start } => {
                let ran = agent.started.elapsed();
                let delay = self.backoff.next_delay(ran);
                self.restarts += 1;
                *next_start = Some(after(delay));
                tracing::warn!(
                    agent_pid = agent.pid.as_raw(),
                    status = %exit,
                    exit_code = exit.code,
                    ran_ms = ran.as_millis() as u64,
                    restart_in_ms = delay.as_millis() as u64,
                    restarts = self.restarts,
                    "the agent exited; restarting it"
                );
            }
            Phase::StoppingAgent { .. } => {
                tracing::info!(
                    agent_pid = agent.pid.as_raw(),
                    status = %exit,
                    exit_code = exit.code,
                    "the agent stopped; stopping the tasks' supervisors"
                );
                self.drain();
            }
            Phase::Draining { .. } => {}
        }
    }

    fn start_agent(&mut self) {
        if self.server.is_none() {
            match self.start_server() {
                Ok(s) => self.server = Some(s),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot start the shim server; the agent starts one of its own"
                ),
            }
        }
        // The container's oom_score_adj, for a shim server the agent starts itself.
        let own_oom = std::fs::read_to_string("/proc/self/oom_score_adj")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let oom_env = (TASK_OOM_SCORE_ADJ_ENV, own_oom.as_str());
        let spawned = match &self.server {
            Some(s) => start_child::start_child(
                &self.opts.exe,
                &self.opts.agent_args,
                &[(SERVER_ON_STDIN_ENV, "stdin"), oom_env],
                start_child::Stdin::Fd(&s.socket),
                false,
            ),
            None => start_child::start_child(
                &self.opts.exe,
                &self.opts.agent_args,
                &[oom_env],
                start_child::Stdin::Null,
                false,
            ),
        };
        match spawned {
            Ok(pid) => {
                let oom = procs::raise_oom_score(pid.as_raw());
                if let Err(e) = &oom {
                    tracing::warn!(error = %e, "cannot raise the agent's oom_score_adj");
                }
                tracing::info!(
                    agent_pid = pid.as_raw(),
                    server_pid = self.server.as_ref().map_or(0, |s| s.pid.as_raw()),
                    oom_score_adj = oom.unwrap_or_default(),
                    restarts = self.restarts,
                    "agent started"
                );
                self.agent = Some(Agent {
                    pid,
                    started: Instant::now(),
                });
            }
            Err(e) => {
                let delay = self.backoff.next_delay(Duration::ZERO);
                self.restarts += 1;
                tracing::error!(
                    error = %e,
                    exe = %self.opts.exe.display(),
                    restart_in_ms = delay.as_millis() as u64,
                    "cannot start the agent; trying again"
                );
                self.phase = Phase::Supervising {
                    next_start: Some(after(delay)),
                };
            }
        }
    }

    fn start_server(&self) -> std::io::Result<Server> {
        let (ours, theirs) = crate::sys::socket::seqpacket_pair()?;
        let pid = start_child::start_child(
            &self.opts.exe,
            &["shim-server".into()],
            &[],
            start_child::Stdin::Fd(&theirs),
            true,
        )?;
        Ok(Server { pid, socket: ours })
    }
}

/// `d` from now; a duration too large to add (a flag set to centuries) is a year.
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}
