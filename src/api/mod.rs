//! The HTTP API: routes, handlers, wire types, and the one error mapping.

pub mod access;
pub mod auth;
pub mod error;
mod file_stamp;
pub mod handlers;
pub mod logs;
pub mod openapi;
pub mod route;
pub mod routes;
mod scrape;
pub mod server;
pub mod unknown_fields;
pub mod wire;

pub use routes::routes;
