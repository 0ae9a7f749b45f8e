//! Prometheus metrics of a TimerDB node, declared once here.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
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
const COVERED_ADOPTED: &str = "timerdb_scheduler_covered_timers_adopted_total";
const KEY_LOSERS: &str = "timerdb_store_idempotency_losers_dropped_total";
const UNREADABLE: &str = "timerdb_store_unreadable_rows_total";
const MOVED_WRITES: &str = "timerdb_cluster_moved_writes_total";
const STORE_ERRORS: &str = "timerdb_store_errors_total";
const FENCED: &str = "timerdb_store_fenced_writes_total";
const LOW_WATER_LAG: &str = "timerdb_scheduler_low_water_lag_seconds";
const RANGES_RUNNING: &str = "timerdb_scheduler_slots_running";
const LEASE_LEFT: &str = "timerdb_cluster_lease_left_seconds";
const SLOTS_OWNED: &str = "timerdb_cluster_slots_owned";
const SLOTS_UNOWNED: &str = "timerdb_cluster_slots_unowned";
const IS_LEADER: &str = "timerdb_cluster_is_leader";
const MEMBERS: &str = "timerdb_cluster_members";
const CLOCK_OFFSET: &str = "timerdb_cluster_clock_offset_seconds";
const ADOPTED_BY_VALUE: &str = "timerdb_cluster_adopted_by_value_total";
const LEASE_GRANTS: &str = "timerdb_cluster_lease_grants_total";
const QUORUM_CHECKS: &str = "timerdb_cluster_quorum_checks_total";

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
    describe_counter!(
        STORE_ERRORS,
        "Store calls that failed (unreachable, timed out), by what was being done"
    );
    describe_counter!(
        FENCED,
        "Cluster member: ownership writes the store refused because a newer owner claimed \
         the slot (a member that lost a range while a write was under way)"
    );
    describe_gauge!(
        LOW_WATER_LAG,
        Unit::Seconds,
        "How far the oldest recorded low-water mark of the running ranges is behind now"
    );
    describe_gauge!(RANGES_RUNNING, "Slots this node's running ranges cover");
    describe_gauge!(
        LEASE_LEFT,
        Unit::Seconds,
        "Cluster member: how long its lease still holds (0: none; it fires nothing)"
    );
    describe_gauge!(SLOTS_OWNED, "Cluster member: slots its map gives it");
    describe_gauge!(SLOTS_UNOWNED, "Cluster member: slots its map gives nobody");
    describe_gauge!(IS_LEADER, "Cluster member: 1 while it is the Raft leader");
    describe_gauge!(MEMBERS, "Cluster member: members in its map, by state");
    describe_gauge!(
        CLOCK_OFFSET,
        Unit::Seconds,
        "Cluster member: its wall clock minus the leader's, measured at its last lease renewal (members must agree within the lease drift)"
    );
    // Every counter exists from the start (at 0), so dashboards and alert rules find it
    // before the first event.
    for name in [
        SCHEDULED,
        FIRED,
        CANCELLED,
        SINK_FAILED,
        DEAD_LETTERED,
        LOADED,
        BUCKETS_DELETED,
        SKIPPED_AS_FIRED,
        COVERED_ADOPTED,
        KEY_LOSERS,
        UNREADABLE,
        STORE_ERRORS,
        FENCED,
    ] {
        counter!(name).increment(0);
    }
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
        COVERED_ADOPTED,
        "Timers an earlier owner's recorded progress showed as delivered, fired all the same because an adoption asked for them (a duplicate if that owner had fired them)"
    );
    describe_counter!(
        KEY_LOSERS,
        "Stored rows of a call that lost its idempotency key to another call, dropped at load instead of fired"
    );
    describe_counter!(
        MOVED_WRITES,
        "New timers stored while their slot range moved away, by outcome: adopted by the new owner, withdrawn, confirmed by a repeated call (and adopted), confirmed_unadopted (its owner never adopted it: it may not fire), unknown"
    );
    describe_counter!(
        ADOPTED_BY_VALUE,
        "Owner: timers another member carried by value and this one took into memory, their rows gone (deleted unfired with a bucket read before they landed)"
    );
    describe_counter!(LEASE_GRANTS, "Leader: lease renewals granted to members");
    describe_counter!(
        QUORUM_CHECKS,
        "Leader: quorum checks run to confirm leadership for lease renewals (one serves every renewal that arrived before it began)"
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

/// A timer an earlier owner's progress covers is fired because an adoption asked for it.
pub fn fired_though_covered() {
    counter!(COVERED_ADOPTED).increment(1);
}

/// A loaded row lost its idempotency key to another call's timer and is not fired.
pub fn key_loser_dropped() {
    counter!(KEY_LOSERS).increment(1);
}

/// A timer stored while its slot range moved away was settled with `outcome`
/// (`adopted`, `withdrawn`, `confirmed`, `confirmed_unadopted` or `unknown`).
pub fn moved_write(outcome: &'static str) {
    counter!(MOVED_WRITES, "outcome" => outcome).increment(1);
}

/// The owner took a timer carried by value into memory, its row gone.
pub fn adopted_by_value() {
    counter!(ADOPTED_BY_VALUE).increment(1);
}

/// Leader: lease renewals granted and quorum checks run so far (absolute counts).
pub fn lease_work(grants: u64, quorum_checks: u64) {
    counter!(LEASE_GRANTS).absolute(grants);
    counter!(QUORUM_CHECKS).absolute(quorum_checks);
}

/// A stored row could not be decoded and was skipped.
pub fn unreadable_row() {
    counter!(UNREADABLE).increment(1);
}

/// A store call failed (unreachable or timed out).
pub fn store_error(what: &str) {
    counter!(STORE_ERRORS, "op" => what.to_owned()).increment(1);
}

/// The store refused an ownership write: a newer owner claimed the slot.
pub fn fenced(what: &'static str) {
    counter!(FENCED, "op" => what).increment(1);
}

/// The running ranges: slots covered and the oldest low-water mark's lag.
pub fn ranges(slots_running: usize, low_water_lag: Duration) {
    gauge!(RANGES_RUNNING).set(slots_running as f64);
    gauge!(LOW_WATER_LAG).set(low_water_lag.as_secs_f64());
}

/// This member's wall clock minus the leader's, as measured at its last lease renewal
/// (0 on the leader).
pub fn clock_offset(member_minus_leader_ms: i64) {
    gauge!(CLOCK_OFFSET).set(member_minus_leader_ms as f64 / 1000.0);
}

/// What a cluster member knows of itself and the map.
pub fn cluster(
    lease_left: Duration,
    slots_owned: usize,
    slots_unowned: usize,
    leader: bool,
    members: &[(&'static str, usize)],
) {
    gauge!(LEASE_LEFT).set(lease_left.as_secs_f64());
    gauge!(SLOTS_OWNED).set(slots_owned as f64);
    gauge!(SLOTS_UNOWNED).set(slots_unowned as f64);
    gauge!(IS_LEADER).set(if leader { 1.0 } else { 0.0 });
    for (state, n) in members {
        gauge!(MEMBERS, "state" => *state).set(*n as f64);
    }
}
