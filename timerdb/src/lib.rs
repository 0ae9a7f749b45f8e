//! TimerDB: a durable, scalable `setTimeout`. Clients store timers over gRPC; each fires
//! at its epoch as a message on the Kafka topic and partition its caller chose.
//!
//! The node is [`server::run`] (until a signal), or [`server::start`] to embed one (tests
//! run several in one process); its parts are the [`store`] (where timers live), the
//! [`scheduler`] (what fires them), the [`sink`] (where they go) and the [`api`].

pub mod admin;
pub mod api;
pub mod cluster;
pub mod config;
mod error;
pub mod failpoint;
pub mod metrics;
pub mod priority;
pub mod scheduler;
pub mod server;
pub mod sink;
pub mod store;
pub mod timer;

pub use error::{Error, Result};
