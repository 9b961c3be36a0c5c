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
//! Without those files (a kernel built without CONFIG_PROC_CHILDREN) it scans /proc.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;

use nix::sys::signal::Signal;

use crate::sys::proc_handle::ProcHandle;
use crate::sys::procfs;

/// Sends `sig` to every live descendant of `root` (pids as the /proc at `proc` shows
/// them), except `spare` itself (its descendants are signalled). Returns how many live
/// descendants there were besides `spare`.
pub fn signal_descendants(
    proc: BorrowedFd<'_>,
    root: i32,
    spare: Option<i32>,
    sig: Signal,
) -> usize {
    signal_subtrees(proc, root, spare, None, Some(sig))
}

/// Sends `sig` to every live descendant of the process `root` is a handle of (not to it),
/// whoever its parent is now: what a task's process started, after its shim died.
/// Returns how many there were.
pub fn signal_descendants_of(proc: BorrowedFd<'_>, root: ProcHandle, sig: Signal) -> usize {
    match root.children() {
        Some(_) => walk_children(proc, root, None, None, Some(sig)),
        None => walk_scan(proc, root.pid, None, None, Some(sig)),
    }
}

/// As `signal_descendants`, for only the subtrees whose top (a child of `root` or of
/// `spare`) is not in `exclude` (pid, start time). A hook's tree is that, with `exclude`
/// the tops that were there when it started: every process the hook started is its
/// descendant, or an orphan adopted by the subreaper since, while what the main command
/// left running (its daemons) was there before. With `sig` `None` it only counts them.
pub fn signal_subtrees(
    proc: BorrowedFd<'_>,
    root: i32,
    spare: Option<i32>,
    exclude: Option<&[(i32, u64)]>,
    sig: Option<Signal>,
) -> usize {
    let Ok((root_handle, _)) = ProcHandle::open_at(proc, root) else {
        return 0;
    };
    match root_handle.children() {
        Some(_) => walk_children(proc, root_handle, spare, exclude, sig),
        None => walk_scan(proc, root, spare, exclude, sig),
    }
}

/// The tops of the trees under `root` now: its children and `spare`'s (pid, start time).
pub fn tops(proc: BorrowedFd<'_>, root: i32, spare: Option<i32>) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    for parent in std::iter::once(root).chain(spare) {
        let kids = match ProcHandle::open_at(proc, parent) {
            Ok((h, _)) => h.children(),
            Err(_) => continue,
        };
        let kids = kids.unwrap_or_else(|| {
            procfs::pids_at(proc)
                .into_iter()
                .filter(|p| procfs::stat_at(proc, *p).is_some_and(|s| s.ppid == parent))
                .collect()
        });
        for pid in kids {
            if Some(pid) != spare
                && let Some(st) = procfs::stat_at(proc, pid)
            {
                out.push((pid, st.start_time));
            }
        }
    }
    out
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

/// Through `children` files, breadth-first; a child counts when its own stat (read
/// through its handle) names the parent it was listed under. The whole tree is found
/// before anything is signalled: a parent that dies of the signal leaves its children to
/// the subreaper, where this walk would no longer find them (they would miss a SIGTERM).
fn walk_children(
    proc: BorrowedFd<'_>,
    root: ProcHandle,
    spare: Option<i32>,
    exclude: Option<&[(i32, u64)]>,
    sig: Option<Signal>,
) -> usize {
    let root_pid = root.pid;
    // Each process found, whether it is in the selected trees, and whether it is to be
    // signalled.
    let mut tree: Vec<(ProcHandle, bool, bool)> = vec![(root, false, false)];
    let mut next = 0;
    while let Some((parent, parent_selected, _)) = tree.get(next) {
        let (parent_pid, kids) = (parent.pid, parent.children().unwrap_or_default());
        let top = parent_pid == root_pid || Some(parent_pid) == spare;
        let parent_selected = *parent_selected;
        next += 1;
        for pid in kids {
            let Ok((h, st)) = ProcHandle::open_at(proc, pid) else {
                continue; // gone meanwhile
            };
            if st.ppid != parent_pid {
                continue; // a reused pid, or re-parented meanwhile (a later round finds it)
            }
            if Some(pid) == spare {
                tree.push((h, false, false));
                continue;
            }
            let sel = selected(top, parent_selected, pid, st.start_time, exclude);
            tree.push((h, sel, sel && st.state != 'Z'));
        }
    }
    let mut live = 0;
    for (h, _, _) in tree.iter().filter(|(_, _, signal)| *signal) {
        live += 1;
        if let Some(sig) = sig {
            let _ = h.signal(sig);
        }
    }
    live
}

/// The same from one scan of every process's stat.
fn walk_scan(
    proc: BorrowedFd<'_>,
    root: i32,
    spare: Option<i32>,
    exclude: Option<&[(i32, u64)]>,
    sig: Option<Signal>,
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
    let mut stack = vec![(root, false)];
    while let Some((parent, parent_selected)) = stack.pop() {
        let top = parent == root || Some(parent) == spare;
        for &(pid, start) in children.get(&parent).into_iter().flatten() {
            if Some(pid) == spare || pid == root {
                stack.push((pid, false));
                continue;
            }
            let sel = selected(top, parent_selected, pid, start, exclude);
            stack.push((pid, sel));
            if !sel {
                continue;
            }
            let Ok((h, now)) = ProcHandle::open_at(proc, pid) else {
                continue; // gone meanwhile
            };
            if now.start_time != start || now.state == 'Z' {
                continue; // a reused pid, or already dead
            }
            live += 1;
            if let Some(sig) = sig {
                let _ = h.signal(sig);
            }
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn both_walks_reach_setsid_and_double_forked_descendants() {
        // This test process is not a subreaper: orphans would leave its tree, so the
        // daemons are grandchildren kept under a parent shell that waits.
        for use_scan in [false, true] {
            let mut sh = std::process::Command::new("sh")
                .args(["-c", "setsid sleep 31 & sh -c 'sleep 32 & wait' & wait"])
                .spawn()
                .unwrap();
            let me = std::process::id() as i32;
            let proc = std::fs::File::open("/proc").unwrap();
            // Until both sleeps (and the inner shell) exist.
            let t0 = std::time::Instant::now();
            let mut found = 0;
            while found < 4 && t0.elapsed() < std::time::Duration::from_secs(10) {
                found = count(proc.as_fd(), me);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(found >= 4, "sh, sleep, sh, sleep: {found}");
            let (h, _) = ProcHandle::open_at(proc.as_fd(), me).unwrap();
            let n = if use_scan {
                walk_scan(
                    proc.as_fd(),
                    me,
                    Some(sh.id() as i32),
                    None,
                    Some(Signal::SIGKILL),
                )
            } else {
                walk_children(
                    proc.as_fd(),
                    h,
                    Some(sh.id() as i32),
                    None,
                    Some(Signal::SIGKILL),
                )
            };
            assert_eq!(
                n, 3,
                "every descendant but the spared one (scan: {use_scan})"
            );
            let _ = sh.kill();
            sh.wait().unwrap();
        }
    }

    #[test]
    fn a_parent_that_dies_of_the_signal_does_not_hide_its_children() {
        // Eight chains sh → sh → sleep under a spared shell: each inner shell dies of the
        // SIGKILL at once; its sleep must be found all the same (the whole tree is walked
        // before anything is signalled). This process is no subreaper, so a sleep whose
        // parent died first would be out of reach for good.
        let chain = "sh -c 'sleep 34 & wait' &";
        let script = format!("{} wait", chain.repeat(8));
        let mut sh = std::process::Command::new("sh")
            .args(["-c", &script])
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let proc = std::fs::File::open("/proc").unwrap();
        let t0 = std::time::Instant::now();
        let mut found = 0;
        while found < 17 && t0.elapsed() < std::time::Duration::from_secs(10) {
            found = count(proc.as_fd(), me);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(found, 17, "sh and eight sh → sleep chains");
        let (h, _) = ProcHandle::open_at(proc.as_fd(), me).unwrap();
        let n = walk_children(
            proc.as_fd(),
            h,
            Some(sh.id() as i32),
            None,
            Some(Signal::SIGKILL),
        );
        let _ = sh.kill();
        sh.wait().unwrap();
        assert_eq!(n, 16, "every descendant but the spared shell");
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
