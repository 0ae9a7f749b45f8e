//! The node as a cluster member: which ranges it runs (those the cluster map gives it,
//! while its lease holds), and how timers and calls reach the member that owns their slot.
//!
//! A member that stores a near-term timer for a slot it does not own hands it to the
//! owner before it acknowledges the call: the owner may have read that bucket already, and
//! would never read the new row. The owner takes a timer for a slot it owns even while its
//! range has not started yet (it is waiting out the previous owner's lease): it holds the
//! timer and gives it to the range when the range starts. See docs/design.md, "Cluster".

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use timerdb_proto::internal::v1 as pb;
use timerdb_proto::internal::v1::node_client::NodeClient;
use timerdb_raft::{ClusterNode, NodeId};
use tokio::time::Instant;

use crate::scheduler::{Scheduler, WriteGuard};
use crate::timer::{Layout, SlotRange, Timer, TimerId, now_ms};
use crate::{Error, Result};

/// Metadata a member adds to a call it forwards to the owner: a forwarded call is never
/// forwarded again (two members whose maps disagree for a moment cannot bounce it).
pub const FORWARDED: &str = "timerdb-forwarded";

/// How long a hand-off keeps trying to reach the owner before the call gives up on that
/// timer (it is stored; the caller may retry with the same idempotency key).
const HAND_OFF_PATIENCE: Duration = Duration::from_secs(5);

/// A node's part in the cluster.
pub struct Member {
    node: ClusterNode,
    scheduler: Arc<Scheduler>,
    layout: Layout,
    /// Hand-offs must reach the owner for timers due within this much of now (the owner's
    /// loader reads this far ahead, plus a bucket and the allowed clock drift).
    near_ms: u64,
    /// Timers handed to this member for slots it owns but does not run yet.
    held: Mutex<Vec<(Timer, bool)>>,
    peers: Mutex<HashMap<String, NodeClient<tonic::transport::Channel>>>,
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
            layout,
            node,
            scheduler,
            held: Mutex::new(Vec::new()),
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// The cluster member.
    pub fn node(&self) -> &ClusterNode {
        &self.node
    }

    /// The member that owns `slot` by this member's map, and its address.
    pub fn owner_of(&self, slot: u32) -> Option<(NodeId, String)> {
        let applied = self.node.map().borrow().clone();
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

    /// Gives freshly stored timers to the members that own them: this one's own to its
    /// ranges, the others' to them over the internal service. One result per timer: `Err`
    /// when its owner could not be reached within the patience (the timer is stored).
    pub async fn hand_off(
        &self,
        timers: Vec<Timer>,
        repeat: bool,
        guard: Option<Arc<WriteGuard>>,
    ) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = (0..timers.len()).map(|_| Ok(())).collect();
        let horizon = now_ms() + self.near_ms;
        let mut waiting: Vec<(usize, Timer)> = Vec::new();
        let mut mine = Vec::new();
        for (i, t) in timers.into_iter().enumerate() {
            if t.id.bucket_ms > horizon {
                // No owner has read that far: it will read the row in time.
                continue;
            }
            mine.push((i, t));
        }
        // Own slots first; the rest go to their owners.
        for (i, t) in self.accept(mine, repeat, guard.clone()) {
            waiting.push((i, t));
        }
        let deadline = Instant::now() + HAND_OFF_PATIENCE;
        let mut last_error: HashMap<usize, String> = HashMap::new();
        while !waiting.is_empty() {
            let mut by_owner: BTreeMap<NodeId, (String, Vec<(usize, Timer)>)> = BTreeMap::new();
            let mut retry = Vec::new();
            for (i, t) in waiting.drain(..) {
                match self.owner_of(self.layout.slot_of(t.id.rand)) {
                    Some((owner, _)) if owner == self.node.id() => {
                        // Our map changed: it is ours now.
                        retry.extend(self.accept(vec![(i, t)], repeat, guard.clone()));
                    }
                    Some((owner, addr)) => by_owner
                        .entry(owner)
                        .or_insert((addr, Vec::new()))
                        .1
                        .push((i, t)),
                    None => {
                        last_error.insert(i, "its slot has no owner yet".into());
                        retry.push((i, t));
                    }
                }
            }
            for (owner, (addr, batch)) in by_owner {
                match self.send(&addr, &batch, repeat).await {
                    Ok(not_owned) => {
                        for (n, (i, t)) in batch.into_iter().enumerate() {
                            if not_owned.contains(&(n as u32)) {
                                last_error.insert(
                                    i,
                                    format!(
                                        "node {owner} does not own it (maps differ for a moment)"
                                    ),
                                );
                                retry.push((i, t));
                            }
                        }
                    }
                    Err(e) => {
                        for (i, t) in batch {
                            last_error.insert(i, format!("node {owner} at {addr}: {e}"));
                            retry.push((i, t));
                        }
                    }
                }
            }
            waiting = retry;
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for (i, t) in waiting.drain(..) {
                    results[i] = Err(Error::Unavailable(format!(
                        "timer {} is stored, but its owner could not be given it ({}); retry \
                         the call with the same idempotency key",
                        t.id,
                        last_error.remove(&i).unwrap_or_default()
                    )));
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        results
    }

    /// Takes the timers whose slots this member owns by its map: into the running range,
    /// or held until the range starts. Returns the others.
    fn accept(
        &self,
        timers: Vec<(usize, Timer)>,
        repeat: bool,
        guard: Option<Arc<WriteGuard>>,
    ) -> Vec<(usize, Timer)> {
        let applied = self.node.map().borrow().clone();
        let me = self.node.id();
        let mut run = Vec::new();
        let mut others = Vec::new();
        let mut held = self.held.lock().expect("held lock");
        for (i, t) in timers {
            let slot = self.layout.slot_of(t.id.rand);
            if applied.map.owner_of(slot) != Some(me) {
                others.push((i, t));
            } else if self.scheduler.runs(slot) {
                run.push(t);
            } else {
                held.push((t, repeat));
            }
        }
        drop(held);
        if !run.is_empty() {
            if repeat {
                self.scheduler.hand_off_repeat(run, guard);
            } else {
                self.scheduler.hand_off(run, guard);
            }
        }
        others
    }

    /// After the ranges changed: held timers go to the ranges that now run their slots,
    /// or on to the member that owns them now.
    pub async fn release_held(self: &Arc<Self>) {
        let held = std::mem::take(&mut *self.held.lock().expect("held lock"));
        if held.is_empty() {
            return;
        }
        let me = self.node.id();
        let mut keep = Vec::new();
        let mut run: Vec<(Timer, bool)> = Vec::new();
        let mut moved: Vec<(Timer, bool)> = Vec::new();
        for (t, repeat) in held {
            let slot = self.layout.slot_of(t.id.rand);
            if self.scheduler.runs(slot) {
                run.push((t, repeat));
            } else if self.owner_of(slot).is_some_and(|(o, _)| o != me) {
                moved.push((t, repeat));
            } else {
                keep.push((t, repeat));
            }
        }
        self.held.lock().expect("held lock").extend(keep);
        for (t, repeat) in run {
            if repeat {
                self.scheduler.hand_off_repeat(vec![t], None);
            } else {
                self.scheduler.hand_off(vec![t], None);
            }
        }
        if !moved.is_empty() {
            let member = self.clone();
            tokio::spawn(async move {
                for (t, repeat) in moved {
                    let id = t.id;
                    if let Some(Err(e)) = member.hand_off(vec![t], repeat, None).await.pop() {
                        tracing::warn!(timer_id = %id, error = %e, "cluster.hand_off: a held timer could not reach its new owner; it fires when its bucket is read");
                    }
                }
            });
        }
    }

    async fn send(&self, addr: &str, batch: &[(usize, Timer)], repeat: bool) -> Result<Vec<u32>> {
        let client = {
            let mut peers = self.peers.lock().expect("peers lock");
            match peers.get(addr) {
                Some(c) => c.clone(),
                None => {
                    let channel = timerdb_raft::network::channel(addr, Duration::from_secs(2))
                        .map_err(Error::Unavailable)?;
                    let c = NodeClient::new(channel)
                        .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES)
                        .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES);
                    peers.insert(addr.to_owned(), c.clone());
                    c
                }
            }
        };
        let timers: Vec<&Timer> = batch.iter().map(|(_, t)| t).collect();
        let bytes = postcard::to_allocvec(&timers)
            .map_err(|e| Error::Internal(format!("encoding a hand-off: {e}")))?;
        let mut client = client;
        let reply = client
            .hand_off(pb::HandOffRequest {
                timers: bytes,
                repeat,
            })
            .await
            .map_err(|s| Error::Unavailable(s.message().to_owned()))?;
        Ok(reply.into_inner().not_owned)
    }

    /// The server side of `timerdb.internal.v1.Node`.
    pub fn service(self: &Arc<Self>) -> pb::node_server::NodeServer<NodeService> {
        pb::node_server::NodeServer::new(NodeService {
            member: self.clone(),
        })
        .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES)
    }

    /// The slot ranges this member may act on now: those the map gives it, once each may
    /// be started (a range taken from a live member waits out that member's lease), and
    /// none while its own lease does not hold. Neighbouring ranges are joined.
    pub fn usable_ranges(&self) -> Vec<SlotRange> {
        if self.node.lease_until().is_none() {
            return Vec::new();
        }
        let now = Instant::now();
        let mut spans: Vec<(u32, u32)> = self
            .node
            .owned()
            .into_iter()
            .filter(|o| o.usable_at <= now)
            .map(|o| (o.range.start, o.range.end))
            .collect();
        spans.sort_unstable();
        let mut out: Vec<SlotRange> = Vec::new();
        for (first, last) in spans {
            match out.last_mut() {
                Some(r) if r.last + 1 == first => r.last = last,
                _ => out.push(SlotRange { first, last }),
            }
        }
        out
    }

    /// Keeps the scheduler's ranges equal to [`Member::usable_ranges`] as the map and the
    /// lease change, and releases held hand-offs after each change.
    pub async fn follow_ownership(self: Arc<Self>) {
        let mut map = self.node.map();
        loop {
            let want = self.usable_ranges();
            let mut have = self.scheduler.owned();
            have.sort_unstable_by_key(|r| r.first);
            if want != have {
                tracing::info!(node = self.node.id(), ranges = ?want, "cluster.ownership: ranges change");
                if let Err(e) = self.scheduler.assign(want).await {
                    tracing::warn!(error = %e, "cluster.ownership: assigning ranges failed; will retry");
                }
            }
            self.release_held().await;
            tokio::select! {
                _ = map.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// The server side of `timerdb.internal.v1.Node`.
#[derive(Debug)]
pub struct NodeService {
    member: Arc<Member>,
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    async fn hand_off(
        &self,
        request: tonic::Request<pb::HandOffRequest>,
    ) -> std::result::Result<tonic::Response<pb::HandOffReply>, tonic::Status> {
        let req = request.into_inner();
        let timers: Vec<Timer> = postcard::from_bytes(&req.timers)
            .map_err(|e| tonic::Status::invalid_argument(format!("undecodable hand-off: {e}")))?;
        let not_owned = self
            .member
            .accept(timers.into_iter().enumerate().collect(), req.repeat, None)
            .into_iter()
            .map(|(i, _)| i as u32)
            .collect();
        Ok(tonic::Response::new(pb::HandOffReply { not_owned }))
    }
}
