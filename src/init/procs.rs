//! What the init needs from /proc: its children, and the agent's OOM score.

use std::fs;

/// How much more likely than the init (and the supervisors and tasks, which keep the
/// container's value) the kernel's OOM killer is to pick the agent. In units of a
/// thousandth of the memory the OOM killer weighs against: enough to pick the agent (a few
/// MiB, restarted without loss) before an init or a supervisor of similar size, too little
/// to spare a task that holds a large share of the memory.
pub const AGENT_OOM_SCORE_RAISE: i32 = 100;

/// The pids of the calling process's children (those of each of its threads; the init has
/// one). Falls back to a scan of /proc where the kernel lacks `/proc/PID/task/TID/children`.
pub fn children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let lists: Option<Vec<String>> = fs::read_dir("/proc/self/task").ok().and_then(|tasks| {
        tasks
            .map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
            .collect()
    });
    if let Some(lists) = lists {
        return lists
            .iter()
            .flat_map(|l| l.split_ascii_whitespace())
            .filter_map(|p| p.parse().ok())
            .collect();
    }
    crate::runtime::procfs::pids()
        .into_iter()
        .filter(|&p| crate::runtime::procfs::stat(p).is_some_and(|s| s.ppid == me))
        .collect()
}

/// Makes `pid` (the agent, just started) the OOM killer's preferred victim over the init.
/// Raising a score needs no privilege; an error is returned for the caller to log.
pub fn raise_oom_score(pid: i32) -> std::io::Result<i32> {
    let own: i32 = fs::read_to_string("/proc/self/oom_score_adj")?
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("unreadable /proc/self/oom_score_adj"))?;
    let raised = (own + AGENT_OOM_SCORE_RAISE).min(1000);
    if raised > own {
        fs::write(format!("/proc/{pid}/oom_score_adj"), raised.to_string())?;
    }
    Ok(raised)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_are_listed() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let listed = children().contains(&pid);
        let _ = child.kill();
        let _ = child.wait();
        assert!(listed);
    }
}
