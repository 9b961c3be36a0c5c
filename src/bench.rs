//! `task-executor bench`: starts an agent on a temp dir and measures it against a raw
//! spawn+wait loop of /bin/true in the same run. Prints a Markdown table.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::sys::procfs;

mod cpu;
mod finished;
mod floor;
mod readoption;
pub mod slow_clients;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] ureq::Error),
}

/// One client: a kept-alive connection to the agent (ureq pools it), like the upstream
/// controller's HTTP client.
struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    fn new(addr: SocketAddr) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            agent,
            base: format!("http://{addr}"),
        }
    }

    fn get(&self, path: &str) -> Result<(u16, Vec<u8>), BenchError> {
        let mut r = self.agent.get(format!("{}{path}", self.base)).call()?;
        Ok((r.status().as_u16(), read(&mut r)?))
    }

    fn post(&self, path: &str, body: &str) -> Result<(u16, Vec<u8>), BenchError> {
        let mut r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json")
            .send(body)?;
        Ok((r.status().as_u16(), read(&mut r)?))
    }

    fn delete(&self, path: &str) -> Result<(u16, Vec<u8>), BenchError> {
        let mut r = self.agent.delete(format!("{}{path}", self.base)).call()?;
        Ok((r.status().as_u16(), read(&mut r)?))
    }
}

fn read(r: &mut ureq::http::Response<ureq::Body>) -> Result<Vec<u8>, BenchError> {
    Ok(r.body_mut().with_config().limit(u64::MAX).read_to_vec()?)
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Tasks held for the list and memory figures.
    pub held_tasks: usize,
    pub clients: usize,
    pub duration: Duration,
    pub latency_samples: usize,
    /// Running tasks re-adopted after a kill -9 of the agent (0: skip).
    pub adopted_tasks: usize,
    /// Finished tasks held, listed and loaded again after a kill -9 (0: skip).
    pub finished_tasks: usize,
}

struct Agent {
    child: Child,
    addr: SocketAddr,
    /// Removed when the agent is dropped, unless `None`.
    dir: Option<PathBuf>,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub fn run(opts: &BenchOptions) -> Result<String, BenchError> {
    // The slow-client figure holds over 5,000 sockets on this side too.
    crate::limits::raise_nofile()?;
    let agent = start_agent()?;
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = rss_kib(agent.child.id())?;

    let (raw, raw_cpu) = cpu::measured(|| raw_spawn(1000))?;
    let raw_rate = 1000.0 / raw.iter().sum::<Duration>().as_secs_f64();
    // Beside the agent's data dir (the same file system), removed with it at the end.
    let floor_dir = agent
        .dir
        .as_ref()
        .ok_or_else(|| BenchError::Setup("the bench's agent has no temp dir".into()))?
        .join("floor");
    let floor = floor::measure(&floor_dir, FLOOR_SAMPLES, opts.clients, FLOOR_DURATION)?;

    let mut lat = Vec::with_capacity(opts.latency_samples);
    let client = Client::new(agent.addr);
    for i in 0..opts.latency_samples {
        lat.push(create_and_wait(&client, &format!("lat-{i}"))?);
    }
    // One task at a time after a pause, as a controller that creates a task now and
    // then: what back-to-back runs amortise (the RCU grace period a cgroup move waits
    // for, warm caches) shows here. The raw spawn gets the same pauses.
    let (mut isolated, mut raw_isolated) = (Vec::new(), Vec::new());
    for i in 0..ISOLATED_SAMPLES {
        std::thread::sleep(ISOLATED_PAUSE);
        isolated.push(create_and_wait(&client, &format!("iso-{i}"))?);
        std::thread::sleep(ISOLATED_PAUSE);
        raw_isolated.extend(raw_spawn(1)?);
    }
    let (tput, tput_cpu) = cpu::measured(|| throughput(agent.addr, opts.clients, opts.duration))?;
    let filled = fill(agent.addr, opts.held_tasks, opts.clients)?;
    std::thread::sleep(Duration::from_secs(1));
    let mut list = Vec::new();
    let mut list_bytes = 0;
    for _ in 0..30 {
        let t = Instant::now();
        let (_, body) = client.get("/getTasks")?;
        list.push(t.elapsed());
        list_bytes = body.len();
    }
    let mut scrape = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        client.get("/metrics")?;
        scrape.push(t.elapsed());
    }
    let held_rss = rss_kib(agent.child.id())?;
    let cpu0 = cpu_ticks(agent.child.id())?;
    std::thread::sleep(Duration::from_secs(5));
    let idle_cpu = cpu_ticks(agent.child.id())? - cpu0;
    let slow = slow_clients::run(
        agent.addr,
        agent.child.id(),
        &slow_clients::Load {
            idle: 5000,
            trickling: 200,
            probe_for: Duration::from_secs(5),
        },
    )?;
    let follow_cpu = followers_cpu(&agent, 100)?;

    let (raw50, raw99) = (pct(&raw, 50.0), pct(&raw, 99.0));
    let (l50, l99) = (pct(&lat, 50.0), pct(&lat, 99.0));
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    let ratio = |a: f64, b: f64| format!("{:.2}x", a / b);
    let mut out = String::new();
    out.push_str(
        "| measure | task-executor | raw spawn+wait of /bin/true | ratio |\n|---|---|---|---|\n",
    );
    out.push_str(&format!(
        "| create→terminated p50 (`true`, full durability) | {} | {} | {} |\n",
        ms(l50),
        ms(raw50),
        ratio(l50.as_secs_f64(), raw50.as_secs_f64())
    ));
    out.push_str(&format!(
        "| create→terminated p99 | {} | {} | {} |\n",
        ms(l99),
        ms(raw99),
        ratio(l99.as_secs_f64(), raw99.as_secs_f64())
    ));
    let (i50, ri50) = (pct(&isolated, 50.0), pct(&raw_isolated, 50.0));
    out.push_str(&format!(
        "| create→terminated p50, one task every {:?} (isolated) | {} | {} | {} |\n",
        ISOLATED_PAUSE * 2,
        ms(i50),
        ms(ri50),
        ratio(i50.as_secs_f64(), ri50.as_secs_f64())
    ));
    out.push_str(&format!(
        "| sustained tasks/s ({} clients, {:?}) | {:.0} | {:.0} | {:.0}% |\n",
        opts.clients,
        opts.duration,
        tput,
        raw_rate,
        100.0 * tput / raw_rate
    ));
    let (cpu_task, cpu_raw) = (tput_cpu.per(tput * tput_cpu.wall_secs), raw_cpu.per(1000.0));
    out.push_str(&format!(
        "| machine CPU per task in those runs (every process: the bench's clients, the agent, shims, tasks), and CPUs busy | {cpu_task:.2} ms, {:.0}% busy | {cpu_raw:.2} ms, {:.0}% busy | {} |\n",
        100.0 * tput_cpu.busy_share,
        100.0 * raw_cpu.busy_share,
        ratio(cpu_task, cpu_raw)
    ));
    let f50 = pct(&floor.one, 50.0);
    out.push_str(&format!(
        "| durability floor p50: one task's record, claim and exit with their fsyncs, no process (the store's create, two journal appends) | {} | | |\n",
        ms(f50)
    ));
    out.push_str(&format!(
        "| create→terminated p50 against raw spawn + durability floor | {} | {} | {} |\n",
        ms(l50),
        ms(raw50 + f50),
        ratio(l50.as_secs_f64(), (raw50 + f50).as_secs_f64())
    ));
    out.push_str(&format!(
        "| durability floor, {} threads: tasks' file work a second | {:.0} | | |\n",
        floor.threads, floor.rate
    ));
    out.push_str(&format!(
        "| GET /getTasks with {filled} tasks, p50 / p99 ({} KiB) | {} / {} | | |\n",
        list_bytes / 1024,
        ms(pct(&list, 50.0)),
        ms(pct(&list, 99.0))
    ));
    let mib = |(rss, anon): (u64, u64)| {
        format!(
            "{:.1} MiB ({:.1} MiB anonymous)",
            rss as f64 / 1024.0,
            anon as f64 / 1024.0
        )
    };
    out.push_str(&format!("| agent RSS idle | {} | | |\n", mib(idle_rss)));
    out.push_str(&format!(
        "| agent RSS with {filled} finished tasks | {} | | |\n",
        mib(held_rss)
    ));
    out.push_str(&format!(
        "| agent CPU while idle with {filled} tasks, 5 s | {idle_cpu} ticks | | |\n"
    ));
    out.push_str(&format!(
        "| GET /health p50 / p99 / max with 5,000 idle keep-alive connections and 200 one-byte-a-second header senders open ({} probes, {} failed) | {} / {} / {} | | |\n",
        slow.health.len() + slow.failures.len(),
        slow.failures.len(),
        ms(slow_clients::percentile(&slow.health, 50.0)),
        ms(slow_clients::percentile(&slow.health, 99.0)),
        ms(slow.health.iter().max().copied().unwrap_or_default()),
    ));
    out.push_str(&format!(
        "| agent RSS with {} idle keep-alive connections (each after one request) | {:.1} MiB (+{:.1} KiB a connection) | | |\n",
        slow.idle,
        slow.rss_idle_conns_kib as f64 / 1024.0,
        slow.rss_idle_conns_kib.saturating_sub(slow.rss_idle_kib) as f64 / slow.idle.max(1) as f64
    ));
    out.push_str(&format!(
        "| agent RSS with those connections open | {:.1} MiB (+{:.1} KiB a connection) | | |\n",
        slow.rss_loaded_kib as f64 / 1024.0,
        slow.rss_loaded_kib.saturating_sub(slow.rss_idle_kib) as f64
            / (slow.fds_loaded.saturating_sub(slow.fds_idle).max(1)) as f64
    ));
    out.push_str(&format!(
        "| agent fds: idle / with those connections / {:.1} s after they closed | {} / {} / {} | | |\n",
        slow.settle.as_secs_f64(),
        slow.fds_idle,
        slow.fds_loaded,
        slow.fds_after
    ));
    out.push_str(&format!(
        "| GET /metrics with {filled} tasks, p50 / p99 | {} / {} | | |\n",
        ms(pct(&scrape, 50.0)),
        ms(pct(&scrape, 99.0))
    ));
    out.push_str(&format!(
        "| agent CPU with 100 log followers of 10 idle tasks, 5 s | {follow_cpu} ticks | | |\n"
    ));
    drop(agent);
    if opts.finished_tasks > 0 {
        out.push_str(&finished::run(opts.finished_tasks, opts.clients)?.rows());
    }
    if opts.adopted_tasks > 0 {
        out.push_str(&readoption::run(opts.adopted_tasks, opts.clients)?.rows());
    }
    Ok(out)
}

/// CPU ticks the agent uses in 5 s while `n` clients follow the logs of 10 idle tasks.
fn followers_cpu(agent: &Agent, n: usize) -> Result<u64, BenchError> {
    use std::io::{Read, Write};
    let client = Client::new(agent.addr);
    let names: Vec<String> = (0..10).map(|i| format!("idle-follow-{i}")).collect();
    for name in &names {
        let body = json!({"name": name, "spec": {"process": {"command": ["sleep", "1000"]}}});
        client.post("/tasks", &body.to_string())?;
    }
    let mut followers = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = std::net::TcpStream::connect(agent.addr)?;
        let name = &names[i % names.len()];
        write!(
            s,
            "GET /tasks/{name}/logs?follow=true HTTP/1.1\r\nHost: x\r\n\r\n"
        )?;
        followers.push(s);
    }
    for s in &mut followers {
        // The answer's head: the follower is set up.
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = cpu_ticks(agent.child.id())?;
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_ticks(agent.child.id())? - cpu0;
    drop(followers);
    // The tasks outlive the agent: stop them before it goes.
    for name in &names {
        client.delete(&format!("/tasks/{name}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in &names {
        while client.get(&format!("/tasks/{name}"))?.0 != 404 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(used)
}

fn start_agent() -> Result<Agent, BenchError> {
    start_agent_in(std::env::temp_dir().join(format!("task-executor-bench-{}", std::process::id())))
}

fn start_agent_in(dir: PathBuf) -> Result<Agent, BenchError> {
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut agent = spawn_agent(dir, addr)?;
    wait_healthy(&mut agent)?;
    Ok(agent)
}

fn spawn_agent(dir: PathBuf, addr: SocketAddr) -> Result<Agent, BenchError> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen-addr")
        .arg(addr.to_string())
        .env("LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Agent {
        child,
        addr,
        dir: Some(dir),
    })
}

fn wait_healthy(agent: &mut Agent) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let client = Client::new(agent.addr);
    while client.get("/health").ok().map(|r| r.0) != Some(200) {
        if Instant::now() > deadline || agent.child.try_wait()?.is_some() {
            return Err(BenchError::Setup("agent did not become healthy".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Isolated create→terminated samples, and the pause before each (and before each raw
/// spawn beside it).
const ISOLATED_SAMPLES: usize = 20;
/// The durability floor's one-at-a-time samples, and how long its threads run.
const FLOOR_SAMPLES: usize = 200;
const FLOOR_DURATION: Duration = Duration::from_secs(3);
const ISOLATED_PAUSE: Duration = Duration::from_millis(250);

fn raw_spawn(n: usize) -> Result<Vec<Duration>, BenchError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        Command::new("/bin/true").status()?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// POST a `true` task and long-poll (`?wait=`, on a kept-alive connection) until it is
/// terminated; returns the elapsed time.
fn create_and_wait(client: &Client, name: &str) -> Result<Duration, BenchError> {
    let body = json!({"name": name, "spec": {"process": {"command": ["/bin/true"]}}}).to_string();
    let t = Instant::now();
    let (status, answer) = client.post("/tasks", &body)?;
    if status != 201 {
        return Err(BenchError::Setup(format!(
            "create {name}: {status} {}",
            text(&answer)
        )));
    }
    // The long-poll answers once the task is terminated (or after 30 s, then ask again).
    let path = format!("/tasks/{name}?wait=30s");
    let mut done = text(&answer).contains("\"terminated\"");
    while !done {
        done = text(&client.get(&path)?.1).contains("\"terminated\"");
    }
    Ok(t.elapsed())
}

fn throughput(addr: SocketAddr, clients: usize, dur: Duration) -> Result<f64, BenchError> {
    rate(clients, dur, move |c| {
        let client = Client::new(addr);
        move |i| create_and_wait(&client, &format!("tp-{c}-{i}")).map(drop)
    })
}

/// Runs `threads` threads for `dur`, each doing its work over and over (`each(thread)`
/// makes a thread's work; it is called with 0, 1, 2, … and stops the run on an error);
/// returns how many were done a second.
fn rate<W>(threads: usize, dur: Duration, each: impl Fn(usize) -> W) -> Result<f64, BenchError>
where
    W: FnMut(usize) -> Result<(), BenchError> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|c| {
            let (stop, done, mut work) = (stop.clone(), done.clone(), each(c));
            std::thread::spawn(move || -> Result<(), String> {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    work(i).map_err(|e| e.to_string())?;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .map_err(|_| BenchError::Setup("a bench thread panicked".into()))?
            .map_err(BenchError::Setup)?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64())
}

/// Creates tasks until the agent holds `n`; returns how many it holds.
fn fill(addr: SocketAddr, n: usize, clients: usize) -> Result<usize, BenchError> {
    let client = Client::new(addr);
    let held = list_json(&client)?.as_array().map_or(0, |a| a.len());
    create_tasks(addr, "held", &["/bin/true"], held..n, clients)?;
    // Wait until all are terminated so the memory figure is for finished tasks.
    loop {
        let list = list_json(&client)?;
        let arr = list.as_array().cloned().unwrap_or_default();
        if arr
            .iter()
            .all(|t| t["status"]["state"].get("terminated").is_some())
        {
            return Ok(arr.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates the tasks `{prefix}-{i}` for each `i` in `range`, running `command`, from
/// `clients` threads at once; each create must be answered `201`.
fn create_tasks(
    addr: SocketAddr,
    prefix: &str,
    command: &[&str],
    range: std::ops::Range<usize>,
    clients: usize,
) -> Result<(), BenchError> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let (prefix, command) = (Arc::new(prefix.to_string()), json!(command));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (next, prefix, command, end) =
                (next.clone(), prefix.clone(), command.clone(), range.end);
            std::thread::spawn(move || -> Result<(), String> {
                let client = Client::new(addr);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        return Ok(());
                    }
                    let body = json!({"name": format!("{prefix}-{i}"), "spec": {"process": {"command": command}}});
                    let (status, answer) = client
                        .post("/tasks", &body.to_string())
                        .map_err(|e| e.to_string())?;
                    if status != 201 {
                        return Err(format!("create: {status} {}", text(&answer)));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| BenchError::Setup("client panicked".into()))?
            .map_err(BenchError::Setup)?;
    }
    Ok(())
}

fn list_json(client: &Client) -> Result<serde_json::Value, BenchError> {
    let (_, body) = client.get("/getTasks")?;
    serde_json::from_slice(&body).map_err(|e| BenchError::Setup(format!("GET /getTasks: {e}")))
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(((s.len() as f64 - 1.0) * p / 100.0).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// Resident memory, and the part of it that is the agent's own (anonymous: heap, stacks,
/// relocated data). The rest is the binary's code pages, which the kernel maps 64 KiB
/// around each fault when they are in the page cache, so that part varies with how
/// recently the binary file was read.
fn rss_kib(pid: u32) -> Result<(u64, u64), BenchError> {
    let field = |file: &str, name: &str| -> Result<u64, BenchError> {
        procfs::Status::file(pid as i32, file)?
            .number(name)
            .ok_or_else(|| BenchError::Setup(format!("no {name} in /proc/{pid}/{file}")))
    };
    Ok((
        field("status", "VmRSS:")?,
        field("smaps_rollup", "Anonymous:")?,
    ))
}

fn cpu_ticks(pid: u32) -> Result<u64, BenchError> {
    let stat = procfs::stat(pid as i32)
        .ok_or_else(|| BenchError::Setup(format!("no /proc/{pid}/stat")))?;
    Ok(stat.utime + stat.stime)
}
