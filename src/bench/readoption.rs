//! The re-adoption figures of `task-executor bench`: running tasks, the agent killed with
//! `-9` and started again on the same data dir, and the time until every task is
//! reported running again; then the restarted agent's threads and descriptors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{
    BenchError, Client, create_tasks, list_json, spawn_agent, start_agent_in, wait_healthy,
};
use crate::sys::procfs;

pub struct Readoption {
    tasks: usize,
    took: Duration,
    threads: u64,
    fds: usize,
}

impl Readoption {
    pub fn rows(&self) -> String {
        format!(
            "| re-adoption of {} running tasks after kill -9 (start → all running) | {:.2} s | | |\n\
             | agent threads / open fds with {} re-adopted tasks | {} / {} | | |\n",
            self.tasks,
            self.took.as_secs_f64(),
            self.tasks,
            self.threads,
            self.fds
        )
    }
}

/// Starts `n` long-running tasks, kills the agent (-9), starts it again on the same data
/// dir and times until every task is reported running again; then the agent's threads
/// and descriptors. Deletes the tasks afterwards.
pub fn run(n: usize, clients: usize) -> Result<Readoption, BenchError> {
    let dir =
        std::env::temp_dir().join(format!("task-executor-bench-adopt-{}", std::process::id()));
    let _cleanup = StopShims(dir.clone());
    let mut agent = start_agent_in(dir.clone())?;
    agent.dir = None; // `_cleanup` removes it once the shims are gone
    let addr = agent.addr;
    create_tasks(addr, "adopt", &["sleep", "3600"], 0..n, clients)?;
    wait_all(addr, n, "running")?;
    // The shims outlive the agent; the next agent finds them through the data dir.
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let t = Instant::now();
    let mut again = spawn_agent(dir.clone(), addr)?;
    again.dir = None;
    wait_healthy(&mut again)?;
    wait_all(addr, n, "running")?;
    let took = t.elapsed();
    let threads = status_field(again.pid(), "Threads:")?;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", again.pid()))?.count();
    Ok(Readoption {
        tasks: n,
        took,
        threads,
        fds,
    })
}

/// Clean-up of the re-adoption run, also when it fails half-way: without 5,000 deletions
/// through the API (each one durable), each shim is asked to stop its task, as a deletion
/// would; then the data dir goes.
struct StopShims(PathBuf);

impl Drop for StopShims {
    fn drop(&mut self) {
        stop_shims(&self.0.join("data"));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SIGTERMs the shim of every task under `data` (it stops its task and leaves) and waits
/// until all are gone.
fn stop_shims(data: &std::path::Path) {
    use crate::runtime::journal::{self, lock_held};
    use crate::sys::proc_handle::ProcHandle;
    let dirs: Vec<PathBuf> = std::fs::read_dir(data)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    for d in &dirs {
        let shim = journal::read_run(d)
            .ok()
            .and_then(|r| r.started)
            .map(|s| s.shim);
        if let Some(h) = shim.as_ref().and_then(ProcHandle::of) {
            let _ = h.signal(nix::sys::signal::Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while dirs.iter().any(|d| lock_held(&journal::shim_lock(d))) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the agent holds `n` tasks, all in `state`.
fn wait_all(addr: SocketAddr, n: usize, state: &str) -> Result<(), BenchError> {
    let client = Client::new(addr);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list = list_json(&client)?;
        let arr = list.as_array().cloned().unwrap_or_default();
        let ready = arr
            .iter()
            .filter(|t| t["status"]["state"].get(state).is_some())
            .count();
        if arr.len() == n && ready == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "only {ready} of {n} tasks {state} after 10 minutes"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: u32, name: &str) -> Result<u64, BenchError> {
    procfs::Status::of(pid as i32)?
        .number(name)
        .ok_or_else(|| BenchError::Setup(format!("no {name} in /proc/{pid}/status")))
}
