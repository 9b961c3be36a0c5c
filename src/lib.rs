//! task-executor: a node agent that runs short-lived tasks for a sandbox pod.
//!
//! Layers, each importing only those below it:
//! `api` (HTTP) → `kube` (Kubernetes integrations) → `manager` (create / delete / sync) →
//! `runtime` (process, sidecar, container backends) → `task` (model, names, store) →
//! `sys` (the OS: /proc, process handles, durable files, blocking-work pools).
//! Exit events flow back runtime → manager over a channel. `agent` composes them and runs
//! the agent (`run`, what `main` calls). See docs/api.md for the API.
#![deny(unsafe_code)]

#[forbid(unsafe_code)]
pub mod agent;
#[forbid(unsafe_code)]
pub mod api;
#[forbid(unsafe_code)]
pub mod bench;
#[forbid(unsafe_code)]
pub mod config;
#[forbid(unsafe_code)]
pub mod init;
#[forbid(unsafe_code)]
pub mod kube;
#[forbid(unsafe_code)]
pub mod limits;
#[forbid(unsafe_code)]
pub mod manager;
#[forbid(unsafe_code)]
pub mod metrics;
pub mod runtime; // holds `runtime::child_setup`, the one module allowed `unsafe`
#[forbid(unsafe_code)]
pub mod sys;
#[forbid(unsafe_code)]
pub mod task;
#[forbid(unsafe_code)]
pub mod telemetry;

pub use agent::{AppError, agent_only_env, run};
