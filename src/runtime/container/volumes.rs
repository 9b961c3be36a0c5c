//! Where a `volumeMounts[].name` lives on the host: from `--volume NAME=HOSTPATH` outside a
//! cluster, or from the agent's own Pod (its hostPath and kubelet-managed volumes) inside.

use std::collections::HashMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;

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
