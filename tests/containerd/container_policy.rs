//! The task policy in container mode, against the tests' real containerd (see
//! `support/containerd.rs`): what would reach the node is a 400 before any CRI call
//! (nothing created, on the node or in CRI), and every container that runs is confined
//! as kubelet confines a pod's: `no_new_privs`, `RuntimeDefault` seccomp, containerd's
//! default capabilities, and a non-root user under `restricted`, as the container itself
//! reads them from `/proc/self/status`. Nothing is skipped.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::containerd::{self, BUSYBOX};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// containerd's default capability set (`oci.defaultUnixCaps`: CHOWN, DAC_OVERRIDE,
/// FSETID, FOWNER, MKNOD, NET_RAW, SETGID, SETUID, SETFCAP, SETPCAP, NET_BIND_SERVICE,
/// SYS_CHROOT, KILL, AUDIT_WRITE).
const CONTAINERD_DEFAULT_CAPS: &str = "00000000a80425fb";

struct Env {
    agent: Agent,
    allowed: PathBuf,
    agent_id: String,
    socket: PathBuf,
    _tmp: tempfile::TempDir,
}

fn setup(extra: &[&str]) -> Env {
    let cd = containerd::shared();
    let tmp = tempfile::Builder::new()
        .prefix("te-cpol-")
        .tempdir()
        .unwrap();
    let (allowed, data) = (tmp.path().join("allowed"), tmp.path().join("data"));
    fs::create_dir_all(&allowed).unwrap();
    fs::create_dir_all(&data).unwrap();
    let agent_id = task_executor::runtime::container::agent_id(
        &fs::canonicalize(&data).unwrap().display().to_string(),
    );
    let socket = cd.socket.display().to_string();
    let allow = allowed.display().to_string();
    let mut args = vec![
        "--enable-container-mode=true",
        "--cri-socket",
        &socket,
        "--task-host-path-allow",
        &allow,
        "--reconcile-interval",
        "100ms",
        "--stop-grace-period",
        "2s",
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start_in(&data, &args);
    Env {
        agent,
        allowed,
        agent_id,
        socket: cd.socket.clone(),
        _tmp: tmp,
    }
}

impl Env {
    /// Deletes every task, stops the agent, and checks CRI holds nothing of ours.
    fn finish(mut self) {
        containerd::stop_and_expect_nothing_left(&mut self.agent, &self.socket, &self.agent_id);
    }

    /// A 400 naming `field` and the policy; nothing of the task exists afterwards.
    fn refused(&self, task: Value, field: &str) -> String {
        let name = task["name"].as_str().unwrap().to_string();
        let r = self.agent.create(task);
        assert_eq!(r.status, 400, "{}", r.text());
        let msg = r.json()["message"].as_str().unwrap().to_string();
        assert!(
            msg.starts_with(&format!("{field}: Forbidden")) && msg.contains("--task-policy"),
            "{msg}"
        );
        assert_eq!(
            self.agent
                .request("GET", &format!("/tasks/{name}"), None)
                .status,
            404
        );
        let (containers, sandboxes) = containerd::leftovers(&self.socket, &self.agent_id);
        assert!(
            containers.is_empty() && sandboxes.is_empty(),
            "a refused task made {containers:?} {sandboxes:?}"
        );
        msg
    }
}

fn template(name: &str, image: &str, mounts: Value, volumes: Value) -> Value {
    json!({"name": name, "podTemplateSpec": {"spec": {"containers": [{
        "name": "job", "image": image,
        "command": ["sh", "-c", "cat /proc/self/status; id -u"],
        "volumeMounts": mounts}], "volumes": volumes}}})
}

fn host_path(path: &str, kind: &str) -> Value {
    json!([{"name": "h", "hostPath": {"path": path, "type": kind}}])
}

/// The container's output, as the logs API serves it.
fn logs(a: &Agent, name: &str) -> String {
    let r = a.request("GET", &format!("/tasks/{name}/logs"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

fn status_line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
        .trim()
}

#[test]
fn what_reaches_the_node_is_refused_before_any_cri_call() {
    let env = setup(&[]);
    let h = json!([{"name": "h", "mountPath": "/host"}]);
    let msg = env.refused(
        template("root", BUSYBOX, h.clone(), host_path("/", "")),
        "spec.podTemplateSpec.spec.volumes[\"h\"].hostPath.path",
    );
    assert!(msg.contains(&env.allowed.display().to_string()), "{msg}");
    let socket = env.socket.display().to_string();
    env.refused(
        template("sock", BUSYBOX, h.clone(), host_path(&socket, "")),
        "spec.podTemplateSpec.spec.volumes[\"h\"].hostPath.path",
    );
    let cron = env.allowed.parent().unwrap().join("cron.d-evil");
    env.refused(
        template(
            "cron",
            BUSYBOX,
            h.clone(),
            host_path(&cron.display().to_string(), "FileOrCreate"),
        ),
        "spec.podTemplateSpec.spec.volumes[\"h\"].hostPath.path",
    );
    assert!(
        !cron.exists(),
        "FileOrCreate made a file for a refused task"
    );
    let dotdot = format!("{}/../", env.allowed.display());
    env.refused(
        template("dotdot", BUSYBOX, h, host_path(&dotdot, "")),
        "spec.podTemplateSpec.spec.volumes[\"h\"].hostPath.path",
    );
    let msg = env.refused(
        json!({"name": "agent", "spec": {"container": {"image": BUSYBOX,
            "command": ["true"], "targetContainer": "task-executor"}}}),
        "spec.container.targetContainer",
    );
    assert!(msg.contains("\"main\""), "{msg}");
    env.finish();
}

#[test]
fn an_allowed_container_is_confined_as_kubelet_confines_a_pods() {
    let env = setup(&[]);
    let a = &env.agent;
    fs::write(env.allowed.join("in.txt"), "from-the-host").unwrap();
    let allowed = env.allowed.display().to_string();
    let task = template(
        "ok",
        BUSYBOX,
        json!([{"name": "h", "mountPath": "/host", "readOnly": true}]),
        host_path(&allowed, "Directory"),
    );
    let mut task = task;
    task["podTemplateSpec"]["spec"]["containers"][0]["command"] = json!([
        "sh",
        "-c",
        "cat /proc/self/status; id -u; cat /host/in.txt; echo; cat /proc/kcore >/dev/null 2>&1 && echo kcore: read || echo kcore: masked"
    ]);
    a.create_ok(&task);
    let t = a.wait_state("ok", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    let out = logs(a, "ok");
    assert_eq!(status_line(&out, "NoNewPrivs:"), "1", "{out}");
    assert_eq!(status_line(&out, "Seccomp:"), "2", "{out}");
    assert_eq!(
        status_line(&out, "CapBnd:"),
        CONTAINERD_DEFAULT_CAPS,
        "{out}"
    );
    assert!(out.contains("from-the-host"), "{out}");
    assert!(out.contains("kcore: masked"), "{out}");
    // Baseline keeps the image's user (root in this image).
    assert!(out.lines().any(|l| l == "0"), "{out}");
    env.finish();
}

#[test]
fn restricted_runs_containers_as_the_task_user_and_allowlists_images() {
    let env = setup(&[
        "--task-policy",
        "restricted",
        "--task-run-as-user",
        "65534",
        "--task-image-allow",
        "localhost/busybox",
    ]);
    let a = &env.agent;
    env.refused(
        template("other", "docker.io/library/alpine:3", json!([]), json!([])),
        "spec.podTemplateSpec.spec.containers[0].image",
    );
    env.refused(
        json!({"name": "other2", "spec": {"container": {"image": "localhost/busyboxx:test"}}}),
        "spec.container.image",
    );
    a.create_ok(&template("nonroot", BUSYBOX, json!([]), json!([])));
    let t = a.wait_state("nonroot", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    let out = logs(a, "nonroot");
    assert!(out.lines().any(|l| l == "65534"), "{out}");
    assert_eq!(status_line(&out, "NoNewPrivs:"), "1", "{out}");
    assert_eq!(status_line(&out, "Seccomp:"), "2", "{out}");
    env.finish();
}
