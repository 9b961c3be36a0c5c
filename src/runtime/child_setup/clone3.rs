//! `clone3` with `CLONE_INTO_CGROUP`: a task's process born straight into its cgroup.
//!
//! Why by hand: moving the shim into the task's cgroup (a write to `cgroup.procs`) and
//! out again each take the cgroup subsystem's thread-group lock for writing, which waits
//! for an RCU grace period: measured at ~0.9 ms of a task's create→terminated (about a
//! quarter of it) on the bench machine. A process created into the cgroup takes the same
//! lock for reading only. glibc exports no `clone3` wrapper, and a raw `clone3` with
//! `CLONE_VM` returns in the child on the new stack, where no Rust frame may continue: so
//! the system call and the child's first steps are the few instructions below, as in
//! glibc's own `clone`. x86-64 only; elsewhere (and where a seccomp profile refuses
//! `clone3`, as Docker's and containerd's defaults do with ENOSYS) the caller moves the
//! shim into the cgroup instead.

use std::ffi::{c_int, c_void};
use std::os::fd::RawFd;

/// The kernel's `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2, 88 bytes).
#[repr(C)]
#[derive(Default)]
pub(super) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7; the libc crate does not name it).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Clones a process that shares this one's memory (`CLONE_VM`), suspends the caller until
/// it execs or exits (`CLONE_VFORK`), starts it in the cgroup `cgroup` (a cgroup v2
/// directory) and runs `f(arg)` in it on `stack` (`stack_size` bytes, its top 16-byte
/// aligned); the child exits with `f`'s return value. Returns the child's pid, or
/// `-errno`.
///
/// # Safety
/// As `libc::clone` with these flags: `f` may only make raw system calls on data that
/// stays valid while the caller is suspended, and must exec or `_exit`; `stack` must be
/// writable for `stack_size` bytes and used by nothing else meanwhile. Every signal must
/// be blocked in the calling thread, so that no handler runs in the child.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn clone_into_cgroup(
    cgroup: RawFd,
    stack: *mut u8,
    stack_size: usize,
    f: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
) -> i64 {
    let args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack as u64,
        stack_size: stack_size as u64,
        cgroup: cgroup as u64,
        ..CloneArgs::default()
    };
    let ret: i64;
    // SAFETY: `args` lives on this frame across the call. The parent returns from the
    // system call as from any other (only rax, rcx and r11 change: declared). The child
    // starts on `stack` (the kernel sets its stack pointer to the top, 16-byte aligned, so
    // the `call` leaves it as the ABI expects at a function's entry), clears the frame
    // pointer, calls `f(arg)` (r12 and r13 are kept across the system call) and exits with
    // its result: it never returns into Rust code of this frame, whose stack is the
    // parent's.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Elsewhere the caller falls back to moving the shim into the cgroup.
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn clone_into_cgroup(
    _cgroup: RawFd,
    _stack: *mut u8,
    _stack_size: usize,
    _f: extern "C" fn(*mut c_void) -> c_int,
    _arg: *mut c_void,
) -> i64 {
    -(libc::ENOSYS as i64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clone_args_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<super::CloneArgs>(), 88);
    }
}
