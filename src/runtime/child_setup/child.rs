//! The cloned child of `spawn`: it shares its parent's memory until it execs, so it makes
//! raw system calls only, on what the parent prepared, and allocates nothing.

use std::ffi::{c_int, c_void};
use std::io;
use std::sync::atomic::Ordering;

use super::spawn::{ChildArgs, SockFprog};
use super::{KERNEL_SIGSET, MAX_SIGNAL, default_action};

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
pub(super) extern "C" fn child(arg: *mut c_void) -> c_int {
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
