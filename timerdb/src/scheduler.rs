//! The scheduler: keeps the timers due soon in memory and fires each at its epoch.
//!
//! For every owned slot range one task owns that range's in-memory state (no locks on the
//! fire path) and a loader task reads buckets from the store a little before they are due.
//!
//! Correctness rests on three rules (see `docs/design.md`, "Scheduler"):
//! 1. The loader raises `horizon` *before* it reads buckets up to it; a writer hands a timer
//!    to the scheduler after its durable write when its bucket is at or below `horizon`.
//!    So every stored timer is either read by the loader or handed off (or both: merging
//!    skips ids already known).
//! 2. A timer leaves the store only with its whole bucket, once every timer of the bucket
//!    was confirmed by the sink or cancelled, and the bucket has been over for `grace`.
//! 3. The durable low-water mark never passes a bucket that still holds unfired timers.
//! 4. While a write is under way ([`Scheduler::begin_write`]), no bucket it may write into
//!    is deleted and the range's durable progress stays before its start, until its
//!    hand-off has been applied by the range: a slow write cannot land in a deleted bucket,
//!    and a crash cannot skip a timer that was acknowledged but not yet in memory.

mod range;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::sink::Sink;
use crate::store::{CancelOutcome, TimerStore};
use crate::timer::{Layout, SlotRange, Timer, TimerId, now_ms};
use crate::{Error, Result};

/// Tuning of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How long before a bucket starts its timers are read into memory.
    pub lookahead: Duration,
    /// How long after a bucket ends before it may be deleted (covers a write acknowledged
    /// at the very end of the previous bucket whose hand-off is still on its way).
    pub grace: Duration,
    /// Stop loading more buckets while this many timers are in memory.
    pub max_in_memory: usize,
    /// Stop loading more buckets while the timers in memory take this many bytes
    /// (payload, key, headers and bookkeeping).
    pub max_in_memory_bytes: usize,
    /// Rows read from the store per page of a bucket (the memory limits are checked
    /// between pages).
    pub load_page_rows: usize,
    /// Most timers handed to the sink in one call.
    pub max_batch: usize,
    /// Most sink calls in flight per range.
    pub max_inflight_batches: usize,
    /// First retry delay after a failed delivery; doubles up to `retry_max`.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How long shutdown waits for deliveries already in flight.
    pub shutdown_timeout: Duration,
    /// Whether this node may act on its ranges right now (a cluster member: while its
    /// lease holds). Checked before every fire and every write that belongs to ownership
    /// (bucket deletes, progress, low-water marks). `None`: always (a single node).
    pub authority: Option<Authority>,
}

/// Answers whether the node may act on a range (with its tag) now (see
/// [`SchedulerConfig::authority`]).
#[derive(Clone)]
pub struct Authority(pub Arc<dyn Fn(SlotRange, u64) -> bool + Send + Sync>);

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authority")
    }
}

impl SchedulerConfig {
    /// Whether `range` (run under `tag`) may fire and write ownership records now.
    pub fn may_act(&self, range: SlotRange, tag: u64) -> bool {
        self.authority.as_ref().is_none_or(|a| (a.0)(range, tag))
    }

    /// The epoch a range run under `tag` writes its marks with, fenced in the store: the
    /// tag itself for a cluster member, none for a single node (nobody else writes).
    pub fn fence(&self, tag: u64) -> Option<u64> {
        self.authority.as_ref().map(|_| tag)
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lookahead: Duration::from_secs(2),
            grace: Duration::from_secs(2),
            max_in_memory: 2_000_000,
            max_in_memory_bytes: 1 << 30,
            load_page_rows: 20_000,
            max_batch: 4096,
            max_inflight_batches: 8,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            authority: None,
        }
    }
}

/// What the scheduler's memory knows of a timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemState {
    /// Loaded, waiting for its epoch (or for a retry).
    Pending,
    /// Handed to the sink, not confirmed yet.
    Firing,
    /// Confirmed by the sink.
    Fired,
    /// Cancelled (or a cancel is being written).
    Cancelled,
}

/// What a range made of a stored timer it was asked to adopt ([`Scheduler::adopt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// It holds the timer already, in this state.
    Known(MemState),
    /// Taken into memory now: it fires at its time.
    Admitted,
    /// Its bucket is not read yet: the load will read the row.
    Unloaded,
    /// Its bucket was fired and deleted here: only a row written after that delete is
    /// still in the store (read it again, then adopt with `force`).
    BucketDeleted,
    /// The progress an earlier owner recorded claims it delivered, and a repeat of its key
    /// (not its writer) asks: not taken in, since the timer most likely fired. Its writer,
    /// if it is still settling the write, has it fired ([`Scheduler::adopt`]).
    Covered,
}

/// First step of a cancel, taken in memory before the durable write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelProbe {
    /// Blocked from firing; write the cancel to the store, then call `end_cancel`.
    Proceed,
    /// Already produced (or being produced): too late.
    AlreadyFired,
    /// Already cancelled.
    AlreadyCancelled,
    /// Another cancel of the same timer is being written.
    InProgress,
    /// The range may not act now (a cluster member whose lease lapsed, or whose range is
    /// moving): another member may hold the timer loaded, so nothing was changed.
    NotActing,
}

/// The writes under way, by the time each began.
#[derive(Default)]
pub struct Writes {
    started: Mutex<BTreeMap<u64, usize>>,
}

impl Writes {
    /// The start of the oldest write under way.
    pub fn floor(&self) -> Option<u64> {
        self.started
            .lock()
            .expect("writes lock")
            .first_key_value()
            .map(|(k, _)| *k)
    }

    /// Whether no write is under way.
    pub fn is_empty(&self) -> bool {
        self.started.lock().expect("writes lock").is_empty()
    }
}

/// One write under way; dropped once its hand-off was applied (or was not needed).
pub struct WriteGuard {
    writes: Arc<Writes>,
    /// When the write began (ms); every timer it stores is created at or after this.
    pub started_ms: u64,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut started = self.writes.started.lock().expect("writes lock");
        if let Some(n) = started.get_mut(&self.started_ms) {
            *n -= 1;
            if *n == 0 {
                started.remove(&self.started_ms);
            }
        }
    }
}

enum Msg {
    /// Timers to admit; the write they came from stays registered until they are admitted.
    /// `true` for a repeat (an idempotent retry's timer read back from the store).
    HandOff(Vec<Timer>, Option<Arc<WriteGuard>>, bool),
    /// A slice of a bucket's timers; `true` on the bucket's last slice; the page's size;
    /// the slice's [`timer_bytes`], as the loader counted them in [`MemoryUse::loading`].
    Loaded(u64, crate::store::LoadedBucket, bool, usize, usize),
    Settled(u64),
    /// A delivered batch, its outcomes, when it was fired, and its earliest due time.
    Delivered(Vec<Timer>, Vec<crate::sink::Delivery>, u64, u64),
    ProgressWritten(crate::store::Progress, bool),
    BucketDeleted(u64, bool),
    LowWaterWritten(u64, bool),
    BeginCancel(TimerId, bool, oneshot::Sender<CancelProbe>),
    EndCancel(
        TimerId,
        Option<CancelOutcome>,
        Option<oneshot::Sender<bool>>,
    ),
    Status(TimerId, oneshot::Sender<Option<MemState>>),
    /// Adopt a stored timer (see [`Scheduler::adopt`]): (timer, its bucket is loaded,
    /// admit it even if its bucket was deleted here, asked by its writer, reply).
    Adopt(Timer, bool, bool, bool, oneshot::Sender<Adoption>),
    /// Stop; with a cutoff (ms), record no progress or low-water mark at or past it.
    Shutdown(oneshot::Sender<()>, Option<u64>),
}

struct RangeHandle {
    range: SlotRange,
    /// See [`Scheduler::assign_tagged`].
    tag: u64,
    stats: Arc<RangeStats>,
    started: std::time::Instant,
    tx: mpsc::UnboundedSender<Msg>,
    horizon: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    /// Lets the loader begin; sent once the handle is registered, so no write can miss
    /// both the loader and the hand-off.
    go: Option<oneshot::Sender<()>>,
}

/// A running range's figures, for `timerdb admin status`.
#[derive(Debug, Default)]
pub struct RangeStats {
    /// Timers it holds in memory.
    pub in_memory: AtomicUsize,
    /// Its last recorded low-water mark (ms).
    pub low_water_ms: AtomicU64,
    /// Timers it delivered since it started.
    pub fired: AtomicU64,
    /// (when, fired then, rate): the fire rate, measured between two reads at least a
    /// second apart.
    rate: std::sync::Mutex<Option<(std::time::Instant, u64, f64)>>,
}

impl RangeStats {
    /// Timers delivered per second, over the time since the previous measure (at least a
    /// second; since the range started for the first).
    pub fn fired_per_s(&self, started: std::time::Instant) -> f64 {
        let fired = self.fired.load(Ordering::Relaxed);
        let now = std::time::Instant::now();
        let mut rate = self.rate.lock().expect("rate lock");
        let (at, then, last) = rate.unwrap_or((started, 0, 0.0));
        let elapsed = now.duration_since(at).as_secs_f64();
        if elapsed < 1.0 {
            return last;
        }
        let r = (fired - then) as f64 / elapsed;
        *rate = Some((now, fired, r));
        r
    }
}

/// What [`Scheduler::report`] tells of one running range.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeReport {
    /// The range.
    pub range: SlotRange,
    /// Its last recorded low-water mark (ms).
    pub low_water_ms: u64,
    /// Timers it holds in memory.
    pub in_memory: usize,
    /// Timers delivered per second lately.
    pub fired_per_s: f64,
}

/// What the ranges hold in memory, shared for the loaders' backpressure.
#[derive(Debug, Default)]
pub struct MemoryUse {
    /// Timers.
    pub timers: AtomicUsize,
    /// Their size, as [`timer_bytes`] counts it.
    pub bytes: AtomicUsize,
    /// Read by a loader and sent to its range, not admitted yet (timers, bytes): counted
    /// against the limits too, so a loader does not read bucket after bucket while its
    /// range is still taking in the first.
    pub loading: (AtomicUsize, AtomicUsize),
}

impl MemoryUse {
    /// Whether holding more would pass `max_timers` or `max_bytes`.
    pub fn full(&self, max_timers: usize, max_bytes: usize) -> bool {
        self.timers.load(Ordering::Relaxed) + self.loading.0.load(Ordering::Relaxed) >= max_timers
            || self.bytes.load(Ordering::Relaxed) + self.loading.1.load(Ordering::Relaxed)
                >= max_bytes
    }
}

/// What one timer held in memory costs: its payload, key and headers, plus the entry,
/// queue and map bookkeeping around it.
pub fn timer_bytes(t: &Timer) -> usize {
    const BOOKKEEPING: usize = 160;
    std::mem::size_of::<Timer>()
        + BOOKKEEPING
        + t.spec.payload.len()
        + t.spec.key.as_ref().map_or(0, |k| k.len())
        + t.spec.topic.len()
        + t.spec.idempotency_key.as_ref().map_or(0, |k| k.len())
        + t.spec
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 48)
            .sum::<usize>()
}

/// The schedulers of the slot ranges this node owns.
pub struct Scheduler {
    store: Arc<dyn TimerStore>,
    sink: Arc<dyn Sink>,
    layout: Layout,
    config: SchedulerConfig,
    in_memory: Arc<MemoryUse>,
    writes: Arc<Writes>,
    /// Set once shutdown begins: no new writes are registered.
    stopping: std::sync::atomic::AtomicBool,
    /// Serialises `assign`, so two changes of the owned set cannot interleave.
    assigning: tokio::sync::Mutex<()>,
    ranges: RwLock<Vec<RangeHandle>>,
}

impl Scheduler {
    /// A scheduler owning no range yet.
    pub fn new(
        store: Arc<dyn TimerStore>,
        sink: Arc<dyn Sink>,
        config: SchedulerConfig,
    ) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            layout: store.layout(),
            store,
            sink,
            config,
            in_memory: Arc::new(MemoryUse::default()),
            writes: Arc::new(Writes::default()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            assigning: tokio::sync::Mutex::new(()),
            ranges: RwLock::new(Vec::new()),
        })
    }

    /// The layout of the underlying store.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Makes `ranges` the owned set: ranges no longer owned stop (after finishing their
    /// in-flight deliveries), new ones start by scanning from their low-water mark.
    pub async fn assign(&self, ranges: Vec<SlotRange>) -> Result<()> {
        self.assign_tagged(ranges.into_iter().map(|r| (r, 0)).collect())
            .await
    }

    /// [`Scheduler::assign`] with a tag per range (a cluster member's epoch of the range):
    /// a range whose tag changed restarts, even on the same slots (the slots were someone
    /// else's in between, and what this range held in memory is stale).
    pub async fn assign_tagged(&self, ranges: Vec<(SlotRange, u64)>) -> Result<()> {
        let _one_at_a_time = self.assigning.lock().await;
        // Ranges given up leave the routing table first: from here on no write homes a
        // timer in them and no hand-off reaches them. What they record at their stop stays
        // before every write still under way (`cutoff`), whose timers the next owner of
        // those slots then reads from the store.
        let stopped: Vec<RangeHandle> = {
            let mut current = self.ranges.write().expect("ranges lock");
            let (keep, stopped) = std::mem::take(&mut *current)
                .into_iter()
                .partition(|h| ranges.contains(&(h.range, h.tag)));
            *current = keep;
            stopped
        };
        let cutoff = self.writes.floor().unwrap_or(u64::MAX).min(now_ms());
        // All at once: one range waiting for its last deliveries must not keep another
        // firing after it was given up.
        let replies: Vec<_> = stopped
            .iter()
            .filter_map(|h| {
                let (reply, rx) = oneshot::channel();
                h.tx.send(Msg::Shutdown(reply, Some(cutoff)))
                    .ok()
                    .map(|()| rx)
            })
            .collect();
        for rx in replies {
            let _ = rx.await;
        }
        for h in stopped {
            let _ = h.task.await;
        }
        for (range, tag) in ranges {
            let owned = self
                .ranges
                .read()
                .expect("ranges lock")
                .iter()
                .any(|h| h.range == range && h.tag == tag);
            if owned {
                continue;
            }
            let handle = range::start(
                range,
                tag,
                self.store.clone(),
                self.sink.clone(),
                self.config.clone(),
                self.in_memory.clone(),
                self.writes.clone(),
            )
            .await?;
            let mut handle = handle;
            let go = handle.go.take();
            self.ranges.write().expect("ranges lock").push(handle);
            if let Some(go) = go {
                let _ = go.send(());
            }
        }
        Ok(())
    }

    /// The slot ranges currently owned.
    pub fn owned(&self) -> Vec<SlotRange> {
        self.ranges
            .read()
            .expect("ranges lock")
            .iter()
            .map(|h| h.range)
            .collect()
    }

    /// The slot ranges currently owned, with their tags.
    pub fn owned_tagged(&self) -> Vec<(SlotRange, u64)> {
        self.ranges
            .read()
            .expect("ranges lock")
            .iter()
            .map(|h| (h.range, h.tag))
            .collect()
    }

    /// The figures of every running range.
    pub fn report(&self) -> Vec<RangeReport> {
        self.ranges
            .read()
            .expect("ranges lock")
            .iter()
            .map(|h| RangeReport {
                range: h.range,
                low_water_ms: h.stats.low_water_ms.load(Ordering::Relaxed),
                in_memory: h.stats.in_memory.load(Ordering::Relaxed),
                fired_per_s: h.stats.fired_per_s(h.started),
            })
            .collect()
    }

    /// Whether a range of this node is running for `slot`.
    pub fn runs(&self, slot: u32) -> bool {
        self.ranges
            .read()
            .expect("ranges lock")
            .iter()
            .any(|h| h.range.contains(slot))
    }

    /// Timers held in memory across all ranges.
    pub fn in_memory(&self) -> usize {
        self.in_memory.timers.load(Ordering::Relaxed)
    }

    /// Bytes the timers in memory take, across all ranges (see [`timer_bytes`]).
    pub fn in_memory_bytes(&self) -> usize {
        self.in_memory.bytes.load(Ordering::Relaxed)
    }

    /// Registers a write about to begin; hold the guard until its hand-off is done.
    /// Timers the write stores must be created at or after `guard.started_ms`.
    pub fn begin_write(&self) -> Result<Arc<WriteGuard>> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let started_ms = now_ms();
        *self
            .writes
            .started
            .lock()
            .expect("writes lock")
            .entry(started_ms)
            .or_default() += 1;
        Ok(Arc::new(WriteGuard {
            writes: self.writes.clone(),
            started_ms,
        }))
    }

    /// The writes under way.
    pub fn writes(&self) -> &Writes {
        &self.writes
    }

    /// Whether the bucket of `id` is already read (or being read) by its range here, so a
    /// timer stored in it must be handed off to fire.
    pub fn is_loaded(&self, id: TimerId) -> bool {
        let slot = self.layout.slot_of(id.rand);
        self.ranges
            .read()
            .expect("ranges lock")
            .iter()
            .any(|h| h.range.contains(slot) && id.bucket_ms <= h.horizon.load(Ordering::SeqCst))
    }

    /// Gives stored timers to the owning range if their bucket is already loaded (or being
    /// loaded); the others will be read from the store in time. A timer the range already
    /// knows (loaded, fired, cancelled, or in a bucket it deleted) is not admitted again.
    /// `guard` is released once every range has applied its share.
    pub fn hand_off(&self, timers: Vec<Timer>, guard: Option<Arc<WriteGuard>>) {
        self.hand_off_as(timers, guard, false)
    }

    /// Hands off again a timer an idempotent retry found stored: the range drops it if it
    /// deleted that bucket (the timer fired) or its recorded progress covers it.
    pub fn hand_off_repeat(&self, timers: Vec<Timer>, guard: Option<Arc<WriteGuard>>) {
        self.hand_off_as(timers, guard, true)
    }

    fn hand_off_as(&self, timers: Vec<Timer>, guard: Option<Arc<WriteGuard>>, repeat: bool) {
        let ranges = self.ranges.read().expect("ranges lock");
        let mut per_range: Vec<Vec<Timer>> = ranges.iter().map(|_| Vec::new()).collect();
        for t in timers {
            let slot = self.layout.slot_of(t.id.rand);
            if let Some(i) = ranges.iter().position(|h| h.range.contains(slot))
                && t.id.bucket_ms <= ranges[i].horizon.load(Ordering::SeqCst)
            {
                per_range[i].push(t);
            }
        }
        for (h, near) in ranges.iter().zip(per_range) {
            if !near.is_empty() {
                let _ = h.tx.send(Msg::HandOff(near, guard.clone(), repeat));
            }
        }
    }

    fn sender_for(&self, id: TimerId) -> Option<mpsc::UnboundedSender<Msg>> {
        let slot = self.layout.slot_of(id.rand);
        self.ranges
            .read()
            .expect("ranges lock")
            .iter()
            .find(|h| h.range.contains(slot))
            .map(|h| h.tx.clone())
    }

    /// Blocks the timer from firing while a cancel is written. `None` when this node does
    /// not own the timer's slot (the store alone decides then). With `must_act`, a range
    /// that may not act now (a member whose lease lapsed) changes nothing and answers
    /// [`CancelProbe::NotActing`].
    pub async fn begin_cancel(&self, id: TimerId, must_act: bool) -> Result<Option<CancelProbe>> {
        let Some(tx) = self.sender_for(id) else {
            return Ok(None);
        };
        let (reply, rx) = oneshot::channel();
        tx.send(Msg::BeginCancel(id, must_act, reply))
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map(Some).map_err(|_| Error::ShuttingDown)
    }

    /// Finishes a cancel begun with `begin_cancel`: `None` if the store write failed
    /// (the timer becomes pending again).
    pub fn end_cancel(&self, id: TimerId, outcome: Option<CancelOutcome>) {
        if let Some(tx) = self.sender_for(id) {
            let _ = tx.send(Msg::EndCancel(id, outcome, None));
        }
    }

    /// [`end_cancel`](Self::end_cancel), answering whether the range running `id`'s slot
    /// still may act once the cancel's store write is done. Only then is the cancel sure:
    /// a member taking the slot over starts only after this one's lease could be valid,
    /// so it reads the row as cancelled. `false` when no range here runs the slot.
    pub async fn end_cancel_acting(&self, id: TimerId, outcome: Option<CancelOutcome>) -> bool {
        let Some(tx) = self.sender_for(id) else {
            return false;
        };
        let (reply, rx) = oneshot::channel();
        if tx.send(Msg::EndCancel(id, outcome, Some(reply))).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Asks the range running `timer`'s slot to make sure the stored, pending `timer` fires
    /// (a member stored it while the range moved here, and this range may have read its
    /// bucket before the row landed). `None`: no range here runs the slot.
    ///
    /// With `force` the timer is taken into memory whatever its bucket's state, unless the
    /// range knows it (held, or fired or cancelled lately) or an earlier owner's progress
    /// covers it: for a row read again after its bucket's delete, or a timer carried by
    /// value whose row that delete removed unfired.
    ///
    /// `writer`: the member that wrote the row asks (it found the slot's range moved during
    /// the write), not a repeat of its key. Then a timer only the delivered-through mark of
    /// an earlier owner's progress covers is fired all the same: that owner may never have
    /// read the row.
    pub async fn adopt(&self, timer: Timer, force: bool, writer: bool) -> Option<Adoption> {
        let loaded = self.is_loaded(timer.id);
        let tx = self.sender_for(timer.id)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Msg::Adopt(timer, loaded, force, writer, reply))
            .ok()?;
        rx.await.ok()
    }

    /// What memory knows of a timer, if it is held there (or fired or was cancelled there
    /// lately, its bucket since deleted).
    pub async fn status(&self, id: TimerId) -> Option<MemState> {
        let tx = self.sender_for(id)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Msg::Status(id, reply)).ok()?;
        rx.await.ok().flatten()
    }

    /// Stops every range: no new fires, in-flight deliveries finish, low-water marks written.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _one_at_a_time = self.assigning.lock().await;
        // Ranges stay registered while they stop, so a write that completes meanwhile is
        // still handed to its range (which keeps it, unfired, out of its final progress)
        // instead of finding no range and letting its guard go.
        let stopping: Vec<_> = self
            .ranges
            .read()
            .expect("ranges lock")
            .iter()
            .map(|h| (h.range, h.tx.clone()))
            .collect();
        for (_, tx) in &stopping {
            ask_to_stop(tx).await;
        }
        let handles = std::mem::take(&mut *self.ranges.write().expect("ranges lock"));
        for h in handles {
            let _ = h.task.await;
        }
        if let Err(e) = self.sink.flush().await {
            tracing::warn!(error = %e, "scheduler.shutdown: sink flush failed");
        }
    }
}

/// Asks a range to stop and waits until it has (deliveries finished, progress written).
async fn ask_to_stop(tx: &mpsc::UnboundedSender<Msg>) {
    let (reply, rx) = oneshot::channel();
    if tx.send(Msg::Shutdown(reply, None)).is_ok() {
        let _ = rx.await;
    }
}
