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
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
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
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TaskUsage {
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
    /// Serialises scrapes: the task gauge is refilled for each.
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

/// The exposition of every metric but the per-task ones (see `TaskFamily`), and without
/// OpenMetrics' closing `# EOF` (see `end`). `tasks` are the counts of the tasks held now,
/// by (kind, state); `openmetrics` chooses OpenMetrics text over Prometheus text 0.0.4.
pub fn render(tasks: &[(&str, &str, u64)], openmetrics: bool) -> String {
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
    let mut out = String::with_capacity(16 * 1024);
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &m.registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry)
    };
    if encoded.is_err() {
        // Writing to a String cannot fail; keep the answer well-formed regardless.
        out.clear();
        let _ = writeln!(out, "# encoding failed");
    }
    if let Some(body) = out.strip_suffix(EOF) {
        out.truncate(body.len());
    }
    out
}

const EOF: &str = "# EOF\n";

/// What closes an exposition: OpenMetrics' `# EOF`, nothing for Prometheus text.
pub fn end(openmetrics: bool) -> &'static str {
    if openmetrics { EOF } else { "" }
}

/// A per-task metric family, written here rather than by `prometheus-client`, a sample at
/// a time: its encoder writes a family whole into one string, and with 10,000 tasks that
/// was a 1.3 MB answer and an 800 kB vector of every task's usage per scrape, which glibc
/// then kept (30 scrapes: 2 MiB more resident; its mmap threshold rises to the largest
/// buffer freed). The format is the crate's, byte for byte (checked by a test against
/// its encoder).
#[derive(Clone, Copy, Debug)]
pub struct TaskFamily {
    /// With the prefix and the unit; a counter's samples add `_total`.
    name: &'static str,
    help: &'static str,
    unit: Option<&'static str>,
    counter: bool,
    value: fn(&TaskUsage) -> Option<Sample>,
}

#[derive(Clone, Copy, Debug)]
enum Sample {
    Float(f64),
    Int(u64),
}

/// The per-task families, in the order they are written.
pub const TASK_FAMILIES: [TaskFamily; 4] = [
    TaskFamily {
        name: "task_executor_task_cpu_usage_seconds",
        help: "CPU time a process task's cgroup used (user and system), by task: now while it runs, at its main command's end after.",
        unit: Some("seconds"),
        counter: true,
        value: |u| u.cpu_seconds.map(Sample::Float),
    },
    TaskFamily {
        name: "task_executor_task_memory_peak_bytes",
        help: "The most memory a process task's cgroup held at once, by task.",
        unit: Some("bytes"),
        counter: false,
        value: |u| u.memory_peak_bytes.map(Sample::Int),
    },
    TaskFamily {
        name: "task_executor_task_memory_usage_bytes",
        help: "Memory a running process task's cgroup holds now, by task.",
        unit: Some("bytes"),
        counter: false,
        value: |u| u.memory_bytes.map(Sample::Int),
    },
    TaskFamily {
        name: "task_executor_task_oom_kills",
        help: "Processes of a process task the kernel's OOM killer ended, by task.",
        unit: None,
        counter: true,
        value: |u| u.oom_kills.map(Sample::Int),
    },
];

impl TaskFamily {
    /// Whether `usage` has a sample of this family.
    pub fn has(&self, usage: &TaskUsage) -> bool {
        (self.value)(usage).is_some()
    }

    /// The family's descriptor, written before its first sample (a family without
    /// samples is left out, as `prometheus-client` leaves out an empty one).
    pub fn write_head(&self, out: &mut impl std::fmt::Write, openmetrics: bool) {
        let kind = if self.counter { "counter" } else { "gauge" };
        // Writing to memory cannot fail.
        let _ = if openmetrics {
            let unit = self
                .unit
                .map(|u| format!("# UNIT {} {u}\n", self.name))
                .unwrap_or_default();
            write!(
                out,
                "# HELP {n} {h}\n# TYPE {n} {kind}\n{unit}",
                n = self.name,
                h = self.help
            )
        } else {
            // Prometheus text names a counter's family by its samples' name.
            let total = if self.counter { "_total" } else { "" };
            write!(
                out,
                "# HELP {n}{total} {h}\n# TYPE {n}{total} {kind}\n",
                n = self.name,
                h = self.help
            )
        };
    }

    /// The task's sample, if it has one.
    pub fn write_sample(&self, out: &mut impl std::fmt::Write, task: &str, usage: &TaskUsage) {
        let Some(v) = (self.value)(usage) else {
            return;
        };
        let total = if self.counter { "_total" } else { "" };
        let _ = write!(out, "{}{total}{{task=\"", self.name);
        for c in task.chars() {
            let _ = match c {
                '\\' => out.write_str("\\\\"),
                '"' => out.write_str("\\\""),
                '\n' => out.write_str("\\n"),
                c => out.write_char(c),
            };
        }
        let _ = match v {
            Sample::Float(f) => writeln!(out, "\"}} {}", dtoa::Buffer::new().format(f)),
            Sample::Int(i) => writeln!(out, "\"}} {i}"),
        };
    }
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
    use prometheus_client::encoding::EncodeCounterValue;
    use prometheus_client::metrics::MetricType;

    use super::*;

    /// The whole exposition, as `GET /metrics` assembles it.
    fn exposition(tasks: &[(&str, &str, u64)], usage: &[(&str, TaskUsage)], om: bool) -> String {
        let mut out = render(tasks, om);
        for family in TASK_FAMILIES {
            if usage.iter().any(|(_, u)| family.has(u)) {
                family.write_head(&mut out, om);
            }
            for (task, u) in usage {
                family.write_sample(&mut out, task, u);
            }
        }
        out + end(om)
    }

    #[test]
    fn renders_both_formats_with_process_metrics() {
        task_started("unit-test", Some(Duration::from_millis(3)));
        task_terminated("unit-test", "Succeeded", Some(Duration::from_millis(20)));
        let used = TaskUsage {
            cpu_seconds: Some(1.5),
            memory_peak_bytes: Some(4096),
            memory_bytes: None,
            oom_kills: Some(1),
        };
        let text = exposition(
            &[("unit-test", "running", 2)],
            &[("unit-task", used)],
            false,
        );
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
        let om = exposition(&[], &[], true);
        assert!(
            om.ends_with("# EOF\n") && om.matches("# EOF").count() == 1,
            "{om}"
        );
        assert!(
            !om.contains("state=\"running\""),
            "the gauge is refilled per scrape"
        );
    }

    /// The per-task families as `prometheus-client` encodes them, from a collector.
    #[derive(Debug)]
    struct Reference(Vec<(&'static str, TaskUsage)>);

    impl Collector for Reference {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            type Metric = Box<dyn Fn(&TaskUsage) -> Option<Box<dyn EncodeMetric>>>;
            fn counter<N: EncodeCounterValue + 'static>(
                v: Option<N>,
            ) -> Option<Box<dyn EncodeMetric>> {
                v.map(|v| Box::new(ConstCounter::new(v)) as Box<dyn EncodeMetric>)
            }
            fn gauge(v: Option<u64>) -> Option<Box<dyn EncodeMetric>> {
                v.map(|v| Box::new(ConstGauge::new(v as i64)) as Box<dyn EncodeMetric>)
            }
            let (seconds, bytes) = (Some(Unit::Seconds), Some(Unit::Bytes));
            let (c, g) = (MetricType::Counter, MetricType::Gauge);
            let families: [(&str, Option<Unit>, MetricType, Metric); 4] = [
                (
                    "task_cpu_usage",
                    seconds,
                    c,
                    Box::new(|u| counter(u.cpu_seconds)),
                ),
                (
                    "task_memory_peak",
                    bytes.clone(),
                    g,
                    Box::new(|u| gauge(u.memory_peak_bytes)),
                ),
                (
                    "task_memory_usage",
                    bytes,
                    g,
                    Box::new(|u| gauge(u.memory_bytes)),
                ),
                (
                    "task_oom_kills",
                    None,
                    c,
                    Box::new(|u| counter(u.oom_kills)),
                ),
            ];
            for ((name, unit, kind, metric), ours) in families.iter().zip(TASK_FAMILIES) {
                let help = ours.help;
                if !self.0.iter().any(|(_, u)| metric(u).is_some()) {
                    continue;
                }
                let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), *kind)?;
                for (task, u) in &self.0 {
                    if let Some(m) = metric(u) {
                        m.encode(family.encode_family(&[("task", *task)])?)?;
                    }
                }
            }
            Ok(())
        }
    }

    #[test]
    fn the_per_task_families_are_written_as_prometheus_client_writes_them() {
        let usage = vec![
            (
                "a",
                TaskUsage {
                    cpu_seconds: Some(0.000894),
                    memory_peak_bytes: Some(524288),
                    memory_bytes: Some(8192),
                    oom_kills: Some(0),
                },
            ),
            (
                "b.with-dots-1",
                TaskUsage {
                    cpu_seconds: Some(1.0),
                    memory_peak_bytes: Some(u64::from(u32::MAX) * 4),
                    ..Default::default()
                },
            ),
            (
                "c",
                TaskUsage {
                    cpu_seconds: Some(1e-7),
                    oom_kills: Some(3),
                    ..Default::default()
                },
            ),
            ("d", TaskUsage::default()),
            (
                "e",
                TaskUsage {
                    cpu_seconds: Some(12345.678),
                    ..Default::default()
                },
            ),
        ];
        for om in [false, true] {
            let mut registry = Registry::default();
            registry
                .sub_registry_with_prefix("task_executor")
                .register_collector(Box::new(Reference(usage.clone())));
            let mut want = String::new();
            if om {
                prometheus_client::encoding::text::encode(&mut want, &registry).unwrap();
            } else {
                prometheus_client::encoding::prometheus_text::encode(&mut want, &registry).unwrap();
            }
            let mut got = String::new();
            for family in TASK_FAMILIES {
                if usage.iter().any(|(_, u)| family.has(u)) {
                    family.write_head(&mut got, om);
                }
                for (task, u) in &usage {
                    family.write_sample(&mut got, task, u);
                }
            }
            got.push_str(end(om));
            assert_eq!(got, want, "openmetrics: {om}");
        }
    }
}
