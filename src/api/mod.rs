//! The HTTP API: routes, handlers, wire types, and the one error mapping.

pub mod access;
pub mod error;
pub mod handlers;
pub mod logs;
pub mod openapi;
pub mod routes;
mod scrape;
pub mod wire;

pub use routes::routes;
