//! The HTTP API: routes, handlers, wire types, and the one error mapping.

pub mod auth;
pub mod error;
mod file_stamp;
pub mod handlers;
pub mod routes;
pub mod server;
pub mod wire;

pub use routes::routes;
