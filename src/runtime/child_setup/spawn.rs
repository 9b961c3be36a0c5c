//! Starting a task's process: the plan turned into what the cloned child reads
//! (`ChildArgs`), the vfork-like clone (or `clone3` into a cgroup v2), and the child's
//! failure reported back.

use std::ffi::{CString, c_char, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use super::child::child;
use super::plan::{CapSets, Cwd, ExecPlan, SpawnError, Step};
use super::{clone3, set_mask};

/// Stack of the cloned child until it execs: it makes a few system calls only.
const CHILD_STACK: usize = 64 * 1024;

/// What the cloned child reads: raw pointers into an `ExecPlan` and the stdio fds, all
/// valid while the parent is suspended (CLONE_VFORK), and where it reports failure.
pub(super) struct ChildArgs<'a> {
    pub(super) programs: Vec<*const c_char>,
    pub(super) argv: Vec<*const c_char>,
    pub(super) envp: Vec<*const c_char>,
    pub(super) stdio: [RawFd; 3],
    pub(super) cwd_path: *const c_char,
    pub(super) cwd_fd: RawFd,
    pub(super) creds: Option<(u32, u32, *const u32, usize)>,
    pub(super) caps: Option<CapSets>,
    pub(super) no_new_privs: bool,
    /// `sock_fprog`s of the plan's seccomp filters.
    pub(super) seccomp: Vec<SockFprog>,
    pub(super) nproc: Option<u64>,
    pub(super) announce: Option<(RawFd, &'a [u8], &'a [u8])>,
    /// The spawning process, as the child's `getppid` should name it.
    pub(super) parent: libc::pid_t,
    /// errno of the failed step, written by the child (0: it exec'ed).
    pub(super) errno: AtomicI32,
    pub(super) step: AtomicI32,
}

/// The kernel's `sock_fprog`: a BPF program for `seccomp(SECCOMP_SET_MODE_FILTER)`.
#[repr(C)]
pub(super) struct SockFprog {
    pub(super) len: libc::c_ushort,
    pub(super) filter: *const seccompiler::sock_filter,
}

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
