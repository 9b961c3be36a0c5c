//! Signalling a task's process tree: every descendant of a subreaper (the shim on the
//! host, the reaper inside the main container), so even setsid'd and double-forked
//! daemons are reached. Each process is signalled through a handle opened on it and
//! checked to be the process the walk saw (a child of the process it was listed under,
//! or the same start time), so a pid that was freed and reused between the walk and the
//! signal is never hit.
//!
//! The walk reads each process's `children` files through its handle, which costs in
//! proportion to the task's tree, not to every process on the node (a node stopping
//! thousands of tasks at once would otherwise read /proc thousands of times over).
//! Without those files (a kernel built without CONFIG_PROC_CHILDREN) it scans /proc once
//! and walks the same way over what the scan found (`Children`): one walk, so both keep
//! its guarantees (checked handles, the whole tree before any signal).

use std::collections::{HashMap, HashSet};
use std::os::fd::BorrowedFd;

use nix::sys::signal::Signal;

use crate::sys::proc_handle::ProcHandle;
use crate::sys::procfs;

/// Sends `sig` to every live descendant of `root` (pids as the /proc at `proc` shows
/// them), except `exempt` itself (its descendants are signalled). Returns how many live
/// descendants there were besides `exempt`.
///
/// `signalled_groups` are process groups the caller has just sent `sig` to: their members
/// are not sent it again (a SIGKILL excepted, which can't be handled twice). A process
/// that handled the group's SIGTERM before the walk reached it would otherwise run its
/// handler twice; one that joined such a group since is left to the grace period's end.
pub fn signal_descendants(
    proc: BorrowedFd<'_>,
    root: i32,
    exempt: Option<i32>,
    sig: Signal,
    signalled_groups: &[i32],
) -> usize {
    signal_subtrees(proc, root, exempt, None, Some(sig), signalled_groups)
}

/// Sends `sig` to every live descendant of the process `root` is a handle of (not to it),
/// whoever its parent is now: what a task's process started, after its shim died.
/// Returns how many there were.
pub fn signal_descendants_of(proc: BorrowedFd<'_>, root: ProcHandle, sig: Signal) -> usize {
    let source = Children::for_tree(proc, &root);
    walk(proc, root, None, None, Some(sig), &source, &[])
}

/// As `signal_descendants`, for only the subtrees whose top (a child of `root` or of
/// `exempt`) is not in `exclude` (pid, start time). A hook's tree is that, with `exclude`
/// the subtree roots that were there when it started: every process the hook started is its
/// descendant, or an orphan adopted by the subreaper since, while what the main command
/// left running (its daemons) was there before. With `sig` `None` it only counts them.
pub fn signal_subtrees(
    proc: BorrowedFd<'_>,
    root: i32,
    exempt: Option<i32>,
    exclude: Option<&[(i32, u64)]>,
    sig: Option<Signal>,
    signalled_groups: &[i32],
) -> usize {
    let Ok((root, _)) = ProcHandle::open_at(proc, root) else {
        return 0;
    };
    let source = Children::for_tree(proc, &root);
    let spared = match sig {
        Some(Signal::SIGKILL) | None => &[][..],
        Some(_) => signalled_groups,
    };
    walk(proc, root, exempt, exclude, sig, &source, spared)
}

/// The roots of the trees under `root` now: its children and `exempt`'s (pid, start time).
pub fn subtree_roots(proc: BorrowedFd<'_>, root: i32, exempt: Option<i32>) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    let mut source = None;
    for parent in std::iter::once(root).chain(exempt) {
        let Ok((h, _)) = ProcHandle::open_at(proc, parent) else {
            continue;
        };
        let source = source.get_or_insert_with(|| Children::for_tree(proc, &h));
        for pid in source.of(&h) {
            if Some(pid) != exempt
                && let Some(st) = procfs::stat_at(proc, pid)
            {
                out.push((pid, st.start_time));
            }
        }
    }
    out
}

/// Where a walk finds a process's children.
enum Children {
    /// Its `children` files, read through its handle.
    Files,
    /// One scan of every process's stat, by parent pid (a kernel without
    /// CONFIG_PROC_CHILDREN).
    Scan(HashMap<i32, Vec<i32>>),
}

impl Children {
    /// The files if the kernel has them (as `root`'s show), else a scan.
    fn for_tree(proc: BorrowedFd<'_>, root: &ProcHandle) -> Children {
        match root.children() {
            Some(_) => Children::Files,
            None => Children::scan(proc),
        }
    }

    fn scan(proc: BorrowedFd<'_>) -> Children {
        let mut by_parent: HashMap<i32, Vec<i32>> = HashMap::new();
        for pid in procfs::pids_at(proc) {
            if let Some(s) = procfs::stat_at(proc, pid) {
                by_parent.entry(s.ppid).or_default().push(pid);
            }
        }
        Children::Scan(by_parent)
    }

    /// The pids listed as `parent`'s children (each to be checked: the list may be old).
    fn of(&self, parent: &ProcHandle) -> Vec<i32> {
        match self {
            Children::Files => parent.children().unwrap_or_default(),
            Children::Scan(by_parent) => by_parent.get(&parent.pid).cloned().unwrap_or_default(),
        }
    }
}

/// Whether a process is in the selected trees: a top (a child of the root or of the
/// spared reaper) unless excluded, any other process as its parent is.
fn selected(
    top: bool,
    parent_selected: bool,
    pid: i32,
    start: u64,
    exclude: Option<&[(i32, u64)]>,
) -> bool {
    if top {
        exclude.is_none_or(|ex| !ex.contains(&(pid, start)))
    } else {
        parent_selected
    }
}

/// Breadth-first from `root`, children as `source` lists them; a child counts when its
/// own stat (read through its handle) names the parent it was listed under, and each pid
/// is taken once. The whole tree is found before anything is signalled, whichever the
/// source (a scan's lists are checked the same way): a parent that dies of the signal leaves its children to the subreaper, where
/// this walk would no longer find them (they would miss a SIGTERM).
fn walk(
    proc: BorrowedFd<'_>,
    root: ProcHandle,
    exempt: Option<i32>,
    exclude: Option<&[(i32, u64)]>,
    sig: Option<Signal>,
    source: &Children,
    spared_groups: &[i32],
) -> usize {
    let root_pid = root.pid;
    let mut seen = HashSet::from([root_pid]);
    // Each process found, whether it is in the selected trees, whether it is to be
    // counted (and signalled), and whether the caller's group signal reached it already.
    let mut tree: Vec<(ProcHandle, bool, bool, bool)> = vec![(root, false, false, false)];
    let mut next = 0;
    while let Some((parent, parent_selected, _, _)) = tree.get(next) {
        let (parent_pid, kids) = (parent.pid, source.of(parent));
        let top = parent_pid == root_pid || Some(parent_pid) == exempt;
        let parent_selected = *parent_selected;
        next += 1;
        for pid in kids {
            if seen.contains(&pid) {
                continue;
            }
            let Ok((h, st)) = ProcHandle::open_at(proc, pid) else {
                continue; // gone meanwhile
            };
            if st.ppid != parent_pid {
                continue; // a reused pid, or re-parented meanwhile (a later round finds it)
            }
            seen.insert(pid);
            if Some(pid) == exempt {
                tree.push((h, false, false, false));
                continue;
            }
            let sel = selected(top, parent_selected, pid, st.start_time, exclude);
            let spared = spared_groups.contains(&st.pgrp);
            tree.push((h, sel, sel && st.state != 'Z', spared));
        }
    }
    let mut live = 0;
    for (h, _, _, spared) in tree.iter().filter(|(_, _, live, _)| *live) {
        live += 1;
        if let Some(sig) = sig.filter(|_| !spared) {
            let _ = h.signal(sig);
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn both_sources_reach_setsid_and_double_forked_descendants() {
        // This test process is not a subreaper: orphans would leave its tree, so the
        // daemons are grandchildren kept under a parent shell that waits.
        for use_scan in [false, true] {
            let script = "setsid sleep 31 & sh -c 'sleep 32 & wait' & wait";
            let (found, n) = kill_all_but_the_shell(script, 4, use_scan);
            assert!(found >= 4, "sh, sleep, sh, sleep: {found}");
            assert_eq!(
                n, 3,
                "every descendant but the spared one (scan: {use_scan})"
            );
        }
    }

    #[test]
    fn a_parent_that_dies_of_the_signal_does_not_hide_its_children() {
        // Eight chains sh → sh → sleep under a spared shell: each inner shell dies of the
        // SIGKILL at once; its sleep must be found all the same (the whole tree is walked
        // before anything is signalled), whichever source lists the children. This process
        // is no subreaper, so a sleep whose parent died first would be out of reach for good.
        for use_scan in [false, true] {
            let script = format!("{} wait", "sh -c 'sleep 34 & wait' &".repeat(8));
            let (found, n) = kill_all_but_the_shell(&script, 17, use_scan);
            assert_eq!(found, 17, "sh and eight sh → sleep chains");
            assert_eq!(
                n, 16,
                "every descendant but the spared shell (scan: {use_scan})"
            );
        }
    }

    #[test]
    fn members_of_a_group_just_signalled_are_not_sent_a_sigterm_twice_but_a_sigkill_is() {
        use std::os::unix::process::CommandExt;
        use std::time::{Duration, Instant};
        // sh leads its own group; `sleep 35` is in it, the setsid'd `sleep 36` is not.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 35 & setsid sleep 36 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let root = sh.id() as i32;
        let proc = std::fs::File::open("/proc").unwrap();
        let until = |n: usize| {
            let t0 = Instant::now();
            while count(proc.as_fd(), root) != n && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            count(proc.as_fd(), root)
        };
        assert_eq!(until(2), 2, "both sleeps started");
        // ... and the second is in its own group already (setsid(1) calls setsid, then
        // execs sleep: seen before that, it would still be in sh's group).
        let (sh_handle, _) = ProcHandle::open_at(proc.as_fd(), root).unwrap();
        let t0 = Instant::now();
        while !sh_handle
            .children()
            .unwrap_or_default()
            .iter()
            .any(|&pid| ProcHandle::open_at(proc.as_fd(), pid).is_ok_and(|(_, st)| st.pgrp == pid))
        {
            assert!(t0.elapsed() < Duration::from_secs(10), "setsid never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let live = signal_descendants(proc.as_fd(), root, None, Signal::SIGTERM, &[root]);
        assert_eq!(live, 2, "both are counted");
        assert_eq!(until(1), 1, "the sleep outside the group got the SIGTERM");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            count(proc.as_fd(), root),
            1,
            "the sleep in the signalled group was not sent it again"
        );
        signal_descendants(proc.as_fd(), root, None, Signal::SIGKILL, &[root]);
        assert_eq!(until(0), 0, "a SIGKILL reaches every member");
        let _ = sh.kill();
        sh.wait().unwrap();
    }

    /// Starts `sh -c script` under this process, waits (10 s at most) until `want` of this
    /// process's descendants live, then SIGKILLs all of them but that shell with one walk
    /// (children from a /proc scan, or from `children` files). Returns how many were found
    /// before, and how many the walk signalled.
    fn kill_all_but_the_shell(script: &str, want: usize, use_scan: bool) -> (usize, usize) {
        let mut sh = std::process::Command::new("sh")
            .args(["-c", script])
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let proc = std::fs::File::open("/proc").unwrap();
        let t0 = std::time::Instant::now();
        let mut found = 0;
        while found < want && t0.elapsed() < std::time::Duration::from_secs(10) {
            found = count(proc.as_fd(), me);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let (h, _) = ProcHandle::open_at(proc.as_fd(), me).unwrap();
        let source = if use_scan {
            Children::scan(proc.as_fd())
        } else {
            Children::Files
        };
        let exempt = Some(sh.id() as i32);
        let n = walk(
            proc.as_fd(),
            h,
            exempt,
            None,
            Some(Signal::SIGKILL),
            &source,
            &[],
        );
        let _ = sh.kill();
        sh.wait().unwrap();
        (found, n)
    }

    fn count(proc: BorrowedFd<'_>, root: i32) -> usize {
        let (h, _) = ProcHandle::open_at(proc, root).unwrap();
        let mut n = 0;
        let mut stack = vec![h];
        while let Some(p) = stack.pop() {
            for pid in p.children().unwrap_or_default() {
                if let Ok((c, st)) = ProcHandle::open_at(proc, pid)
                    && st.state != 'Z'
                {
                    n += 1;
                    stack.push(c);
                }
            }
        }
        n
    }
}
