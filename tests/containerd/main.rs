//! Tests against the tests' own containerd (tests/support/containerd.rs): container
//! mode, CRI-located sidecars, the agent in pods (group `containerd`).

#[path = "../support/mod.rs"]
mod support;

mod container;
mod container_kube;
mod container_policy;
mod in_pod;
mod pod_template;
mod sidecar_cri;
mod sidecar_kube;
mod upstream_pool;
