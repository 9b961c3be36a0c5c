//! How the agent learns that a running process task finished, without a thread or a poll
//! loop per task: 5,000 re-adopted tasks must cost 5,000 registrations in the event loop,
//! not 5,000 threads (a pod's pids limit counts threads).
//!
//! The shim releases the journal's flock once the exit line is written (or when it dies).
//! A shim this agent started also closes its stdout pipe then: EOF is the signal. A shim
//! adopted after a restart has no pipe to this agent; its pidfd and the task's are: the
//! shim's becomes readable when the shim dies, the task's when the task exits, after which
//! the exit line follows within moments (the shim drains the task's output first) and is
//! awaited with short sleeps. A shim may outlive its task (daemons the task left keep it
//! alive), so the task's exit, not the shim's, is what ends the wait in the normal case.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use super::journal::lock_held;
use super::journal::watch::JournalWatch;
use crate::sys::proc_handle::PidFd;

pub enum ExitWatch {
    /// EOF on the stdout pipe of a shim this agent started.
    Pipe(pipe::Receiver),
    /// The release of an adopted task's journal, as the shared watcher hears of it.
    Journal(JournalWatch),
    /// pidfds of an adopted shim and of its task (either may be gone already).
    Pids {
        shim: Option<PidFd>,
        main: Option<PidFd>,
    },
}

impl ExitWatch {
    /// Returns once the journal at `journal` is no longer locked by the shim.
    pub async fn wait(self, journal: &Path) -> io::Result<()> {
        match self {
            ExitWatch::Pipe(mut pipe) => {
                let mut sink = [0u8; 64];
                loop {
                    if pipe.read(&mut sink).await? == 0 {
                        return Ok(());
                    }
                }
            }
            ExitWatch::Journal(mut w) => loop {
                if !lock_held(journal) {
                    return Ok(());
                }
                if !w.changed().await {
                    // The watch is gone (the journal removed, or the watcher failed).
                    return poll_until_free(journal).await;
                }
            },
            ExitWatch::Pids { shim, main } => {
                let shim = shim.map(|p| watch(p.into_fd())).transpose()?;
                let mut main = main.map(|p| watch(p.into_fd())).transpose()?;
                // Until the task has exited, nothing is expected of the journal.
                let mut pause = Duration::from_millis(2);
                loop {
                    if main.is_none() && !lock_held(journal) {
                        return Ok(());
                    }
                    tokio::select! {
                        _ = exited(shim.as_ref()) => {
                            // The shim is gone: its locks with it.
                            return Ok(());
                        }
                        _ = exited(main.as_ref()), if main.is_some() => main = None,
                        _ = tokio::time::sleep(pause), if main.is_none() => {
                            pause = (pause * 2).min(Duration::from_millis(100));
                        }
                    }
                }
            }
        }
    }
}

/// Looks at the journal's lock every little while (at most every 100 ms) until it is free.
async fn poll_until_free(journal: &Path) -> io::Result<()> {
    let mut pause = Duration::from_millis(2);
    while lock_held(journal) {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    Ok(())
}

fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // Deprecated because a caller could close a borrowed fd while it is registered; here
    // the AsyncFd owns the OwnedFd, so the fd lives exactly as long as the registration.
    #[allow(deprecated)]
    AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)
}

/// Resolves once the pidfd's process has exited; never for `None`.
async fn exited(fd: Option<&AsyncFd<OwnedFd>>) {
    match fd {
        Some(fd) => {
            // A pidfd stays readable once its process exited: the readiness is kept.
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}
