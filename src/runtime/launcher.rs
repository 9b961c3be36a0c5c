//! Starting shims: through the fork server (`shim::server`), started once and restarted if
//! it dies, so a task costs a fork instead of an exec of the agent's binary. Under
//! `task-executor init` (src/init) the init owns the server and hands the agent its socket
//! as stdin; the agent then uses that one first.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{ControlMessage, MsgFlags, SockType, sendmsg};
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

    /// Starts the shim for `dir`, for the launch with `nonce` (see `journal::Launch`);
    /// returns the read end of its notify pipe (its stdout).
    pub async fn launch(&self, dir: &Path, nonce: Option<&str>) -> io::Result<pipe::Receiver> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let mut server = self.server.lock().await;
        let mut last = None;
        for _ in 0..2 {
            if server.is_none() {
                *server = Some(match take_inherited_server() {
                    Some(sock) => into_async(sock)?,
                    None => self.start_server()?,
                });
            }
            let sock = server.as_ref().expect("started above");
            match send(sock, dir, nonce, &write).await {
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
        let (ours, theirs) = crate::sys::socket::seqpacket_pair()?;
        Command::new(&self.exe)
            .arg("shim-server")
            // Tasks get the open-file limit the agent was started with, not its raised one.
            .args(crate::limits::original_nofile().map(|n| format!("--nofile-soft={n}")))
            // Under the init, the agent's oom_score_adj was raised: tasks keep the
            // container's (the init's), as with the init's own server.
            .args(
                std::env::var(TASK_OOM_SCORE_ADJ_ENV)
                    .ok()
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(|v| format!("--oom-score-adj={v}")),
            )
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env_remove(SERVER_ON_STDIN_ENV)
            .env_remove(TASK_OOM_SCORE_ADJ_ENV)
            // Outside the agent's group, so the reaper (which leaves the agent's own group
            // to those who wait for its members) reaps it and shims it leaves behind.
            .process_group(0)
            .spawn()?; // reaped by the agent's reaper when it exits
        tracing::debug!("shim server started");
        into_async(ours)
    }
}

fn into_async(sock: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let flags = OFlag::from_bits_truncate(fcntl(&sock, FcntlArg::F_GETFL)?);
    fcntl(&sock, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // Deprecated because a caller could close a borrowed fd while it is registered;
    // here the AsyncFd owns the OwnedFd, so the fd lives exactly as long as it.
    #[allow(deprecated)]
    AsyncFd::new(sock)
}

/// Set to `stdin` by `task-executor init` in the environment of the agent it starts: the
/// agent's stdin is then a socket to the init's shim server. Not passed on to a server the
/// agent starts itself (whose environment its shims and host tasks inherit).
pub const SERVER_ON_STDIN_ENV: &str = "TASK_EXECUTOR_SHIM_SERVER";

/// Set by `task-executor init` in the agent's environment: the container's oom_score_adj
/// (the init's), which a shim server the agent starts itself gives back to its shims.
pub const TASK_OOM_SCORE_ADJ_ENV: &str = "TASK_EXECUTOR_TASK_OOM_SCORE_ADJ";

/// The server socket handed over on stdin, until the launcher takes it. Process-wide, as
/// the descriptor it came from is.
static INHERITED_SERVER: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// Called once at the agent's start, before anything reads stdin: when the init said so,
/// keeps stdin (a SOCK_SEQPACKET socket to its shim server) for the launcher and puts
/// /dev/null in its place. `Ok(false)` when there is no server to inherit; an error when
/// the environment promised one that stdin is not (the agent then starts its own).
pub fn adopt_server_on_stdin() -> io::Result<bool> {
    use nix::sys::socket::{getsockopt, sockopt};
    use std::os::fd::AsFd;
    if std::env::var_os(SERVER_ON_STDIN_ENV).is_none_or(|v| v != "stdin") {
        return Ok(false);
    }
    let stdin = std::io::stdin();
    match getsockopt(&stdin.as_fd(), sockopt::SockType) {
        Ok(SockType::SeqPacket) => {}
        Ok(other) => {
            return Err(io::Error::other(format!(
                "{SERVER_ON_STDIN_ENV}=stdin, but stdin is a {other:?} socket"
            )));
        }
        Err(e) => {
            return Err(io::Error::other(format!(
                "{SERVER_ON_STDIN_ENV}=stdin, but stdin is not a socket: {e}"
            )));
        }
    }
    let sock = stdin.as_fd().try_clone_to_owned()?; // close-on-exec, unlike fd 0
    nix::unistd::dup2_stdin(std::fs::File::open("/dev/null")?)?;
    *INHERITED_SERVER.lock().unwrap_or_else(|e| e.into_inner()) = Some(sock);
    Ok(true)
}

fn take_inherited_server() -> Option<OwnedFd> {
    INHERITED_SERVER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
}

/// One request: the directory's bytes, then (with a nonce) a NUL and the nonce; a path
/// holds no NUL, so the server tells them apart.
async fn send(
    sock: &AsyncFd<OwnedFd>,
    dir: &Path,
    nonce: Option<&str>,
    notify: &OwnedFd,
) -> io::Result<()> {
    let mut bytes = dir.as_os_str().as_bytes().to_vec();
    if let Some(n) = nonce {
        bytes.push(0);
        bytes.extend_from_slice(n.as_bytes());
    }
    let bytes = &bytes[..];
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
