//! journeyx: moves users through journey graphs as their events arrive, and uses TimerDB
//! for every wait.
//!
//! - [`model`]: journeys and segments as their files describe them, and their checks;
//! - [`predicate`]: property tests (`{amount: {gt: 0}}`);
//! - [`catalog`]: every published journey version and segment;
//! - [`engine`]: the pure step, event + user state → new state + commands;
//! - [`clock`]: local time in the user's time zone;
//! - [`audience`]: segment membership, journeyx's own or an external service's;
//! - [`store`]: user records, published journeys and segments (embedded: fjall);
//! - [`runtime`]: the Kafka consumer, the effects, the offsets.

pub mod audience;
pub mod catalog;
pub mod clock;
pub mod engine;
pub mod model;
pub mod predicate;
pub mod runtime;
pub mod store;

/// What journeyx refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A journey, segment or event that is not valid; the message names what is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The state store failed; the message names the operation.
    #[error("{0}")]
    Store(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
