//! The ScyllaDB store (also runs on Apache Cassandra, which speaks the same CQL protocol).
//!
//! URL: `scylla://host:port[,host:port...]/keyspace[?consistency=quorum&replication_factor=1
//! &replication_class=SimpleStrategy&request_timeout=5s]`.
//!
//! Layout (schema in `migrations/scylla/`): `timers` is partitioned by (slot, bucket), so a
//! bucket of a slot is one query and a fired bucket one partition delete. Two small index
//! tables tell which partitions exist: `bucket_slots` (bucket → slots) and `bucket_hours`
//! (hour → buckets). Index rows are written *before* the timer rows, so a loader that goes
//! through the index can never miss a stored timer.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt, stream};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};

use super::{
    Abandoned, CancelOutcome, Homing, Inserted, LoadedPage, Progress, StoreOptions, StoredTimer,
    TimerStore,
};
use crate::metrics as m;
use crate::timer::{Layout, SlotRange, StoredState, Timer, TimerId, TimerSpec, now_ms};
use crate::{Error, Result};

/// The schema migrations, in order: (version, description, CQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "timers, bucket indexes, low-water marks, idempotency, meta",
        include_str!("../../migrations/scylla/0001_init.cql"),
    ),
    (
        2,
        "range progress (delivered-through marks)",
        include_str!("../../migrations/scylla/0002_range_progress.cql"),
    ),
    (
        3,
        "slot epochs (fenced low-water marks of cluster members)",
        include_str!("../../migrations/scylla/0003_slot_epochs.cql"),
    ),
    (
        4,
        "confirmed idempotency claims (a withdraw and a repeated call's answer exclude each other)",
        include_str!("../../migrations/scylla/0004_confirmed_keys.cql"),
    ),
    (
        5,
        "withdrawn keys (a released key is not claimed or confirmed again for its withdrawn timer)",
        include_str!("../../migrations/scylla/0005_withdrawn_keys.cql"),
    ),
];

const HOUR_MS: u64 = 3_600_000;
/// Concurrent requests one store call may have in flight.
const FAN_OUT: usize = 64;
/// Partitions one page load reads at a time (each up to a page of rows).
const LOAD_FAN_OUT: usize = 16;
/// Index entries remembered as written, before the memory is dropped and rebuilt.
const INDEX_CACHE_MAX: usize = 500_000;
/// Most rows of one partition written as one unlogged batch, and most spec bytes in it.
const BATCH_ROWS: usize = 64;
const BATCH_BYTES: usize = 32 * 1024;

/// Client-side timeout of one schema statement (keyspace and table creation).
const DDL_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at a key claim (or a superseded row's delete) before the call gives up.
const CLAIM_ATTEMPTS: u32 = 4;
/// How long after a row was written a claim by another timer still means the row lost
/// (a race, or a cut-off call retried); a later claim came after the row's own expired.
const CLAIM_RACE_WINDOW: Duration = Duration::from_secs(3600);

/// Values of one `timers` row: slot, bucket, rand, created ms, spec.
type TimerRow = (i32, i64, i64, i64, Vec<u8>);

/// Parsed `scylla://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaUrl {
    /// `host:port` contact points.
    pub hosts: Vec<String>,
    /// Keyspace name.
    pub keyspace: String,
    /// Consistency for reads and writes.
    pub consistency: Consistency,
    /// Replication class for a keyspace this store creates.
    pub replication_class: String,
    /// Replication factor for a keyspace this store creates.
    pub replication_factor: u32,
    /// Client-side timeout of one request.
    pub request_timeout: Duration,
}

impl ScyllaUrl {
    /// Parses `scylla://host:port[,host:port]/keyspace[?options]`.
    pub fn parse(url: &str) -> Result<ScyllaUrl> {
        let bad = |why: String| Error::Config(format!("store URL {url:?}: {why}"));
        let rest = url
            .strip_prefix("scylla://")
            .ok_or_else(|| bad("must start with scylla://".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hosts, keyspace) = path
            .split_once('/')
            .ok_or_else(|| bad("needs a keyspace: scylla://host:9042/keyspace".into()))?;
        let hosts: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.contains(':') {
                    h.to_owned()
                } else {
                    format!("{h}:9042")
                }
            })
            .collect();
        if hosts.is_empty() {
            return Err(bad("names no host".into()));
        }
        let keyspace = keyspace.trim_end_matches('/').to_owned();
        if keyspace.is_empty()
            || keyspace.len() > 48
            || !keyspace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(bad(format!(
                "keyspace {keyspace:?} must be 1-48 characters of [a-zA-Z0-9_]"
            )));
        }
        let mut u = ScyllaUrl {
            hosts,
            keyspace,
            consistency: Consistency::Quorum,
            replication_class: "SimpleStrategy".into(),
            replication_factor: 1,
            request_timeout: Duration::from_secs(5),
        };
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "consistency" => {
                    // Reads and writes use the same level; only levels whose reads
                    // overlap every acknowledged write are accepted, or a bucket load
                    // could miss a timer that was acknowledged.
                    u.consistency = match v.to_ascii_lowercase().as_str() {
                        "quorum" => Consistency::Quorum,
                        "local_quorum" => Consistency::LocalQuorum,
                        "all" => Consistency::All,
                        weak @ ("one" | "two" | "three" | "local_one" | "any") => {
                            return Err(bad(format!(
                                "consistency {weak:?} is refused: a load at that level can miss \
                                 an acknowledged write, so a timer could be lost; use quorum \
                                 (it costs nothing with replication_factor=1), local_quorum \
                                 or all"
                            )));
                        }
                        "each_quorum" => {
                            return Err(bad(
                                "consistency \"each_quorum\" is refused: it is not valid for \
                                 reads; use quorum, local_quorum or all"
                                    .into(),
                            ));
                        }
                        other => {
                            return Err(bad(format!(
                                "consistency {other:?}: use quorum, local_quorum or all"
                            )));
                        }
                    }
                }
                "replication_factor" => {
                    u.replication_factor = v
                        .parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| bad(format!("replication_factor {v:?}: want >= 1")))?
                }
                "replication_class" => {
                    if v != "SimpleStrategy" && v != "NetworkTopologyStrategy" {
                        return Err(bad(format!(
                            "replication_class {v:?}: use SimpleStrategy or NetworkTopologyStrategy"
                        )));
                    }
                    u.replication_class = v.into_owned();
                }
                "request_timeout" => {
                    u.request_timeout = humantime::parse_duration(&v)
                        .map_err(|e| bad(format!("request_timeout {v:?}: {e}")))?
                }
                other => {
                    return Err(bad(format!(
                        "unknown option {other:?} (known: consistency, replication_factor, replication_class, request_timeout)"
                    )));
                }
            }
        }
        Ok(u)
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    m::store_error(what);
    Error::Unavailable(format!("scylla {what}: {e}"))
}

/// What a conditional release of a key's claim found.
#[derive(Debug, PartialEq, Eq)]
enum ReleaseOutcome {
    /// The claim is gone: released now, or it named another timer (or none).
    Released,
    /// A repeated call confirmed the claim: it stays.
    Confirmed,
}

struct Statements {
    insert_timer: PreparedStatement,
    insert_bucket_slot: PreparedStatement,
    insert_bucket_hour: PreparedStatement,
    claim_idempotency: PreparedStatement,
    read_idempotency: PreparedStatement,
    release_idempotency: PreparedStatement,
    read_key_ttl: PreparedStatement,
    confirm_idempotency: PreparedStatement,
    release_unkept_idempotency: PreparedStatement,
    keep_idempotency: PreparedStatement,
    mark_withdrawn: PreparedStatement,
    read_withdrawn: PreparedStatement,
    delete_timer: PreparedStatement,
    get_timer: PreparedStatement,
    cancel_timer: PreparedStatement,
    bucket_slots: PreparedStatement,
    bucket_has_slots: PreparedStatement,
    load_partition: PreparedStatement,
    load_partition_after: PreparedStatement,
    next_in_hour: PreparedStatement,
    delete_partition: PreparedStatement,
    delete_bucket_slots: PreparedStatement,
    delete_bucket_hour: PreparedStatement,
    all_low_water: PreparedStatement,
    all_fenced_low_water: PreparedStatement,
    claim_new_slot: PreparedStatement,
    claim_raise_slot: PreparedStatement,
    set_fenced_low_water: PreparedStatement,
    set_low_water: PreparedStatement,
    init_low_water: PreparedStatement,
    get_progress: PreparedStatement,
    set_progress: PreparedStatement,
}

/// Timers in ScyllaDB / Cassandra.
pub struct ScyllaStore {
    session: Session,
    layout: Layout,
    st: Statements,
    retention: Duration,
    /// Never goes backwards (see the embedded store's writer for why).
    clock_ms: AtomicU64,
    /// Index rows already written by this process: (bucket, slot) and (hour, bucket).
    written_slots: Mutex<HashSet<(u64, u32)>>,
    written_hours: Mutex<HashSet<(u64, u64)>>,
}

/// Connects, creates the keyspace if needed and applies pending migrations.
pub async fn connect(url: &ScyllaUrl) -> Result<Session> {
    let profile = ExecutionProfile::builder()
        .consistency(url.consistency)
        .serial_consistency(Some(match url.consistency {
            Consistency::LocalQuorum => SerialConsistency::LocalSerial,
            _ => SerialConsistency::Serial,
        }))
        .request_timeout(Some(url.request_timeout))
        .build();
    SessionBuilder::new()
        .known_nodes(&url.hosts)
        .connection_timeout(Duration::from_secs(5))
        .default_execution_profile_handle(profile.into_handle())
        .build()
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot connect to scylla at {}: {e}",
                url.hosts.join(",")
            ))
        })
}

/// Creates the keyspace (if missing) and applies the migrations not applied yet.
/// Returns the versions applied by this call.
pub async fn migrate(session: &Session, url: &ScyllaUrl) -> Result<Vec<i32>> {
    migrate_upto(session, url, i32::MAX).await
}

/// Applies the migrations up to and including `version` (tests use it to make a keyspace
/// as an older build left it); returns the versions applied.
pub async fn migrate_upto(session: &Session, url: &ScyllaUrl, upto: i32) -> Result<Vec<i32>> {
    let ks = &url.keyspace;
    let replication = if url.replication_class == "SimpleStrategy" {
        format!(
            "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
            url.replication_factor
        )
    } else {
        format!(
            "{{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
            url.replication_factor
        )
    };
    // Schema changes wait for the cluster to agree on the new schema: far slower than a
    // data request, so they get their own timeout rather than `request_timeout`.
    let ddl = |q: String| async move {
        let mut statement = scylla::statement::unprepared::Statement::new(q.clone());
        statement.set_request_timeout(Some(DDL_TIMEOUT));
        session
            .query_unpaged(statement, ())
            .await
            .map_err(|e| unavailable(&format!("migration statement {q:?}"), e))
    };
    ddl(format!(
        "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}"
    ))
    .await?;
    ddl(format!(
        "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations \
         (version int PRIMARY KEY, description text, applied_ms bigint)"
    ))
    .await?;
    let applied: HashSet<i32> = session
        .query_unpaged(format!("SELECT version FROM {ks}.schema_migrations"), ())
        .await
        .map_err(|e| unavailable("reading schema_migrations", e))?
        .into_rows_result()
        .map_err(|e| unavailable("reading schema_migrations", e))?
        .rows::<(i32,)>()
        .map_err(|e| unavailable("reading schema_migrations", e))?
        .map(|r| r.map(|(v,)| v))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| unavailable("reading schema_migrations", e))?;
    let mut done = Vec::new();
    for (version, description, cql) in MIGRATIONS {
        if applied.contains(version) || *version > upto {
            continue;
        }
        for statement in split_statements(cql) {
            match ddl(statement.replace("{keyspace}", ks)).await {
                // An `ADD` that a run stopped before recording its version applied already
                // (Cassandra and ScyllaDB have no `ADD IF NOT EXISTS` in common).
                Err(e) if statement.starts_with("ALTER TABLE") && column_exists(&e) => {
                    tracing::info!(keyspace = %ks, version, "store.migrate: column exists already");
                }
                r => {
                    r?;
                }
            }
        }
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.schema_migrations (version, description, applied_ms) VALUES (?, ?, ?)"
                ),
                (*version, *description, now_ms() as i64),
            )
            .await
            .map_err(|e| unavailable("recording migration", e))?;
        tracing::info!(keyspace = %ks, version, description, "store.migrate applied");
        done.push(*version);
    }
    Ok(done)
}

/// Splits a migration file into statements: comments dropped, split at `;`.
fn split_statements(cql: &str) -> Vec<String> {
    let body: String = cql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    body.split(';')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl ScyllaStore {
    /// Connects to the cluster in `url`, migrates the schema and reads (or records) the layout.
    pub async fn open(url: &str, options: StoreOptions) -> Result<ScyllaStore> {
        options.layout.validate()?;
        let url = ScyllaUrl::parse(url)?;
        let session = connect(&url).await?;
        migrate(&session, &url).await?;
        let ks = &url.keyspace;
        let layout = init_layout(&session, ks, options.layout).await?;
        let prep = |q: String| {
            let session = &session;
            async move {
                session
                    .prepare(q.clone())
                    .await
                    .map_err(|e| unavailable(&format!("preparing {q:?}"), e))
            }
        };
        let mut st = Statements {
            insert_timer: prep(format!(
                "INSERT INTO {ks}.timers (slot, bucket, rand, state, created_ms, spec) VALUES (?, ?, ?, 0, ?, ?)"
            ))
            .await?,
            insert_bucket_slot: prep(format!(
                "INSERT INTO {ks}.bucket_slots (bucket, slot) VALUES (?, ?)"
            ))
            .await?,
            insert_bucket_hour: prep(format!(
                "INSERT INTO {ks}.bucket_hours (hour, bucket) VALUES (?, ?)"
            ))
            .await?,
            claim_idempotency: prep(format!(
                "INSERT INTO {ks}.idempotency (key, timer_id, created_ms) VALUES (?, ?, ?) IF NOT EXISTS USING TTL ?"
            ))
            .await?,
            read_idempotency: prep(format!(
                "SELECT timer_id, created_ms FROM {ks}.idempotency WHERE key = ?"
            ))
            .await?,
            release_idempotency: prep(format!(
                "DELETE FROM {ks}.idempotency WHERE key = ? IF timer_id = ? AND confirmed = null"
            ))
            .await?,
            read_key_ttl: prep(format!(
                "SELECT timer_id, TTL(timer_id) FROM {ks}.idempotency WHERE key = ?"
            ))
            .await?,
            confirm_idempotency: prep(format!(
                "UPDATE {ks}.idempotency USING TTL ? SET confirmed = true WHERE key = ? IF timer_id = ?"
            ))
            .await?,
            release_unkept_idempotency: prep(format!(
                "DELETE FROM {ks}.idempotency WHERE key = ? IF timer_id = ? AND kept = null"
            ))
            .await?,
            keep_idempotency: prep(format!(
                "UPDATE {ks}.idempotency USING TTL ? SET kept = true WHERE key = ? IF timer_id = ? AND confirmed = true"
            ))
            .await?,
            mark_withdrawn: prep(format!(
                "INSERT INTO {ks}.withdrawn_keys (key, timer_id) VALUES (?, ?) USING TTL ?"
            ))
            .await?,
            read_withdrawn: prep(format!(
                "SELECT timer_id FROM {ks}.withdrawn_keys WHERE key = ? AND timer_id = ?"
            ))
            .await?,
            delete_timer: prep(format!(
                "DELETE FROM {ks}.timers WHERE slot = ? AND bucket = ? AND rand = ?"
            ))
            .await?,
            get_timer: prep(format!(
                "SELECT state, created_ms, spec FROM {ks}.timers WHERE slot = ? AND bucket = ? AND rand = ?"
            ))
            .await?,
            cancel_timer: prep(format!(
                "UPDATE {ks}.timers SET state = 1 WHERE slot = ? AND bucket = ? AND rand = ? IF EXISTS"
            ))
            .await?,
            bucket_slots: prep(format!(
                "SELECT slot FROM {ks}.bucket_slots WHERE bucket = ? AND slot >= ? AND slot <= ?"
            ))
            .await?,
            bucket_has_slots: prep(format!(
                "SELECT slot FROM {ks}.bucket_slots WHERE bucket = ? LIMIT 1"
            ))
            .await?,
            load_partition: prep(format!(
                "SELECT rand, state, created_ms, spec FROM {ks}.timers WHERE slot = ? AND bucket = ? LIMIT ?"
            ))
            .await?,
            load_partition_after: prep(format!(
                "SELECT rand, state, created_ms, spec FROM {ks}.timers WHERE slot = ? AND bucket = ? AND rand > ? LIMIT ?"
            ))
            .await?,
            next_in_hour: prep(format!(
                "SELECT bucket FROM {ks}.bucket_hours WHERE hour = ? AND bucket >= ? AND bucket <= ? LIMIT 1"
            ))
            .await?,
            delete_partition: prep(format!(
                "DELETE FROM {ks}.timers WHERE slot = ? AND bucket = ?"
            ))
            .await?,
            delete_bucket_slots: prep(format!(
                "DELETE FROM {ks}.bucket_slots WHERE bucket = ? AND slot >= ? AND slot <= ?"
            ))
            .await?,
            delete_bucket_hour: prep(format!(
                "DELETE FROM {ks}.bucket_hours WHERE hour = ? AND bucket = ?"
            ))
            .await?,
            all_low_water: prep(format!("SELECT slot, bucket FROM {ks}.low_water_marks")).await?,
            all_fenced_low_water: prep(format!("SELECT slot, low_water FROM {ks}.slot_epochs"))
                .await?,
            claim_new_slot: prep(format!(
                "INSERT INTO {ks}.slot_epochs (slot, epoch) VALUES (?, ?) IF NOT EXISTS"
            ))
            .await?,
            claim_raise_slot: prep(format!(
                "UPDATE {ks}.slot_epochs SET epoch = ? WHERE slot = ? IF epoch < ?"
            ))
            .await?,
            set_fenced_low_water: prep(format!(
                "UPDATE {ks}.slot_epochs SET low_water = ? WHERE slot = ? IF epoch = ?"
            ))
            .await?,
            init_low_water: prep(format!(
                "INSERT INTO {ks}.low_water_marks (slot, bucket) VALUES (?, ?) IF NOT EXISTS"
            ))
            .await?,
            set_low_water: prep(format!(
                "INSERT INTO {ks}.low_water_marks (slot, bucket) VALUES (?, ?)"
            ))
            .await?,
            get_progress: prep(format!(
                "SELECT first_slot, last_slot, progress FROM {ks}.range_progress"
            ))
            .await?,
            set_progress: prep(format!(
                "INSERT INTO {ks}.range_progress (first_slot, last_slot, progress) VALUES (?, ?, ?)"
            ))
            .await?,
        };
        st.load_partition.set_page_size(5000);
        st.load_partition_after.set_page_size(5000);
        // The writer's clock starts at the latest low-water mark (see the embedded store's
        // `clock_floor`).
        let marks = all_low_water(&session, &st.all_low_water).await?;
        let clock_floor = marks.iter().map(|(_, b)| *b).max().unwrap_or(0);
        super::warn_if_clock_behind(clock_floor, layout);
        st.init_low_water.set_is_idempotent(true);
        for s in [
            &mut st.insert_timer,
            &mut st.insert_bucket_slot,
            &mut st.insert_bucket_hour,
            &mut st.delete_timer,
            &mut st.get_timer,
            &mut st.bucket_slots,
            &mut st.load_partition,
            &mut st.load_partition_after,
            &mut st.delete_partition,
            &mut st.delete_bucket_slots,
            &mut st.delete_bucket_hour,
            &mut st.set_low_water,
            &mut st.get_progress,
            &mut st.set_progress,
        ] {
            // Safe to retry on timeouts: each one writes the same values again.
            s.set_is_idempotent(true);
        }
        let store = ScyllaStore {
            session,
            layout,
            st,
            retention: options.idempotency_retention,
            clock_ms: AtomicU64::new(clock_floor),
            written_slots: Mutex::new(HashSet::new()),
            written_hours: Mutex::new(HashSet::new()),
        };
        // Every slot gets a low-water mark before this node takes a call: a slot without
        // one would start, under whichever member comes to own it, at the bucket of that
        // moment, past timers other members wrote into it before. Only the first writer
        // of each slot's mark wins (IF NOT EXISTS), so nodes starting together agree.
        let marked: HashSet<u32> = marks.iter().map(|(s, _)| *s).collect();
        let now_bucket = layout.bucket_start(now_ms()) as i64;
        let missing: Vec<(i32, i64)> = (0..layout.slots)
            .filter(|s| !marked.contains(s))
            .map(|s| (s as i32, now_bucket))
            .collect();
        if !missing.is_empty() {
            store
                .execute_all(
                    &store.st.init_low_water,
                    missing,
                    "initialising low-water marks",
                )
                .await?;
        }
        Ok(store)
    }

    /// Executes `statement` once (a read or a lightweight transaction) and returns its rows;
    /// an error names `what` was being done.
    async fn rows<V>(
        &self,
        statement: &PreparedStatement,
        values: V,
        what: &str,
    ) -> Result<scylla::response::query_result::QueryRowsResult>
    where
        V: scylla::serialize::row::SerializeRow,
    {
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(|e| unavailable(what, e))?
            .into_rows_result()
            .map_err(|e| unavailable(what, e))
    }

    /// Executes `statement` once per row of values, up to `FAN_OUT` at a time.
    async fn execute_all<V>(
        &self,
        statement: &PreparedStatement,
        rows: Vec<V>,
        what: &str,
    ) -> Result<()>
    where
        V: scylla::serialize::row::SerializeRow + Send + Sync,
    {
        stream::iter(rows.into_iter().map(|values| async move {
            self.session
                .execute_unpaged(statement, values)
                .await
                .map(|_| ())
        }))
        .buffer_unordered(FAN_OUT)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| unavailable(what, e))?;
        Ok(())
    }

    /// Writes timer rows with one request per partition: rows of the same (slot, bucket)
    /// go in one unlogged batch, which the server applies as a single mutation of that
    /// partition (at most `BATCH_ROWS` rows and about `BATCH_BYTES` of specs per batch).
    async fn insert_rows(&self, mut rows: Vec<TimerRow>) -> Result<()> {
        rows.sort_unstable_by_key(|r| (r.0, r.1, r.2));
        let mut groups: Vec<Vec<TimerRow>> = Vec::new();
        let mut bytes = 0;
        for row in rows {
            match groups.last_mut() {
                Some(g)
                    if (g[0].0, g[0].1) == (row.0, row.1)
                        && g.len() < BATCH_ROWS
                        && bytes + row.4.len() <= BATCH_BYTES =>
                {
                    bytes += row.4.len();
                    g.push(row);
                }
                _ => {
                    bytes = row.4.len();
                    groups.push(vec![row]);
                }
            }
        }
        self.execute_groups(&self.st.insert_timer, groups, "writing timers")
            .await
    }

    /// Executes `statement` once per row of each group, a group (rows of one partition)
    /// in one unlogged batch, up to `FAN_OUT` groups at a time.
    async fn execute_groups<V>(
        &self,
        statement: &PreparedStatement,
        groups: Vec<Vec<V>>,
        what: &str,
    ) -> Result<()>
    where
        V: scylla::serialize::row::SerializeRow + Send + Sync,
    {
        stream::iter(groups.into_iter().map(|mut group| async move {
            if group.len() == 1 {
                let row = group.pop().expect("one row");
                return self
                    .session
                    .execute_unpaged(statement, row)
                    .await
                    .map(|_| ());
            }
            let mut batch = Batch::new(BatchType::Unlogged);
            // Its statements are (each writes the same values again when retried).
            batch.set_is_idempotent(statement.get_is_idempotent());
            for _ in &group {
                batch.append_statement(statement.clone());
            }
            self.session.batch(&batch, group).await.map(|_| ())
        }))
        .buffer_unordered(FAN_OUT)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| unavailable(what, e))?;
        Ok(())
    }

    /// Deletes timer rows by key with one request per partition (an unlogged batch of at
    /// most `BATCH_ROWS` row deletes, applied as one mutation), as [`Self::insert_rows`]
    /// writes them.
    async fn delete_rows(&self, mut rows: Vec<(i32, i64, i64)>) -> Result<()> {
        rows.sort_unstable();
        let mut groups: Vec<Vec<(i32, i64, i64)>> = Vec::new();
        for row in rows {
            match groups.last_mut() {
                Some(g) if (g[0].0, g[0].1) == (row.0, row.1) && g.len() < BATCH_ROWS => {
                    g.push(row)
                }
                _ => groups.push(vec![row]),
            }
        }
        self.execute_groups(&self.st.delete_timer, groups, "deleting timers")
            .await
    }

    /// The CQL primary key of a timer's row: (slot, bucket, rand).
    fn row_key(&self, id: TimerId) -> (i32, i64, i64) {
        (
            self.layout.slot_of(id.rand) as i32,
            id.bucket_ms as i64,
            id.rand as i64,
        )
    }

    fn now(&self) -> u64 {
        let now = now_ms();
        self.clock_ms.fetch_max(now, Ordering::SeqCst).max(now)
    }

    /// Writes the index rows for these (bucket, slot) pairs that this process has not
    /// written yet.
    async fn write_index(&self, pairs: impl Iterator<Item = (u64, u32)>) -> Result<()> {
        let mut slots_new = Vec::new();
        let mut hours_new = Vec::new();
        {
            let mut ws = self.written_slots.lock().expect("lock");
            let mut wh = self.written_hours.lock().expect("lock");
            if ws.len() > INDEX_CACHE_MAX {
                ws.clear();
            }
            if wh.len() > INDEX_CACHE_MAX {
                wh.clear();
            }
            for (bucket, slot) in pairs {
                if !ws.contains(&(bucket, slot)) {
                    slots_new.push((bucket, slot));
                }
                let h = (bucket / HOUR_MS, bucket);
                if !wh.contains(&h) && !hours_new.contains(&h) {
                    hours_new.push(h);
                }
            }
        }
        slots_new.sort_unstable();
        slots_new.dedup();
        let hours: Vec<(i64, i64)> = hours_new
            .iter()
            .map(|&(h, b)| (h as i64, b as i64))
            .collect();
        self.execute_all(&self.st.insert_bucket_hour, hours, "writing bucket index")
            .await?;
        let slots: Vec<(i64, i32)> = slots_new
            .iter()
            .map(|&(b, s)| (b as i64, s as i32))
            .collect();
        self.execute_all(&self.st.insert_bucket_slot, slots, "writing bucket index")
            .await?;
        self.written_slots.lock().expect("lock").extend(slots_new);
        self.written_hours.lock().expect("lock").extend(hours_new);
        Ok(())
    }

    fn decode(&self, id: TimerId, state: i8, created_ms: i64, spec: &[u8]) -> Result<StoredTimer> {
        let spec =
            TimerSpec::from_bytes(spec).map_err(|e| Error::Corrupt(format!("timer {id}: {e}")))?;
        Ok(StoredTimer {
            timer: Timer {
                id,
                created_ms: created_ms as u64,
                spec,
            },
            state: if state == 1 {
                StoredState::Cancelled
            } else {
                StoredState::Pending
            },
        })
    }

    /// Claims `key` for `id`, created at `created_ms` (lightweight transaction, alive for
    /// `ttl`) unless a timer holds it already; returns the holder. That is `id` itself also
    /// when this row was claimed before, by the loader (`resolve_keys`) or an earlier
    /// attempt whose answer was lost.
    async fn claim_key(
        &self,
        key: &str,
        id: TimerId,
        created_ms: u64,
        ttl: Duration,
    ) -> Result<TimerId> {
        let ttl = ttl.as_millis().div_ceil(1000).clamp(1, i32::MAX as u128) as i32;
        let r = self
            .rows(
                &self.st.claim_idempotency,
                (key, id.to_bytes().to_vec(), created_ms as i64, ttl),
                "claiming idempotency key",
            )
            .await?;
        let (applied, existing) = lwt_outcome(&r, "timer_id")?;
        if applied {
            return Ok(id);
        }
        id_from_blob(existing.as_ref().and_then(|v| v.as_blob()), key)
    }

    /// [`Self::claim_key`], tried again on errors until its outcome is known (a claim whose
    /// answer was lost may have been applied: the next attempt then finds `id`), up to
    /// `CLAIM_ATTEMPTS` times.
    async fn claim_key_settled(
        &self,
        key: &str,
        id: TimerId,
        created_ms: u64,
        ttl: Duration,
    ) -> Result<TimerId> {
        let mut pause = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let claimed = match self.claim_key(key, id, created_ms, ttl).await {
                // Applied, but the answer does not reach this node.
                Ok(holder) => crate::failpoint::hit_async("scylla.claim_answer_lost")
                    .await
                    .map(|()| holder),
                Err(e) => Err(e),
            };
            match claimed {
                Ok(holder) => return Ok(holder),
                Err(e) if attempt >= CLAIM_ATTEMPTS => return Err(e),
                Err(e) => {
                    tracing::warn!(key, attempt, error = %e, "claiming an idempotency key failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 3;
                    attempt += 1;
                }
            }
        }
    }

    /// The timer holding `key` and the creation time of its claim, read at the store's
    /// consistency: a claim that completed is seen; one still in progress may not be, and
    /// the caller then claims, which finishes or loses to it.
    async fn key_holder(&self, key: &str) -> Result<Option<(TimerId, u64)>> {
        let rows = self
            .rows(&self.st.read_idempotency, (key,), "reading idempotency key")
            .await?;
        rows.maybe_first_row::<(Vec<u8>, i64)>()
            .map_err(|e| unavailable("reading idempotency key", e))?
            .map(|(b, created)| Ok((id_from_blob(Some(&b), key)?, created as u64)))
            .transpose()
    }

    /// Whether a member withdrew `id` under `key` within the retention ([`TimerStore::abandon`]
    /// records it before it releases the key).
    async fn is_withdrawn(&self, key: &str, id: TimerId) -> Result<bool> {
        let what = "reading withdrawn keys";
        let rows = self
            .rows(&self.st.read_withdrawn, (key, id.to_bytes().to_vec()), what)
            .await?;
        Ok(rows.rows_num() > 0)
    }

    /// Releases `key`, confirmed for `id` by the caller, unless `id`'s withdraw found the
    /// confirmation first and kept the timer (one lightweight transaction against the
    /// withdraw's `kept`): `true` if released; `false` if kept, and `id` is the answer.
    async fn release_unkept(&self, key: &str, id: TimerId) -> Result<bool> {
        let what = "releasing idempotency key";
        let r = self
            .rows(
                &self.st.release_unkept_idempotency,
                (key, id.to_bytes().to_vec()),
                what,
            )
            .await?;
        let (applied, held) = lwt_outcome_of(&r, &["timer_id", "kept"])?;
        let holder = held[0].as_ref().and_then(|v| v.as_blob());
        let kept = held[1].as_ref().and_then(|v| v.as_boolean());
        Ok(applied || holder != Some(&id.to_bytes().to_vec()) || kept != Some(true))
    }

    /// The remaining TTL of `key`'s claim, if it names `id` (a cell written beside the
    /// claim must not outlive it: a lone cell keeps the key's row, and so refuses its
    /// later claims, past the retention).
    async fn claim_ttl(&self, key: &str, id: TimerId) -> Result<Option<i32>> {
        let what = "reading idempotency key";
        let rows = self.rows(&self.st.read_key_ttl, (key,), what).await?;
        let Some((holder, ttl)) = rows
            .maybe_first_row::<(Option<Vec<u8>>, Option<i32>)>()
            .map_err(|e| unavailable(what, e))?
        else {
            return Ok(None);
        };
        if holder.as_deref() != Some(id.to_bytes().as_slice()) {
            return Ok(None);
        }
        Ok(Some(ttl.map_or(
            self.retention.as_secs().clamp(1, i32::MAX as u64) as i32,
            |t| (t - 1).max(1),
        )))
    }

    /// Releases `key` if it names `id` and no repeated call confirmed the claim (one
    /// lightweight transaction against the confirmation's); whether it did.
    async fn release_unconfirmed(&self, key: &str, id: TimerId) -> Result<ReleaseOutcome> {
        let r = self
            .rows(
                &self.st.release_idempotency,
                (key, id.to_bytes().to_vec()),
                "releasing idempotency key",
            )
            .await?;
        let (applied, held) = lwt_outcome_of(&r, &["timer_id", "confirmed"])?;
        let holder = held[0].as_ref().and_then(|v| v.as_blob());
        let confirmed = held[1].as_ref().and_then(|v| v.as_boolean());
        Ok(
            if !applied && holder == Some(&id.to_bytes().to_vec()) && confirmed == Some(true) {
                ReleaseOutcome::Confirmed
            } else {
                ReleaseOutcome::Released
            },
        )
    }

    /// Marks `key`'s confirmed claim by `id` kept (alive for `ttl` seconds, no longer than
    /// the claim): the timer's withdraw, finding the claim confirmed, keeps the timer, and a
    /// repeated call answers with `id` only once this is set. Refused (`false`) once the
    /// key no longer names `id`: a repeated call that found `id` withdrawn released it
    /// first (one lightweight transaction against that release, `IF kept = null`).
    async fn keep(&self, key: &str, id: TimerId, ttl: i32) -> Result<bool> {
        let what = "keeping a confirmed idempotency key";
        let r = self
            .rows(
                &self.st.keep_idempotency,
                (ttl, key, id.to_bytes().to_vec()),
                what,
            )
            .await?;
        Ok(lwt_outcome(&r, "timer_id")?.0)
    }

    /// Which of `timers` (loaded from one bucket) may fire, and which were superseded.
    ///
    /// A keyed row is superseded when its key belongs to another timer whose claim was made
    /// before this row was written or within `CLAIM_RACE_WINDOW` (or the retention, if
    /// shorter) after it: the row then lost a race, or its call was cut off between the row
    /// and the claim and retried. A holder claimed later than that came after this row's own
    /// claim expired, and the row fires. A key nobody holds is claimed here for the first
    /// row still inside its retention (with the rest of it as TTL), so a writer's claim
    /// arriving later loses to it or finds its own id. Rows past their retention with no
    /// holder fire as they are.
    ///
    /// A row claimed here may be one a member is withdrawing: it released the key, and has
    /// not cancelled the row yet (or died before it did). The withdraw records the row in
    /// `withdrawn_keys` before it releases the key, so a claim that succeeded after that
    /// release finds the record: the key is released again (unless a repeated call
    /// confirmed it meanwhile; that call finds the record too, and releases it), the row is
    /// superseded, and the key's other rows are left unclaimed (they fire as they are).
    async fn resolve_keys(&self, timers: Vec<Timer>) -> Result<(Vec<Timer>, Vec<TimerId>)> {
        let mut by_key: HashMap<String, Vec<(TimerId, u64)>> = HashMap::new();
        for t in &timers {
            if let Some(k) = &t.spec.idempotency_key {
                by_key
                    .entry(k.clone())
                    .or_default()
                    .push((t.id, t.created_ms));
            }
        }
        if by_key.is_empty() {
            return Ok((timers, Vec::new()));
        }
        let now = self.now();
        let retention_ms = self.retention.as_millis() as u64;
        let race_window_ms = retention_ms.min(CLAIM_RACE_WINDOW.as_millis() as u64);
        let verdicts: Vec<Vec<TimerId>> = stream::iter(by_key.into_iter().map(
            |(key, mut rows)| async move {
                rows.sort_unstable_by_key(|&(id, created)| (created, id));
                let holder = match self.key_holder(&key).await {
                    Ok(h) => h,
                    Err(e @ Error::Corrupt(_)) => {
                        tracing::warn!(key, error = %e, "cannot read an idempotency key; firing its timers");
                        return Ok(Vec::new());
                    }
                    Err(e) => return Err(e),
                };
                let mut withdrawn: Vec<TimerId> = Vec::new();
                let mut holder = holder;
                if holder.is_none() {
                    // The first row still inside its retention, unless it was withdrawn.
                    for &(id, created) in &rows {
                        if created + retention_ms <= now {
                            continue;
                        }
                        let ttl = Duration::from_millis(created + retention_ms - now);
                        let won = self.claim_key(&key, id, created, ttl).await?;
                        if won != id {
                            holder = self.key_holder(&key).await?.or(Some((won, 0)));
                            break;
                        }
                        if !self.is_withdrawn(&key, id).await? {
                            holder = Some((id, created));
                            break;
                        }
                        self.release_unconfirmed(&key, id).await?;
                        withdrawn.push(id);
                        // No later row of the key is claimed in this pass: one may be a
                        // retry's row whose call lost the key to this one and deleted it,
                        // held then only here. Unclaimed, they fire as they are.
                        break;
                    }
                }
                for id in &withdrawn {
                    tracing::info!(timer_id = %id, key,
                        "not firing a stored timer withdrawn by its writer (its idempotency key was released for a retry)");
                    m::key_loser_dropped();
                }
                let Some((holder, claimed_ms)) = holder else {
                    return Ok(withdrawn);
                };
                let superseded: Vec<TimerId> = rows
                    .iter()
                    .filter(|&&(id, created)| {
                        id != holder
                            && claimed_ms < created + race_window_ms
                            && !withdrawn.contains(&id)
                    })
                    .map(|&(id, _)| id)
                    .collect();
                for id in &superseded {
                    tracing::info!(timer_id = %id, holder = %holder, key,
                        "not firing a stored timer whose idempotency key belongs to another timer");
                    m::key_loser_dropped();
                }
                withdrawn.extend(superseded);
                Ok::<_, Error>(withdrawn)
            },
        ))
        .buffer_unordered(FAN_OUT)
        .try_collect()
        .await?;
        let superseded: HashSet<TimerId> = verdicts.into_iter().flatten().collect();
        let kept = timers
            .into_iter()
            .filter(|t| !superseded.contains(&t.id))
            .collect();
        Ok((kept, superseded.into_iter().collect()))
    }

    /// Removes the row of a call that lost its idempotency key, trying a few times; a row
    /// left behind is superseded when its bucket loads (while its key is remembered).
    async fn delete_superseded(&self, id: TimerId) {
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=CLAIM_ATTEMPTS {
            match self
                .session
                .execute_unpaged(&self.st.delete_timer, self.row_key(id))
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(timer_id = %id, attempt, error = %e,
                        "could not remove the row of a repeated idempotency key");
                    tokio::time::sleep(pause).await;
                    pause *= 3;
                }
            }
        }
    }

    /// Raises `slot`'s epoch to `epoch` unless it holds that one or a higher one already.
    async fn claim_slot(&self, slot: u32, epoch: u64) -> Result<()> {
        let what = "claiming slot";
        let fenced = |held: i64| {
            Err(Error::Fenced(format!(
                "slot {slot} is held under epoch {held}, newer than {epoch}"
            )))
        };
        // Each round loses only to another claim, which raised the epoch meanwhile.
        for _ in 0..8 {
            let r = self
                .rows(&self.st.claim_new_slot, (slot as i32, epoch as i64), what)
                .await?;
            let (applied, held) = lwt_outcome(&r, "epoch")?;
            let held = held.as_ref().and_then(|v| v.as_bigint());
            match (applied, held) {
                (true, _) => return Ok(()),
                (false, Some(h)) if h == epoch as i64 => return Ok(()),
                (false, Some(h)) if h > epoch as i64 => return fenced(h),
                _ => {}
            }
            let r = self
                .rows(
                    &self.st.claim_raise_slot,
                    (epoch as i64, slot as i32, epoch as i64),
                    what,
                )
                .await?;
            let (applied, held) = lwt_outcome(&r, "epoch")?;
            match (applied, held.as_ref().and_then(|v| v.as_bigint())) {
                (true, _) => return Ok(()),
                (false, Some(h)) if h == epoch as i64 => return Ok(()),
                (false, Some(h)) if h > epoch as i64 => return fenced(h),
                // A row without an epoch (never claimed), or a claim that raced: again.
                _ => {}
            }
        }
        Err(Error::Unavailable(format!(
            "scylla {what} {slot}: no outcome after 8 attempts"
        )))
    }

    /// Slots of `range` that have rows in `bucket`.
    async fn slots_in(&self, range: SlotRange, bucket: u64) -> Result<Vec<u32>> {
        let rows = self
            .rows(
                &self.st.bucket_slots,
                (bucket as i64, range.first as i32, range.last as i32),
                "reading bucket index",
            )
            .await?;
        rows.rows::<(i32,)>()
            .map_err(|e| unavailable("reading bucket index", e))?
            .map(|r| r.map(|(s,)| s as u32))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| unavailable("reading bucket index", e))
    }
}

/// Every (slot, low-water mark) recorded.
async fn all_low_water(session: &Session, st: &PreparedStatement) -> Result<Vec<(u32, u64)>> {
    let pager = session
        .execute_iter(st.clone(), ())
        .await
        .map_err(|e| unavailable("reading low-water marks", e))?;
    let rows: Vec<(i32, i64)> = pager
        .rows_stream::<(i32, i64)>()
        .map_err(|e| unavailable("reading low-water marks", e))?
        .try_collect()
        .await
        .map_err(|e| unavailable("reading low-water marks", e))?;
    Ok(rows
        .into_iter()
        .map(|(s, b)| (s as u32, b as u64))
        .collect())
}

/// A timer id stored under an idempotency key.
fn id_from_blob(b: Option<&Vec<u8>>, key: &str) -> Result<TimerId> {
    let b = b
        .filter(|b| b.len() == 16)
        .ok_or_else(|| Error::Corrupt(format!("idempotency key {key:?}: bad timer id")))?;
    Ok(TimerId {
        bucket_ms: u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
        rand: u64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
    })
}

/// `[applied]` of a lightweight transaction, and the named column of the existing row when
/// it was not applied (servers put the existing row's columns in their own order).
fn lwt_outcome(
    r: &scylla::response::query_result::QueryRowsResult,
    column: &str,
) -> Result<(bool, Option<CqlValue>)> {
    let (applied, mut values) = lwt_outcome_of(r, &[column])?;
    Ok((applied, values.pop().flatten()))
}

/// As [`lwt_outcome`], for several columns (in the order of `columns`).
fn lwt_outcome_of(
    r: &scylla::response::query_result::QueryRowsResult,
    columns: &[&str],
) -> Result<(bool, Vec<Option<CqlValue>>)> {
    let mut row = r
        .first_row::<Row>()
        .map_err(|e| unavailable("reading transaction outcome", e))?;
    let applied = row
        .columns
        .first()
        .and_then(|c| c.as_ref())
        .and_then(|v| v.as_boolean())
        .ok_or_else(|| Error::Internal("transaction outcome without [applied]".into()))?;
    let values = columns
        .iter()
        .map(|column| {
            let index = r.column_specs().iter().position(|c| c.name() == *column);
            index.and_then(|i| row.columns.get_mut(i).and_then(Option::take))
        })
        .collect();
    Ok((applied, values))
}

/// Whether a failed `ALTER TABLE … ADD` says the column exists (Cassandra: "… already
/// exists"; ScyllaDB: "… conflicts with an existing column").
fn column_exists(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("already exist") || text.contains("conflicts with an existing column")
}

async fn init_layout(session: &Session, ks: &str, requested: Layout) -> Result<Layout> {
    let bytes = postcard::to_allocvec(&requested).map_err(|e| Error::Internal(e.to_string()))?;
    // First writer wins; everyone then reads the same layout.
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.meta (name, value) VALUES ('layout', ?) IF NOT EXISTS"),
            (bytes,),
        )
        .await
        .map_err(|e| unavailable("recording layout", e))?;
    let stored = session
        .query_unpaged(
            format!("SELECT value FROM {ks}.meta WHERE name = 'layout'"),
            (),
        )
        .await
        .map_err(|e| unavailable("reading layout", e))?
        .into_rows_result()
        .map_err(|e| unavailable("reading layout", e))?
        .single_row::<(Vec<u8>,)>()
        .map_err(|e| unavailable("reading layout", e))?
        .0;
    let stored: Layout =
        postcard::from_bytes(&stored).map_err(|e| Error::Corrupt(format!("layout record: {e}")))?;
    if stored != requested {
        tracing::warn!(
            stored_slots = stored.slots,
            stored_bucket_ms = stored.bucket_ms,
            "store.open: keyspace was created with another layout; keeping the stored one"
        );
    }
    Ok(stored)
}

#[async_trait]
impl TimerStore for ScyllaStore {
    fn layout(&self) -> Layout {
        self.layout
    }

    async fn insert(&self, timers: &[TimerSpec], homing: &Homing) -> Result<Vec<Result<Inserted>>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let now = self.now();
        let min_bucket = self.layout.bucket_start(now) + self.layout.bucket_ms;
        let ids: Vec<TimerId> = timers
            .iter()
            .map(|t| {
                homing.new_id(
                    self.layout,
                    self.layout.bucket_start(t.fire_at_ms).max(min_bucket),
                )
            })
            .collect();
        let encoded: Vec<Vec<u8>> = timers.iter().map(|t| t.to_bytes()).collect::<Result<_>>()?;
        let layout = self.layout;
        self.write_index(ids.iter().map(|id| (id.bucket_ms, layout.slot_of(id.rand))))
            .await?;
        crate::failpoint::hit_async("scylla.between_index_and_rows").await?;
        let rows: Vec<TimerRow> = ids
            .iter()
            .zip(encoded)
            .map(|(id, spec)| {
                let (slot, bucket, rand) = self.row_key(*id);
                (slot, bucket, rand, now as i64, spec)
            })
            .collect();
        self.insert_rows(rows).await?;
        // Idempotency keys: the timer rows are written first, then each key is claimed with
        // a lightweight transaction (distinct keys concurrently; a key repeated inside the
        // batch goes to its first item). A call that loses a key removes its row and
        // returns the first id; if that removal fails, or the call dies between its rows and
        // its claims, the leftover row is dropped when its bucket loads (`resolve_keys`).
        let mut out: Vec<Result<Inserted>> = ids
            .iter()
            .map(|&id| Ok(Inserted { id, created: true }))
            .collect();
        let mut first_of_key: HashMap<&str, usize> = HashMap::new();
        for (i, t) in timers.iter().enumerate() {
            if let Some(key) = &t.idempotency_key {
                first_of_key.entry(key.as_str()).or_insert(i);
            }
        }
        let to_claim: Vec<(String, TimerId)> = first_of_key
            .iter()
            .map(|(&key, &i)| (key.to_owned(), ids[i]))
            .collect();
        let claims: HashMap<String, Result<TimerId>> =
            stream::iter(to_claim.into_iter().map(|(key, id)| async move {
                let claimed = match crate::failpoint::hit_async("scylla.before_claim").await {
                    Ok(()) => self.claim_key_settled(&key, id, now, self.retention).await,
                    Err(e) => Err(e),
                };
                (key, claimed)
            }))
            .buffer_unordered(FAN_OUT)
            .collect()
            .await;
        for (i, t) in timers.iter().enumerate() {
            let Some(key) = &t.idempotency_key else {
                continue;
            };
            let id = ids[i];
            out[i] = match &claims[key] {
                Ok(owner) if *owner == id => continue,
                Ok(owner) => {
                    self.delete_superseded(id).await;
                    Ok(Inserted {
                        id: *owner,
                        created: false,
                    })
                }
                Err(e) => Err(Error::Unavailable(format!(
                    "timer stored but its idempotency key {key:?} could not be claimed ({e}); \
                     retry the call with the same key"
                ))),
            };
        }
        m::store_op("insert", started.elapsed());
        Ok(out)
    }

    async fn get(&self, id: TimerId) -> Result<Option<StoredTimer>> {
        let started = Instant::now();
        let rows = self
            .rows(&self.st.get_timer, self.row_key(id), "reading timer")
            .await?;
        let row = rows
            .maybe_first_row::<(i8, i64, Vec<u8>)>()
            .map_err(|e| unavailable("reading timer", e))?;
        m::store_op("get", started.elapsed());
        row.map(|(state, created, spec)| self.decode(id, state, created, &spec))
            .transpose()
    }

    async fn cancel(&self, id: TimerId) -> Result<CancelOutcome> {
        match self.get(id).await? {
            None => return Ok(CancelOutcome::NotFound),
            Some(t) if t.state == StoredState::Cancelled => {
                return Ok(CancelOutcome::AlreadyCancelled);
            }
            Some(_) => {}
        }
        // IF EXISTS: a plain UPDATE would recreate a row whose bucket was just deleted.
        let r = self
            .rows(&self.st.cancel_timer, self.row_key(id), "cancelling timer")
            .await?;
        let (applied, _) = lwt_outcome(&r, "state")?;
        Ok(if applied {
            CancelOutcome::Cancelled
        } else {
            CancelOutcome::NotFound
        })
    }

    async fn abandon(&self, id: TimerId, key: Option<&str>) -> Result<Abandoned> {
        // The key first: stopped between the two (a crash, a failed call), the retry then
        // stores the timer anew, and the old row is not fired by a load that claims its key
        // (the loader finds it recorded as withdrawn). The other order would leave a retry
        // answered with a cancelled row that never fires.
        // The release applies only while no repeated call confirmed the claim (one
        // lightweight transaction against the confirmation's, so exactly one wins).
        if let Some(key) = key {
            // Recorded before the release: a loader that read the row still pending, and
            // claims the released key for it again, or a repeated call that then confirms
            // that claim, finds the record and releases the key again.
            let ttl = self.retention.as_secs().clamp(1, i32::MAX as u64) as i32;
            self.session
                .execute_unpaged(&self.st.mark_withdrawn, (key, id.to_bytes().to_vec(), ttl))
                .await
                .map_err(|e| unavailable("recording a withdrawn key", e))?;
            if self.release_unconfirmed(key, id).await? == ReleaseOutcome::Confirmed {
                let kept = match self.claim_ttl(key, id).await {
                    Ok(Some(ttl)) => self.keep(key, id, ttl).await,
                    Ok(None) => Ok(false),
                    Err(e) => Err(e),
                };
                match kept {
                    Ok(true) => return Ok(Abandoned::Kept),
                    // The repeated call that confirmed the claim found the record first
                    // and released the key (its caller retries): withdrawn after all.
                    Ok(false) => {}
                    // Unknown: a repeated call may have answered with the id. Kept, at
                    // worst a duplicate (the call may have released the key instead).
                    Err(e) => {
                        tracing::warn!(key, timer_id = %id, error = %e, "could not mark a confirmed idempotency key kept; keeping its timer");
                        return Ok(Abandoned::Kept);
                    }
                }
            }
        }
        crate::failpoint::hit_async("scylla.between_key_release_and_cancel").await?;
        // Then the row, so a range that loads it later does not fire it as well.
        self.session
            .execute_unpaged(&self.st.cancel_timer, self.row_key(id))
            .await
            .map_err(|e| unavailable("withdrawing timer", e))?;
        Ok(Abandoned::Withdrawn)
    }

    async fn confirm_key(&self, key: &str, id: TimerId) -> Result<bool> {
        let what = "confirming idempotency key";
        // The confirmation lives no longer than the claim.
        let Some(ttl) = self.claim_ttl(key, id).await? else {
            return Ok(false);
        };
        let r = self
            .rows(
                &self.st.confirm_idempotency,
                (ttl, key, id.to_bytes().to_vec()),
                what,
            )
            .await?;
        if !lwt_outcome(&r, "timer_id")?.0 {
            return Ok(false);
        }
        // A withdraw records its timer before it releases the key, so a confirmation that
        // came after a release (the key claimed for the row again by a loader) finds the
        // record. The key is then released, unless the withdraw, finding the claim
        // confirmed, kept the timer first (one lightweight transaction each).
        if self.is_withdrawn(key, id).await? {
            if self.release_unkept(key, id).await? {
                tracing::info!(key, timer_id = %id, "a repeated idempotency key names a timer its writer withdrew; released the key");
                return Ok(false);
            }
            return Ok(true);
        }
        // No record yet: no release came before the confirmation, so a withdraw from now
        // on finds the claim confirmed. The answer is the id once the key says kept, which
        // a repeated call that finds a record written meanwhile cannot undo (its release
        // is `IF kept = null`); refused, such a call released the key first.
        self.keep(key, id, ttl).await
    }

    async fn load_page(
        &self,
        slots: SlotRange,
        bucket_ms: u64,
        after: Option<TimerId>,
        limit: usize,
    ) -> Result<LoadedPage> {
        // Order: slot, then `rand` as the signed CQL bigint it is stored as.
        let started = Instant::now();
        let limit = limit.max(1);
        let layout = self.layout;
        let from = after.map(|a| (layout.slot_of(a.rand), a.rand as i64));
        let mut present = self.slots_in(slots, bucket_ms).await?;
        present.sort_unstable();
        present.retain(|s| from.is_none_or(|(f, _)| *s >= f));
        let st = &self.st;
        let fetch_limit = (limit + 1).min(i32::MAX as usize) as i32;
        // Partitions are read a few at a time, in slot order, each up to one page; reading
        // stops once the page is full (the rest are dropped unread).
        let mut parts = stream::iter(present.into_iter().map(|slot| async move {
            let pager = match from.filter(|(f, _)| *f == slot) {
                Some((_, r)) => {
                    self.session
                        .execute_iter(
                            st.load_partition_after.clone(),
                            (slot as i32, bucket_ms as i64, r, fetch_limit),
                        )
                        .await
                }
                None => {
                    self.session
                        .execute_iter(
                            st.load_partition.clone(),
                            (slot as i32, bucket_ms as i64, fetch_limit),
                        )
                        .await
                }
            }
            .map_err(|e| unavailable("loading bucket", e))?;
            pager
                .rows_stream::<(i64, i8, i64, Vec<u8>)>()
                .map_err(|e| unavailable("loading bucket", e))?
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| unavailable("loading bucket", e))
        }))
        .buffered(LOAD_FAN_OUT);
        let mut rows: Vec<(i64, i8, i64, Vec<u8>)> = Vec::new();
        let mut full = false;
        while let Some(part) = parts.try_next().await? {
            let room = limit - rows.len();
            if part.len() > room {
                rows.extend(part.into_iter().take(room));
                full = true;
                break;
            }
            rows.extend(part);
            if rows.len() >= limit {
                full = true;
                break;
            }
        }
        drop(parts);
        let mut out = LoadedPage::default();
        if full {
            out.next = rows.last().map(|r| TimerId {
                bucket_ms,
                rand: r.0 as u64,
            });
        }
        for (rand, state, created, spec) in rows {
            let id = TimerId {
                bucket_ms,
                rand: rand as u64,
            };
            debug_assert!(slots.contains(layout.slot_of(id.rand)));
            out.rows
                .add(id, self.decode(id, state, created, &spec), &spec);
        }
        (out.rows.timers, out.rows.superseded) = self.resolve_keys(out.rows.timers).await?;
        m::store_op("load_page", started.elapsed());
        Ok(out)
    }

    async fn next_bucket(
        &self,
        _slots: SlotRange,
        from_ms: u64,
        until_ms: u64,
    ) -> Result<Option<u64>> {
        // The hour index is shared by all slot ranges, so the answer may be a bucket that
        // only other ranges use: allowed, the load then finds nothing for this range.
        let started = Instant::now();
        let mut hour = from_ms / HOUR_MS;
        while hour * HOUR_MS <= until_ms {
            let rows = self
                .rows(
                    &self.st.next_in_hour,
                    (hour as i64, from_ms as i64, until_ms as i64),
                    "reading bucket index",
                )
                .await?;
            if let Some((b,)) = rows
                .maybe_first_row::<(i64,)>()
                .map_err(|e| unavailable("reading bucket index", e))?
            {
                m::store_op("next_bucket", started.elapsed());
                return Ok(Some(b as u64));
            }
            hour += 1;
        }
        m::store_op("next_bucket", started.elapsed());
        Ok(None)
    }

    async fn delete_bucket(
        &self,
        slots: SlotRange,
        bucket_ms: u64,
        only: Option<&[TimerId]>,
    ) -> Result<()> {
        let started = Instant::now();
        let st = &self.st;
        match only {
            None => {
                let present = self.slots_in(slots, bucket_ms).await?;
                let partitions: Vec<(i32, i64)> = present
                    .iter()
                    .map(|&s| (s as i32, bucket_ms as i64))
                    .collect();
                self.execute_all(&st.delete_partition, partitions, "deleting bucket")
                    .await?;
            }
            Some(ids) => {
                let rows = ids
                    .iter()
                    .filter(|id| {
                        id.bucket_ms == bucket_ms && slots.contains(self.layout.slot_of(id.rand))
                    })
                    .map(|&id| self.row_key(id))
                    .collect();
                self.delete_rows(rows).await?;
            }
        }
        // Index rows go after the data, so an interrupted delete is simply done again.
        crate::failpoint::hit_async("scylla.between_partition_and_index_delete").await?;
        self.session
            .execute_unpaged(
                &st.delete_bucket_slots,
                (bucket_ms as i64, slots.first as i32, slots.last as i32),
            )
            .await
            .map_err(|e| unavailable("deleting bucket index", e))?;
        let others = self
            .rows(
                &st.bucket_has_slots,
                (bucket_ms as i64,),
                "reading bucket index",
            )
            .await?
            .rows_num();
        if others == 0 {
            self.session
                .execute_unpaged(
                    &st.delete_bucket_hour,
                    ((bucket_ms / HOUR_MS) as i64, bucket_ms as i64),
                )
                .await
                .map_err(|e| unavailable("deleting bucket index", e))?;
        }
        m::store_op("delete_bucket", started.elapsed());
        Ok(())
    }

    async fn low_water_mark(&self, slots: SlotRange) -> Result<Option<u64>> {
        // Per slot, the later of the plain mark and the mark its owner wrote under its
        // epoch: both were true when written, and marks only move forward.
        let mut marks: HashMap<u32, u64> = all_low_water(&self.session, &self.st.all_low_water)
            .await?
            .into_iter()
            .filter(|(s, _)| slots.contains(*s))
            .collect();
        let pager = self
            .session
            .execute_iter(self.st.all_fenced_low_water.clone(), ())
            .await
            .map_err(|e| unavailable("reading fenced low-water marks", e))?;
        let fenced: Vec<(i32, Option<i64>)> = pager
            .rows_stream::<(i32, Option<i64>)>()
            .map_err(|e| unavailable("reading fenced low-water marks", e))?
            .try_collect()
            .await
            .map_err(|e| unavailable("reading fenced low-water marks", e))?;
        for (slot, mark) in fenced {
            if let Some(mark) = mark
                && slots.contains(slot as u32)
            {
                let e = marks.entry(slot as u32).or_insert(mark as u64);
                *e = (*e).max(mark as u64);
            }
        }
        Ok(marks.into_values().min())
    }

    async fn claim_slots(&self, slots: SlotRange, epoch: u64) -> Result<()> {
        let started = Instant::now();
        stream::iter((slots.first..=slots.last).map(|slot| self.claim_slot(slot, epoch)))
            .buffer_unordered(FAN_OUT)
            .try_collect::<Vec<()>>()
            .await?;
        m::store_op("claim_slots", started.elapsed());
        Ok(())
    }

    async fn set_low_water_mark_fenced(
        &self,
        slots: SlotRange,
        bucket_ms: u64,
        epoch: u64,
    ) -> Result<()> {
        let started = Instant::now();
        let st = &self.st.set_fenced_low_water;
        let outcomes: Vec<(u32, bool, Option<CqlValue>)> =
            stream::iter((slots.first..=slots.last).map(|slot| async move {
                let r = self
                    .rows(
                        st,
                        (bucket_ms as i64, slot as i32, epoch as i64),
                        "writing fenced low-water marks",
                    )
                    .await?;
                let (applied, holder) = lwt_outcome(&r, "epoch")?;
                Ok::<_, Error>((slot, applied, holder))
            }))
            .buffer_unordered(FAN_OUT)
            .try_collect()
            .await?;
        m::store_op("set_low_water_mark_fenced", started.elapsed());
        let refused: Vec<String> = outcomes
            .iter()
            .filter(|(_, applied, _)| !applied)
            .map(
                |(slot, _, holder)| match holder.as_ref().and_then(|v| v.as_bigint()) {
                    Some(e) => format!("slot {slot} (epoch {e})"),
                    None => format!("slot {slot} (never claimed)"),
                },
            )
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(Error::Fenced(format!(
            "low-water mark {bucket_ms} under epoch {epoch} refused for {}",
            refused.join(", ")
        )))
    }

    async fn set_low_water_mark(&self, slots: SlotRange, bucket_ms: u64) -> Result<()> {
        let rows: Vec<(i32, i64)> = (slots.first..=slots.last)
            .map(|slot| (slot as i32, bucket_ms as i64))
            .collect();
        self.execute_all(&self.st.set_low_water, rows, "writing low-water marks")
            .await
    }

    async fn progress(&self, slots: SlotRange) -> Result<Vec<(SlotRange, Progress)>> {
        let started = Instant::now();
        // The table holds one small row per slot range ever owned (hundreds at most): read
        // it whole and keep the overlapping ones.
        let rows = self
            .rows(&self.st.get_progress, (), "reading range progress")
            .await?;
        let mut out = Vec::new();
        for row in rows
            .rows::<(i32, i32, Vec<u8>)>()
            .map_err(|e| unavailable("reading range progress", e))?
        {
            let (first, last, b) = row.map_err(|e| unavailable("reading range progress", e))?;
            let r = SlotRange {
                first: first as u32,
                last: last as u32,
            };
            if r.first <= slots.last && slots.first <= r.last {
                out.push((r, Progress::from_bytes(&b)?));
            }
        }
        m::store_op("progress", started.elapsed());
        Ok(out)
    }

    async fn set_progress(&self, slots: SlotRange, progress: &Progress) -> Result<()> {
        let started = Instant::now();
        self.session
            .execute_unpaged(
                &self.st.set_progress,
                (slots.first as i32, slots.last as i32, progress.to_bytes()?),
            )
            .await
            .map_err(|e| unavailable("writing range progress", e))?;
        m::store_op("set_progress", started.elapsed());
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_options() {
        let u = ScyllaUrl::parse("scylla://127.0.0.1:9042/timerdb").unwrap();
        assert_eq!(u.hosts, vec!["127.0.0.1:9042"]);
        assert_eq!(u.keyspace, "timerdb");
        assert_eq!(u.consistency, Consistency::Quorum);
        let u = ScyllaUrl::parse(
            "scylla://a,b:9043/ks_1?consistency=local_quorum&replication_factor=3&request_timeout=2s",
        )
        .unwrap();
        assert_eq!(u.hosts, vec!["a:9042", "b:9043"]);
        assert_eq!(u.consistency, Consistency::LocalQuorum);
        assert_eq!(u.replication_factor, 3);
        assert_eq!(u.request_timeout, Duration::from_secs(2));
        for bad in [
            "scylla://h:1",
            "scylla:///ks",
            "scylla://h/bad-name",
            "scylla://h/ks?consistency=most",
            "scylla://h/ks?colour=blue",
        ] {
            assert!(
                matches!(ScyllaUrl::parse(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
        // Levels whose reads can miss an acknowledged write are refused, by name.
        for weak in ["one", "two", "three", "local_one", "any", "each_quorum"] {
            let err = ScyllaUrl::parse(&format!("scylla://h/ks?consistency={weak}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(weak) && err.contains("refused"), "{err}");
        }
    }

    #[test]
    fn migration_files_split_into_statements() {
        let statements = split_statements(MIGRATIONS[0].2);
        assert_eq!(statements.len(), 6);
        assert!(
            statements
                .iter()
                .all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS {keyspace}."))
        );
    }
}
