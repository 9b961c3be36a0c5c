//! Starting shims: through the fork server (`shim::server`), started once and restarted if
//! it dies, so a task costs a fork instead of an exec of the agent's binary.

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

impl Launcher {
    pub fn new(exe: PathBuf) -> Self {
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
        Command::new(&self.exe)
            .arg("shim-server")
            // Tasks get the open-file limit the agent was started with, not its raised one.
            .args(crate::limits::original_nofile().map(|n| format!("--nofile-soft={n}")))
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?; // reaped by the agent's reaper when it exits
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
