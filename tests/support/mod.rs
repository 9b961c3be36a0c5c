//! Shared test support: a harness around the real agent binary and a tiny HTTP client.
#![allow(dead_code)] // each test binary uses a different part

pub mod agent;
pub mod containerd;
pub mod fake_apiserver;
pub mod fake_reviews;
pub mod http;
pub mod init;
pub mod jail;
pub mod shipped;
pub mod standin;

use std::time::{Duration, Instant};

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    task_executor::sys::procfs::stat(pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X'))
}

/// Pids of live (non-zombie) processes whose argv is exactly `argv`.
pub fn pids_with_cmdline(argv: &[&str]) -> Vec<i32> {
    let want = argv.join("\0");
    task_executor::sys::procfs::pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let raw = raw.strip_suffix(b"\0").unwrap_or(&raw);
                raw == want.as_bytes()
            })
        })
        .filter(|pid| pid_alive(*pid))
        .collect()
}

/// The access log's lines (one per answer, `api::access_log`) in an agent's log.
pub fn access_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("task_executor::api::access_log"))
        .map(str::to_string)
        .collect()
}

/// Whether an access line answers `method` on `route` with `status`.
pub fn access_line_of(line: &str, method: &str, route: &str, status: u16) -> bool {
    line.contains(&format!("method=\"{method}\""))
        && line.contains(&format!("route=\"{route}\""))
        && line.contains(&format!("status={status} "))
}

/// The `http_requests` counter of one method, route template and status in a /metrics
/// text (0 without that series).
pub fn http_requests(metrics: &str, method: &str, route: &str, code: u16) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("task_executor_http_requests_total{"))
        .filter(|l| {
            l.contains(&format!("method=\"{method}\""))
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("code=\"{code}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
