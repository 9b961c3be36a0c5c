//! Sidecar mode: the main container's init process, found through the own Pod's status
//! (`containerStatuses[].containerID`) and then a PID resolver, and a watch on the Pod that
//! reports when the main container is replaced.

use std::sync::Arc;

use ::kube::{Api, Client};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::OnceCell;

use super::KubeError;
use super::listwatch::{self, Event, Selector};
use super::pod::{ContainerId, MainContainer, fetch_main_container, main_container};
use crate::runtime::procfs::{self, ProcIdentity};
use crate::runtime::sidecar::MainContainerLocator;

/// Finds a container's process from its ID. The locator tries resolvers in order: the
/// `/proc/*/cgroup` scan below, and (where a CRI socket is mounted) the runtime's own answer.
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
        Box::pin(async move {
            tokio::task::spawn_blocking(move || scan_cgroups(&id))
                .await
                .map_err(|e| e.to_string())?
        })
    }
}

fn scan_cgroups(id: &str) -> Result<ProcIdentity, String> {
    let me = std::process::id() as i32;
    let mut best: Option<ProcIdentity> = None;
    for pid in procfs::pids() {
        if pid == me {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
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
    let Some(path) = line.splitn(3, ':').nth(2) else {
        return false;
    };
    path.split('/').any(|seg| {
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
    client: OnceCell<Client>,
    resolvers: Vec<Arc<dyn ContainerPidResolver>>,
}

impl KubeLocator {
    /// The client is made on first use, so a missing kubeconfig shows up as "not ready".
    pub fn new(
        namespace: String,
        pod: String,
        container: String,
        resolvers: Vec<Arc<dyn ContainerPidResolver>>,
    ) -> Self {
        KubeLocator {
            namespace,
            pod,
            container,
            client: OnceCell::new(),
            resolvers,
        }
    }

    async fn api(&self) -> Result<Api<Pod>, KubeError> {
        let client = self.client.get_or_try_init(super::client).await?;
        Ok(Api::namespaced(client.clone(), &self.namespace))
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

/// Watches the own Pod and calls `on_replaced` each time the main container is replaced
/// (new container ID or a higher restart count). Runs until the process ends.
pub fn spawn_pod_watch<F>(namespace: String, pod: String, container: String, on_replaced: F)
where
    F: Fn(&MainContainer) + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let client = loop {
            match super::client().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "no kubernetes client for the pod watch; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
            }
        };
        let api: Api<Pod> = Api::namespaced(client, &namespace);
        let selector = Selector {
            fields: Some(format!("metadata.name={pod}")),
            labels: None,
        };
        let mut events = listwatch::spawn(api, selector, "pod");
        let mut last: Option<MainContainer> = None;
        while let Some(ev) = events.recv().await {
            let pod_obj = match ev {
                Event::Listed(items) => items.into_iter().next(),
                Event::Applied(p) => Some(p),
                Event::Deleted(_) => None,
            };
            let Some(pod_obj) = pod_obj else { continue };
            let Ok(now) = main_container(&pod_obj, &container) else {
                continue;
            };
            if let Some(before) = &last
                && now.replaced(before)
            {
                tracing::info!(
                    container = %container,
                    from = %before.id.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                    to = %now.id.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                    restart_count = now.restart_count,
                    "main container replaced"
                );
                on_replaced(&now);
            }
            // An ID that vanished (status briefly without it) keeps the last known one.
            if now.id.is_some() || last.is_none() {
                last = Some(now);
            }
        }
    });
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
    fn scan_finds_nothing_for_an_unknown_id() {
        let e = scan_cgroups("0000000000000000000000000000deadbeef").unwrap_err();
        assert!(e.contains("no visible process"), "{e}");
    }
}
