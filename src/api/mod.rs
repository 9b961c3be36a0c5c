//! The HTTP API: routes, handlers, wire types, and the one error mapping.

pub mod error;
pub mod handlers;
pub mod routes;
pub mod wire;

pub use routes::routes;
