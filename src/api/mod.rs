//! The HTTP API: the router, who may call it (`auth`), handlers, wire types, the access
//! log and HTTP metrics, and the one error mapping (`error`); `server` serves it.

pub mod access_log;
pub mod auth;
pub mod error;
mod file_stamp;
pub mod handlers;
pub mod logs;
pub mod openapi;
pub mod route;
pub mod router;
mod scrape;
pub mod server;
pub mod unknown_fields;
pub mod wire;

pub use router::routes;
