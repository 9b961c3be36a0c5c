//! Upstream's container tasks (`podTemplateSpec`, a Kubernetes PodTemplateSpec with one
//! container) against the tests' real containerd (see `support/containerd.rs`): image,
//! command, args, env, workingDir, volumeMounts of the template's emptyDir and hostPath
//! volumes and of the pod's (`--volume`), the timeout from activeDeadlineSeconds, the
//! echo, a restart, and what is refused. Nothing is skipped.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::containerd::{self, BUSYBOX};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

struct Env {
    agent: Agent,
    /// The pod volume `data` (`--volume data=...`).
    vol: PathBuf,
    /// A host directory for the templates' hostPath volumes.
    host: PathBuf,
    data: PathBuf,
    agent_id: String,
    socket: PathBuf,
    _tmp: tempfile::TempDir,
}

fn setup() -> Env {
    let cd = containerd::shared();
    let tmp = tempfile::Builder::new()
        .prefix("te-tpl-")
        .tempdir()
        .unwrap();
    let (vol, host, data) = (
        tmp.path().join("vol"),
        tmp.path().join("host"),
        tmp.path().join("data"),
    );
    for d in [&vol, &host, &data] {
        fs::create_dir_all(d).unwrap();
    }
    let agent_id = task_executor::runtime::container::agent_id(
        &fs::canonicalize(&data).unwrap().display().to_string(),
    );
    let socket = cd.socket.display().to_string();
    let volume = format!("data={}", vol.display());
    let allow = host.display().to_string();
    let agent = Agent::start_in(
        &data,
        &[
            "--task-host-path-allow",
            &allow,
            "--enable-container-mode=true",
            "--cri-socket",
            &socket,
            "--volume",
            &volume,
            "--reconcile-interval",
            "100ms",
            "--stop-grace-period",
            "2s",
        ],
    );
    Env {
        agent,
        vol,
        host,
        data,
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
}

/// A task in upstream's wire shape: `podTemplateSpec` at the top level.
fn template_task(name: &str, container: Value, volumes: Value) -> Value {
    let mut c = json!({"name": "job", "image": BUSYBOX});
    c.as_object_mut()
        .unwrap()
        .extend(container.as_object().unwrap().clone());
    json!({"name": name, "podTemplateSpec": {
        "metadata": {"labels": {"app": "demo"}},
        "spec": {"restartPolicy": "Never", "containers": [c], "volumes": volumes}}})
}

#[test]
fn a_template_runs_its_container_with_its_volumes_and_is_echoed_as_sent() {
    let env = setup();
    let a = &env.agent;
    fs::write(env.vol.join("in.txt"), "from-the-pod-volume").unwrap();
    let script = "echo \"$GREETING from $(pwd)\"; \
                  echo scratch > /scratch/s && cat /scratch/s; \
                  echo out > /host/out.txt; cat /pod/in.txt; echo; \
                  echo nope > /pod/denied || echo read-only; exit 5";
    let task = template_task(
        "tpl",
        json!({"command": ["sh", "-c"], "args": [script],
               "env": [{"name": "GREETING", "value": "hello"}], "workingDir": "/tmp",
               "volumeMounts": [
                   {"name": "scratch", "mountPath": "/scratch"},
                   {"name": "host", "mountPath": "/host"},
                   {"name": "data", "mountPath": "/pod", "readOnly": true}]}),
        json!([
            {"name": "scratch", "emptyDir": {}},
            {"name": "host", "hostPath": {"path": env.host.join("made").display().to_string(),
                                          "type": "DirectoryOrCreate"}}
        ]),
    );
    let r = a.create(task.clone());
    assert_eq!(r.status, 201, "{}", r.text());
    // Echoed as sent, but for its environment values (--show-task-env).
    let mut echoed = task["podTemplateSpec"].clone();
    for c in echoed["spec"]["containers"].as_array_mut().unwrap() {
        for e in c["env"].as_array_mut().into_iter().flatten() {
            e.as_object_mut().unwrap().remove("value");
        }
    }
    assert_eq!(r.json()["podTemplateSpec"], echoed);
    assert_eq!(r.json()["spec"]["podTemplateSpec"], echoed);
    let t = a.wait_state("tpl", "terminated", T);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(5), Some("Failed")),
        "{t}"
    );
    let log = a.call("GET", "/tasks/tpl/logs?stream=stdout", None).text();
    assert_eq!(
        log,
        "hello from /tmp\nscratch\nfrom-the-pod-volume\nread-only\n",
        "{}",
        fs::read_to_string(env.data.join("tpl/container.log")).unwrap_or_default()
    );
    assert_eq!(
        fs::read_to_string(env.host.join("made/out.txt")).unwrap(),
        "out\n"
    );
    assert!(!env.vol.join("denied").exists());
    // The emptyDir lives in the task's directory, and goes with the task.
    let scratch = env.data.join("tpl/volumes/scratch");
    assert_eq!(fs::read_to_string(scratch.join("s")).unwrap(), "scratch\n");
    a.delete("tpl");
    a.wait_gone("tpl", T);
    assert!(!scratch.exists());
    env.finish();
}

#[test]
fn a_template_task_survives_a_restart_and_times_out_by_its_deadline() {
    let mut env = setup();
    let task = template_task(
        "kept",
        json!({"command": ["sh", "-c", "sleep 3; exit 4"]}),
        json!([]),
    );
    env.agent.create_ok(&task);
    env.agent.wait_state("kept", "running", T);
    let mut deadline = template_task("deadline", json!({"command": ["sleep", "300"]}), json!([]));
    deadline["podTemplateSpec"]["spec"]["activeDeadlineSeconds"] = json!(2);
    env.agent.create_ok(&deadline);
    env.agent.kill9();
    env.agent.restart();
    let t = env.agent.wait_state("kept", "terminated", T);
    assert_eq!(t["exitCode"], 4, "{t}");
    // The stored record kept the template as sent.
    assert_eq!(
        env.agent.get("kept").unwrap()["podTemplateSpec"],
        task["podTemplateSpec"]
    );
    let t = env.agent.wait_state("deadline", "terminated", T);
    assert_eq!(t["reason"], "TaskTimeout", "{t}");
    env.finish();
}

#[test]
fn what_a_template_task_cannot_do_is_a_400_naming_it() {
    let env = setup();
    let a = &env.agent;
    let c = json!({"name": "c", "image": BUSYBOX, "command": ["true"]});
    let cases = [
        (
            json!({"name": "two", "podTemplateSpec": {"spec": {"containers": [c.clone(), c.clone()]}}}),
            "exactly one container, got 2",
        ),
        (
            template_task(
                "secret",
                json!({"env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}),
                json!([]),
            ),
            "valueFrom is not supported",
        ),
        (
            template_task(
                "nowhere",
                json!({"volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}),
                json!([{"name": "cfg", "configMap": {"name": "c"}}]),
            ),
            "volume \"cfg\"",
        ),
        (
            template_task(
                "root",
                json!({"securityContext": {"privileged": true}}),
                json!([]),
            ),
            "podTemplateSpec.spec.containers[0].securityContext is not supported",
        ),
        (
            json!({"name": "both", "process": {"command": ["true"]},
                   "podTemplateSpec": {"spec": {"containers": [c.clone()]}}}),
            "only one of process, container or podTemplateSpec",
        ),
    ];
    for (task, want) in cases {
        let r = a.create(task.clone());
        assert_eq!(r.status, 400, "{task}: {}", r.text());
        let msg = r.json()["message"].as_str().unwrap().to_string();
        assert!(msg.contains(want), "{want}: {msg}");
        assert!(a.get(task["name"].as_str().unwrap()).is_none());
    }
    // A hostPath whose type does not match ends the task's start with the reason.
    let file = env.host.join("a-file");
    fs::write(&file, "x").unwrap();
    a.create_ok(&template_task(
        "notdir",
        json!({"volumeMounts": [{"name": "h", "mountPath": "/h"}]}),
        json!([{"name": "h", "hostPath": {"path": file.display().to_string(), "type": "Directory"}}]),
    ));
    let t = a.wait_state("notdir", "terminated", T);
    assert_eq!(t["reason"], "StartFailed", "{t}");
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .contains("is not a directory"),
        "{t}"
    );
    env.finish();
}

#[test]
fn without_container_mode_a_template_is_a_400_as_spec_container_is() {
    let a = Agent::start(&[]);
    for task in [
        json!({"name": "t", "podTemplateSpec": {"spec": {"containers": [{"name": "c", "image": BUSYBOX}]}}}),
        json!({"name": "t", "spec": {"container": {"image": BUSYBOX}}}),
    ] {
        let r = a.create(task);
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("--enable-container-mode"), "{}", r.text());
    }
    assert!(a.get("t").is_none());
}
