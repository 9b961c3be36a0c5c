//! `task-executor shim-server`: the fork server that starts shims.
//!
//! Exec'ing the agent's binary for every task costs more CPU than the task's own exec
//! (dynamic relocation and page faults of a large binary). So the agent execs this server
//! once; it is single-threaded and forks a shim per request, which needs no exec.
//!
//! Its stdin is a SOCK_SEQPACKET socket to the agent. A request is one message: the task
//! directory as bytes (then, from agents that send one, a NUL and the launch's nonce), with the write end of the agent's notify pipe attached
//! (SCM_RIGHTS). The shim is forked once (the server lets the kernel reap its children);
//! the notify pipe becomes its stdout. After each request the server forks a spare shim
//! for the next one (see `spare`), and hands that request on to it. The server exits when the agent's end closes; the
//! shims live on. It holds nothing else: descriptors the agent inherited from its caller
//! are closed at its start (`ForkServer::init`), so no shim keeps them open.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use super::spare::{Prepared, Shape};
use crate::runtime::child_setup::{self, ForkServer};
use crate::runtime::journal::protocol;

/// `agent_only_env`: variables of the agent's environment (which this server and its
/// shims inherit) that host tasks must not see.
pub fn serve(agent_only_env: Vec<String>) -> i32 {
    super::exec_plan::hide_from_tasks(agent_only_env);
    let forker = match ForkServer::init() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("task-executor shim-server: {e}");
            return 1;
        }
    };
    warm_up();
    let mut spare: Option<Spare> = None;
    // Shims handed a launch that have not yet started its task (each says so, or closes,
    // on its socket): no spare is made ready while one is, as a spare's cgroup move
    // holds up every fork on the machine, theirs included, for an RCU grace period.
    let mut starting: Vec<OwnedFd> = Vec::new();
    let mut shape: Option<Shape> = None;
    let mut buf = vec![0u8; 8192];
    loop {
        if spare.is_none() && starting.is_empty() {
            spare = shape.clone().and_then(|s| Spare::fork(&forker, s));
        }
        let request_ready = match wait(&mut starting) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("task-executor shim-server: waiting for requests: {e}");
                return 1;
            }
        };
        if !request_ready {
            continue;
        }
        let (n, fds) = match child_setup::recv_with_fds(std::io::stdin().as_fd(), &mut buf) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("task-executor shim-server: receiving from the agent: {e}");
                return 1;
            }
        };
        if n == 0 {
            return 0; // the agent is gone (and with this process, the spare's socket)
        }
        let (dir, nonce) = parse_request(&buf[..n]);
        let Some(notify) = fds.into_iter().next() else {
            eprintln!(
                "task-executor shim-server: request for {} without a notify pipe",
                dir.display()
            );
            continue;
        };
        // The spare takes it if it is alive; else (killed, or none yet) a shim is forked.
        let notify = match spare.take() {
            Some(s) => match s.hand_on(&buf[..n], notify) {
                Ok(sock) => {
                    starting.push(sock);
                    None
                }
                Err(back) => Some(back),
            },
            None => Some(notify),
        };
        if let Some(notify) = notify {
            match fork_shim(&forker, &dir, nonce, notify) {
                Ok(sock) => starting.push(sock),
                Err(e) => eprintln!("task-executor shim-server: fork for {}: {e}", dir.display()),
            }
        }
        // What the next launch will likely need: this one's cgroups' parents.
        shape = Shape::of_journal(&dir).or(shape);
    }
}

/// Waits for a request on stdin or a word from a starting shim; drops the sockets of
/// those that spoke (started their task) or closed (ended, or died). Whether a request
/// is there to read.
fn wait(starting: &mut Vec<OwnedFd>) -> nix::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let stdin = std::io::stdin();
    let (request, spoke) = loop {
        let mut fds = vec![PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            starting
                .iter()
                .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        let spoke: Vec<bool> = fds[1..].iter().map(ready).collect();
        break (ready(&fds[0]), spoke);
    };
    let mut spoke = spoke.into_iter();
    starting.retain(|_| !spoke.next().unwrap_or(false));
    Ok(request)
}

/// Forks a shim for a request no spare took; returns the server's end of its socket
/// (see `starting`). The fork failed: the agent is told why (nothing started: it may
/// try again later) on the notify pipe, then EOF.
fn fork_shim(
    forker: &ForkServer,
    dir: &Path,
    nonce: Option<String>,
    notify: OwnedFd,
) -> std::io::Result<OwnedFd> {
    let failed = |e: std::io::Error, notify: OwnedFd| {
        let line = protocol::start_failure_line(&e, true);
        let _ = std::io::Write::write_all(&mut File::from(notify), line.as_bytes());
        e
    };
    let (ours, theirs) = match crate::sys::socket::seqpacket_pair() {
        Ok(pair) => pair,
        Err(e) => return Err(failed(e.into(), notify)),
    };
    let payload = Request {
        dir: dir.to_path_buf(),
        nonce,
        notify,
        report: theirs,
    };
    match forker.spawn_detached_with(payload, fresh_shim) {
        Ok(()) => Ok(ours),
        Err((e, request)) => Err(failed(e, request.notify)),
    }
}

/// A request's task directory and nonce: the directory's bytes, then (from agents that
/// send one) a NUL and the nonce.
pub(super) fn parse_request(bytes: &[u8]) -> (PathBuf, Option<String>) {
    let (dir, nonce) = match bytes.iter().position(|b| *b == 0) {
        Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
        None => (bytes, None),
    };
    (
        PathBuf::from(OsStr::from_bytes(dir)),
        nonce.map(|b| String::from_utf8_lossy(b).into_owned()),
    )
}

/// The spare shim forked last (`spare`): the server's end of its socket.
struct Spare {
    sock: OwnedFd,
}

impl Spare {
    /// Forks a spare that prepares for `shape`; `None` (after saying why) when it can't
    /// be forked: the next launch forks its shim, as without spares.
    fn fork(forker: &ForkServer, shape: Shape) -> Option<Spare> {
        let (ours, theirs) = match crate::sys::socket::seqpacket_pair() {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("task-executor shim-server: no socket for a spare shim: {e}");
                return None;
            }
        };
        let payload = SpareStart {
            sock: theirs,
            shape,
        };
        match forker.spawn_detached_with(payload, |forker, p| {
            super::spare::serve(p.sock, p.shape, forker)
        }) {
            Ok(()) => Some(Spare { sock: ours }),
            Err((e, _)) => {
                eprintln!("task-executor shim-server: fork of a spare shim: {e}");
                None
            }
        }
    }

    /// Sends the request on to the spare, with `notify` attached; returns the socket, on
    /// which the spare says when it started the task. Gives `notify` back when the spare
    /// is gone (its socket's peer closed).
    fn hand_on(self, request: &[u8], notify: OwnedFd) -> Result<OwnedFd, OwnedFd> {
        let fds = [notify.as_raw_fd()];
        let sent = loop {
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &[std::io::IoSlice::new(request)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        };
        match sent {
            Ok(_) => Ok(self.sock), // the spare holds its copy of `notify`; ours closes here
            Err(_) => Err(notify),
        }
    }
}

/// What a spare is forked with.
pub struct SpareStart {
    sock: OwnedFd,
    shape: Shape,
}

impl SpareStart {
    pub(in crate::runtime) fn owned_fds(&self) -> Vec<RawFd> {
        vec![self.sock.as_raw_fd()]
    }
}

/// What a shim forked for its request is forked with.
pub struct Request {
    dir: PathBuf,
    nonce: Option<String>,
    notify: OwnedFd,
    /// Its end of the socket on which it says it started the task.
    report: OwnedFd,
}

impl Request {
    pub(in crate::runtime) fn owned_fds(&self) -> Vec<RawFd> {
        vec![self.notify.as_raw_fd(), self.report.as_raw_fd()]
    }
}

fn fresh_shim(forker: &ForkServer, r: Request) -> i32 {
    let shim = Shim {
        notify: r.notify,
        report: r.report,
        prepared: Prepared::none(),
    };
    become_shim(&r.dir, r.nonce.as_deref(), shim, forker)
}

/// What a forked shim starts with.
pub(super) struct Shim {
    /// The agent's notify pipe (its stdout).
    pub notify: OwnedFd,
    /// Its socket to the server: it says there when its task started.
    pub report: OwnedFd,
    /// The cgroups it made as a spare.
    pub prepared: Prepared,
}

/// Does once, here, what every shim would otherwise do for itself: CPU feature detection
/// (the `cpuid` instruction traps to the hypervisor in a VM, which makes it costly) is
/// cached in statics that forked shims inherit.
fn warm_up() {
    let _ = memchr::memrchr(b'\n', b"warm\n");
    let _ = memchr::memchr(b'\n', b"warm\n");
}

/// In the forked process: stdin from /dev/null, stdout the notify pipe, then be a shim.
pub(super) fn become_shim(dir: &Path, nonce: Option<&str>, shim: Shim, forker: &ForkServer) -> i32 {
    let rewired = File::open("/dev/null").and_then(|null| {
        nix::unistd::dup2_stdin(null.as_fd())?;
        nix::unistd::dup2_stdout(shim.notify.as_fd())?;
        Ok(())
    });
    drop(shim.notify);
    if let Err(e) = rewired {
        eprintln!("task-executor shim {}: {e}", dir.display());
        return 1;
    }
    super::run(dir, nonce, forker, shim.prepared, shim.report)
}
