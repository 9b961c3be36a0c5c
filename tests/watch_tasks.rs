//! `--watch-tasks` end to end: the real agent binary against an in-process fake API server.
//!
//! No real API server can be installed here (no kube-apiserver, envtest, kind, k3s or kwok
//! is obtainable on these machines), so `support::fake_apiserver` serves the Task and Pod
//! endpoints with real Kubernetes JSON, watch streams, merge patches and finalizer semantics.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::agent::Agent;
use support::fake_apiserver::{FakeApiServer, Gone};
use support::wait_for;

const NS: &str = "sandbox";
const POD: &str = "sandbox-pod-1";
const T: Duration = Duration::from_secs(30);

fn task(name: &str, pod: &str, process: Value) -> Value {
    json!({
        "apiVersion": "task-executor.io/v1alpha1",
        "kind": "Task",
        "metadata": {"name": name, "namespace": NS, "labels": {"task-executor.io/pod": pod}},
        "spec": {"podName": pod, "process": process}
    })
}

/// The agent (own temp data dir, free port) with `--watch-tasks`, talking to `api` through
/// a kubeconfig written into `dir`.
fn start_agent(api: &FakeApiServer, dir: &Path) -> Agent {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);
    Agent::start_with_env(
        &["--watch-tasks", "--stop-grace-period=2s"],
        &[
            ("POD_NAME", POD),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    )
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

fn status_patches(api: &FakeApiServer, name: &str) -> Vec<Value> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(&format!("/tasks/{name}/status")))
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect()
}

fn lists(api: &FakeApiServer) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/tasks") && !r.is_watch())
        .count()
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
    let t1 = wait_task(&api, "t1", "phase Failed", |t| phase(t) == "Failed");
    assert_eq!(t1["status"]["exitCode"], 3);
    assert_eq!(t1["status"]["state"]["terminated"]["exitCode"], 3);
    assert!(t1["status"]["state"]["running"].is_null(), "{t1}");
    assert_eq!(t1["status"]["observedGeneration"], 1);
    assert_eq!(
        t1["metadata"]["finalizers"],
        json!(["task-executor.io/stop"])
    );
    let phases: Vec<String> = status_patches(&api, "t1")
        .iter()
        .filter_map(|p| p["status"]["phase"].as_str().map(str::to_string))
        .collect();
    // Each change is reported once ("Waiting" only if the agent saw the task before it ran).
    let phases: Vec<&str> = phases
        .iter()
        .map(String::as_str)
        .skip_while(|p| *p == "Waiting")
        .collect();
    assert_eq!(phases, ["Running", "Failed"], "status patches");
    assert_eq!(
        agent.get("t1").unwrap()["status"]["state"]["terminated"]["exitCode"],
        3
    );

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
    assert_eq!(agent.stdout("t1"), "ran\n");
    let t1_now = api.get_task(NS, "t1").unwrap();
    assert_eq!(t1_now["metadata"]["generation"], 2);
    assert_eq!(t1_now["metadata"]["labels"]["task-executor.io/pod"], POD);
    assert!(
        agent.log_text().contains("the change is ignored"),
        "the agent did not see the update"
    );
    assert_eq!(t1_now["status"], t1["status"], "t1's status changed");
    assert!(agent.get("other").is_none() && agent.get("mislabelled").is_none());
    assert!(api.get_task(NS, "other").unwrap()["metadata"]["finalizers"].is_null());

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

    // A task created over HTTP is not mirrored into the cluster.
    agent.run("via-http", &["true"]);
    agent.wait_state("via-http", "terminated", T);

    // Deleting t2 stops its process before the finalizer goes, then the Task is gone.
    assert_eq!(support::pids_with_cmdline(&["sleep", "4242"]).len(), 1);
    api.delete_task(NS, "t2");
    wait_for(T, "Task t2 to be removed", || {
        api.get_task(NS, "t2").is_none().then_some(())
    });
    assert!(
        support::pids_with_cmdline(&["sleep", "4242"]).is_empty(),
        "the finalizer was removed while the task still ran"
    );
    assert!(agent.get("t2").is_none());
    let finalizer_patches: Vec<Value> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/tasks/t2"))
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect();
    // Added once, then removed (a removal may be sent again after a 409 Conflict with a
    // concurrent status write: finalizer patches carry the resourceVersion they saw), and
    // never added back.
    let adds: Vec<usize> = finalizer_patches
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            p["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty())
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(adds, [0], "one add, first: {finalizer_patches:?}");
    assert!(
        finalizer_patches.len() >= 2,
        "and a removal: {finalizer_patches:?}"
    );
    assert_eq!(
        finalizer_patches[1]["metadata"]["finalizers"],
        json!([]),
        "{finalizer_patches:?}"
    );

    assert!(
        !api.requests()
            .iter()
            .any(|r| r.method == "POST" || r.path.contains("via-http")),
        "the agent wrote Tasks of its own"
    );
    // Label selection is done by the API server.
    let watch = api.wait_for_request(T, "a Task watch", |r| {
        r.is_watch() && r.path.ends_with("/tasks")
    });
    assert!(
        watch
            .query
            .contains("labelSelector=task-executor.io%2Fpod%3Dsandbox-pod-1"),
        "{}",
        watch.query
    );
}

#[test]
fn ended_watches_and_410_gone_lead_to_a_relist() {
    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let agent = start_agent(&api, tmp.path());
    wait_for(T, "the first Task watch", || {
        (api.open_watches(true) == 1).then_some(())
    });

    // The stream ends: the agent lists again and keeps working.
    let before = lists(&api);
    api.end_watches();
    wait_for(T, "a re-list after the watch ended", || {
        (lists(&api) > before && api.open_watches(true) == 1).then_some(())
    });
    api.create_task(task("a", POD, json!({"command": ["true"]})));
    wait_task(&api, "a", "Succeeded", |t| phase(t) == "Succeeded");

    // 410 Gone inside the stream (an ERROR event), then as the answer to the request.
    for (how, name) in [(Gone::InStream, "b"), (Gone::Http, "c")] {
        let before = lists(&api);
        api.gone_next_watch(how);
        api.end_watches();
        // The re-list's watch fails with 410; the agent re-lists once more.
        wait_for(T, &format!("two re-lists after {how:?}"), || {
            (lists(&api) >= before + 2 && api.open_watches(true) == 1).then_some(())
        });
        // A Task created while no watch was open is found by the list.
        api.create_task(task(name, POD, json!({"command": ["true"]})));
        wait_task(&api, name, "Succeeded", |t| phase(t) == "Succeeded");
    }

    // A Task created while the watch is failing is picked up by a re-list too.
    api.gone_next_watch(Gone::Http);
    api.end_watches();
    api.create_task(task("d", POD, json!({"command": ["sh", "-c", "exit 7"]})));
    wait_task(&api, "d", "Failed", |t| phase(t) == "Failed");
    assert_eq!(
        agent.get("d").unwrap()["status"]["state"]["terminated"]["exitCode"],
        7
    );
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
    assert_eq!(support::pids_with_cmdline(&["sleep", "4343"]).len(), 1);

    agent.restart();
    wait_task(&api, "new", "Succeeded", |t| phase(t) == "Succeeded");
    wait_for(T, "Task long to be finalized", || {
        api.get_task(NS, "long").is_none().then_some(())
    });
    assert!(support::pids_with_cmdline(&["sleep", "4343"]).is_empty());
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
    api.create_task(task("hold", POD, json!({"command": ["sleep", "4646"]})));
    wait_task(&api, "hold", "Running", |t| phase(t) == "Running");
    api.create_task(task("queued", POD, json!({"command": ["true"]})));
    let q = wait_task(&api, "queued", "Waiting", |t| phase(t) == "Waiting");
    assert_eq!(
        q["status"]["state"]["waiting"]["reason"], "TooManyTasks",
        "{q}"
    );
    api.delete_task(NS, "hold");
    wait_task(&api, "queued", "Succeeded", |t| phase(t) == "Succeeded");
    assert!(support::pids_with_cmdline(&["sleep", "4646"]).is_empty());
}
