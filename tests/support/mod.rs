//! Shared test support. Each test binary uses only part of it.
#![allow(dead_code)]

pub mod agent;
pub mod fake_apiserver;
pub mod http;
