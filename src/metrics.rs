//! Prometheus metrics, rendered by `GET /metrics` with the `prometheus-client` crate.
//!
//! One process-wide registry (a `LazyLock`), as the `prometheus` crate's default registry
//! is: metrics are recorded in every layer (HTTP, manager, runtimes, Kubernetes watch), and
//! threading a handle through all their constructors would couple them for no gain. This
//! module is a leaf: it imports nothing else of the crate, so any layer may call it.
//!
//! Tasks by state and kind are not counted here but by the caller of [`render`], at scrape
//! time, from the task set itself: a gauge kept by increments would drift the first time a
//! path forgets one.

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::sys::procfs;

/// `Content-Type` of the OpenMetrics text format (what Prometheus asks for first).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format 0.0.4 (what curl gets).
pub const TEXT_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    kind: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    kind: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    resource: String,
    why: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainmentLabels {
    mechanism: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CriLabels {
    method: String,
}

/// What one task used, as its cgroups counted it: a running task's now, an ended one's at
/// its end (`memory_bytes` only while it runs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskUsage {
    pub task: String,
    pub cpu_seconds: Option<f64>,
    pub memory_peak_bytes: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
}

struct Metrics {
    registry: Registry,
    tasks: Family<StateLabels, Gauge>,
    started: Family<KindLabels, Counter>,
    terminated: Family<ReasonLabels, Counter>,
    start_latency: Family<KindLabels, Histogram>,
    run_duration: Family<KindLabels, Histogram>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    supervisors_lost: Counter,
    watch_restarts: Family<WatchLabels, Counter>,
    cri_duration: Family<CriLabels, Histogram>,
    containment: Family<ContainmentLabels, Gauge>,
    /// What each task used, for the scrape being encoded (empty between scrapes).
    usage: Arc<Mutex<Vec<TaskUsage>>>,
    /// Serialises scrapes: the task gauge and the per-task usage are refilled for each.
    render: Mutex<()>,
}

/// Seconds, from 0.5 ms up: HTTP handling and CRI calls.
fn call_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
}

/// Seconds, from 1 ms to a minute: create → running.
fn start_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

/// Seconds, from 10 ms to a day: how long tasks run.
fn run_buckets() -> Vec<f64> {
    vec![
        0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
    ]
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut root = Registry::default();
    let r = root.sub_registry_with_prefix("task_executor");
    let tasks = Family::<StateLabels, Gauge>::default();
    r.register(
        "tasks",
        "Tasks the agent holds, by kind and state",
        tasks.clone(),
    );
    let started = Family::<KindLabels, Counter>::default();
    r.register(
        "tasks_started",
        "Tasks that started running (created since the agent started)",
        started.clone(),
    );
    let terminated = Family::<ReasonLabels, Counter>::default();
    r.register(
        "tasks_terminated",
        "Tasks that terminated while this agent process ran, by reason (not those it found ended at its start)",
        terminated.clone(),
    );
    let start_latency =
        Family::<KindLabels, Histogram>::new_with_constructor(|| Histogram::new(start_buckets()));
    r.register_with_unit(
        "task_start_latency",
        "Time from a task's creation to its start",
        Unit::Seconds,
        start_latency.clone(),
    );
    let run_duration =
        Family::<KindLabels, Histogram>::new_with_constructor(|| Histogram::new(run_buckets()));
    r.register_with_unit(
        "task_run_duration",
        "Time from a task's start to its end",
        Unit::Seconds,
        run_duration.clone(),
    );
    let requests = Family::<RequestLabels, Counter>::default();
    r.register(
        "http_requests",
        "HTTP requests, by method, route template and status code",
        requests.clone(),
    );
    let request_duration =
        Family::<RouteLabels, Histogram>::new_with_constructor(|| Histogram::new(call_buckets()));
    r.register_with_unit(
        "http_request_duration",
        "Time to answer an HTTP request (to the response head; a log stream's body may last longer)",
        Unit::Seconds,
        request_duration.clone(),
    );
    let supervisors_lost = Counter::default();
    r.register(
        "supervisors_lost",
        "Task supervisors (shims) that died without recording the task's exit",
        supervisors_lost.clone(),
    );
    let watch_restarts = Family::<WatchLabels, Counter>::default();
    r.register(
        "watch_restarts",
        "Restarts of the Kubernetes watches (Task, Pod), by why: a fresh list (first start or 410 Gone) or a failed request",
        watch_restarts.clone(),
    );
    let cri_duration =
        Family::<CriLabels, Histogram>::new_with_constructor(|| Histogram::new(call_buckets()));
    r.register_with_unit(
        "cri_request_duration",
        "Latency of CRI calls to the container runtime, by method",
        Unit::Seconds,
        cri_duration.clone(),
    );
    let containment = Family::<ContainmentLabels, Gauge>::default();
    r.register(
        "containment",
        "1 for how process tasks are contained: cgroup-v2, cgroup-v1-freezer, or none",
        containment.clone(),
    );
    let usage = Arc::new(Mutex::new(Vec::new()));
    r.register_collector(Box::new(UsageCollector(usage.clone())));
    // The process metrics keep their conventional names (no prefix).
    root.register_collector(Box::new(ProcessCollector));
    Metrics {
        registry: root,
        tasks,
        started,
        terminated,
        start_latency,
        run_duration,
        requests,
        request_duration,
        supervisors_lost,
        watch_restarts,
        cri_duration,
        containment,
        usage,
        render: Mutex::new(()),
    }
});

/// A task started running; `start_latency` is the time since its creation.
pub fn task_started(kind: &str, start_latency: Option<Duration>) {
    let m = &*METRICS;
    let k = KindLabels { kind: kind.into() };
    m.started.get_or_create(&k).inc();
    if let Some(d) = start_latency {
        m.start_latency.get_or_create(&k).observe(d.as_secs_f64());
    }
}

/// A task terminated with `reason`; `ran` is how long it ran, when it did.
pub fn task_terminated(kind: &str, reason: &str, ran: Option<Duration>) {
    let m = &*METRICS;
    m.terminated
        .get_or_create(&ReasonLabels {
            kind: kind.into(),
            reason: reason.into(),
        })
        .inc();
    if let Some(d) = ran {
        m.run_duration
            .get_or_create(&KindLabels { kind: kind.into() })
            .observe(d.as_secs_f64());
    }
}

/// How process tasks are contained (set once at start).
pub fn containment(mechanism: &str) {
    METRICS
        .containment
        .get_or_create(&ContainmentLabels {
            mechanism: mechanism.into(),
        })
        .set(1);
}

/// A task's supervisor was found dead without an exit record.
pub fn supervisor_lost() {
    METRICS.supervisors_lost.inc();
}

/// A Kubernetes watch of `resource` started over: `why` is `relist` or `failed`.
pub fn watch_restarted(resource: &str, why: &str) {
    METRICS
        .watch_restarts
        .get_or_create(&WatchLabels {
            resource: resource.into(),
            why: why.into(),
        })
        .inc();
}

/// One CRI call took `took`; `method` is the gRPC method's name (e.g. `ContainerStatus`).
pub fn cri_call(method: &str, took: Duration) {
    METRICS
        .cri_duration
        .get_or_create(&CriLabels {
            method: method.into(),
        })
        .observe(took.as_secs_f64());
}

/// One HTTP request was answered (its head sent) after `took`.
pub fn http_request(method: &str, route: &str, code: u16, took: Duration) {
    let m = &*METRICS;
    m.requests
        .get_or_create(&RequestLabels {
            method: method.into(),
            route: route.into(),
            code,
        })
        .inc();
    m.request_duration
        .get_or_create(&RouteLabels {
            method: method.into(),
            route: route.into(),
        })
        .observe(took.as_secs_f64());
}

/// The exposition of every metric. `tasks` are the counts of the tasks held now, by
/// (kind, state); `usage` what each task held now used; `openmetrics` chooses
/// OpenMetrics text over Prometheus text 0.0.4.
pub fn render(tasks: &[(&str, &str, u64)], usage: Vec<TaskUsage>, openmetrics: bool) -> String {
    let m = &*METRICS;
    let _one_at_a_time = m.render.lock().unwrap_or_else(|e| e.into_inner());
    m.tasks.clear();
    for (kind, state, n) in tasks {
        m.tasks
            .get_or_create(&StateLabels {
                kind: (*kind).into(),
                state: (*state).into(),
            })
            .set(*n as i64);
    }
    // Three or four lines a task of ~50 bytes each, besides the rest: sized once, not
    // doubled through the sizes on the way to a megabyte with 10,000 tasks.
    let mut out = String::with_capacity(16 * 1024 + usage.len() * 200);
    *lock(&m.usage) = usage;
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &m.registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry)
    };
    lock(&m.usage).clear();
    if encoded.is_err() {
        // Writing to a String cannot fail; keep the answer well-formed regardless.
        out.clear();
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The per-task usage families, encoded from the scrape's snapshot. Not a `Family` per
/// metric: those keep a label set and a metric for every task ever scraped until cleared,
/// and a cleared map keeps its capacity (measured: 30 scrapes with 10,000 tasks left
/// 4 MiB more resident).
#[derive(Debug)]
struct UsageCollector(Arc<Mutex<Vec<TaskUsage>>>);

impl Collector for UsageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let usage = lock(&self.0);
        // Help texts end with a period, as `Registry::register` writes them.
        family(
            &mut encoder,
            "task_cpu_usage",
            "CPU time a process task's cgroup used (user and system), by task: now while it runs, at its main command's end after.",
            Some(&Unit::Seconds),
            &usage,
            |u| u.cpu_seconds.map(ConstCounter::new),
        )?;
        family(
            &mut encoder,
            "task_memory_peak",
            "The most memory a process task's cgroup held at once, by task.",
            Some(&Unit::Bytes),
            &usage,
            |u| u.memory_peak_bytes.map(|b| ConstGauge::new(b as i64)),
        )?;
        family(
            &mut encoder,
            "task_memory_usage",
            "Memory a running process task's cgroup holds now, by task.",
            Some(&Unit::Bytes),
            &usage,
            |u| u.memory_bytes.map(|b| ConstGauge::new(b as i64)),
        )?;
        family(
            &mut encoder,
            "task_oom_kills",
            "Processes of a process task the kernel's OOM killer ended, by task.",
            None,
            &usage,
            |u| u.oom_kills.map(ConstCounter::new),
        )
    }
}

/// One per-task family: its descriptor and a sample for each task that has a value; left
/// out when none has (as an empty `Family` is).
fn family<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    usage: &[TaskUsage],
    value: impl Fn(&TaskUsage) -> Option<M>,
) -> Result<(), std::fmt::Error> {
    if !usage.iter().any(|u| value(u).is_some()) {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, unit, M::TYPE)?;
    for u in usage {
        if let Some(v) = value(u) {
            v.encode(family.encode_family(&[("task", u.task.as_str())])?)?;
        }
    }
    Ok(())
}

/// When this process started (ms since the Unix epoch, 10 ms precision), from /proc.
pub fn process_start_unix_ms() -> Option<i64> {
    static START: LazyLock<Option<i64>> =
        LazyLock::new(|| ProcessStats::read().map(|p| (p.start_time_seconds * 1000.0) as i64));
    *START
}

/// The agent's own resources, read from /proc at scrape time.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = ProcessStats::read() else {
            return Ok(());
        };
        let gauges: [(&str, &str, Option<Unit>, f64); 4] = [
            (
                "process_resident_memory",
                "Resident set size of the agent",
                Some(Unit::Bytes),
                p.rss_bytes as f64,
            ),
            (
                "process_open_fds",
                "File descriptors the agent holds open",
                None,
                p.open_fds as f64,
            ),
            (
                "process_threads",
                "Threads of the agent",
                None,
                p.threads as f64,
            ),
            (
                "process_start_time",
                "Start time of the agent since the Unix epoch",
                Some(Unit::Seconds),
                p.start_time_seconds,
            ),
        ];
        for (name, help, unit, value) in gauges {
            let g = ConstGauge::new(value);
            let enc = encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?;
            g.encode(enc)?;
        }
        let cpu = ConstCounter::new(p.cpu_seconds);
        let enc = encoder.encode_descriptor(
            "process_cpu",
            "User and system CPU time the agent used",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?;
        cpu.encode(enc)
    }
}

struct ProcessStats {
    rss_bytes: u64,
    open_fds: u64,
    threads: u64,
    cpu_seconds: f64,
    start_time_seconds: f64,
}

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        // USER_HZ, the unit of /proc's tick counts, is 100 on every Linux architecture.
        const TICKS: f64 = 100.0;
        let stat = procfs::stat(std::process::id() as i32)?;
        let status = procfs::Status::own().ok()?;
        let boot = procfs::boot_time_seconds()?;
        Some(ProcessStats {
            rss_bytes: status.number("VmRSS:")? * 1024,
            open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as u64,
            threads: stat.threads,
            cpu_seconds: (stat.utime + stat.stime) as f64 / TICKS,
            start_time_seconds: boot as f64 + stat.start_time as f64 / TICKS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_formats_with_process_metrics() {
        task_started("unit-test", Some(Duration::from_millis(3)));
        task_terminated("unit-test", "Succeeded", Some(Duration::from_millis(20)));
        let used = TaskUsage {
            task: "unit-task".into(),
            cpu_seconds: Some(1.5),
            memory_peak_bytes: Some(4096),
            memory_bytes: None,
            oom_kills: Some(1),
        };
        let text = render(&[("unit-test", "running", 2)], vec![used], false);
        assert!(
            text.contains("task_executor_task_cpu_usage_seconds_total{task=\"unit-task\"} 1.5"),
            "{text}"
        );
        assert!(text.contains("task_executor_task_memory_peak_bytes{task=\"unit-task\"} 4096"));
        assert!(text.contains("task_executor_task_oom_kills_total{task=\"unit-task\"} 1"));
        assert!(
            !text.contains("task_executor_task_memory_usage_bytes"),
            "a family no task has a value of is left out, descriptor and all: {text}"
        );
        assert!(text.contains("task_executor_tasks{kind=\"unit-test\",state=\"running\"} 2"));
        assert!(text.contains("task_executor_tasks_started_total{kind=\"unit-test\"}"));
        assert!(text.contains("process_open_fds "));
        assert!(text.contains("process_resident_memory_bytes "));
        assert!(!text.contains("# EOF"));
        let two = ["task-a", "task-b"].map(|task| TaskUsage {
            task: task.into(),
            memory_bytes: Some(8192),
            ..Default::default()
        });
        let om = render(&[], two.to_vec(), true);
        for task in ["task-a", "task-b"] {
            let line = format!("task_executor_task_memory_usage_bytes{{task=\"{task}\"}} 8192\n");
            assert_eq!(om.matches(&line).count(), 1, "{om}");
        }
        assert!(om.contains(
            "# TYPE task_executor_task_memory_usage_bytes gauge\n# UNIT task_executor_task_memory_usage_bytes bytes\n"
        ));
        assert!(om.ends_with("# EOF\n"), "{om}");
        let om = render(&[], Vec::new(), true);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(
            !om.contains("state=\"running\""),
            "the gauge is refilled per scrape"
        );
        assert!(!om.contains("unit-task"), "so is the usage");
    }
}
