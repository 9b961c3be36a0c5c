//! Tasks can't touch the agent or each other: a hostile task, run by a real agent (as
//! root, tasks as another uid, in token mode), tries to read another task's spec, journal
//! and environment, forge `exit` lines, rewrite logs, read the token file and the agent's
//! /proc, read the agent's configuration from its own environment and gain privileges
//! through a setuid binary. Every attempt must fail, and what a user checks (the files,
//! the outcomes after an agent restart) must be unchanged. Sidecar tasks: the main
//! container's uid, gid, groups and capability sets, and no more. Needs root.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::http::{self, Response};
use crate::support::standin::{MainContainer, Options};
use crate::support::wait_for;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "isolation-test-token-0123456789abcdef";

/// A request with the agent's bearer token.
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Response {
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http::raw(addr, req.as_bytes()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn create(a: &Agent, task: Value) {
    let r = call(a.addr, "POST", "/tasks", Some(&task));
    assert_eq!(r.status, 201, "{task}: {}\n{}", r.text(), a.log_tail());
}

fn state(a: &Agent, name: &str, want: &str) -> Value {
    wait_for(T, &format!("{name} to be {want}"), || {
        let r = call(a.addr, "GET", &format!("/tasks/{name}"), None);
        (r.status == 200)
            .then(|| r.json()["status"]["state"].get(want).cloned())
            .flatten()
    })
}

fn logs(a: &Agent, name: &str) -> String {
    let r = call(a.addr, "GET", &format!("/tasks/{name}/logs"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// A directory anyone may enter (a tempdir is 0700), as a pod's volumes are.
fn open_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// The token file as the chart mounts it: 0600, root's, in a directory anyone enters.
fn token_file(dir: &Path) -> PathBuf {
    let file = dir.join("tokens");
    fs::write(&file, format!("{TOKEN}\n")).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    file
}

/// A setuid-root copy of `id`: whoever runs it without `no_new_privs` has euid 0.
fn setuid_id(dir: &Path) -> PathBuf {
    let p = dir.join("suid-id");
    fs::copy("/usr/bin/id", &p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4755)).unwrap();
    p
}

/// Each attempt prints `NAME: allowed` or `NAME: denied`.
const HOSTILE: &str = r#"
try() { n=$1; shift; if ( "$@" ) >/dev/null 2>&1; then echo "$n: allowed"; else echo "$n: denied"; fi; }
try list-data-dir ls "$DATA"
try read-other-spec cat "$VICTIM/task.json"
try read-other-journal cat "$VICTIM/run.jsonl"
try read-other-log cat "$VICTIM/stdout.log"
try forge-other-exit sh -c 'echo "{\"exit\":{\"exitCode\":0}}" >> "$VICTIM/run.jsonl"'
try forge-own-exit sh -c 'echo "{\"exit\":{\"exitCode\":0}}" >> "$OWN/run.jsonl"'
try rewrite-own-spec sh -c 'echo "{}" > "$OWN/task.json"'
try truncate-other-log sh -c ': > "$VICTIM/stdout.log"'
try append-other-log sh -c 'echo forged >> "$VICTIM/stdout.log"'
try rewrite-own-log sh -c 'echo forged >> "$OWN/stdout.log"'
try read-token cat "$TOKEN_FILE"
try read-agent-environ cat /proc/$AGENT_PID/environ
try read-agent-root cat /proc/$AGENT_PID/root$TOKEN_FILE
try signal-agent kill -0 $AGENT_PID
try read-other-environ cat /proc/$VICTIM_PID/environ
grep NoNewPrivs /proc/self/status
echo "suid-euid: $($SUID -u)"
echo "ids: $(id -u) $(id -g) $(id -G)"
env | sed 's/=.*//' | sed 's/^/env: /'
exit 7
"#;

fn attempts(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(_, v)| *v == "allowed" || *v == "denied")
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    ["task.json", "run.jsonl", "stdout.log"]
        .into_iter()
        .map(|f| (f.to_string(), fs::read(dir.join(f)).unwrap_or_default()))
        .collect()
}

#[test]
fn a_hostile_host_task_reaches_nothing_of_the_agent_or_other_tasks() {
    let shared = open_dir();
    let token = token_file(shared.path());
    let suid = setuid_id(shared.path());
    let token_path = token.to_str().unwrap();
    // The data dir as a volume comes (an emptyDir is 0777), where tasks can reach its path.
    let data_dir = shared.path().join("data");
    fs::create_dir(&data_dir).unwrap();
    fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o777)).unwrap();
    let mut a = Agent::start_in_with_env(
        &data_dir,
        &[],
        &[
            ("AUTH_MODE", "token"),
            ("AUTH_TOKEN_FILE", token_path),
            ("TASK_RUN_AS_USER", "65534"),
            // The victim's own uid is the request's choice here, which only the
            // privileged task policy allows with a configured task identity.
            ("TASK_POLICY", "privileged"),
            ("KUBECONFIG", "/root/.kube/config"),
            ("HTTPS_PROXY", "http://proxy.invalid:3128"),
            ("USER_VAR", "kept"),
        ],
    );
    // A victim with a secret in its spec and environment, running as a uid of its own.
    create(
        &a,
        json!({"name": "victim", "spec": {"process": {
            "command": ["sh", "-c", "echo victim-output; exec sleep 1000"],
            "env": [{"name": "VICTIM_SECRET", "value": "s3cret"}],
            "securityContext": {"runAsUser": 65533}}}}),
    );
    create(
        &a,
        json!({"name": "done", "spec": {"process": {"command": ["sh", "-c", "exit 3"]}}}),
    );
    state(&a, "victim", "running");
    assert_eq!(state(&a, "done", "terminated")["exitCode"], 3);
    wait_for(T, "the victim's output", || {
        a.stdout("victim").contains("victim-output").then_some(())
    });
    let before = snapshot(&a.task_dir("victim"));
    let victim_pid = a.main_pid("victim").to_string();
    let data = a.data_dir.display().to_string();
    let victim = a.task_dir("victim").display().to_string();
    let own = a.task_dir("hostile").display().to_string();
    let agent_pid = a.pid().to_string();
    let env = [
        ("DATA", data.as_str()),
        ("VICTIM", &victim),
        ("OWN", &own),
        ("TOKEN_FILE", token_path),
        ("AGENT_PID", &agent_pid),
        ("VICTIM_PID", &victim_pid),
        ("SUID", suid.to_str().unwrap()),
    ]
    .map(|(k, v)| json!({"name": k, "value": v}));
    create(
        &a,
        json!({"name": "hostile", "spec": {"process": {
            "command": ["sh", "-c", HOSTILE], "env": env}}}),
    );
    assert_eq!(state(&a, "hostile", "terminated")["exitCode"], 7);
    let out = logs(&a, "hostile");
    let tried = attempts(&out);
    assert_eq!(tried.len(), 15, "{out}");
    for (what, result) in &tried {
        assert_eq!(result, "denied", "{what}: {out}\n{}", a.log_tail());
    }
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(
        out.contains("suid-euid: 65534"),
        "a setuid binary grants nothing: {out}"
    );
    assert!(
        out.contains("ids: 65534 65534 65534\n"),
        "the flag's uid and gid, no other group: {out}"
    );
    let vars: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("env: "))
        .collect();
    for agents in [
        "AUTH_MODE",
        "AUTH_TOKEN_FILE",
        "TASK_RUN_AS_USER",
        "LOG_LEVEL",
        "KUBECONFIG",
    ] {
        assert!(!vars.contains(&agents), "{agents} leaked: {vars:?}");
    }
    for kept in [
        "PATH",
        "HTTPS_PROXY",
        "USER_VAR",
        "TASK_EXECUTOR_TASK",
        "DATA",
    ] {
        assert!(vars.contains(&kept), "{kept} missing: {vars:?}");
    }

    // Nothing changed, and the outcomes are the recorded ones after a restart.
    assert_eq!(snapshot(&a.task_dir("victim")), before);
    a.restart();
    state(&a, "victim", "running");
    assert_eq!(state(&a, "done", "terminated")["exitCode"], 3);
    let h = state(&a, "hostile", "terminated");
    assert_eq!(
        (h["exitCode"].as_i64(), h["reason"].as_str()),
        (Some(7), Some("Failed"))
    );
    assert!(logs(&a, "victim").contains("victim-output"));
    assert!(!logs(&a, "hostile").contains("forged"));
}

#[test]
fn a_task_may_escalate_only_when_its_security_context_allows_it() {
    let shared = open_dir();
    let suid = setuid_id(shared.path());
    // Baseline (the default) refuses escalation beyond the configured task identity.
    let strict = Agent::start(&["--task-run-as-user", "65534:65534"]);
    let r = strict.create(json!({"name": "escalating", "spec": {"process": {
        "command": ["true"], "securityContext": {"allowPrivilegeEscalation": true}}}}));
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("spec.process.securityContext.allowPrivilegeEscalation")
            && msg.contains("\"baseline\""),
        "{msg}"
    );
    assert_eq!(strict.request("GET", "/tasks/escalating", None).status, 404);
    let a = Agent::start(&[
        "--task-run-as-user",
        "65534:65534",
        "--task-policy",
        "privileged",
    ]);
    let probe = format!("{} -u; grep NoNewPrivs /proc/self/status", suid.display());
    for (name, allow) in [("confined", None), ("escalating", Some(true))] {
        let mut p = json!({"command": ["sh", "-c", &probe]});
        if let Some(allow) = allow {
            p["securityContext"] = json!({"allowPrivilegeEscalation": allow});
        }
        assert_eq!(
            a.create(json!({"name": name, "spec": {"process": p}}))
                .status,
            201
        );
    }
    for name in ["confined", "escalating"] {
        assert_eq!(a.wait_state(name, "terminated", T)["exitCode"], 0);
    }
    assert_eq!(a.stdout("confined"), "65534\nNoNewPrivs:\t1\n");
    assert_eq!(a.stdout("escalating"), "0\nNoNewPrivs:\t0\n");
}

#[test]
fn a_task_as_another_user_runs_writes_where_told_and_its_logs_are_served() {
    let work = open_dir();
    let a = Agent::start_in(&work.path().join("data"), &["--task-run-as-user", "65534"]);
    fs::create_dir(work.path().join("out")).unwrap();
    std::os::unix::fs::chown(work.path().join("out"), Some(65534), Some(65534)).unwrap();
    let dir = work.path().join("out");
    let r = a.create(json!({"name": "worker", "spec": {"process": {
        "command": ["sh", "-c", "id -u; echo result > result; echo oops >&2"],
        "workingDir": dir}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let t = a.wait_state("worker", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    assert_eq!(fs::read_to_string(dir.join("result")).unwrap(), "result\n");
    let logs = a.request("GET", "/tasks/worker/logs", None);
    assert_eq!(logs.text(), "65534\noops\n");
    // Created as the agent's: owner-only records, group-readable logs.
    let mode = |f: &str| {
        fs::metadata(a.task_dir("worker").join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("."), 0o700);
    assert_eq!(mode("task.json"), 0o600);
    assert_eq!(mode("run.jsonl"), 0o600);
    assert_eq!(mode("stdout.log"), 0o640);
    assert_eq!(mode("output.idx"), 0o640);
    assert_eq!(
        fs::metadata(&a.data_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Another user than the configured one is refused (the task policy, baseline by
    // default), root first of all; nothing is kept of the refused task.
    for uid in [0, 1234] {
        let r = a.create(json!({"name": "other", "process": {
            "command": ["id"], "securityContext": {"runAsUser": uid}}}));
        assert_eq!(r.status, 400, "{}", r.text());
        let msg = r.json()["message"].as_str().unwrap().to_string();
        assert!(
            msg.starts_with("spec.process.securityContext.runAsUser: Forbidden")
                && msg.contains("--task-policy")
                && msg.contains("--task-run-as-user's uid 65534"),
            "{msg}"
        );
        assert_eq!(a.request("GET", "/tasks/other", None).status, 404);
    }
    // The configured one may be asked for. Upstream's wire shape (top-level `process`)
    // carries it too, and answers echo it in both.
    let sc = json!({"runAsUser": 65534});
    let r = a.create(json!({"name": "other", "process": {
        "command": ["sh", "-c", "echo $(id -u) $(id -g) $(id -G)"],
        "securityContext": sc}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let t = r.json();
    assert_eq!(t["process"]["securityContext"], sc);
    assert_eq!(t["spec"]["process"]["securityContext"], sc);
    a.wait_state("other", "terminated", T);
    assert_eq!(a.stdout("other"), "65534 65534 65534\n");
}

#[test]
fn invalid_security_contexts_are_refused() {
    let a = Agent::start(&[]);
    for (sc, field) in [
        (json!({"runAsUser": -1}), "runAsUser"),
        (json!({"runAsGroup": 2147483648i64}), "runAsGroup"),
    ] {
        let r = a.create(json!({"name": "bad", "spec": {"process": {
            "command": ["true"], "securityContext": sc}}}));
        assert_eq!(r.status, 400, "{}", r.text());
        let msg = r.json()["message"].as_str().unwrap().to_string();
        assert!(
            msg.contains(&format!("process.securityContext.{field}")),
            "{msg}"
        );
    }
    let r = a.create(json!({"name": "bad", "spec": {"process": {
        "command": ["true"], "securityContext": {"runAsUser": "root"}}}}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(a.get("bad").is_none());
    // The API document describes the field, with Kubernetes' bounds.
    let doc = a.request("GET", "/openapi.json", None).text();
    assert!(doc.contains("allowPrivilegeEscalation") && doc.contains("2147483647"));
}

#[test]
fn the_flag_needs_the_capabilities_to_change_ids() {
    // An agent that could not change ids would fail every task: it refuses to start.
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set=-setuid", "--inh-caps=-all"])
        .arg(crate::support::agent::BIN)
        .args([
            "--task-run-as-user",
            "65534",
            "--listen-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_SETUID"), "{err}");
}

/// The capabilities the chart gives a host-mode agent (root with SETUID, SETGID and KILL,
/// nothing else): enough to run tasks as another user, stop a task that
/// ignores SIGTERM, and re-adopt tasks after a `kill -9` of the agent.
#[test]
fn the_charts_host_mode_capabilities_are_enough() {
    let mut a = Agent::start_wrapped(
        &[
            "setpriv",
            "--bounding-set=-all,+setuid,+setgid,+kill",
            "--inh-caps=-all",
        ],
        &["--task-run-as-user", "65534", "--stop-grace-period", "1s"],
    );
    a.run_sh(
        "stubborn",
        "trap '' TERM; echo up; while true; do sleep 0.2; done",
    );
    a.run_sh("survivor", "echo up; sleep 2; exit 5");
    a.wait_state("stubborn", "running", T);
    a.wait_state("survivor", "running", T);
    let caps = fs::read_to_string(format!("/proc/{}/status", a.pid())).unwrap();
    assert!(caps.contains("CapEff:\t00000000000000e0"), "{caps}");
    a.kill9();
    a.restart();
    assert_eq!(a.wait_state("survivor", "terminated", T)["exitCode"], 5);
    let pid = a.main_pid("stubborn");
    a.delete("stubborn");
    a.wait_gone("stubborn", T);
    assert!(!crate::support::pid_alive(pid), "{}", a.log_tail());
    wait_for(T, "survivor's output", || {
        a.stdout("survivor").contains("up").then_some(())
    });
}

fn cap_lines(status: &str) -> Vec<String> {
    status
        .lines()
        .filter(|l| l.starts_with("Cap") || l.starts_with("Uid:") || l.starts_with("Gid:"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_sidecar_task_has_the_main_containers_identity_and_no_more() {
    let name = format!("iso-main-{}", std::process::id());
    let main = MainContainer::start_with(
        "iso-host",
        Options {
            marker: Some(&name),
            uid: Some(1000),
            groups: &[2000],
            setpriv: "--bounding-set=-all,+chown,+setpcap,+net_bind_service \
                      --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service",
            ..Default::default()
        },
    );
    let shared = open_dir();
    let a = Agent::start_in(
        &shared.path().join("data"),
        &[
            "--enable-sidecar-mode=true",
            "--main-container-name",
            &name,
            // Host tasks only: a sidecar task starts from the main container's identity.
            "--task-run-as-user",
            "65534",
        ],
    );
    let data = a.data_dir.display().to_string();
    a.run(
        "inside",
        &[
            "sh",
            "-c",
            &format!(
                "grep -E '^(Cap|Uid|Gid|Groups|NoNewPrivs)' /proc/self/status; \
                 if ls {data} >/dev/null 2>&1; then echo data-dir: allowed; else echo data-dir: denied; fi"
            ),
        ],
    );
    let t = a.wait_state("inside", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    let out = a.stdout("inside");
    let theirs = fs::read_to_string(format!("/proc/{}/status", main.pid)).unwrap();
    assert_eq!(cap_lines(&out), cap_lines(&theirs), "{out}");
    assert!(out.contains("Groups:\t2000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("data-dir: denied"), "{out}");
    // The container's sets, not the agent's root with every capability.
    assert!(out.contains("CapBnd:\t0000000000000501"), "{out}");

    // Another identity inside the main container is refused (the task runs as the main
    // container's user); only the privileged task policy lets a request choose.
    let r = a.create(json!({"name": "as-root", "spec": {"process": {
        "command": ["id"], "securityContext": {"runAsUser": 0}}}}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("--sidecar-run-as-target-user"),
        "{}",
        r.text()
    );
}
