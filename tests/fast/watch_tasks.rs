//! `--watch-tasks` end to end: the real agent binary against an in-process fake API server.
//!
//! No real API server can be installed here (no kube-apiserver, envtest, kind, k3s or kwok
//! is obtainable on these machines), so `crate::support::fake_apiserver` serves the Task, Pod and
//! Event endpoints with real Kubernetes JSON: watch streams (with timeouts, bookmarks and
//! 410 Gone after compaction), merge and JSON patches, server-side apply, finalizer
//! semantics, and resource versions that are opaque (they decrease as numbers).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::fake_apiserver::{FakeApiServer, Recorded};
use crate::support::wait_for;
use serde_json::{Value, json};

const NS: &str = "sandbox";
const POD: &str = "sandbox-pod-1";
const T: Duration = Duration::from_secs(30);
const FINALIZER: &str = "task-executor.io/stop";

fn task(name: &str, pod: &str, process: Value) -> Value {
    json!({
        "apiVersion": "task-executor.io/v1alpha1",
        "kind": "Task",
        "metadata": {"name": name, "namespace": NS, "labels": {"task-executor.io/pod": pod}},
        "spec": {"podName": pod, "process": process}
    })
}

/// The agent (own temp data dir, free port) with `--watch-tasks` and `extra` flags, talking
/// to `api` through a kubeconfig written into `dir`.
fn start_agent_with(api: &FakeApiServer, dir: &Path, extra: &[&str]) -> Agent {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);
    let mut args = vec!["--watch-tasks", "--stop-grace-period=2s"];
    args.extend_from_slice(extra);
    Agent::start_with_env(
        &args,
        &[
            ("POD_NAME", POD),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    )
}

fn start_agent(api: &FakeApiServer, dir: &Path) -> Agent {
    start_agent_with(api, dir, &[])
}

/// Waits until the fake's copy of the Task satisfies `cond`.
fn wait_task(api: &FakeApiServer, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    wait_for(T, &format!("Task {name}: {what}"), || {
        api.get_task(NS, name).filter(|t| cond(t))
    })
}

fn phase(t: &Value) -> &str {
    t["status"]["phase"].as_str().unwrap_or("")
}

/// Requests that wrote the Task's status.
fn status_writes(api: &FakeApiServer, name: &str) -> Vec<Recorded> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(&format!("/tasks/{name}/status")))
        .collect()
}

/// JSON patches of the Task object itself (the finalizer helper's), as their ops.
fn finalizer_patches(api: &FakeApiServer, name: &str) -> Vec<Value> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(&format!("/tasks/{name}")))
        .map(|r| {
            assert_eq!(r.content_type, "application/json-patch+json", "{r:?}");
            r.json()
        })
        .collect()
}

fn lists(api: &FakeApiServer) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/tasks") && !r.is_watch())
        .count()
}

fn task_watches(api: &FakeApiServer) -> Vec<Recorded> {
    api.requests()
        .into_iter()
        .filter(|r| r.is_watch() && r.path.ends_with("/tasks"))
        .collect()
}

/// (type, reason, note) of the Events about Task `name`, oldest first.
fn events(api: &FakeApiServer, name: &str) -> Vec<(String, String, String)> {
    api.events_for(NS, name)
        .iter()
        .map(|e| {
            let s = |f: &str| e[f].as_str().unwrap_or_default().to_string();
            (s("type"), s("reason"), s("note"))
        })
        .collect()
}

fn reasons(api: &FakeApiServer, name: &str) -> Vec<String> {
    events(api, name).into_iter().map(|(_, r, _)| r).collect()
}

#[test]
fn runs_tasks_reports_status_ignores_updates_and_finalizes_deletes() {
    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let agent = start_agent(&api, tmp.path());

    // A Task runs; its status goes Running, then Failed with the exit code.
    api.create_task(task(
        "t1",
        POD,
        json!({"command": ["sh", "-c", "echo ran; sleep 1; exit 3"]}),
    ));
    let created_rv = wait_task(&api, "t1", "finalizer", |t| {
        !t["metadata"]["finalizers"].is_null()
    })["metadata"]["resourceVersion"]
        .clone();
    let t1 = wait_task(&api, "t1", "phase Failed", |t| phase(t) == "Failed");
    assert_eq!(t1["status"]["exitCode"], 3);
    assert_eq!(t1["status"]["state"]["terminated"]["exitCode"], 3);
    assert!(t1["status"]["state"]["running"].is_null(), "{t1}");
    assert_eq!(t1["status"]["observedGeneration"], 1);
    assert_eq!(t1["metadata"]["finalizers"], json!([FINALIZER]));
    // Resource versions here decrease as numbers: the agent treats them as opaque.
    let n = |v: &Value| v.as_str().unwrap().parse::<u64>().unwrap();
    assert!(n(&t1["metadata"]["resourceVersion"]) < n(&created_rv));

    // The finalizer went on before anything ran, by JSON patch (kube's finalizer helper).
    let adds = finalizer_patches(&api, "t1");
    assert_eq!(
        adds,
        [
            json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
        ]
    );
    let requests = api.requests();
    let first = |f: &dyn Fn(&Recorded) -> bool| requests.iter().position(f).unwrap();
    assert!(
        first(&|r| r.method == "PATCH" && r.path.ends_with("/tasks/t1"))
            < first(&|r| r.method == "PATCH" && r.path.ends_with("/tasks/t1/status"))
    );

    // Status is written by server-side apply, each change once ("Waiting" only if the
    // agent saw the task before it ran).
    let writes = status_writes(&api, "t1");
    for w in &writes {
        assert_eq!(w.content_type, "application/apply-patch+yaml", "{w:?}");
        assert_eq!(w.param("fieldManager").as_deref(), Some("task-executor"));
        assert_eq!(w.param("force").as_deref(), Some("true"));
        assert_eq!(w.json()["kind"], "Task");
    }
    let phases: Vec<String> = writes
        .iter()
        .filter_map(|w| w.json()["status"]["phase"].as_str().map(str::to_string))
        .collect();
    let phases: Vec<&str> = phases
        .iter()
        .map(String::as_str)
        .skip_while(|p| *p == "Waiting")
        .collect();
    assert_eq!(phases, ["Running", "Failed"], "status writes");
    assert_eq!(
        agent.get("t1").unwrap()["status"]["state"]["terminated"]["exitCode"],
        3
    );
    // `kubectl describe task t1` tells the story.
    wait_for(T, "t1's events", || {
        (reasons(&api, "t1") == ["Started", "Failed"]).then_some(())
    });
    let ev = &api.events_for(NS, "t1")[1];
    assert_eq!(ev["type"], "Warning");
    assert!(ev["note"].as_str().unwrap().contains("exit code 3"), "{ev}");
    assert_eq!(ev["regarding"]["kind"], "Task");
    assert_eq!(ev["regarding"]["uid"], t1["metadata"]["uid"]);
    assert_eq!(ev["reportingController"], "task-executor");
    assert_eq!(ev["reportingInstance"], POD);

    // A Task for another pod (label and spec) is not run; neither is one whose label
    // names this pod but whose spec names another.
    api.create_task(task("other", "another-pod", json!({"command": ["true"]})));
    let mut mislabelled = task("mislabelled", "another-pod", json!({"command": ["true"]}));
    mislabelled["metadata"]["labels"]["task-executor.io/pod"] = json!(POD);
    api.create_task(mislabelled);

    // An update of t1's spec is ignored: t1 is not run again.
    api.update_task_spec(
        NS,
        "t1",
        json!({"podName": POD, "process": {"command": ["sh", "-c", "echo again"]}}),
    );
    // Events are handled in order: once t2 runs, the update has been seen.
    api.create_task(task("t2", POD, json!({"command": ["sleep", "4242"]})));
    wait_task(&api, "t2", "phase Running", |t| phase(t) == "Running");
    wait_for(T, "the agent to see the update", || {
        agent
            .log_text()
            .contains("the change is ignored")
            .then_some(())
    });
    assert_eq!(agent.stdout("t1"), "ran\n");
    let t1_now = api.get_task(NS, "t1").unwrap();
    assert_eq!(t1_now["metadata"]["generation"], 2);
    assert_eq!(t1_now["metadata"]["labels"]["task-executor.io/pod"], POD);
    assert_eq!(t1_now["status"], t1["status"], "t1's status changed");
    assert!(agent.get("other").is_none() && agent.get("mislabelled").is_none());
    assert!(api.get_task(NS, "other").unwrap()["metadata"]["finalizers"].is_null());
    assert!(api.get_task(NS, "mislabelled").unwrap()["metadata"]["finalizers"].is_null());

    // A Task the agent refuses reports why, and is not retried.
    api.create_task(task("bad", POD, json!({"command": []})));
    let bad = wait_task(&api, "bad", "phase Failed", |t| phase(t) == "Failed");
    let why = &bad["status"]["state"]["terminated"];
    assert_eq!(why["reason"], "InvalidSpec", "{bad}");
    assert!(
        why["message"].as_str().unwrap().contains("process.command"),
        "{bad}"
    );
    assert!(agent.get("bad").is_none());
    wait_for(T, "bad's event", || {
        (reasons(&api, "bad") == ["InvalidSpec"]).then_some(())
    });
    assert_eq!(events(&api, "bad")[0].0, "Warning");

    // A task that runs out of time: TimedOut.
    let mut slow = task("slow", POD, json!({"command": ["sleep", "4141"]}));
    slow["spec"]["timeoutSeconds"] = json!(1);
    api.create_task(slow);
    wait_task(&api, "slow", "phase Failed", |t| phase(t) == "Failed");
    wait_for(T, "slow's events", || {
        (reasons(&api, "slow") == ["Started", "TimedOut"]).then_some(())
    });

    // A task created over HTTP is not mirrored into the cluster.
    agent.run("via-http", &["true"]);
    agent.wait_state("via-http", "terminated", T);

    // Deleting t2 stops its process before the finalizer goes, then the Task is gone.
    assert_eq!(
        crate::support::pids_with_cmdline(&["sleep", "4242"]).len(),
        1
    );
    api.delete_task(NS, "t2");
    wait_for(T, "Task t2 to be removed", || {
        api.get_task(NS, "t2").is_none().then_some(())
    });
    assert!(
        crate::support::pids_with_cmdline(&["sleep", "4242"]).is_empty(),
        "the finalizer was removed while the task still ran"
    );
    assert!(agent.get("t2").is_none());
    // Added once, removed once (the removal tests that it removes our entry).
    assert_eq!(
        finalizer_patches(&api, "t2"),
        [
            json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                   {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}]),
            json!([{"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                   {"op": "remove", "path": "/metadata/finalizers/0"}]),
        ],
        "{:#?}\n{}",
        api.requests()
            .iter()
            .filter(|r| r.path.contains("/tasks/t2"))
            .collect::<Vec<_>>(),
        agent.log_text()
    );

    assert!(
        !api.requests()
            .iter()
            .any(|r| (r.method == "POST" && r.path.contains("/tasks"))
                || r.path.contains("via-http")),
        "the agent wrote Tasks of its own"
    );
    // Label selection is done by the API server; watches ask for bookmarks and a timeout.
    let watch = &task_watches(&api)[0];
    assert_eq!(
        watch.param("labelSelector").as_deref(),
        Some("task-executor.io/pod=sandbox-pod-1")
    );
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(watch.param("timeoutSeconds").as_deref(), Some("60"));
}

#[test]
fn watches_resume_after_they_end_and_relist_after_410_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let agent = start_agent(&api, tmp.path());
    wait_for(T, "the first Task watch", || {
        (api.open_watches(true) == 1).then_some(())
    });

    // The stream ends: the agent watches again from where it was, without a list.
    let (lists_before, watches_before) = (lists(&api), task_watches(&api).len());
    api.end_watches();
    api.create_task(task("a", POD, json!({"command": ["true"]})));
    wait_task(&api, "a", "Succeeded", |t| phase(t) == "Succeeded");
    let watches = task_watches(&api);
    assert!(watches.len() > watches_before);
    assert!(
        watches[watches_before]
            .param("resourceVersion")
            .is_some_and(|v| !v.is_empty()),
        "{:?}",
        watches[watches_before]
    );
    assert_eq!(lists(&api), lists_before, "a resumed watch needs no list");

    // The API server goes away; meanwhile a Task is created, one is removed without its
    // finalizer doing its work, and the history is compacted. Back up, the agent's watch
    // gets 410 Gone, it lists again, runs the new Task and deletes the vanished one's task.
    api.create_task(task("v", POD, json!({"command": ["sleep", "4758"]})));
    wait_task(&api, "v", "Running", |t| phase(t) == "Running");
    api.set_down(true);
    api.create_task(task("b", POD, json!({"command": ["sh", "-c", "exit 7"]})));
    api.force_delete_task(NS, "v");
    api.compact();
    let lists_before = lists(&api);
    api.set_down(false);
    wait_task(&api, "b", "Failed", |t| phase(t) == "Failed");
    assert!(lists(&api) > lists_before, "no re-list after 410 Gone");
    assert_eq!(
        agent.get("b").unwrap()["status"]["state"]["terminated"]["exitCode"],
        7
    );
    wait_for(T, "task v to be deleted", || {
        agent.get("v").is_none().then_some(())
    });
    assert!(crate::support::pids_with_cmdline(&["sleep", "4758"]).is_empty());
    assert!(
        agent
            .log_text()
            .contains("Task object is gone; deleting its task")
    );
    // Both fresh lists are counted: the first, and the one after 410 Gone.
    let metrics = agent.call("GET", "/metrics", None).text();
    let count = |why: &str| -> f64 {
        let series =
            format!("task_executor_watch_restarts_total{{resource=\"task\",why=\"{why}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert!(count("relist") >= 2.0, "{metrics}");
}

#[test]
fn a_watch_connection_that_goes_silent_is_dropped_and_reopened() {
    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    // Watches are renewed every 2 s; one silent for 2 s + 5 s is taken for dead.
    let agent = start_agent_with(&api, tmp.path(), &["--kube-watch-timeout=2s"]);
    api.create_task(task("before", POD, json!({"command": ["true"]})));
    wait_task(&api, "before", "Succeeded", |t| phase(t) == "Succeeded");

    // The open watch stays open and says nothing, as over a half-open connection.
    api.stall_watches();
    let stalled = Instant::now();
    let watches = task_watches(&api).len();
    api.create_task(task("after", POD, json!({"command": ["true"]})));
    wait_task(&api, "after", "Succeeded", |t| phase(t) == "Succeeded");
    let took = stalled.elapsed();
    println!(
        "a stalled watch was replaced and the Task ran {took:?} after the stall (bound: 2 s + 5 s)"
    );
    assert!(task_watches(&api).len() > watches, "no new watch request");
    assert!(agent.get("after").is_some());
}

#[test]
fn a_restarted_agent_adopts_tasks_and_never_reruns_them() {
    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let mut agent = start_agent(&api, tmp.path());
    api.create_task(task(
        "done",
        POD,
        json!({"command": ["sh", "-c", "echo once"]}),
    ));
    api.create_task(task("long", POD, json!({"command": ["sleep", "4343"]})));
    let done = wait_task(&api, "done", "Succeeded", |t| phase(t) == "Succeeded");
    wait_task(&api, "long", "Running", |t| phase(t) == "Running");

    agent.sigterm();
    // While the agent is down: a new Task, and a delete of a running one.
    api.create_task(task(
        "new",
        POD,
        json!({"command": ["sh", "-c", "echo new"]}),
    ));
    api.delete_task(NS, "long");
    assert!(
        api.get_task(NS, "long").is_some(),
        "the finalizer holds the Task"
    );
    assert_eq!(
        crate::support::pids_with_cmdline(&["sleep", "4343"]).len(),
        1
    );

    agent.restart();
    wait_task(&api, "new", "Succeeded", |t| phase(t) == "Succeeded");
    wait_for(T, "Task long to be finalized", || {
        api.get_task(NS, "long").is_none().then_some(())
    });
    assert!(crate::support::pids_with_cmdline(&["sleep", "4343"]).is_empty());
    // The finished task was adopted, not run again.
    assert_eq!(agent.stdout("done"), "once\n");
    assert_eq!(api.get_task(NS, "done").unwrap()["status"], done["status"]);
    assert!(agent.get("done").is_some());
    assert!(
        agent
            .log_text()
            .contains("adopted task for its Task object")
    );

    // Adopted tasks are finalized like new ones.
    api.delete_task(NS, "done");
    wait_for(T, "Task done to be finalized", || {
        api.get_task(NS, "done").is_none().then_some(())
    });
    assert!(agent.get("done").is_none());
    // The finalizer's removal (and the DELETED event it causes) deletes nothing twice.
    assert!(!agent.log_text().contains("Task object is gone"));
}

#[test]
fn a_full_agent_leaves_tasks_waiting_and_runs_them_later() {
    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);
    let _agent = Agent::start_with_env(
        &["--watch-tasks", "--max-concurrent-tasks=1"],
        &[
            ("POD_NAME", POD),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );
    // A number no other test sleeps for: tests of other binaries run at the same time and
    // the check below looks at every process of the machine.
    api.create_task(task("hold", POD, json!({"command": ["sleep", "4657"]})));
    wait_task(&api, "hold", "Running", |t| phase(t) == "Running");
    api.create_task(task("queued", POD, json!({"command": ["true"]})));
    let q = wait_task(&api, "queued", "Waiting", |t| phase(t) == "Waiting");
    assert_eq!(
        q["status"]["state"]["waiting"]["reason"], "TooManyTasks",
        "{q}"
    );
    api.delete_task(NS, "hold");
    wait_task(&api, "queued", "Succeeded", |t| phase(t) == "Succeeded");
    wait_for(T, "queued's events", || {
        (reasons(&api, "queued") == ["TooManyTasks", "Started", "Succeeded"]).then_some(())
    });
    assert!(crate::support::pids_with_cmdline(&["sleep", "4657"]).is_empty());
}

#[test]
fn one_kubernetes_client_serves_every_integration() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);
    // Each kube client is built from one read of the kubeconfig: count the reads. (Closes
    // are watched too, so that reads one after another are not coalesced into one event.)
    let reads = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    reads
        .add_watch(
            &kubeconfig,
            AddWatchFlags::IN_OPEN | AddWatchFlags::IN_CLOSE_NOWRITE,
        )
        .unwrap();
    api.put_pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD, "namespace": NS},
        "spec": {"containers": [{"name": "main", "image": "example/image"}]},
        "status": {"phase": "Running"}
    }));
    // Sidecar mode (main container lookup, Pod watch) and the Task watch with its events.
    let agent = Agent::start_with_env(
        &["--watch-tasks", "--enable-sidecar-mode"],
        &[
            ("POD_NAME", POD),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );
    assert_eq!(agent.request("GET", "/readyz", None).status, 503);
    api.create_task(task("t", POD, json!({"command": ["true"]})));
    wait_task(&api, "t", "a final phase", |t| phase(t) == "Failed");
    wait_for(T, "t's events", || {
        (!api.events_for(NS, "t").is_empty()).then_some(())
    });
    let requests = api.requests();
    let pods = format!("/api/v1/namespaces/{NS}/pods");
    assert!(requests.iter().any(|r| r.is_watch() && r.path == pods));
    assert!(
        requests
            .iter()
            .any(|r| r.method == "GET" && r.path == format!("{pods}/{POD}"))
    );
    assert!(
        requests
            .iter()
            .any(|r| r.is_watch() && r.path.ends_with("/tasks"))
    );
    let opens = reads
        .read_events()
        .unwrap_or_default()
        .iter()
        .filter(|e| e.mask.contains(AddWatchFlags::IN_OPEN))
        .count();
    assert_eq!(opens, 1, "kubernetes clients built (kubeconfig reads)");
}
