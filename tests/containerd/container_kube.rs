//! Container mode inside a "cluster": the agent has POD_NAME/POD_NAMESPACE, joins the
//! pod's sandbox (made here through raw CRI, as kubelet would, on the shared test
//! containerd) and resolves `volumeMounts` names from its own Pod, served by the fake API
//! server, merged with `--volume` entries (which win).

use std::fs;
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::containerd::{self, BUSYBOX, KubeletPod};
use crate::support::fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

const NS: &str = "tests";
const T: Duration = Duration::from_secs(30);

fn pod(name: &str, volumes: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}")},
        // The main container mounts every volume: under the task policy, tasks may
        // mount only the main container's volumes.
        "spec": {"containers": [
                    {"name": "main", "image": "example/main", "volumeMounts":
                        volumes.as_array().into_iter().flatten()
                            .map(|v| json!({"name": v["name"], "mountPath": "/v"}))
                            .collect::<Vec<_>>()},
                    {"name": "task-executor", "image": "example/agent"}],
                 "volumes": volumes},
        "status": {"phase": "Running"}
    })
}

fn writer(name: &str, volume: &str) -> Value {
    json!({"name": name, "spec": {"container": {
        "image": BUSYBOX,
        "command": ["sh", "-c", format!("echo {name} > /mnt/v/{name}.txt")],
        "volumeMounts": [{"name": volume, "mountPath": "/mnt/v"}]}}})
}

#[test]
fn volume_names_come_from_the_own_pod() {
    let cd = containerd::shared();
    let pod_name = format!("volumes-{}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let [host, late, shadowed, flag] = ["host", "late", "shadowed", "flag"].map(|d| {
        let p = tmp.path().join(d);
        fs::create_dir_all(&p).unwrap();
        p
    });
    // Dropped last: the sandbox goes even if the test fails.
    let _sandbox = KubeletPod::start(&pod_name, NS, None);
    let api = FakeApiServer::start();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);
    let socket = cd.socket.display().to_string();
    let flag_volume = format!("both={}", flag.display());
    let agent = Agent::start_with_env(
        &[
            "--enable-container-mode=true",
            "--cri-socket",
            &socket,
            "--volume",
            &flag_volume,
            "--reconcile-interval",
            "100ms",
            "--stop-grace-period",
            "2s",
        ],
        &[
            ("POD_NAME", &pod_name),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );

    // The Pod is not there yet (not readable at start-up): only --volume names are known.
    let r = agent.call(
        "POST",
        "/tasks",
        Some(&writer("w-early", "data").to_string()),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("known volumes: both)"), "{}", r.text());

    // Once it is, its volumes are read on the next unknown name.
    api.put_pod(pod(
        &pod_name,
        json!([
            {"name": "data", "hostPath": {"path": host}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "both", "hostPath": {"path": shadowed}}
        ]),
    ));

    // A hostPath volume of the Pod: what the container writes is on the host.
    agent.create_ok(&writer("w-data", "data"));
    let t = agent.wait_state("w-data", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    assert_eq!(
        fs::read_to_string(host.join("w-data.txt")).unwrap(),
        "w-data\n"
    );
    let pod_path = format!("/api/v1/namespaces/{NS}/pods/{pod_name}");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == pod_path),
        "the Pod was read"
    );

    // A name both in --volume and in the Pod: the flag wins.
    agent.create_ok(&writer("w-both", "both"));
    let t = agent.wait_state("w-both", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    assert!(flag.join("w-both.txt").exists());
    assert!(!shadowed.join("w-both.txt").exists());

    // An unknown name is a 400 that lists the known ones (the Pod's emptyDir too).
    let r = agent.call(
        "POST",
        "/tasks",
        Some(&writer("w-nope", "nope").to_string()),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["message"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.contains("unknown volume \"nope\" (known volumes: both, data, scratch)"),
        "{msg}"
    );
    assert!(agent.get("w-nope").is_none());

    // A volume added by a new Pod revision is found: an unknown name reads the Pod again.
    api.put_pod(pod(
        &pod_name,
        json!([
            {"name": "data", "hostPath": {"path": host}},
            {"name": "late", "hostPath": {"path": late}}
        ]),
    ));
    agent.create_ok(&writer("w-late", "late"));
    let t = agent.wait_state("w-late", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    assert_eq!(
        fs::read_to_string(late.join("w-late.txt")).unwrap(),
        "w-late\n"
    );

    // Every task container ran in the pod's sandbox; the agent made none of its own.
    let agent_id = task_executor::runtime::container::agent_id(&format!("pod:{NS}/{pod_name}"));
    let (ours, owned) = containerd::leftovers(&cd.socket, &agent_id);
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert!(ours.iter().all(|c| c.pod_sandbox_id == _sandbox.sandbox_id));
    assert!(owned.is_empty());
    let mut agent = agent;
    agent.delete_all_and_stop();
    assert!(containerd::leftovers(&cd.socket, &agent_id).0.is_empty());
}

/// Under the task policy a container task may mount only the Pod volumes the main
/// container mounts: never one only the agent mounts (its token, its data dir, the CRI
/// socket), which would hand a task what the agent alone holds. Refused with a 400 before
/// any CRI call; the main container's volume in the same Pod is mounted.
#[test]
fn the_agents_own_pod_volumes_are_never_mounted_into_a_task() {
    let cd = containerd::shared();
    let pod_name = format!("own-volumes-{}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let [shared, secret] = ["shared", "secret"].map(|d| {
        let p = tmp.path().join(d);
        fs::create_dir_all(&p).unwrap();
        p
    });
    let _sandbox = KubeletPod::start(&pod_name, NS, None);
    let api = FakeApiServer::start();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);
    api.put_pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": NS, "uid": format!("uid-{pod_name}")},
        "spec": {"containers": [
                    {"name": "main", "image": "example/main",
                     "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
                    {"name": "task-executor", "image": "example/agent",
                     "volumeMounts": [{"name": "agent-token", "mountPath": "/var/run/token"},
                                      {"name": "shared", "mountPath": "/shared"}]}],
                 "volumes": [{"name": "shared", "hostPath": {"path": shared}},
                             {"name": "agent-token", "hostPath": {"path": secret}}]},
        "status": {"phase": "Running"}
    }));
    let socket = cd.socket.display().to_string();
    let agent = Agent::start_with_env(
        &["--enable-container-mode=true", "--cri-socket", &socket],
        &[
            ("POD_NAME", &pod_name),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );

    let r = agent.call(
        "POST",
        "/tasks",
        Some(&writer("w-token", "agent-token").to_string()),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("agent-token"), "names the volume: {msg}");
    assert!(agent.get("w-token").is_none(), "nothing of it was kept");
    assert_eq!(fs::read_dir(&secret).unwrap().count(), 0);

    // A volume the main container mounts (the agent too) is the main container's own.
    agent.create_ok(&writer("w-shared", "shared"));
    let t = agent.wait_state("w-shared", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    assert_eq!(
        fs::read_to_string(shared.join("w-shared.txt")).unwrap(),
        "w-shared\n"
    );

    // The refused task never reached the runtime: one container, the allowed one.
    let agent_id = task_executor::runtime::container::agent_id(&format!("pod:{NS}/{pod_name}"));
    assert_eq!(containerd::leftovers(&cd.socket, &agent_id).0.len(), 1);
    let mut agent = agent;
    agent.delete_all_and_stop();
    assert!(containerd::leftovers(&cd.socket, &agent_id).0.is_empty());
}
