//! Runs the real `task-executor` binary on a temp data dir and a free loopback port.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::http::{self, Response};
use super::wait_for;

pub const BIN: &str = env!("CARGO_BIN_EXE_task-executor");

pub struct Agent {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// Signals the agent is started with ignored (as a shell's background job is).
    ignored_signals: Option<String>,
    /// A command the agent is started through (e.g. `unshare ...`), its argv prefix.
    wrapper: Vec<String>,
    /// The agent runs as PID 1 of a PID namespace of its own: the pids its journals name
    /// are that namespace's, so leftovers are not killed by pid (its end kills them all).
    own_pid_namespace: bool,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Agent {
    /// Starts an agent with extra flags, on a fresh data dir.
    pub fn start(args: &[&str]) -> Agent {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Agent {
        let mut a = Self::unstarted(args, envs);
        a.launch();
        a
    }

    /// Starts an agent that inherits `signals` (e.g. "INT HUP") ignored, through a shell
    /// that ignores them and execs it.
    pub fn start_ignoring(signals: &str, args: &[&str]) -> Agent {
        let mut a = Self::unstarted(args, &[]);
        a.ignored_signals = Some(signals.to_string());
        a.launch();
        a
    }

    /// Starts an agent through `wrapper` (an argv prefix that execs or runs the rest).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Agent {
        let mut a = Self::unstarted(args, &[]);
        a.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        a.launch();
        a
    }

    /// Starts an agent as PID 1 of a fresh PID namespace (with its own /proc), so that a
    /// test controls which pids its processes get (`/proc/sys/kernel/ns_last_pid`).
    pub fn start_in_pid_namespace(args: &[&str]) -> Agent {
        let mut a = Self::unstarted(args, &[]);
        a.wrapper = ["unshare", "--pid", "--kill-child", "--mount-proc"]
            .map(String::from)
            .to_vec();
        a.own_pid_namespace = true;
        a.launch();
        a
    }

    /// The host pid of a process that has `ns_pid` in the agent's own PID namespace.
    pub fn host_pid(&self, ns_pid: i32) -> Option<i32> {
        let ns = fs::read_link(format!("/proc/{}/ns/pid", self.ns_init()?)).ok()?;
        task_executor::sys::procfs::pids().into_iter().find(|p| {
            fs::read_link(format!("/proc/{p}/ns/pid")).ok().as_ref() == Some(&ns)
                && fs::read_to_string(format!("/proc/{p}/status"))
                    .ok()
                    .and_then(|s| {
                        let line = s.lines().find(|l| l.starts_with("NSpid:"))?.to_string();
                        line.split_whitespace().last()?.parse::<i32>().ok()
                    })
                    == Some(ns_pid)
        })
    }

    /// True when the process (a host pid) lives in the agent's own PID namespace.
    pub fn in_own_pid_namespace(&self, pid: i32) -> bool {
        let ns = |p: i32| fs::read_link(format!("/proc/{p}/ns/pid")).ok();
        self.ns_init()
            .and_then(ns)
            .is_some_and(|n| ns(pid) == Some(n))
    }

    /// Host pid of the agent that runs as PID 1 of its own PID namespace.
    pub fn ns_init(&self) -> Option<i32> {
        let wrapper = self.pid();
        fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    fn unstarted(args: &[&str], envs: &[(&str, &str)]) -> Agent {
        let tmp = tempfile::Builder::new()
            .prefix("te-test-")
            .tempdir()
            .expect("tempdir");
        Agent {
            addr: free_addr(),
            data_dir: tmp.path().join("data"),
            log: tmp.path().join("agent.log"),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ignored_signals: None,
            wrapper: Vec::new(),
            own_pid_namespace: false,
            child: None,
            _tmp: Some(tmp),
        }
    }

    /// A handle on an agent that something else runs (`task-executor init`) at `addr` on
    /// `data_dir`, logging to `log`. Dropping it kills the shims recorded under `data_dir`,
    /// as for an agent of our own; it never starts or kills the agent.
    pub fn attached(addr: SocketAddr, data_dir: &Path, log: &Path) -> Agent {
        Agent {
            addr,
            data_dir: data_dir.to_path_buf(),
            log: log.to_path_buf(),
            args: Vec::new(),
            envs: Vec::new(),
            ignored_signals: None,
            wrapper: Vec::new(),
            own_pid_namespace: false,
            child: None,
            _tmp: None,
        }
    }

    /// Starts an agent on a data dir the test owns (its log goes beside it).
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Agent {
        Self::start_in_with_env(data_dir, args, &[])
    }

    /// `start_in` with environment variables.
    pub fn start_in_with_env(data_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Agent {
        fs::create_dir_all(data_dir).expect("data dir");
        let mut a = Agent {
            addr: free_addr(),
            data_dir: data_dir.to_path_buf(),
            log: data_dir.with_extension("log"),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ignored_signals: None,
            wrapper: Vec::new(),
            own_pid_namespace: false,
            child: None,
            _tmp: None,
        };
        a.launch();
        a
    }

    fn launch(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = match &self.ignored_signals {
            None if !self.wrapper.is_empty() => {
                let mut c = Command::new(&self.wrapper[0]);
                c.args(&self.wrapper[1..]).arg(BIN);
                c
            }
            None => Command::new(BIN),
            Some(sigs) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("trap '' {sigs}; exec \"$0\" \"$@\""))
                    .arg(BIN);
                c
            }
        };
        let child = cmd
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-addr")
            .arg(self.addr.to_string())
            .args(&self.args)
            // Tests outside a pod must not pick up the runner's pod identity; a test
            // that wants one passes it in `envs`.
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env("LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
        let addr = self.addr;
        let log_path = self.log.clone();
        // Our agent's line, not only an answer on the address: tests run in processes of
        // their own, and another's agent may have bound a port `free_addr` gave out here
        // too (this one then fails to bind, and /health answers for the other).
        let listening = |log: &str| {
            let addr = addr.to_string();
            log.lines()
                .filter(|l| l.contains("task-executor listening") && l.contains(&addr))
                .count()
        };
        let before = listening(&fs::read_to_string(&log_path).unwrap_or_default());
        wait_for(Duration::from_secs(20), "agent /health", || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "agent exited with {status}: {}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if listening(&fs::read_to_string(&log_path).unwrap_or_default()) <= before {
                return None;
            }
            http::request(addr, "GET", "/health", None)
                .ok()
                .filter(|r| r.status == 200)
        });
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// `kill -9` of the agent alone (its shims live on).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns how long the agent took to exit.
    pub fn sigterm(&mut self) -> Duration {
        let mut c = self.child.take().expect("agent running");
        let t = std::time::Instant::now();
        Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .expect("kill");
        let status = c.wait().expect("wait");
        assert!(status.success(), "agent exited with {status} after SIGTERM");
        t.elapsed()
    }

    /// Starts the agent again on the same data dir and port (killing it first if running).
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    /// SIGTERM and wait (up to 30 s) for the agent to exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().ok().flatten() {
                return Some(st);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last 40 lines of the agent's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A request with a raw string body.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        http::request(self.addr, method, path, body.map(str::as_bytes))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log_tail()))
    }

    /// POST /tasks; panics unless 201; returns the created task.
    pub fn create_ok(&self, task: &Value) -> Value {
        let r = self.create(task.clone());
        assert_eq!(
            r.status,
            201,
            "create {task}: {}\n{}",
            r.text(),
            self.log_tail()
        );
        r.json()
    }

    /// Deletes every task, waits until they are gone, then stops the agent (SIGTERM).
    pub fn delete_all_and_stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let list = self.request("GET", "/getTasks", None).json();
        let names: Vec<String> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect();
        for n in &names {
            self.delete(n);
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

    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
        http::request(self.addr, method, path, bytes.as_deref()).expect("http request")
    }

    pub fn create(&self, task: Value) -> Response {
        self.request("POST", "/tasks", Some(&task))
    }

    /// Creates `{name, spec.process: {command}}` and asserts 201.
    pub fn run(&self, name: &str, command: &[&str]) -> Value {
        let r = self.create(json!({"name": name, "spec": {"process": {"command": command}}}));
        assert_eq!(r.status, 201, "create {name}: {}", r.text());
        r.json()
    }

    /// Creates a task that runs `script` with `sh -c`.
    pub fn run_sh(&self, name: &str, script: &str) -> Value {
        self.run(name, &["sh", "-c", script])
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        let r = self.request("GET", &format!("/tasks/{name}"), None);
        match r.status {
            200 => Some(r.json()),
            404 => None,
            s => panic!("GET {name}: {s} {}", r.text()),
        }
    }

    pub fn delete(&self, name: &str) {
        let r = self.request("DELETE", &format!("/tasks/{name}"), None);
        assert_eq!(r.status, 204, "delete {name}: {}", r.text());
    }

    /// Waits until the task's state (waiting/running/terminated) is `state`; returns its body.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        wait_for(timeout, &format!("{name} to be {state}"), || {
            let t = self.get(name)?;
            t["status"]["state"].get(state).cloned()
        })
    }

    pub fn wait_gone(&self, name: &str, timeout: Duration) {
        wait_for(timeout, &format!("{name} to disappear"), || {
            self.get(name).is_none().then_some(())
        });
    }

    /// The shim's `claimed` line of task `name`'s run journal; panics without one.
    pub fn claim(&self, name: &str) -> Value {
        let text = fs::read_to_string(self.task_dir(name).join("run.jsonl")).unwrap();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| v.get("claimed").cloned())
            .unwrap_or_else(|| panic!("no claim: {text}"))
    }

    pub fn task_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join(name)
    }

    /// What upstream's controller reads: `processStatus.terminated` of `name` from
    /// `/getTasks` (upstream's wire shape, as it polls), success being `exitCode == 0`.
    pub fn controller_view(&self, name: &str) -> Value {
        let r = self.call("GET", "/getTasks", None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in /getTasks"))["processStatus"]["terminated"]
            .clone()
    }

    pub fn stdout(&self, name: &str) -> String {
        fs::read_to_string(self.task_dir(name).join("stdout.log")).unwrap_or_default()
    }

    /// The task's main process pid, from the shim's `started` record.
    pub fn main_pid(&self, name: &str) -> i32 {
        let v = started_record(&self.task_dir(name)).expect("no started record in run.jsonl");
        v["main"]["pid"].as_i64().expect("main pid") as i32
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("agent log tail:\n{}", self.log_tail());
        }
        // Containers outlive the agent: let it remove them before it goes.
        if self.child.is_some()
            && self
                .args
                .iter()
                .any(|a| a.starts_with("--enable-container-mode"))
        {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.delete_all_and_stop()
            }));
        }
        self.kill9();
        if !self.own_pid_namespace {
            kill_leftover_shims(&self.data_dir);
        }
    }
}

/// Kills what a test's tasks left running: every shim recorded under `data_dir`, and its
/// task's process group, when the recorded start time still matches.
pub fn kill_leftover_shims(data_dir: &Path) {
    let Ok(dir) = fs::read_dir(data_dir) else {
        return;
    };
    for e in dir.flatten() {
        let Some(v) = started_record(&e.path()) else {
            continue;
        };
        for key in ["main", "shim"] {
            let pid = v[key]["pid"].as_i64().filter(|p| *p > 1);
            let same = pid.is_some_and(|p| start_time(p as i32) == v[key]["startTime"].as_u64());
            if let Some(pid) = pid.filter(|_| same) {
                let target = if key == "main" {
                    format!("-{pid}")
                } else {
                    pid.to_string()
                };
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &target])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// The shim's `started` line of a task's run journal (`run.jsonl`).
pub fn started_record(task_dir: &Path) -> Option<Value> {
    let text = fs::read_to_string(task_dir.join("run.jsonl")).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get("started").cloned())
}

fn start_time(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Replaces the RFC 3339 timestamps of a task body with a fixed marker, for golden checks.
pub fn normalize_times(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if (k.ends_with("At") || k == "deletionTimestamp") && val.is_string() {
                    *val = Value::String("<time>".into());
                } else {
                    normalize_times(val);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize_times),
        _ => {}
    }
}
