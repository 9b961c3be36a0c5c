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
//! - `recv_with_fds`, `close_all_but`: descriptor ownership and hygiene.
#![allow(unsafe_code)]

mod clone3;

use std::ffi::{CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{SigHandler, Signal, signal};

/// The highest signal number on Linux (SIGRTMAX).
const MAX_SIGNAL: c_int = 64;

/// Stack of the cloned child until it execs: it makes a few system calls only.
const CHILD_STACK: usize = 64 * 1024;

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

/// Where a task's process starts.
pub enum Cwd {
    /// The caller's own working directory.
    Inherit,
    /// A path, resolved by the child (inside the main container for sidecar tasks).
    Path(CString),
    /// An open directory (the main container's working directory).
    Fd(OwnedFd),
}

/// The identity a task's process takes before exec.
#[derive(Clone, Debug, PartialEq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, exactly (empty: none).
    pub groups: Vec<u32>,
    /// Capability sets to take with the ids (a sidecar task takes the main container's);
    /// `None`: what the kernel leaves after the id change (none for a non-root uid).
    pub caps: Option<CapSets>,
}

pub use crate::sys::procfs::CapSets;

/// Everything a task's process needs up to its exec, prepared by the caller: the child
/// only makes system calls on it, and allocates nothing.
pub struct ExecPlan {
    /// Paths to try in order: execvp's search, done by the child after it changed its
    /// directory and identity, so relative entries and permissions are the task's.
    programs: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Cwd,
    creds: Option<Creds>,
    /// Set `no_new_privs` before exec: setuid binaries and file capabilities grant
    /// nothing.
    no_new_privs: bool,
    /// Seccomp filters installed just before exec, in order (see `shim::seccomp`).
    seccomp: Vec<seccompiler::BpfProgram>,
    /// `RLIMIT_NPROC` (soft and hard), set before the identity change: the most processes
    /// (threads) the uid it takes may have.
    nproc: Option<u64>,
}

/// The step at which a task's process could not be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Changing into the working directory.
    WorkingDir,
    /// Process group, stdio, signals.
    Setup,
    /// Taking the task's identity (ids, groups, capabilities, `no_new_privs`).
    Identity,
    /// The program itself (not found: ENOENT, not executable: EACCES, ...).
    Exec,
    /// Creating the process.
    Clone,
}

#[derive(Debug)]
pub struct SpawnError {
    pub step: Step,
    pub error: io::Error,
}

impl ExecPlan {
    /// `program` is either a path (tried as is) or a name looked up in `search_path`
    /// (the task's PATH, colon-separated; empty entries are the working directory).
    pub fn new(
        program: &[u8],
        search_path: &[u8],
        argv: Vec<CString>,
        envp: Vec<CString>,
        cwd: Cwd,
        creds: Option<Creds>,
        no_new_privs: bool,
    ) -> io::Result<ExecPlan> {
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "a path contains a NUL byte");
        let programs = if program.is_empty() {
            Vec::new() // like execvp: ENOENT
        } else if program.contains(&b'/') {
            vec![CString::new(program).map_err(nul)?]
        } else {
            search_path
                .split(|b| *b == b':')
                .map(|dir| {
                    let mut p = if dir.is_empty() {
                        b".".to_vec()
                    } else {
                        dir.to_vec()
                    };
                    p.push(b'/');
                    p.extend_from_slice(program);
                    CString::new(p).map_err(nul)
                })
                .collect::<io::Result<_>>()?
        };
        Ok(ExecPlan {
            programs,
            argv,
            envp,
            cwd,
            creds,
            no_new_privs,
            seccomp: Vec::new(),
            nproc: None,
        })
    }

    /// Limits the processes of the uid the plan runs as (`RLIMIT_NPROC`, soft and hard).
    pub fn with_nproc(mut self, nproc: Option<u64>) -> Self {
        self.nproc = nproc;
        self
    }

    /// Installs these seccomp filters just before exec (needs `no_new_privs`).
    pub fn with_seccomp(mut self, filters: Vec<seccompiler::BpfProgram>) -> Self {
        self.seccomp = filters;
        self
    }
}

impl ExecPlan {
    /// Descriptors the plan holds (a working directory), which a process that keeps the
    /// plan must keep open.
    pub fn fds(&self) -> Vec<RawFd> {
        match &self.cwd {
            Cwd::Fd(fd) => vec![fd.as_raw_fd()],
            _ => Vec::new(),
        }
    }
}

/// What the cloned child reads: raw pointers into an `ExecPlan` and the stdio fds, all
/// valid while the parent is suspended (CLONE_VFORK), and where it reports failure.
struct ChildArgs<'a> {
    programs: Vec<*const c_char>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    stdio: [RawFd; 3],
    cwd_path: *const c_char,
    cwd_fd: RawFd,
    creds: Option<(u32, u32, *const u32, usize)>,
    caps: Option<CapSets>,
    no_new_privs: bool,
    /// `sock_fprog`s of the plan's seccomp filters.
    seccomp: Vec<SockFprog>,
    nproc: Option<u64>,
    announce: Option<(RawFd, &'a [u8], &'a [u8])>,
    /// The spawning process, as the child's `getppid` should name it.
    parent: libc::pid_t,
    /// errno of the failed step, written by the child (0: it exec'ed).
    errno: AtomicI32,
    step: AtomicI32,
}

/// The kernel's `sock_fprog`: a BPF program for `seccomp(SECCOMP_SET_MODE_FILTER)`.
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const seccompiler::sock_filter,
}

/// The kernel's `__user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

/// The kernel's `__user_cap_data_struct`; version 3 takes two (capabilities 0-31, 32-63).
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn null_terminated(v: &[CString]) -> Vec<*const c_char> {
    v.iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Where a new process names itself before it execs: one line appended to `journal`,
/// `head`, its identity as `{"pid":N,"startTime":T}` (from its own `/proc/self/stat`),
/// `tail`. The child writes it, not the parent: a parent killed during the clone can't
/// leave the process running unnamed, and the process runs nothing of its own before the
/// line is written (a line that can't be written fails the spawn, with its errno).
pub struct Announce<'a> {
    pub journal: BorrowedFd<'a>,
    pub head: &'a [u8],
    pub tail: &'a [u8],
}

/// The announcement line from the text of `/proc/self/stat` into `out`; its length, or
/// `None` if the text is not a stat line or `out` is too small. Runs in the cloned child:
/// no allocation, no panic (checked slicing only).
fn announcement(
    stat: &[u8],
    pidfd_ino: Option<u64>,
    head: &[u8],
    tail: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let digits = |f: &[u8]| !f.is_empty() && f.iter().all(u8::is_ascii_digit);
    let pid = stat.split(|b| *b == b' ').next().filter(|f| digits(f))?;
    let close = stat.iter().rposition(|b| *b == b')')?;
    // Field 22 (start time): the 20th after the `)` that ends the command name.
    let start = stat
        .get(close.checked_add(1)?..)?
        .split(|b| *b == b' ')
        .filter(|f| !f.is_empty())
        .nth(19)
        .filter(|f| digits(f))?;
    // The inode in decimal, on the stack.
    let mut digits_buf = [0u8; 20];
    let mut at = digits_buf.len();
    if let Some(mut n) = pidfd_ino {
        loop {
            at -= 1;
            digits_buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
    }
    let (ino_key, ino): (&[u8], &[u8]) = match pidfd_ino {
        Some(_) => (b",\"pidfdIno\":", &digits_buf[at..]),
        None => (b"", b""),
    };
    let mut len = 0usize;
    for part in [
        head,
        b"{\"pid\":",
        pid,
        b",\"startTime\":",
        start,
        ino_key,
        ino,
        b"}",
        tail,
    ] {
        let end = len.checked_add(part.len())?;
        out.get_mut(len..end)?.copy_from_slice(part);
        len = end;
    }
    Some(len)
}

/// Starts `plan` as a new process with stdin/stdout/stderr from `stdio`, in a process
/// group of its own, with every signal at its default action and none blocked; with
/// `announce`, the process first names itself there. Returns its pid; the caller reaps
/// it. On failure nothing is left running (a child that failed after the clone is reaped
/// here).
pub fn fork_exec(
    plan: &ExecPlan,
    stdio: [BorrowedFd<'_>; 3],
    announce: Option<Announce<'_>>,
) -> Result<i32, SpawnError> {
    spawn(plan, stdio, announce, None)
}

/// `fork_exec`, with the process born in the cgroup v2 directory `cgroup` (opened
/// `O_PATH`): nothing moves the caller in and out of it (see `clone3`). A `Step::Clone`
/// error with ENOSYS, EPERM, E2BIG or EINVAL means this can't be done here (another
/// architecture, a kernel before 5.7, a seccomp profile that refuses `clone3`): nothing
/// was started, and the caller may enter the cgroup itself and use `fork_exec`.
pub fn fork_exec_into(
    plan: &ExecPlan,
    stdio: [BorrowedFd<'_>; 3],
    announce: Option<Announce<'_>>,
    cgroup: BorrowedFd<'_>,
) -> Result<i32, SpawnError> {
    spawn(plan, stdio, announce, Some(cgroup.as_raw_fd()))
}

/// Whether a `fork_exec_into` failure says only that a process can't be created into a
/// cgroup here (see there).
pub fn into_cgroup_unsupported(e: &SpawnError) -> bool {
    e.step == Step::Clone
        && matches!(
            e.error.raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM | libc::E2BIG | libc::EINVAL)
        )
}

fn spawn(
    plan: &ExecPlan,
    stdio: [BorrowedFd<'_>; 3],
    announce: Option<Announce<'_>>,
    cgroup: Option<RawFd>,
) -> Result<i32, SpawnError> {
    let fail = |step, error| SpawnError { step, error };
    // The child dup2's these onto 0..2: a source already there would keep its
    // close-on-exec flag, and a later dup2 could overwrite an earlier source.
    let stdio = stdio.map(|fd| fd.as_raw_fd());
    if stdio.iter().any(|fd| *fd <= 2) {
        return Err(fail(
            Step::Setup,
            io::Error::new(io::ErrorKind::InvalidInput, "stdio sources must be above 2"),
        ));
    }
    let (cwd_path, cwd_fd) = match &plan.cwd {
        Cwd::Inherit => (std::ptr::null(), -1),
        Cwd::Path(p) => (p.as_ptr(), -1),
        Cwd::Fd(fd) => (std::ptr::null(), fd.as_raw_fd()),
    };
    let args = ChildArgs {
        programs: plan.programs.iter().map(|p| p.as_ptr()).collect(),
        argv: null_terminated(&plan.argv),
        envp: null_terminated(&plan.envp),
        stdio,
        cwd_path,
        cwd_fd,
        creds: plan
            .creds
            .as_ref()
            .map(|c| (c.uid, c.gid, c.groups.as_ptr(), c.groups.len())),
        caps: plan.creds.as_ref().and_then(|c| c.caps),
        no_new_privs: plan.no_new_privs,
        seccomp: plan
            .seccomp
            .iter()
            .map(|p| SockFprog {
                len: p.len() as libc::c_ushort,
                filter: p.as_ptr(),
            })
            .collect(),
        nproc: plan.nproc,
        announce: announce.map(|a| (a.journal.as_raw_fd(), a.head, a.tail)),
        parent: std::process::id() as libc::pid_t,
        errno: AtomicI32::new(0),
        step: AtomicI32::new(0),
    };
    // Uninitialised: the child writes before it reads, as any stack is used.
    let mut stack = Box::<[std::mem::MaybeUninit<u8>]>::new_uninit_slice(CHILD_STACK);
    let base = stack.as_mut_ptr() as *mut u8;
    // SAFETY: in bounds (one past the end is allowed); aligned down to 16 below, as both
    // x86-64 and arm64 require of a stack pointer.
    let top = unsafe { base.add(CHILD_STACK) };
    let top = (top as usize & !15) as *mut c_void;

    // No handler may run in the child while it shares our memory: block every signal
    // (the child starts with this mask and clears it just before exec).
    let old = set_mask(u64::MAX).map_err(|e| fail(Step::Clone, e))?;
    let arg = &args as *const ChildArgs<'_> as *mut c_void;
    let (pid, clone_error) = match cgroup {
        None => {
            // SAFETY: `child` only makes raw system calls on `args`, which outlives the
            // call: with CLONE_VFORK this thread is suspended until the child execs or
            // exits, so `args`, `plan` and `stack` stay valid and untouched meanwhile.
            // Without CLONE_SIGHAND the child's signal actions are its own; without
            // CLONE_THREAD it is a process of its own, reaped through SIGCHLD like any
            // child.
            let pid = unsafe {
                libc::clone(
                    child,
                    top,
                    libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                    arg,
                )
            };
            (pid, io::Error::last_os_error())
        }
        Some(cg) => {
            // SAFETY: as above; the stack is `base` up to `top` (the kernel starts the
            // child at `base + size`), every signal is blocked.
            let r = unsafe {
                clone3::clone_into_cgroup(cg, base, top as usize - base as usize, child, arg)
            };
            if r < 0 {
                (-1, io::Error::from_raw_os_error(-r as i32))
            } else {
                (r as libc::pid_t, io::Error::from_raw_os_error(0))
            }
        }
    };
    let _ = set_mask(old);
    drop(stack);
    if pid < 0 {
        return Err(fail(Step::Clone, clone_error));
    }
    let errno = args.errno.load(Ordering::SeqCst);
    if errno != 0 {
        // The child exited without exec'ing: reap it now, nothing else will.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let step = match args.step.load(Ordering::SeqCst) {
            1 => Step::WorkingDir,
            2 => Step::Setup,
            4 => Step::Identity,
            _ => Step::Exec,
        };
        return Err(fail(step, io::Error::from_raw_os_error(errno)));
    }
    Ok(pid)
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

/// In the cloned child, after its identity change (which clears the setting): it is
/// SIGKILLed when its supervisor dies, and it goes no further if the supervisor died
/// already (it was re-parented: nobody would name, watch or stop it). The setting lasts
/// across exec (but not a set-user-ID one), so a task's main process ends with its
/// supervisor. `getppid` reads 0 where the parent is outside the child's PID namespace:
/// the death signal stands for the check there.
///
/// # Safety
/// Raw system calls only, in the child of `fork_exec`.
unsafe fn die_with_parent(parent: libc::pid_t) -> bool {
    // SAFETY: plain system calls with integer arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return false;
        }
        let ppid = libc::syscall(libc::SYS_getppid) as libc::pid_t;
        ppid == parent || ppid == 0
    }
}

/// The inode of a pidfd of the calling process where pidfds live on pidfs (see
/// `procfs::pidfs_inode`); `None` on older kernels or when it can't be had.
///
/// # Safety
/// Raw system calls only, in the child of `fork_exec`.
unsafe fn own_pidfd_inode() -> Option<u64> {
    // SAFETY: plain system calls; the structs written into are on this stack.
    unsafe {
        let pid = libc::syscall(libc::SYS_getpid);
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as c_int;
        if fd < 0 {
            return None;
        }
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut st: libc::stat = std::mem::zeroed();
        let ok = libc::fstatfs(fd, &mut fs) == 0
            && fs.f_type as u64 == crate::sys::procfs::PIDFS_MAGIC
            && libc::fstat(fd, &mut st) == 0;
        libc::close(fd);
        ok.then_some(st.st_ino as u64)
    }
}

/// The cloned child: set up and exec, or record why not and exit. Raw system calls only,
/// no allocation, no lock, no panic: it shares the parent's memory.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points to the `ChildArgs` of `fork_exec`, alive while the parent waits.
    let a = unsafe { &*(arg as *const ChildArgs<'_>) };
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    };
    let fail = |step: i32, e: i32| -> c_int {
        a.step.store(step, Ordering::SeqCst);
        a.errno.store(e, Ordering::SeqCst);
        // SAFETY: _exit ends this process (not the parent: no CLONE_THREAD).
        unsafe { libc::_exit(127) }
    };
    // SAFETY (for the block): each call is a plain system call on descriptors, ids and
    // NUL-terminated strings prepared by the parent and valid while it is suspended. The
    // raw syscalls for identities avoid glibc's wrappers, which would try to reach the
    // parent's threads. Buffers read into or written from are arrays on this stack, with
    // their own lengths.
    unsafe {
        for sig in 1..=MAX_SIGNAL {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                default_action(sig);
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(2, errno());
        }
        if let Some((journal, head, tail)) = a.announce {
            // On this (suspended) stack, as everything the child uses.
            let mut stat = [0u8; 1024];
            let mut line = [0u8; 512];
            let fd = libc::open(
                c"/proc/self/stat".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return fail(2, errno());
            }
            let n = libc::read(fd, stat.as_mut_ptr() as *mut c_void, stat.len());
            let read_errno = errno();
            libc::close(fd);
            if n <= 0 {
                return fail(2, if n < 0 { read_errno } else { libc::EIO });
            }
            let ino = own_pidfd_inode();
            let Some(len) = stat
                .get(..n as usize)
                .and_then(|text| announcement(text, ino, head, tail, &mut line))
            else {
                return fail(2, libc::EINVAL);
            };
            let wrote = libc::write(journal, line.as_ptr() as *const c_void, len);
            if wrote != len as isize {
                let e = if wrote < 0 { errno() } else { libc::ENOSPC };
                // A torn line must not swallow the next one: end it (best effort).
                if wrote > 0 {
                    libc::write(journal, b"\n".as_ptr() as *const c_void, 1);
                }
                return fail(2, e);
            }
        }
        for (target, source) in a.stdio.iter().enumerate() {
            if libc::dup2(*source, target as c_int) < 0 {
                return fail(2, errno());
            }
        }
        if let Some(caps) = &a.caps {
            // Keep the permitted set across the uid change, so that capset can pick the
            // sets below; the bounding set first, as dropping needs CAP_SETPCAP. Only
            // capabilities present are dropped (dropping an absent one needs it too).
            if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
                return fail(4, errno());
            }
            for cap in 0..64 {
                if caps.bounding & (1 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) == 1
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                {
                    return fail(4, errno());
                }
            }
        }
        if let Some(n) = a.nproc {
            // Before the uid changes: counted from then on (and a uid already over it
            // can't exec).
            let lim = libc::rlimit64 {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::syscall(
                libc::SYS_prlimit64,
                0,
                libc::RLIMIT_NPROC,
                &lim as *const libc::rlimit64,
                std::ptr::null_mut::<libc::rlimit64>(),
            ) != 0
            {
                return fail(4, errno());
            }
        }
        if let Some((uid, gid, groups, n)) = a.creds
            && (libc::syscall(libc::SYS_setgroups, n, groups) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0)
        {
            return fail(4, errno());
        }
        if let Some(caps) = &a.caps {
            let header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let half = |set: u64, hi: bool| (if hi { set >> 32 } else { set }) as u32;
            let data = [false, true].map(|hi| CapData {
                effective: half(caps.effective, hi),
                permitted: half(caps.permitted, hi),
                inheritable: half(caps.inheritable, hi),
            });
            if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0
                || libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                ) != 0
            {
                return fail(4, errno());
            }
            for cap in 0..64 {
                if caps.ambient & (1 << cap) != 0
                    && libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0
                {
                    return fail(4, errno());
                }
            }
            if libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0 {
                return fail(4, errno());
            }
        }
        if a.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail(4, errno());
        }
        if !die_with_parent(a.parent) {
            return fail(2, libc::ESRCH);
        }
        for prog in &a.seccomp {
            // SECCOMP_SET_MODE_FILTER (1), no flags; `prog` points into the plan.
            if libc::syscall(libc::SYS_seccomp, 1, 0, prog as *const SockFprog) != 0 {
                return fail(4, errno());
            }
        }
        if !a.cwd_path.is_null() && libc::chdir(a.cwd_path) != 0 {
            return fail(1, errno());
        }
        if a.cwd_fd >= 0 && libc::fchdir(a.cwd_fd) != 0 {
            return fail(1, errno());
        }
        let none: u64 = 0;
        if libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &none as *const u64,
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET,
        ) != 0
        {
            return fail(2, errno());
        }
        // execvp's search: a candidate that is missing moves on, one that exists but
        // can't be run is remembered, anything else stops the search.
        let mut result = libc::ENOENT;
        let mut denied = false;
        for program in &a.programs {
            libc::execve(*program, a.argv.as_ptr(), a.envp.as_ptr());
            match errno() {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                e => {
                    result = e;
                    break;
                }
            }
        }
        if denied && result == libc::ENOENT {
            result = libc::EACCES;
        }
        fail(3, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::journal::{self, Entry};
    use crate::sys::procfs::ProcIdentity;
    use crate::task::model::HookName;

    #[test]
    fn the_announcement_is_a_journal_line_of_the_process() {
        // A command name with spaces and parentheses, as /proc shows it.
        let stat =
            b"4242 (a) b) 9) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 0 0\n";
        let mut out = [0u8; 256];
        for hook in [None, Some(HookName::PreStart), Some(HookName::PostStop)] {
            let head = journal::spawned_head(hook);
            let n = announcement(stat, None, &head, journal::SPAWNED_TAIL, &mut out).unwrap();
            let (line, end) = out[..n].split_at(n - 1);
            assert_eq!(end, b"\n");
            match serde_json::from_slice::<Entry>(line).unwrap() {
                Entry::Spawned(s) => assert_eq!(
                    (s.hook, s.process),
                    (hook, ProcIdentity::without_inode(4242, 98765))
                ),
                other => panic!("{other:?}"),
            }
        }
        let head = journal::spawned_head(None);
        let tail = journal::SPAWNED_TAIL;
        assert_eq!(announcement(stat, None, &head, tail, &mut [0u8; 16]), None);
        assert_eq!(
            announcement(b"4242 (a) S 1", None, &head, tail, &mut out),
            None
        );
        assert_eq!(announcement(b"", None, &head, tail, &mut out), None);
        // With the pidfd inode (pidfs), up to u64's largest.
        for ino in [0, 7, u64::MAX] {
            let n = announcement(stat, Some(ino), &head, tail, &mut out).unwrap();
            match serde_json::from_slice::<Entry>(&out[..n - 1]).unwrap() {
                Entry::Spawned(s) => assert_eq!(s.process.pidfd_ino, Some(ino)),
                other => panic!("{other:?}"),
            }
        }
    }
}
