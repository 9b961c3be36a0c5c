//! Process set-up that needs `unsafe`; the only module of the crate allowed it.
//!
//! - `ForkServer`: the shim server forks a shim per task. It checks once that it is
//!   single-threaded (after `fork` the child runs Rust code, sound only when no other
//!   thread could have held a lock) and puts the signal state every shim inherits in order.
//! - `install`: what a sidecar task does between fork and exec: reset the signal state it
//!   inherited from the shim (which blocks signals for its signalfd), then enter the main
//!   container: cgroups, namespaces, working dir, identity. `CommandExt::pre_exec` is
//!   unsafe because the closure runs between fork and exec; the shim is single-threaded,
//!   and the closure only makes raw syscalls (sigprocmask, sigaction, open, write, setns,
//!   chdir, setgroups, setgid, setuid) on data prepared before the fork: no allocation, no
//!   locks. Host tasks need no hook: the shim starts them with posix_spawn (`shim::spawn`).
//! - `adopt_received_fd`: taking ownership of a descriptor received with SCM_RIGHTS.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid, chdir, setgid, setgroups, setuid, write};

/// Everything the child does before exec, prepared in the parent.
pub struct Join {
    /// `cgroup.procs` files of the target's cgroups (joined before leaving our mount ns).
    pub cgroup_procs: Vec<CString>,
    /// Namespace fds opened from /proc/TARGET/ns, joined in this order (mnt last).
    pub namespaces: Vec<(OwnedFd, CloneFlags)>,
    pub working_dir: Option<CString>,
    pub user: Option<(Uid, Gid)>,
}

/// Installs the hook on `cmd` that enters the main container (sidecar tasks; host tasks
/// need none and are started with posix_spawn).
pub fn install(cmd: &mut Command, join: Join) {
    // SAFETY: the closure runs in the single-threaded child of the (single-threaded) shim
    // between fork and exec, which is what `reset_signals` requires. It owns `join`, which
    // was fully built before the fork, and only calls async-signal-safe syscalls through
    // nix wrappers that take borrowed C strings and fds; errors are returned as
    // `io::Error::from(Errno)`, which does not allocate. std reports a returned error to
    // the parent and the child exits.
    unsafe {
        cmd.pre_exec(move || {
            reset_signals()?;
            enter(&join)
        });
    }
}

/// A task starts with no blocked and no ignored signals, whatever the shim (or whoever
/// started the agent, e.g. a shell that ignores SIGINT for background jobs) had.
///
/// # Safety
/// Only for the child between fork and exec: it changes process-wide signal state.
unsafe fn reset_signals() -> io::Result<()> {
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: SIG_DFL installs no handler, so no Rust code can run in signal
            // context; sigaction is async-signal-safe.
            unsafe { signal(sig, SigHandler::SigDfl) }?;
        }
    }
    Ok(())
}

fn enter(join: &Join) -> io::Result<()> {
    for procs in &join.cgroup_procs {
        let fd = open(
            procs.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // "0" moves the writing process itself.
        write(&fd, b"0")?;
    }
    for (fd, flag) in &join.namespaces {
        setns(fd.as_fd(), *flag)?;
    }
    if let Some(dir) = &join.working_dir {
        chdir(dir.as_c_str())?;
    }
    if let Some((uid, gid)) = join.user {
        setgroups(&[gid])?;
        setgid(gid)?;
        setuid(uid)?;
    }
    Ok(())
}

/// Makes the calling process's future children start in the PID namespace `fd`.
/// Only children are affected, which is why the shim forks the task after this.
pub fn join_pid_namespace_for_children(fd: &OwnedFd) -> io::Result<()> {
    setns(fd.as_fd(), CloneFlags::CLONE_NEWPID)?;
    Ok(())
}

/// Marks every inherited descriptor above stderr close-on-exec.
fn cloexec_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        // SAFETY: the fd was listed as open a moment ago and the process is single-threaded,
        // so nothing closes it meanwhile; the borrow ends with this statement. A stale
        // entry (the directory's own fd) just makes fcntl fail with EBADF.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

/// The shim server's licence to fork: proof, checked once at start, that the process is
/// single-threaded. After `fork` the child runs arbitrary Rust code, which is only sound
/// when no other thread could have held a lock (malloc, stdio) at that moment. The server
/// never starts a thread, so the check holds for its life; checking once instead of per
/// fork saves a read of /proc per task. Neither `Send` nor `Sync`, so it stays on the
/// thread that checked.
pub struct ForkServer(std::marker::PhantomData<*const ()>);

impl ForkServer {
    /// Refuses (with an error) unless the calling process is single-threaded. Also puts
    /// the process in the state every shim should inherit: default signal dispositions
    /// (so tasks started with posix_spawn inherit no ignored signal), SIGCHLD ignored (the
    /// kernel reaps the forked shims), and every inherited descriptor close-on-exec (so
    /// tasks never receive what the agent's parent leaked to it).
    pub fn init() -> io::Result<Self> {
        if thread_count()? != 1 {
            return Err(io::Error::other("a fork server must be single-threaded"));
        }
        reset_dispositions()?;
        // SAFETY: SIG_IGN installs no handler, so no code runs in signal context.
        unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }?;
        cloexec_inherited_fds();
        Ok(ForkServer(std::marker::PhantomData))
    }

    /// Runs `f` in a forked child whose exit code is `f`'s return value. Children never
    /// linger as zombies and need no wait (SIGCHLD is ignored); the child gets the default
    /// SIGCHLD back before `f` runs, as a shim must reap its own children.
    pub fn spawn_detached(&self, f: impl FnOnce() -> i32) -> io::Result<()> {
        use nix::unistd::{ForkResult, fork};
        // SAFETY: the process has exactly one thread: checked by `init`, which made this
        // value, and the fork server starts none (it is a loop over recvmsg and fork).
        match unsafe { fork() }? {
            ForkResult::Parent { .. } => Ok(()),
            ForkResult::Child => {
                // SAFETY: SIG_DFL installs no handler; we are the only thread.
                let code = match unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) } {
                    Ok(_) => f(),
                    Err(_) => 1,
                };
                std::process::exit(code)
            }
        }
    }
}

/// Every signal back to its default action, except SIGPIPE, which stays ignored as Rust
/// programs have it (std resets it to the default in the children it spawns).
fn reset_dispositions() -> io::Result<()> {
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            let action = if sig == Signal::SIGPIPE {
                SigHandler::SigIgn
            } else {
                SigHandler::SigDfl
            };
            // SAFETY: SIG_DFL and SIG_IGN install no handler, so no Rust code can run in
            // signal context; sigaction itself is thread-safe.
            unsafe { signal(sig, action) }?;
        }
    }
    Ok(())
}

/// Threads of this process, from /proc/self/stat (field 20).
fn thread_count() -> io::Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(17))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::other("unreadable /proc/self/stat"))
}

/// Takes ownership of a descriptor the kernel just installed in this process through
/// `SCM_RIGHTS`.
pub fn adopt_received_fd(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `recvmsg` created this descriptor for us a moment ago; nothing else in the
    // process knows its number, so this is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
