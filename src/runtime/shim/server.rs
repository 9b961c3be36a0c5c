//! `task-executor shim-server`: the fork server that starts shims.
//!
//! Exec'ing the agent's binary for every task costs more CPU than the task's own exec
//! (dynamic relocation and page faults of a large binary). So the agent execs this server
//! once; it is single-threaded and forks a shim per request, which needs no exec.
//!
//! Its stdin is a SOCK_SEQPACKET socket to the agent. A request is one message: the task
//! directory as bytes (then, from agents that send one, a NUL and the launch's nonce), with the write end of the agent's notify pipe attached
//! (SCM_RIGHTS). The shim is forked once (the server lets the kernel reap its children);
//! the notify pipe becomes its stdout. The server exits when the agent's end closes; the
//! shims live on. It holds nothing else: descriptors the agent inherited from its caller
//! are closed at its start (`ForkServer::init`), so no shim keeps them open.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::runtime::child_setup;
use crate::runtime::journal::protocol;

/// `agent_only_env`: variables of the agent's environment (which this server and its
/// shims inherit) that host tasks must not see.
pub fn serve(agent_only_env: Vec<String>) -> i32 {
    super::exec_plan::hide_from_tasks(agent_only_env);
    let forker = match child_setup::ForkServer::init() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("task-executor shim-server: {e}");
            return 1;
        }
    };
    warm_up();
    let mut buf = vec![0u8; 8192];
    loop {
        let (n, fds) = match child_setup::recv_with_fds(std::io::stdin().as_fd(), &mut buf) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("task-executor shim-server: receiving from the agent: {e}");
                return 1;
            }
        };
        if n == 0 {
            return 0; // the agent is gone
        }
        let (dir, nonce) = match buf[..n].iter().position(|b| *b == 0) {
            Some(i) => (&buf[..i], Some(&buf[i + 1..n])),
            None => (&buf[..n], None),
        };
        let nonce = nonce.map(|b| String::from_utf8_lossy(b).into_owned());
        let dir = PathBuf::from(OsStr::from_bytes(dir));
        let Some(notify) = fds.into_iter().next() else {
            eprintln!(
                "task-executor shim-server: request for {} without a notify pipe",
                dir.display()
            );
            continue;
        };
        let mut notify = Some(notify);
        let spawned = forker.spawn_detached(|forker| {
            become_shim(
                &dir,
                nonce.as_deref(),
                notify.take().expect("forked once"),
                forker,
            )
        });
        if let Err(e) = spawned {
            // Tell the agent why (nothing started: it may try again later), then EOF.
            eprintln!("task-executor shim-server: fork for {}: {e}", dir.display());
            if let Some(n) = notify {
                let line = protocol::start_failure_line(&e, true);
                let _ = std::io::Write::write_all(&mut File::from(n), line.as_bytes());
            }
        }
    }
}

/// Does once, here, what every shim would otherwise do for itself: CPU feature detection
/// (the `cpuid` instruction traps to the hypervisor in a VM, which makes it costly) is
/// cached in statics that forked shims inherit.
fn warm_up() {
    let _ = memchr::memrchr(b'\n', b"warm\n");
    let _ = memchr::memchr(b'\n', b"warm\n");
}

/// In the forked process: stdin from /dev/null, stdout the notify pipe, then be a shim.
fn become_shim(
    dir: &std::path::Path,
    nonce: Option<&str>,
    notify: OwnedFd,
    forker: &child_setup::ForkServer,
) -> i32 {
    let rewired = File::open("/dev/null").and_then(|null| {
        nix::unistd::dup2_stdin(null.as_fd())?;
        nix::unistd::dup2_stdout(notify.as_fd())?;
        Ok(())
    });
    drop(notify);
    if let Err(e) = rewired {
        eprintln!("task-executor shim {}: {e}", dir.display());
        return 1;
    }
    super::run(dir, nonce, forker)
}
