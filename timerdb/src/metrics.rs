//! Prometheus metrics of a TimerDB node, declared once here.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::{Error, Result};

const SCHEDULED: &str = "timerdb_api_timers_scheduled_total";
const REQUESTS: &str = "timerdb_api_requests_total";
const FIRED: &str = "timerdb_scheduler_timers_fired_total";
const CANCELLED: &str = "timerdb_api_timers_cancelled_total";
const SINK_FAILED: &str = "timerdb_sink_failed_attempts_total";
const DEAD_LETTERED: &str = "timerdb_sink_dead_lettered_total";
const LATENESS: &str = "timerdb_scheduler_fire_lateness_seconds";
const IN_MEMORY: &str = "timerdb_scheduler_timers_in_memory";
const IN_MEMORY_BYTES: &str = "timerdb_scheduler_bytes_in_memory";
const LOADED: &str = "timerdb_scheduler_timers_loaded_total";
const STORE_OP: &str = "timerdb_store_operation_duration_seconds";
const STORE_GROUP: &str = "timerdb_store_commit_group_size";
const BUCKETS_DELETED: &str = "timerdb_scheduler_buckets_deleted_total";
const SKIPPED_AS_FIRED: &str = "timerdb_scheduler_timers_skipped_as_fired_total";
const KEY_LOSERS: &str = "timerdb_store_idempotency_losers_dropped_total";
const UNREADABLE: &str = "timerdb_store_unreadable_rows_total";

/// Starts the Prometheus endpoint on `addr` (`GET /metrics`) and describes every metric.
pub fn install(addr: SocketAddr) -> Result<()> {
    let lateness_buckets = [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
    ];
    let op_buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
    ];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(LATENESS.into()), &lateness_buckets)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_OP.into()), &op_buckets))
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(STORE_GROUP.into()),
                &[1.0, 2.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 2048.0],
            )
        })
        .and_then(|b| b.install())
        .map_err(|e| Error::Config(format!("metrics listener {addr}: {e}")))?;
    describe();
    Ok(())
}

fn describe() {
    describe_counter!(SCHEDULED, "Timers accepted and durably stored");
    describe_counter!(REQUESTS, "gRPC calls by method and status code");
    describe_counter!(FIRED, "Timers produced to their sink");
    describe_counter!(CANCELLED, "Timers cancelled");
    describe_counter!(SINK_FAILED, "Failed sink deliveries (each is retried)");
    describe_counter!(
        DEAD_LETTERED,
        "Timers whose target could never be written, sent to the dead-letter topic"
    );
    describe_histogram!(
        LATENESS,
        metrics::Unit::Seconds,
        "Fired time minus due time (due time = later of fire_at and acceptance)"
    );
    describe_gauge!(IN_MEMORY, "Timers held in the scheduler's memory");
    describe_gauge!(
        IN_MEMORY_BYTES,
        metrics::Unit::Bytes,
        "Bytes the timers in the scheduler's memory take (payload, key, headers, bookkeeping)"
    );
    describe_counter!(LOADED, "Timers loaded from the store ahead of their bucket");
    describe_histogram!(
        STORE_OP,
        metrics::Unit::Seconds,
        "Store operation latency by operation"
    );
    describe_histogram!(STORE_GROUP, "Write requests folded into one store commit");
    describe_counter!(BUCKETS_DELETED, "Fired buckets removed from the store");
    describe_counter!(
        SKIPPED_AS_FIRED,
        "Timers read after a restart that the recorded progress shows as delivered, not fired again"
    );
    describe_counter!(
        KEY_LOSERS,
        "Stored rows of a call that lost its idempotency key to another call, dropped at load instead of fired"
    );
    describe_counter!(
        UNREADABLE,
        "Stored timer rows that could not be decoded, skipped at load (logged with their id)"
    );
}

/// Timers accepted.
pub fn scheduled(n: usize) {
    counter!(SCHEDULED).increment(n as u64);
}

/// One gRPC call finished.
pub fn request(method: &'static str, code: tonic::Code) {
    counter!(REQUESTS, "method" => method, "code" => format!("{code:?}")).increment(1);
}

/// Timers delivered to the sink; `lateness` is sampled per timer.
pub fn fired(lateness: impl Iterator<Item = Duration>) {
    let h = histogram!(LATENESS);
    let mut n = 0;
    for l in lateness {
        h.record(l.as_secs_f64());
        n += 1;
    }
    counter!(FIRED).increment(n);
}

/// A timer was cancelled.
pub fn cancelled() {
    counter!(CANCELLED).increment(1);
}

/// Sink attempts that failed and will be retried.
pub fn sink_failed(n: usize) {
    counter!(SINK_FAILED).increment(n as u64);
}

/// A timer went to the dead-letter topic.
pub fn dead_lettered(topic: &str) {
    counter!(DEAD_LETTERED, "topic" => topic.to_owned()).increment(1);
}

/// Timers currently in the scheduler's memory, and the bytes they take.
pub fn in_memory(n: usize, bytes: usize) {
    gauge!(IN_MEMORY).set(n as f64);
    gauge!(IN_MEMORY_BYTES).set(bytes as f64);
}

/// Timers loaded from the store.
pub fn loaded(n: usize) {
    counter!(LOADED).increment(n as u64);
}

/// One store operation took `d`.
pub fn store_op(op: &'static str, d: Duration) {
    histogram!(STORE_OP, "op" => op).record(d.as_secs_f64());
}

/// One group commit folded `n` requests.
pub fn store_group_size(n: usize) {
    histogram!(STORE_GROUP).record(n as f64);
}

/// A fired bucket was deleted.
pub fn bucket_deleted() {
    counter!(BUCKETS_DELETED).increment(1);
}

/// Loaded timers not fired again because the recorded progress covers them.
pub fn skipped_as_fired(n: usize) {
    counter!(SKIPPED_AS_FIRED).increment(n as u64);
}

/// A loaded row lost its idempotency key to another call's timer and is not fired.
pub fn key_loser_dropped() {
    counter!(KEY_LOSERS).increment(1);
}

/// A stored row could not be decoded and was skipped.
pub fn unreadable_row() {
    counter!(UNREADABLE).increment(1);
}
