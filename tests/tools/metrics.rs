//! `GET /metrics` against the real agent, parsed by a real Prometheus parser (the Python
//! `prometheus_client` text and OpenMetrics parsers, from `scripts/install-api-tools`):
//! the counters move by exactly the tasks run, the histograms count them, a killed
//! supervisor is counted, CRI calls are timed, and the process's own figures are there.
//! Also the chart's scrape annotations and optional ServiceMonitor (helm, from
//! `scripts/install-helm-tools`). A missing tool fails the test.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::agent::{Agent, started_record};
use crate::support::containerd::{self, BUSYBOX};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Parses an exposition with prometheus_client; one entry per sample:
/// (name, labels) → value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

const PARSER: &str = r#"
import json, sys
text = sys.stdin.read()
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(text):
    for s in family.samples:
        out.append([s.name, s.labels, s.value, family.type])
print(json.dumps(out))
"#;

fn parse(text: &str, format: &str) -> Samples {
    let python = repo().join(".tools/api-venv/bin/python");
    assert!(
        python.exists(),
        "{} missing (run scripts/install-api-tools)",
        python.display()
    );
    let mut child = Command::new(python)
        .args(["-c", PARSER, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.into_iter()
        .map(|r| {
            let labels = r[1]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            (
                (r[0].as_str().unwrap().to_string(), labels),
                r[2].as_f64().unwrap(),
            )
        })
        .collect()
}

fn scrape(a: &Agent) -> Samples {
    let r = a.call("GET", "/metrics", None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse(&r.text(), "text")
}

fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.get(&(name.to_string(), want)).copied().unwrap_or(0.0)
}

#[test]
fn counters_move_by_exactly_the_tasks_run() {
    let a = Agent::start(&[]);
    let before = scrape(&a);
    for (i, code) in [0, 0, 0, 3, 7].iter().enumerate() {
        a.run_sh(&format!("t{i}"), &format!("sleep 0.1; exit {code}"));
    }
    a.run("never", &["/no/such/program"]);
    for i in 0..5 {
        a.wait_state(&format!("t{i}"), "terminated", T);
    }
    a.wait_state("never", "terminated", T);
    let after = scrape(&a);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let host = [("kind", "host")];
    assert_eq!(delta("task_executor_tasks_started_total", &host), 5.0);
    let ended = |reason| {
        delta(
            "task_executor_tasks_terminated_total",
            &[("kind", "host"), ("reason", reason)],
        )
    };
    assert_eq!(
        (
            ended("Succeeded"),
            ended("Failed"),
            ended("ProcessStartFailed")
        ),
        (3.0, 2.0, 1.0)
    );
    assert_eq!(
        value(
            &after,
            "task_executor_tasks",
            &[("kind", "host"), ("state", "terminated")]
        ),
        6.0
    );
    assert_eq!(
        delta("task_executor_task_start_latency_seconds_count", &host),
        5.0
    );
    assert_eq!(
        delta("task_executor_task_run_duration_seconds_count", &host),
        5.0
    );
    // Each ran at least 0.1 s; the sum is measured on the agent's clock.
    assert!(delta("task_executor_task_run_duration_seconds_sum", &host) >= 0.5);
    assert_eq!(
        value(
            &after,
            "task_executor_http_requests_total",
            &[("method", "POST"), ("route", "/tasks"), ("code", "201")]
        ),
        6.0
    );
    assert!(
        value(
            &after,
            "task_executor_http_request_duration_seconds_count",
            &[("method", "GET"), ("route", "/tasks/{name}")]
        ) >= 6.0
    );
    // No request path or name ever becomes a label value, but the `task` label of the
    // per-task usage (one series per task held, as cAdvisor's per container).
    assert!(
        after
            .iter()
            .filter(|((m, _), _)| !m.starts_with("task_executor_task_")
                || m.starts_with("task_executor_task_start_latency")
                || m.starts_with("task_executor_task_run_duration"))
            .all(|((_, l), _)| l.values().all(|v| !v.contains("t0")))
    );
    assert!(
        after
            .keys()
            .filter(|(_, l)| l.values().any(|v| v.contains("t0")))
            .all(|(_, l)| l.keys().eq(["task"]))
    );
    assert!(value(&after, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&after, "process_open_fds", &[]) >= 3.0);
    assert!(value(&after, "process_threads", &[]) >= 1.0);
    assert!(value(&after, "process_start_time_seconds", &[]) > 1.7e9);
    // (task_executor_watch_restarts_total: checked by the watch tests; no watch runs here.)
    // A running task is a gauge of its own.
    a.run_sh("long", "exec sleep 1000");
    a.wait_state("long", "running", T);
    let now = scrape(&a);
    assert_eq!(
        value(
            &now,
            "task_executor_tasks",
            &[("kind", "host"), ("state", "running")]
        ),
        1.0
    );
}

#[test]
fn a_restart_counts_no_task_of_the_earlier_agent_again_but_an_adopted_tasks_end() {
    let mut a = Agent::start(&[]);
    for i in 0..3 {
        a.run("t", &["true"]);
        a.wait_state("t", "terminated", T);
        a.delete("t");
        a.wait_gone("t", T);
        a.run(&format!("done{i}"), &["true"]);
        a.wait_state(&format!("done{i}"), "terminated", T);
    }
    // Ends after the restart, under the next agent process.
    a.run_sh("late", "sleep 2");
    a.wait_state("late", "running", T);
    let succeeded = |s: &Samples| {
        value(
            s,
            "task_executor_tasks_terminated_total",
            &[("kind", "host"), ("reason", "Succeeded")],
        )
    };
    assert_eq!(succeeded(&scrape(&a)), 6.0);
    a.restart();
    a.wait_state("done2", "terminated", T);
    let s = scrape(&a);
    assert_eq!(
        succeeded(&s),
        0.0,
        "the three tasks found ended at the start are no terminations of this process"
    );
    a.wait_state("late", "terminated", T);
    assert_eq!(succeeded(&scrape(&a)), 1.0, "the adopted task's end is");
    let whole = a.log_text();
    // The restarted agent's lines: from its first.
    let log = &whole[whole.rfind("process tasks get a cgroup each").unwrap()..];
    assert!(
        !log.contains("task state changed task=done0")
            && log.contains(
                "DEBUG task_executor::manager::events: task found ended at start task=done0"
            ),
        "a task found ended gets a line of its own at debug level only: {log}"
    );
    assert!(
        log.contains("found_ended=3"),
        "the recovery's line counts them: {log}"
    );
}

#[test]
fn openmetrics_when_the_scraper_asks_for_it() {
    let a = Agent::start(&[]);
    a.run("one", &["true"]);
    a.wait_state("one", "terminated", T);
    let r = crate::support::http::raw(
        a.addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
          Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let s = parse(&r.text(), "openmetrics");
    assert_eq!(
        value(
            &s,
            "task_executor_tasks_terminated_total",
            &[("kind", "host"), ("reason", "Succeeded")]
        ),
        1.0
    );
}

#[test]
fn a_killed_supervisor_is_counted() {
    let a = Agent::start(&[]);
    a.run_sh("orphan", "exec sleep 1000");
    a.wait_state("orphan", "running", T);
    let shim = started_record(&a.task_dir("orphan")).unwrap()["shim"]["pid"]
        .as_i64()
        .unwrap();
    Command::new("kill")
        .args(["-KILL", &shim.to_string()])
        .status()
        .unwrap();
    let t = a.wait_state("orphan", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    let s = scrape(&a);
    assert_eq!(value(&s, "task_executor_supervisors_lost_total", &[]), 1.0);
    assert_eq!(
        value(
            &s,
            "task_executor_tasks_terminated_total",
            &[("kind", "host"), ("reason", "SupervisorLost")]
        ),
        1.0
    );
}

#[test]
fn cri_calls_are_timed_by_method() {
    let cd = containerd::shared();
    let tmp = tempfile::Builder::new()
        .prefix("te-metrics-cri-")
        .tempdir()
        .unwrap();
    let socket = cd.socket.display().to_string();
    let a = Agent::start_in(
        &tmp.path().join("data"),
        &[
            "--enable-container-mode=true",
            "--cri-socket",
            &socket,
            "--reconcile-interval",
            "100ms",
        ],
    );
    let r = a.create(
        json!({"name": "c", "spec": {"container": {"image": BUSYBOX, "command": ["true"]}}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    a.wait_state("c", "terminated", T);
    let s = scrape(&a);
    for method in ["CreateContainer", "StartContainer", "ContainerStatus"] {
        assert!(
            value(
                &s,
                "task_executor_cri_request_duration_seconds_count",
                &[("method", method)]
            ) >= 1.0,
            "{method}"
        );
    }
    assert_eq!(
        value(
            &s,
            "task_executor_tasks_started_total",
            &[("kind", "container")]
        ),
        1.0
    );
}

fn helm_template(args: &[&str]) -> Vec<yaml_serde::Value> {
    let helm = repo().join(".tools/bin/helm");
    assert!(
        helm.exists(),
        "helm missing (run scripts/install-helm-tools)"
    );
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(helm)
        .args(["template", "sandbox", "charts/task-executor"])
        .args(args)
        .current_dir(repo())
        .env("HELM_CACHE_HOME", home.path())
        .env("HELM_CONFIG_HOME", home.path())
        .env("HELM_DATA_HOME", home.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_serde::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &yaml_serde::Value| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [yaml_serde::Value], kind: &str) -> Option<&'a yaml_serde::Value> {
    docs.iter().find(|d| d["kind"].as_str() == Some(kind))
}

#[test]
fn the_chart_announces_the_metrics_to_prometheus() {
    let plain = helm_template(&[]);
    let pod = &kind(&plain, "Deployment").unwrap()["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(pod["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(pod["prometheus.io/port"].as_str(), Some("5758"));
    assert_eq!(pod["prometheus.io/path"].as_str(), Some("/metrics"));
    assert!(kind(&plain, "ServiceMonitor").is_none(), "off by default");

    let with = helm_template(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prom",
        "--set",
        "metrics.podAnnotations=false",
    ]);
    let sm = kind(&with, "ServiceMonitor").unwrap();
    assert_eq!(sm["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(sm["metadata"]["labels"]["release"].as_str(), Some("prom"));
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["port"].as_str(), Some("task-api"));
    assert_eq!(ep["path"].as_str(), Some("/metrics"));
    // It selects the Service (rendered for it), which selects the agent pods.
    let svc = kind(&with, "Service").expect("a ServiceMonitor needs the Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v);
    }
    assert_eq!(svc["spec"]["ports"][0]["name"].as_str(), Some("task-api"));
    let pod = &kind(&with, "Deployment").unwrap()["spec"]["template"]["metadata"];
    assert!(pod["annotations"]["prometheus.io/scrape"].is_null());
}

#[test]
fn the_access_log_has_one_line_per_request_and_no_query_value() {
    let a = Agent::start(&[]); // the harness runs agents at LOG_LEVEL=debug
    a.run("visible", &["true"]);
    a.wait_state("visible", "terminated", T);
    let access = || -> Vec<String> {
        a.log_text()
            .lines()
            .filter(|l| l.contains("task_executor::api::access_log"))
            .map(str::to_string)
            .collect()
    };
    let before = access().len();
    assert_eq!(
        a.call("GET", "/tasks/visible?wait=hunter2", None).status,
        400
    );
    assert_eq!(
        a.call(
            "GET",
            "/tasks/visible/logs?sinceTime=hunter2&tailLines=1",
            None
        )
        .status,
        400
    );
    let logs = a.call(
        "GET",
        "/tasks/visible/logs?follow=true&timestamps=true",
        None,
    );
    assert_eq!(logs.status, 200);
    let lines = crate::support::wait_for(T, "three access lines", || {
        Some(access()).filter(|l| l.len() >= before + 3)
    });
    assert_eq!(lines.len(), before + 3, "{lines:#?}");
    let new = &lines[before..];
    for (line, route, status) in [
        (&new[0], "/tasks/{name}", "400"),
        (&new[1], "/tasks/{name}/logs", "400"),
        (&new[2], "/tasks/{name}/logs", "200"),
    ] {
        for field in [
            "method=\"GET\"".to_string(),
            format!("route=\"{route}\""),
            format!("status={status}"),
            "duration_ms=".into(),
            "bytes=".into(),
        ] {
            assert!(line.contains(&field), "{field} not in {line}");
        }
    }
    assert!(
        new[2].contains(&format!("bytes={}", logs.body.len())),
        "{}",
        new[2]
    );
    assert!(
        !a.log_text().contains("hunter2"),
        "a query value reached the log"
    );
    // A log file is no terminal: no colour codes in it.
    assert!(
        !a.log_text().contains('\x1b'),
        "terminal colour codes in the log file"
    );
}
