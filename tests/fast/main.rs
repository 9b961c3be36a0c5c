//! Tests that need neither root nor anything installed: the HTTP contract, access
//! control, TLS, slow clients, recovery and the Task controller against a fake API
//! server (group `fast` in .config/nextest.toml; they pass as an unprivileged user).

#[path = "../support/mod.rs"]
mod support;

mod api;
mod auth;
mod auth_kubernetes;
mod docs;
mod field_validation;
mod process_timeout;
mod recovery;
mod slow_clients;
mod tls;
mod watch_tasks;
