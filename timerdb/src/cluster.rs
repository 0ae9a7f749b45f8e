//! The node as a cluster member: which ranges it runs (those the cluster map gives it),
//! when it may act on them (while its lease holds and the map still gives them to it), and
//! how calls reach the member that owns a timer's slot.
//!
//! A member stores a near-term timer only in a slot of a range it runs itself (the slot
//! of a new id is random anyway): the member that writes the timer is the member that fires
//! it, and its own write guard keeps its ranges from recording past the write, exactly as
//! on a single node. No timer has to travel between members. Later timers take any slot;
//! their owner reads them from the store in time. See docs/design.md, "Cluster".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use timerdb_raft::{ClusterNode, NodeId};
use tokio::time::Instant;

use crate::scheduler::Scheduler;
use crate::store::Homing;
use crate::timer::{Layout, SlotRange, TimerId, TimerSpec, now_ms};
use crate::{Error, Result};

/// Metadata a member adds to a call it forwards to the owner: a forwarded call is never
/// forwarded again (two members whose maps disagree for a moment cannot bounce it).
pub const FORWARDED: &str = "timerdb-forwarded";
/// Metadata of a `GetTimer` a member sends the owner of a timer it stored while the
/// timer's slot range moved: the owner makes sure the stored timer fires (it adopts it)
/// before it answers.
pub const ADOPT: &str = "timerdb-adopt";
/// The value of [`ADOPT`] when the member asking wrote the timer (it is settling that
/// write), as opposed to a repeat of its idempotency key ("1"; older members send "1"
/// for both).
pub const ADOPT_BY_WRITER: &str = "writer";
/// Binary metadata beside [`ADOPT`]: the timer itself (postcard), sent by the member that
/// wrote it, so the owner can adopt it even if its row is gone (deleted unfired with its
/// bucket, when the row landed after the owner read the bucket).
pub const ADOPT_TIMER: &str = "timerdb-adopt-timer-bin";

/// Pause before asking again for a release the leader did not take.
const RELEASE_AGAIN: Duration = Duration::from_millis(100);
/// A fire or ownership write needs at least this much lease left: the check and the act
/// are not one instant.
const LEASE_MARGIN: Duration = Duration::from_millis(100);
/// Beyond a lease and its drift: how long a call waits for a range this member is about
/// to start (the start follows the previous owner's lease end, seen in the next map tick,
/// then claims its slots in the store; a loaded machine took more than 0.5 s for that).
const START_MARGIN_MS: u64 = 2_000;

/// A node's part in the cluster.
pub struct Member {
    node: ClusterNode,
    scheduler: Arc<Scheduler>,
    layout: Layout,
    /// Timers due within this much of now are near-term: an owner's loader may have read
    /// their bucket already (its lookahead, two buckets, and at least a second of clock
    /// difference between members).
    near_ms: u64,
    /// A timer due further than this from now cannot have been read by its owner yet (the
    /// loader's lookahead, a bucket, and the clock difference allowed): the check after a
    /// write. Smaller than `near_ms` by what a write may take (about 1.8 s by default)
    /// before a timer homed anywhere as a later one is withdrawn.
    unread_beyond_ms: u64,
    /// Clients of the members calls were forwarded to, by address (one connection each).
    owners: Mutex<HashMap<String, timerdb_client::Client>>,
    /// `cluster.release_ranges`.
    release_ranges: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("id", &self.node.id())
            .finish()
    }
}

impl Member {
    /// This node's part in the cluster `node` coordinates, running ranges on `scheduler`.
    pub fn new(node: ClusterNode, scheduler: Arc<Scheduler>, lookahead: Duration) -> Arc<Self> {
        let layout = scheduler.layout();
        let drift = node.map().borrow().map.lease.drift_ms;
        Arc::new(Self {
            near_ms: lookahead.as_millis() as u64 + 2 * layout.bucket_ms + drift.max(1_000),
            unread_beyond_ms: lookahead.as_millis() as u64 + layout.bucket_ms + drift,
            layout,
            node,
            scheduler,
            owners: Mutex::new(HashMap::new()),
            release_ranges: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Whether this member releases the ranges it stops (`cluster.release_ranges`).
    pub fn set_release_ranges(&self, release: bool) {
        self.release_ranges
            .store(release, std::sync::atomic::Ordering::Relaxed);
    }

    /// A client of the member at `addr` (kept, so forwarded calls share one connection).
    pub fn client_of(&self, addr: &str) -> Result<timerdb_client::Client> {
        let mut owners = self.owners.lock().expect("owners lock");
        if let Some(c) = owners.get(addr) {
            return Ok(c.clone());
        }
        let c = timerdb_client::Client::connect_lazy(addr)
            .map_err(|e| Error::Unavailable(format!("member at {addr}: {e}")))?;
        owners.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Whether the scheduler runs no range any more.
    pub fn runs_nothing(&self) -> bool {
        self.scheduler.owned_tagged().is_empty()
    }

    /// The cluster member.
    pub fn node(&self) -> &ClusterNode {
        &self.node
    }

    /// The member that owns `slot` by this member's map, and its address.
    pub fn owner_of(&self, slot: u32) -> Option<(NodeId, String)> {
        let map = self.node.map();
        let applied = map.borrow();
        let owner = applied.map.owner_of(slot)?;
        let addr = applied.map.members.get(&owner)?.addr.clone();
        Some((owner, addr))
    }

    /// The owner of `id`'s slot when it is another member: `Ok(None)` if this member owns
    /// it and runs its range, `Err` if this member owns it but cannot act on it now.
    pub fn remote_owner(&self, id: TimerId) -> Result<Option<(NodeId, String)>> {
        let slot = self.layout.slot_of(id.rand);
        match self.owner_of(slot) {
            Some((owner, _)) if owner == self.node.id() => {
                if self.scheduler.runs(slot) {
                    Ok(None)
                } else {
                    Err(Error::Unavailable(format!(
                        "slot {slot} of timer {id} is moving to node {owner}, which has not \
                         started it yet; retry shortly"
                    )))
                }
            }
            Some(other) => Ok(Some(other)),
            None => Err(Error::Unavailable(format!(
                "slot {slot} of timer {id} has no owner yet (the cluster is starting)"
            ))),
        }
    }

    /// As [`Member::remote_owner`], but a slot this member owns and has not started yet
    /// (its range waits out the previous owner's lease, or the cluster is starting) is
    /// waited for, at most a lease and its drift and a margin, before the call is refused:
    /// a `GetTimer` or `CancelTimeout` during a move then answers a moment late instead
    /// of `UNAVAILABLE`.
    ///
    /// `budget` caps the wait (the caller's own deadline, less a margin), so a caller
    /// still hears the definite refusal instead of its deadline passing.
    pub async fn remote_owner_soon(
        &self,
        id: TimerId,
        budget: Option<Duration>,
    ) -> Result<Option<(NodeId, String)>> {
        let lease = self.node.map().borrow().map.lease;
        let mut wait = Duration::from_millis(lease.lease_ms + lease.drift_ms + START_MARGIN_MS);
        if let Some(b) = budget {
            wait = wait.min(b);
        }
        let deadline = Instant::now() + wait;
        loop {
            match self.remote_owner(id) {
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                answer => return answer,
            }
        }
    }

    /// The ranges this member runs and may act on now (its lease holds and the map still
    /// gives it each of them).
    pub fn acting_ranges(&self) -> Vec<SlotRange> {
        self.scheduler
            .owned_tagged()
            .into_iter()
            .filter(|(r, epoch)| self.may_act(*r, *epoch))
            .map(|(r, _)| r)
            .collect()
    }

    /// Where this member may put new ids now: near-term timers in its acting ranges.
    pub fn homing(&self) -> Homing {
        Homing {
            near_until_ms: now_ms() + self.near_ms,
            slots: self.acting_ranges(),
        }
    }

    /// After the store call, with `acting` the [`Member::acting_ranges`] read once then:
    /// whether a new timer may be acknowledged. One whose bucket its owner may have read
    /// by now may not unless its range is still acting here: its row may have landed after
    /// the owner read that bucket (the range moved or the lease lapsed while the row was
    /// being written, or a timer homed anywhere as a later one came due during a very slow
    /// write), and no range here would hand it over. Its owner fires it only if it read the
    /// row; the caller is told the outcome is unknown.
    pub fn still_acting(&self, id: TimerId, acting: &[SlotRange]) -> bool {
        if id.bucket_ms > now_ms() + self.unread_beyond_ms {
            return true;
        }
        let slot = self.layout.slot_of(id.rand);
        acting.iter().any(|r| r.contains(slot))
    }

    /// Whether no member can have read `id`'s bucket yet, on any clock within the drift
    /// (a minute beyond [`Member::still_acting`]'s bound).
    pub fn surely_unread(&self, id: TimerId) -> bool {
        id.bucket_ms > now_ms() + self.unread_beyond_ms + 60_000
    }

    /// The refusal for a near-term timer this member cannot home (it runs no range right
    /// now: it is joining, draining, or its ranges are moving). Nothing is written.
    pub fn refuse_near(&self, spec: &TimerSpec, homing: &Homing) -> Option<Error> {
        let w = self.layout.bucket_ms;
        let bucket = self
            .layout
            .bucket_start(spec.fire_at_ms)
            .max(self.layout.bucket_start(now_ms()) + w);
        (homing.slots.is_empty() && bucket <= homing.near_until_ms).then(|| {
            Error::Unavailable(format!(
                "node {} runs no slot range right now (it is joining or draining, or its ranges \
                 are moving), so it cannot take a timer due this soon; nothing was stored: send \
                 it to another member, or retry shortly",
                self.node.id()
            ))
        })
    }

    /// The slot ranges this member runs: the map's ranges it owns, each once it may be
    /// started (a range taken from a live member waits out that member's lease). Kept as
    /// the map has them, so a change elsewhere does not restart them. A lapsed lease does
    /// not stop them: it pauses their fires and ownership writes (see
    /// [`Member::may_act`]).
    pub fn usable_ranges(&self) -> Vec<(SlotRange, u64)> {
        let now = Instant::now();
        let mut out: Vec<(SlotRange, u64)> = self
            .node
            .owned()
            .into_iter()
            .filter(|o| o.usable_at <= now)
            .map(|o| {
                let range = SlotRange {
                    first: o.range.start,
                    last: o.range.end,
                };
                (range, o.range.epoch)
            })
            .collect();
        out.sort_unstable_by_key(|(r, _)| r.first);
        out
    }

    /// Whether this member may fire, and write ownership records, for `range` now (see
    /// [`ClusterNode::may_act`]: its lease holds, and the range is its own or was lost so
    /// recently that the lease it held then has not ended).
    pub fn may_act(&self, range: SlotRange, epoch: u64) -> bool {
        self.node
            .may_act(range.first, range.last, epoch, LEASE_MARGIN)
    }

    /// Tells the cluster that the ranges `stopped` (stopped, after the change noticed at
    /// `noticed`) no longer act here, so their new owners start at once instead of
    /// waiting out this member's lease: a drain or rebalance then leaves no gap of a lease
    /// in their fires. Only when the stop was prompt: a release that arrives after the new
    /// owner started would only restart its range under a new epoch. Best effort: without
    /// it the new owner waits, as it must for a member that cannot say so.
    fn release(&self, stopped: Vec<(SlotRange, u64)>, noticed: Instant) {
        let lease = self.node.map().borrow().map.lease;
        let prompt = Duration::from_millis((lease.lease_ms + lease.drift_ms) / 2);
        if stopped.is_empty()
            || noticed.elapsed() > prompt
            || !self
                .release_ranges
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let node = self.node.clone();
        tokio::spawn(async move {
            for (r, epoch) in stopped {
                // A leader elected a moment ago has not heard every member report what it
                // understands: ask again while the release can still help.
                loop {
                    match node.release(r.first, r.last, epoch).await {
                        Ok(()) => {
                            tracing::info!(range = %r, epoch, "cluster.ownership: released; its new owner starts at once");
                        }
                        Err(e) if noticed.elapsed() + RELEASE_AGAIN < prompt => {
                            tracing::debug!(range = %r, epoch, error = %e, "cluster.ownership: release not taken yet; asking again");
                            tokio::time::sleep(RELEASE_AGAIN).await;
                            continue;
                        }
                        Err(e) => {
                            tracing::info!(range = %r, epoch, error = %e, "cluster.ownership: release not taken; its new owner waits out the lease");
                        }
                    }
                    break;
                }
            }
        });
    }

    /// Keeps the scheduler's ranges equal to [`Member::usable_ranges`] as the map changes.
    pub async fn follow_ownership(self: Arc<Self>) {
        let mut map = self.node.map();
        loop {
            let want = self.usable_ranges();
            let mut have = self.scheduler.owned_tagged();
            have.sort_unstable_by_key(|(r, _)| r.first);
            if want != have {
                tracing::info!(node = self.node.id(), ranges = ?want, "cluster.ownership: ranges change");
                let noticed = Instant::now();
                let stopped: Vec<(SlotRange, u64)> =
                    have.into_iter().filter(|r| !want.contains(r)).collect();
                match self.scheduler.assign_tagged(want).await {
                    Ok(()) => self.release(stopped, noticed),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster.ownership: assigning ranges failed; will retry")
                    }
                }
            }
            tokio::select! {
                _ = map.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}
