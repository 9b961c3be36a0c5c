//! Slow and greedy clients: many idle kept-alive connections plus clients that send a
//! request header one byte a second, while `/health` is asked on fresh connections.
//! Shared by `task-executor bench` (which prints the figures) and tests/fast/slow_clients.rs
//! (which checks the outcome: every probe answered, the agent's fds back to idle).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Load {
    /// Connections that make one request, then stay open and idle.
    pub idle: usize,
    /// Connections that send a request header one byte a second.
    pub trickling: usize,
    /// How long `/health` is probed (every 100 ms) while they are open.
    pub probe_for: Duration,
}

#[derive(Clone, Debug)]
pub struct Report {
    /// Latency of each `/health` probe that was answered 200.
    pub health: Vec<Duration>,
    /// Probes that failed or were not 200, with why.
    pub failures: Vec<String>,
    /// The agent's open fds before, with the load open, and after it went.
    pub fds_idle: usize,
    pub fds_loaded: usize,
    pub fds_after: usize,
    /// The agent's resident memory (KiB) before, with the idle connections open (before
    /// the trickling ones), and with the whole load open.
    pub rss_idle_kib: u64,
    pub rss_idle_conns_kib: u64,
    /// Idle connections opened.
    pub idle: usize,
    pub rss_loaded_kib: u64,
    /// Time from closing the clients to the fds being back (or the wait giving up).
    pub settle: Duration,
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

pub fn run(addr: SocketAddr, agent_pid: u32, load: &Load) -> std::io::Result<Report> {
    probe_health(addr)?;
    std::thread::sleep(Duration::from_millis(300));
    let fds_idle = fd_count(agent_pid)?;
    let rss_idle_kib = rss_kib(agent_pid)?;

    // Idle keep-alive connections, each after one answered request (one at a time, so
    // the listen backlog never overflows into SYN retries).
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut idle = Vec::with_capacity(load.idle);
    for _ in 0..load.idle {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.write_all(request.as_bytes())?;
        read_health_answer(&mut s)?;
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle_conns_kib = rss_kib(agent_pid)?;

    // Trickling headers, one byte a second on each connection, from one thread.
    let trickle: Vec<TcpStream> = (0..load.trickling)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
        .collect::<Result<_, _>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        let header = request.into_bytes();
        std::thread::spawn(move || {
            let mut trickle = trickle;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let byte = [header[i % header.len()]];
                for s in &mut trickle {
                    // The agent cuts them off after its header timeout: errors are expected.
                    let _ = s.write(&byte);
                }
                i += 1;
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(1) && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            drop(trickle);
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let fds_loaded = fd_count(agent_pid)?;
    let rss_loaded_kib = rss_kib(agent_pid)?;

    let mut health = Vec::new();
    let mut failures = Vec::new();
    let until = Instant::now() + load.probe_for;
    while Instant::now() < until {
        let t = Instant::now();
        match probe_health(addr) {
            Ok(()) => health.push(t.elapsed()),
            Err(e) => failures.push(e.to_string()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    drop(idle);
    let closed = Instant::now();
    let mut fds_after = fd_count(agent_pid)?;
    while fds_after > fds_idle && closed.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
        fds_after = fd_count(agent_pid)?;
    }
    Ok(Report {
        health,
        failures,
        fds_idle,
        fds_loaded,
        fds_after,
        rss_idle_kib,
        rss_idle_conns_kib,
        idle: load.idle,
        rss_loaded_kib,
        settle: closed.elapsed(),
    })
}

fn rss_kib(pid: u32) -> std::io::Result<u64> {
    Ok(crate::sys::procfs::Status::of(pid as i32)?
        .number("VmRSS:")
        .unwrap_or(0))
}

/// Reads one `/health` answer (Content-Length framed) from a kept-alive connection.
/// `GET /health` on a fresh connection (as a liveness probe makes it); an error unless
/// the answer is a 200.
fn probe_health(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    if answer.starts_with(b"HTTP/1.1 200 ") {
        Ok(())
    } else {
        let head = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
        Err(std::io::Error::other(format!("not a 200: {head}")))
    }
}

fn read_health_answer(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the answer",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.ends_with(b"}\n") {
            return Ok(());
        }
    }
}

/// p-th percentile of durations (0 when there are none).
pub fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(((s.len() as f64 - 1.0) * p / 100.0).round() as usize)
        .copied()
        .unwrap_or_default()
}
