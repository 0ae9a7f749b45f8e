//! The embedded store: one node, no external service, on redb.
//!
//! Rows are keyed `bucket_ms (8) | rand (8)`, both big-endian, so the timers of one bucket
//! are one contiguous key range: loading a bucket is one range scan, deleting a fired
//! bucket is one range delete. The slot (crc32 of `rand`) is not part of the key: one node
//! owns every slot of an embedded store, and the second part of an id starts with a
//! sequence number, so a group of new timers is appended at the end of each bucket rather
//! than written to one B-tree page per timer. A slot range other than all slots is served
//! by filtering the bucket's rows.
//!
//! Every write goes through one writer thread that takes all requests waiting in its queue,
//! applies them in one transaction and syncs once (group commit). A `SetTimeout` therefore
//! costs a share of one fsync, not one fsync of its own.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{
    Abandoned, CancelOutcome, Homing, Inserted, LoadedPage, Progress, StoreOptions, StoredTimer,
    TimerStore,
};
use crate::metrics as m;
use crate::timer::{Layout, SlotRange, StoredState, Timer, TimerId, TimerSpec, now_ms};
use crate::{Error, Result};

const TIMERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("timers");
const LOW_WATER: TableDefinition<u32, u64> = TableDefinition::new("low_water_marks");
/// slot -> epoch of the owner that claimed it (see `TimerStore::claim_slots`)
const EPOCHS: TableDefinition<u32, u64> = TableDefinition::new("slot_epochs");
/// idempotency key -> timer id (16) | created ms (8)
const IDEM: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// created ms (8) | idempotency key -> (), to expire keys in order
const IDEM_BY_TIME: TableDefinition<&[u8], ()> = TableDefinition::new("idempotency_by_time");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// first slot (4) | last slot (4) -> postcard(Progress)
const PROGRESS: TableDefinition<u64, &[u8]> = TableDefinition::new("range_progress");

fn range_key(r: SlotRange) -> u64 {
    (u64::from(r.first) << 32) | u64::from(r.last)
}

/// Version of a row's value.
const FORMAT_VERSION: u8 = 1;
/// Version of the file as a whole (key layout included), kept in `meta` as "format".
/// Format 1 keyed rows by `bucket | slot | rand`.
const STORE_FORMAT: u8 = 2;
/// Most requests folded into one transaction; bounds the latency of the first one.
const MAX_GROUP: usize = 2048;

/// Row value: version | state | created ms (8, BE) | postcard(TimerSpec).
fn encode_value(created_ms: u64, spec: &TimerSpec) -> Result<Vec<u8>> {
    let mut v = Vec::with_capacity(10 + spec.payload.len() + spec.topic.len() + 32);
    v.push(FORMAT_VERSION);
    v.push(state_byte(StoredState::Pending));
    v.extend_from_slice(&created_ms.to_be_bytes());
    postcard::to_io(spec, &mut v).map_err(|e| Error::Internal(format!("encoding timer: {e}")))?;
    Ok(v)
}

fn state_byte(s: StoredState) -> u8 {
    match s {
        StoredState::Pending => 0,
        StoredState::Cancelled => 1,
    }
}

fn decode_value(id: TimerId, v: &[u8]) -> Result<StoredTimer> {
    if v.len() < 10 || v[0] != FORMAT_VERSION {
        return Err(Error::Corrupt(format!(
            "timer {id}: unknown row format {:?}",
            v.first()
        )));
    }
    let state = match v[1] {
        0 => StoredState::Pending,
        1 => StoredState::Cancelled,
        other => return Err(Error::Corrupt(format!("timer {id}: unknown state {other}"))),
    };
    let created_ms = u64::from_be_bytes(v[2..10].try_into().expect("8 bytes"));
    let spec: TimerSpec =
        postcard::from_bytes(&v[10..]).map_err(|e| Error::Corrupt(format!("timer {id}: {e}")))?;
    Ok(StoredTimer {
        timer: Timer {
            id,
            created_ms,
            spec,
        },
        state,
    })
}

fn row_key(id: TimerId) -> [u8; 16] {
    id.to_bytes()
}

fn split_key(k: &[u8]) -> TimerId {
    TimerId {
        bucket_ms: u64::from_be_bytes(k[..8].try_into().expect("key")),
        rand: u64::from_be_bytes(k[8..16].try_into().expect("key")),
    }
}

/// First and last key of a bucket.
fn bucket_keys(bucket_ms: u64) -> ([u8; 16], [u8; 16]) {
    (
        row_key(TimerId { bucket_ms, rand: 0 }),
        row_key(TimerId {
            bucket_ms,
            rand: u64::MAX,
        }),
    )
}

/// Whether the row with key `k` belongs to `slots`; true without hashing for all slots.
fn in_slots(layout: &Layout, slots: SlotRange, k: &[u8]) -> bool {
    slots == layout.all_slots() || slots.contains(layout.slot_of(split_key(k).rand))
}

struct EncodedTimer {
    fire_at_ms: u64,
    idempotency_key: Option<String>,
    value: Vec<u8>,
}

enum WriteOp {
    Insert(
        Vec<EncodedTimer>,
        Homing,
        oneshot::Sender<Result<Vec<Inserted>>>,
    ),
    Cancel(TimerId, oneshot::Sender<Result<CancelOutcome>>),
    Abandon(TimerId, Option<String>, oneshot::Sender<Result<Abandoned>>),
    ConfirmKey(String, TimerId, oneshot::Sender<Result<bool>>),
    /// The rows of a bucket in a slot range: all, or only the ids listed.
    DeleteBucket(
        SlotRange,
        u64,
        Option<Vec<TimerId>>,
        oneshot::Sender<Result<()>>,
    ),
    SetLowWater(SlotRange, u64, oneshot::Sender<Result<()>>),
    Claim(SlotRange, u64, oneshot::Sender<Result<()>>),
    SetLowWaterFenced(SlotRange, u64, u64, oneshot::Sender<Result<()>>),
    SetProgress(SlotRange, Vec<u8>, oneshot::Sender<Result<()>>),
    /// Removes up to `PURGE_CHUNK` expired idempotency keys; answers how many.
    PurgeIdempotency(oneshot::Sender<Result<usize>>),
    Barrier(oneshot::Sender<Result<()>>),
    /// Commit what came before, then end the writer thread.
    Stop,
}

/// Results of the ops of one group, sent after the commit decides their fate.
enum Reply {
    Insert(oneshot::Sender<Result<Vec<Inserted>>>, Vec<Inserted>),
    Cancel(oneshot::Sender<Result<CancelOutcome>>, CancelOutcome),
    Unit(oneshot::Sender<Result<()>>),
    Outcome(oneshot::Sender<Result<()>>, Result<()>),
    Count(oneshot::Sender<Result<usize>>, usize),
    Abandoned(oneshot::Sender<Result<Abandoned>>, Abandoned),
    Flag(oneshot::Sender<Result<bool>>, bool),
}

impl Reply {
    fn send(self) {
        // A caller that gave up (timeout, disconnect) is not an error here.
        match self {
            Reply::Insert(tx, v) => drop(tx.send(Ok(v))),
            Reply::Cancel(tx, v) => drop(tx.send(Ok(v))),
            Reply::Unit(tx) => drop(tx.send(Ok(()))),
            Reply::Outcome(tx, r) => drop(tx.send(r)),
            Reply::Count(tx, n) => drop(tx.send(Ok(n))),
            Reply::Abandoned(tx, v) => drop(tx.send(Ok(v))),
            Reply::Flag(tx, v) => drop(tx.send(Ok(v))),
        }
    }

    fn fail(self, e: &Error) {
        let err = || Error::Unavailable(format!("embedded store write failed: {e}"));
        match self {
            Reply::Insert(tx, _) => drop(tx.send(Err(err()))),
            Reply::Cancel(tx, _) => drop(tx.send(Err(err()))),
            Reply::Unit(tx) | Reply::Outcome(tx, _) => drop(tx.send(Err(err()))),
            Reply::Count(tx, _) => drop(tx.send(Err(err()))),
            Reply::Abandoned(tx, _) => drop(tx.send(Err(err()))),
            Reply::Flag(tx, _) => drop(tx.send(Err(err()))),
        }
    }
}

/// Embedded store on a redb file in a directory.
pub struct EmbeddedStore {
    db: Arc<Database>,
    layout: Layout,
    writer: mpsc::Sender<WriteOp>,
    closed: AtomicBool,
    writer_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    purger: tokio::task::JoinHandle<()>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in directory `dir`.
    pub async fn open(dir: &Path, options: StoreOptions) -> Result<EmbeddedStore> {
        options.layout.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Config(format!(
                "store directory {}: cannot create: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("timers.redb");
        let cache = options.cache_bytes;
        let started = Instant::now();
        tracing::info!(path = %path.display(), "store.open: opening the embedded store");
        let db = tokio::task::spawn_blocking(move || {
            // After an unclean stop redb checks and repairs the file before it opens; say
            // how far it got, so a long start is never silent.
            let last_report = std::sync::Mutex::new(None::<Instant>);
            redb::Builder::new()
                .set_cache_size(cache)
                .set_repair_callback(move |session| {
                    let mut last = last_report.lock().expect("repair report");
                    if last.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
                        *last = Some(Instant::now());
                        tracing::info!(
                            progress_pct = (session.progress() * 100.0).round(),
                            "store.open: repairing after an unclean shutdown"
                        );
                    }
                })
                .create(&path)
                .map_err(|e| match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => Error::Config(format!(
                        "store {} is already open by another process",
                        path.display()
                    )),
                    other => Error::from(other),
                })
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let layout = init_meta(&db, options.layout, dir)?;
        let clock_floor = clock_floor(&db, layout)?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store.open: embedded store open"
        );
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(4096);
        let writer_db = db.clone();
        let retention_ms = options.idempotency_retention.as_millis() as u64;
        let quick_repair = options.quick_repair;
        let writer_thread = std::thread::Builder::new()
            .name("timerdb-store-writer".into())
            .spawn(move || {
                crate::priority::lower_current_thread();
                Writer {
                    db: writer_db,
                    layout,
                    quick_repair,
                    retention_ms,
                    clock_ms: clock_floor,
                }
                .run(rx)
            })
            .map_err(|e| Error::Internal(format!("starting store writer: {e}")))?;
        let purge_tx = tx.clone();
        // Every 10 s; while a purge finds a full chunk expired, the next one follows at
        // once (in small chunks, so each commit it joins stays short): a keyed write rate
        // above what one chunk per 10 s removes no longer grows the tables for ever.
        let purger = tokio::spawn(async move {
            loop {
                let (reply, answer) = oneshot::channel();
                if purge_tx
                    .send(WriteOp::PurgeIdempotency(reply))
                    .await
                    .is_err()
                {
                    break;
                }
                let backlog = matches!(answer.await, Ok(Ok(n)) if n == PURGE_CHUNK);
                let pause = if backlog {
                    PURGE_BACKLOG_PAUSE
                } else {
                    PURGE_EVERY
                };
                tokio::time::sleep(pause).await;
            }
        });
        Ok(EmbeddedStore {
            db,
            layout,
            writer: tx,
            closed: AtomicBool::new(false),
            writer_thread: std::sync::Mutex::new(Some(writer_thread)),
            purger,
        })
    }

    async fn write<T>(&self, op: WriteOp, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("embedded store is closed".into()));
        }
        self.writer
            .send(op)
            .await
            .map_err(|_| Error::Unavailable("embedded store is closed".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("embedded store writer stopped".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            crate::priority::lower_current_thread_once();
            f(&db)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
        m::store_op(op, started.elapsed());
        out
    }
}

/// Writes the layout on first open; afterwards the stored layout wins, and a different
/// requested one is reported rather than silently reinterpreting existing ids.
fn init_meta(db: &Database, requested: Layout, dir: &Path) -> Result<Layout> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(true);
    let layout = {
        let mut meta = txn.open_table(META)?;
        let stored = meta.get("layout")?.map(|v| v.value().to_vec());
        match stored {
            Some(bytes) => {
                let format = meta.get("format")?.and_then(|v| v.value().first().copied());
                if format != Some(STORE_FORMAT) {
                    return Err(Error::Config(format!(
                        "store {}: on-disk format {} is not the format {STORE_FORMAT} this \
                         version reads; let an older TimerDB fire its timers and start this \
                         version on a new directory",
                        dir.display(),
                        format.map_or("unknown".to_string(), |f| f.to_string()),
                    )));
                }
                let stored: Layout = postcard::from_bytes(&bytes)
                    .map_err(|e| Error::Corrupt(format!("layout record: {e}")))?;
                if stored != requested {
                    tracing::warn!(
                        stored_slots = stored.slots,
                        stored_bucket_ms = stored.bucket_ms,
                        requested_slots = requested.slots,
                        requested_bucket_ms = requested.bucket_ms,
                        "store.open: store was created with another layout; keeping the stored one"
                    );
                }
                stored
            }
            None => {
                let bytes = postcard::to_allocvec(&requested)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                meta.insert("layout", bytes.as_slice())?;
                meta.insert("format", [STORE_FORMAT].as_slice())?;
                requested
            }
        }
    };
    // Create the other tables so readers never meet a missing table.
    txn.open_table(TIMERS)?;
    txn.open_table(LOW_WATER)?;
    txn.open_table(EPOCHS)?;
    txn.open_table(IDEM)?;
    txn.open_table(IDEM_BY_TIME)?;
    txn.open_table(PROGRESS)?;
    txn.commit()?;
    Ok(layout)
}

/// Where the writer's clock starts: the latest recorded low-water mark. Buckets before it
/// are never read again, so a clock stepped back across a restart must not place new
/// timers there (they would be handed off, and lost to a crash before they fire).
fn clock_floor(db: &Database, layout: Layout) -> Result<u64> {
    let txn = db.begin_read()?;
    let floor = match txn.open_table(LOW_WATER) {
        Ok(t) => t
            .iter()?
            .map(|r| r.map(|(_, v)| v.value()))
            .collect::<std::result::Result<Vec<u64>, _>>()?
            .into_iter()
            .max()
            .unwrap_or(0),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => return Err(e.into()),
    };
    super::warn_if_clock_behind(floor, layout);
    Ok(floor)
}

/// Expired idempotency keys removed per purge (one op in a group commit).
const PURGE_CHUNK: usize = 2_000;
/// Pause between purges when the last one found nothing more to do.
const PURGE_EVERY: Duration = Duration::from_secs(10);
/// Pause between purges while expired keys are left over: up to 100,000 keys/s.
const PURGE_BACKLOG_PAUSE: Duration = Duration::from_millis(20);

struct Writer {
    db: Arc<Database>,
    layout: Layout,
    quick_repair: bool,
    retention_ms: u64,
    /// Never goes backwards, so a clock step back cannot put a timer into a bucket that
    /// has already started (and may already be deleted).
    clock_ms: u64,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut ops = Vec::with_capacity(MAX_GROUP);
        let mut stop = false;
        while let Some(op) = rx.blocking_recv() {
            ops.push(op);
            while ops.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            if let Some(i) = ops.iter().position(|op| matches!(op, WriteOp::Stop)) {
                // Nothing queued after a stop is taken; those callers see the store closed.
                ops.truncate(i);
                stop = true;
            }
            let started = Instant::now();
            let n = ops.len();
            let mut replies = Vec::with_capacity(n);
            let outcome = self.apply(&mut ops, &mut replies);
            m::store_op("commit", started.elapsed());
            m::store_group_size(n);
            match outcome {
                Ok(()) => replies.into_iter().for_each(Reply::send),
                Err(e) => {
                    tracing::error!(error = %e, ops = n, "store.commit failed");
                    replies.into_iter().for_each(|r| r.fail(&e));
                }
            }
            if stop {
                break;
            }
        }
    }

    fn apply(&mut self, ops: &mut Vec<WriteOp>, replies: &mut Vec<Reply>) -> Result<()> {
        self.clock_ms = self.clock_ms.max(now_ms());
        let now = self.clock_ms;
        // Timers go into a bucket that has not started yet, so the scheduler can delete a
        // bucket once it is past without racing a late writer.
        let min_bucket = self.layout.bucket_start(now) + self.layout.bucket_ms;
        let mut txn = self.db.begin_write()?;
        // Each commit also records the allocator state (and commits in two phases), so
        // opening the file after a crash takes milliseconds instead of a walk over the
        // whole file: 42 s with 10 M timers stored before this (see docs/design.md).
        txn.set_quick_repair(self.quick_repair);
        // New rows of the whole group, inserted in key order after the other ops: sorted
        // inserts touch neighbouring B-tree pages instead of a random page per timer.
        let mut new_rows: Vec<([u8; 16], Vec<u8>)> = Vec::new();
        {
            let mut timers = txn.open_table(TIMERS)?;
            let mut low = txn.open_table(LOW_WATER)?;
            let mut epochs = txn.open_table(EPOCHS)?;
            let mut idem = txn.open_table(IDEM)?;
            let mut idem_time = txn.open_table(IDEM_BY_TIME)?;
            let mut progress = txn.open_table(PROGRESS)?;
            for op in ops.drain(..) {
                match op {
                    WriteOp::Insert(items, homing, reply) => {
                        let mut out = Vec::with_capacity(items.len());
                        for item in items {
                            if let Some(k) = &item.idempotency_key {
                                let existing = idem.get(k.as_str())?.map(|v| v.value().to_vec());
                                if let Some(v) = existing {
                                    let created =
                                        u64::from_be_bytes(v[16..24].try_into().expect("idem"));
                                    if created + self.retention_ms > now {
                                        let id = TimerId {
                                            bucket_ms: u64::from_be_bytes(
                                                v[..8].try_into().expect("idem"),
                                            ),
                                            rand: u64::from_be_bytes(
                                                v[8..16].try_into().expect("idem"),
                                            ),
                                        };
                                        out.push(Inserted { id, created: false });
                                        continue;
                                    }
                                }
                            }
                            let bucket = self.layout.bucket_start(item.fire_at_ms).max(min_bucket);
                            let id = homing.new_id(self.layout, bucket);
                            new_rows.push((row_key(id), item.value));
                            if let Some(k) = &item.idempotency_key {
                                let mut v = [0u8; 24];
                                v[..16].copy_from_slice(&id.to_bytes());
                                v[16..].copy_from_slice(&now.to_be_bytes());
                                idem.insert(k.as_str(), v.as_slice())?;
                                let mut tk = now.to_be_bytes().to_vec();
                                tk.extend_from_slice(k.as_bytes());
                                idem_time.insert(tk.as_slice(), ())?;
                            }
                            out.push(Inserted { id, created: true });
                        }
                        replies.push(Reply::Insert(reply, out));
                    }
                    WriteOp::Cancel(id, reply) => {
                        let key = row_key(id);
                        let current = timers.get(key.as_slice())?.map(|v| v.value().to_vec());
                        let outcome = match current {
                            None => CancelOutcome::NotFound,
                            Some(v) if v.get(1) == Some(&state_byte(StoredState::Cancelled)) => {
                                CancelOutcome::AlreadyCancelled
                            }
                            Some(mut v) => {
                                if v.len() < 2 {
                                    return Err(Error::Corrupt(format!("timer {id}: short row")));
                                }
                                v[1] = state_byte(StoredState::Cancelled);
                                timers.insert(key.as_slice(), v.as_slice())?;
                                CancelOutcome::Cancelled
                            }
                        };
                        replies.push(Reply::Cancel(reply, outcome));
                    }
                    WriteOp::Abandon(id, key, reply) => {
                        // A key entry is the id (16 bytes), the claim time (8), and a 25th
                        // byte of 1 once a repeated call confirmed the claim.
                        let confirmed = match &key {
                            Some(k) => idem.get(k.as_str())?.is_some_and(|v| {
                                let v = v.value();
                                v[..16] == id.to_bytes() && v.get(24) == Some(&1)
                            }),
                            None => false,
                        };
                        if confirmed {
                            replies.push(Reply::Abandoned(reply, Abandoned::Kept));
                            continue;
                        }
                        let row = row_key(id);
                        let current = timers.get(row.as_slice())?.map(|v| v.value().to_vec());
                        if let Some(mut v) = current
                            && v.len() >= 2
                            && v[1] == state_byte(StoredState::Pending)
                        {
                            v[1] = state_byte(StoredState::Cancelled);
                            timers.insert(row.as_slice(), v.as_slice())?;
                        }
                        if let Some(k) = key {
                            let names_id = idem
                                .get(k.as_str())?
                                .is_some_and(|v| v.value()[..16] == id.to_bytes());
                            if names_id {
                                idem.remove(k.as_str())?;
                            }
                        }
                        replies.push(Reply::Abandoned(reply, Abandoned::Withdrawn));
                    }
                    WriteOp::ConfirmKey(k, id, reply) => {
                        let current = idem.get(k.as_str())?.map(|v| v.value().to_vec());
                        let names_id = match current {
                            Some(mut v) if v.len() >= 24 && v[..16] == id.to_bytes() => {
                                v.truncate(24);
                                v.push(1);
                                idem.insert(k.as_str(), v.as_slice())?;
                                true
                            }
                            _ => false,
                        };
                        replies.push(Reply::Flag(reply, names_id));
                    }
                    WriteOp::DeleteBucket(slots, bucket, only, reply) => {
                        let layout = self.layout;
                        match only {
                            None => {
                                let (lo, hi) = bucket_keys(bucket);
                                timers.retain_in(lo.as_slice()..=hi.as_slice(), |k, _| {
                                    !in_slots(&layout, slots, k)
                                })?;
                            }
                            Some(ids) => {
                                for id in ids {
                                    let k = row_key(id);
                                    if id.bucket_ms == bucket && in_slots(&layout, slots, &k) {
                                        timers.remove(k.as_slice())?;
                                    }
                                }
                            }
                        }
                        replies.push(Reply::Unit(reply));
                    }
                    WriteOp::SetLowWater(slots, bucket, reply) => {
                        for slot in slots.first..=slots.last {
                            low.insert(slot, bucket)?;
                        }
                        replies.push(Reply::Unit(reply));
                    }
                    WriteOp::Claim(slots, epoch, reply) => {
                        let mut newer = None;
                        for slot in slots.first..=slots.last {
                            if let Some(held) = epochs.get(slot)?.map(|v| v.value())
                                && held > epoch
                            {
                                newer = Some((slot, held));
                                break;
                            }
                        }
                        let outcome = match newer {
                            Some((slot, held)) => Err(Error::Fenced(format!(
                                "slot {slot} is held under epoch {held}, newer than {epoch}"
                            ))),
                            None => {
                                for slot in slots.first..=slots.last {
                                    epochs.insert(slot, epoch)?;
                                }
                                Ok(())
                            }
                        };
                        replies.push(Reply::Outcome(reply, outcome));
                    }
                    WriteOp::SetLowWaterFenced(slots, bucket, epoch, reply) => {
                        let mut refused = Vec::new();
                        for slot in slots.first..=slots.last {
                            match epochs.get(slot)?.map(|v| v.value()) {
                                Some(held) if held == epoch => {
                                    low.insert(slot, bucket)?;
                                }
                                Some(held) => refused.push(format!("slot {slot} (epoch {held})")),
                                None => refused.push(format!("slot {slot} (never claimed)")),
                            }
                        }
                        let outcome = if refused.is_empty() {
                            Ok(())
                        } else {
                            Err(Error::Fenced(format!(
                                "low-water mark {bucket} under epoch {epoch} refused for {}",
                                refused.join(", ")
                            )))
                        };
                        replies.push(Reply::Outcome(reply, outcome));
                    }
                    WriteOp::SetProgress(slots, value, reply) => {
                        progress.insert(range_key(slots), value.as_slice())?;
                        replies.push(Reply::Unit(reply));
                    }
                    WriteOp::Barrier(reply) => replies.push(Reply::Unit(reply)),
                    WriteOp::Stop => {}
                    WriteOp::PurgeIdempotency(reply) => {
                        let cutoff = now.saturating_sub(self.retention_ms);
                        let expired: Vec<Vec<u8>> = idem_time
                            .range(..cutoff.to_be_bytes().as_slice())?
                            .take(PURGE_CHUNK)
                            .map(|r| r.map(|(k, _)| k.value().to_vec()))
                            .collect::<std::result::Result<_, _>>()?;
                        let n_expired = expired.len();
                        for tk in expired {
                            idem_time.remove(tk.as_slice())?;
                            let created = u64::from_be_bytes(tk[..8].try_into().expect("idem"));
                            let key = String::from_utf8_lossy(&tk[8..]).into_owned();
                            // Only drop the key if it still points at this (expired) entry.
                            let same = idem
                                .get(key.as_str())?
                                .map(|v| v.value()[16..24] == created.to_be_bytes())
                                .unwrap_or(false);
                            if same {
                                idem.remove(key.as_str())?;
                            }
                        }
                        replies.push(Reply::Count(reply, n_expired));
                    }
                }
            }
            // Cancels and bucket deletes above cannot concern these rows: their ids are not
            // known to anyone until this commit replies, and they lie in future buckets.
            new_rows.sort_unstable_by_key(|r| r.0);
            for (key, value) in &new_rows {
                timers.insert(key.as_slice(), value.as_slice())?;
            }
        }
        crate::failpoint::hit("embedded.before_commit")?;
        txn.commit()?;
        Ok(())
    }
}

impl EmbeddedStore {
    /// How many idempotency keys are remembered (expired ones go within seconds of their
    /// expiry).
    pub async fn idempotency_keys(&self) -> Result<u64> {
        self.read("idempotency_keys", |db| {
            let txn = db.begin_read()?;
            match txn.open_table(IDEM) {
                Ok(t) => Ok(t.len()?),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }
}

#[async_trait]
impl TimerStore for EmbeddedStore {
    fn layout(&self) -> Layout {
        self.layout
    }

    async fn insert(&self, timers: &[TimerSpec], homing: &Homing) -> Result<Vec<Result<Inserted>>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        let created_ms = now_ms();
        let items = timers
            .iter()
            .map(|spec| {
                Ok(EncodedTimer {
                    fire_at_ms: spec.fire_at_ms,
                    idempotency_key: spec.idempotency_key.clone(),
                    value: encode_value(created_ms, spec)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let out = self
            .write(WriteOp::Insert(items, homing.clone(), tx), rx)
            .await;
        m::store_op("insert", started.elapsed());
        // One transaction: every item is stored, or none.
        Ok(out?.into_iter().map(Ok).collect())
    }

    async fn get(&self, id: TimerId) -> Result<Option<StoredTimer>> {
        let key = row_key(id);
        self.read("get", move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(TIMERS)?;
            let row = table.get(key.as_slice())?;
            row.map(|v| decode_value(id, v.value())).transpose()
        })
        .await
    }

    async fn cancel(&self, id: TimerId) -> Result<CancelOutcome> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Cancel(id, tx), rx).await
    }

    async fn abandon(&self, id: TimerId, key: Option<&str>) -> Result<Abandoned> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Abandon(id, key.map(str::to_string), tx), rx)
            .await
    }

    async fn confirm_key(&self, key: &str, id: TimerId) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::ConfirmKey(key.to_string(), id, tx), rx)
            .await
    }

    async fn load_page(
        &self,
        slots: SlotRange,
        bucket_ms: u64,
        after: Option<TimerId>,
        limit: usize,
    ) -> Result<LoadedPage> {
        let layout = self.layout;
        self.read("load_bucket", move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(TIMERS)?;
            let (lo, hi) = bucket_keys(bucket_ms);
            let mut out = LoadedPage::default();
            let limit = limit.max(1);
            let mut rows = 0;
            let mut last = None;
            let start = match after {
                Some(a) if a.rand == u64::MAX => return Ok(out),
                Some(a) => row_key(TimerId {
                    bucket_ms,
                    rand: a.rand + 1,
                }),
                None => lo,
            };
            for row in table.range(start.as_slice()..=hi.as_slice())? {
                let (k, v) = row?;
                let id = split_key(k.value());
                if !in_slots(&layout, slots, k.value()) {
                    continue;
                }
                if rows >= limit {
                    // More rows follow: the next page starts after the last one taken.
                    out.next = last;
                    break;
                }
                rows += 1;
                last = Some(id);
                out.rows.add(id, decode_value(id, v.value()), v.value());
            }
            Ok(out)
        })
        .await
    }

    async fn next_bucket(
        &self,
        slots: SlotRange,
        from_ms: u64,
        until_ms: u64,
    ) -> Result<Option<u64>> {
        let layout = self.layout;
        self.read("next_bucket", move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(TIMERS)?;
            let (from, _) = bucket_keys(from_ms);
            for row in table.range(from.as_slice()..)? {
                let (k, _) = row?;
                let id = split_key(k.value());
                if id.bucket_ms > until_ms {
                    return Ok(None);
                }
                if in_slots(&layout, slots, k.value()) {
                    return Ok(Some(id.bucket_ms));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn delete_bucket(
        &self,
        slots: SlotRange,
        bucket_ms: u64,
        only: Option<&[TimerId]>,
    ) -> Result<()> {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let only = only.map(<[TimerId]>::to_vec);
        let out = self
            .write(WriteOp::DeleteBucket(slots, bucket_ms, only, tx), rx)
            .await;
        m::store_op("delete_bucket", started.elapsed());
        out
    }

    async fn low_water_mark(&self, slots: SlotRange) -> Result<Option<u64>> {
        self.read("low_water_mark", move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(LOW_WATER)?;
            let mut min: Option<u64> = None;
            for row in table.range(slots.first..=slots.last)? {
                let (_, v) = row?;
                min = Some(min.map_or(v.value(), |m| m.min(v.value())));
            }
            Ok(min)
        })
        .await
    }

    async fn set_low_water_mark(&self, slots: SlotRange, bucket_ms: u64) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::SetLowWater(slots, bucket_ms, tx), rx)
            .await
    }

    async fn claim_slots(&self, slots: SlotRange, epoch: u64) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Claim(slots, epoch, tx), rx).await
    }

    async fn set_low_water_mark_fenced(
        &self,
        slots: SlotRange,
        bucket_ms: u64,
        epoch: u64,
    ) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::SetLowWaterFenced(slots, bucket_ms, epoch, tx), rx)
            .await
    }

    async fn progress(&self, slots: SlotRange) -> Result<Vec<(SlotRange, Progress)>> {
        self.read("progress", move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PROGRESS)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let r = SlotRange {
                    first: (k.value() >> 32) as u32,
                    last: k.value() as u32,
                };
                if r.first <= slots.last && slots.first <= r.last {
                    out.push((r, Progress::from_bytes(v.value())?));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn set_progress(&self, slots: SlotRange, progress: &Progress) -> Result<()> {
        let value = progress.to_bytes()?;
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::SetProgress(slots, value, tx), rx).await
    }

    async fn close(&self) -> Result<()> {
        self.purger.abort();
        // Every commit is already durable; waiting for a barrier makes sure work queued by
        // earlier callers is committed before the caller goes on, and later writes fail.
        let (tx, rx) = oneshot::channel();
        let out = self.write(WriteOp::Barrier(tx), rx).await;
        self.closed.store(true, Ordering::SeqCst);
        // End the writer thread so the database file is released when the store is dropped.
        let _ = self.writer.send(WriteOp::Stop).await;
        let handle = self.writer_thread.lock().expect("writer handle").take();
        if let Some(h) = handle {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
                .map_err(|_| Error::Internal("store writer thread panicked".into()))?;
        }
        out
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.purger.abort();
    }
}
