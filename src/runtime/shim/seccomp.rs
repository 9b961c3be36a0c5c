//! `seccompProfile: RuntimeDefault` for a task's commands: what containerd's default
//! profile refuses a process without capabilities, as filters built with seccompiler and
//! installed by the task's process just before its exec (`child_setup`).
//!
//! containerd's profile is an allowlist of ~350 system calls with exceptions by
//! capability; for a task (no capability, or the main container's) its effect is the
//! refusals below, which this expresses directly: a denylist, so that a system call newer
//! than this list (allowed by containerd too, as it would be added there) is not broken.
//! Refused with `EPERM`: namespaces (`unshare`, `setns`, `clone` with a `CLONE_NEW*`
//! flag), mounts (`mount`, `umount2`, `pivot_root`, the new mount API), kernel modules,
//! `kexec`, the kernel keyring, `bpf`, `perf_event_open`, `userfaultfd`, reading or
//! writing other processes' memory (`process_vm_*`), file handles, clocks, `reboot`, swap,
//! `acct`, quotas, `syslog`, NUMA policy, `ioperm`/`iopl` and the obsolete ones. `clone3`
//! answers `ENOSYS`, as with containerd, so that libc falls back to `clone` (whose flags
//! a filter can see). On x86-64, the x32 ABI's numbers answer `ENOSYS` (a denylist by
//! number would not see them); a process of another architecture (i386) is killed
//! (seccompiler's architecture check). A FUSE mount (upstream's `preStart` example) needs
//! `mount`: it works only without the filter, i.e. not under `restricted`.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The namespace flags of `clone` (`CLONE_NEWNS`, `CLONE_NEWCGROUP`, `CLONE_NEWUTS`,
/// `CLONE_NEWIPC`, `CLONE_NEWUSER`, `CLONE_NEWPID`, `CLONE_NEWNET`).
const CLONE_NEW: [u64; 7] = [
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

#[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
fn refused() -> Vec<i64> {
    use libc::*;
    let mut calls = vec![
        SYS_acct,
        SYS_add_key,
        SYS_bpf,
        SYS_clock_adjtime,
        SYS_clock_settime,
        SYS_settimeofday,
        SYS_delete_module,
        SYS_finit_module,
        SYS_init_module,
        SYS_fanotify_init,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fsopen,
        SYS_fspick,
        SYS_move_mount,
        SYS_open_tree,
        SYS_mount,
        SYS_mount_setattr,
        SYS_umount2,
        SYS_pivot_root,
        SYS_get_mempolicy,
        SYS_set_mempolicy,
        SYS_mbind,
        SYS_move_pages,
        SYS_kcmp,
        SYS_kexec_file_load,
        SYS_kexec_load,
        SYS_keyctl,
        SYS_request_key,
        SYS_lookup_dcookie,
        SYS_name_to_handle_at,
        SYS_open_by_handle_at,
        SYS_perf_event_open,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_quotactl,
        SYS_reboot,
        SYS_setns,
        SYS_unshare,
        SYS_swapon,
        SYS_swapoff,
        SYS_syslog,
        SYS_userfaultfd,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        SYS_ioperm,
        SYS_iopl,
        SYS_nfsservctl,
        SYS__sysctl,
        SYS_sysfs,
        SYS_ustat,
        SYS_uselib,
    ]);
    calls
}

fn arch() -> io::Result<TargetArch> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(io::Error::other(
            "seccompProfile RuntimeDefault: no filter for this architecture",
        ))
    }
}

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("building the seccomp filter: {e}"))
}

/// The filters of `RuntimeDefault`, in the order they are installed.
pub fn runtime_default() -> io::Result<Vec<BpfProgram>> {
    let arch = arch()?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        refused().into_iter().map(|n| (n, Vec::new())).collect();
    let mut namespaced = Vec::new();
    for flag in CLONE_NEW {
        let c = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(err)?;
        namespaced.push(SeccompRule::new(vec![c]).map_err(err)?);
    }
    denied.insert(libc::SYS_clone, namespaced);
    let eperm = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    let enosys = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    let mut enosys: BpfProgram = enosys.try_into().map_err(err)?;
    if cfg!(target_arch = "x86_64") {
        no_x32(&mut enosys);
    }
    Ok(vec![eperm.try_into().map_err(err)?, enosys])
}

/// Inserts, right after seccompiler's architecture check (its first three statements:
/// load the architecture, jump over the kill when it matches, kill), a check that answers
/// the x32 ABI's system calls (numbers with bit 30 set) with `ENOSYS`. Hand-written BPF:
/// seccompiler matches exact numbers only, and no jump crosses the insertion point.
fn no_x32(prog: &mut BpfProgram) {
    use seccompiler::sock_filter;
    // BPF_LD | BPF_W | BPF_ABS (0x00 | 0x00 | 0x20).
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
    const BPF_RET_K: u16 = 0x06;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let check = [
        // seccomp_data.nr is at offset 0.
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: BPF_JMP_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
    ];
    let at = 3.min(prog.len());
    prog.splice(at..at, check);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_build() {
        let f = runtime_default().unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }
}
