//! Process set-up that needs `unsafe`; the only module of the crate allowed it.
//!
//! - `ForkServer`: the proof that this process may `fork` one that then runs Rust code, which is only
//!   sound in a single-threaded process. The shim server checks it once; its shims (and a
//!   shim's in-container reaper) are forked children of it and single-threaded too.
//! - `fork_exec`: starting a task's process (the shim on the host, the reaper inside the main
//!   container) with a vfork-like `clone`. Hand-written for two measured reasons: glibc's
//!   `posix_spawn` sets signals 32 and 33 to SIG_IGN in every child it starts (its child
//!   code does so for its internal signals whatever the attributes say; checked with a
//!   spawned `grep SigIgn /proc/self/status`), which every non-glibc task then inherits;
//!   and a `fork` would copy the supervisor's page tables and fault on each page it writes
//!   afterwards. The child makes raw system calls only, on data prepared before the clone.
//!   `fork_exec_into` does the same with the process born in a given cgroup v2 (`clone3`).
//!   What the process is started with is `plan`'s `ExecPlan`; the clone is `spawn`'s,
//!   the child's own code `child`'s.
//! - `recv_with_fds`, `close_all_but`: descriptor ownership and hygiene (here).
#![allow(unsafe_code)]

mod child;
mod clone3;
mod plan;
mod spawn;

pub use plan::{CapSets, Creds, Cwd, ExecPlan, SpawnError, Step};
pub use spawn::{Announce, fork_exec, fork_exec_into, into_cgroup_unsupported};

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::{SigHandler, Signal, signal};

/// The highest signal number on Linux (SIGRTMAX).
const MAX_SIGNAL: c_int = 64;

/// The kernel's `struct sigaction` (the same 32 bytes on x86-64 and arm64): all zeros is
/// SIG_DFL with no flags and an empty mask.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Size of the kernel's signal set, as rt_sigaction and rt_sigprocmask take it.
const KERNEL_SIGSET: usize = 8;

/// Sets `sig` to its default action with the raw system call: glibc's `sigaction`
/// refuses 32 and 33 (its own), which a process may nevertheless have inherited ignored.
///
/// # Safety
/// Changes process-wide signal state: no Rust signal handler may rely on `sig`.
unsafe fn default_action(sig: c_int) -> c_int {
    let dfl = KernelSigaction::default();
    // SAFETY: the struct has the kernel's layout and lives across the call; no old
    // action is requested.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &dfl as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            KERNEL_SIGSET,
        ) as c_int
    }
}

/// Replaces the signal mask with `mask` (raw: glibc would drop 32 and 33 from it);
/// returns the previous one.
fn set_mask(mask: u64) -> io::Result<u64> {
    let mut old = 0u64;
    // SAFETY: both sets are valid 8-byte kernel sigsets on this stack frame.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask as *const u64,
            &mut old as *mut u64,
            KERNEL_SIGSET,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(old)
}

/// The shim server's permission to fork: proof, checked once at start, that the process is
/// single-threaded. After `fork` the child runs arbitrary Rust code, which is only sound
/// when no other thread could have held a lock (malloc, stdio) at that moment. The server
/// never starts a thread, nor do the shims and reapers it forks, so the permission holds in
/// them too and is handed down to them. Neither `Send` nor `Sync`, so it stays on the
/// thread that checked.
pub struct ForkServer(std::marker::PhantomData<*const ()>);

impl ForkServer {
    /// Refuses (with an error) unless the calling process is single-threaded. Also puts
    /// the process in the state every shim should inherit: every signal at its default
    /// action (32 and 33 included) but SIGPIPE (ignored, as in any Rust program), SIGCHLD
    /// ignored (the kernel reaps the forked shims), no signal blocked, and no descriptor
    /// open beyond stdio: whatever the agent's caller left open to it (a pipe it waits on
    /// for EOF, say) is closed here, not held for the life of every shim.
    pub fn init() -> io::Result<Self> {
        if thread_count()? != 1 {
            return Err(io::Error::other("a fork server must be single-threaded"));
        }
        for sig in 1..=MAX_SIGNAL {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // SAFETY: no handler of this program depends on any signal's action;
                // SIGPIPE and SIGCHLD are set again right below.
                unsafe { default_action(sig) };
            }
        }
        // SAFETY: SIG_IGN installs no handler, so no code runs in signal context.
        unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) }?;
        // SAFETY: as above.
        unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }?;
        set_mask(0)?;
        // SAFETY: the server has just started: nothing in it owns a descriptor yet
        // besides stdio (the socket to the agent is stdin).
        unsafe { close_all_but(&[]) };
        Ok(ForkServer(std::marker::PhantomData))
    }

    /// Runs `f(payload)` in a forked child whose exit code is `f`'s return value and that
    /// keeps no descriptor but stdio and those `payload` owns (see `fork_with`): a shim or
    /// a spare shim the server forks holds none of the server's others (another spare's
    /// socket, say). Children never linger as zombies and need no wait (SIGCHLD is
    /// ignored); the child gets the default SIGCHLD back before `f` runs, as a shim must
    /// reap its own children. The fork failed: the error, and the payload back.
    pub fn spawn_detached_with<P: OwnsFds>(
        &self,
        payload: P,
        f: fn(&ForkServer, P) -> i32,
    ) -> Result<(), (io::Error, P)> {
        let mut slot = Some(payload);
        let forked = self.fork(|forker| {
            let Some(payload) = slot.take() else {
                return 1;
            };
            // SAFETY: the child's live objects are `payload` (whose descriptors stay, see
            // `OwnsFds`) and what `f`, a function capturing nothing, creates later.
            unsafe { close_all_but(&payload.fds()) };
            // SAFETY: SIG_DFL installs no handler; we are the only thread.
            match unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) } {
                Ok(_) => f(forker, payload),
                Err(_) => 1,
            }
        });
        match forked {
            // The parent's copy (its descriptors) is the child's now: closed here.
            Ok(_) => Ok(()),
            Err(e) => Err((e, slot.take().expect("not forked, not taken"))),
        }
    }

    /// Runs `f(payload)` in a forked child that keeps no descriptor but stdio and those
    /// `payload` owns: nothing of the caller's (its locks, its pipes) stays open in it.
    /// `f` is a plain function, so the payload is all it can own. Returns the child's pid
    /// to the caller, who reaps it.
    pub fn fork_with<P: OwnsFds>(
        &self,
        payload: P,
        f: fn(&ForkServer, P) -> i32,
    ) -> io::Result<i32> {
        self.fork(move |forker| {
            // SAFETY: the child's live objects are `payload` (whose descriptors stay, see
            // `OwnsFds`) and what `f`, a function capturing nothing, creates later.
            unsafe { close_all_but(&payload.fds()) };
            f(forker, payload)
        })
    }

    /// Runs `f` in a forked child (its exit code is `f`'s return value); returns the
    /// child's pid to the caller, who reaps it. The child never returns from here: it
    /// exits without running the destructors of the caller's frames, whose copies it
    /// holds but does not own.
    fn fork(&self, f: impl FnOnce(&ForkServer) -> i32) -> io::Result<i32> {
        use nix::unistd::{ForkResult, fork};
        // SAFETY: the process has exactly one thread: checked by `init` in the process
        // this permission was made in, and neither it nor its forked children start one.
        match unsafe { fork() }? {
            ForkResult::Parent { child } => Ok(child.as_raw()),
            ForkResult::Child => {
                let code = f(self);
                // `exit` runs no destructor of the stack frames above: the objects there
                // (locks, pipes) belong to the parent.
                std::process::exit(code)
            }
        }
    }
}

/// Threads of this process.
fn thread_count() -> io::Result<u64> {
    crate::sys::procfs::stat(std::process::id() as i32)
        .map(|s| s.threads)
        .ok_or_else(|| io::Error::other("unreadable /proc/self/stat"))
}

/// Closes every descriptor above stderr except those in `keep`.
///
/// # Safety
/// No object of this process that will still be used or dropped may own a descriptor
/// outside `keep`: for a process that has just started (the shim server), or for a forked
/// child whose only live objects are the payload of `ForkServer::fork_with`.
unsafe fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|fd| **fd > 2)
        .map(|fd| *fd as u32)
        .collect();
    keep.sort_unstable();
    let mut from = 3u32;
    for k in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if k > from {
            // SAFETY: guaranteed by the caller. close_range never fails for a valid range.
            unsafe { libc::close_range(from, k - 1, 0) };
        }
        from = k.saturating_add(1);
    }
}

/// What a child forked with `ForkServer::fork_with` owns.
///
/// # Safety
/// `fds` must list every descriptor the value owns, in all its fields: the child closes
/// every other one.
pub unsafe trait OwnsFds {
    fn fds(&self) -> Vec<RawFd>;
}

// SAFETY: `Boot::owned_fds` lists each descriptor a Boot owns: its socket, /proc, the
// container's namespaces (cgroup namespace included) and each plan's working directory;
// its other fields own none.
unsafe impl OwnsFds for super::shim::ns_reaper::Boot {
    fn fds(&self) -> Vec<RawFd> {
        self.owned_fds()
    }
}

// SAFETY: a spare's start owns one descriptor, its socket to the server; its shape none.
unsafe impl OwnsFds for super::shim::server::SpareStart {
    fn fds(&self) -> Vec<RawFd> {
        self.owned_fds()
    }
}

// SAFETY: a shim's request owns two descriptors, the agent's notify pipe and its socket
// to the server; its directory and nonce none.
unsafe impl OwnsFds for super::shim::server::Request {
    fn fds(&self) -> Vec<RawFd> {
        self.owned_fds()
    }
}

/// Takes ownership of a descriptor the kernel just installed in this process through
/// `SCM_RIGHTS`.
///
/// # Safety
/// `fd` must be open and owned by nobody else: it was created by `recvmsg` for the
/// caller a moment ago, and no other `OwnedFd` for it exists.
unsafe fn adopt_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Receives one message (`recvmsg`) on a SOCK_SEQPACKET socket, with up to `MAX_FDS`
/// descriptors attached (close-on-exec); returns its length (0: the peer is gone) and
/// the descriptors, owned.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    const MAX_FDS: usize = 4;
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = c {
                for fd in received {
                    // SAFETY: recvmsg installed `fd` for this call; nothing else knows it.
                    fds.push(unsafe { adopt_received_fd(fd) });
                }
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// Marks every descriptor from 3 up close-on-exec, so that what this process inherited
/// from its caller is not passed on to the processes it starts (the init: its agent and
/// shim server). Its own descriptors are opened close-on-exec anyway.
pub fn cloexec_inherited() -> io::Result<()> {
    // SAFETY: with CLOSE_RANGE_CLOEXEC nothing is closed: only the flag is set, so no
    // descriptor owned elsewhere in the process becomes invalid.
    let r = unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as c_int) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
