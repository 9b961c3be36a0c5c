//! The Kubernetes integration: the main container found through the own Pod (sidecar
//! mode), the own Pod's volumes (container mode), and the `Task` custom resource run by
//! `--watch-tasks`. Every part talks to the API server through the one [`KubeClient`].

pub mod client;
pub mod crd;
pub mod error;
pub mod events;
pub mod locator;
pub mod pod;
pub mod restart_watch;
pub mod review;
pub mod task_controller;
pub mod watch_stream;

pub use client::{KubeClient, KubeTimeouts};
pub use error::KubeError;
