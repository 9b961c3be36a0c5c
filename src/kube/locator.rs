//! Sidecar mode: the main container's init process, found through the own Pod's status
//! (`containerStatuses[].containerID`) and then a PID resolver (the Pod watch that reports
//! a replaced main container is in `restart_watch`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::kube::Api;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;

use super::KubeClient;
use super::KubeError;
use super::pod::{ContainerId, fetch_main_container};
use crate::runtime::container::cri::{Cri, GrpcCri};
use crate::runtime::sidecar::MainContainerLocator;
use crate::sys::procfs::{self, ProcIdentity};

/// Finds a container's process from its ID. The locator tries resolvers in order: the
/// runtime's own answer through CRI (where a CRI socket is mounted), then the
/// `/proc/*/cgroup` scan (see [`default_resolvers`]).
pub trait ContainerPidResolver: Send + Sync + 'static {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// The container's init process as this agent sees it.
    fn container_pid(&self, id: &ContainerId) -> BoxFuture<'_, Result<ProcIdentity, String>>;
}

/// Finds the oldest process whose cgroup path names the container ID. Works when the
/// agent sees the container's processes: `shareProcessNamespace: true` or `hostPID`.
pub struct CgroupScanResolver;

impl ContainerPidResolver for CgroupScanResolver {
    fn name(&self) -> &'static str {
        "cgroup-scan"
    }

    fn container_pid(&self, id: &ContainerId) -> BoxFuture<'_, Result<ProcIdentity, String>> {
        let id = id.id.clone();
        Box::pin(async move { crate::sys::offload::offload(move || scan_cgroups(&id)).await })
    }
}

/// The resolvers a `KubeLocator` tries, in order: CRI first when `cri_socket` exists (one
/// RPC, and right even where cgroup paths hide container IDs), then the cgroup scan.
pub fn default_resolvers(cri_socket: &Path) -> Vec<Arc<dyn ContainerPidResolver>> {
    let mut out: Vec<Arc<dyn ContainerPidResolver>> = Vec::new();
    if cri_socket.exists() {
        out.push(Arc::new(CriPidResolver::new(cri_socket.to_path_buf())));
    }
    out.push(Arc::new(CgroupScanResolver));
    out
}

/// Asks the node's CRI runtime: `ContainerStatus` (verbose) reports the container's init
/// PID in `info.pid`. That PID is one of the runtime's PID namespace, so the answer is
/// only taken when the runtime (the peer on the socket) lives in the agent's own PID
/// namespace, i.e. the agent sees host PIDs (`hostPID`, or no container at all).
/// An unreachable or slow socket only means this resolver can't answer.
pub struct CriPidResolver {
    socket: PathBuf,
    timeout: Duration,
    /// Made on first use (tonic's lazy channel needs a runtime), then reused.
    cri: OnceLock<GrpcCri>,
}

/// How long one CRI lookup may take: the whole lookup (Pod GET included) has 5 s, and
/// the cgroup scan must still get its turn.
pub const CRI_PID_TIMEOUT: Duration = Duration::from_secs(2);

impl CriPidResolver {
    pub fn new(socket: PathBuf) -> Self {
        Self::with_timeout(socket, CRI_PID_TIMEOUT)
    }

    pub fn with_timeout(socket: PathBuf, timeout: Duration) -> Self {
        CriPidResolver {
            socket,
            timeout,
            cri: OnceLock::new(),
        }
    }

    fn client(&self) -> Result<&GrpcCri, String> {
        if let Some(c) = self.cri.get() {
            return Ok(c);
        }
        let c = GrpcCri::new(&self.socket).map_err(|e| e.to_string())?;
        Ok(self.cri.get_or_init(|| c))
    }

    async fn find(&self, id: &str) -> Result<ProcIdentity, String> {
        let socket = self.socket.clone();
        crate::sys::offload::offload(move || runtime_shares_pid_namespace(&socket)).await?;
        let cri = self.client()?;
        let pid = tokio::time::timeout(self.timeout, cri.container_pid(id))
            .await
            .map_err(|_| {
                format!(
                    "no answer from {} within {:?}",
                    self.socket.display(),
                    self.timeout
                )
            })?
            .map_err(|e| e.to_string())?;
        ProcIdentity::of(pid).ok_or_else(|| {
            format!("the runtime reports pid {pid} for container {id}, which is not running here")
        })
    }
}

impl ContainerPidResolver for CriPidResolver {
    fn name(&self) -> &'static str {
        "cri"
    }

    fn container_pid(&self, id: &ContainerId) -> BoxFuture<'_, Result<ProcIdentity, String>> {
        let id = id.id.clone();
        Box::pin(async move { self.find(&id).await })
    }
}

/// `Ok` when the process listening on the unix socket `socket` is in this process's PID
/// namespace, so PIDs it reports are PIDs here. The kernel gives the listener's PID as
/// seen from the caller's namespace (`SO_PEERCRED`), 0 when it is not visible at all.
pub fn runtime_shares_pid_namespace(socket: &Path) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("CRI socket {}: {e}", socket.display()))?;
    let peer = getsockopt(&stream, PeerCredentials)
        .map_err(|e| format!("CRI socket {}: SO_PEERCRED: {e}", socket.display()))?
        .pid();
    let hidden = || {
        format!(
            "the runtime behind {} is not in this agent's PID namespace; its PIDs mean nothing here",
            socket.display()
        )
    };
    if peer <= 0 {
        return Err(hidden());
    }
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    match (ns("self"), ns(&peer.to_string())) {
        (Some(a), Some(b)) if a == b => Ok(()),
        _ => Err(hidden()),
    }
}

fn scan_cgroups(id: &str) -> Result<ProcIdentity, String> {
    let me = std::process::id() as i32;
    let mut best: Option<ProcIdentity> = None;
    for pid in procfs::pids() {
        if pid == me {
            continue;
        }
        let Ok(text) = procfs::cgroups_text(Some(pid)) else {
            continue;
        };
        if !text.lines().any(|l| cgroup_line_names(l, id)) {
            continue;
        }
        if let Some(p) = ProcIdentity::of(pid)
            && best.is_none_or(|b| p.start_time < b.start_time)
        {
            best = Some(p);
        }
    }
    best.ok_or_else(|| format!("no visible process is in a cgroup of container {id}"))
}

/// True when a `/proc/PID/cgroup` line (`hierarchy:controllers:path`) puts the process in
/// the container `id`'s cgroup or below it. Recognises the cgroupfs layout
/// (`/kubepods/.../<id>`) and systemd scopes (`cri-containerd-<id>.scope`,
/// `docker-<id>.scope`, `crio-<id>.scope`): a path segment is the ID, or ends in `-<id>`
/// before an optional `.scope`.
pub fn cgroup_line_names(line: &str, id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    let Some(entry) = procfs::cgroup_entries(line).next() else {
        return false;
    };
    entry.path.split('/').any(|seg| {
        let seg = seg.strip_suffix(".scope").unwrap_or(seg);
        seg == id
            || seg
                .strip_suffix(id)
                .is_some_and(|prefix| prefix.ends_with('-') || prefix.ends_with(':'))
    })
}

/// The main container through the Pod: `GET pods/<pod>`, its container ID, then the first
/// resolver that finds the process.
pub struct KubeLocator {
    namespace: String,
    pod: String,
    container: String,
    client: KubeClient,
    resolvers: Vec<Arc<dyn ContainerPidResolver>>,
}

impl KubeLocator {
    /// The shared client is made on first use, so a missing kubeconfig shows up as "not ready".
    pub fn new(
        client: KubeClient,
        namespace: String,
        pod: String,
        container: String,
        resolvers: Vec<Arc<dyn ContainerPidResolver>>,
    ) -> Self {
        KubeLocator {
            namespace,
            pod,
            container,
            client,
            resolvers,
        }
    }

    async fn api(&self) -> Result<Api<Pod>, KubeError> {
        Ok(Api::namespaced(self.client.get().await?, &self.namespace))
    }

    async fn find(&self) -> Result<ProcIdentity, String> {
        let api = self.api().await.map_err(|e| e.to_string())?;
        let main = fetch_main_container(&api, &self.pod, &self.container)
            .await
            .map_err(|e| format!("pod {}/{}: {e}", self.namespace, self.pod))?;
        let id = main.id.ok_or_else(|| {
            KubeError::NoContainerId {
                container: self.container.clone(),
            }
            .to_string()
        })?;
        let mut why = Vec::new();
        for r in &self.resolvers {
            match r.container_pid(&id).await {
                Ok(p) => {
                    tracing::debug!(container = %id, pid = p.pid, resolver = r.name(), "main container located");
                    return Ok(p);
                }
                Err(e) => why.push(format!("{}: {e}", r.name())),
            }
        }
        Err(KubeError::NoProcess {
            id: id.to_string(),
            detail: why.join("; "),
        }
        .to_string())
    }
}

/// Longest a lookup may take: readiness probes call it, and the client's own read timeout
/// is minutes.
const LOCATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl MainContainerLocator for KubeLocator {
    fn locate(&self) -> BoxFuture<'_, Result<ProcIdentity, String>> {
        Box::pin(async move {
            tokio::time::timeout(LOCATE_TIMEOUT, self.find())
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "pod {}/{}: no answer from the API server within {LOCATE_TIMEOUT:?}",
                        self.namespace, self.pod
                    ))
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3c2b1a09e8d7c6b5a4f3c2b1a09e8d7c6b5a4f3c2b1a09e8d7c6b5a4f3c2b1";

    #[test]
    fn cgroup_lines_of_common_layouts() {
        for line in [
            format!("4:pids:/kubepods/burstable/pod1234-5678/{ID}"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-{ID}.scope"
            ),
            format!("0::/system.slice/docker-{ID}.scope"),
            format!("0::/kubepods.slice/crio-{ID}.scope/container"),
            format!("0::/../cri-containerd:{ID}"),
            format!("8:pids:/task-executor-test-{ID}"),
            format!("1:name=systemd:/kubepods/pod1/{ID}/nested"),
        ] {
            assert!(cgroup_line_names(&line, ID), "{line}");
        }
        let other = ID.replace('4', "5");
        for line in [
            format!("4:pids:/kubepods/burstable/pod1/{other}"),
            format!("4:pids:/kubepods/burstable/pod1/x{ID}"),
            format!("4:pids:/kubepods/burstable/pod1/{ID}x"),
            "0::/".to_string(),
            "garbage".to_string(),
        ] {
            assert!(!cgroup_line_names(&line, ID), "{line}");
        }
        assert!(!cgroup_line_names("0::/a/", ""));
    }

    #[test]
    fn cri_goes_first_when_its_socket_exists() {
        let dir = tempfile::tempdir().unwrap();
        let names = |p: &Path| -> Vec<&'static str> {
            default_resolvers(p).iter().map(|r| r.name()).collect()
        };
        assert_eq!(names(&dir.path().join("absent.sock")), ["cgroup-scan"]);
        let sock = dir.path().join("cri.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(names(&sock), ["cri", "cgroup-scan"]);
    }

    #[test]
    fn a_listener_in_our_own_process_shares_our_pid_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("cri.sock");
        let e = runtime_shares_pid_namespace(&sock).unwrap_err();
        assert!(e.contains("cri.sock"), "{e}");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        runtime_shares_pid_namespace(&sock).unwrap();
    }

    fn id(s: &str) -> ContainerId {
        ContainerId::parse(&format!("containerd://{s}")).unwrap()
    }

    #[tokio::test]
    async fn cri_resolver_without_a_runtime_cannot_answer() {
        let dir = tempfile::tempdir().unwrap();
        let r = CriPidResolver::new(dir.path().join("absent.sock"));
        let e = r.container_pid(&id(ID)).await.unwrap_err();
        assert!(e.contains("absent.sock"), "{e}");
    }

    #[tokio::test]
    async fn cri_resolver_gives_up_on_a_silent_socket() {
        // Accepts connections (the kernel does, up to the backlog) but never speaks gRPC.
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("silent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let r = CriPidResolver::with_timeout(sock, Duration::from_millis(300));
        let started = std::time::Instant::now();
        let e = r.container_pid(&id(ID)).await.unwrap_err();
        assert!(e.contains("no answer"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn scan_finds_nothing_for_an_unknown_id() {
        let e = scan_cgroups("0000000000000000000000000000deadbeef").unwrap_err();
        assert!(e.contains("no visible process"), "{e}");
    }
}
