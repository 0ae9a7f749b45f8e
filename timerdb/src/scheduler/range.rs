//! The scheduler of one owned slot range: its in-memory wheel, its loader and its firing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::{
    Adoption, CancelProbe, MemState, MemoryUse, Msg, RangeHandle, RangeStats, SchedulerConfig,
    Writes, timer_bytes,
};
use crate::Result;
use crate::metrics as m;
use crate::sink::{Delivery, Sink};
use crate::store::{CancelOutcome, Coverage, LoadedBucket, Progress, Resume, TimerStore};
use crate::timer::{Layout, SlotRange, Timer, TimerId, now_ms};

/// Timers per `Loaded` message.
const LOAD_SLICE: usize = 1024;
/// Pause between the slices of a bucket that is not due yet.
const LOAD_PACE: Duration = Duration::from_millis(2);
/// Slices of a bucket due sooner than this are not paced.
const LOAD_PACE_MARGIN_MS: u64 = 500;
/// Timers the range task applies from its queue before it fires what is due.
const MAX_WORK_BETWEEN_FIRES: usize = 4096;
/// How often the range's progress (delivered-through mark) is written: after a crash,
/// about this much of the fires before it happen again.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Most failing timers a progress record lists by id; past that it stops advancing.
const MAX_UNCONFIRMED: usize = 1024;
/// How far behind the progress mark fired timers are still remembered by id.
const RECENT_FIRED_MS: u64 = 5_000;
/// How long ids adopted or cancelled are remembered (wall clock): longer than a member
/// keeps asking for an adoption (`api::KEEP_ADOPTING`, each ask waiting for the owner's
/// start and an overdue fire).
const REMEMBER: Duration = Duration::from_secs(60);
/// Most ids remembered at once (~40 bytes each): past it the oldest go first.
const MAX_REMEMBERED: usize = 1 << 20;
/// How long a deleted bucket is remembered, so a late repeat hand-off into it is dropped
/// instead of firing a timer a second time.
const DELETED_MEMORY_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    InFlight,
    Fired,
    /// Read (or handed off) while an earlier owner's recorded progress claims it
    /// delivered, so not fired here. The record cannot say which rows its writer read: a
    /// row that landed after that owner read the bucket is covered too, unfired. Asked to
    /// adopt such a timer (its writer, or a repeat of its key, says it may not have been
    /// delivered), the range fires it ([`RangeTask::uncover`]).
    Covered,
    /// A cancel is being written; `had_timer` says whether the timer was in memory.
    Cancelling {
        had_timer: bool,
    },
    Cancelled,
}

struct Entry {
    due_ms: u64,
    state: State,
    attempts: u32,
    /// Present while the timer may still fire; dropped once fired or cancelled. Boxed so
    /// that fired entries, kept until their bucket is deleted, cost ~32 bytes, not ~200.
    timer: Option<Box<Timer>>,
}

const _: () = assert!(std::mem::size_of::<Entry>() <= 32);

/// The timers of one bucket this range holds in memory. Keeping them in a map per bucket
/// (rather than one map of every timer) makes forgetting a deleted bucket one drop instead
/// of a removal per timer, and lets a loaded bucket reserve its whole map at once.
#[derive(Default)]
struct Bucket {
    entries: HashMap<TimerId, Entry, foldhash::fast::RandomState>,
    /// Timers that are pending, in flight, or being cancelled.
    open: usize,
    deleting: bool,
    /// Holds rows that could not be decoded: settled like a deleted bucket, but its rows
    /// stay in the store for an operator to inspect.
    keep_in_store: bool,
    /// Rows read but not loaded (cancelled, or their key belongs to another timer): a
    /// cluster member deletes these and the rows of `entries`, and no other.
    skipped: Vec<TimerId>,
    /// Entries that came in while the bucket's delete was under way (adopted, cancelled):
    /// that delete does not name their rows, so the bucket stays for them.
    added_while_deleting: Vec<TimerId>,
}

/// The pause a range takes in one kind of housekeeping store write after one failed:
/// from 200 ms, doubling to 2.5 s, each with up to as much again of jitter (so at most
/// 5 s; ranges failing together do not retry together). It ends after a round of that
/// kind (the writes one housekeeping tick started) with no failure: a round in which
/// some deletes succeed and others fail, as against an overloaded store, keeps it growing.
#[derive(Default)]
struct StoreRetry {
    delays: Option<backon::ExponentialBackoff>,
    until: Option<Instant>,
    /// A write of the current round failed.
    failed: bool,
}

/// A [`StoreRetry`] per kind of housekeeping write: one kind succeeding (a progress
/// record is a single small row) says little about another (a bucket's deletes).
#[derive(Default)]
struct HousekeepingRetry {
    deletes: StoreRetry,
    progress: StoreRetry,
    low_water: StoreRetry,
}

impl StoreRetry {
    const FIRST: Duration = Duration::from_millis(200);
    const MOST: Duration = Duration::from_millis(2_500);

    /// A round of writes begins; the one before it, if none of its writes failed, ended
    /// the backoff.
    fn round(&mut self) {
        if !self.failed {
            self.delays = None;
        }
        self.failed = false;
    }

    /// Notes how a housekeeping write ended.
    fn outcome(&mut self, ok: bool) {
        if ok {
            return;
        }
        self.failed = true;
        let delays = self.delays.get_or_insert_with(|| {
            use backon::BackoffBuilder;
            backon::ExponentialBuilder::default()
                .with_min_delay(Self::FIRST)
                .with_max_delay(Self::MOST)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .build()
        });
        // Never exhausted (no most times); the jitter may double the delay.
        let pause = delays.next().unwrap_or(2 * Self::MOST);
        self.until = Some(Instant::now() + pause);
    }

    /// Whether the range should not try a housekeeping write of this kind yet.
    fn waiting(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() < u)
    }
}

/// Records the low-water mark of `range`, under `fence` (its epoch) for a cluster member;
/// a refusal (a newer owner claimed a slot) is counted and logged.
async fn write_low_water(
    store: &dyn TimerStore,
    fence: Option<u64>,
    range: SlotRange,
    bucket_ms: u64,
) -> Result<()> {
    let written = match fence {
        Some(epoch) => {
            store
                .set_low_water_mark_fenced(range, bucket_ms, epoch)
                .await
        }
        None => store.set_low_water_mark(range, bucket_ms).await,
    };
    if let Err(crate::Error::Fenced(why)) = &written {
        m::fenced("low_water_mark");
        tracing::warn!(range = %range, bucket_ms, %why, "scheduler.low_water: refused by the store; a newer owner claimed these slots");
    }
    written
}

/// Starts the scheduler of `range`: reads its low-water mark, then runs its task and loader.
pub(super) async fn start(
    range: SlotRange,
    tag: u64,
    store: Arc<dyn TimerStore>,
    sink: Arc<dyn Sink>,
    config: SchedulerConfig,
    in_memory: Arc<MemoryUse>,
    writes: Arc<Writes>,
) -> Result<RangeHandle> {
    let layout = store.layout();
    let fence = config.fence(tag);
    // A cluster member claims the slots under the range's epoch before reading anything:
    // from here on the marks of an earlier owner that is still writing are refused.
    if let Some(epoch) = fence {
        store.claim_slots(range, epoch).await.inspect_err(|e| {
            if matches!(e, crate::Error::Fenced(_)) {
                m::fenced("claim");
            }
        })?;
    }
    let start_bucket = match store.low_water_mark(range).await? {
        Some(b) => b,
        None => {
            // A range never scheduled before: nothing can be older than the present bucket
            // (writers only use buckets after "now"), so record that before serving.
            let b = layout.bucket_start(now_ms());
            write_low_water(&*store, fence, range, b).await?;
            b
        }
    };
    // What the earlier owners of these slots confirmed as delivered: not fired again.
    let resume = Resume::new(store.progress(range).await?, now_ms());
    tracing::info!(
        range = %range,
        low_water_ms = start_bucket,
        fired_through_ms = resume.fired_through_ms(),
        "scheduler.start"
    );
    let (go, go_rx) = tokio::sync::oneshot::channel();
    let horizon = Arc::new(AtomicU64::new(start_bucket.saturating_sub(1)));
    let (tx, rx) = mpsc::unbounded_channel();
    let stop_loader = Arc::new(AtomicBool::new(false));
    let loader = tokio::spawn(
        Loader {
            range,
            layout,
            store: store.clone(),
            config: config.clone(),
            horizon: horizon.clone(),
            in_memory: in_memory.clone(),
            tx: tx.clone(),
            stop: stop_loader.clone(),
        }
        .run(start_bucket, go_rx),
    );
    let stats = Arc::new(RangeStats::default());
    stats.low_water_ms.store(start_bucket, Ordering::Relaxed);
    let task = RangeTask {
        retry: HousekeepingRetry::default(),
        tag,
        cutoff: None,
        acted_until_ms: 0,
        recent_fired: Vec::new(),
        remembered: Default::default(),
        stats: stats.clone(),
        range,
        layout,
        store,
        sink,
        config,
        tx: tx.clone(),
        horizon: horizon.clone(),
        writes,
        inherited: resume.of_range(range),
        resume,
        deleted: BTreeSet::new(),
        retrying: HashSet::new(),
        inflight_due: BTreeMap::new(),
        cancelling: HashMap::new(),
        progress_written: None,
        progress_writing: false,
        last_progress_write: Instant::now(),
        due: DueQueue::default(),
        buckets: BTreeMap::new(),
        next_unsettled: start_bucket,
        in_memory,
        held: 0,
        held_bytes: 0,
        inflight: 0,
        lwm_written: start_bucket,
        lwm_writing: false,
        last_lwm_write: Instant::now(),
        stopping: None,
        loader,
        stop_loader,
    };
    let task = tokio::spawn(task.run(rx));
    Ok(RangeHandle {
        tag,
        stats,
        started: std::time::Instant::now(),
        range,
        tx,
        horizon,
        task,
        go: Some(go),
    })
}

struct Loader {
    range: SlotRange,
    layout: Layout,
    store: Arc<dyn TimerStore>,
    config: SchedulerConfig,
    horizon: Arc<AtomicU64>,
    in_memory: Arc<MemoryUse>,
    tx: mpsc::UnboundedSender<Msg>,
    stop: Arc<AtomicBool>,
}

impl Loader {
    /// Reads buckets from `next` on, each a little before it is due, and settles the
    /// empty stretches in between without reading them one by one.
    async fn run(self, mut next: u64, go: tokio::sync::oneshot::Receiver<()>) {
        if go.await.is_err() {
            return;
        }
        let w = self.layout.bucket_ms;
        let lookahead = self.config.lookahead.as_millis() as u64;
        while !self.stop.load(Ordering::SeqCst) {
            let target = self.layout.bucket_start(now_ms() + lookahead);
            if next > target {
                tokio::time::sleep(Duration::from_millis((next - target).clamp(1, w).min(50)))
                    .await;
                continue;
            }
            if self
                .in_memory
                .full(self.config.max_in_memory, self.config.max_in_memory_bytes)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            // Rule 1: raise the horizon before reading, so a timer written from now on
            // into these buckets is handed off, and one written before is read.
            if self.horizon.load(Ordering::SeqCst) < target {
                self.horizon.store(target, Ordering::SeqCst);
            }
            let found = match self.store.next_bucket(self.range, next, target).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(range = %self.range, error = %e, "scheduler.load: store unavailable, retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let bucket = match found {
                Some(b) if b <= target => b,
                _ => {
                    if self.tx.send(Msg::Settled(target)).is_err() {
                        return;
                    }
                    next = target + w;
                    continue;
                }
            };
            // A page at a time: between pages the memory limits are checked again, so a
            // huge bucket ("everything at midnight") is never read into memory whole.
            let mut after = None;
            loop {
                if after.is_some() {
                    while self
                        .in_memory
                        .full(self.config.max_in_memory, self.config.max_in_memory_bytes)
                    {
                        if self.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                let loaded = match crate::failpoint::hit_async("scheduler.before_load").await {
                    Ok(()) => {
                        self.store
                            .load_page(self.range, bucket, after, self.config.load_page_rows)
                            .await
                    }
                    Err(e) => Err(e),
                };
                let page = match loaded {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(range = %self.range, bucket_ms = bucket, error = %e, "scheduler.load: store unavailable, retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if self.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        continue;
                    }
                };
                let last_page = page.next.is_none();
                if !self.send_page(bucket, page.rows, last_page).await {
                    return;
                }
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            next = bucket + w;
        }
    }

    /// Hands one page of `bucket` to the range, in slices, so the range task fires between
    /// them instead of stalling for a whole page (a 60,000-timer bucket in one message
    /// delayed the timers due meanwhile by 15-75 ms). False once the range is gone.
    async fn send_page(&self, bucket: u64, loaded: LoadedBucket, last_page: bool) -> bool {
        m::loaded(loaded.timers.len());
        let LoadedBucket {
            timers,
            mut cancelled,
            mut superseded,
            mut unreadable,
        } = loaded;
        let total = timers.len();
        let mut parts = slices(timers, LOAD_SLICE).peekable();
        while let Some(timers) = parts.next() {
            let last_slice = parts.peek().is_none();
            // The skipped rows go with the last slice.
            let rest = |v: &mut Vec<_>| {
                if last_slice {
                    std::mem::take(v)
                } else {
                    Vec::new()
                }
            };
            let part = LoadedBucket {
                timers,
                cancelled: rest(&mut cancelled),
                superseded: rest(&mut superseded),
                unreadable: if last_slice {
                    std::mem::take(&mut unreadable)
                } else {
                    Vec::new()
                },
            };
            let bytes: usize = part.timers.iter().map(timer_bytes).sum();
            self.in_memory
                .loading
                .0
                .fetch_add(part.timers.len(), Ordering::Relaxed);
            self.in_memory.loading.1.fetch_add(bytes, Ordering::Relaxed);
            let last = last_page && last_slice;
            if self
                .tx
                .send(Msg::Loaded(bucket, part, last, total, bytes))
                .is_err()
            {
                return false;
            }
            // A bucket read ahead of time is handed over at a pace, so the range task
            // fires what is due between slices rather than spending a burst of
            // milliseconds on admitting a whole bucket. Overdue buckets (catching up after
            // a restart) go at once.
            if !last && bucket > now_ms() + LOAD_PACE_MARGIN_MS {
                tokio::time::sleep(LOAD_PACE).await;
            }
        }
        true
    }
}

/// Cuts `timers` into owned slices of at most `n`, each allocated for its own length only
/// (`Vec::split_off` would leave every front slice holding the whole original buffer).
/// Always yields at least one slice, so an empty bucket still reports itself loaded.
fn slices(timers: Vec<Timer>, n: usize) -> impl Iterator<Item = Vec<Timer>> {
    let total = timers.len();
    let mut it = timers.into_iter();
    let count = total.div_ceil(n).max(1);
    (0..count).map(move |_| it.by_ref().take(n).collect())
}

/// Pending timers by due millisecond: a list per millisecond, in a map holding the few
/// thousand distinct milliseconds in memory. Adding and taking a timer cost a lookup in
/// that small map plus a push or pop, where a binary heap over every pending timer cost
/// a cache miss per level on each pop (8 % of the node's CPU at 100,000 timers/s).
#[derive(Default)]
struct DueQueue {
    by_ms: BTreeMap<u64, Vec<TimerId>>,
}

impl DueQueue {
    fn push(&mut self, due_ms: u64, id: TimerId) {
        self.by_ms.entry(due_ms).or_default().push(id);
    }

    /// The earliest due time queued.
    fn first_due(&self) -> Option<u64> {
        self.by_ms.first_key_value().map(|(due, _)| *due)
    }

    /// Takes one timer due at or before `now`, earliest millisecond first.
    fn pop_due(&mut self, now: u64) -> Option<(u64, TimerId)> {
        let mut first = self.by_ms.first_entry()?;
        let due = *first.key();
        if due > now {
            return None;
        }
        let id = first.get_mut().pop();
        if first.get().is_empty() {
            first.remove();
        }
        // Lists are never left empty, so a due entry always yields a timer.
        id.map(|id| (due, id))
    }
}

struct RangeTask {
    stats: Arc<RangeStats>,
    /// Holds bucket deletes, progress records and low-water marks back after one failed.
    retry: HousekeepingRetry,
    /// Set when the range is given up while writes were under way (see `Scheduler::assign`).
    cutoff: Option<u64>,
    /// The last moment (ms) this range was seen allowed to act (its lease held). A member
    /// whose lease lapsed fired nothing after it, and no other owner created a timer by
    /// it, so progress up to it stays true when it is written late (see `run`'s stop).
    acted_until_ms: u64,
    /// The epoch it runs under (0 on a single node).
    tag: u64,
    /// Timers fired lately, with their due time (the later of epoch and creation), until
    /// the progress mark passes them.
    recent_fired: Vec<(u64, TimerId)>,
    /// Ids this range was asked to adopt, or cancelled, within the last [`REMEMBER`]
    /// (wall clock), oldest first: one not in memory any more fired or was cancelled, and
    /// its bucket may be deleted since. A timer adopted by value must not fire again, nor
    /// come back after a cancel ([`RangeTask::settled_lately`]).
    remembered: std::collections::VecDeque<(Instant, TimerId, MemState)>,
    range: SlotRange,
    layout: Layout,
    store: Arc<dyn TimerStore>,
    sink: Arc<dyn Sink>,
    config: SchedulerConfig,
    tx: mpsc::UnboundedSender<Msg>,
    /// The loader's horizon: buckets at or before it are read (or being read).
    horizon: Arc<AtomicU64>,
    /// Writes under way on this node (rule 4).
    writes: Arc<Writes>,
    /// The progress found at start: loaded timers it covers count as fired.
    resume: Resume,
    /// The earlier owner's record of exactly this range: this range's own records replace
    /// it in the store, so until they say at least as much, they carry it along.
    inherited: Option<Progress>,
    /// Buckets deleted lately; a hand-off into one of them is a repeat of a fired timer.
    deleted: BTreeSet<u64>,
    /// Timers whose delivery failed and that are not confirmed yet.
    retrying: HashSet<TimerId>,
    /// Batches at the sink, by their earliest due time.
    inflight_due: BTreeMap<u64, usize>,
    /// Loaded timers being cancelled, with their due time.
    cancelling: HashMap<TimerId, u64>,
    progress_written: Option<Progress>,
    progress_writing: bool,
    last_progress_write: Instant,
    due: DueQueue,
    buckets: BTreeMap<u64, Bucket>,
    /// Every bucket before this was read (or found empty) by the loader.
    next_unsettled: u64,
    /// What all ranges hold in memory, for the loader's backpressure.
    in_memory: Arc<MemoryUse>,
    /// This range's share of `in_memory`: timers and bytes.
    held: usize,
    held_bytes: usize,
    inflight: usize,
    lwm_written: u64,
    lwm_writing: bool,
    last_lwm_write: Instant,
    stopping: Option<(tokio::sync::oneshot::Sender<()>, Instant)>,
    loader: tokio::task::JoinHandle<()>,
    stop_loader: Arc<AtomicBool>,
}

impl RangeTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut housekeeping = tokio::time::interval(Duration::from_millis(100));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    let mut work = self.handle(msg);
                    // Take more of what is queued before firing, so bursts cost one pass,
                    // but only a bounded amount, so due timers are never held up long.
                    while work < MAX_WORK_BETWEEN_FIRES {
                        match rx.try_recv() {
                            Ok(msg) => work += self.handle(msg),
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
                _ = housekeeping.tick() => self.housekeeping(),
            }
            if self.stopping.is_none() {
                self.fire_due();
            }
            if let Some((_, since)) = &self.stopping {
                let timed_out = since.elapsed() >= self.config.shutdown_timeout;
                if (self.inflight == 0 && !self.lwm_writing && !self.progress_writing) || timed_out
                {
                    if timed_out {
                        tracing::warn!(range = %self.range, inflight = self.inflight, "scheduler.stop: deliveries still in flight at timeout; they will fire again after restart");
                    }
                    break;
                }
            }
        }
        self.stop_loader.store(true, Ordering::SeqCst);
        self.loader.abort();
        // Wait until the loader has really stopped (an abort takes effect at its next
        // await, and it may be running on another thread right now), so no slice it counts
        // in `loading` arrives after the drain below and stays counted for ever.
        let _ = (&mut self.loader).await;
        // Loaded slices never taken in are no longer on their way.
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Loaded(_, l, _, _, bytes) = msg {
                self.arrived(l.timers.len(), bytes);
            }
        }
        self.in_memory
            .timers
            .fetch_sub(self.held, Ordering::Relaxed);
        self.in_memory
            .bytes
            .fetch_sub(self.held_bytes, Ordering::Relaxed);
        self.report_memory();
        // Persist how far this range got, so a restart scans as little as possible and
        // fires nothing again that was confirmed.
        let may_act = self.acting();
        // Without a lease (the last members of a stopping cluster have no quorum) the
        // record still goes, but only as far as the lease last held: nothing was fired
        // after that, and every timer another owner creates is due later, so the record
        // is true however late it lands. Low-water marks stay with the lease holder.
        let progress = if may_act {
            self.progress_candidate_until(u64::MAX)
        } else if self.acted_until_ms == 0 {
            // Never held a lease: it fired nothing, and an empty record would only
            // overwrite the previous owner's record of the same range.
            None
        } else {
            tracing::info!(range = %self.range, acted_until_ms = self.acted_until_ms, "scheduler.stop: lease lapsed; progress recorded up to its end");
            self.progress_candidate_until(self.acted_until_ms.saturating_sub(1))
        };
        if let Some(progress) = progress.filter(|p| Some(p) != self.progress_written.as_ref())
            && let Err(e) = self.store.set_progress(self.range, &progress).await
        {
            tracing::warn!(range = %self.range, error = %e, "scheduler.stop: progress not written; recent fires will fire again after restart");
        }
        let lwm = self.low_water_candidate();
        if may_act
            && lwm > self.lwm_written
            && let Err(e) =
                write_low_water(&*self.store, self.config.fence(self.tag), self.range, lwm).await
        {
            tracing::warn!(range = %self.range, error = %e, "scheduler.stop: low-water mark not written");
        }
        if let Some((reply, _)) = self.stopping.take() {
            let _ = reply.send(());
        }
        tracing::info!(range = %self.range, "scheduler.stop");
    }

    fn next_wake(&self) -> Instant {
        let now = now_ms();
        match self.due.first_due() {
            Some(due) if self.inflight < self.config.max_inflight_batches => {
                Instant::now() + Duration::from_millis(due.saturating_sub(now))
            }
            _ => Instant::now() + Duration::from_secs(1),
        }
    }

    /// Applies one message; returns roughly how many timers it touched.
    fn handle(&mut self, msg: Msg) -> usize {
        let work = match &msg {
            Msg::HandOff(t, _, _) => t.len(),
            Msg::Loaded(_, l, _, _, _) => l.timers.len(),
            Msg::Delivered(b, _, _, _) => b.len(),
            _ => 1,
        };
        match msg {
            Msg::HandOff(timers, guard, repeat) => {
                for t in timers {
                    // A repeat of a timer whose bucket was deleted here (every timer in it
                    // fired or was cancelled) must not fire again.
                    if repeat && self.deleted.contains(&t.id.bucket_ms) {
                        continue;
                    }
                    // Nor one the recorded progress shows delivered: a repeat, or a fresh
                    // timer the previous range of its slot fired after loading it while the
                    // write was still handing it off.
                    if let Some(how) = self.resume.coverage(self.layout, t.id.bucket_ms, &t) {
                        self.admit_covered(t.id, how);
                        continue;
                    }
                    self.admit(t);
                }
                // Admitted: the write no longer holds back deletes and progress.
                drop(guard);
            }
            Msg::Loaded(bucket, loaded, last, total, bytes) => {
                self.arrived(loaded.timers.len(), bytes);
                self.loaded(bucket, loaded, last, total)
            }
            Msg::Settled(upto) => {
                self.next_unsettled = self.next_unsettled.max(upto + self.layout.bucket_ms)
            }
            Msg::Delivered(batch, outcomes, fired_at, first_due) => {
                self.delivered(batch, outcomes, fired_at, first_due)
            }
            Msg::ProgressWritten(progress, ok) => {
                self.progress_writing = false;
                self.retry.progress.outcome(ok);
                if ok {
                    self.progress_written = Some(progress);
                }
            }
            Msg::BucketDeleted(bucket, ok) => self.bucket_deleted(bucket, ok),
            Msg::LowWaterWritten(lwm, ok) => {
                self.lwm_writing = false;
                self.retry.low_water.outcome(ok);
                if ok {
                    self.lwm_written = self.lwm_written.max(lwm);
                    self.stats
                        .low_water_ms
                        .store(self.lwm_written, Ordering::Relaxed);
                }
            }
            Msg::BeginCancel(id, must_act, reply) => {
                // A range that may not act (lease lapsed, or moving away) changes nothing:
                // its successor may hold the timer loaded, and a cancel written to the
                // store only would not keep it from firing there.
                let probe = if !must_act || self.acting() {
                    self.begin_cancel(id)
                } else {
                    CancelProbe::NotActing
                };
                let _ = reply.send(probe);
            }
            Msg::EndCancel(id, outcome, acting) => {
                // Only the range that blocked the timer can vouch for the cancel: one
                // started since on the same slots (a range reshaped by a move) may have
                // loaded the timer before the write landed, and would fire it.
                let ended_here = self.end_cancel(id, outcome);
                if let Some(reply) = acting {
                    let _ = reply.send(ended_here && self.acting());
                }
            }
            Msg::Status(id, reply) => {
                // An adopted timer that fired may have its bucket deleted a moment later;
                // asked after that, it is still known as fired (not as unknown).
                let _ = reply.send(self.mem_state(id).or_else(|| self.settled_lately(id)));
            }
            Msg::Adopt(t, loaded, force, writer, reply) => {
                let id = t.id;
                let verdict = if writer && self.entry_state(id) == Some(State::Covered) {
                    self.uncover(t);
                    Adoption::Admitted
                } else if let Some(state) = self.mem_state(t.id) {
                    Adoption::Known(state)
                } else if let Some(state) = force.then(|| self.settled_lately(t.id)).flatten() {
                    // Its bucket was deleted since it fired or was cancelled here.
                    Adoption::Known(state)
                } else if let Some(how) = self.resume.coverage(self.layout, t.id.bucket_ms, &t) {
                    match (self.settled_lately(id), how) {
                        // Fired here after an adoption, or cancelled, its bucket since
                        // deleted (this read of its row was older than that).
                        (Some(state), _) => Adoption::Known(state),
                        (None, Coverage::Listed) => Adoption::Known(MemState::Fired),
                        (None, Coverage::Mark) if writer => {
                            // Not read yet, or read and deleted as covered.
                            self.uncover(t);
                            Adoption::Admitted
                        }
                        (None, Coverage::Mark) => Adoption::Covered,
                    }
                } else if !loaded && !force {
                    Adoption::Unloaded
                } else if self.deleted.contains(&t.id.bucket_ms) && !force {
                    Adoption::BucketDeleted
                } else {
                    self.admit(t);
                    Adoption::Admitted
                };
                // Held, or read with its bucket, from here on: once it is gone from
                // memory, it fired or was cancelled.
                if matches!(verdict, Adoption::Known(_) | Adoption::Admitted) {
                    self.remember(id, MemState::Fired);
                }
                let _ = reply.send(verdict);
            }
            Msg::Shutdown(reply, cutoff) => {
                self.stop_loader.store(true, Ordering::SeqCst);
                self.stopping = Some((reply, Instant::now()));
                self.cutoff = cutoff;
            }
        }
        work.max(1)
    }

    /// A loaded slice of `timers` taking `bytes` is no longer on its way from the loader.
    fn arrived(&self, timers: usize, bytes: usize) {
        self.in_memory
            .loading
            .0
            .fetch_sub(timers, Ordering::Relaxed);
        self.in_memory.loading.1.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Counts a timer of `bytes` (its [`timer_bytes`]) as held in memory.
    fn hold(&mut self, bytes: usize) {
        self.held += 1;
        self.held_bytes += bytes;
        self.stats.in_memory.store(self.held, Ordering::Relaxed);
        self.in_memory.timers.fetch_add(1, Ordering::Relaxed);
        self.in_memory.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `t` as no longer held.
    fn release(&mut self, t: &Timer) {
        let bytes = timer_bytes(t);
        self.held -= 1;
        self.held_bytes -= bytes;
        self.stats.in_memory.store(self.held, Ordering::Relaxed);
        self.in_memory.timers.fetch_sub(1, Ordering::Relaxed);
        self.in_memory.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn report_memory(&self) {
        m::in_memory(
            self.in_memory.timers.load(Ordering::Relaxed),
            self.in_memory.bytes.load(Ordering::Relaxed),
        );
    }

    /// The state of timer `id` in memory, if it holds it.
    fn entry_state(&self, id: TimerId) -> Option<State> {
        self.buckets
            .get(&id.bucket_ms)
            .and_then(|b| b.entries.get(&id))
            .map(|e| e.state)
    }

    /// What memory knows of timer `id`, if it holds it. One an earlier owner's record
    /// covers counts as fired.
    fn mem_state(&self, id: TimerId) -> Option<MemState> {
        Some(match self.entry_state(id)? {
            State::Pending => MemState::Pending,
            State::InFlight => MemState::Firing,
            State::Fired | State::Covered => MemState::Fired,
            State::Cancelling { .. } | State::Cancelled => MemState::Cancelled,
        })
    }

    /// Whether `id`, not in memory, fired or was cancelled here lately, though its bucket
    /// may be deleted by now: it was cancelled, or adopted (so held), within
    /// [`REMEMBER`], or it fired within `RECENT_FIRED_MS` of the progress mark.
    fn settled_lately(&self, id: TimerId) -> Option<MemState> {
        if let Some((_, _, state)) = self.remembered.iter().rev().find(|(_, i, _)| *i == id) {
            Some(*state)
        } else if self.recent_fired.iter().any(|(_, f)| *f == id) {
            Some(MemState::Fired)
        } else {
            None
        }
    }

    /// Notes `id` in [`RangeTask::remembered`]: adopted (so it fires, or is cancelled, once
    /// it is gone from memory) or cancelled.
    fn remember(&mut self, id: TimerId, state: MemState) {
        if self.remembered.len() >= MAX_REMEMBERED {
            self.remembered.pop_front();
        }
        self.remembered.push_back((Instant::now(), id, state));
    }

    /// Adds a pending timer unless its id is already known (loaded and handed off, fired,
    /// or cancelled).
    fn admit(&mut self, t: Timer) {
        let id = t.id;
        let due_ms = t.spec.fire_at_ms;
        let b = self.buckets.entry(id.bucket_ms).or_default();
        let slot = match b.entries.entry(id) {
            std::collections::hash_map::Entry::Vacant(slot) => slot,
            std::collections::hash_map::Entry::Occupied(mut e) => {
                // A cancel is being written for a timer that was not in memory: keep the
                // timer with the marker, so a failed cancel leaves it pending, not lost.
                let e = e.get_mut();
                if e.state == (State::Cancelling { had_timer: false }) {
                    e.state = State::Cancelling { had_timer: true };
                    e.due_ms = due_ms;
                    let bytes = timer_bytes(&t);
                    e.timer = Some(Box::new(t));
                    self.cancelling.insert(id, due_ms);
                    self.hold(bytes);
                }
                return;
            }
        };
        let bytes = timer_bytes(&t);
        slot.insert(Entry {
            due_ms,
            state: State::Pending,
            attempts: 0,
            timer: Some(Box::new(t)),
        });
        if b.deleting {
            b.added_while_deleting.push(id);
        }
        b.open += 1;
        self.due.push(due_ms, id);
        self.hold(bytes);
    }

    fn loaded(&mut self, bucket: u64, loaded: LoadedBucket, last: bool, total: usize) {
        if !loaded.unreadable.is_empty() {
            // Copies go to the dead-letter topic (where the sink has one); the rows stay.
            let rows = loaded.unreadable.clone();
            let sink = self.sink.clone();
            tokio::spawn(async move {
                for row in &rows {
                    if let Err(e) = sink.dead_letter_unreadable(row).await {
                        tracing::warn!(timer_id = %row.id, error = %e, "could not dead-letter an unreadable row; it stays in the store");
                    }
                }
            });
        }
        if loaded.has_rows() || total > 0 {
            // Cancelled and superseded rows are not loaded, but the bucket must still be
            // deleted; one with unreadable rows is settled but left in the store.
            let b = self.buckets.entry(bucket).or_default();
            b.keep_in_store |= !loaded.unreadable.is_empty();
            b.skipped.extend(loaded.cancelled);
            b.skipped.extend(loaded.superseded);
            // Room for the whole bucket at its first slice: no rehashing while it comes in.
            b.entries.reserve(total.saturating_sub(b.entries.len()));
        }
        let resume = std::mem::take(&mut self.resume);
        for t in loaded.timers {
            if let Some(how) = resume.coverage(self.layout, bucket, &t) {
                self.admit_covered(t.id, how);
            } else {
                self.admit(t);
            }
        }
        self.resume = resume;
        // Each record is kept until the last slice of the last bucket it speaks of.
        if last {
            self.resume.forget_before(bucket + self.layout.bucket_ms);
        }
        if last {
            self.next_unsettled = self.next_unsettled.max(bucket + self.layout.bucket_ms);
        }
        self.report_memory();
    }

    /// Records a loaded timer that the last recorded progress says was delivered: it is
    /// known (a late duplicate of it is not admitted) but does not fire again, unless its
    /// writer asks for it to be adopted and only the record's mark covers it
    /// ([`RangeTask::uncover`]).
    fn admit_covered(&mut self, id: TimerId, how: Coverage) {
        let b = self.buckets.entry(id.bucket_ms).or_default();
        if let std::collections::hash_map::Entry::Vacant(slot) = b.entries.entry(id) {
            slot.insert(Entry {
                due_ms: 0,
                state: match how {
                    Coverage::Listed => State::Fired,
                    Coverage::Mark => State::Covered,
                },
                attempts: 0,
                timer: None,
            });
            if b.deleting {
                b.added_while_deleting.push(id);
            }
            m::skipped_as_fired(1);
        }
    }

    /// Takes `t`, whose due time an earlier owner's recorded progress claims delivered,
    /// into memory to fire, because its writer asks for it to be adopted: the writer found
    /// that its slot's range moved while the row was being written. The mark cannot tell
    /// a timer the earlier owner fired from a row that landed after that owner read the
    /// bucket (then moved the range on before deleting it); trusting it lost the second
    /// kind: the writer was told "fired" and its caller an id that never fired. Firing it
    /// costs a duplicate under the same id when the earlier owner had fired it, which
    /// takes a row landing before that owner's read from a write still under way after
    /// the range moved again. A keyed repeat, which asks for far more timers that did
    /// fire (a retry after an answer was lost), is not given this.
    fn uncover(&mut self, t: Timer) {
        let id = t.id;
        if let Some(b) = self.buckets.get_mut(&id.bucket_ms) {
            b.entries.remove(&id);
        }
        tracing::info!(range = %self.range, timer_id = %id, "scheduler.adopt: firing a timer an earlier owner's progress claims delivered (its row may have landed after that owner read its bucket)");
        m::fired_though_covered();
        self.admit(t);
    }

    /// Whether this range may act now (fire, delete, write marks); remembers when it last
    /// could.
    fn acting(&mut self) -> bool {
        let now = now_ms();
        let may = self.config.may_act(self.range, self.tag);
        if may {
            self.acted_until_ms = self.acted_until_ms.max(now);
        }
        may
    }

    fn fire_due(&mut self) {
        // A cluster member whose lease has lapsed fires nothing: another node may own
        // these slots by now.
        if !self.acting() {
            return;
        }
        let now = now_ms();
        while self.inflight < self.config.max_inflight_batches {
            let mut batch = Vec::new();
            let mut first_due = u64::MAX;
            // Never early: a timer is taken only once the wall clock reached its epoch.
            while batch.len() < self.config.max_batch {
                let Some((due, id)) = self.due.pop_due(now) else {
                    break;
                };
                let Some(e) = self
                    .buckets
                    .get_mut(&id.bucket_ms)
                    .and_then(|b| b.entries.get_mut(&id))
                else {
                    continue;
                };
                // Stale queue items (cancelled, rescheduled) are skipped here.
                if e.state != State::Pending || e.due_ms != due {
                    continue;
                }
                e.state = State::InFlight;
                first_due = first_due.min(due);
                batch.push(*e.timer.take().expect("pending entry holds its timer"));
            }
            if batch.is_empty() {
                return;
            }
            *self.inflight_due.entry(first_due).or_default() += 1;
            self.inflight += 1;
            let sink = self.sink.clone();
            let tx = self.tx.clone();
            let span =
                tracing::debug_span!("scheduler.fire", range = %self.range, count = batch.len());
            tokio::spawn(
                async move {
                    let fired_at = now_ms();
                    let outcomes = sink.deliver(&batch, fired_at).await;
                    let _ = tx.send(Msg::Delivered(batch, outcomes, fired_at, first_due));
                }
                .instrument(span),
            );
        }
    }

    fn delivered(
        &mut self,
        batch: Vec<Timer>,
        outcomes: Vec<Delivery>,
        fired_at: u64,
        first_due: u64,
    ) {
        self.inflight -= 1;
        if let Some(n) = self.inflight_due.get_mut(&first_due) {
            *n -= 1;
            if *n == 0 {
                self.inflight_due.remove(&first_due);
            }
        }
        let mut failed = 0;
        let mut lateness = Vec::with_capacity(batch.len());
        let now = now_ms();
        for (i, t) in batch.into_iter().enumerate() {
            let outcome = outcomes
                .get(i)
                .cloned()
                .unwrap_or_else(|| Delivery::Failed("sink gave no outcome".into()));
            let Some(b) = self.buckets.get_mut(&t.id.bucket_ms) else {
                continue;
            };
            let Some(e) = b.entries.get_mut(&t.id) else {
                continue;
            };
            match outcome {
                Delivery::Delivered | Delivery::DeadLettered => {
                    e.state = State::Fired;
                    b.open -= 1;
                    if e.attempts > 0 {
                        self.retrying.remove(&t.id);
                    }
                    let due = t.spec.fire_at_ms.max(t.created_ms);
                    lateness.push(Duration::from_millis(fired_at.saturating_sub(due)));
                    self.recent_fired.push((due, t.id));
                    self.release(&t);
                }
                Delivery::Failed(why) => {
                    failed += 1;
                    e.attempts += 1;
                    self.retrying.insert(t.id);
                    let backoff = self
                        .config
                        .retry_min
                        .saturating_mul(1u32 << (e.attempts - 1).min(16))
                        .min(self.config.retry_max);
                    e.state = State::Pending;
                    e.due_ms = now + backoff.as_millis() as u64;
                    self.due.push(e.due_ms, t.id);
                    if e.attempts == 1 || e.attempts.is_power_of_two() {
                        tracing::warn!(timer_id = %t.id, topic = %t.spec.topic, attempts = e.attempts, error = %why, "sink.deliver failed; will retry");
                    }
                    e.timer = Some(Box::new(t));
                }
            }
        }
        self.stats
            .fired
            .fetch_add(lateness.len() as u64, Ordering::Relaxed);
        m::fired(lateness.into_iter());
        if failed > 0 {
            m::sink_failed(failed);
        }
    }

    fn begin_cancel(&mut self, id: TimerId) -> CancelProbe {
        let b = self.buckets.entry(id.bucket_ms).or_default();
        match b.entries.get_mut(&id) {
            Some(e) => match e.state {
                State::Pending => {
                    e.state = State::Cancelling { had_timer: true };
                    self.cancelling.insert(id, e.due_ms);
                    CancelProbe::Proceed
                }
                State::InFlight | State::Fired | State::Covered => CancelProbe::AlreadyFired,
                State::Cancelling { .. } => CancelProbe::InProgress,
                State::Cancelled => CancelProbe::AlreadyCancelled,
            },
            None => {
                // Not in memory (yet): leave a marker so a load racing the cancel skips it.
                if b.deleting {
                    b.added_while_deleting.push(id);
                }
                b.entries.insert(
                    id,
                    Entry {
                        due_ms: 0,
                        state: State::Cancelling { had_timer: false },
                        attempts: 0,
                        timer: None,
                    },
                );
                b.open += 1;
                CancelProbe::Proceed
            }
        }
    }

    /// Finishes a cancel this range began; `false` if it holds no such cancel (another
    /// range began it, or none did), and then changes nothing.
    fn end_cancel(&mut self, id: TimerId, outcome: Option<CancelOutcome>) -> bool {
        let Some(b) = self.buckets.get_mut(&id.bucket_ms) else {
            return false;
        };
        let Some(e) = b.entries.get_mut(&id) else {
            return false;
        };
        let State::Cancelling { had_timer } = e.state else {
            return false;
        };
        self.cancelling.remove(&id);
        // Cancelled, or its row gone: a timer adopted by value later must not fire.
        let never_fires = outcome.is_some();
        match (outcome, had_timer) {
            (Some(_), true) => {
                // Cancelled in the store (or the row is gone): it never fires.
                e.state = State::Cancelled;
                let gone = e.timer.take();
                b.open -= 1;
                self.retrying.remove(&id);
                if let Some(t) = gone {
                    self.release(&t);
                }
            }
            (Some(CancelOutcome::Cancelled | CancelOutcome::AlreadyCancelled), false)
                if id.bucket_ms > self.horizon.load(Ordering::SeqCst) =>
            {
                // The loader has not begun this bucket: it will read the row as cancelled,
                // so the marker need not hold memory until then (a year, for a timer a
                // year out).
                b.entries.remove(&id);
                b.open -= 1;
                if b.entries.is_empty() {
                    self.buckets.remove(&id.bucket_ms);
                }
            }
            (Some(CancelOutcome::Cancelled | CancelOutcome::AlreadyCancelled), false) => {
                e.state = State::Cancelled;
                b.open -= 1;
            }
            (Some(CancelOutcome::NotFound), false) | (None, false) => {
                b.entries.remove(&id);
                b.open -= 1;
                if b.entries.is_empty() && id.bucket_ms > self.horizon.load(Ordering::SeqCst) {
                    self.buckets.remove(&id.bucket_ms);
                }
            }
            (None, true) => {
                // The durable cancel failed: the timer is pending again.
                e.state = State::Pending;
                self.due.push(e.due_ms, id);
            }
        }
        if never_fires {
            self.remember(id, MemState::Cancelled);
        }
        true
    }

    fn housekeeping(&mut self) {
        self.report_memory();
        // Fired timers well behind the mark need no listing: the mark can still move back
        // (a range given up records its mark before writes then under way, and a late
        // hand-off can hold it back), so a few seconds of fires are kept.
        // Fires in buckets not loaded yet (handed over by writes) are kept too: the mark
        // does not speak of those buckets, only the list does.
        if let Some(p) = self.progress_candidate() {
            let keep_after = p.fired_through_ms.saturating_sub(RECENT_FIRED_MS);
            let unloaded = self.next_unsettled;
            self.recent_fired
                .retain(|(due, id)| *due > keep_after || id.bucket_ms >= unloaded);
        }
        while self
            .remembered
            .front()
            .is_some_and(|(at, _, _)| at.elapsed() > REMEMBER)
        {
            self.remembered.pop_front();
        }
        // Once this range's own record says all its predecessor's did, it stands alone.
        if let Some(earlier) = &self.inherited
            && self
                .own_progress_until(u64::MAX)
                .is_some_and(|p| p.dominates(earlier))
        {
            self.inherited = None;
        }
        // Deletes, progress and low-water marks belong to the owner: none without a lease.
        if !self.acting() {
            return;
        }

        let now = now_ms();
        let w = self.layout.bucket_ms;
        let grace = self.config.grace.as_millis() as u64;
        // Rule 4: a write under way may still put a timer in any bucket after the one it
        // began in, and hand it off later.
        let write_floor = self.writes.floor().map(|f| self.layout.bucket_start(f));
        // Rule 2: a bucket goes when it is over (plus grace), fully read, and nothing in it
        // is still open.
        let ready: Vec<u64> = self
            .buckets
            .iter()
            .take_while(|(b, _)| **b + w + grace <= now && write_floor.is_none_or(|f| **b < f))
            .filter(|(b, bucket)| **b < self.next_unsettled && bucket.open == 0 && !bucket.deleting)
            .map(|(b, _)| *b)
            .collect();
        // A cluster member deletes only the rows it read or was handed: a row another member
        // wrote after this one read the bucket (its range moved during the write) stays
        // unfired in the store, where the slot's owner finds it by id when its writer, or a
        // repeat of its call, asks it to adopt it. A partition delete would take it with the
        // rest, and a writer that died before it settled would leave a repeat told an id
        // that never fires. A single node is the only writer of its slots, and its write
        // guard holds deletes back while a write is under way: it deletes whole partitions.
        // (Failpoint `scheduler.delete_whole_partitions`: a member that deletes partitions,
        // as earlier versions did, so the tests still reach what a rolling upgrade can
        // meet: a row gone unfired, adopted by value.)
        let by_row = self.config.fence(self.tag).is_some()
            && crate::failpoint::hit("scheduler.delete_whole_partitions").is_ok();
        // A store that just failed a write of one kind is given time (backing off to 5 s)
        // before the next of that kind: asked every 100 ms by every range, a store that is
        // down or overloaded would take a request (and the node's log a warning) per range
        // and bucket each time.
        let ready = if self.retry.deletes.waiting() {
            Vec::new()
        } else {
            ready
        };
        if !ready.is_empty() {
            self.retry.deletes.round();
        }
        for b in ready {
            let mut keep = false;
            let mut only = None;
            if let Some(bucket) = self.buckets.get_mut(&b) {
                bucket.deleting = true;
                keep = bucket.keep_in_store;
                if by_row {
                    let mut ids: Vec<TimerId> = bucket.entries.keys().copied().collect();
                    ids.extend_from_slice(&bucket.skipped);
                    only = Some(ids);
                }
            }
            let store = self.store.clone();
            let tx = self.tx.clone();
            let range = self.range;
            if keep && only.is_none() {
                tracing::warn!(range = %range, bucket_ms = b,
                    "scheduler: bucket holds rows that cannot be decoded; leaving it in the store");
                let _ = tx.send(Msg::BucketDeleted(b, true));
                continue;
            }
            // A member deleting by row still deletes the rows it read and fired (left there,
            // a repeat of a keyed call would find them pending and fire them again); the
            // rows it could not decode are not named, so they stay.
            tokio::spawn(async move {
                let deleted = match crate::failpoint::hit_async("scheduler.before_delete").await {
                    Ok(()) => store.delete_bucket(range, b, only.as_deref()).await,
                    Err(e) => Err(e),
                };
                let ok = match deleted {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(range = %range, bucket_ms = b, error = %e, "scheduler.delete_bucket failed; will retry");
                        false
                    }
                };
                let _ = tx.send(Msg::BucketDeleted(b, ok));
            });
        }
        if !self.progress_writing
            && self.last_progress_write.elapsed() >= PROGRESS_EVERY
            && !self.retry.progress.waiting()
        {
            let progress = self.progress_candidate();
            if let Some(progress) = progress.filter(|p| Some(p) != self.progress_written.as_ref()) {
                self.progress_writing = true;
                self.retry.progress.round();
                self.last_progress_write = Instant::now();
                let store = self.store.clone();
                let tx = self.tx.clone();
                let range = self.range;
                tokio::spawn(async move {
                    let written =
                        match crate::failpoint::hit_async("scheduler.before_progress").await {
                            Ok(()) => store.set_progress(range, &progress).await,
                            Err(e) => Err(e),
                        };
                    let ok = match written {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(range = %range, error = %e, "scheduler.progress: write failed; will retry");
                            false
                        }
                    };
                    let _ = tx.send(Msg::ProgressWritten(progress, ok));
                });
            }
        }
        let forget_before = now.saturating_sub(DELETED_MEMORY_MS);
        while self.deleted.first().is_some_and(|b| *b < forget_before) {
            self.deleted.pop_first();
        }
        // Rule 3: persist the low-water mark, at most once a second (a cluster member's
        // mark costs a lightweight transaction per slot: every 5 s; a new owner then reads
        // a few more buckets).
        let lwm = self.low_water_candidate();
        let every = if self.config.fence(self.tag).is_some() {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(1)
        };
        if lwm > self.lwm_written
            && !self.lwm_writing
            && self.last_lwm_write.elapsed() >= every
            && !self.retry.low_water.waiting()
        {
            self.lwm_writing = true;
            self.retry.low_water.round();
            self.last_lwm_write = Instant::now();
            let store = self.store.clone();
            let tx = self.tx.clone();
            let range = self.range;
            let fence = self.config.fence(self.tag);
            tokio::spawn(async move {
                let ok = crate::failpoint::hit_async("scheduler.before_low_water")
                    .await
                    .is_ok()
                    && write_low_water(&*store, fence, range, lwm).await.is_ok();
                let _ = tx.send(Msg::LowWaterWritten(lwm, ok));
            });
        }
    }

    /// What may be recorded as delivered now: every timer due at or before the returned
    /// mark was confirmed, but for the failing ones listed. `None` while too many fail to
    /// list them (the last record stays, and stays true).
    fn progress_candidate(&self) -> Option<Progress> {
        self.progress_candidate_until(u64::MAX)
    }

    /// [`Self::progress_candidate`], claiming nothing due after `limit`.
    fn progress_candidate_until(&self, limit: u64) -> Option<Progress> {
        let own = self.own_progress_until(limit)?;
        // A range started a moment ago has not loaded as far as its predecessor's record
        // reaches: written alone, its record would replace that one and un-say it (what
        // the predecessor fired would fire again after the next restart or move).
        Some(match &self.inherited {
            Some(earlier) if !own.dominates(earlier) => {
                own.merged_with(earlier, &self.recent_fired, MAX_UNCONFIRMED)
            }
            _ => own,
        })
    }

    /// What this range itself may record as delivered, claiming nothing due after `limit`.
    fn own_progress_until(&self, limit: u64) -> Option<Progress> {
        // One below now: a write registered after the floor is read below began at `now` at
        // the earliest, so its timers are created at or after `now`, never covered.
        let mut through = now_ms().saturating_sub(1).min(limit);
        // Pending timers (stale queue entries only make this earlier, never later).
        if let Some(d) = self.due.first_due() {
            through = through.min(d.saturating_sub(1));
        }
        // Batches at the sink.
        if let Some((d, _)) = self.inflight_due.first_key_value() {
            through = through.min(d.saturating_sub(1));
        }
        // Timers being cancelled: if the cancel fails they fire.
        if let Some(d) = self.cancelling.values().min() {
            through = through.min(d.saturating_sub(1));
        }
        // Writes not yet in memory: their timers are created at or after the write began.
        if let Some(f) = self.writes.floor() {
            through = through.min(f.saturating_sub(1));
        }
        // Given up while writes were under way: they may have homed timers here that never
        // reached this range.
        if let Some(c) = self.cutoff {
            through = through.min(c.saturating_sub(1));
        }
        if self.retrying.len() > MAX_UNCONFIRMED {
            return None;
        }
        let mut unconfirmed: Vec<TimerId> = self.retrying.iter().copied().collect();
        unconfirmed.sort_unstable();
        // Fired past the mark (only a range given up under writes has many), or in a
        // bucket the loader has not finished (handed over by a write): the record's mark
        // speaks only of loaded buckets, so the next owner would fire those again.
        let unloaded = self.next_unsettled;
        let mut delivered_after: Vec<TimerId> = self
            .recent_fired
            .iter()
            .filter(|(due, id)| *due > through || id.bucket_ms >= unloaded)
            .map(|(_, id)| *id)
            .take(MAX_UNCONFIRMED)
            .collect();
        delivered_after.sort_unstable();
        Some(Progress {
            fired_through_ms: through,
            loaded_through: self.next_unsettled,
            unconfirmed,
            delivered_after,
        })
    }

    /// The oldest bucket that may still hold unfired timers of this range.
    fn low_water_candidate(&self) -> u64 {
        let grace = self.config.grace.as_millis() as u64;
        let mut lwm = self.next_unsettled;
        if let Some((b, _)) = self.buckets.first_key_value() {
            lwm = lwm.min(*b);
        }
        if let Some(f) = self.writes.floor() {
            lwm = lwm.min(self.layout.bucket_start(f));
        }
        if let Some(c) = self.cutoff {
            lwm = lwm.min(self.layout.bucket_start(c));
        }
        // A write acknowledged just now may still be on its way to us; stay behind it.
        lwm.min(self.layout.bucket_start(now_ms().saturating_sub(grace)))
            .max(self.lwm_written)
    }

    fn bucket_deleted(&mut self, bucket: u64, ok: bool) {
        self.retry.deletes.outcome(ok);
        if !ok {
            if let Some(b) = self.buckets.get_mut(&bucket) {
                b.deleting = false;
                // The next delete names them with the rest.
                b.added_while_deleting.clear();
            }
            return;
        }
        self.deleted.insert(bucket);
        // Entries that came in while the delete was under way (a timer adopted, a cancel)
        // were not named by it: a cluster member's delete left their rows. The bucket stays
        // with just those, and is deleted again (naming them) once they settled. Dropped
        // with the rest, a pending one was lost, and a fired one left its row pending in
        // the store, where a keyed repeat would have it adopted and fired again.
        if let Some(b) = self.buckets.get_mut(&bucket)
            && !b.added_while_deleting.is_empty()
        {
            let added: HashSet<TimerId> = std::mem::take(&mut b.added_while_deleting)
                .into_iter()
                .collect();
            b.entries.retain(|id, _| added.contains(id));
            b.entries.shrink_to_fit();
            b.skipped = Vec::new();
            b.deleting = false;
            return;
        }
        if self.buckets.remove(&bucket).is_some() {
            m::bucket_deleted();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timer::TimerSpec;

    fn timers(n: usize) -> Vec<Timer> {
        (0..n)
            .map(|i| Timer {
                id: TimerId::generate(1000),
                created_ms: 0,
                spec: TimerSpec {
                    fire_at_ms: i as u64,
                    topic: "t".into(),
                    partition: 0,
                    key: None,
                    headers: vec![],
                    payload: bytes::Bytes::new(),
                    idempotency_key: None,
                },
            })
            .collect()
    }

    #[test]
    fn due_queue_yields_earliest_first_and_nothing_before_its_time() {
        let mut q = DueQueue::default();
        let ids: Vec<TimerId> = (0..6).map(|_| TimerId::generate(1000)).collect();
        for (i, due) in [(0, 30), (1, 10), (2, 20), (3, 10), (4, 40), (5, 20)] {
            q.push(due, ids[i]);
        }
        assert_eq!(q.first_due(), Some(10));
        assert_eq!(q.pop_due(9), None, "nothing is due before 10");
        let mut got = Vec::new();
        while let Some((due, id)) = q.pop_due(25) {
            got.push((due, id));
        }
        let dues: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(dues, [10, 10, 20, 20]);
        let mut taken: Vec<TimerId> = got.iter().map(|g| g.1).collect();
        taken.sort();
        let mut expected = vec![ids[1], ids[3], ids[2], ids[5]];
        expected.sort();
        assert_eq!(taken, expected);
        assert_eq!(q.first_due(), Some(30));
        assert_eq!(q.pop_due(100).map(|g| g.0), Some(30));
        assert_eq!(q.pop_due(100).map(|g| g.0), Some(40));
        assert_eq!(q.pop_due(100), None);
        assert_eq!(q.first_due(), None);
    }

    #[test]
    fn slices_keep_order_and_own_only_their_length() {
        let all = timers(10_000);
        let expected: Vec<u64> = all.iter().map(|t| t.spec.fire_at_ms).collect();
        let parts: Vec<Vec<Timer>> = slices(all, 2048).collect();
        assert_eq!(parts.len(), 5);
        for p in &parts {
            assert!(p.len() <= 2048);
            // The regression this guards: each slice pinning the whole bucket's buffer.
            assert!(p.capacity() <= 2048, "slice capacity {}", p.capacity());
        }
        let got: Vec<u64> = parts.iter().flatten().map(|t| t.spec.fire_at_ms).collect();
        assert_eq!(got, expected);
        let empty: Vec<Vec<Timer>> = slices(Vec::new(), 2048).collect();
        assert_eq!(
            empty.len(),
            1,
            "an empty bucket still yields its one (last) slice"
        );
        assert!(empty[0].is_empty());
    }
}
