//! Signalling a task's whole tree: its process group and every descendant of the shim
//! (the shim is a child subreaper, so even double-forked daemons stay its descendants).

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::runtime::procfs;

pub fn signal_tree(main_pgid: Option<i32>, sig: Signal) {
    if let Some(pg) = main_pgid.filter(|p| *p > 1) {
        let _ = killpg(Pid::from_raw(pg), sig);
    }
    let me = std::process::id() as i32;
    for pid in procfs::descendants(me) {
        if pid > 1 && pid != me {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }
}
