//! The reaper process itself: forked by the shim into the main container's PID
//! namespace, it enters the container, starts the commands the shim asks for, reaps
//! them and everything the task leaves, and reports their exits.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::setns;
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::{Entry, FromReaper, ToReaper, send};
use crate::runtime::child_setup::{self, ExecPlan, ForkServer, Step};
use crate::runtime::shim::kill;
use crate::sys::procfs::{self, ProcIdentity};

/// Everything the reaper owns when it is forked: the only descriptors it keeps.
pub struct Boot {
    pub(super) sock: OwnedFd,
    pub(super) entry: Entry,
    pub(super) jobs: Vec<Option<ExecPlan>>,
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
pub(super) fn serve(_: &ForkServer, boot: Boot) -> i32 {
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
    /// Commands not reaped yet: pid in the reaper's namespace → job, and the pid the
    /// shim's /proc shows (0: not known).
    live: HashMap<i32, (usize, i32)>,
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
            if let Some((job, _)) = self.live.remove(&pid.as_raw()) {
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
                let Ok(sig) = Signal::try_from(sig) else {
                    return;
                };
                let mut groups = Vec::new();
                // Unreaped children of ours: their pids, so their groups, are theirs.
                for (pid, (j, outer)) in &self.live {
                    if job.is_none_or(|want| want == *j)
                        && killpg(Pid::from_raw(*pid), sig).is_ok()
                        && *outer > 0
                    {
                        groups.push(*outer);
                    }
                }
                if sig != Signal::SIGKILL {
                    let _ = send(self.sock.as_fd(), &FromReaper::Signalled { groups }, &[]);
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
                        let identity = self.identity(pid);
                        // Reaped and reported whatever its identity.
                        let outer = identity.as_ref().map_or(0, |p| p.pid);
                        self.live.insert(pid, (job, outer));
                        match identity {
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
