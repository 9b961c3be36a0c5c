//! What the init needs to know of processes: its children, how they ended, and the
//! agent's OOM score.

use std::fs;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// How much more likely than the init (and the supervisors and tasks, which keep the
/// container's value) the kernel's OOM killer is to pick the agent. In units of a
/// thousandth of the memory the OOM killer weighs against: enough to pick the agent (a few
/// MiB, restarted without loss) before an init or a supervisor of similar size, too little
/// to spare a task that holds a large share of the memory.
pub const AGENT_OOM_SCORE_RAISE: i32 = 100;

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

/// How a child ended, as a shell and Kubernetes report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal.
    pub code: i32,
    pub signal: Option<Signal>,
}

impl Exit {
    pub fn of(ws: WaitStatus) -> Option<(Pid, Exit)> {
        match ws {
            WaitStatus::Exited(pid, code) => Some((pid, Exit { code, signal: None })),
            WaitStatus::Signaled(pid, sig, _) => Some((
                pid,
                Exit {
                    code: 128 + sig as i32,
                    signal: Some(sig),
                },
            )),
            _ => None,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.signal {
            Some(s) => write!(f, "killed by {}", s.as_str()),
            None => write!(f, "exit code {}", self.code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_as_a_shell_reports_them() {
        let p = Pid::from_raw(7);
        let code = Exit::of(WaitStatus::Exited(p, 3)).unwrap().1;
        assert_eq!((code.code, code.to_string().as_str()), (3, "exit code 3"));
        let killed = Exit::of(WaitStatus::Signaled(p, Signal::SIGKILL, false))
            .unwrap()
            .1;
        assert_eq!(
            (killed.code, killed.to_string().as_str()),
            (137, "killed by SIGKILL")
        );
        assert!(Exit::of(WaitStatus::StillAlive).is_none());
    }
}
