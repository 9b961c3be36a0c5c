//! Where a `volumeMounts[].name` lives on the host: from `--volume NAME=HOSTPATH` outside a
//! cluster, or from the agent's own Pod (its hostPath and kubelet-managed volumes) inside.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use tokio::runtime::{Handle, RuntimeFlavor};

/// Kubelet's root for per-pod state on the node.
pub const KUBELET_PODS_DIR: &str = "/var/lib/kubelet/pods";

/// Maps a volume name to a host path the runtime can bind-mount.
pub trait VolumeResolver: Send + Sync + 'static {
    /// The host path of volume `name`, or `None` when no such volume is known.
    fn resolve(&self, name: &str) -> Option<PathBuf>;

    /// The known names, for error messages.
    fn names(&self) -> Vec<String>;
}

/// A fixed map, e.g. from `--volume NAME=HOSTPATH` or from [`volumes_from_pod`].
#[derive(Clone, Debug, Default)]
pub struct StaticVolumes {
    map: HashMap<String, PathBuf>,
}

impl StaticVolumes {
    pub fn new(map: HashMap<String, PathBuf>) -> Self {
        StaticVolumes { map }
    }
}

impl FromIterator<(String, PathBuf)> for StaticVolumes {
    fn from_iter<I: IntoIterator<Item = (String, PathBuf)>>(iter: I) -> Self {
        StaticVolumes {
            map: iter.into_iter().collect(),
        }
    }
}

impl VolumeResolver for StaticVolumes {
    fn resolve(&self, name: &str) -> Option<PathBuf> {
        self.map.get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.map.keys().cloned().collect();
        names.sort();
        names
    }
}

/// The agent's own Pod, as the API server has it now (implemented over the kube client in
/// `crate::kube::pod::OwnPod`).
pub trait PodSource: Send + Sync + 'static {
    fn fetch(&self) -> BoxFuture<'_, Result<Pod, String>>;
}

/// Longest a Pod read may hold up a request that names a volume not known yet.
pub const POD_VOLUMES_TIMEOUT: Duration = Duration::from_secs(3);

/// Container mode inside a cluster: `--volume` entries (they win) merged with the volumes
/// of the agent's own Pod ([`volumes_from_pod`]). The Pod is read on the first lookup
/// that `--volume` can't answer (it may not be readable at start-up), and read again
/// whenever a name is unknown, so a volume of a newer Pod revision is found. Each read
/// is bounded by a timeout; a Pod that can't be read leaves the name unknown.
///
/// `resolve` is synchronous (it runs in request validation), so a read blocks the calling
/// thread: on a multi-thread runtime through `block_in_place`, outside any runtime
/// directly. On a current-thread runtime it can't wait (the read would need that very
/// thread), and only what is already known answers.
pub struct PodVolumes {
    flags: HashMap<String, PathBuf>,
    source: Arc<dyn PodSource>,
    handle: Handle,
    timeout: Duration,
    /// The Pod's volumes from the last successful read, and how many reads finished.
    known: Mutex<(HashMap<String, PathBuf>, u64)>,
    /// Held by the one read in flight; lookups that wait for it reuse its answer.
    reading: Mutex<()>,
    /// The task policy (`baseline`, `restricted`): only the Pod volumes this container
    /// (the main one) mounts, never the agent's own (its token, data dir, CRI socket).
    mounted_by: Option<String>,
}

impl PodVolumes {
    /// Must be called inside the tokio runtime that will run the reads.
    pub fn new(
        flags: HashMap<String, PathBuf>,
        source: Arc<dyn PodSource>,
        timeout: Duration,
    ) -> Self {
        PodVolumes {
            flags,
            source,
            handle: Handle::current(),
            timeout,
            known: Mutex::new((HashMap::new(), 0)),
            reading: Mutex::new(()),
            mounted_by: None,
        }
    }

    /// Only the Pod volumes that `container` mounts are known (`--volume` entries stay).
    pub fn mounted_by(mut self, container: String) -> Self {
        self.mounted_by = Some(container);
        self
    }

    fn known(&self) -> std::sync::MutexGuard<'_, (HashMap<String, PathBuf>, u64)> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the Pod again, unless a read that finished while this one waited already did.
    fn refresh(&self) {
        let seen = self.known().1;
        let read = || {
            let _one = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            if self.known().1 != seen {
                return;
            }
            let (source, timeout) = (self.source.clone(), self.timeout);
            let only = self.mounted_by.clone();
            let job = self
                .handle
                .spawn(async move { tokio::time::timeout(timeout, source.fetch()).await });
            let outcome = match self.handle.block_on(job) {
                Ok(Ok(Ok(pod))) => Ok(match &only {
                    Some(c) => mounted_volumes(&pod, c),
                    None => volumes_from_pod(&pod),
                }),
                Ok(Ok(Err(e))) => Err(e),
                Ok(Err(_)) => Err(format!("no answer within {timeout:?}")),
                Err(e) => Err(e.to_string()),
            };
            let mut known = self.known();
            known.1 += 1;
            match outcome {
                Ok(volumes) => {
                    tracing::debug!(volumes = ?volumes.keys().collect::<Vec<_>>(), "read the pod's volumes");
                    known.0 = volumes;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the own pod for its volumes"),
            }
        };
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::CurrentThread) => {
                tracing::warn!("cannot wait for the pod's volumes on a current-thread runtime");
            }
            Ok(_) => tokio::task::block_in_place(read),
            Err(_) => read(),
        }
    }
}

impl VolumeResolver for PodVolumes {
    fn resolve(&self, name: &str) -> Option<PathBuf> {
        if let Some(p) = self.flags.get(name) {
            return Some(p.clone());
        }
        if let Some(p) = self.known().0.get(name) {
            return Some(p.clone());
        }
        self.refresh();
        self.known().0.get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .flags
            .keys()
            .chain(self.known().0.keys())
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// [`volumes_from_pod`], only those that `container` mounts: what the main container's
/// own code reaches anyway.
pub fn mounted_volumes(pod: &Pod, container: &str) -> HashMap<String, PathBuf> {
    let mounted: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .filter(|c| c.name == container)
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .map(|m| m.name.as_str())
        .collect();
    let mut all = volumes_from_pod(pod);
    all.retain(|name, _| mounted.contains(&name.as_str()));
    all
}

/// The host paths of a Pod's volumes: hostPath volumes at their path; emptyDir,
/// configMap, secret, projected and downwardAPI volumes where kubelet materialises them
/// (`/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~<plugin>/<name>`). Volumes of other
/// kinds (PVCs, CSI, ...) have no predictable node path and are left out.
pub fn volumes_from_pod(pod: &Pod) -> HashMap<String, PathBuf> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let Some(spec) = pod.spec.as_ref() else {
        return HashMap::new();
    };
    let kubelet = |plugin: &str, name: &str| {
        PathBuf::from(KUBELET_PODS_DIR)
            .join(uid)
            .join("volumes")
            .join(format!("kubernetes.io~{plugin}"))
            .join(name)
    };
    spec.volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            let path = if let Some(h) = &v.host_path {
                PathBuf::from(&h.path)
            } else if uid.is_empty() {
                return None;
            } else if v.empty_dir.is_some() {
                kubelet("empty-dir", &v.name)
            } else if v.config_map.is_some() {
                kubelet("configmap", &v.name)
            } else if v.secret.is_some() {
                kubelet("secret", &v.name)
            } else if v.projected.is_some() {
                kubelet("projected", &v.name)
            } else if v.downward_api.is_some() {
                kubelet("downward-api", &v.name)
            } else {
                return None;
            };
            Some((v.name.clone(), path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_policy_knows_only_what_the_main_container_mounts() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {
                "containers": [
                    {"name": "main", "volumeMounts": [{"name": "work", "mountPath": "/w"}]},
                    {"name": "task-executor", "volumeMounts": [
                        {"name": "data", "mountPath": "/var/lib/sandbox/tasks"},
                        {"name": "cri", "mountPath": "/run/containerd/containerd.sock"}]}
                ],
                "volumes": [
                    {"name": "work", "emptyDir": {}},
                    {"name": "data", "emptyDir": {}},
                    {"name": "cri", "hostPath": {"path": "/run/containerd/containerd.sock"}}
                ]
            }
        }));
        let m = mounted_volumes(&p, "main");
        assert_eq!(m.keys().collect::<Vec<_>>(), ["work"]);
        assert_eq!(volumes_from_pod(&p).len(), 3);
    }

    #[test]
    fn maps_host_path_and_kubelet_volumes() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p", "uid": "1234-abcd"},
            "spec": {
                "containers": [{"name": "main"}],
                "volumes": [
                    {"name": "data", "hostPath": {"path": "/srv/data"}},
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "cfg", "configMap": {"name": "my-cm"}},
                    {"name": "creds", "secret": {"secretName": "s"}},
                    {"name": "token", "projected": {"sources": []}},
                    {"name": "claim", "persistentVolumeClaim": {"claimName": "c"}}
                ]
            }
        }));
        let m = volumes_from_pod(&p);
        let base = "/var/lib/kubelet/pods/1234-abcd/volumes";
        assert_eq!(m["data"], PathBuf::from("/srv/data"));
        assert_eq!(
            m["scratch"],
            PathBuf::from(format!("{base}/kubernetes.io~empty-dir/scratch"))
        );
        assert_eq!(
            m["cfg"],
            PathBuf::from(format!("{base}/kubernetes.io~configmap/cfg"))
        );
        assert_eq!(
            m["creds"],
            PathBuf::from(format!("{base}/kubernetes.io~secret/creds"))
        );
        assert_eq!(
            m["token"],
            PathBuf::from(format!("{base}/kubernetes.io~projected/token"))
        );
        assert!(!m.contains_key("claim"), "PVCs have no predictable path");
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn pod_without_uid_keeps_only_host_paths() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "volumes": [
                {"name": "data", "hostPath": {"path": "/srv"}},
                {"name": "scratch", "emptyDir": {}}
            ]}
        }));
        let m = volumes_from_pod(&p);
        assert_eq!(m.len(), 1);
        assert!(volumes_from_pod(&Pod::default()).is_empty());
    }

    /// A Pod whose volumes a test changes, counting reads; `Err` fails them.
    struct FakePod {
        pod: Mutex<Result<Pod, String>>,
        reads: std::sync::atomic::AtomicUsize,
        delay: Duration,
    }

    impl FakePod {
        fn new(volumes: serde_json::Value, delay: Duration) -> Arc<Self> {
            Arc::new(FakePod {
                pod: Mutex::new(Ok(pod_with(volumes))),
                reads: Default::default(),
                delay,
            })
        }
        fn reads(&self) -> usize {
            self.reads.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn set(&self, p: Result<Pod, String>) {
            *self.pod.lock().unwrap() = p;
        }
    }

    impl PodSource for FakePod {
        fn fetch(&self) -> BoxFuture<'_, Result<Pod, String>> {
            Box::pin(async move {
                self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                self.pod.lock().unwrap().clone()
            })
        }
    }

    fn pod_with(volumes: serde_json::Value) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": "p", "uid": "u1"},
            "spec": {"containers": [], "volumes": volumes}
        }))
    }

    fn flags(pairs: &[(&str, &str)]) -> HashMap<String, PathBuf> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pod_volumes_are_read_lazily_merged_and_refreshed() {
        let src = FakePod::new(
            serde_json::json!([
                {"name": "data", "hostPath": {"path": "/srv/data"}},
                {"name": "both", "hostPath": {"path": "/from/pod"}},
                {"name": "scratch", "emptyDir": {}}
            ]),
            Duration::ZERO,
        );
        let r = PodVolumes::new(
            flags(&[("both", "/from/flag"), ("extra", "/x")]),
            src.clone(),
            POD_VOLUMES_TIMEOUT,
        );
        // Flags answer without reading the Pod, and win over it.
        assert_eq!(r.resolve("both"), Some(PathBuf::from("/from/flag")));
        assert_eq!(r.resolve("extra"), Some(PathBuf::from("/x")));
        assert_eq!(src.reads(), 0, "lazy");
        // Run on a worker too, as request handlers do.
        let r = Arc::new(r);
        let r2 = r.clone();
        let data = tokio::spawn(async move { r2.resolve("data") })
            .await
            .unwrap();
        assert_eq!(data, Some(PathBuf::from("/srv/data")));
        assert_eq!(
            r.resolve("scratch"),
            Some(PathBuf::from(
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/scratch"
            ))
        );
        assert_eq!(src.reads(), 1, "known names are cached");
        assert_eq!(r.names(), ["both", "data", "extra", "scratch"]);

        // An unknown name reads the Pod again: a new revision's volume is found.
        assert_eq!(r.resolve("late"), None);
        assert_eq!(src.reads(), 2);
        src.set(Ok(pod_with(serde_json::json!([
            {"name": "late", "hostPath": {"path": "/late"}}
        ]))));
        assert_eq!(r.resolve("late"), Some(PathBuf::from("/late")));
        // A failed read keeps what was known.
        src.set(Err("api down".into()));
        assert_eq!(r.resolve("nope"), None);
        assert_eq!(r.resolve("late"), Some(PathBuf::from("/late")));
        assert_eq!(r.names(), ["both", "extra", "late"]);
    }

    #[test]
    fn pod_read_is_bounded_and_works_outside_the_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let slow = FakePod::new(
            serde_json::json!([{"name": "data", "hostPath": {"path": "/srv"}}]),
            Duration::from_secs(30),
        );
        let r = {
            let _in = rt.enter();
            PodVolumes::new(HashMap::new(), slow.clone(), Duration::from_millis(200))
        };
        let started = std::time::Instant::now();
        assert_eq!(r.resolve("data"), None);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(slow.reads(), 1);
        assert!(r.names().is_empty());
    }

    #[tokio::test]
    async fn current_thread_runtime_answers_from_what_is_known() {
        let src = FakePod::new(serde_json::json!([]), Duration::ZERO);
        let r = PodVolumes::new(flags(&[("a", "/a")]), src.clone(), POD_VOLUMES_TIMEOUT);
        assert_eq!(r.resolve("a"), Some(PathBuf::from("/a")));
        assert_eq!(r.resolve("b"), None);
        assert_eq!(src.reads(), 0);
    }

    #[test]
    fn static_resolver() {
        let r: StaticVolumes = [("data".to_string(), PathBuf::from("/tmp/x"))]
            .into_iter()
            .collect();
        assert_eq!(r.resolve("data"), Some(PathBuf::from("/tmp/x")));
        assert_eq!(r.resolve("nope"), None);
        assert_eq!(r.names(), vec!["data".to_string()]);
    }
}
