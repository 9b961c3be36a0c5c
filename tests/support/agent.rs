//! Running the real agent binary in a test, and cleaning up after it: the agent, every
//! task supervisor (shim) under its data dir and everything they started, even when the
//! test fails (Drop).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use task_executor::runtime::procfs;

use super::http;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 50 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent process. Drop kills it (tasks are killed by `TaskReaper`).
pub struct Agent {
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts `task-executor` with `args`, `env` (the rest of the environment is inherited,
    /// minus in-cluster and kubeconfig variables) and its log in `log`.
    pub fn start(bin: &str, args: &[String], env: &[(&str, String)], log: &Path) -> Agent {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg(format!("--listen-addr={addr}"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("KUBECONFIG")
            .env("LOG_LEVEL", "task_executor=debug,info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the agent");
        let agent = Agent {
            addr,
            log: log.to_path_buf(),
            child: Some(child),
        };
        wait_for(
            Duration::from_secs(20),
            "the agent to answer /health",
            || {
                http::request(addr, "GET", "/health", None)
                    .ok()
                    .filter(|r| r.status == 200)
            },
        );
        agent
    }

    /// SIGTERM, then wait (SIGKILL after 10 s). Tasks keep running, as in production.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /tasks/{name} as JSON, or None on 404.
    pub fn task(&self, name: &str) -> Option<serde_json::Value> {
        let r = http::get(self.addr, &format!("/tasks/{name}"));
        match r.status {
            200 => Some(r.json()),
            404 => None,
            s => panic!("GET /tasks/{name}: {s} {}", r.body),
        }
    }

    /// Waits until the task's state has the member `state` ("running", "terminated").
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> serde_json::Value {
        wait_for(timeout, &format!("task {name} to be {state}"), || {
            let t = self.task(name)?;
            let s = t["status"]["state"][state].clone();
            (!s.is_null()).then_some(s)
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills every shim whose `--task-dir` is under `data_dir`, and all their descendants.
/// Create it before the agent so it drops after it.
pub struct TaskReaper {
    pub data_dir: PathBuf,
}

impl TaskReaper {
    pub fn shims(&self) -> Vec<i32> {
        let dir = self.data_dir.to_string_lossy().into_owned();
        procfs::pids()
            .into_iter()
            .filter(|pid| {
                let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<String> = raw
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.iter().any(|a| a == "shim") && args.iter().any(|a| a.starts_with(&dir))
            })
            .collect()
    }

    pub fn kill_all(&self) {
        for _ in 0..3 {
            let shims = self.shims();
            if shims.is_empty() {
                return;
            }
            for shim in shims {
                for pid in procfs::descendants(shim) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                let _ = kill(Pid::from_raw(shim), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TaskReaper {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// True while a process with exactly this command line (NUL-joined argv) runs.
pub fn pids_with_cmdline(argv: &[&str]) -> Vec<i32> {
    let want = argv.join("\0");
    procfs::pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let raw = raw.strip_suffix(b"\0").unwrap_or(&raw);
                raw == want.as_bytes()
            })
        })
        .filter(|pid| procfs::stat(*pid).is_some_and(|s| s.state != 'Z'))
        .collect()
}
