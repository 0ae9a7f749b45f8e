//! Where fired timers go, behind the [`Sink`] trait, chosen by URL.

use std::sync::Arc;

use async_trait::async_trait;

use crate::timer::Timer;
use crate::{Error, Result};

pub mod conformance;
pub mod jsonl;
pub mod kafka;

/// Header carrying the timer id, so consumers can drop duplicates.
pub const HEADER_ID: &str = "timerdb-id";
/// Header carrying the scheduled epoch in ms (decimal text).
pub const HEADER_FIRE_AT: &str = "timerdb-fire-at";
/// Header carrying the time the message was produced, ms (decimal text).
pub const HEADER_FIRED_AT: &str = "timerdb-fired-at";
/// Prefix reserved for TimerDB's own headers; clients may not set such headers.
pub const RESERVED_HEADER_PREFIX: &str = "timerdb-";

/// What happened to one timer handed to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Written to its target.
    Delivered,
    /// Its target can never take it; written to the dead-letter topic instead.
    DeadLettered,
    /// Not written this time; the scheduler retries with backoff.
    Failed(String),
}

/// A destination for fired timers. An implementation must answer every item of a batch,
/// in order, and report `Delivered` only once the message is durably written.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Checks, at `SetTimeout` time, that the target exists. `FAILED_PRECONDITION` if it
    /// does not, `UNAVAILABLE` if that cannot be told now.
    async fn check_target(&self, _topic: &str, _partition: i32) -> Result<()> {
        Ok(())
    }

    /// Produces each timer, stamped `fired_at_ms`, and reports one outcome per timer, in order.
    /// Returns only when every outcome is final (written and acknowledged, or failed).
    async fn deliver(&self, batch: &[Timer], fired_at_ms: u64) -> Vec<Delivery>;

    /// Flushes anything buffered.
    async fn flush(&self) -> Result<()>;

    /// Sends a copy of a stored row that cannot be decoded to the dead-letter topic, if the
    /// sink has one: `Ok(true)` when sent, `Ok(false)` when there is nowhere to send it
    /// (the row is logged and stays in the store either way).
    async fn dead_letter_unreadable(&self, _row: &crate::store::Unreadable) -> Result<bool> {
        Ok(false)
    }

    /// The largest message (payload, key and headers together) this sink can write, if it
    /// has a limit; a timer that would exceed it is refused when it is set.
    fn max_message_bytes(&self) -> Option<usize> {
        None
    }
}

/// Bytes a fired message of `spec` takes, as the sink's limit counts them: payload, key,
/// the request's headers and room for TimerDB's own headers.
pub fn message_bytes(spec: &crate::timer::TimerSpec) -> usize {
    // timerdb-id (32 hex), timerdb-fire-at and timerdb-fired-at (13 digits), names included.
    const OWN_HEADERS: usize = 128;
    spec.payload.len()
        + spec.key.as_ref().map_or(32, |k| k.len())
        + spec
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + OWN_HEADERS
}

/// The key a fired message carries: the request's key, else the timer id.
pub fn message_key(timer: &Timer) -> Vec<u8> {
    match &timer.spec.key {
        Some(k) => k.to_vec(),
        None => timer.id.to_string().into_bytes(),
    }
}

/// All headers of a fired message: the request's, then TimerDB's own.
pub fn message_headers(timer: &Timer, fired_at_ms: u64) -> Vec<(&str, Vec<u8>)> {
    let mut h: Vec<(&str, Vec<u8>)> = timer
        .spec
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_vec()))
        .collect();
    h.push((HEADER_ID, timer.id.to_string().into_bytes()));
    h.push((
        HEADER_FIRE_AT,
        timer.spec.fire_at_ms.to_string().into_bytes(),
    ));
    h.push((HEADER_FIRED_AT, fired_at_ms.to_string().into_bytes()));
    h
}

/// Checks `url` the way [`open`] reads it, without any I/O; returns the largest message
/// the sink takes, if it has a limit.
pub fn check_url(url: &str) -> Result<Option<usize>> {
    if url == "stdout:" || url == "stdout" {
        return Ok(None);
    }
    if let Some(path) = url
        .strip_prefix("jsonl://")
        .or_else(|| url.strip_prefix("jsonl:"))
    {
        if path.is_empty() {
            return Err(Error::Config(format!("sink URL {url:?} has no file path")));
        }
        return Ok(None);
    }
    if url.starts_with("kafka://") {
        return Ok(Some(kafka::KafkaUrl::parse(url)?.max_message_bytes));
    }
    Err(Error::Config(format!(
        "unsupported sink URL {url:?}: expected stdout:, jsonl:///path or kafka://host:port"
    )))
}

/// Opens the sink named by `url`: `stdout:`, `jsonl:///path` (or `jsonl:relative/path`),
/// `kafka://host:port[,host:port...][?dead_letter_topic=T&compression=lz4&linger_ms=5]`.
pub async fn open(url: &str) -> Result<Arc<dyn Sink>> {
    if url == "stdout:" || url == "stdout" {
        return Ok(Arc::new(jsonl::JsonlSink::stdout()));
    }
    if let Some(path) = url
        .strip_prefix("jsonl://")
        .or_else(|| url.strip_prefix("jsonl:"))
    {
        if path.is_empty() {
            return Err(Error::Config(format!("sink URL {url:?} has no file path")));
        }
        return Ok(Arc::new(jsonl::JsonlSink::file(path.as_ref())?));
    }
    if url.starts_with("kafka://") {
        return Ok(Arc::new(kafka::KafkaSink::open(url).await?));
    }
    Err(Error::Config(format!(
        "unsupported sink URL {url:?}: expected stdout:, jsonl:///path or kafka://host:port"
    )))
}
