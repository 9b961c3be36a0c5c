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

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::cgroup;
use super::kill;
use super::place::JobExit;
use crate::runtime::child_setup::{self, ExecPlan, ForkServer, SpawnError, Step};
use crate::sys::procfs::{self, ProcIdentity};

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
}

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
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
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
    /// (`job`: of that command only).
    pub fn signal_groups(&self, job: Option<usize>, sig: Signal) {
        let _ = send(
            self.sock.as_fd(),
            &ToReaper::Signal {
                sig: sig as i32,
                job,
            },
            &[],
        );
    }

    /// No more commands: the reaper leaves once its last child is gone.
    pub fn release(&self) {
        let _ = send(self.sock.as_fd(), &ToReaper::Release, &[]);
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

/// Everything the reaper owns when it is forked: the only descriptors it keeps.
pub struct Boot {
    sock: OwnedFd,
    entry: Entry,
    jobs: Vec<Option<ExecPlan>>,
}

impl Boot {
    /// Every descriptor this value owns (see `child_setup::OwnsFds`).
    pub fn owned_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![
            self.sock.as_raw_fd(),
            self.entry.proc.as_raw_fd(),
            self.entry.pid_ns.as_raw_fd(),
        ];
        fds.extend(self.entry.namespaces.iter().map(|(fd, _)| fd.as_raw_fd()));
        fds.extend(self.entry.cgroup.iter().map(|c| c.fd().as_raw_fd()));
        fds.extend(self.jobs.iter().flatten().flat_map(ExecPlan::fds));
        fds
    }
}

/// The reaper process (forked by the shim, in the container's PID namespace), holding
/// nothing of the shim's: above all not its locks, nor the agent's notify pipe, whose
/// release tells the agent the shim is done.
fn serve(_: &ForkServer, boot: Boot) -> i32 {
    let Boot { sock, entry, jobs } = boot;
    if let Ok(null) = File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(null.as_fd());
        let _ = nix::unistd::dup2_stdout(null.as_fd());
    }
    if let Err(e) = enter(&entry) {
        let message = format!("entering the main container: {e}");
        let _ = send(sock.as_fd(), &FromReaper::SetupFailed { message }, &[]);
        return 1;
    }
    let proc = entry.proc;
    drop(entry.namespaces);
    match Served::new(sock, proc, jobs) {
        Ok(mut s) => {
            let _ = send(s.sock.as_fd(), &FromReaper::Ready, &[]);
            s.run()
        }
        Err(e) => {
            eprintln!("task-executor reaper: {e}");
            1
        }
    }
}

fn enter(entry: &Entry) -> io::Result<()> {
    // The reaper holds the agent's /proc: processes of the container (which see it in
    // their PID namespace) must not reach its descriptors or memory through ptrace or
    // /proc/PID/fd; only a ptracer with CAP_SYS_PTRACE on the host could.
    nix::sys::prctl::set_dumpable(false)?;
    nix::sys::prctl::set_child_subreaper(true)?;
    if let Some(c) = &entry.cgroup {
        c.join(entry.proc.as_fd())?;
    }
    for (fd, flag) in &entry.namespaces {
        setns(fd.as_fd(), *flag)?;
    }
    Ok(())
}

struct Served {
    sock: OwnedFd,
    proc: OwnedFd,
    jobs: Vec<Option<ExecPlan>>,
    /// The container's /dev/null, the commands' stdin.
    null: File,
    sigchld: SignalFd,
    /// Commands not reaped yet (pid in the reaper's namespace → job).
    live: HashMap<i32, usize>,
    released: bool,
    /// The shim is gone: everything of the task is being killed.
    orphaned: bool,
}

impl Served {
    fn new(sock: OwnedFd, proc: OwnedFd, jobs: Vec<Option<ExecPlan>>) -> io::Result<Served> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        // The shim's mask (SIGCHLD, SIGTERM, ...) is inherited: those stay blocked, so
        // the container's processes can't stop the reaper with a SIGTERM.
        mask.thread_block()?;
        Ok(Served {
            sock,
            proc,
            jobs,
            null: File::open("/dev/null")?,
            sigchld: SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?,
            live: HashMap::new(),
            released: false,
            orphaned: false,
        })
    }

    fn run(&mut self) -> i32 {
        loop {
            if self.reap() && (self.released || self.orphaned) {
                return 0;
            }
            if self.orphaned {
                self.kill_all();
            }
            let mut fds = vec![PollFd::new(self.sigchld.as_fd(), PollFlags::POLLIN)];
            if !self.orphaned {
                fds.push(PollFd::new(self.sock.as_fd(), PollFlags::POLLIN));
            }
            // While orphaned, kill again every 100 ms until nothing is left.
            let timeout = if self.orphaned {
                PollTimeout::from(100u16)
            } else {
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => return 1,
            }
            let shim_ready = fds.get(1).is_some_and(|f| f.any().unwrap_or(false));
            drop(fds);
            while let Ok(Some(_)) = self.sigchld.read_signal() {}
            if shim_ready {
                self.on_message();
            }
        }
    }

    /// Reaps every exited child, reporting commands' exits; true when none is left.
    fn reap(&mut self) -> bool {
        loop {
            let (pid, code, signal) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Some(code), None),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, None, Some(sig as i32)),
                Ok(WaitStatus::StillAlive) => return false,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => return true, // ECHILD
            };
            if let Some(job) = self.live.remove(&pid.as_raw()) {
                let msg = FromReaper::Exited { job, code, signal };
                let _ = send(self.sock.as_fd(), &msg, &[]);
            }
        }
    }

    fn on_message(&mut self) {
        let mut buf = [0u8; 4096];
        let (n, fds) = child_setup::recv_with_fds(self.sock.as_fd(), &mut buf).unwrap_or_default();
        if n == 0 {
            self.orphaned = true; // the shim died
            return;
        }
        match serde_json::from_slice::<ToReaper>(&buf[..n]) {
            Ok(ToReaper::Start { job }) => self.start(job, &fds),
            Ok(ToReaper::Signal { sig, job }) => {
                if let Ok(sig) = Signal::try_from(sig) {
                    // Unreaped children of ours: their pids, so their groups, are theirs.
                    for (pid, j) in &self.live {
                        if job.is_none_or(|want| want == *j) {
                            let _ = killpg(Pid::from_raw(*pid), sig);
                        }
                    }
                }
            }
            Ok(ToReaper::Release) => self.released = true,
            Err(e) => eprintln!("task-executor reaper: bad message: {e}"),
        }
    }

    fn start(&mut self, job: usize, fds: &[OwnedFd]) {
        let reply = match (self.jobs.get(job).and_then(Option::as_ref), fds) {
            (Some(plan), [out, err]) => {
                match child_setup::fork_exec(
                    plan,
                    [self.null.as_fd(), out.as_fd(), err.as_fd()],
                    None,
                ) {
                    Ok(pid) => {
                        self.live.insert(pid, job);
                        match self.identity(pid) {
                            Ok(process) => FromReaper::Started { job, process },
                            Err(e) => FromReaper::StartFailed {
                                job,
                                step: 2,
                                errno: e.raw_os_error().unwrap_or(libc::EIO),
                            },
                        }
                    }
                    Err(e) => FromReaper::StartFailed {
                        job,
                        step: match e.step {
                            Step::WorkingDir => 1,
                            Step::Exec => 3,
                            Step::Identity => 4,
                            _ => 2,
                        },
                        errno: e.error.raw_os_error().unwrap_or(libc::EIO),
                    },
                }
            }
            _ => FromReaper::StartFailed {
                job,
                step: 2,
                errno: libc::EINVAL,
            },
        };
        let _ = send(self.sock.as_fd(), &reply, &[]);
    }

    /// A child's identity as the shim's /proc shows it: a pidfd (opened with this
    /// namespace's pid) reports its pid in that /proc's namespace. The child is not
    /// reaped yet (only `reap` does), so the pid is still its own.
    fn identity(&self, pid: i32) -> io::Result<ProcIdentity> {
        let pid = rustix::process::Pid::from_raw(pid).ok_or(io::ErrorKind::InvalidInput)?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
        let outer = crate::sys::proc_handle::pidfd_pid_at(self.proc.as_fd(), fd.as_fd())
            .ok_or(io::ErrorKind::NotFound)?;
        let stat = procfs::stat_at(self.proc.as_fd(), outer).ok_or(io::ErrorKind::NotFound)?;
        Ok(ProcIdentity {
            pid: outer,
            start_time: stat.start_time,
            pidfd_ino: procfs::pidfs_inode(fd.as_fd()),
        })
    }

    /// The shim is gone: kill every process of the task (commands' groups while they
    /// are unreaped, and every descendant).
    fn kill_all(&self) {
        for pid in self.live.keys() {
            let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if let Some(me) = self_pid(self.proc.as_fd()) {
            kill::signal_descendants(self.proc.as_fd(), me, None, Signal::SIGKILL, &[]);
        }
    }
}

/// This process's pid in the namespace of the /proc at `proc`.
fn self_pid(proc: BorrowedFd<'_>) -> Option<i32> {
    let link = rustix::fs::readlinkat(proc, "self", Vec::new()).ok()?;
    link.to_str().ok()?.parse().ok()
}
