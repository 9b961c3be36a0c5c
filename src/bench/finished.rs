//! The 100,000-finished-tasks figures of `task-executor bench`: an agent filled with that
//! many finished tasks (through the API, each create durable), its memory and list, then
//! a kill -9 and the time until the restarted agent answers with all of them loaded.

use std::time::{Duration, Instant};

use super::{BenchError, Client, fill, pct, rss_kib, spawn_agent, start_agent_in, wait_healthy};

pub struct Finished {
    pub tasks: usize,
    /// Resident (and anonymous) KiB with the tasks held, as created and after a restart.
    pub rss: (u64, u64),
    pub rss_restarted: (u64, u64),
    /// `GET /getTasks` of all of them, and its size.
    pub list: Vec<Duration>,
    pub list_bytes: usize,
    /// From the start of the restarted agent until it answers (it loads every task before
    /// it listens).
    pub restart: Duration,
    /// The same once more right after, and once with the kernel's caches dropped (`None`:
    /// not root).
    pub restart_warm: Duration,
    pub restart_cold: Option<Duration>,
}

pub fn run(n: usize, clients: usize) -> Result<Finished, BenchError> {
    let dir = std::env::temp_dir().join(format!(
        "task-executor-bench-finished-{}",
        std::process::id()
    ));
    let mut agent = start_agent_in(dir.clone())?;
    let tasks = fill(agent.addr, n, clients)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_kib(agent.pid())?;
    let client = Client::new(agent.addr);
    let mut list = Vec::new();
    let mut list_bytes = 0;
    for _ in 0..10 {
        let t = Instant::now();
        let (_, body) = client.get("/getTasks")?;
        list.push(t.elapsed());
        list_bytes = body.len();
    }
    // kill -9, then the same data dir again; the old agent's drop must not remove it.
    agent.dir = None;
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let t = Instant::now();
    let mut again = spawn_agent(dir, agent.addr)?;
    wait_healthy(&mut again)?;
    let restart = t.elapsed();
    let (_, body) = Client::new(again.addr).get("/getTasks")?;
    let listed = serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| BenchError::Setup(format!("GET /getTasks after the restart: {e}")))?
        .as_array()
        .map_or(0, Vec::len);
    if listed != tasks {
        return Err(BenchError::Setup(format!(
            "the restarted agent lists {listed} of {tasks} tasks"
        )));
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_restarted = rss_kib(again.pid())?;
    // Again at once (the files' pages cached), then with nothing cached, as after a
    // node's reboot: what the restart waits on is the disk.
    let restart_warm = restart_in(&mut again)?;
    let restart_cold = match drop_caches() {
        Ok(()) => Some(restart_in(&mut again)?),
        Err(_) => None,
    };
    Ok(Finished {
        tasks,
        rss,
        rss_restarted,
        list,
        list_bytes,
        restart,
        restart_warm,
        restart_cold,
    })
}

/// kill -9 of `agent`, then an agent on its data dir again (in its place); the time
/// until it answers.
fn restart_in(agent: &mut super::Agent) -> Result<Duration, BenchError> {
    let dir = agent.dir.take();
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let path = dir
        .clone()
        .ok_or_else(|| BenchError::Setup("the agent's data dir is gone".into()))?;
    let t = Instant::now();
    let mut again = spawn_agent(path, agent.addr)?;
    wait_healthy(&mut again)?;
    let took = t.elapsed();
    again.dir = dir;
    *agent = again;
    Ok(took)
}

/// Writes back and drops the kernel's page, dentry and inode caches (root only).
fn drop_caches() -> std::io::Result<()> {
    let status = std::process::Command::new("sync").status()?;
    if !status.success() {
        return Err(std::io::Error::other("sync failed"));
    }
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
}

impl Finished {
    /// The table's rows.
    pub fn rows(&self) -> String {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
        let mib = |(rss, anon): (u64, u64)| {
            format!(
                "{:.1} MiB ({:.1} MiB anonymous, {:.2} KiB a task)",
                rss as f64 / 1024.0,
                anon as f64 / 1024.0,
                anon as f64 / self.tasks.max(1) as f64
            )
        };
        let n = self.tasks;
        format!(
            "| agent RSS with {n} finished tasks | {} | | |\n\
             | GET /getTasks with {n} tasks, p50 / p99 ({} KiB) | {} / {} | | |\n\
             | restart with {n} finished tasks after kill -9 (start → answering, all loaded) | {:.2} s | | |\n\
             | agent RSS after that restart | {} | | |\n\
             | the same restart again at once / with the kernel's caches dropped (as after a reboot) | {:.2} s / {} | | |\n",
            mib(self.rss),
            self.list_bytes / 1024,
            ms(pct(&self.list, 50.0)),
            ms(pct(&self.list, 99.0)),
            self.restart.as_secs_f64(),
            mib(self.rss_restarted),
            self.restart_warm.as_secs_f64(),
            self.restart_cold
                .map_or("n/a (needs root)".to_string(), |d| format!(
                    "{:.2} s",
                    d.as_secs_f64()
                )),
        )
    }
}
