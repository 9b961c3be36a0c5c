//! `task-executor shim-server`: the fork server that starts shims.
//!
//! Exec'ing the agent's binary for every task costs more CPU than the task's own exec
//! (dynamic relocation and page faults of a large binary). So the agent execs this server
//! once; it is single-threaded and forks a shim per request, which needs no exec.
//!
//! Its stdin is a SOCK_SEQPACKET socket to the agent. A request is one message: the task
//! directory as bytes, with the write end of the agent's notify pipe attached
//! (SCM_RIGHTS). The shim is forked once (the server lets the kernel reap its children);
//! the notify pipe becomes its stdout. The server exits when the agent's end closes; the
//! shims live on.

use std::ffi::OsStr;
use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use crate::runtime::{child_setup, records};

pub fn serve() -> i32 {
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
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(0, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("task-executor shim-server: receiving from the agent: {e}");
                return 1;
            }
        };
        if msg.bytes == 0 {
            return 0; // the agent is gone
        }
        let n = msg.bytes;
        let mut notify: Option<OwnedFd> = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        let owned = child_setup::adopt_received_fd(fd);
                        notify.get_or_insert(owned); // extras are closed on drop
                    }
                }
            }
        }
        let dir = PathBuf::from(OsStr::from_bytes(&buf[..n]));
        let Some(notify) = notify else {
            eprintln!(
                "task-executor shim-server: request for {} without a notify pipe",
                dir.display()
            );
            continue;
        };
        let mut notify = Some(notify);
        let spawned =
            forker.spawn_detached(|| become_shim(&dir, notify.take().expect("forked once")));
        if let Err(e) = spawned {
            // Tell the agent why (nothing started: it may try again later), then EOF.
            eprintln!("task-executor shim-server: fork for {}: {e}", dir.display());
            if let Some(n) = notify {
                let line = records::start_failure_line(&e, true);
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
fn become_shim(dir: &std::path::Path, notify: OwnedFd) -> i32 {
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
    super::run(dir)
}
