//! `--task-policy`: a request can only lower privilege below what the operator configured.
//! Real agents (as root) and real tasks: the refusals are 400s naming the field and the
//! policy, before anything is stored; allowed requests run with what they asked for, as
//! the tasks' own `id` shows. Needs root.

use std::time::Duration;

use crate::support::agent::Agent;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn refused(a: &Agent, name: &str, sc: serde_json::Value, field: &str, policy: &str) -> String {
    let r = a.create(json!({"name": name, "spec": {"process": {
        "command": ["id", "-u"], "securityContext": sc}}}));
    assert_eq!(r.status, 400, "{sc}: {}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "Bad Request");
    let msg = body["message"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with(&format!("spec.process.securityContext.{field}: Forbidden"))
            && msg.contains(&format!("task policy \"{policy}\"")),
        "{msg}"
    );
    assert_eq!(
        a.request("GET", &format!("/tasks/{name}"), None).status,
        404
    );
    assert!(!a.task_dir(name).exists(), "nothing stored for {name}");
    msg
}

/// The issue's reproduction: uid 0 against a uid range (and a default user) is a 400.
#[test]
fn with_a_task_identity_root_and_other_uids_are_refused() {
    let a = Agent::start(&[
        "--task-uid-range",
        "300000-300100",
        "--task-run-as-user",
        "65534",
    ]);
    for (i, uid) in [0, 1000, 300005, 65534].into_iter().enumerate() {
        refused(
            &a,
            &format!("u{i}"),
            json!({"runAsUser": uid}),
            "runAsUser",
            "baseline",
        );
    }
    refused(&a, "g", json!({"runAsGroup": 0}), "runAsGroup", "baseline");
    // The configured group may be asked for; a request asking for nothing is unchanged.
    a.run("plain", &["id", "-u"]);
    assert_eq!(a.wait_state("plain", "terminated", T)["exitCode"], 0);
    assert_eq!(a.stdout("plain"), "300000\n");
    let r = a.create(json!({"name": "grp", "spec": {"process": {
        "command": ["id", "-g"], "securityContext": {"runAsGroup": 65534}}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(a.wait_state("grp", "terminated", T)["exitCode"], 0);
    assert_eq!(a.stdout("grp"), "65534\n");
}

#[test]
fn restricted_never_runs_root_nor_escalates() {
    let a = Agent::start(&["--task-policy", "restricted", "--task-run-as-user", "65534"]);
    refused(
        &a,
        "root",
        json!({"runAsUser": 0}),
        "runAsUser",
        "restricted",
    );
    refused(
        &a,
        "esc",
        json!({"allowPrivilegeEscalation": true}),
        "allowPrivilegeEscalation",
        "restricted",
    );
    a.run("plain", &["id", "-u"]);
    assert_eq!(a.wait_state("plain", "terminated", T)["exitCode"], 0);
    assert_eq!(a.stdout("plain"), "65534\n");
}

#[test]
fn privileged_lets_the_request_choose() {
    let a = Agent::start(&["--task-policy", "privileged", "--task-run-as-user", "65534"]);
    let r = a.create(json!({"name": "root", "spec": {"process": {
        "command": ["id", "-u"], "securityContext": {"runAsUser": 0}}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(a.wait_state("root", "terminated", T)["exitCode"], 0);
    assert_eq!(a.stdout("root"), "0\n");
}

/// An agent (root) whose tasks would run as itself can't apply `restricted`: it
/// doesn't start, and says why.
#[test]
fn restricted_without_a_task_user_does_not_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg(crate::support::agent::BIN)
        .args([
            "--task-policy",
            "restricted",
            "--listen-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "{out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--task-policy restricted runs no task as root"),
        "{err}"
    );
}

/// Mounts a FUSE file system at argv[1] the way a FUSE daemon does (open `/dev/fuse`,
/// `mount(2)` with its descriptor), then exits: the connection is aborted, the mount stays
/// (accesses answer ENOTCONN) until unmounted. No FUSE package is needed.
const MOUNT_FUSE: &str = r#"
import ctypes, os, sys
fd = os.open("/dev/fuse", os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
if libc.mount(b"probe", sys.argv[1].encode(), b"fuse", 0, opts) != 0:
    e = ctypes.get_errno()
    sys.exit(f"mount: {os.strerror(e)}")
"#;

/// Upstream's own example of a hook: a `preStart` that mounts a FUSE file system for the
/// main command. Possible where the policy allows it (`baseline`, the task as the agent's
/// identity); under `restricted` the same hook runs as the task user, confined (no new
/// privileges, the `RuntimeDefault` filter), its mount fails and so does the task,
/// `PreStartHookFailed`.
/// The agent runs in a mount namespace of its own, so nothing is mounted on the host.
#[test]
fn a_pre_start_hook_can_mount_fuse_where_the_policy_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("mount_fuse.py");
    std::fs::write(&script, MOUNT_FUSE).unwrap();
    let script = script.to_str().unwrap().to_string();
    let task = |name: &str| {
        let mnt = dir.path().join(name);
        std::fs::create_dir_all(&mnt).unwrap();
        let mnt = mnt.to_str().unwrap().to_string();
        json!({"name": name, "spec": {"process": {
            // The main command sees the hook's mount (it reads the table only: the
            // aborted connection is never touched).
            "command": ["sh", "-c", format!("grep -c ' {mnt} .* fuse ' /proc/self/mountinfo")],
            "lifecycle": {"preStart": {"exec": {"command": ["python3", &script, &mnt]}}}}}})
    };
    let wrapper = ["unshare", "--mount", "--propagation", "private", "--"];

    let a = Agent::start_wrapped(&wrapper, &[]);
    let r = a.create(task("fuse"));
    assert_eq!(r.status, 201, "{}", r.text());
    let t = a.wait_state("fuse", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    assert_eq!(a.stdout("fuse"), "1\n");

    let a = Agent::start_wrapped(
        &wrapper,
        &["--task-policy", "restricted", "--task-run-as-user", "65534"],
    );
    let r = a.create(task("confined"));
    assert_eq!(r.status, 201, "{}", r.text());
    let t = a.wait_state("confined", "terminated", T);
    assert_eq!(t["reason"], "PreStartHookFailed", "{t}");
}
