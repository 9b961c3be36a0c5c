//! Runs `task-executor init` with the real agent under it, on a temp data dir and a free
//! loopback port, as a container's entrypoint would, but on the bare machine.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::agent::{Agent, BIN, free_addr};
use super::http;
use super::wait_for;

pub struct Init {
    /// The agent under the init, reached over HTTP (it is restarted behind this handle).
    pub agent: Agent,
    pub log: PathBuf,
    child: Option<Child>,
    pid: i32,
    _tmp: tempfile::TempDir,
}

impl Init {
    /// Starts `task-executor init INIT_FLAGS -- --data-dir .. --listen-addr .. AGENT_FLAGS`
    /// and waits until the agent answers /health.
    pub fn start(init_flags: &[&str], agent_flags: &[&str]) -> Init {
        let init = Self::start_unready(init_flags, agent_flags, None);
        init.wait_healthy(Duration::from_secs(30));
        init
    }

    /// As `start`, without waiting for the agent; `addr` overrides the free port picked.
    pub fn start_unready(
        init_flags: &[&str],
        agent_flags: &[&str],
        addr: Option<std::net::SocketAddr>,
    ) -> Init {
        let tmp = tempfile::Builder::new()
            .prefix("te-init-")
            .tempdir()
            .expect("tempdir");
        let data_dir = tmp.path().join("data");
        let log = tmp.path().join("init.log");
        let addr = addr.unwrap_or_else(free_addr);
        let out = fs::File::create(&log).expect("log");
        let child = Command::new(BIN)
            .arg("init")
            .args(init_flags)
            .arg("--")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen-addr")
            .arg(addr.to_string())
            .args(agent_flags)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env("LOG_LEVEL", "debug")
            .env("LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn task-executor init");
        let pid = child.id() as i32;
        Init {
            agent: Agent::attached(addr, &data_dir, &log),
            log,
            child: Some(child),
            pid,
            _tmp: tmp,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn wait_healthy(&self, timeout: Duration) {
        let addr = self.agent.addr;
        wait_for(timeout, "the agent's /health under init", || {
            http::request(addr, "GET", "/health", None)
                .ok()
                .filter(|r| r.status == 200)
        });
    }

    /// The init's live (non-zombie) children and their argv.
    pub fn children(&self) -> Vec<(i32, Vec<String>)> {
        children_of(self.pid)
    }

    /// The agent's pid: the init's child that is not the shim server.
    pub fn agent_pid(&self) -> Option<i32> {
        self.children()
            .into_iter()
            .find(|(_, argv)| argv.get(1).is_none_or(|a| a != "shim-server"))
            .map(|(p, _)| p)
    }

    /// The pid of the init's shim server.
    pub fn server_pid(&self) -> Option<i32> {
        self.children()
            .into_iter()
            .find(|(_, argv)| argv.get(1).is_some_and(|a| a == "shim-server"))
            .map(|(p, _)| p)
    }

    /// `kill -9` of the agent (not the init); returns the killed pid.
    pub fn kill_agent(&self) -> i32 {
        let pid = wait_for(Duration::from_secs(30), "an agent under init", || {
            self.agent_pid()
        });
        signal(pid, "KILL");
        pid
    }

    /// Waits until an agent other than `old` runs and answers; returns its pid.
    pub fn wait_new_agent(&self, old: i32, timeout: Duration) -> i32 {
        let pid = wait_for(timeout, "a restarted agent", || {
            self.agent_pid().filter(|p| *p != old)
        });
        self.wait_healthy(timeout);
        pid
    }

    /// The init's and the agents' JSON log lines so far.
    pub fn events(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Log lines with this message.
    pub fn events_with(&self, message: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["message"] == message)
            .collect()
    }

    pub fn signal(&self, sig: &str) {
        signal(self.pid, sig);
    }

    /// Waits for the init to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let c = self.child.as_mut().expect("init running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "init still running after {timeout:?}:\n{}",
                self.agent.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The init's children that exited and were not reaped.
    pub fn zombies(&self) -> Vec<i32> {
        task_executor::sys::procfs::pids()
            .into_iter()
            .filter(|p| {
                task_executor::sys::procfs::stat(*p)
                    .is_some_and(|s| s.ppid == self.pid && s.state == 'Z')
            })
            .collect()
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The init is stopped first: it restarts a dead agent or shim server, and one
            // it started after its children were listed would outlive the test. Then the
            // agent and the server (they'd be re-parented away from the init), then the
            // init; the shims go with `agent`'s drop.
            signal(self.pid, "STOP");
            for (pid, _) in children_of(self.pid) {
                signal(pid, "KILL");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Live (non-zombie) children of `parent` with their argv.
pub fn children_of(parent: i32) -> Vec<(i32, Vec<String>)> {
    task_executor::sys::procfs::pids()
        .into_iter()
        .filter(|p| {
            task_executor::sys::procfs::stat(*p).is_some_and(|s| s.ppid == parent && s.state != 'Z')
        })
        .map(|p| (p, argv(p)))
        .collect()
}

pub fn argv(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

pub fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

pub fn oom_score_adj(pid: i32) -> i32 {
    fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .expect("oom_score_adj")
        .trim()
        .parse()
        .expect("a number")
}
