//! Durable timer storage behind the [`TimerStore`] trait, chosen by URL.
//!
//! Layout (see `docs/design.md`): a timer lives in the partition (slot, bucket) named by
//! its id. Loading "everything due in this bucket for these slots" is one read; a bucket
//! whose timers have all fired is removed with one range/partition delete.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::timer::{Layout, SlotRange, StoredState, Timer, TimerId, TimerSpec};
use crate::{Error, Result};

pub mod conformance;
pub mod embedded;
pub mod scylla;

/// Outcome of storing one timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// The timer's id (the first call's id for a repeated idempotency key).
    pub id: TimerId,
    /// False when the idempotency key was seen before and nothing was created.
    pub created: bool,
}

/// Outcome of [`TimerStore::abandon`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// The key was released (if it named the timer) and the row cancelled.
    Withdrawn,
    /// A repeated call confirmed the key's claim first: the timer stays and fires.
    Kept,
}

/// A timer as read back from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTimer {
    /// The timer.
    pub timer: Timer,
    /// Whether it is still pending or was cancelled.
    pub state: StoredState,
}

/// Outcome of a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// This call cancelled it.
    Cancelled,
    /// It was cancelled before.
    AlreadyCancelled,
    /// No such row (never existed, or its bucket was already cleaned up).
    NotFound,
}

/// The pending timers of one bucket, as loaded by the scheduler.
#[derive(Debug, Default)]
pub struct LoadedBucket {
    /// Pending timers, in no particular order.
    pub timers: Vec<Timer>,
    /// Rows skipped because they were cancelled (they still need the bucket deleted).
    pub cancelled: Vec<TimerId>,
    /// Rows not fired because their idempotency key belongs to another timer (deleted with
    /// the bucket).
    pub superseded: Vec<TimerId>,
    /// Rows that could not be decoded: not fired (but dead-lettered where the sink can),
    /// and the bucket is left in the store (not deleted) so they can be inspected and
    /// recovered.
    pub unreadable: Vec<Unreadable>,
}

/// A stored row that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// The id its key names.
    pub id: TimerId,
    /// The stored bytes, as they are.
    pub raw: Vec<u8>,
    /// Why it could not be decoded.
    pub error: String,
}

/// One page of a bucket's rows.
#[derive(Debug, Default)]
pub struct LoadedPage {
    /// The rows of this page.
    pub rows: LoadedBucket,
    /// The last id this page covered, if the bucket may have more rows after it.
    pub next: Option<TimerId>,
}

impl LoadedBucket {
    /// Takes in one stored row as the store read it (`raw`) and decoded it: a pending
    /// timer to fire, a cancelled row to count, or an unreadable row to skip (logged,
    /// counted, kept for the dead-letter topic).
    pub(crate) fn add(&mut self, id: TimerId, decoded: Result<StoredTimer>, raw: &[u8]) {
        match decoded {
            Ok(t) if t.state == StoredState::Pending => self.timers.push(t.timer),
            Ok(_) => self.cancelled.push(id),
            Err(e) => {
                tracing::error!(timer_id = %id, error = %e, "skipping a stored timer that cannot be decoded");
                crate::metrics::unreadable_row();
                self.unreadable.push(Unreadable {
                    id,
                    raw: raw.to_vec(),
                    error: e.to_string(),
                });
            }
        }
    }

    /// Whether the bucket has rows at all (so it must be settled, deleted or kept).
    pub fn has_rows(&self) -> bool {
        !self.timers.is_empty()
            || !self.cancelled.is_empty()
            || !self.superseded.is_empty()
            || !self.unreadable.is_empty()
    }
}

/// How far the firing of one slot range got, written every ~100 ms and at a graceful stop,
/// so a restart does not fire again what was already delivered.
///
/// Every pending timer of a bucket before `loaded_through` whose due time (the later of its
/// epoch and its creation) is at or before `fired_through_ms` was confirmed by the sink,
/// except the ones in `unconfirmed` (timers whose delivery was failing, still retried).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Timers due at or before this (ms) were delivered, but for `unconfirmed`.
    pub fired_through_ms: u64,
    /// The statement covers buckets before this one only (the ones read into memory).
    pub loaded_through: u64,
    /// Due by `fired_through_ms` but not confirmed: these fire again after a restart.
    /// Sorted.
    pub unconfirmed: Vec<TimerId>,
    /// Delivered although due (or created) after `fired_through_ms`: a range given up
    /// while writes were under way records its mark before those writes, and lists what it
    /// fired past the mark, so the next owner fires none of it again. Sorted.
    pub delivered_after: Vec<TimerId>,
}

/// The record as written before `delivered_after` existed.
#[derive(serde::Deserialize)]
struct ProgressV1 {
    fired_through_ms: u64,
    loaded_through: u64,
    unconfirmed: Vec<TimerId>,
}

impl Progress {
    /// Whether `timer`, read from bucket `bucket_ms`, was already delivered.
    pub fn covers(&self, bucket_ms: u64, timer: &Timer) -> bool {
        self.coverage(bucket_ms, timer).is_some()
    }

    /// How this record says `timer`, read from bucket `bucket_ms`, was delivered, if it does.
    /// A listed id was delivered whatever its bucket (a range fires timers handed to it by
    /// writes in buckets its loader has not finished yet); the mark speaks only of the
    /// buckets the record's range had loaded.
    pub fn coverage(&self, bucket_ms: u64, timer: &Timer) -> Option<Coverage> {
        if self.delivered_after.binary_search(&timer.id).is_ok() {
            Some(Coverage::Listed)
        } else if bucket_ms >= self.loaded_through {
            None
        } else if timer.spec.fire_at_ms.max(timer.created_ms) <= self.fired_through_ms
            && self.unconfirmed.binary_search(&timer.id).is_err()
        {
            Some(Coverage::Mark)
        } else {
            None
        }
    }

    /// Whether this record covers at least the buckets and the due times `other` covers
    /// (what `other` lists past its mark aside).
    pub fn dominates(&self, other: &Progress) -> bool {
        self.loaded_through >= other.loaded_through
            && self.fired_through_ms >= other.fired_through_ms
    }

    /// One record that is true when both `self` and `earlier` are (each about the same
    /// slots): the buckets either covers, the earlier of the two delivered-through marks,
    /// the union of their exceptions and of what each fired past the mark. `fired_past`
    /// lists timers `self`'s writer delivered, with their due times, so those past the
    /// merged mark are listed too.
    pub fn merged_with(
        &self,
        earlier: &Progress,
        fired_past: &[(u64, TimerId)],
        cap: usize,
    ) -> Progress {
        let through = self.fired_through_ms.min(earlier.fired_through_ms);
        let mut unconfirmed: Vec<TimerId> = self
            .unconfirmed
            .iter()
            .chain(&earlier.unconfirmed)
            .copied()
            .collect();
        unconfirmed.sort_unstable();
        unconfirmed.dedup();
        let mut delivered_after: Vec<TimerId> = self
            .delivered_after
            .iter()
            .chain(&earlier.delivered_after)
            .copied()
            .chain(
                fired_past
                    .iter()
                    .filter(|(due, id)| *due > through || id.bucket_ms >= self.loaded_through)
                    .map(|(_, id)| *id),
            )
            .collect();
        delivered_after.sort_unstable();
        delivered_after.dedup();
        delivered_after.truncate(cap);
        Progress {
            fired_through_ms: through,
            loaded_through: self.loaded_through.max(earlier.loaded_through),
            unconfirmed,
            delivered_after,
        }
    }

    /// Encoded for storage.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        postcard::to_allocvec(self).map_err(|e| Error::Internal(format!("encoding progress: {e}")))
    }

    /// Decoded from storage.
    pub fn from_bytes(b: &[u8]) -> Result<Progress> {
        match postcard::from_bytes::<Progress>(b) {
            Ok(p) => Ok(p),
            Err(e) => match postcard::from_bytes::<ProgressV1>(b) {
                Ok(v1) => Ok(Progress {
                    fired_through_ms: v1.fired_through_ms,
                    loaded_through: v1.loaded_through,
                    unconfirmed: v1.unconfirmed,
                    delivered_after: Vec::new(),
                }),
                Err(_) => Err(Error::Corrupt(format!("range progress record: {e}"))),
            },
        }
    }
}

/// Which slots new ids may fall in. A cluster member stores a near-term timer only in a
/// slot of a range it runs itself, so the member that writes the timer is the one that
/// fires it (its own write guard then covers the write, as on a single node); later timers
/// may go anywhere: their owner reads them in time.
#[derive(Debug, Clone, Default)]
pub struct Homing {
    /// Timers in buckets up to this (ms) are near-term.
    pub near_until_ms: u64,
    /// The slots near-term timers must use; empty: any slot (a single node).
    pub slots: Vec<SlotRange>,
}

impl Homing {
    /// Ids anywhere.
    pub fn any() -> Homing {
        Homing::default()
    }

    /// A new id in bucket `bucket_ms`, in a slot this homing allows.
    pub fn new_id(&self, layout: Layout, bucket_ms: u64) -> TimerId {
        loop {
            let id = TimerId::generate(bucket_ms);
            if self.slots.is_empty()
                || bucket_ms > self.near_until_ms
                || self
                    .slots
                    .iter()
                    .any(|r| r.contains(layout.slot_of(id.rand)))
            {
                return id;
            }
        }
    }
}

/// How a progress record covers a timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Its id is listed as delivered: its writer fired it.
    Listed,
    /// Its due time is at or before the delivered-through mark. Its writer fired every
    /// timer it held that was due by then, but a row that landed after the writer read the
    /// bucket is covered too, unfired.
    Mark,
}

/// What the earlier owners of a range's slots recorded as delivered: each record speaks
/// for the slots of its own range only.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    records: Vec<(SlotRange, Progress)>,
}

impl Resume {
    /// The records that may be used at `now_ms`. A record from a clock ahead of ours is
    /// ignored (at-least-once: its timers may fire again): with our clock behind, new timers
    /// could be created at times the record already covers.
    pub fn new(records: Vec<(SlotRange, Progress)>, now_ms: u64) -> Resume {
        Resume {
            records: records
                .into_iter()
                .filter(|(_, p)| p.fired_through_ms < now_ms)
                .collect(),
        }
    }

    /// Whether `timer`, read from bucket `bucket_ms`, was already delivered according to a
    /// record for its slot.
    pub fn covers(&self, layout: Layout, bucket_ms: u64, timer: &Timer) -> bool {
        self.coverage(layout, bucket_ms, timer).is_some()
    }

    /// How a record for its slot covers `timer`, read from bucket `bucket_ms`: by id if any
    /// record lists it, else by a mark.
    pub fn coverage(&self, layout: Layout, bucket_ms: u64, timer: &Timer) -> Option<Coverage> {
        if self.records.is_empty() {
            return None;
        }
        let slot = layout.slot_of(timer.id.rand);
        self.records
            .iter()
            .filter(|(r, _)| r.contains(slot))
            .filter_map(|(_, p)| p.coverage(bucket_ms, timer))
            .min_by_key(|c| *c != Coverage::Listed)
    }

    /// Forgets the records that say nothing about buckets from `bucket_ms` on: neither
    /// their mark nor an id they list.
    pub fn forget_before(&mut self, bucket_ms: u64) {
        self.records.retain(|(_, p)| {
            p.loaded_through > bucket_ms
                || p.delivered_after.iter().any(|id| id.bucket_ms >= bucket_ms)
        });
    }

    /// The record written by an earlier owner of exactly `range` (the one this range's own
    /// records replace in the store).
    pub fn of_range(&self, range: SlotRange) -> Option<Progress> {
        self.records
            .iter()
            .find(|(r, _)| *r == range)
            .map(|(_, p)| p.clone())
    }

    /// The latest delivered-through time among the records, for the start-up log.
    pub fn fired_through_ms(&self) -> Option<u64> {
        self.records.iter().map(|(_, p)| p.fired_through_ms).max()
    }
}

/// Durable storage for timers. Every implementation passes [`conformance`].
#[async_trait]
pub trait TimerStore: Send + Sync + 'static {
    /// The slot/bucket layout the store was created with.
    fn layout(&self) -> Layout;

    /// Stores timers durably, in one write batch, and returns one result per item in order.
    /// Each timer goes to the bucket of its fire time, or of the next bucket after "now"
    /// if that is later, so a bucket never receives timers once it has started.
    /// A repeated idempotency key (within the retention window) creates nothing and returns
    /// the first id.
    ///
    /// `Err`: nothing of the call counts as stored (rows may have been written; unkeyed ones
    /// may then fire, keyed ones only if their key is claimed for them later). An item's
    /// own `Err` (its key could not be claimed) leaves the other items stored.
    async fn insert(&self, timers: &[TimerSpec], homing: &Homing) -> Result<Vec<Result<Inserted>>>;

    /// Reads a timer by id.
    async fn get(&self, id: TimerId) -> Result<Option<StoredTimer>>;

    /// Withdraws a timer just created whose caller is told the outcome is unknown (a
    /// cluster member whose slot range moved away while the row was written, and whose
    /// owner could not be asked to adopt it): releases `key` if it still names `id`, so a
    /// retry with that key stores the timer anew instead of being answered with a row that
    /// no range may ever read, then marks the row cancelled, so no later load fires it.
    ///
    /// Unless the key's claim by `id` was confirmed ([`TimerStore::confirm_key`]): a retry
    /// had the owner adopt the timer and is answering with its id, so the timer is kept
    /// (pending) and [`Abandoned::Kept`] is returned. Release and confirmation exclude each
    /// other (one conditional write each), and so do keeping and a confirming call's
    /// release of a key it finds withdrawn, so a retry is never answered with a withdrawn
    /// id, and a kept timer's id is never given up by the call that confirmed it.
    async fn abandon(&self, id: TimerId, key: Option<&str>) -> Result<Abandoned>;

    /// Marks `key`'s claim by `id` confirmed: a repeated call found `id` holding the key and
    /// made sure the timer's owner has it, and is about to answer with `id`; from now on
    /// [`TimerStore::abandon`] leaves the timer alone (on Scylla, the claim is confirmed,
    /// then marked kept: two lightweight transactions). `false` when `key` no longer names
    /// `id` (its writer withdrew it; nothing changed), or names it again only because a
    /// loader claimed it for the row after the withdraw released it (the key is released
    /// again): the repeated call must not answer with it.
    async fn confirm_key(&self, key: &str, id: TimerId) -> Result<bool>;

    /// Marks a pending timer cancelled, durably.
    async fn cancel(&self, id: TimerId) -> Result<CancelOutcome>;

    /// Up to about `limit` rows of `bucket_ms` for `slots`, in id order, from the first
    /// after `after` (or from the start); `next` is where the next page begins, or `None`
    /// once the bucket is done. Pages let a loader hold a huge bucket in memory a part at
    /// a time.
    async fn load_page(
        &self,
        slots: SlotRange,
        bucket_ms: u64,
        after: Option<TimerId>,
        limit: usize,
    ) -> Result<LoadedPage>;

    /// All pending timers stored in `bucket_ms` for `slots` (every page).
    async fn load_bucket(&self, slots: SlotRange, bucket_ms: u64) -> Result<LoadedBucket> {
        let mut out = LoadedBucket::default();
        let mut after = None;
        loop {
            let page = self.load_page(slots, bucket_ms, after, 100_000).await?;
            out.timers.extend(page.rows.timers);
            out.cancelled.extend(page.rows.cancelled);
            out.superseded.extend(page.rows.superseded);
            out.unreadable.extend(page.rows.unreadable);
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// The first bucket in `from_ms..=until_ms` that may hold timers of `slots`, if any.
    /// May answer a bucket that turns out empty (never one later than the first non-empty).
    async fn next_bucket(
        &self,
        slots: SlotRange,
        from_ms: u64,
        until_ms: u64,
    ) -> Result<Option<u64>>;

    /// Removes the rows of `bucket_ms` for `slots` (its timers all fired or were
    /// cancelled): every row (`only: None`), or just the rows `only` names, the ones its
    /// range read (a cluster member: a row another member wrote after this one read the
    /// bucket stays, for the slot's owner to find by id and fire).
    async fn delete_bucket(
        &self,
        slots: SlotRange,
        bucket_ms: u64,
        only: Option<&[TimerId]>,
    ) -> Result<()>;

    /// The oldest bucket of `slots` that may still hold unfired timers (the minimum over
    /// the slots), or `None` if none was ever recorded.
    async fn low_water_mark(&self, slots: SlotRange) -> Result<Option<u64>>;

    /// Records that no bucket of `slots` before `bucket_ms` holds unfired timers.
    async fn set_low_water_mark(&self, slots: SlotRange, bucket_ms: u64) -> Result<()>;

    /// Claims every slot of `slots` for the owner holding `epoch` (the cluster map's
    /// fencing token), durably: from then on a fenced write under a lower epoch is refused.
    /// Claiming again under the same epoch is a no-op. `Err(Fenced)` (nothing claimed
    /// past the slots already done) when a slot holds a higher epoch.
    async fn claim_slots(&self, slots: SlotRange, epoch: u64) -> Result<()>;

    /// [`Self::set_low_water_mark`] for an owner holding `epoch`: each slot's mark moves only
    /// while the slot is still claimed under `epoch`. `Err(Fenced)` names the slots whose
    /// mark did not move (a newer owner claimed them); the others moved.
    async fn set_low_water_mark_fenced(
        &self,
        slots: SlotRange,
        bucket_ms: u64,
        epoch: u64,
    ) -> Result<()>;

    /// Every progress record written for a slot range that overlaps `slots`, with its
    /// range (a range that changed bounds, as cluster ranges do when they split, merge or
    /// move, still finds what the earlier owners of its slots recorded).
    async fn progress(&self, slots: SlotRange) -> Result<Vec<(SlotRange, Progress)>>;

    /// Records the progress of `slots` (replacing the previous record).
    async fn set_progress(&self, slots: SlotRange, progress: &Progress) -> Result<()>;

    /// Flushes and releases resources; later calls fail.
    async fn close(&self) -> Result<()>;
}

/// Logs a warning when this machine's clock is behind `floor`, the latest low-water mark
/// the store recorded (the clock was stepped back, or another node's runs ahead).
pub(crate) fn warn_if_clock_behind(floor: u64, layout: Layout) {
    let now = crate::timer::now_ms();
    if floor > layout.bucket_start(now) + layout.bucket_ms {
        tracing::warn!(
            behind_ms = floor - now,
            "the clock is behind the store's low-water mark: new timers go no earlier than \
             the mark's bucket, and those due before it fire once the clock reaches it"
        );
    }
}

/// Settings shared by all store implementations.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Layout to create a new store with; an existing store keeps its own.
    pub layout: Layout,
    /// How long an idempotency key is remembered.
    pub idempotency_retention: Duration,
    /// Cache size for the embedded engine, bytes.
    pub cache_bytes: usize,
    /// Embedded engine: record the allocator state with every commit (redb quick-repair).
    pub quick_repair: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            layout: Layout::default(),
            idempotency_retention: Duration::from_secs(24 * 3600),
            cache_bytes: 32 << 20,
            quick_repair: true,
        }
    }
}

/// Checks `url` the way [`open`] reads it, without any I/O.
pub fn check_url(url: &str) -> Result<()> {
    if let Some(path) = url
        .strip_prefix("embedded://")
        .or_else(|| url.strip_prefix("embedded:"))
    {
        if path.is_empty() {
            return Err(Error::Config(format!(
                "store URL {url:?} has no path; use embedded:///absolute/dir or embedded:relative/dir"
            )));
        }
        return Ok(());
    }
    if url.starts_with("scylla://") {
        return scylla::ScyllaUrl::parse(url).map(|_| ());
    }
    Err(Error::Config(format!(
        "unsupported store URL {url:?}: expected embedded:///path or scylla://host:9042/keyspace"
    )))
}

/// Opens the store named by `url`: `embedded:PATH` / `embedded://PATH`, or
/// `scylla://host:port[,host:port]/keyspace[?options]` (see [`scylla::ScyllaUrl`]).
pub async fn open(url: &str, options: StoreOptions) -> Result<Arc<dyn TimerStore>> {
    if let Some(path) = url
        .strip_prefix("embedded://")
        .or_else(|| url.strip_prefix("embedded:"))
    {
        if path.is_empty() {
            return Err(Error::Config(format!(
                "store URL {url:?} has no path; use embedded:///absolute/dir or embedded:relative/dir"
            )));
        }
        let store = embedded::EmbeddedStore::open(path.as_ref(), options).await?;
        return Ok(Arc::new(store));
    }
    if url.starts_with("scylla://") {
        return Ok(Arc::new(scylla::ScyllaStore::open(url, options).await?));
    }
    Err(Error::Config(format!(
        "unsupported store URL {url:?}: expected embedded:///path or scylla://host:9042/keyspace"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer(fire_at_ms: u64, created_ms: u64) -> Timer {
        Timer {
            id: TimerId::generate(0),
            created_ms,
            spec: TimerSpec {
                fire_at_ms,
                payload: Default::default(),
                topic: "t".into(),
                partition: 0,
                key: None,
                headers: Default::default(),
                idempotency_key: None,
            },
        }
    }

    /// A record written before `delivered_after` existed still reads.
    #[test]
    fn an_older_progress_record_still_reads() {
        #[derive(serde::Serialize)]
        struct V1 {
            fired_through_ms: u64,
            loaded_through: u64,
            unconfirmed: Vec<TimerId>,
        }
        let old = postcard::to_allocvec(&V1 {
            fired_through_ms: 5,
            loaded_through: 9,
            unconfirmed: vec![],
        })
        .unwrap();
        let p = Progress::from_bytes(&old).unwrap();
        assert_eq!((p.fired_through_ms, p.loaded_through), (5, 9));
        assert!(p.delivered_after.is_empty());
        let new = Progress {
            delivered_after: vec![TimerId::generate(0)],
            ..p
        };
        assert_eq!(Progress::from_bytes(&new.to_bytes().unwrap()).unwrap(), new);
    }

    /// Past the mark, only what the record lists as delivered counts as delivered.
    #[test]
    fn a_record_covers_its_mark_and_what_it_lists_past_it() {
        let (early, late, listed) = (timer(100, 50), timer(300, 50), timer(300, 50));
        let p = Progress {
            fired_through_ms: 200,
            loaded_through: 1_000,
            unconfirmed: vec![],
            delivered_after: vec![listed.id],
        };
        assert!(p.covers(0, &early));
        assert!(!p.covers(0, &late));
        assert!(p.covers(0, &listed));
        assert!(
            p.covers(1_000, &listed),
            "a listed id was delivered, also in a bucket the record's range had not loaded"
        );
        assert!(
            !p.covers(1_000, &early),
            "the mark speaks only of loaded buckets"
        );
        // A listed id was fired by the record's writer; the mark speaks only of due times.
        assert_eq!(p.coverage(0, &early), Some(Coverage::Mark));
        assert_eq!(p.coverage(0, &listed), Some(Coverage::Listed));
        let listed_early = Progress {
            delivered_after: vec![early.id],
            ..p.clone()
        };
        assert_eq!(listed_early.coverage(0, &early), Some(Coverage::Listed));
    }

    /// A range fired a timer handed to it by a write, in a bucket its loader had not
    /// reached, and gave the range up: the next owner, loading that bucket, must find the
    /// id listed (the record is kept past its loaded buckets for it), and not fire it again.
    #[test]
    fn a_listed_id_beyond_the_loaded_buckets_stays_covered_until_its_bucket() {
        let layout = Layout {
            slots: 1,
            bucket_ms: 1_000,
        };
        let mut handed = timer(5_500, 4_000);
        handed.id = TimerId::generate(5_000);
        let p = Progress {
            fired_through_ms: 3_000,
            loaded_through: 4_000,
            unconfirmed: vec![],
            delivered_after: vec![handed.id],
        };
        let mut resume = Resume::new(vec![(layout.all_slots(), p)], 10_000);
        resume.forget_before(4_000);
        resume.forget_before(5_000);
        assert_eq!(
            resume.coverage(layout, 5_000, &handed),
            Some(Coverage::Listed)
        );
        resume.forget_before(6_000);
        assert_eq!(
            resume.coverage(layout, 5_000, &handed),
            None,
            "forgotten past its bucket"
        );
    }
}
