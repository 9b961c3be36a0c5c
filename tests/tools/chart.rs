//! Checks of the Helm chart (charts/task-executor), its examples and the Dockerfile with
//! the real tools: helm v4 (lint, template), kubernetes-validate (the API schemas of
//! Kubernetes 1.33, offline) and hadolint. `scripts/install-helm-tools` puts them in
//! `.tools/bin`. A missing tool fails the test instead of skipping it, so a run cannot
//! pass without having checked anything.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use yaml_serde::{Mapping, Value};

const CHART: &str = "charts/task-executor";
const KUBE_VERSION: &str = "1.33.0";
const RELEASE: &str = "sandbox";
const NAMESPACE: &str = "sandbox-ns";
const PORT: u64 = 5758;
const SIDECAR_CAPS: [&str; 3] = ["SYS_ADMIN", "SYS_PTRACE", "SYS_CHROOT"];

/// Every values combination that is linted, rendered and schema-validated.
const CASES: &[(&str, &[&str])] = &[
    (
        "host mode",
        &["--set", "mode=host", "--set", "service.enabled=true"],
    ),
    (
        "sidecar mode",
        &["--set", "mode=sidecar", "--set", "service.enabled=true"],
    ),
    (
        "container mode",
        &["--set", "mode=container", "--set", "service.enabled=true"],
    ),
    (
        "privileged sidecar",
        &["--set", "mode=sidecar", "--set", "executor.privileged=true"],
    ),
    ("workload None", &["--set", "workload=None"]),
    (
        "tasks as the agent",
        &[
            "--set",
            "mode=host",
            "--set",
            "executor.taskRunAsUser=",
            "--set",
            "executor.taskUidRange=",
        ],
    ),
    (
        "token auth, TLS, no network policy",
        &[
            "--set",
            "auth.mode=token",
            "--set",
            "tls.secretName=agent-tls",
            "--set",
            "networkPolicy.enabled=false",
        ],
    ),
    (
        "kubernetes auth with a client",
        &[
            "--set",
            "mode=sidecar",
            "--set",
            "auth.mode=kubernetes",
            "--set",
            "auth.clientServiceAccounts[0].name=controller",
            "--set",
            "auth.clientServiceAccounts[0].namespace=opensandbox-system",
            "--set",
            "main.ports[0].containerPort=8080",
        ],
    ),
    ("values-sidecar", &["-f", "examples/values-sidecar.yaml"]),
    (
        "values-batchsandbox-pool",
        &["-f", "examples/values-batchsandbox-pool.yaml"],
    ),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool from `$VAR`, else `.tools/bin/NAME`.
fn tool(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".tools/bin").join(name));
    assert!(
        path.is_file(),
        "{name} not found at {} (set ${var}, or run scripts/install-helm-tools)",
        path.display()
    );
    path
}

/// A scratch directory, removed on drop (std only: unique by pid and a counter).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("te-chart-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run_ok(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// Runs helm in the repository with its cache, config and data homes in a scratch dir, so
/// the user's repositories and plugins cannot change the result and $HOME stays clean.
fn helm<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    let home = Scratch::new();
    Command::new(tool("HELM", "helm"))
        .args(args)
        .current_dir(repo())
        .env("HELM_CACHE_HOME", home.0.join("cache"))
        .env("HELM_CONFIG_HOME", home.0.join("config"))
        .env("HELM_DATA_HOME", home.0.join("data"))
        .output()
        .expect("run helm")
}

/// `helm template` of `chart` with extra arguments, as text.
fn template_text(chart: &Path, extra: &[&str]) -> String {
    let mut args = vec!["template", RELEASE];
    args.push(chart.to_str().unwrap());
    args.extend(["--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]);
    args.extend(extra);
    run_ok(helm(&args), &format!("helm {}", args.join(" ")))
}

fn render(extra: &[&str]) -> Vec<Value> {
    docs(&template_text(&repo().join(CHART), extra))
}

/// The YAML documents of a multi-document stream, empty ones dropped.
fn docs(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines().chain(["---"]) {
        if line.trim_end() == "---" {
            let v: Value = yaml_serde::from_str(&cur).expect("helm output is YAML");
            if !v.is_null() {
                out.push(v);
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    out
}

static NULL: Value = Value::Null;

/// `v` at a dotted path of mapping keys; Null where anything is missing.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, key| v.get(key).unwrap_or(&NULL))
}

fn text<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or("")
}

fn seq<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path).as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn strings<'a>(v: &'a Value, path: &str) -> Vec<&'a str> {
    seq(v, path).iter().filter_map(Value::as_str).collect()
}

/// The only document of `kind`.
fn doc<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = docs.iter().filter(|d| text(d, "kind") == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn pod_spec(docs: &[Value]) -> &Value {
    at(doc(docs, "Deployment"), "spec.template.spec")
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    seq(pod, "containers")
        .iter()
        .find(|c| text(c, "name") == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn agent(pod: &Value) -> &Value {
    container(pod, "task-executor")
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    seq(c, "env").iter().find(|e| text(e, "name") == name)
}

fn env_value<'a>(c: &'a Value, name: &str) -> &'a str {
    env(c, name).map(|e| text(e, "value")).unwrap_or("")
}

/// Whether a boolean agent flag is on, set either way the agent accepts it.
fn flag_on(c: &Value, var: &str, flag: &str) -> bool {
    let args = strings(c, "args");
    env_value(c, var) == "true"
        || args.contains(&flag)
        || args.contains(&format!("{flag}=true").as_str())
}

/// The pod volume mounted at `path` in container `c`.
fn volume_at<'a>(pod: &'a Value, c: &Value, path: &str) -> &'a Value {
    let mount = seq(c, "volumeMounts")
        .iter()
        .find(|m| text(m, "mountPath") == path)
        .unwrap_or_else(|| panic!("{} mounts nothing at {path}", text(c, "name")));
    seq(pod, "volumes")
        .iter()
        .find(|v| text(v, "name") == text(mount, "name"))
        .unwrap_or_else(|| panic!("no pod volume {}", text(mount, "name")))
}

/// The container port a probe targets (by number or by port name).
fn probe_port(c: &Value, probe: &str) -> u64 {
    let port = at(c, &format!("{probe}.httpGet.port"));
    if let Some(n) = port.as_u64() {
        return n;
    }
    seq(c, "ports")
        .iter()
        .find(|p| p.get("name") == Some(port))
        .and_then(|p| at(p, "containerPort").as_u64())
        .unwrap_or_else(|| panic!("{probe} port {port:?} is not a container port"))
}

/// What every mode must give the agent.
fn check_common(docs: &[Value]) {
    let pod = pod_spec(docs);
    let a = agent(pod);
    for (var, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
    ] {
        let e = env(a, var).unwrap_or_else(|| panic!("agent lacks {var}"));
        assert_eq!(text(e, "valueFrom.fieldRef.fieldPath"), field, "{var}");
    }
    let data_dir = env_value(a, "DATA_DIR");
    assert!(data_dir.starts_with('/'), "DATA_DIR = {data_dir:?}");
    volume_at(pod, a, data_dir);
    assert!(env_value(a, "LISTEN_ADDR").ends_with(&format!(":{PORT}")));
    assert_eq!(text(a, "livenessProbe.httpGet.path"), "/health");
    assert_eq!(text(a, "readinessProbe.httpGet.path"), "/readyz");
    assert_eq!(probe_port(a, "livenessProbe"), PORT);
    // The init is the container's first process in every mode, whatever the image's
    // entrypoint; the agent's flags follow `--`.
    assert_eq!(strings(a, "command"), ["task-executor", "init", "--"]);
    assert_eq!(probe_port(a, "readinessProbe"), PORT);
    let main = container(pod, "main");
    assert_eq!(env_value(main, "SANDBOX_MAIN_CONTAINER"), "main");
    let sa = text(doc(docs, "ServiceAccount"), "metadata.name");
    assert_eq!(text(pod, "serviceAccountName"), sa);
}

#[test]
fn helm_lint_strict_passes() {
    for (name, extra) in CASES {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend(*extra);
        run_ok(helm(&args), &format!("helm lint ({name})"));
    }
}

/// kubernetes-validate has schemas for built-in kinds only: custom resources are left
/// out, except that a Pool's pod template is checked as a core/v1 PodTemplate.
fn validatable(d: &Value) -> Option<Value> {
    let api = text(d, "apiVersion");
    if text(d, "kind") == "Pool" {
        let wrapped = format!(
            "{{apiVersion: v1, kind: PodTemplate, metadata: {{name: {}}}}}",
            text(d, "metadata.name")
        );
        let mut v: Value = yaml_serde::from_str(&wrapped).unwrap();
        v.as_mapping_mut()
            .unwrap()
            .insert("template".into(), at(d, "spec.template").clone());
        return Some(v);
    }
    let custom = api.contains(".opensandbox.io/") || api.starts_with("task-executor.io/");
    (!custom && text(d, "kind") != "CustomResourceDefinition").then(|| d.clone())
}

fn kubernetes_validate(docs: &[Value], what: &str) {
    let checked: Vec<Value> = docs.iter().filter_map(validatable).collect();
    assert!(!checked.is_empty(), "{what}: nothing to validate");
    let dir = Scratch::new();
    let file = dir.0.join("rendered.yaml");
    let body: Vec<String> = checked
        .iter()
        .map(|d| yaml_serde::to_string(d).unwrap())
        .collect();
    fs::write(&file, body.join("---\n")).unwrap();
    let out = Command::new(tool("KUBERNETES_VALIDATE", "kubernetes-validate"))
        .args(["--strict", "-k", KUBE_VERSION, "--quiet"])
        .arg(&file)
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A WARN means a document was not checked (no schema); that must not pass silently.
    assert!(
        out.status.success() && !report.contains("WARN"),
        "{what}: kubernetes-validate:\n{report}"
    );
}

#[test]
fn renderings_pass_kubernetes_validate() {
    for (name, extra) in CASES {
        kubernetes_validate(&render(extra), name);
    }
}

#[test]
fn kubernetes_validate_rejects_unknown_fields() {
    // Proves the validator really checks: a misspelt pod field must fail.
    let mut deploy = doc(&render(&[]), "Deployment").clone();
    let spec = deploy["spec"]["template"]["spec"].as_mapping_mut().unwrap();
    spec.insert("sharedProcessNamespace".into(), true.into());
    let dir = Scratch::new();
    let file = dir.0.join("bad.yaml");
    fs::write(&file, yaml_serde::to_string(&deploy).unwrap()).unwrap();
    let out = Command::new(tool("KUBERNETES_VALIDATE", "kubernetes-validate"))
        .args(["--strict", "-k", KUBE_VERSION, "--quiet"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an unknown pod field passed validation"
    );
}

#[test]
fn sidecar_mode_shares_pids_and_has_the_capabilities() {
    let docs = render(&["--set", "mode=sidecar"]);
    check_common(&docs);
    let pod = pod_spec(&docs);
    let a = agent(pod);
    assert_eq!(at(pod, "shareProcessNamespace"), &Value::Bool(true));
    assert!(flag_on(a, "ENABLE_SIDECAR_MODE", "--enable-sidecar-mode"));
    assert_eq!(env_value(a, "MAIN_CONTAINER_NAME"), "main");
    assert_eq!(at(a, "securityContext.runAsUser").as_u64(), Some(0));
    let added = strings(a, "securityContext.capabilities.add");
    for cap in SIDECAR_CAPS {
        assert!(added.contains(&cap), "sidecar agent lacks {cap}: {added:?}");
    }
    // Tasks run as the main container's user; the agent's data stays out of its reach.
    assert!(!strings(a, "args").contains(&"--sidecar-run-as-target-user=false"));
    assert_eq!(env_value(a, "TASK_RUN_AS_USER"), "65534", "Local tasks");
    assert_eq!(
        env_value(a, "TASK_UID_RANGE"),
        "100000-165535",
        "Local tasks"
    );
    assert_main_mounts_nothing_of_the_agent(pod);

    let docs = render(&[
        "--set",
        "mode=sidecar",
        "--set",
        "executor.sidecarRunAsTargetUser=false",
    ]);
    let a = agent(pod_spec(&docs));
    assert!(strings(a, "args").contains(&"--sidecar-run-as-target-user=false"));

    let docs = render(&["--set", "mode=sidecar", "--set", "executor.privileged=true"]);
    let a = agent(pod_spec(&docs));
    assert_eq!(at(a, "securityContext.privileged"), &Value::Bool(true));
}

/// The main container (untrusted code) mounts none of the agent's volumes: not its data
/// dir, not its credentials.
fn assert_main_mounts_nothing_of_the_agent(pod: &Value) {
    let main = container(pod, "main");
    let mounts: Vec<&str> = seq(main, "volumeMounts")
        .iter()
        .map(|m| text(m, "name"))
        .collect();
    assert!(
        mounts.iter().all(|m| !m.starts_with("task-executor")),
        "the main container mounts {mounts:?}"
    );
}

#[test]
fn container_mode_mounts_the_cri_socket() {
    let docs = render(&["--set", "mode=container"]);
    check_common(&docs);
    let pod = pod_spec(&docs);
    let a = agent(pod);
    assert!(flag_on(
        a,
        "ENABLE_CONTAINER_MODE",
        "--enable-container-mode"
    ));
    let socket = env_value(a, "CRI_SOCKET");
    assert_eq!(socket, "/var/run/containerd/containerd.sock");
    let vol = volume_at(pod, a, socket);
    assert_eq!(text(vol, "hostPath.path"), socket);
    assert_eq!(text(vol, "hostPath.type"), "Socket");
    assert_eq!(at(a, "securityContext.runAsUser").as_u64(), Some(0));
    assert!(!flag_on(a, "ENABLE_SIDECAR_MODE", "--enable-sidecar-mode"));
    // Process tasks run as another user: they can't reach the socket (root's, 0660).
    assert_eq!(env_value(a, "TASK_RUN_AS_USER"), "65534");
    assert_eq!(env_value(a, "TASK_UID_RANGE"), "100000-165535");
    // The task policy: baseline, no host path, any image.
    assert_eq!(env_value(a, "TASK_POLICY"), "baseline");
    assert!(env(a, "TASK_HOST_PATH_ALLOW").is_none() && env(a, "TASK_IMAGE_ALLOW").is_none());
    let docs = render(&[
        "--set",
        "mode=container",
        "--set",
        "executor.taskPolicy=restricted",
        "--set",
        "executor.taskHostPathAllow={/srv/a,/srv/b}",
        "--set",
        "executor.taskImageAllow={busybox}",
    ]);
    let a = agent(pod_spec(&docs));
    assert_eq!(env_value(a, "TASK_POLICY"), "restricted");
    assert_eq!(env_value(a, "TASK_HOST_PATH_ALLOW"), "/srv/a,/srv/b");
    assert_eq!(env_value(a, "TASK_IMAGE_ALLOW"), "busybox");
    assert_eq!(
        strings(a, "securityContext.capabilities.add"),
        TASK_USER_CAPS
    );
}

/// What an agent needs to run tasks as another user and stop them (tests/root/isolation.rs
/// runs one with exactly these), and no more.
const TASK_USER_CAPS: [&str; 3] = ["SETUID", "SETGID", "KILL"];

/// Tasks' environment values stay out of answers unless the operator turns them on.
#[test]
fn task_env_values_are_shown_only_when_asked() {
    let a = agent(pod_spec(&render(&["--set", "mode=host"]))).clone();
    assert!(env(&a, "SHOW_TASK_ENV").is_none(), "off by default");
    let on = render(&["--set", "mode=host", "--set", "executor.showTaskEnv=true"]);
    assert_eq!(env_value(agent(pod_spec(&on)), "SHOW_TASK_ENV"), "true");
}

#[test]
fn host_mode_runs_tasks_as_another_user_than_the_agent() {
    let docs = render(&["--set", "mode=host"]);
    check_common(&docs);
    let pod = pod_spec(&docs);
    let a = agent(pod);
    let sc = at(a, "securityContext");
    // Root owns the data dir and the credentials; tasks are 65534 and can read neither.
    assert_eq!(at(sc, "runAsUser").as_u64(), Some(0));
    assert_eq!(env_value(a, "TASK_RUN_AS_USER"), "65534");
    assert_eq!(at(sc, "allowPrivilegeEscalation"), &Value::Bool(false));
    assert_eq!(strings(sc, "capabilities.drop"), ["ALL"]);
    assert_eq!(strings(sc, "capabilities.add"), TASK_USER_CAPS);
    assert_eq!(at(sc, "readOnlyRootFilesystem"), &Value::Bool(true));
    assert_eq!(text(sc, "seccompProfile.type"), "RuntimeDefault");
    assert!(
        at(pod, "securityContext.fsGroup").is_null(),
        "no group shared with tasks"
    );
    assert_main_mounts_nothing_of_the_agent(pod);
    assert_ne!(at(pod, "shareProcessNamespace"), &Value::Bool(true));
    assert!(
        seq(pod, "volumes")
            .iter()
            .all(|v| at(v, "hostPath").is_null())
    );
    assert!(!flag_on(a, "ENABLE_SIDECAR_MODE", "--enable-sidecar-mode"));
    assert!(!flag_on(
        a,
        "ENABLE_CONTAINER_MODE",
        "--enable-container-mode"
    ));

    // Each task a uid of its own, from a range above the users images have.
    assert_eq!(env_value(a, "TASK_UID_RANGE"), "100000-165535");

    // The range alone still needs the capabilities to switch users.
    let docs = render(&["--set", "mode=host", "--set", "executor.taskRunAsUser="]);
    let a = agent(pod_spec(&docs));
    assert!(env(a, "TASK_RUN_AS_USER").is_none());
    assert_eq!(env_value(a, "TASK_UID_RANGE"), "100000-165535");
    assert_eq!(
        strings(a, "securityContext.capabilities.add"),
        TASK_USER_CAPS
    );
    // Tasks as the agent: no user to switch to, no capability at all.
    let docs = render(&[
        "--set",
        "mode=host",
        "--set",
        "executor.taskRunAsUser=",
        "--set",
        "executor.taskUidRange=",
    ]);
    let a = agent(pod_spec(&docs));
    assert!(env(a, "TASK_RUN_AS_USER").is_none() && env(a, "TASK_UID_RANGE").is_none());
    assert!(seq(a, "securityContext.capabilities.add").is_empty());
    let docs = render(&[
        "--set",
        "mode=host",
        "--set",
        "executor.taskUidRange=5000-5999",
    ]);
    assert_eq!(
        env_value(agent(pod_spec(&docs)), "TASK_UID_RANGE"),
        "5000-5999"
    );
    let docs = render(&[
        "--set",
        "mode=host",
        "--set-string",
        "executor.taskRunAsUser=1000:1000",
    ]);
    assert_eq!(
        env_value(agent(pod_spec(&docs)), "TASK_RUN_AS_USER"),
        "1000:1000"
    );
}

#[test]
fn role_grants_pods_tasks_and_events_to_the_service_account() {
    let docs = render(&[]);
    let role = doc(&docs, "Role");
    let grants = |group: &str, resource: &str, verbs: &[&str]| {
        seq(role, "rules").iter().any(|r| {
            strings(r, "apiGroups").contains(&group)
                && strings(r, "resources").contains(&resource)
                && verbs.iter().all(|v| strings(r, "verbs").contains(v))
        })
    };
    assert!(grants("", "pods", &["get", "watch", "list"]));
    for resource in ["tasks", "tasks/status"] {
        assert!(
            grants(
                "task-executor.io",
                resource,
                &["get", "list", "watch", "patch", "update"]
            ),
            "{resource}"
        );
    }
    assert!(grants("events.k8s.io", "events", &["create", "patch"]));
    let binding = doc(&docs, "RoleBinding");
    assert_eq!(text(binding, "roleRef.name"), text(role, "metadata.name"));
    let subject = &seq(binding, "subjects")[0];
    assert_eq!(
        text(subject, "name"),
        text(doc(&docs, "ServiceAccount"), "metadata.name")
    );
    assert_eq!(text(subject, "namespace"), NAMESPACE);
}

#[test]
fn bad_values_are_refused() {
    for (extra, message) in [
        (
            ["--set", "mode=bogus"],
            "mode must be host, sidecar or container",
        ),
        (
            ["--set", "workload=Job"],
            "workload must be Deployment, Pool or None",
        ),
    ] {
        let out = helm(["template", RELEASE, CHART].into_iter().chain(extra));
        assert!(!out.status.success(), "{extra:?} rendered");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(message),
            "{extra:?}"
        );
    }
    let out = helm([
        "template",
        RELEASE,
        CHART,
        "--set",
        "mode=sidecar",
        "--set",
        "main.enabled=false",
    ]);
    assert!(
        !out.status.success(),
        "sidecar mode without a main container rendered"
    );
}

#[test]
fn sidecar_template_defaults_match_values_yaml() {
    // With `executor` removed, _sidecar.tpl's own defaults apply; they must render the
    // same as values.yaml, which is what other charts including the template rely on.
    for mode in ["host", "sidecar", "container"] {
        let m = format!("mode={mode}");
        let with_values = template_text(&repo().join(CHART), &["--set", &m]);
        let with_defaults = template_text(
            &repo().join(CHART),
            &["--set", &m, "--set", "executor=null"],
        );
        assert_eq!(
            with_values, with_defaults,
            "{mode}: values.yaml and executorDefaults disagree"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), dest).unwrap();
        }
    }
}

#[test]
fn other_charts_can_include_the_sidecar() {
    // A parent chart with this chart as a subchart (workload: None), whose own Pod uses
    // the named templates as README.md shows.
    let dir = Scratch::new();
    let parent = dir.0.join("parent");
    copy_dir(&repo().join(CHART), &parent.join("charts/task-executor"));
    fs::create_dir_all(parent.join("templates")).unwrap();
    fs::write(
        parent.join("Chart.yaml"),
        "apiVersion: v2\nname: parent\nversion: 0.1.0\n",
    )
    .unwrap();
    fs::write(
        parent.join("values.yaml"),
        "mode: sidecar\ntask-executor:\n  workload: None\n",
    )
    .unwrap();
    fs::write(
        parent.join("templates/pod.yaml"),
        r#"{{- $te := dict "mode" .Values.mode "executor" (dict "image" (dict "repository" "registry.example.com/task-executor" "tag" "0.1.0")) }}
apiVersion: v1
kind: Pod
metadata:
  name: sandbox
spec:
  serviceAccountName: {{ .Release.Name }}-task-executor
  automountServiceAccountToken: false
  shareProcessNamespace: {{ eq .Values.mode "sidecar" }}
  containers:
    - name: main
      image: python:3.12-slim-bookworm
      env: {{- include "task-executor.mainEnv" $te | nindent 8 }}
    {{- include "task-executor.sidecar" $te | nindent 4 }}
  volumes: {{- include "task-executor.volumes" $te | nindent 4 }}
"#,
    )
    .unwrap();
    let docs = docs(&template_text(&parent, &[]));
    kubernetes_validate(&docs, "parent chart");
    assert!(
        docs.iter().all(|d| text(d, "kind") != "Deployment"),
        "workload: None rendered a Deployment"
    );
    let pod = at(doc(&docs, "Pod"), "spec");
    assert_eq!(
        text(pod, "serviceAccountName"),
        text(doc(&docs, "ServiceAccount"), "metadata.name")
    );
    let a = agent(pod);
    assert_eq!(text(a, "image"), "registry.example.com/task-executor:0.1.0");
    assert!(flag_on(a, "ENABLE_SIDECAR_MODE", "--enable-sidecar-mode"));
    assert!(
        at(container(pod, "main"), "volumeMounts").is_null(),
        "the main container mounts nothing of the agent"
    );
    // The template gives the agent its own token; the main container has none.
    assert_eq!(api_token_mounts(pod), ["task-executor"]);
}

#[test]
fn pool_example_matches_the_chart() {
    let rendered = render(&["-f", "examples/values-batchsandbox-pool.yaml"]);
    let pool = doc(&rendered, "Pool");
    let example =
        docs(&fs::read_to_string(repo().join("examples/pool-with-task-executor.yaml")).unwrap());
    let example_pool = doc(&example, "Pool");
    assert_eq!(
        text(example_pool, "apiVersion"),
        "sandbox.opensandbox.io/v1alpha1"
    );
    assert_eq!(
        text(example_pool, "metadata.name"),
        text(pool, "metadata.name")
    );
    assert!(
        at(example_pool, "spec") == at(pool, "spec"),
        "examples/pool-with-task-executor.yaml is stale; the chart renders:\n{}",
        yaml_serde::to_string(at(pool, "spec")).unwrap()
    );
    let batch = doc(&example, "BatchSandbox");
    assert_eq!(text(batch, "spec.poolRef"), text(pool, "metadata.name"));
    assert!(!seq(batch, "spec.taskTemplate.spec.process.command").is_empty());
}

/// `*.yaml` files of a directory by name (empty when it does not exist).
fn yaml_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some(OsStr::new("yaml")))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn chart_crds_equal_top_level_crds() {
    let top = yaml_files(&repo().join("crds"));
    let chart = yaml_files(&repo().join(CHART).join("crds"));
    if !repo().join("crds").is_dir() {
        // Nothing generated yet: the chart must not carry CRDs of its own making.
        assert!(
            chart.is_empty(),
            "chart crds/ has files but top-level crds/ does not exist"
        );
        return;
    }
    assert!(!top.is_empty(), "top-level crds/ has no *.yaml");
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        top.keys().collect::<Vec<_>>(),
        "run scripts/sync-chart-crds"
    );
    for (name, bytes) in &top {
        assert!(
            chart[name] == *bytes,
            "charts/task-executor/crds/{name} differs: run scripts/sync-chart-crds"
        );
    }
}

/// Every field set in `v` is declared by the OpenAPI `schema` (unless it allows unknown
/// fields), so an example cannot drift from the generated CRD.
fn check_against_schema(v: &Value, schema: &Value, path: &str) {
    if at(schema, "x-kubernetes-preserve-unknown-fields") == &Value::Bool(true) {
        return;
    }
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                let k = k.as_str().unwrap();
                let sub = at(schema, "properties").get(k).or_else(|| {
                    schema
                        .get("additionalProperties")
                        .filter(|a| a.is_mapping())
                });
                let sub = sub.unwrap_or_else(|| {
                    panic!("examples/task.yaml: {path}.{k} is not in the CRD schema")
                });
                check_against_schema(child, sub, &format!("{path}.{k}"));
            }
        }
        Value::Sequence(items) => items
            .iter()
            .for_each(|i| check_against_schema(i, at(schema, "items"), path)),
        _ => {}
    }
}

#[test]
fn task_example_is_a_task_for_a_pod() {
    let task: Value =
        yaml_serde::from_str(&fs::read_to_string(repo().join("examples/task.yaml")).unwrap())
            .unwrap();
    assert_eq!(text(&task, "apiVersion"), "task-executor.io/v1alpha1");
    assert_eq!(text(&task, "kind"), "Task");
    assert!(!text(&task, "spec.podName").is_empty());
    assert!(!seq(&task, "spec.process.command").is_empty());
    let crd_file = repo().join("crds/tasks.task-executor.io.yaml");
    if !crd_file.exists() {
        return; // The CRD is generated by the Rust code; until then only the shape is checked.
    }
    let crd: Value = yaml_serde::from_str(&fs::read_to_string(crd_file).unwrap()).unwrap();
    assert_eq!(text(&crd, "spec.group"), "task-executor.io");
    assert_eq!(text(&crd, "spec.names.kind"), "Task");
    let version = seq(&crd, "spec.versions")
        .iter()
        .find(|v| text(v, "name") == "v1alpha1")
        .expect("CRD has v1alpha1");
    let schema = at(version, "schema.openAPIV3Schema");
    let mut body = Mapping::new();
    body.insert("spec".into(), at(&task, "spec").clone());
    check_against_schema(&Value::Mapping(body), schema, "");
}

#[test]
fn dockerfile_passes_hadolint() {
    let out = Command::new(tool("HADOLINT", "hadolint"))
        .arg("Dockerfile")
        .current_dir(repo())
        .output()
        .expect("run hadolint");
    run_ok(out, "hadolint Dockerfile");
    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    // The image's binary is built by the script CI builds and smoke-tests with.
    let build = fs::read_to_string(repo().join("scripts/build-release")).unwrap();
    assert!(build.contains("cargo build --release --locked"), "{build}");
    let ci = fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(ci.contains("scripts/build-release"), "{ci}");
    for line in [
        "RUN bash scripts/build-release /out",
        // Upstream's installer copies this path (tests/containerd/upstream_pool.rs runs it).
        "COPY --from=build /out/task-executor /workspace/server",
        "RUN ln -s /workspace/server /usr/local/bin/task-executor",
        "USER 65532:65532",
        "EXPOSE 5758",
        r#"ENTRYPOINT ["task-executor", "init", "--"]"#,
    ] {
        assert!(dockerfile.contains(line), "Dockerfile lacks {line:?}");
    }
}

/// Dotted paths of the leaves of values.yaml (empty mappings count as leaves).
fn leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v.as_mapping() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                let key = k.as_str().unwrap();
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(child, &path, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn readme_documents_every_value() {
    let values: Value =
        yaml_serde::from_str(&fs::read_to_string(repo().join(CHART).join("values.yaml")).unwrap())
            .unwrap();
    let readme = fs::read_to_string(repo().join(CHART).join("README.md")).unwrap();
    // Keys of the values table: the first cell of rows like "| `executor.port` | ...".
    let table = readme
        .split("\n## Values\n")
        .nth(1)
        .expect("README.md has a ## Values section");
    let documented: Vec<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
        .collect();
    let mut paths = Vec::new();
    leaves(&values, "", &mut paths);
    for path in &paths {
        // A leaf is documented itself or through a documented parent (e.g. executor.resources).
        let mut covered = false;
        let mut p = path.as_str();
        loop {
            covered |= documented.contains(&p);
            match p.rfind('.') {
                Some(i) => p = &p[..i],
                None => break,
            }
        }
        assert!(covered, "README.md values table lacks {path}");
    }
    for key in &documented {
        assert!(
            paths
                .iter()
                .any(|p| p == key || p.starts_with(&format!("{key}."))),
            "README.md documents {key}, which values.yaml does not have"
        );
    }
}

const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Names of the containers that mount a service account token (a projected
/// serviceAccountToken volume at the usual path).
fn api_token_mounts(pod: &Value) -> Vec<&str> {
    seq(pod, "containers")
        .iter()
        .filter(|c| {
            seq(c, "volumeMounts").iter().any(|m| {
                text(m, "mountPath") == TOKEN_DIR
                    && seq(pod, "volumes").iter().any(|v| {
                        text(v, "name") == text(m, "name")
                            && seq(v, "projected.sources")
                                .iter()
                                .any(|s| !at(s, "serviceAccountToken").is_null())
                    })
            })
        })
        .map(|c| text(c, "name"))
        .collect()
}

#[test]
fn the_service_account_token_goes_only_to_an_agent_that_uses_the_api() {
    for (extra, uses_api) in [
        (&["--set", "mode=host"][..], false),
        (
            &["--set", "mode=host", "--set", "executor.watchTasks=true"],
            true,
        ),
        (
            &["--set", "mode=host", "--set", "auth.mode=kubernetes"],
            true,
        ),
        (&["--set", "mode=host", "--set", "auth.mode=token"], false),
        (&["--set", "mode=sidecar"], true),
        (&["--set", "mode=container"], true),
    ] {
        let docs = render(extra);
        let pod = pod_spec(&docs);
        assert_eq!(
            at(pod, "automountServiceAccountToken"),
            &Value::Bool(false),
            "{extra:?}"
        );
        let want: &[&str] = if uses_api { &["task-executor"] } else { &[] };
        assert_eq!(api_token_mounts(pod), want, "{extra:?}");
        // Root's alone: tasks in the agent's container run as another user.
        for v in seq(pod, "volumes")
            .iter()
            .filter(|v| !at(v, "projected").is_null())
        {
            assert_eq!(
                at(v, "projected.defaultMode").as_u64(),
                Some(0o400),
                "{extra:?}"
            );
        }
        if !uses_api {
            assert!(
                seq(pod, "volumes")
                    .iter()
                    .all(|v| at(v, "projected").is_null()),
                "{extra:?}: a token volume without a user"
            );
        }
    }
}

#[test]
fn token_auth_mounts_the_secret_into_the_agent_only() {
    let docs = render(&["--set", "mode=sidecar", "--set", "auth.mode=token"]);
    let pod = pod_spec(&docs);
    let a = agent(pod);
    assert_eq!(env_value(a, "AUTH_MODE"), "token");
    let file = env_value(a, "AUTH_TOKEN_FILE");
    let dir = &file[..file.rfind('/').unwrap()];
    let vol = volume_at(pod, a, dir);
    let secret_name = text(vol, "secret.secretName");
    assert_eq!(at(vol, "secret.defaultMode").as_u64(), Some(0o400));
    let item = &seq(vol, "secret.items")[0];
    assert_eq!(format!("{dir}/{}", text(item, "path")), file);
    // The generated Secret holds one long random token under that key.
    let secret = doc(&docs, "Secret");
    assert_eq!(text(secret, "metadata.name"), secret_name);
    let encoded = text(secret, &format!("data.{}", text(item, "key")));
    let out = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(encoded.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(token.trim().len() >= 32, "token {token:?}");
    // The main container mounts neither the tokens nor the data of that volume.
    let main = container(pod, "main");
    assert!(
        seq(main, "volumeMounts")
            .iter()
            .all(|m| text(m, "name") != text(vol, "name")),
        "the main container mounts the token Secret"
    );

    // A Secret of the user's: used as it is, none generated.
    let docs = render(&[
        "--set",
        "auth.mode=token",
        "--set",
        "auth.existingSecret=my-tokens",
        "--set",
        "auth.secretKey=list",
    ]);
    assert!(docs.iter().all(|d| text(d, "kind") != "Secret"));
    let pod = pod_spec(&docs);
    let vol = volume_at(pod, agent(pod), "/etc/task-executor/auth");
    assert_eq!(text(vol, "secret.secretName"), "my-tokens");
    assert_eq!(text(&seq(vol, "secret.items")[0], "key"), "list");
    // The Secret survives upgrades: the template reuses what the cluster already has.
    let tpl = fs::read_to_string(repo().join(CHART).join("templates/auth-secret.yaml")).unwrap();
    assert!(tpl.contains("lookup \"v1\" \"Secret\""), "{tpl}");
}

#[test]
fn kubernetes_auth_can_review_and_offers_a_client_role() {
    let docs = render(&[
        "--set",
        "auth.mode=kubernetes",
        "--set",
        "auth.clientServiceAccounts[0].name=controller",
        "--set",
        "auth.clientServiceAccounts[0].namespace=opensandbox-system",
    ]);
    let a = agent(pod_spec(&docs));
    assert_eq!(env_value(a, "AUTH_MODE"), "kubernetes");
    let sa = text(doc(&docs, "ServiceAccount"), "metadata.name");
    let delegator = doc(&docs, "ClusterRoleBinding");
    assert_eq!(text(delegator, "roleRef.name"), "system:auth-delegator");
    let subject = &seq(delegator, "subjects")[0];
    assert_eq!(
        (text(subject, "name"), text(subject, "namespace")),
        (sa, NAMESPACE)
    );
    // The client role: the verbs of the routes on tasks (and tasks/log).
    let client = doc(&docs, "ClusterRole");
    let verbs: Vec<&str> = seq(client, "rules")
        .iter()
        .filter(|r| strings(r, "resources").contains(&"tasks"))
        .flat_map(|r| strings(r, "verbs"))
        .collect();
    for v in ["create", "get", "list", "delete"] {
        assert!(verbs.contains(&v), "{v}: {verbs:?}");
    }
    let binding = docs
        .iter()
        .find(|d| text(d, "kind") == "RoleBinding" && text(d, "roleRef.kind") == "ClusterRole")
        .expect("RoleBinding of the client role");
    assert_eq!(text(binding, "roleRef.name"), text(client, "metadata.name"));
    let subject = &seq(binding, "subjects")[0];
    assert_eq!(text(subject, "name"), "controller");
    assert_eq!(text(subject, "namespace"), "opensandbox-system");
    // Other modes carry none of it.
    let docs = render(&[]);
    assert!(docs.iter().all(|d| !text(d, "kind").starts_with("Cluster")));
}

#[test]
fn tls_mounts_the_certificate_and_probes_use_https() {
    let docs = render(&["--set", "tls.secretName=agent-tls"]);
    let pod = pod_spec(&docs);
    let a = agent(pod);
    let cert = env_value(a, "TLS_CERT_FILE");
    let key = env_value(a, "TLS_KEY_FILE");
    let dir = &cert[..cert.rfind('/').unwrap()];
    assert!(key.starts_with(dir));
    let vol = volume_at(pod, a, dir);
    assert_eq!(text(vol, "secret.secretName"), "agent-tls");
    let keys: Vec<&str> = seq(vol, "secret.items")
        .iter()
        .map(|i| text(i, "key"))
        .collect();
    assert_eq!(keys, ["tls.crt", "tls.key"]);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            text(a, &format!("{probe}.httpGet.scheme")),
            "HTTPS",
            "{probe}"
        );
    }
    let plain = render(&[]);
    assert!(text(agent(pod_spec(&plain)), "livenessProbe.httpGet.scheme").is_empty());
}

#[test]
fn network_policy_admits_the_api_port_only_from_listed_namespaces() {
    let docs = render(&["--set", "main.ports[0].containerPort=8080"]);
    let np = doc(&docs, "NetworkPolicy");
    let selector = at(np, "spec.podSelector.matchLabels");
    let pod_labels = at(doc(&docs, "Deployment"), "spec.template.metadata.labels");
    for (k, v) in selector.as_mapping().unwrap() {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "the policy does not select the pods"
        );
    }
    assert_eq!(strings(np, "spec.policyTypes"), ["Ingress"]);
    let rules = seq(np, "spec.ingress");
    let api = rules
        .iter()
        .find(|r| {
            seq(r, "ports")
                .iter()
                .any(|p| at(p, "port").as_u64() == Some(PORT))
        })
        .expect("a rule for the agent's port");
    let from = seq(api, "from");
    assert!(!from.is_empty(), "the agent's port is open to all");
    // Only the controller's pods: no sibling sandbox of the release namespace, no other
    // pod of the controller's namespace.
    assert_eq!(from.len(), 1, "{from:?}");
    assert_eq!(
        at(&from[0], "namespaceSelector.matchLabels")
            .get("kubernetes.io/metadata.name")
            .and_then(Value::as_str),
        Some("opensandbox-system"),
        "{from:?}"
    );
    let labels = at(&from[0], "podSelector.matchLabels");
    assert_eq!(
        labels.get("control-plane").and_then(Value::as_str),
        Some("controller-manager"),
        "{from:?}"
    );
    // Opt-ins: the release namespace, more namespaces.
    let docs2 = render(&[
        "--set",
        "networkPolicy.allowReleaseNamespace=true",
        "--set",
        "networkPolicy.controller.podLabels=null",
    ]);
    let from2 = seq(
        &seq(doc(&docs2, "NetworkPolicy"), "spec.ingress")[0],
        "from",
    );
    assert!(
        from2.iter().any(|p| at(p, "podSelector")
            .as_mapping()
            .is_some_and(|m| m.is_empty())
            && at(p, "namespaceSelector").is_null()),
        "release namespace not admitted: {from2:?}"
    );
    assert!(at(&from2[0], "podSelector").is_null(), "{from2:?}");
    // The main container's declared port stays reachable.
    assert!(rules.iter().any(|r| {
        seq(r, "from").is_empty()
            && seq(r, "ports")
                .iter()
                .any(|p| at(p, "port").as_u64() == Some(8080))
    }));

    assert!(
        render(&["--set", "networkPolicy.enabled=false"])
            .iter()
            .all(|d| text(d, "kind") != "NetworkPolicy")
    );
    assert!(
        render(&["--set", "workload=None"])
            .iter()
            .all(|d| text(d, "kind") != "NetworkPolicy")
    );
}

#[test]
fn the_data_dir_has_a_size_limit() {
    for mode in ["host", "sidecar", "container"] {
        let docs = render(&["--set", &format!("mode={mode}")]);
        let pod = pod_spec(&docs);
        let a = agent(pod);
        let vol = volume_at(pod, a, env_value(a, "DATA_DIR"));
        assert_eq!(text(vol, "emptyDir.sizeLimit"), "1Gi", "{mode}");
    }
}

#[test]
fn a_bad_auth_mode_is_refused() {
    let out = helm(["template", RELEASE, CHART, "--set", "auth.mode=open"]);
    assert!(!out.status.success(), "auth.mode=open rendered");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("auth.mode must be none, token or kubernetes")
    );
}
