//! The supervisor's lines in the run's journal: appends that a full or read-only disk
//! only delays, and the main command's exit line (with what its cgroups counted).

use std::io;
use std::path::Path;

use nix::sys::signal::Signal;

use super::Supervisor;
use super::machine::{MainEnd, Marks};
use crate::runtime::child_setup::{SpawnError, Step};
use crate::runtime::journal::{self, Entry, ExitRecord, Unrecorded};
use crate::task::time::Time;

impl Supervisor<'_> {
    /// Appends to the journal. A durable line (an exit) the disk refuses for want of
    /// space or because it went read-only is kept and retried until it is written: the
    /// shim holds on to the run (its locks, so the agent shows it running) rather than die
    /// and leave its outcome unknown. A stop request still ends it (SIGKILL after the
    /// grace period).
    pub(super) fn journal(&mut self, entry: &Entry, durable: bool) -> io::Result<()> {
        let Some(j) = self.running_lock.as_mut() else {
            return Ok(());
        };
        let mut pause = std::time::Duration::from_millis(50);
        let mut reported = false;
        loop {
            match journal::append(j, entry, durable) {
                Err(e) if durable && disk_refused(&e) => {
                    if !reported {
                        eprintln!(
                            "task-executor shim {}: the journal can't take a line ({e}); retrying until it can",
                            std::process::id()
                        );
                        reported = true;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                }
                r => return r,
            }
        }
    }

    /// The main command could not be started: its exit line says why.
    pub(super) fn main_start_failed(&mut self, e: SpawnError) -> io::Result<()> {
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
        let rec = super::super::start_error_record(&e.error, &what, launch);
        self.record_main(rec)
    }

    /// The main command's exit line as the machine says it ended.
    pub(super) fn exit_record(&self, end: MainEnd, marks: Marks) -> ExitRecord {
        let ran = ExitRecord {
            started_at: self.started,
            finished_at: Some(Time::now()),
            timed_out: marks.timed_out,
            stop_requested: marks.stop_requested,
            target_gone: marks.target_gone,
            ..Default::default()
        };
        match end {
            MainEnd::Exited { code, signal } => ExitRecord {
                exit_code: code,
                signal,
                ..ran
            },
            // If the container went with its reaper, the kernel killed everything in its
            // PID namespace; otherwise the exit is unknown.
            MainEnd::Lost => ExitRecord {
                signal: marks.target_gone.then_some(Signal::SIGKILL as i32),
                unrecorded: (!marks.target_gone).then_some(Unrecorded::SupervisorLost),
                ..ran
            },
            // The main command never runs.
            MainEnd::PreStartFailed => ExitRecord {
                exit_code: Some(1),
                finished_at: Some(Time::now()),
                stop_requested: marks.stop_requested,
                pre_start_failed: true,
                ..Default::default()
            },
        }
    }

    /// Writes the main command's exit line (durably); the run goes on with `postStop`.
    pub(super) fn record_main(&mut self, mut rec: ExitRecord) -> io::Result<()> {
        if !self.cgroups.is_empty() {
            // Read after the main command was reaped: an OOM kill of it is counted by then.
            let dirs: Vec<&Path> = self.cgroups.iter().map(|d| d.as_path()).collect();
            rec.usage = Some(crate::runtime::limits::usage(&dirs)).filter(|u| !u.is_empty());
        }
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
