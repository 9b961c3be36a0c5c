//! A private containerd (with its CRI plugin) for tests, shared by every test process.
//!
//! nextest runs each test in its own process, so one instance is shared through files
//! under `/tmp/task-executor-containerd`:
//! - `lock`: held exclusively while an instance is checked, started or torn down;
//! - `users`: every test process holds a shared flock on it for its whole life (the kernel
//!   drops it when the process dies, even on SIGKILL);
//! - `run/`: the instance (config, root, state, socket, logs, the image tarball).
//!
//! The first process starts a small guardian shell script in its own process group; the
//! guardian starts containerd and, once nobody has held `users` for ~10 s, takes `lock`,
//! kills what runs in the instance, stops containerd, unmounts and deletes `run/`. So a
//! test run leaves nothing behind, and consecutive test processes reuse one warm instance
//! instead of paying ~1 s start plus an image import each.
//!
//! Images are built here from the host's busybox-static: `localhost/busybox:test` (a
//! shell image) and `localhost/pause:test` (the sandbox image), imported with `ctr`; a
//! test imports images of its own with `import` (layers built with `Layer`).

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

pub const BASE: &str = "/tmp/task-executor-containerd";
pub const BUSYBOX: &str = "localhost/busybox:test";
pub const PAUSE: &str = "localhost/pause:test";
const BUSYBOX_BIN: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "cat", "true", "false", "env", "ls", "pwd", "touch", "mkdir", "printf",
    "test", "kill", "ps", "id", "head", "tail", "wc", "sync", "rm", "date", "hostname", "grep",
    "seq", "cp", "chmod",
];

pub struct Containerd {
    pub socket: PathBuf,
    pub dir: PathBuf,
}

static SHARED: OnceLock<Containerd> = OnceLock::new();
static USER_LOCK: OnceLock<Flock<File>> = OnceLock::new();

/// The shared instance, started if needed. Panics (the test fails) when containerd can't
/// be run: these tests never skip.
pub fn shared() -> &'static Containerd {
    SHARED.get_or_init(|| {
        start_or_join().unwrap_or_else(|e| {
            panic!(
                "cannot run the test containerd under {BASE}: {e}\n\
                 (needs root, /usr/bin/containerd, ctr, runc and busybox-static; \
                 see the logs in {BASE}/run)"
            )
        })
    })
}

fn start_or_join() -> Result<Containerd, String> {
    let base = PathBuf::from(BASE);
    fs::create_dir_all(&base).map_err(|e| format!("mkdir {BASE}: {e}"))?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(base.join("lock"))
        .map_err(|e| format!("lock file: {e}"))?;
    let setup = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| e.to_string())?;
    let run = base.join("run");
    let socket = run.join("containerd.sock");
    if !healthy(&run, &socket) {
        teardown_stale(&run);
        setup_instance(&base, &run, &socket)?;
    }
    let users = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(base.join("users"))
        .map_err(|e| format!("users file: {e}"))?;
    let users = Flock::lock(users, FlockArg::LockShared).map_err(|(_, e)| e.to_string())?;
    let _ = USER_LOCK.set(users);
    drop(setup);
    Ok(Containerd { socket, dir: run })
}

fn pid_alive(path: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(path).ok()?.trim().parse().ok()?;
    kill(Pid::from_raw(pid), None).ok().map(|_| pid)
}

fn ctr(socket: &Path) -> Command {
    let mut c = Command::new("ctr");
    c.arg("-a").arg(socket).arg("-n").arg("k8s.io");
    c
}

fn ctr_ok(socket: &Path, args: &[&str]) -> bool {
    ctr(socket)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn healthy(run: &Path, socket: &Path) -> bool {
    run.join("ready").exists()
        && pid_alive(&run.join("guardian.pid")).is_some()
        && ctr_ok(socket, &["version"])
}

/// Removes what a crashed earlier instance left (nothing when run/ does not exist).
fn teardown_stale(run: &Path) {
    if !run.exists() {
        return;
    }
    for f in ["guardian.pid", "containerd.pid"] {
        if let Some(pid) = pid_alive(&run.join(f)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let prefix = format!("{}/", run.display());
    let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by(|a, b| b.cmp(a));
    for m in mounts {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    let _ = fs::remove_dir_all(run);
}

const GUARDIAN: &str = r#"#!/bin/sh
# Runs the shared test containerd; stops it once no test process has used it for a while.
BASE="$1"; RUN="$BASE/run"; SOCK="$RUN/containerd.sock"
containerd --config "$RUN/config.toml" >"$RUN/containerd.log" 2>&1 &
CPID=$!
echo "$CPID" > "$RUN/containerd.pid"
cleanup() {
  for t in $(ctr -a "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr -a "$SOCK" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1
  done
  sleep 1
  for t in $(ctr -a "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr -a "$SOCK" -n k8s.io tasks rm -f "$t" >/dev/null 2>&1
  done
  kill "$CPID" 2>/dev/null
  for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$CPID" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$CPID" 2>/dev/null
  wait "$CPID" 2>/dev/null
  awk -v r="$RUN/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m"; done
  rm -rf "$RUN"
}
idle=0
while kill -0 "$CPID" 2>/dev/null; do
  sleep 2
  if flock -n -x "$BASE/users" true; then idle=$((idle+1)); else idle=0; fi
  if [ "$idle" -ge 5 ]; then
    exec 9>"$BASE/lock"
    flock -x 9
    if flock -n -x "$BASE/users" true; then cleanup; exit 0; fi
    exec 9>&-
    idle=0
  fi
done
"#;

fn setup_instance(base: &Path, run: &Path, socket: &Path) -> Result<(), String> {
    for d in ["root", "state"] {
        fs::create_dir_all(run.join(d)).map_err(|e| format!("mkdir: {e}"))?;
    }
    let default = Command::new("containerd")
        .args(["config", "default"])
        .output()
        .map_err(|e| format!("containerd config default: {e}"))?;
    let mut config = String::from_utf8_lossy(&default.stdout).into_owned();
    for (from, to) in [
        (
            "root = \"/var/lib/containerd\"".to_string(),
            format!("root = \"{}/root\"", run.display()),
        ),
        (
            "state = \"/run/containerd\"".to_string(),
            format!("state = \"{}/state\"", run.display()),
        ),
        (
            "address = \"/run/containerd/containerd.sock\"".to_string(),
            format!("address = \"{}\"", socket.display()),
        ),
        (
            "sandbox_image = \"registry.k8s.io/pause:3.6\"".to_string(),
            format!("sandbox_image = \"{PAUSE}\""),
        ),
        (
            "restrict_oom_score_adj = false".to_string(),
            "restrict_oom_score_adj = true".to_string(),
        ),
    ] {
        if !config.contains(&from) {
            return Err(format!(
                "`containerd config default` has no line {from:?}; unknown containerd version?"
            ));
        }
        config = config.replacen(&from, &to, 1);
    }
    fs::write(run.join("config.toml"), config).map_err(|e| e.to_string())?;
    fs::write(run.join("guardian.sh"), GUARDIAN).map_err(|e| e.to_string())?;
    let log = File::create(run.join("guardian.log")).map_err(|e| e.to_string())?;
    let guardian = Command::new("sh")
        .arg(run.join("guardian.sh"))
        .arg(base)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the guardian: {e}"))?;
    fs::write(run.join("guardian.pid"), guardian.id().to_string()).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctr_ok(socket, &["version"]) {
        if Instant::now() > deadline {
            let log = fs::read_to_string(run.join("containerd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            return Err(format!(
                "containerd did not answer on {} within 30s; log tail:\n{}",
                socket.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let busybox = busybox_layer()?;
    let images = [
        Image {
            name: BUSYBOX.into(),
            config: serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh"]}),
            layers: vec![busybox.clone()],
        },
        Image {
            name: PAUSE.into(),
            config: serde_json::json!({"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sleep", "2147483647"]}),
            layers: vec![busybox],
        },
    ];
    let tarball = run.join("images.tar");
    fs::write(&tarball, oci_archive(&images)?).map_err(|e| e.to_string())?;
    let out = ctr(socket)
        .args(["images", "import"])
        .arg(&tarball)
        .output()
        .map_err(|e| format!("ctr images import: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ctr images import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    fs::write(run.join("ready"), b"").map_err(|e| e.to_string())?;
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A file-system layer of a test image: an uncompressed tar built in memory.
pub struct Layer(tar::Builder<Vec<u8>>);

impl Default for Layer {
    fn default() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
}

impl Layer {
    fn header(kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size as u64);
        h.set_mtime(0);
        h
    }

    /// `path` ends with `/`.
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        // Appending to a Vec fails only for a path tar can't hold: a bug in the test.
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len());
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// The busybox layer of `BUSYBOX` and `PAUSE`: the host's busybox-static with a few
/// applets, a root user, the usual top-level directories.
pub fn busybox_layer() -> Result<Vec<u8>, String> {
    let busybox =
        fs::read(BUSYBOX_BIN).map_err(|e| format!("{BUSYBOX_BIN} (busybox-static): {e}"))?;
    let mut layer = Layer::default();
    for (d, mode) in [
        ("bin/", 0o755),
        ("etc/", 0o755),
        ("tmp/", 0o1777),
        ("proc/", 0o555),
        ("sys/", 0o555),
        ("dev/", 0o755),
        ("root/", 0o700),
    ] {
        layer = layer.dir(d, mode);
    }
    layer = layer.file("bin/busybox", 0o755, &busybox);
    for applet in APPLETS {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    Ok(layer
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .finish())
}

/// A test image: its name, the `config` part of its OCI config (Env, Cmd, User...), and
/// its layers (uncompressed tars, bottom first).
pub struct Image {
    pub name: String,
    pub config: serde_json::Value,
    pub layers: Vec<Vec<u8>>,
}

/// Imports `images` into the shared instance (the `k8s.io` namespace CRI reads), replacing
/// images of the same names. Panics when the import fails: these tests never skip.
pub fn import(images: &[Image]) {
    let cd = shared();
    let archive = oci_archive(images).expect("building the OCI archive");
    // The instance lock: no teardown and no other import while this one ingests.
    let lock = File::options()
        .write(true)
        .open(Path::new(BASE).join("lock"))
        .expect("containerd lock file");
    let _held = Flock::lock(lock, FlockArg::LockExclusive).expect("containerd lock");
    let tarball = tempfile::NamedTempFile::new_in(&cd.dir).expect("temp file for the archive");
    fs::write(tarball.path(), archive).expect("writing the OCI archive");
    let out = ctr(&cd.socket)
        .args(["images", "import"])
        .arg(tarball.path())
        .output()
        .expect("running ctr images import");
    assert!(
        out.status.success(),
        "ctr images import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OCI image layout (as a tar) holding `images`; layers they share are stored once.
fn oci_archive(images: &[Image]) -> Result<Vec<u8>, String> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut manifests = Vec::new();
    for image in images {
        let mut diff_ids = Vec::new();
        let mut layer_descs = Vec::new();
        for layer in &image.layers {
            diff_ids.push(format!("sha256:{}", sha256_hex(layer)));
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(layer).map_err(|e| e.to_string())?;
            let layer_gz = gz.finish().map_err(|e| e.to_string())?;
            let digest = sha256_hex(&layer_gz);
            layer_descs.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": format!("sha256:{digest}"),
                "size": layer_gz.len(),
            }));
            blobs.push((digest, layer_gz));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": image.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .map_err(|e| e.to_string())?;
        let config_digest = sha256_hex(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_digest}"),
                "size": config.len(),
            },
            "layers": layer_descs,
        }))
        .map_err(|e| e.to_string())?;
        let manifest_digest = sha256_hex(&manifest);
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": image.name,
                "org.opencontainers.image.ref.name": "test",
            },
        }));
        blobs.push((config_digest, config));
        blobs.push((manifest_digest, manifest));
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": manifests,
    }))
    .map_err(|e| e.to_string())?;

    let mut archive = Layer::default()
        .file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .file("index.json", 0o644, &index);
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    blobs.dedup_by(|a, b| a.0 == b.0);
    for (digest, data) in &blobs {
        archive = archive.file(&format!("blobs/sha256/{digest}"), 0o644, data);
    }
    Ok(archive.finish())
}

/// Deletes every task, stops the agent, and checks CRI holds nothing labelled `agent_id`.
pub fn stop_and_expect_nothing_left(
    agent: &mut crate::support::agent::Agent,
    socket: &Path,
    agent_id: &str,
) {
    agent.delete_all_and_stop();
    let (containers, sandboxes) = leftovers(socket, agent_id);
    assert!(containers.is_empty(), "containers left: {containers:?}");
    assert!(sandboxes.is_empty(), "sandboxes left: {sandboxes:?}");
}

/// The containers and sandboxes carrying the agent label `agent_id`, read through CRI.
pub fn leftovers(
    socket: &Path,
    agent_id: &str,
) -> (Vec<k8s_cri::v1::Container>, Vec<k8s_cri::v1::PodSandbox>) {
    use task_executor::runtime::container::cri::{Cri, GrpcCri};
    use task_executor::runtime::container::labels;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cri = GrpcCri::new(socket).unwrap();
        let sel =
            std::collections::HashMap::from([(labels::AGENT.to_string(), agent_id.to_string())]);
        let containers = cri
            .list_containers(k8s_cri::v1::ContainerFilter {
                label_selector: sel.clone(),
                ..Default::default()
            })
            .await
            .expect("ListContainers");
        let sandboxes = cri
            .list_pod_sandbox(k8s_cri::v1::PodSandboxFilter {
                label_selector: sel,
                ..Default::default()
            })
            .await
            .expect("ListPodSandbox");
        (containers, sandboxes)
    })
}

/// A pod as kubelet would make it, through raw CRI calls: a host-network sandbox carrying
/// kubelet's pod labels (so an agent with that POD_NAME/POD_NAMESPACE joins it) and, if
/// asked, a running "main" container. Drop stops and removes the sandbox, which removes
/// its containers, also when the test failed.
pub struct KubeletPod {
    pub name: String,
    pub namespace: String,
    pub sandbox_id: String,
    /// The main container's CRI id, when one was started.
    pub main_id: Option<String>,
    pub cri: task_executor::runtime::container::cri::GrpcCri,
    sandbox_config: k8s_cri::v1::PodSandboxConfig,
    rt: tokio::runtime::Runtime,
    _logs: tempfile::TempDir,
}

impl KubeletPod {
    /// `main`: the command of a `main` container (image `BUSYBOX`), or none.
    pub fn start(name: &str, namespace: &str, main: Option<&[&str]>) -> KubeletPod {
        Self::start_with(name, namespace, main, k8s_cri::v1::NamespaceMode::Container)
    }

    /// As `start`, with the sandbox's PID namespace mode: `Pod` is what
    /// `shareProcessNamespace: true` gives (containers that ask for `Pod` share the pause
    /// container's namespace), `Container` a namespace per container.
    pub fn start_with(
        name: &str,
        namespace: &str,
        main: Option<&[&str]>,
        pid: k8s_cri::v1::NamespaceMode,
    ) -> KubeletPod {
        use k8s_cri::v1::{
            ContainerConfig, ContainerMetadata, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
            NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
        };
        use std::collections::HashMap;
        use task_executor::runtime::container::cri::{Cri, GrpcCri, image_spec};

        let cd = shared();
        let logs = tempfile::Builder::new()
            .prefix("te-kubelet-")
            .tempdir()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cri = {
            let _in_rt = rt.enter(); // tonic's lazy channel spawns onto the current runtime
            GrpcCri::new(&cd.socket).unwrap()
        };
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: namespace.into(),
                attempt: 0,
            }),
            log_directory: logs.path().display().to_string(),
            labels: HashMap::from([
                ("io.kubernetes.pod.name".into(), name.into()),
                ("io.kubernetes.pod.namespace".into(), namespace.into()),
            ]),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        pid: pid as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sandbox_id = rt
            .block_on(cri.run_pod_sandbox(config.clone()))
            .expect("RunPodSandbox");
        let mut pod = KubeletPod {
            name: name.into(),
            namespace: namespace.into(),
            sandbox_id,
            main_id: None,
            cri,
            sandbox_config: config.clone(),
            rt,
            _logs: logs,
        };
        if let Some(command) = main {
            let container = ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "main".into(),
                    attempt: 0,
                }),
                image: Some(image_spec(BUSYBOX)),
                command: command.iter().map(|s| s.to_string()).collect(),
                labels: HashMap::from([("io.kubernetes.container.name".into(), "main".into())]),
                log_path: "main.log".into(),
                ..Default::default()
            };
            let id = pod
                .rt
                .block_on(pod.cri.create_container(&pod.sandbox_id, container, config))
                .expect("CreateContainer main");
            pod.main_id = Some(id.clone());
            pod.rt
                .block_on(pod.cri.start_container(&id))
                .expect("StartContainer main");
        }
        pod
    }

    /// The main container's host PID, from CRI's verbose status.
    pub fn main_pid(&self) -> i32 {
        use task_executor::runtime::container::cri::Cri;
        let id = self.main_id.as_deref().expect("no main container");
        self.rt
            .block_on(self.cri.container_pid(id))
            .expect("main container pid")
    }
}

impl KubeletPod {
    /// Creates and starts a container in the pod's sandbox, as kubelet does; returns its id.
    pub fn run_container(&self, config: k8s_cri::v1::ContainerConfig) -> String {
        use task_executor::runtime::container::cri::Cri;
        let name = config.metadata.as_ref().map(|m| m.name.clone());
        let id = self
            .rt
            .block_on(self.cri.create_container(
                &self.sandbox_id,
                config,
                self.sandbox_config.clone(),
            ))
            .unwrap_or_else(|e| panic!("CreateContainer {name:?}: {e}"));
        self.rt
            .block_on(self.cri.start_container(&id))
            .unwrap_or_else(|e| panic!("StartContainer {name:?}: {e}"));
        id
    }

    /// StopContainer as kubelet sends it: SIGTERM, then SIGKILL after `timeout`.
    pub fn stop_container(&self, id: &str, timeout: Duration) {
        use task_executor::runtime::container::cri::Cri;
        self.rt
            .block_on(self.cri.stop_container(id, timeout))
            .unwrap_or_else(|e| panic!("StopContainer {id}: {e}"));
    }

    pub fn container_status(&self, id: &str) -> k8s_cri::v1::ContainerStatus {
        use task_executor::runtime::container::cri::Cri;
        self.rt
            .block_on(self.cri.container_status(id, false))
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
            .status
            .unwrap_or_else(|| panic!("ContainerStatus {id}: no status"))
    }

    /// A running container's host PID, from CRI's verbose status.
    pub fn container_pid(&self, id: &str) -> i32 {
        use task_executor::runtime::container::cri::Cri;
        self.rt
            .block_on(self.cri.container_pid(id))
            .unwrap_or_else(|e| panic!("pid of container {id}: {e}"))
    }

    /// Where the containers' CRI logs go (the sandbox's `log_directory`).
    pub fn log_dir(&self) -> &Path {
        self._logs.path()
    }

    /// The containers in the pod's sandbox right now.
    pub fn containers(&self) -> Vec<k8s_cri::v1::Container> {
        use task_executor::runtime::container::cri::Cri;
        let filter = k8s_cri::v1::ContainerFilter {
            pod_sandbox_id: self.sandbox_id.clone(),
            ..Default::default()
        };
        self.rt
            .block_on(self.cri.list_containers(filter))
            .expect("ListContainers")
    }
}

impl Drop for KubeletPod {
    fn drop(&mut self) {
        use task_executor::runtime::container::cri::Cri;
        let id = self.sandbox_id.clone();
        let stop = self.rt.block_on(self.cri.stop_pod_sandbox(&id));
        let remove = self.rt.block_on(self.cri.remove_pod_sandbox(&id));
        if let Some(e) = stop.err().or(remove.err()) {
            eprintln!("cleaning up pod sandbox {id}: {e}");
        }
    }
}

/// Read-only bind mounts that let a container of `BUSYBOX` run this machine's dynamically
/// linked `binary` (the tests' debug build of the agent) as `at`: the binary, and the
/// loader and libraries under /lib and /lib64 (on Debian symlinks into /usr, whose targets
/// are what gets mounted).
pub fn host_binary_mounts(binary: &Path, at: &str) -> Vec<k8s_cri::v1::Mount> {
    let ro = |host: &Path, container: &str| k8s_cri::v1::Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly: true,
        ..Default::default()
    };
    let mut mounts = vec![ro(binary, at)];
    for dir in ["/lib", "/lib64"] {
        if let Ok(real) = fs::canonicalize(dir) {
            mounts.push(ro(&real, dir));
        }
    }
    mounts
}
