//! Where the shim starts a task's commands, and how it signals their process groups.
//!
//! The same `ExecPlan` starts one of two ways: on the host, as a child of the shim
//! (`child_setup::fork_exec`), or inside the main container, as a child of the task's reaper
//! there (which starts it with the same call). Commands are numbered (`MAIN` is the
//! task's own, `PRE_START` and `POST_STOP` its hooks); each starts in its own place.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::ns_reaper::Reaper;
use crate::runtime::child_setup::{self, Announce, ExecPlan, SpawnError, Step};
use crate::runtime::journal;
use crate::sys::procfs::ProcIdentity;
use crate::task::model::HookName;

/// The task's own command.
pub const MAIN: usize = 0;
/// Its lifecycle hooks.
pub const PRE_START: usize = 1;
pub const POST_STOP: usize = 2;

/// The job number of a hook.
pub fn hook_job(h: HookName) -> usize {
    match h {
        HookName::PreStart => PRE_START,
        HookName::PostStop => POST_STOP,
    }
}

/// The hook a job number is (`None`: the main command).
pub fn job_hook(job: usize) -> Option<HookName> {
    match job {
        PRE_START => Some(HookName::PreStart),
        POST_STOP => Some(HookName::PostStop),
        _ => None,
    }
}

/// How one command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobExit {
    pub job: usize,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Where each of a task's commands starts: on the host (a child of the shim) or inside
/// the main container (a child of the reaper there). A task's hooks may run elsewhere
/// than its main command (`execMode` per hook), so one task may use both.
pub struct Place {
    /// Plans of the commands the shim starts itself, by job number.
    host: Vec<Option<ExecPlan>>,
    /// Host commands not reaped yet (pid → job): only their groups may be signalled.
    live: Vec<(i32, usize)>,
    /// The reaper inside the main container, for the commands that run there.
    reaper: Option<Reaper>,
    in_container: Vec<bool>,
    /// The task's cgroup (cgroup v2) host commands are born into, while the shim stays
    /// outside it; `None` once the shim entered it itself (or the task has none there).
    into: Option<IntoCgroup>,
}

/// A cgroup v2 directory host commands are created in (`child_setup::fork_exec_into`).
pub struct IntoCgroup {
    pub dir: std::path::PathBuf,
    /// Opened `O_PATH`.
    pub fd: std::os::fd::OwnedFd,
}

impl IntoCgroup {
    pub fn open(dir: &std::path::Path) -> io::Result<IntoCgroup> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_PATH | nix::libc::O_DIRECTORY)
            .open(dir)?;
        Ok(IntoCgroup {
            dir: dir.to_path_buf(),
            fd: f.into(),
        })
    }
}

impl Place {
    /// `host`: plans by job number (`None`: not a host command); `reaper`: the reaper
    /// that holds the plans of the others.
    pub fn new(
        host: Vec<Option<ExecPlan>>,
        reaper: Option<Reaper>,
        in_container: Vec<bool>,
    ) -> Place {
        Place {
            host,
            live: Vec::new(),
            reaper,
            in_container,
            into: None,
        }
    }

    /// Host commands are born in this cgroup (the shim is not in it).
    pub fn born_into(mut self, cgroup: Option<IntoCgroup>) -> Place {
        self.into = cgroup;
        self
    }

    fn runs_in_container(&self, job: usize) -> bool {
        self.in_container.get(job).copied().unwrap_or(false)
    }

    /// Starts command `job` with stdin from /dev/null and the given stdout and stderr;
    /// returns its identity (pid as the shim sees it, start time). A host command names
    /// itself in `journal` before it execs (`child_setup::Announce`); one inside the main
    /// container is the reaper's, which kills it if the shim dies.
    pub fn start(
        &mut self,
        job: usize,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
        journal: Option<BorrowedFd<'_>>,
    ) -> Result<ProcIdentity, SpawnError> {
        let setup = |error| SpawnError {
            step: Step::Setup,
            error,
        };
        if self.runs_in_container(job) {
            return match self.reaper.as_mut() {
                Some(reaper) => reaper.start_job(job, stdout, stderr),
                None => Err(setup(io::Error::from(io::ErrorKind::InvalidInput))),
            };
        }
        let plan = self
            .host
            .get(job)
            .and_then(Option::as_ref)
            .ok_or_else(|| setup(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let null = File::open("/dev/null").map_err(setup)?;
        let head = journal::spawned_head(job_hook(job));
        let announce = || {
            journal.map(|journal| Announce {
                journal,
                head: &head,
                tail: journal::SPAWNED_TAIL,
            })
        };
        let stdio = [null.as_fd(), stdout, stderr];
        let born_into = self
            .into
            .as_ref()
            .map(|cg| child_setup::fork_exec_into(plan, stdio, announce(), cg.fd.as_fd()));
        let pid = match born_into {
            None => child_setup::fork_exec(plan, stdio, announce())?,
            Some(Ok(pid)) => pid,
            Some(Err(e)) if child_setup::into_cgroup_unsupported(&e) => {
                // Nothing was started: the shim enters the cgroup itself, and every
                // command it starts from now on is born inside (see `containment`).
                let cg = self.into.take().expect("matched above");
                crate::runtime::containment::enter_late(&cg.dir).map_err(setup)?;
                tracing::debug!(cgroup = %cg.dir.display(), error = %e.error, "cannot create into the task's cgroup; the supervisor entered it");
                child_setup::fork_exec(plan, stdio, announce())?
            }
            Some(Err(e)) => return Err(e),
        };
        self.live.push((pid, job));
        // Our unreaped child: the pid is still its own.
        Ok(ProcIdentity::of(pid).unwrap_or(ProcIdentity::without_inode(pid, 0)))
    }

    /// Signals the process group of every command not reaped yet (`job`: of that command
    /// only), on the host and through the reaper inside the main container. A reaped
    /// command's group id may be someone else's by now, so it is left alone (its
    /// processes are reached as descendants). Returns the groups it signalled, as this
    /// /proc shows them (for SIGKILL, the host's only).
    pub fn signal_groups(&mut self, job: Option<usize>, sig: Signal) -> Vec<i32> {
        let mut signalled = Vec::new();
        for (pid, j) in &self.live {
            if job.is_none_or(|want| want == *j) && killpg(Pid::from_raw(*pid), sig).is_ok() {
                signalled.push(*pid);
            }
        }
        let in_container = job.is_none_or(|j| self.runs_in_container(j));
        if let Some(reaper) = self.reaper.as_mut().filter(|_| in_container) {
            signalled.extend(reaper.signal_groups(job, sig));
        }
        signalled
    }

    /// A child of the shim was reaped: the command's exit, if it was a host command.
    pub fn reaped(&mut self, pid: i32, code: Option<i32>, signal: Option<i32>) -> Option<JobExit> {
        let i = self.live.iter().position(|(p, _)| *p == pid)?;
        let (_, job) = self.live.swap_remove(i);
        Some(JobExit { job, code, signal })
    }

    /// Exits reported by the reaper (host commands' come from `reaped`).
    pub fn reported_exits(&mut self) -> Vec<JobExit> {
        match &mut self.reaper {
            None => Vec::new(),
            Some(reaper) => reaper.exits(),
        }
    }

    /// The reaper's exit reports already read (while the shim waited for another answer of
    /// its): its socket may not wake the loop for them.
    pub fn exits_read(&self) -> bool {
        self.reaper.as_ref().is_some_and(Reaper::exits_read)
    }

    /// A process of the shim's tree that must not be signalled with the task's: the reaper.
    pub fn reaper_pid(&self) -> Option<i32> {
        self.reaper.as_ref().map(|r| r.pid)
    }

    /// The descriptor to poll for reports (the reaper's socket).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.reaper.as_ref().map(|r| r.fd())
    }

    /// Whether `job` runs inside the main container and its reaper is gone (the container
    /// with it, or the reaper died): such a command's exit will never be reported.
    pub fn job_lost(&self, job: usize, reaper_gone: bool) -> bool {
        self.runs_in_container(job) && reaper_gone
    }

    /// No more commands will be started after `job`: the reaper may leave once its
    /// children are gone.
    pub fn release_after(&self, job: usize) {
        let later_there = self
            .in_container
            .iter()
            .enumerate()
            .any(|(j, inside)| *inside && job_order(j) > job_order(job));
        if !later_there && let Some(reaper) = &self.reaper {
            reaper.release();
        }
    }

    /// No more commands at all.
    pub fn release(&self) {
        if let Some(reaper) = &self.reaper {
            reaper.release();
        }
    }
}

/// The order commands run in: preStart, main, postStop.
fn job_order(job: usize) -> u8 {
    match job {
        PRE_START => 0,
        MAIN => 1,
        _ => 2,
    }
}
