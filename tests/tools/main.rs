//! Tests that run the tools scripts/install-deps puts in .tools/: helm and kubeconform for
//! the chart, schemathesis and openapi-spec-validator for the API document,
//! prometheus_client for /metrics (group `tools`).

#[path = "../support/mod.rs"]
mod support;

mod chart;
mod metrics;
mod openapi;
