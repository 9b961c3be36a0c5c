//! A sidecar task's reaper: the task's first process inside the main container.
//!
//! A child subreaper only adopts orphans of its own PID namespace: an orphan inside the
//! main container's namespace would go to the container's init, out of the shim's reach.
//! So the shim forks this reaper into that namespace (the binary is not in the
//! container's file system, so it is a fork, not an exec). It joins the container's
//! cgroups (with `--sidecar-join-cgroup`) and namespaces, becomes a child subreaper there
//! and starts the task's commands the shim asks for; every process of the task then
//! stays its descendant, and so the shim's (which signals them through handles, see
//! `kill`). It reports each command's exit exactly as the kernel gave it, signals a
//! command's process group only while it has not reaped the command (so the group id is
//! still that command's), and leaves once released with no children left. If the shim
//! dies, it kills every process of the task and leaves.
//!
//! Protocol: JSON messages on a SOCK_SEQPACKET socket pair; `Start` carries the command's
//! stdout and stderr.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::Signal;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::{Deserialize, Serialize};

use super::cgroup;
use super::place::JobExit;
use crate::runtime::child_setup::{self, ExecPlan, ForkServer, SpawnError, Step};
use crate::sys::procfs::ProcIdentity;

mod served;

pub use served::Boot;
use served::serve;

/// What the reaper needs to enter the main container, opened by the shim.
pub struct Entry {
    /// Joined in this order (mount last).
    pub namespaces: Vec<(OwnedFd, CloneFlags)>,
    /// The container's PID namespace: the shim forks the reaper into it.
    pub pid_ns: OwnedFd,
    pub cgroup: Option<cgroup::Join>,
    /// The shim's /proc, whose pids are the shim's (and the agent's).
    pub proc: OwnedFd,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum ToReaper {
    Start {
        job: usize,
    },
    /// Signal the groups of unreaped commands (`job`: of that one only).
    Signal {
        sig: i32,
        #[serde(default)]
        job: Option<usize>,
    },
    Release,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum FromReaper {
    Ready,
    SetupFailed {
        message: String,
    },
    /// `process` is the command's identity as the shim's /proc shows it.
    Started {
        job: usize,
        process: ProcIdentity,
    },
    StartFailed {
        job: usize,
        step: u8,
        errno: i32,
    },
    Exited {
        job: usize,
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The groups a `Signal` (other than SIGKILL) reached: their commands' pids as the
    /// shim's /proc shows them.
    Signalled {
        groups: Vec<i32>,
    },
}

/// How long a stop waits for the reaper to say which groups it signalled. A reaper that
/// doesn't answer (stopped by a process of the container) costs the stop this once, and
/// its groups' members are signalled by the shim's walk too.
const SIGNALLED_WAIT: Duration = Duration::from_millis(500);

/// The shim's side of a reaper.
pub struct Reaper {
    sock: OwnedFd,
    pub pid: i32,
    exits: VecDeque<JobExit>,
    gone: bool,
}

impl Reaper {
    /// Forks the reaper into the container's PID namespace and waits until it has entered
    /// the container (or says why it could not). `jobs` are the commands it may start.
    pub fn start(
        forker: &ForkServer,
        entry: Entry,
        jobs: Vec<Option<ExecPlan>>,
    ) -> io::Result<Reaper> {
        let (ours, theirs) = crate::sys::socket::seqpacket_pair()?;
        // Only children are born in a PID namespace joined with setns; the shim goes back
        // to its own right after, so commands it starts itself stay on the host.
        let own = File::open("/proc/self/ns/pid")?;
        setns(entry.pid_ns.as_fd(), CloneFlags::CLONE_NEWPID)?;
        let boot = Boot {
            sock: theirs,
            entry,
            jobs,
        };
        let forked = forker.fork_with(boot, serve);
        setns(own.as_fd(), CloneFlags::CLONE_NEWPID)?;
        let mut reaper = Reaper {
            sock: ours,
            pid: forked?,
            exits: VecDeque::new(),
            gone: false,
        };
        match reaper.recv(true)? {
            Some((FromReaper::Ready, _)) => Ok(reaper),
            Some((FromReaper::SetupFailed { message }, _)) => Err(io::Error::other(message)),
            other => Err(io::Error::other(format!(
                "the task's reaper failed to start: {other:?}"
            ))),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Starts command `job` with the given stdout and stderr (stdin is /dev/null).
    pub fn start_job(
        &mut self,
        job: usize,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> Result<ProcIdentity, SpawnError> {
        let setup = |e: io::Error| SpawnError {
            step: Step::Setup,
            error: e,
        };
        send(
            self.sock.as_fd(),
            &ToReaper::Start { job },
            &[stdout.as_raw_fd(), stderr.as_raw_fd()],
        )
        .map_err(setup)?;
        loop {
            match self.recv(true).map_err(setup)? {
                Some((FromReaper::Started { job: j, process }, _)) if j == job => {
                    return Ok(process);
                }
                Some((
                    FromReaper::StartFailed {
                        job: j,
                        step,
                        errno,
                    },
                    _,
                )) if j == job => {
                    return Err(SpawnError {
                        step: match step {
                            1 => Step::WorkingDir,
                            3 => Step::Exec,
                            4 => Step::Identity,
                            _ => Step::Setup,
                        },
                        error: io::Error::from_raw_os_error(errno),
                    });
                }
                Some((FromReaper::Exited { job, code, signal }, _)) => {
                    self.exits.push_back(JobExit { job, code, signal })
                }
                Some(_) => {}
                None => {
                    return Err(setup(io::Error::other(
                        "the task's reaper inside the main container died",
                    )));
                }
            }
        }
    }

    /// Asks the reaper to signal the process group of each command it has not reaped
    /// (`job`: of that command only). Returns those groups as the shim's /proc shows them,
    /// so the shim's own walk does not signal their members a second time (a handler would
    /// run twice); for SIGKILL, which can't be handled twice, it doesn't wait to know.
    pub fn signal_groups(&mut self, job: Option<usize>, sig: Signal) -> Vec<i32> {
        let msg = ToReaper::Signal {
            sig: sig as i32,
            job,
        };
        if send(self.sock.as_fd(), &msg, &[]).is_err() || sig == Signal::SIGKILL {
            return Vec::new();
        }
        let until = Instant::now() + SIGNALLED_WAIT;
        loop {
            match self.recv_until(until) {
                Ok(Some((FromReaper::Signalled { groups }, _))) => return groups,
                Ok(Some((FromReaper::Exited { job, code, signal }, _))) => {
                    self.exits.push_back(JobExit { job, code, signal })
                }
                Ok(Some(_)) => {}
                // Gone, or no answer in time: none is spared.
                Ok(None) | Err(_) => return Vec::new(),
            }
        }
    }

    /// No more commands: the reaper leaves once its last child is gone.
    pub fn release(&self) {
        let _ = send(self.sock.as_fd(), &ToReaper::Release, &[]);
    }

    /// Whether exits were read and are waiting for `exits`.
    pub fn exits_read(&self) -> bool {
        !self.exits.is_empty()
    }

    /// Exits the reaper reported so far (reads what is waiting, without blocking).
    pub fn exits(&mut self) -> Vec<JobExit> {
        while !self.gone {
            match self.recv(false) {
                Ok(Some((FromReaper::Exited { job, code, signal }, _))) => {
                    self.exits.push_back(JobExit { job, code, signal })
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.exits.drain(..).collect()
    }

    /// One message, waiting until `until` at most; `None` when none came in time or the
    /// reaper is gone.
    fn recv_until(&mut self, until: Instant) -> io::Result<Option<(FromReaper, Vec<OwnedFd>)>> {
        loop {
            if self.gone {
                return Ok(None);
            }
            let left = until.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
            let mut fd = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fd, PollTimeout::from(ms)) {
                Ok(n) if n > 0 => return self.recv(true),
                Err(Errno::EINTR) => {}
                Ok(_) | Err(_) if left.is_zero() => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One message; `None` when none is waiting (`block` false) or the reaper is gone.
    fn recv(&mut self, block: bool) -> io::Result<Option<(FromReaper, Vec<OwnedFd>)>> {
        if self.gone {
            return Ok(None);
        }
        if !block {
            let mut fd = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            if !matches!(poll(&mut fd, PollTimeout::ZERO), Ok(n) if n > 0) {
                return Ok(None);
            }
        }
        let mut buf = [0u8; 4096];
        let (n, fds) = child_setup::recv_with_fds(self.sock.as_fd(), &mut buf)?;
        if n == 0 {
            self.gone = true;
            return Ok(None);
        }
        let msg = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
        Ok(Some((msg, fds)))
    }
}

fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[RawFd]) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[io::IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            other => return other.map(drop).map_err(io::Error::from),
        }
    }
}
