//! The crate's error type and its mapping to gRPC status codes (the only place that maps).

/// Errors returned by TimerDB's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something unusable; nothing was changed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The timer id is well formed but no such timer is stored.
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the system is not in a state to apply it
    /// (timer already fired, unknown Kafka topic, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A backend (store or sink) is unreachable or timed out; retrying may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The store holds data this version cannot read, or was created with another layout.
    #[error("store: {0}")]
    Corrupt(String),
    /// A configuration value is wrong; the message names the setting.
    #[error("configuration: {0}")]
    Config(String),
    /// The node is shutting down.
    #[error("timerdb is shutting down")]
    ShuttingDown,
    /// Anything else (I/O, a bug); the message says what.
    #[error("{0}")]
    Internal(String),
    /// The answer of the member a call was forwarded to (the timer's owner), passed on as
    /// it came.
    #[error("{}", .0.message())]
    Forwarded(tonic::Status),
    /// A write that belongs to a slot's owner, refused by the store because a newer owner
    /// (a higher epoch) claimed the slot.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code a client sees for this error.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) | Error::Config(_) => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Unavailable(_) | Error::ShuttingDown => tonic::Code::Unavailable,
            Error::Corrupt(_) => tonic::Code::DataLoss,
            Error::Internal(_) => tonic::Code::Internal,
            Error::Forwarded(s) => s.code(),
            Error::Fenced(_) => tonic::Code::Aborted,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Corrupted(m) => Error::Corrupt(m),
            redb::Error::Io(io) => Error::Unavailable(format!("embedded store I/O error: {io}")),
            other => Error::Internal(format!("embedded store: {other}")),
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::from(redb::Error::from(e))
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);
