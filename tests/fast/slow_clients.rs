//! Slow and greedy clients against the real binary: thousands of idle connections and
//! header trickles don't starve `/health`, their fds are released, slow headers and idle
//! connections are closed, the connection limit refuses at once, and the open-file limit
//! is raised for the agent but not for its tasks. Latencies are printed, not asserted
//! (the bench reports them: `task-executor bench`); outcomes are asserted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::agent::{Agent, BIN, free_addr};
use crate::support::http;
use crate::support::wait_for;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use task_executor::bench::slow_clients::{self, Load, fd_count, percentile};

/// This test process holds thousands of sockets too.
fn raise_own_nofile() -> u64 {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

#[test]
fn health_answers_under_thousands_of_idle_and_trickling_connections() {
    let limit = raise_own_nofile();
    let idle = 5000.min(limit as usize / 2);
    let agent = Agent::start(&[]);
    let report = slow_clients::run(
        agent.addr,
        agent.pid() as u32,
        &Load {
            idle,
            trickling: 200,
            probe_for: Duration::from_secs(5),
        },
    )
    .unwrap();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!(
        "/health with {idle} idle + 200 trickling connections: {} probes, p50 {}, p99 {}, max {}; fds idle {} / loaded {} / after {} ({:.1} s); RSS {} -> {} KiB",
        report.health.len(),
        ms(percentile(&report.health, 50.0)),
        ms(percentile(&report.health, 99.0)),
        ms(report.health.iter().max().copied().unwrap_or_default()),
        report.fds_idle,
        report.fds_loaded,
        report.fds_after,
        report.settle.as_secs_f64(),
        report.rss_idle_kib,
        report.rss_loaded_kib
    );
    assert!(
        report.failures.is_empty(),
        "/health failed: {:?}",
        report.failures
    );
    assert!(
        report.health.len() >= 10,
        "too few probes: {}",
        report.health.len()
    );
    // The connections were really open at the agent (not refused, not yet timed out).
    assert!(
        report.fds_loaded >= report.fds_idle + idle + 200,
        "agent fds {} -> {}: the load was not held",
        report.fds_idle,
        report.fds_loaded
    );
    assert_eq!(
        report.fds_after, report.fds_idle,
        "the agent's fds did not return to idle after the clients left"
    );
}

/// Reads until the peer closes (Ok) or `limit` passes (Err).
fn wait_closed(s: &mut TcpStream, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while t.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Ok(t.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok(t.elapsed()),
        }
    }
    Err(format!("still open after {limit:?}"))
}

fn keep_alive_get(s: &mut TcpStream, path: &str) -> String {
    try_keep_alive_get(s, path).expect("the agent closed the connection before the answer")
}

/// One GET on a kept-alive connection; `None` when the agent closed it or it failed
/// before the whole answer came.
fn try_keep_alive_get(s: &mut TcpStream, path: &str) -> Option<String> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(b"}\n") {
        let n = s.read(&mut chunk).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[test]
fn slow_headers_and_idle_connections_are_closed_busy_ones_are_not() {
    let agent = Agent::start(&["--header-read-timeout=1s", "--idle-timeout=2s"]);
    let addr = agent.addr;
    let limit = Duration::from_secs(15);

    // A header that trickles in is cut off, though bytes keep coming.
    let mut slow = TcpStream::connect(addr).unwrap();
    let mut writer = slow.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let took = wait_closed(&mut slow, limit).expect("trickling header");
    println!("trickling header closed after {took:?} (header timeout 1 s)");
    trickler.join().unwrap();

    // A connection that never sends a request is closed too.
    let mut silent = TcpStream::connect(addr).unwrap();
    let took = wait_closed(&mut silent, limit).expect("silent connection");
    println!("silent connection closed after {took:?}");

    // A kept-alive connection: reused while fresh, closed once idle too long.
    let mut kept = TcpStream::connect(addr).unwrap();
    assert!(keep_alive_get(&mut kept, "/health").starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(keep_alive_get(&mut kept, "/readyz").starts_with("HTTP/1.1 200"));
    let took = wait_closed(&mut kept, limit).expect("idle keep-alive connection");
    println!("idle keep-alive connection closed after {took:?} (idle timeout 2 s)");

    // A request that takes longer than both timeouts (a long-poll) is answered.
    agent.run("sleeper", &["sleep", "30"]);
    let mut busy = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    let answer = keep_alive_get(&mut busy, "/tasks/sleeper?wait=3s");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        t.elapsed() >= Duration::from_secs(3),
        "the long-poll did not wait"
    );
    agent.delete("sleeper");
    assert_eq!(agent.call("GET", "/health", None).status, 200);
}

#[test]
fn connections_beyond_the_limit_are_refused_at_once() {
    let agent = Agent::start(&["--max-connections=20"]);
    let addr = agent.addr;
    // The start-up probe's connection can hold a slot for a moment after it closed,
    // so a connection refused while it goes is tried again.
    let mut held: Vec<TcpStream> = (0..20)
        .map(|_| {
            wait_for(Duration::from_secs(20), "a held connection", || {
                let mut s = TcpStream::connect(addr).unwrap();
                try_keep_alive_get(&mut s, "/health")
                    .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
                    .then_some(s)
            })
        })
        .collect();

    // The 21st gets a 503 (or a close) at once, not a wait.
    let t = Instant::now();
    let r = http::request(addr, "GET", "/health", None);
    let took = t.elapsed();
    match &r {
        Ok(r) => {
            assert_eq!(r.status, 503, "{}", r.text());
            assert_eq!(r.json()["code"], "Service Unavailable");
        }
        Err(e) => println!("refused connection ended with {e}"),
    }
    assert!(took < Duration::from_secs(5), "refusal took {took:?}");
    assert!(agent.log_text().contains("connection limit reached"));

    // Once some leave, new connections are served again.
    held.truncate(15);
    wait_for(Duration::from_secs(20), "a free connection slot", || {
        http::request(addr, "GET", "/health", None)
            .ok()
            .filter(|r| r.status == 200)
    });
    // The refusal is an answer like any other: logged and counted.
    if r.is_ok() {
        let metrics = http::request(addr, "GET", "/metrics", None).unwrap().text();
        assert!(
            crate::support::http_requests(&metrics, "unknown", "unmatched", 503) >= 1.0,
            "{metrics}"
        );
        assert!(
            crate::support::access_lines(&agent.log_text())
                .iter()
                .any(|l| crate::support::access_line_of(l, "unknown", "unmatched", 503)),
            "{}",
            agent.log_text()
        );
    }
    drop(held);
}

/// "Max open files" soft and hard limits from a /proc/PID/limits text.
fn nofile(limits: &str) -> (u64, u64) {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

#[test]
fn the_open_file_limit_is_raised_for_the_agent_but_not_for_tasks() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(hard > 1024, "hard limit {hard}: nothing to raise to");
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = free_addr();
    // Started as many runtimes start containers: soft limit 1024.
    let child = Command::new("sh")
        .args(["-c", "ulimit -Sn 1024 && exec \"$0\" \"$@\""])
        .arg(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-addr", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Stopped however the test ends, with whatever its tasks left running.
    struct Stop(std::process::Child, std::path::PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            crate::support::agent::kill_leftover_shims(&self.1);
        }
    }
    let _stop = Stop(child, dir.path().join("data"));
    wait_for(Duration::from_secs(20), "agent /health", || {
        http::request(addr, "GET", "/health", None)
            .ok()
            .filter(|r| r.status == 200)
    });
    let agent_limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert_eq!(nofile(&agent_limits), (hard, hard), "{agent_limits}");

    let task = r#"{"name":"limits","spec":{"process":{"command":["cat","/proc/self/limits"]}}}"#;
    let r = http::request(addr, "POST", "/tasks", Some(task.as_bytes())).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = http::request(addr, "GET", "/tasks/limits?wait=20s", None).unwrap();
    assert!(r.text().contains("terminated"), "{}", r.text());
    let out = std::fs::read_to_string(dir.path().join("data/limits/stdout.log")).unwrap();
    assert_eq!(nofile(&out), (1024, hard), "the task's limits:\n{out}");
    let fds = fd_count(pid).unwrap();
    assert!(fds < 1024, "{fds}");
}

/// A kept-alive connection parked between requests (see `api::server::park`) serves
/// what comes next: two pipelined requests in one write, then a POST with a body, then
/// a GET again.
#[test]
fn a_parked_connection_serves_pipelined_requests_and_bodies() {
    let agent = Agent::start(&[]);
    let mut s = TcpStream::connect(agent.addr).unwrap();
    assert!(keep_alive_get(&mut s, "/health").starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while buf.windows(2).filter(|w| w == b"}\n").count() < 2 {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(
        String::from_utf8_lossy(&buf)
            .matches("HTTP/1.1 200")
            .count(),
        2
    );
    std::thread::sleep(Duration::from_millis(200));
    let body = r#"{"name":"parked","spec":{"process":{"command":["true"]}}}"#;
    write!(
        s,
        "POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    while !buf.ends_with(b"}") && !buf.ends_with(b"}\n") {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 201"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(keep_alive_get(&mut s, "/health").starts_with("HTTP/1.1 200"));
}
