//! Tests that need root: namespaces, other uids, cgroups, mounts, the init, sidecar
//! mode (group `root` in .config/nextest.toml).

#[path = "../support/mod.rs"]
mod support;

mod containment;
mod examples;
mod exec_mode;
mod init;
mod isolation;
mod isolation_uids;
mod leftovers;
mod lifecycle_hooks;
mod limits;
mod logs;
mod process;
mod sidecar;
mod spare;
mod task_hygiene;
mod task_policy;
