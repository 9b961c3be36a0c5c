//! Where the shim starts a task's commands, and how it signals their process groups.
//!
//! The same `ExecPlan` starts one of two ways: on the host, as a child of the shim
//! (`child_setup::spawn`), or inside the main container, as a child of the task's reaper
//! there (which starts it with the same call). Commands are numbered (`MAIN` is the
//! task's own); more commands of a task start the same way.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::ns_reaper::Reaper;
use crate::runtime::child_setup::{self, ExecPlan, SpawnError, Step};
use crate::runtime::procfs::ProcIdentity;

/// The task's own command.
pub const MAIN: usize = 0;

/// How one command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobExit {
    pub job: usize,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

pub enum Place {
    /// Commands are the shim's children.
    Host {
        jobs: Vec<ExecPlan>,
        /// Commands not reaped yet (pid → job): only their groups may be signalled.
        live: Vec<(i32, usize)>,
    },
    /// Commands are children of the reaper inside the main container.
    Container(Reaper),
}

impl Place {
    pub fn host(jobs: Vec<ExecPlan>) -> Place {
        Place::Host {
            jobs,
            live: Vec::new(),
        }
    }

    /// Starts command `job` with stdin from /dev/null and the given stdout and stderr;
    /// returns its identity (pid as the shim sees it, start time).
    pub fn start(
        &mut self,
        job: usize,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> Result<ProcIdentity, SpawnError> {
        match self {
            Place::Host { jobs, live } => {
                let setup = |error| SpawnError {
                    step: Step::Setup,
                    error,
                };
                let plan = jobs
                    .get(job)
                    .ok_or_else(|| setup(io::Error::from(io::ErrorKind::InvalidInput)))?;
                let null = File::open("/dev/null").map_err(setup)?;
                let pid = child_setup::spawn(plan, [null.as_fd(), stdout, stderr])?;
                live.push((pid, job));
                // Our unreaped child: the pid is still its own.
                Ok(ProcIdentity::of(pid).unwrap_or(ProcIdentity { pid, start_time: 0 }))
            }
            Place::Container(reaper) => reaper.start_job(job, stdout, stderr),
        }
    }

    /// Signals the process group of every command not reaped yet. A reaped command's
    /// group id may be someone else's by now, so it is left alone (its processes are
    /// reached as descendants).
    pub fn signal_groups(&self, sig: Signal) {
        match self {
            Place::Host { live, .. } => {
                for (pid, _) in live {
                    let _ = killpg(Pid::from_raw(*pid), sig);
                }
            }
            Place::Container(reaper) => reaper.signal_groups(sig),
        }
    }

    /// A child of the shim was reaped: the command's exit, if it was a command.
    pub fn reaped(&mut self, pid: i32, code: Option<i32>, signal: Option<i32>) -> Option<JobExit> {
        match self {
            Place::Host { live, .. } => {
                let i = live.iter().position(|(p, _)| *p == pid)?;
                let (_, job) = live.swap_remove(i);
                Some(JobExit { job, code, signal })
            }
            Place::Container(_) => None,
        }
    }

    /// Exits reported by the reaper (none on the host: see `reaped`).
    pub fn reported_exits(&mut self) -> Vec<JobExit> {
        match self {
            Place::Host { .. } => Vec::new(),
            Place::Container(reaper) => reaper.exits(),
        }
    }

    /// A process of the shim's tree that must not be signalled with the task's: the reaper.
    pub fn spare(&self) -> Option<i32> {
        match self {
            Place::Host { .. } => None,
            Place::Container(reaper) => Some(reaper.pid),
        }
    }

    /// The descriptor to poll for reports (the reaper's socket).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Place::Host { .. } => None,
            Place::Container(reaper) => Some(reaper.fd()),
        }
    }

    /// No more commands will be started.
    pub fn release(&self) {
        if let Place::Container(reaper) = self {
            reaper.release();
        }
    }
}
