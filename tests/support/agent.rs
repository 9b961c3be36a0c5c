//! The real `task-executor` binary, started on a free port with a temp data dir.

use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::http::{self, Response};

pub struct Agent {
    child: Option<Child>,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("no free port")
        .port()
}

impl Agent {
    /// Starts the agent with `args` (besides --listen-addr and --data-dir) and waits until
    /// it answers /health.
    pub fn start(data_dir: &Path, args: &[&str]) -> Agent {
        let mut a = Agent {
            child: None,
            port: free_port(),
            data_dir: data_dir.to_path_buf(),
            log: data_dir.with_extension("log"),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        fs::create_dir_all(&self.data_dir).unwrap();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_task-executor"))
            .arg("--listen-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env("LOG_LEVEL", "info,task_executor=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting task-executor");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http::request(self.port, "GET", "/health", None) {
                if r.status == 200 {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "agent exited with {st} while starting:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent did not answer /health within 30s:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent not running").id() as i32
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        http::request(self.port, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log_tail()))
    }

    /// POST /tasks; panics unless 201.
    pub fn create(&self, task: &Value) -> Value {
        let r = self.call("POST", "/tasks", Some(&task.to_string()));
        assert_eq!(
            r.status,
            201,
            "create {task}: {}\n{}",
            r.body,
            self.log_tail()
        );
        r.json()
    }

    pub fn task(&self, name: &str) -> Option<Value> {
        let r = self.call("GET", &format!("/tasks/{name}"), None);
        match r.status {
            200 => Some(r.json()),
            404 => None,
            s => panic!("GET /tasks/{name}: {s} {}", r.body),
        }
    }

    /// Waits until the task's `status.state` has member `which` ("running", "terminated").
    pub fn wait_state(&self, name: &str, which: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(t) = self.task(name) {
                let st = &t["status"]["state"];
                if let Some(v) = st.get(which) {
                    return v.clone();
                }
                if which == "running" && st.get("terminated").is_some() {
                    panic!("task {name} terminated before it was seen running: {st}");
                }
                last = t;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "task {name} not {which} within {timeout:?}; last: {last}\n{}",
            self.log_tail()
        );
    }

    pub fn wait_gone(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.task(name).is_some() {
            assert!(
                Instant::now() < deadline,
                "task {name} still listed after {timeout:?}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Deletes every task, waits until they are gone, then stops the agent (SIGTERM).
    pub fn delete_all_and_stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let list = self.call("GET", "/getTasks", None).json();
        let names: Vec<String> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect();
        for n in &names {
            let r = self.call("DELETE", &format!("/tasks/{n}"), None);
            assert_eq!(r.status, 204, "DELETE {n}: {}", r.body);
        }
        for n in &names {
            self.wait_gone(n, Duration::from_secs(60));
        }
        let st = self.terminate();
        assert!(
            st.is_some_and(|s| s.success()),
            "agent exit: {st:?}\n{}",
            self.log_tail()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A failed test: still try not to leave containers behind.
            if std::thread::panicking() {
                eprintln!("agent log tail:\n{}", self.log_tail());
            }
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.delete_all_and_stop()
            }));
            self.kill9();
        }
    }
}
