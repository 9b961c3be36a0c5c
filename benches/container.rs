//! Benchmark of container mode against the shared test containerd: create→running and
//! create→terminated of a busybox `true` task through the agent's HTTP API, beside the
//! same steps made as raw CRI calls in the same run.
//!
//! Run (as root, like the tests): `cargo bench --bench container` (BENCH_N sets the
//! iterations, default 10). It shares the tests' containerd set-up.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::{ContainerConfig, ContainerMetadata, ContainerState};
use serde_json::json;
use support::agent::Agent;
use support::containerd::{self, BUSYBOX};
use task_executor::runtime::container::cri::{Cri, GrpcCri, image_spec};
use task_executor::runtime::container::sandbox::owned_config;

struct Stats(Vec<Duration>);

impl Stats {
    fn row(&self, what: &str) -> String {
        let mut v = self.0.clone();
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
        let p = |q: f64| ms(v[((v.len() as f64 - 1.0) * q).round() as usize]);
        format!(
            "| {what:<44} | {:>7.1} | {:>7.1} | {:>7.1} | {:>7.1} |",
            p(0.5),
            p(0.9),
            mean,
            ms(v[0])
        )
    }
}

fn raw_cri(n: usize) -> (Stats, Stats) {
    let cd = containerd::shared();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cri = GrpcCri::new(&cd.socket).unwrap();
        let id = format!("bench-{}", std::process::id());
        let mut sb_cfg = owned_config(&id, 0);
        let logs = tempfile::tempdir().unwrap();
        let sb = cri.run_pod_sandbox(sb_cfg.clone()).await.unwrap();
        sb_cfg.log_directory = logs.path().display().to_string();
        let (mut running, mut exited) = (Vec::new(), Vec::new());
        for i in 0..n {
            let t0 = Instant::now();
            let cfg = ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: format!("raw-{i}"),
                    attempt: 0,
                }),
                image: Some(image_spec(BUSYBOX)),
                command: vec!["true".into()],
                log_path: format!("raw-{i}.log"),
                labels: HashMap::new(),
                ..Default::default()
            };
            let c = cri
                .create_container(&sb, cfg, sb_cfg.clone())
                .await
                .unwrap();
            cri.start_container(&c).await.unwrap();
            running.push(t0.elapsed());
            loop {
                let s = cri.container_status(&c, false).await.unwrap();
                if s.status.unwrap().state == ContainerState::ContainerExited as i32 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            exited.push(t0.elapsed());
            cri.remove_container(&c).await.unwrap();
        }
        cri.stop_pod_sandbox(&sb).await.unwrap();
        cri.remove_pod_sandbox(&sb).await.unwrap();
        (Stats(running), Stats(exited))
    })
}

fn via_agent(n: usize, interval: &str) -> (Stats, Stats) {
    let cd = containerd::shared();
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Agent::start_in(
        &tmp.path().join("data"),
        &[
            "--enable-container-mode=true",
            "--cri-socket",
            cd.socket.to_str().unwrap(),
            "--reconcile-interval",
            interval,
            "--log-level",
            "warn",
        ],
    );
    // Warm-up: the agent creates its sandbox on first use.
    a.create_ok(
        &json!({"name": "warm", "spec": {"container": {"image": BUSYBOX, "command": ["true"]}}}),
    );
    a.wait_state("warm", "terminated", Duration::from_secs(30));
    let (mut running, mut done) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("t{i}");
        let t0 = Instant::now();
        // POST /tasks answers once the runtime reports the container started.
        let v = a.create_ok(
            &json!({"name": name, "spec": {"container": {"image": BUSYBOX, "command": ["true"]}}}),
        );
        running.push(t0.elapsed());
        if v["status"]["state"].get("terminated").is_none() {
            loop {
                let t = a.get(&name).unwrap();
                if t["status"]["state"].get("terminated").is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        done.push(t0.elapsed());
    }
    a.delete_all_and_stop();
    (Stats(running), Stats(done))
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let (raw_run, raw_exit) = raw_cri(n);
    let (a_run, a_exit) = via_agent(n, "500ms");
    let (f_run, f_exit) = via_agent(n, "50ms");
    println!("\nbusybox `true`, {n} runs each (ms)");
    println!(
        "| {:<44} | {:>7} | {:>7} | {:>7} | {:>7} |",
        "step", "p50", "p90", "mean", "min"
    );
    println!("|{:-<46}|{:->9}|{:->9}|{:->9}|{:->9}|", "", "", "", "", "");
    for (s, what) in [
        (&raw_run, "raw CRI: Create+StartContainer"),
        (&raw_exit, "raw CRI: create → EXITED (1 ms status poll)"),
        (&a_run, "agent: POST /tasks → started (poll 500ms)"),
        (&a_exit, "agent: create → terminated (poll 500ms)"),
        (&f_run, "agent: POST /tasks → started (poll 50ms)"),
        (&f_exit, "agent: create → terminated (poll 50ms)"),
    ] {
        println!("{}", s.row(what));
    }
}
