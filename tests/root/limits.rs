//! Resource limits per task, end to end on this machine's cgroups (cgroup v1 memory, cpu,
//! cpuacct and pids controllers beside a v2 hierarchy without them): a task over its
//! memory limit ends `OOMKilled` (137), its pids limit holds (another task's does not get
//! in its way), CPU limits reach the cgroup, usage shows in the task's status and in
//! `/metrics`, what can't be enforced is refused (400), and without cgroups a task with a
//! uid of its own gets its pids limit as `RLIMIT_NPROC`. Container tasks get the same
//! fields through CRI, checked in the real containerd's cgroups. Real processes; root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::{pids_with_cmdline, wait_for};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

/// `sleep N` processes (N unique to each test), SIGKILLed when dropped, so a failing test
/// leaves nothing running.
struct Sleeps(&'static str);

impl Sleeps {
    fn count(&self) -> usize {
        pids_with_cmdline(&["sleep", self.0]).len()
    }
}

impl Drop for Sleeps {
    fn drop(&mut self) {
        for p in pids_with_cmdline(&["sleep", self.0]) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The task's v1 cgroup of `controller` (`/sys/fs/cgroup/<controller>/...`), from its claim.
fn v1_cgroup(a: &Agent, name: &str, controller: &str) -> PathBuf {
    let c = a.claim(name);
    c["limits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(PathBuf::from)
        .find(|p| p.starts_with(format!("/sys/fs/cgroup/{controller}/")))
        .unwrap_or_else(|| panic!("no {controller} cgroup in the claim {c}"))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

fn process(command: &[&str], resources: Value) -> Value {
    json!({"command": command, "resources": resources})
}

#[test]
fn a_task_over_its_memory_limit_ends_oom_killed_with_137() {
    let mut a = Agent::start(&[]);
    // The main process itself grows past the limit: `tail` keeps a line that never ends.
    a.create_ok(&json!({"name": "hog", "spec": {"process": process(
        &["tail", "/dev/zero"],
        json!({"limits": {"memory": "32Mi"}}),
    )}}));
    let t = a.wait_state("hog", "terminated", T);
    assert_eq!(t["reason"], "OOMKilled", "{t}");
    assert_eq!(t["exitCode"], 137, "{t}");
    assert_eq!(t["signal"], 9, "{t}");
    let msg = t["message"].as_str().unwrap();
    assert!(msg.contains("its memory limit (32Mi) was reached"), "{msg}");
    let task = a.get("hog").unwrap();
    assert_eq!(task["processStatus"]["terminated"]["reason"], "OOMKilled");
    let usage = &task["status"]["usage"];
    assert!(usage["oomKills"].as_u64().unwrap() >= 1, "{usage}");
    let peak = usage["memoryPeakBytes"].as_u64().unwrap();
    assert!((24 << 20..=32 << 20).contains(&peak), "{usage}");
    // Its cgroups went with it (its shim removed them once nothing of it was left).
    let mem = v1_cgroup(&a, "hog", "memory");
    wait_for(T, "the task's memory cgroup removed", || {
        (!mem.exists()).then_some(())
    });

    // A process of the task other than its main one: the shell reports 137 itself. The
    // limit is the cgroup's, without swap beyond it, as the task reads it first.
    let script = "d=/sys/fs/cgroup/memory$(grep :memory: /proc/self/cgroup | cut -d: -f3); \
                  cat $d/memory.limit_in_bytes $d/memory.memsw.limit_in_bytes; \
                  tail /dev/zero; exit $?";
    a.create_ok(&json!({"name": "hog-child", "spec": {"process": process(
        &["sh", "-c", script],
        json!({"limits": {"memory": "32Mi"}}),
    )}}));
    let t = a.wait_state("hog-child", "terminated", T);
    assert_eq!(
        (&t["reason"], &t["exitCode"]),
        (&json!("OOMKilled"), &json!(137)),
        "{t}"
    );
    let limit = (32u64 << 20).to_string();
    assert_eq!(a.stdout("hog-child"), format!("{limit}\n{limit}\n"));

    a.delete_all_and_stop();
}

#[test]
fn a_pids_limit_holds_and_leaves_other_tasks_alone() {
    let mut a = Agent::start(&[]);
    let limited = Sleeps("36001");
    let free = Sleeps("36002");
    // Forks 20 sleeps, but may have 5 processes: its shell and 4 of them (the shell
    // fails at the fifth fork).
    let script = |n: &str| {
        format!("i=0; while [ $i -lt 20 ]; do sleep {n} & i=$((i+1)); done; echo forked; wait")
    };
    a.create_ok(&json!({"name": "forky", "spec": {"process": process(
        &["sh", "-c", &script("36001")],
        json!({"limits": {"task-executor.io/pids": 5}}),
    )}}));
    a.create_ok(
        &json!({"name": "other", "spec": {"process": {"command": ["sh", "-c", script("36002")]}}}),
    );
    let t = a.wait_state("forky", "terminated", T);
    assert_ne!(t["exitCode"], 0, "{t}");
    let err = std::fs::read_to_string(a.task_dir("forky").join("stderr.log")).unwrap();
    assert!(err.to_lowercase().contains("fork"), "{err}");
    assert!(!a.stdout("forky").contains("forked"));
    wait_for(T, "other's 20 sleeps", || {
        (free.count() == 20).then_some(())
    });
    assert_eq!(limited.count(), 4, "the shell and 4 sleeps: 5 processes");
    assert_eq!(
        read(&v1_cgroup(&a, "forky", "pids").join("pids.max")),
        "6",
        "the task's 5 and its supervisor"
    );
    // The agent's default holds for the other one.
    assert_eq!(
        read(&v1_cgroup(&a, "other", "pids").join("pids.max")),
        "4097"
    );
    a.delete_all_and_stop();
}

#[test]
fn cpu_limits_and_requests_reach_the_cgroup() {
    let mut a = Agent::start(&[]);
    let sleeps = Sleeps("36011");
    a.create_ok(&json!({"name": "cpu", "spec": {"process": process(
        &["sleep", "36011"],
        json!({"limits": {"cpu": "250m"}, "requests": {"cpu": 0.1}}),
    )}}));
    a.wait_state("cpu", "running", T);
    let cpu = v1_cgroup(&a, "cpu", "cpu");
    assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "25000");
    assert_eq!(read(&cpu.join("cpu.shares")), "102");
    let main = a.main_pid("cpu");
    let procs = read(&cpu.join("cgroup.procs"));
    assert!(
        procs.lines().any(|p| p == main.to_string()),
        "main {main} in {procs}"
    );
    // A task that asks for no CPU stays in the agent's CPU group.
    a.run("nocpu", &["sleep", "36011"]);
    a.wait_state("nocpu", "running", T);
    assert!(
        a.claim("nocpu")["limits"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| !p.as_str().unwrap().starts_with("/sys/fs/cgroup/cpu/")),
        "{}",
        a.claim("nocpu")
    );
    let cpu_dir = v1_cgroup(&a, "cpu", "cpu");
    a.delete_all_and_stop();
    assert!(
        !cpu_dir.exists(),
        "{} removed with the task",
        cpu_dir.display()
    );
    drop(sleeps);
}

/// The value of the sample `name{task="task"}` in a Prometheus exposition.
fn sample(text: &str, name: &str, task: &str) -> Option<f64> {
    let prefix = format!("{name}{{task=\"{task}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn usage_shows_in_the_status_and_in_metrics() {
    let a = Agent::start(&[]);
    // Some memory (a 20 MB line held by tail) and some CPU, then it waits to be told.
    let go = a.task_dir("busy").with_extension("go");
    let script = format!(
        "head -c 20000000 /dev/zero | tail >/dev/null; i=0; while [ $i -lt 200000 ]; do \
         i=$((i+1)); done; echo busy; while [ ! -e {} ]; do sleep 0.05; done",
        go.display()
    );
    a.run_sh("busy", &script);
    wait_for(T, "busy to be busy", || {
        a.stdout("busy").contains("busy").then_some(())
    });
    // Running: read from its cgroups at the scrape.
    let m = a.call("GET", "/metrics", None).text();
    let cpu = sample(&m, "task_executor_task_cpu_usage_seconds_total", "busy")
        .unwrap_or_else(|| panic!("no CPU usage of busy:\n{m}"));
    assert!(cpu > 0.0, "{cpu}");
    assert!(
        sample(&m, "task_executor_task_memory_usage_bytes", "busy").is_some(),
        "{m}"
    );
    let peak = sample(&m, "task_executor_task_memory_peak_bytes", "busy").unwrap();
    assert!(peak >= 20e6, "{peak}");
    assert!(
        a.get("busy").unwrap()["status"].get("usage").is_none(),
        "not before its end"
    );
    std::fs::write(&go, "").unwrap();
    let t = a.wait_state("busy", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    let task = a.get("busy").unwrap();
    let u = &task["status"]["usage"];
    assert!(u["cpuSeconds"].as_f64().unwrap() >= cpu, "{u}");
    assert!(u["memoryPeakBytes"].as_u64().unwrap() >= 20_000_000, "{u}");
    assert!(u.get("oomKills").is_none(), "{u}");
    // Upstream's shape is unchanged: one member.
    assert_eq!(
        task["processStatus"].as_object().unwrap().len(),
        1,
        "{task}"
    );
    // Ended: its status's usage, not its cgroups (removed when it is deleted).
    let m = a.call("GET", "/metrics", None).text();
    assert_eq!(
        sample(&m, "task_executor_task_memory_peak_bytes", "busy"),
        u["memoryPeakBytes"].as_f64()
    );
    assert_eq!(
        sample(&m, "task_executor_task_memory_usage_bytes", "busy"),
        None
    );
    a.delete("busy");
    a.wait_gone("busy", T);
    let m = a.call("GET", "/metrics", None).text();
    assert_eq!(
        sample(&m, "task_executor_task_memory_peak_bytes", "busy"),
        None
    );
}

fn error_message(r: &crate::support::http::Response) -> String {
    r.json()["message"].as_str().unwrap().to_string()
}

#[test]
fn limits_that_cant_be_enforced_are_refused() {
    let mut a = Agent::start(&["--task-cgroups=false"]);
    let r = a.create(json!({"name": "m", "spec": {"process": process(
        &["true"], json!({"limits": {"memory": "64Mi"}}))}}));
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = error_message(&r);
    assert!(
        msg.contains("process.resources.limits.memory: this agent can't enforce it: no memory cgroup for tasks (no cgroup per task: --task-cgroups=false)"),
        "{msg}"
    );
    let r = a.create(json!({"name": "c", "process": process(
        &["true"], json!({"requests": {"cpu": "100m"}}))}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        error_message(&r).contains("process.resources.requests.cpu"),
        "{}",
        r.text()
    );
    // Without a uid of its own, the pids limit has no other way to hold.
    let r = a.create(json!({"name": "p", "spec": {"process": process(
        &["true"], json!({"limits": {"task-executor.io/pids": 10}}))}}));
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = error_message(&r);
    assert!(
        msg.contains("limits[task-executor.io/pids]") && msg.contains("RLIMIT_NPROC"),
        "{msg}"
    );
    // A task that asks for nothing runs (the agent's default pids limit holds where it can).
    a.run("plain", &["true"]);
    let t = a.wait_state("plain", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    assert!(a.get("plain").unwrap()["status"].get("usage").is_none());
    a.delete_all_and_stop();
}

#[test]
fn bad_quantities_are_refused_naming_the_field() {
    let mut a = Agent::start(&[]);
    let cases = [
        (
            json!({"limits": {"memory": "64Mx"}}),
            "process.resources.limits.memory: \"64Mx\" is not a valid quantity",
        ),
        (
            json!({"limits": {"cpu": "-1"}}),
            "process.resources.limits.cpu: \"-1\" is negative",
        ),
        (
            json!({"limits": {"cpu": "0"}}),
            "process.resources.limits.cpu: \"0\" must be positive",
        ),
        (
            json!({"limits": {"task-executor.io/pids": "2.5"}}),
            "process.resources.limits[task-executor.io/pids]: \"2.5\" must be a whole number",
        ),
        (
            json!({"limits": {"nvidia.com/gpu": 1}}),
            "process.resources.limits[nvidia.com/gpu]: resource \"nvidia.com/gpu\" is not supported",
        ),
        (
            json!({"limits": {"cpu": "1"}, "requests": {"cpu": "2"}}),
            "process.resources.requests.cpu: \"2\" must be less than or equal to the cpu limit (\"1\")",
        ),
        (
            json!({"limits": {"memory": "1Mi"}}),
            "process.resources.limits.memory: \"1Mi\" is below the smallest memory limit",
        ),
    ];
    for (resources, want) in cases {
        let r = a.create(
            json!({"name": "bad", "spec": {"process": process(&["true"], resources.clone())}}),
        );
        assert_eq!(r.status, 400, "{resources}: {}", r.text());
        let msg = error_message(&r);
        assert!(
            msg.contains(want),
            "{resources}\n  want: {want}\n  got:  {msg}"
        );
    }
    let r = a.create(json!({"name": "bad", "spec": {"process": process(&["true"], json!({"limits": {"cpu": [1]}}))}}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(a.get("bad").is_none());
    a.delete_all_and_stop();
}

#[test]
fn without_cgroups_a_task_of_its_own_uid_gets_its_pids_limit_as_rlimit_nproc() {
    let mut a = Agent::start(&["--task-cgroups=false", "--task-uid-range", "42000-42009"]);
    let limited = Sleeps("36021");
    let free = Sleeps("36022");
    let script = |n: &str| {
        format!("i=0; while [ $i -lt 20 ]; do sleep {n} & i=$((i+1)); done; echo forked; wait")
    };
    a.create_ok(&json!({"name": "forky", "spec": {"process": process(
        &["sh", "-c", &script("36021")],
        json!({"limits": {"task-executor.io/pids": 5}}),
    )}}));
    a.create_ok(&json!({"name": "other", "spec": {"process": process(
        &["sh", "-c", &script("36022")],
        json!({"limits": {"task-executor.io/pids": 100}}),
    )}}));
    let t = a.wait_state("forky", "terminated", T);
    assert_ne!(t["exitCode"], 0, "{t}");
    let err = std::fs::read_to_string(a.task_dir("forky").join("stderr.log")).unwrap();
    assert!(err.to_lowercase().contains("fork"), "{err}");
    wait_for(T, "other's 20 sleeps", || {
        (free.count() == 20).then_some(())
    });
    assert_eq!(
        limited.count(),
        4,
        "the shell and 4 sleeps: its uid's 5 processes"
    );
    let sleep = pids_with_cmdline(&["sleep", "36021"])[0];
    let limits = read(&PathBuf::from(format!("/proc/{sleep}/limits")));
    let nproc = limits
        .lines()
        .find(|l| l.starts_with("Max processes"))
        .unwrap();
    assert_eq!(
        nproc.split_whitespace().collect::<Vec<_>>()[2..4],
        ["5", "5"],
        "{nproc}"
    );
    // The agent's default (4096) too, for a task that sets none.
    a.run(
        "plain",
        &["sh", "-c", "grep 'Max processes' /proc/self/limits"],
    );
    a.wait_state("plain", "terminated", T);
    assert!(a.stdout("plain").contains("4096"), "{}", a.stdout("plain"));
    a.delete_all_and_stop();
}

/// The cgroup v1 directory of `controller` a process is in.
fn cgroup_of(pid: i32, controller: &str) -> PathBuf {
    let text = read(&PathBuf::from(format!("/proc/{pid}/cgroup")));
    let path = text
        .lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctls, path) = (p.next()?, p.next()?, p.next()?);
            ctls.split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("{pid} has no {controller} cgroup: {text}"));
    PathBuf::from(format!("/sys/fs/cgroup/{controller}{path}"))
}

#[test]
fn container_tasks_get_their_limits_through_cri() {
    let cd = crate::support::containerd::shared();
    let tmp = tempfile::Builder::new()
        .prefix("te-lim-")
        .tempdir()
        .unwrap();
    let socket = cd.socket.display().to_string();
    let mut a = Agent::start_in(
        tmp.path(),
        &[
            "--enable-container-mode=true",
            "--cri-socket",
            &socket,
            "--stop-grace-period",
            "1s",
        ],
    );
    let sleeps = Sleeps("36031");
    a.create_ok(&json!({"name": "boxed", "spec": {"container": {
        "image": crate::support::containerd::BUSYBOX,
        "command": ["sleep", "36031"],
        "resources": {"limits": {"memory": "48Mi", "cpu": "500m"}, "requests": {"cpu": "250m"}},
    }}}));
    a.wait_state("boxed", "running", T);
    let pid = wait_for(T, "the container's sleep", || {
        pids_with_cmdline(&["sleep", "36031"]).first().copied()
    });
    let mem = cgroup_of(pid, "memory");
    assert_eq!(
        read(&mem.join("memory.limit_in_bytes")),
        (48u64 << 20).to_string()
    );
    let cpu = cgroup_of(pid, "cpu");
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
    assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(&cpu.join("cpu.shares")), "256");
    // Upstream's podTemplateSpec: the container's resources, the same way.
    a.create_ok(&json!({"name": "templated", "podTemplateSpec": {"spec": {"containers": [{
        "name": "c", "image": crate::support::containerd::BUSYBOX,
        "command": ["sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"],
        "resources": {"limits": {"memory": "40Mi"}},
    }]}}}));
    a.wait_state("templated", "terminated", T);
    let log =
        std::fs::read_to_string(a.task_dir("templated").join("container.log")).unwrap_or_default();
    assert!(log.contains(&(40u64 << 20).to_string()), "{log}");
    // This node has cgroup v1: the CRI can't be given a pids limit.
    let r = a.create(json!({"name": "pids", "spec": {"container": {
        "image": crate::support::containerd::BUSYBOX, "command": ["true"],
        "resources": {"limits": {"task-executor.io/pids": 10}},
    }}}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        error_message(&r).starts_with("container.resources.limits[task-executor.io/pids]: container tasks get a pids limit only on cgroup v2 nodes"),
        "{}",
        r.text()
    );
    let r = a.create(json!({"name": "bad", "spec": {"container": {
        "image": crate::support::containerd::BUSYBOX, "command": ["true"],
        "resources": {"limits": {"memory": "lots"}},
    }}}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        error_message(&r)
            .contains("container.resources.limits.memory: \"lots\" is not a valid quantity"),
        "{}",
        r.text()
    );
    a.delete_all_and_stop();
    drop(sleeps);
}

#[test]
fn a_task_in_the_main_container_gets_its_limits_unless_it_joins_its_cgroups() {
    let name = format!("lim-main-{}", std::process::id());
    let _main = crate::support::standin::MainContainer::start(&name, "lim-host");
    let sidecar = ["--enable-sidecar-mode=true", "--main-container-name", &name];
    let mut a = Agent::start(&sidecar);
    // Its reaper and it, inside the main container's namespaces, are in its cgroups.
    let _sleeps = Sleeps("36041");
    a.create_ok(&json!({"name": "inside", "spec": {"process": process(
        &["sh", "-c", "cat /proc/self/cgroup; exec sleep 36041"],
        json!({"limits": {"memory": "40Mi", "task-executor.io/pids": 7}}),
    )}}));
    a.wait_state("inside", "running", T);
    wait_for(T, "its cgroups printed", || {
        a.stdout("inside").contains(":memory:").then_some(())
    });
    let mem = v1_cgroup(&a, "inside", "memory");
    assert_eq!(
        read(&mem.join("memory.limit_in_bytes")),
        (40u64 << 20).to_string()
    );
    assert_eq!(
        read(&v1_cgroup(&a, "inside", "pids").join("pids.max")),
        "9",
        "its 7, its shim and its reaper"
    );
    let rel = mem
        .strip_prefix("/sys/fs/cgroup/memory")
        .unwrap()
        .display()
        .to_string();
    assert!(
        a.stdout("inside").contains(&format!(":memory:/{rel}")),
        "{}",
        a.stdout("inside")
    );
    a.delete_all_and_stop();
    // Joining the main container's cgroups would leave the task's own: refused.
    let joined = [&sidecar[..], &["--sidecar-join-cgroup=true"]].concat();
    let mut a = Agent::start(&joined);
    let r = a.create(json!({"name": "joined", "spec": {"process": process(
        &["true"], json!({"limits": {"memory": "40Mi"}}))}}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        error_message(&r).contains("--sidecar-join-cgroup"),
        "{}",
        r.text()
    );
    a.delete_all_and_stop();
}
