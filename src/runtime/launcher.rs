//! Starting shims: through the fork server (`shim::server`), started once and restarted if
//! it dies, so a task costs a fork instead of an exec of the agent's binary.
//!
//! Also the agent's open-file limit: after a restart it holds two pidfds per running task
//! (see `exit_watch`), so its soft limit goes up to the hard one at start; the shim server
//! gets the original soft limit back, so tasks keep the limit the agent was given.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

pub struct Launcher {
    exe: PathBuf,
    server: tokio::sync::Mutex<Option<AsyncFd<OwnedFd>>>,
}

/// The soft limit on open files the agent was started with, before `raise_fd_limit`.
static ORIGINAL_NOFILE: std::sync::OnceLock<rustix::process::Rlimit> = std::sync::OnceLock::new();

/// Raises this process's soft limit on open files to its hard limit (once).
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    ORIGINAL_NOFILE.get_or_init(|| {
        let original = getrlimit(Resource::Nofile);
        let raised = rustix::process::Rlimit {
            current: original.maximum,
            maximum: original.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
        original
    });
}

impl Launcher {
    pub fn new(exe: PathBuf) -> Self {
        raise_fd_limit();
        Launcher {
            exe,
            server: tokio::sync::Mutex::new(None),
        }
    }

    /// Starts the shim for `dir`; returns the read end of its notify pipe (its stdout).
    pub async fn launch(&self, dir: &Path) -> io::Result<pipe::Receiver> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let mut server = self.server.lock().await;
        let mut last = None;
        for _ in 0..2 {
            if server.is_none() {
                *server = Some(self.start_server()?);
            }
            let sock = server.as_ref().expect("started above");
            match send(sock, dir, &write).await {
                Ok(()) => {
                    drop(write); // only the shim holds the write end now
                    return pipe::Receiver::from_owned_fd(read);
                }
                Err(e) => {
                    // The server died (EPIPE): start a new one and try once more.
                    tracing::warn!(error = %e, "shim server unavailable; restarting it");
                    *server = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("shim server unavailable")))
    }

    fn start_server(&self) -> io::Result<AsyncFd<OwnedFd>> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let server = Command::new(&self.exe)
            .arg("shim-server")
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?; // reaped by the agent's reaper when it exits
        // Before the first request, so every shim and task inherits the original limit.
        if let (Some(original), Some(pid)) = (
            ORIGINAL_NOFILE.get(),
            rustix::process::Pid::from_raw(server.id() as i32),
        ) && let Err(e) =
            rustix::process::prlimit(Some(pid), rustix::process::Resource::Nofile, *original)
        {
            tracing::warn!(error = %e, "cannot give the shim server the original open-file limit");
        }
        let flags = OFlag::from_bits_truncate(fcntl(&ours, FcntlArg::F_GETFL)?);
        fcntl(&ours, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        tracing::debug!("shim server started");
        // Deprecated because a caller could close a borrowed fd while it is registered;
        // here the AsyncFd owns the OwnedFd, so the fd lives exactly as long as it.
        #[allow(deprecated)]
        AsyncFd::new(ours)
    }
}

async fn send(sock: &AsyncFd<OwnedFd>, dir: &Path, notify: &OwnedFd) -> io::Result<()> {
    let bytes = dir.as_os_str().as_bytes();
    let fds = [notify.as_raw_fd()];
    loop {
        let mut ready = sock.writable().await?;
        let sent = ready.try_io(|s| {
            sendmsg::<()>(
                s.get_ref().as_raw_fd(),
                &[IoSlice::new(bytes)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(result) => return result.map(drop),
            Err(_would_block) => continue,
        }
    }
}
