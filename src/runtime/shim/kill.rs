//! Signalling a task's process tree: every descendant of a subreaper (the shim on the
//! host, the reaper inside the main container), so even setsid'd and double-forked
//! daemons are reached. Each process is signalled through a handle opened on it and
//! checked to be the process the walk saw (same start time), so a pid that was freed and
//! reused between the walk and the signal is never hit.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;

use nix::sys::signal::Signal;

use crate::runtime::proc_handle::ProcHandle;
use crate::runtime::procfs;

/// Sends `sig` to every live descendant of `root` (pids as the /proc at `proc` shows
/// them), except `spare` itself (its descendants are signalled). Returns how many live
/// descendants there were besides `spare`.
pub fn signal_descendants(
    proc: BorrowedFd<'_>,
    root: i32,
    spare: Option<i32>,
    sig: Signal,
) -> usize {
    let mut children: HashMap<i32, Vec<(i32, u64)>> = HashMap::new();
    for pid in procfs::pids_at(proc) {
        if let Some(s) = procfs::stat_at(proc, pid) {
            children
                .entry(s.ppid)
                .or_default()
                .push((pid, s.start_time));
        }
    }
    let mut live = 0;
    let mut stack = vec![root];
    while let Some(parent) = stack.pop() {
        for &(pid, start) in children.get(&parent).into_iter().flatten() {
            stack.push(pid);
            if Some(pid) == spare || pid == root {
                continue;
            }
            let Ok((h, now)) = ProcHandle::open_at(proc, pid) else {
                continue; // gone meanwhile
            };
            if now.start_time != start || now.state == 'Z' {
                continue; // a reused pid, or already dead
            }
            live += 1;
            let _ = h.signal(sig);
        }
    }
    live
}
