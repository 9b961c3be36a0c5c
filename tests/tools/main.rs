//! Tests that run the tools scripts/install-deps puts in .tools/: helm and kubeconform for
//! the chart, schemathesis and openapi-spec-validator for the API document,
//! prometheus_client for /metrics; and the shipped build's code layout, with binutils' nm
//! (group `tools`).

#[path = "../support/mod.rs"]
mod support;

mod chart;
mod metrics;
mod openapi;
mod symbol_order;
