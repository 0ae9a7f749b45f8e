//! A cluster member: its Raft instance, its lease, what it owns and since when it may act on
//! it, and the leader's duties (bootstrap the map, renew leases, move the ranges of a member
//! that went silent). The argument these rules make is written in docs/design.md,
//! "Cluster: leases and epochs".

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{ClientWriteError, RaftError};
use timerdb_proto::internal::v1 as pb;
use timerdb_proto::internal::v1::cluster_client::ClusterClient;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::map::{Command, Handover, LeaseSettings, MemberState, NodeId, Range};
use crate::network::{self, Network, RaftService};
use crate::store::{self, AppliedMap};
use crate::{Answer, Error, Raft, Result};

/// How a member takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This member's id (1, 2, ...).
    pub id: NodeId,
    /// The `host:port` other members reach it on.
    pub advertise: String,
    /// Where its Raft log lives.
    pub raft_dir: PathBuf,
    /// The first members, `(id, host:port)`, when bootstrapping a new cluster; empty when
    /// the cluster exists already or is initialised by `timerdb admin init`.
    pub initial_members: Vec<(NodeId, String)>,
    /// Slot count of the store the cluster shares.
    pub slots: u32,
    /// Lease settings of a new cluster.
    pub lease: LeaseSettings,
    /// Raft election timeout range; the leader's heartbeat is a third of its low end.
    pub election_timeout_ms: (u64, u64),
    /// Added to every wall-clock reading this member reports to others (tests use it to
    /// play a member whose clock is off; 0 in service).
    pub wall_clock_offset_ms: i64,
}

/// The leader's wall clock minus a member's, as the member measured it at a lease renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    /// Leader's clock minus this member's, ms.
    pub offset_ms: i64,
    /// Error bound of the measurement (half the renewal's round trip), ms.
    pub error_ms: u64,
}

impl ClockOffset {
    /// Whether the clocks surely differ by more than `drift_ms`, whatever the error.
    pub fn beyond(&self, drift_ms: u64) -> bool {
        self.offset_ms.unsigned_abs() > drift_ms + self.error_ms
    }
}

impl ClusterConfig {
    /// A member with the default lease and election settings.
    pub fn new(id: NodeId, advertise: impl Into<String>, raft_dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            advertise: advertise.into(),
            raft_dir: raft_dir.into(),
            initial_members: Vec::new(),
            slots: 256,
            lease: LeaseSettings::default(),
            election_timeout_ms: (400, 800),
            wall_clock_offset_ms: 0,
        }
    }
}

/// A range this member owns in its current map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnedRange {
    /// The range, with its epoch (the fencing token for writes that belong to ownership).
    pub range: Range,
    /// When this member may start acting on it: at once for a range nobody could still
    /// hold, one lease plus the drift after it learned of the move otherwise.
    pub usable_at: Instant,
}

/// A running cluster member.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.inner.config.id)
            .finish()
    }
}

struct Inner {
    config: ClusterConfig,
    raft: Raft,
    map: watch::Receiver<AppliedMap>,
    /// Until when this member's lease holds (none before the first renewal).
    lease_until: Mutex<Option<Instant>>,
    /// When this member first saw each slot it owns under its current epoch.
    gained: Mutex<HashMap<u32, (u64, Instant)>>,
    /// Slots it lost lately, with the end of the lease it held when it saw the loss.
    lost: Mutex<HashMap<u32, Instant>>,
    /// The map index `gained` and `lost` were last brought up to.
    noted: std::sync::atomic::AtomicU64,
    /// Leader only: when each member last renewed its lease while keeping up with the
    /// log, and the index the leader granted it last.
    last_seen: Mutex<HashMap<NodeId, (Instant, u64)>>,
    /// The leader's clock minus this member's, measured at the last renewal the leader
    /// answered, and its error bound (half that round trip); ms.
    clock: Mutex<Option<ClockOffset>>,
    /// Leader only: members whose clocks were reported off by more than the drift (each
    /// warned about once until it is back within it).
    skewed: Mutex<std::collections::HashSet<NodeId>>,
    /// Leader only: members a rejoin is being proposed for.
    rejoining: Mutex<std::collections::HashSet<NodeId>>,
    /// Leader: lease renewals waiting for the next quorum check ([`ClusterNode::confirm_leadership`]).
    confirm: mpsc::UnboundedSender<Confirmation>,
    /// Leader: the features each member reported with its last renewal.
    features: Mutex<HashMap<NodeId, u32>>,
    /// Leader: renewals granted, and the quorum checks run for them (counters).
    grants: AtomicU64,
    quorum_checks: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// [`pb::HeartbeatRequest::features`] bit: this build understands [`Command::Released`].
const FEATURE_RELEASED: u32 = 1;

/// Where a lease renewal waits for the quorum check that confirms the leadership it is
/// granted on.
type Confirmation = oneshot::Sender<std::result::Result<(), String>>;

/// Shortest time between two quorum checks run for lease renewals: at most 50 a second,
/// whatever the member count, for at most this much more latency per renewal.
const CONFIRM_EVERY: Duration = Duration::from_millis(20);

impl ClusterNode {
    /// Opens the member's Raft store, starts Raft and the member's background duties. The
    /// services it returns ([`ClusterNode::raft_service`], [`ClusterNode::cluster_service`])
    /// must be served on `config.advertise` by the caller.
    pub async fn start(config: ClusterConfig) -> Result<Self> {
        config
            .lease
            .validate()
            .map_err(|e| Error::Refused(crate::Refusal::Invalid(e)))?;
        let (log, sm, map) = store::open(&config.raft_dir).await?;
        let raft_config = openraft::Config {
            cluster_name: "timerdb".into(),
            heartbeat_interval: config.election_timeout_ms.0 / 3,
            election_timeout_min: config.election_timeout_ms.0,
            election_timeout_max: config.election_timeout_ms.1,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Raft(e.to_string()))?;
        let network = Network {
            timeout: Duration::from_millis(config.election_timeout_ms.0 / 2),
            ..Network::default()
        };
        let raft = Raft::new(config.id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        let (confirm, confirmations) = mpsc::unbounded_channel();
        let node = Self {
            inner: Arc::new(Inner {
                config,
                raft,
                map,
                lease_until: Mutex::new(None),
                gained: Mutex::new(HashMap::new()),
                lost: Mutex::new(HashMap::new()),
                noted: std::sync::atomic::AtomicU64::new(u64::MAX),
                last_seen: Mutex::new(HashMap::new()),
                clock: Mutex::new(None),
                skewed: Mutex::new(Default::default()),
                rejoining: Mutex::new(Default::default()),
                confirm,
                features: Mutex::new(HashMap::new()),
                grants: AtomicU64::new(0),
                quorum_checks: AtomicU64::new(0),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        node.bootstrap().await?;
        let tasks = vec![
            tokio::spawn(node.clone().confirm_leadership(confirmations)),
            tokio::spawn(node.clone().renew_leases()),
            tokio::spawn(node.clone().leader_duties()),
            tokio::spawn(node.clone().track_gains()),
        ];
        *node.inner.tasks.lock().unwrap() = tasks;
        Ok(node)
    }

    /// The lowest id of the initial members creates the Raft membership, once.
    async fn bootstrap(&self) -> Result<()> {
        let c = &self.inner.config;
        let Some(first) = c.initial_members.iter().map(|(id, _)| *id).min() else {
            return Ok(());
        };
        if first != c.id {
            return Ok(());
        }
        let initialised = self
            .inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        if !initialised {
            let members: BTreeMap<NodeId, BasicNode> = c
                .initial_members
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            self.inner
                .raft
                .initialize(members)
                .await
                .map_err(|e| Error::Raft(e.to_string()))?;
        }
        Ok(())
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.inner.config.id
    }

    /// The Raft instance (metrics, membership changes).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The cluster map as this member last applied it; changes are published on it.
    pub fn map(&self) -> watch::Receiver<AppliedMap> {
        self.inner.map.clone()
    }

    /// The server of `timerdb.internal.v1.Raft` for this member.
    pub fn raft_service(&self) -> pb::raft_server::RaftServer<RaftService> {
        RaftService::new(self.inner.raft.clone()).into_server()
    }

    /// The server of `timerdb.internal.v1.Cluster` for this member.
    pub fn cluster_service(&self) -> pb::cluster_server::ClusterServer<ClusterService> {
        pb::cluster_server::ClusterServer::new(ClusterService { node: self.clone() })
    }

    /// This member's wall clock, as it reports it to others.
    fn wall_ms(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        (now + self.inner.config.wall_clock_offset_ms).max(0) as u64
    }

    /// How far the leader's wall clock is from this member's, as measured at the last
    /// lease renewal (`None` before one, or on the leader itself: it is the reference).
    pub fn clock_offset(&self) -> Option<ClockOffset> {
        *self.inner.clock.lock().unwrap()
    }

    /// Leader: the members whose clocks were last reported further off its own than the
    /// lease drift allows (empty on other members).
    pub fn skewed_members(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.inner.skewed.lock().unwrap().iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Until when this member's lease holds, if it holds now.
    pub fn lease_until(&self) -> Option<Instant> {
        (*self.inner.lease_until.lock().unwrap()).filter(|t| *t > Instant::now())
    }

    /// The ranges this member owns in its map, each with the moment it may start on it.
    /// Acting on one also needs [`ClusterNode::lease_until`] to hold.
    pub fn owned(&self) -> Vec<OwnedRange> {
        let applied = self.inner.map.borrow().clone();
        let gained = self.inner.gained.lock().unwrap();
        let wait = Duration::from_millis(applied.map.lease.lease_ms + applied.map.lease.drift_ms);
        applied
            .map
            .ranges_of(self.id())
            .into_iter()
            .map(|range| {
                // First seen under this range's epoch; a record from an earlier epoch (the
                // slot went away and came back) does not count.
                let seen = (range.start..=range.end)
                    .map(|s| match gained.get(&s) {
                        Some((epoch, at)) if *epoch == range.epoch => *at,
                        _ => Instant::now(),
                    })
                    .max()
                    .unwrap_or_else(Instant::now);
                let usable_at = match range.handover {
                    Handover::Immediate => seen,
                    Handover::AfterLease => seen + wait,
                };
                OwnedRange { range, usable_at }
            })
            .collect()
    }

    /// The leader's id and address, as this member knows them.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.inner.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// Applies `command` to the cluster map through the leader, wherever it is; waits up
    /// to ten election timeouts for a leader.
    pub async fn propose(&self, command: Command) -> Result<()> {
        let patience = Duration::from_millis(self.inner.config.election_timeout_ms.1 * 10);
        let deadline = Instant::now() + patience;
        loop {
            let attempt = match self.leader() {
                Some((id, _)) if id == self.id() => self.propose_here(command.clone()).await,
                Some((id, addr)) => forward(id, &addr, &command, patience).await,
                None => Err(Error::NoLeader("no leader is elected yet".into())),
            };
            match attempt {
                Err(Error::NoLeader(why)) if Instant::now() < deadline => {
                    tracing::debug!(%why, "cluster.propose: waiting for a leader");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Leader only: writes `command` to the log and waits until it is applied.
    async fn propose_here(&self, command: Command) -> Result<()> {
        if matches!(command, Command::Released { .. }) {
            self.every_member_understands(FEATURE_RELEASED)?;
        }
        match self.inner.raft.client_write(command).await {
            Ok(r) => {
                let Answer(answer) = r.data;
                answer.map_err(Error::Refused)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(Error::NoLeader(format!(
                    "node {} is not the leader (leader: {:?})",
                    self.id(),
                    f.leader_id
                )))
            }
            Err(e) => Err(Error::Raft(e.to_string())),
        }
    }

    /// Leader: refuses a command some member (not gone) has not reported it understands
    /// (`feature`): during a rolling upgrade an older member could not decode it.
    fn every_member_understands(&self, feature: u32) -> Result<()> {
        let map = self.inner.map.borrow().map.clone();
        let features = self.inner.features.lock().unwrap();
        let behind: Vec<NodeId> = map
            .members
            .iter()
            .filter(|(id, m)| m.state != MemberState::Gone && **id != self.id())
            .map(|(id, _)| *id)
            .filter(|id| features.get(id).is_none_or(|f| f & feature == 0))
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        Err(Error::Refused(crate::Refusal::Invalid(format!(
            "members {behind:?} have not reported that they understand this command (not \
             upgraded, or not heard from since this leader was elected)"
        ))))
    }

    /// Leader: takes in the clock offset `member` measured against this leader's clock,
    /// and warns (once, until it is back within bounds) when it is surely further off
    /// than the drift the cluster's leases allow: the lease argument, the homing of
    /// near-term timers and the recorded progress all assume members' wall clocks agree
    /// within it (the cluster does not act on it: fix the member's time sync).
    fn note_clock(&self, member: NodeId, clock: ClockOffset) {
        let drift = self.inner.map.borrow().map.lease.drift_ms;
        let mut skewed = self.inner.skewed.lock().unwrap();
        if clock.beyond(drift) {
            if skewed.insert(member) {
                tracing::warn!(
                    member,
                    offset_ms = -clock.offset_ms,
                    error_ms = clock.error_ms,
                    drift_ms = drift,
                    "cluster.clock: member {member}'s wall clock is {} ms off the leader's \
                     (± {} ms), more than the {drift} ms of drift the cluster allows; timers it \
                     fires may be early or late by that much: fix its time sync (NTP)",
                    -clock.offset_ms,
                    clock.error_ms
                );
            }
        } else if skewed.remove(&member) {
            tracing::info!(
                member,
                offset_ms = -clock.offset_ms,
                "cluster.clock: member {member}'s clock is back within the drift"
            );
        }
    }

    /// Leader only: renews `member`'s lease. Returns the applied index the renewal is
    /// good for, after confirming with a quorum that this node still leads (a check begun
    /// after the renewal arrived, shared with the others waiting for it). The member
    /// counts as alive only if its own map has caught up with the index granted to it
    /// before (`member_applied`): one that cannot apply the log never holds a lease, and
    /// its slots must move.
    async fn grant(&self, member: NodeId, member_applied: u64) -> Result<u64> {
        let cannot = |e: &dyn std::fmt::Display| {
            Error::NoLeader(format!("node {} cannot grant leases: {e}", self.id()))
        };
        let (confirmed, confirmation) = oneshot::channel();
        self.inner
            .confirm
            .send(confirmed)
            .map_err(|_| cannot(&"it is shutting down"))?;
        confirmation
            .await
            .map_err(|_| cannot(&"it is shutting down"))?
            .map_err(|e| cannot(&e))?;
        self.inner.grants.fetch_add(1, Ordering::Relaxed);
        let applied = self.inner.map.borrow().clone();
        {
            let mut seen = self.inner.last_seen.lock().unwrap();
            let keeps_up = seen
                .get(&member)
                .is_none_or(|(_, granted)| member_applied >= *granted);
            let at = match seen.get(&member) {
                Some((at, _)) if !keeps_up => *at,
                _ => Instant::now(),
            };
            seen.insert(member, (at, applied.index));
        }
        if applied.map.members.get(&member).map(|m| m.state) == Some(MemberState::Gone)
            && self.inner.rejoining.lock().unwrap().insert(member)
        {
            // It speaks again (restarted, or its partition healed): give it ranges again.
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(e) = node.propose(Command::Rejoin { id: member }).await {
                    tracing::warn!(member, error = %e, "cluster.rejoin failed");
                }
                node.inner.rejoining.lock().unwrap().remove(&member);
            });
        }
        Ok(applied.index)
    }

    /// Leader: runs the quorum checks lease renewals wait on, one at a time and at most
    /// one per [`CONFIRM_EVERY`]; each answers every renewal that arrived before it began.
    /// Only a check begun after a renewal arrived may confirm it: the renewal counts from
    /// when its member asked, and leadership confirmed from a moment after that holds for
    /// the lease's whole span (docs/design.md). One check per renewal cost the leader
    /// `members × (members − 1) × 5` calls a second (docs/scaling.md, step 1).
    async fn confirm_leadership(self, mut asks: mpsc::UnboundedReceiver<Confirmation>) {
        let mut last: Option<Instant> = None;
        while let Some(first) = asks.recv().await {
            if let Some(last) = last {
                tokio::time::sleep_until(last + CONFIRM_EVERY).await;
            }
            let mut waiting = vec![first];
            while let Ok(more) = asks.try_recv() {
                waiting.push(more);
            }
            last = Some(Instant::now());
            self.inner.quorum_checks.fetch_add(1, Ordering::Relaxed);
            let confirmed = self
                .inner
                .raft
                .ensure_linearizable()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            for w in waiting {
                let _ = w.send(confirmed.clone());
            }
        }
    }

    /// Tells the cluster this member stopped acting on `start..=end`, held under `epoch`:
    /// the slots' new owner need not wait out this member's lease ([`Command::Released`]).
    /// Refused while some member's build predates the command.
    pub async fn release(&self, start: u32, end: u32, epoch: u64) -> Result<()> {
        self.propose(Command::Released {
            id: self.id(),
            start,
            end,
            epoch,
        })
        .await
    }

    /// Leader: lease renewals granted so far, and the quorum checks run for them.
    pub fn lease_work(&self) -> (u64, u64) {
        (
            self.inner.grants.load(Ordering::Relaxed),
            self.inner.quorum_checks.load(Ordering::Relaxed),
        )
    }

    /// Every heartbeat: ask the leader to renew this member's lease. A renewal counts from
    /// the moment it was asked for, and only if this member's map is at least as recent as
    /// the leader's was when it granted it.
    async fn renew_leases(self) {
        let every = |lease: LeaseSettings| Duration::from_millis(lease.heartbeat_ms.max(1));
        let mut period = every(self.inner.map.borrow().map.lease);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut clients: HashMap<String, ClusterClient<tonic::transport::Channel>> = HashMap::new();
        loop {
            ticks.tick().await;
            let lease = self.inner.map.borrow().map.lease;
            // The settings are the map's: a new cluster's arrive with its first entries.
            if every(lease) != period {
                period = every(lease);
                ticks = tokio::time::interval(period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            }
            let Some((leader, addr)) = self.leader() else {
                continue;
            };
            // Each renewal runs on its own, so a slow or dead leader does not hold up the
            // next one; each may take up to half a lease.
            let timeout = Duration::from_millis(lease.lease_ms / 2);
            let client = if leader == self.id() {
                None
            } else {
                match clients.get(&addr) {
                    Some(c) => Some(c.clone()),
                    None => match network::channel(&addr, timeout) {
                        Ok(ch) => Some(
                            clients
                                .entry(addr.clone())
                                .or_insert(ClusterClient::new(ch))
                                .clone(),
                        ),
                        Err(_) => continue,
                    },
                }
            };
            let node = self.clone();
            tokio::spawn(async move {
                let asked = Instant::now();
                let my_index = node.inner.map.borrow().index;
                let granted = match client {
                    None => {
                        *node.inner.clock.lock().unwrap() = None;
                        node.grant(node.id(), my_index).await.ok()
                    }
                    Some(mut client) => {
                        let measured = node.clock_offset();
                        let sent_wall = node.wall_ms();
                        let call = client.heartbeat(pb::HeartbeatRequest {
                            node_id: node.id(),
                            applied_index: my_index,
                            wall_ms: sent_wall,
                            clock_offset_ms: measured.map_or(0, |c| c.offset_ms),
                            clock_error_ms: measured.map_or(0, |c| c.error_ms),
                            features: FEATURE_RELEASED,
                        });
                        match tokio::time::timeout(timeout, call).await {
                            Ok(Ok(r)) => {
                                let r = r.into_inner();
                                if r.leader_wall_ms != 0 {
                                    let half = asked.elapsed().as_millis() as u64 / 2;
                                    let offset = ClockOffset {
                                        offset_ms: r.leader_wall_ms as i64
                                            - (sent_wall + half) as i64,
                                        error_ms: half + 1,
                                    };
                                    *node.inner.clock.lock().unwrap() = Some(offset);
                                }
                                Some(r.applied_index)
                            }
                            Ok(Err(s)) => {
                                tracing::debug!(leader, error = %s.message(), "cluster.lease: renewal refused");
                                None
                            }
                            Err(_) => None,
                        }
                    }
                };
                if let Some(index) = granted {
                    node.take_renewal(asked, index, lease.lease_ms);
                }
            });
        }
    }

    /// Takes in a renewal asked at `asked` and granted at the leader's `index`, if this
    /// member's map has applied as far. Losses the map shows are noted first, with the
    /// lease as it was, in one step with the check, so no renewal can extend the time a
    /// lost slot may still be acted on.
    fn take_renewal(&self, asked: Instant, index: u64, lease_ms: u64) {
        let mut lease = self.inner.lease_until.lock().unwrap();
        let applied = self.inner.map.borrow().clone();
        self.note_map(&applied, *lease);
        if applied.index >= index {
            let until = asked + Duration::from_millis(lease_ms);
            *lease = Some(lease.map_or(until, |t| t.max(until)));
        }
    }

    /// While leader: create the map of a new cluster, and declare gone the members that
    /// renewed nothing for the failure timeout (their leases have ended by then).
    async fn leader_duties(self) {
        let mut leading_term: Option<u64> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let m = self.inner.raft.metrics().borrow().clone();
            if m.current_leader != Some(self.id()) {
                leading_term = None;
                continue;
            }
            if leading_term != Some(m.current_term) {
                // A new leader knows nothing of leases its predecessor granted: it gives
                // every member a whole failure timeout from now.
                leading_term = Some(m.current_term);
                self.inner.last_seen.lock().unwrap().clear();
            }
            let map = self.inner.map.borrow().map.clone();
            if !map.is_initialised() {
                // The first leader of a new cluster creates the map over the Raft members
                // (whoever bootstrapped them: --initial-members or `timerdb admin init`).
                let c = &self.inner.config;
                let members: Vec<(NodeId, String)> = m
                    .membership_config
                    .membership()
                    .nodes()
                    .map(|(id, n)| (*id, n.addr.clone()))
                    .collect();
                let init = Command::Init {
                    slots: c.slots,
                    members,
                    lease: c.lease,
                };
                if let Err(e) = self.propose_here(init).await {
                    tracing::warn!(error = %e, "cluster.init failed");
                }
                continue;
            }
            let failure = Duration::from_millis(map.lease.failure_ms);
            let silent: Vec<NodeId> = {
                let mut seen = self.inner.last_seen.lock().unwrap();
                // A member this leader never heard from counts from when it first noticed
                // it (its election, or the member's addition), not from before.
                for id in map.members.keys() {
                    seen.entry(*id).or_insert((Instant::now(), 0));
                }
                seen.retain(|id, _| map.members.contains_key(id));
                map.members
                    .iter()
                    .filter(|(id, m)| **id != self.id() && m.state != MemberState::Gone)
                    .filter(|(id, _)| seen[*id].0.elapsed() > failure)
                    .map(|(id, _)| *id)
                    .collect()
            };
            for id in silent {
                tracing::warn!(
                    member = id,
                    "cluster.failure: no lease renewal for the failure timeout; moving its ranges"
                );
                if let Err(e) = self.propose_here(Command::MarkGone { id }).await {
                    tracing::warn!(member = id, error = %e, "cluster.mark_gone failed");
                }
            }
        }
    }

    /// Remembers when this member first saw each slot it gained under its current epoch.
    async fn track_gains(self) {
        let mut rx = self.inner.map.clone();
        loop {
            {
                let lease = self.inner.lease_until.lock().unwrap();
                let applied = rx.borrow_and_update().clone();
                self.note_map(&applied, *lease);
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Records, for the map as applied now, when each slot gained under its epoch was
    /// first seen, and for each slot lost the end of the lease held when the loss was
    /// seen: the old owner may finish with it (final fires, progress, low-water mark) until
    /// then and no longer, since its later renewals are asked after the move committed and
    /// the new owner waits one lease plus the drift from then. Called before every lease
    /// renewal is taken in (the caller holds the lease lock), so no renewal can extend a
    /// lost slot's deadline.
    fn note_map(&self, applied: &AppliedMap, lease: Option<Instant>) {
        let now = Instant::now();
        self.inner
            .noted
            .store(applied.index, std::sync::atomic::Ordering::Release);
        let mut gained = self.inner.gained.lock().unwrap();
        let mut lost = self.inner.lost.lock().unwrap();
        let mine: HashMap<u32, u64> = (0..applied.map.slots)
            .filter_map(|s| {
                let o = applied.map.owners[s as usize];
                (o.owner == Some(self.id())).then_some((s, o.epoch))
            })
            .collect();
        for (s, _) in gained.iter() {
            if !mine.contains_key(s) {
                lost.entry(*s).or_insert(lease.unwrap_or(now));
            }
        }
        gained.retain(|s, (epoch, _)| mine.get(s) == Some(epoch));
        for (s, epoch) in &mine {
            lost.remove(s);
            gained.entry(*s).or_insert((*epoch, now));
        }
        lost.retain(|_, until| *until > now);
    }

    /// Whether this member may fire and write ownership records for slots
    /// `first..=last`, run under `epoch`, now: its lease holds for more than `margin`, and
    /// each slot is its own under that epoch in its map, or was lost so recently that the
    /// lease held at the loss has not ended.
    pub fn may_act(&self, first: u32, last: u32, epoch: u64, margin: Duration) -> bool {
        let now = Instant::now();
        let Some(until) = self.lease_until() else {
            return false;
        };
        // A map change this member has not noted yet (its watchers may not have run):
        // note it now, so a slot just lost counts as lost, not as never owned.
        if self.inner.map.borrow().index
            != self.inner.noted.load(std::sync::atomic::Ordering::Acquire)
        {
            let lease = self.inner.lease_until.lock().unwrap();
            let applied = self.inner.map.borrow().clone();
            self.note_map(&applied, *lease);
        }
        if until.saturating_duration_since(now) <= margin {
            return false;
        }
        let me = Some(self.id());
        let map = self.inner.map.borrow();
        let lost = self.inner.lost.lock().unwrap();
        (first..=last).all(|s| {
            // Its own under the same epoch: a slot that went away and came back under a
            // new epoch belongs to a new range (someone else owned it in between).
            let o = map.map.owners.get(s as usize);
            o.is_some_and(|o| o.owner == me && o.epoch == epoch)
                || lost
                    .get(&s)
                    .is_some_and(|t| t.saturating_duration_since(now) > margin)
        })
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow().current_term
    }

    /// Whether this member leads.
    pub fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().current_leader == Some(self.id())
    }

    /// Leader only: how long ago each member last renewed its lease.
    pub fn heard_from(&self) -> HashMap<NodeId, Duration> {
        self.inner
            .last_seen
            .lock()
            .unwrap()
            .iter()
            .map(|(id, (at, _))| (*id, at.elapsed()))
            .collect()
    }

    /// Bootstraps a new cluster over `members` (each started with its `--node-id` and
    /// nothing else); the leader then creates the map over them.
    pub async fn initialize(&self, members: &[(NodeId, String)]) -> Result<()> {
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        if !nodes.contains_key(&self.id()) {
            return Err(Error::Refused(crate::Refusal::Invalid(format!(
                "the members must include node {}, which is asked to bootstrap them",
                self.id()
            ))));
        }
        self.inner
            .raft
            .initialize(nodes)
            .await
            .map_err(|e| match e {
                RaftError::APIError(e) => Error::Refused(crate::Refusal::Invalid(format!(
                    "node {} cannot bootstrap a cluster: {e}",
                    self.id()
                ))),
                e => Error::Raft(e.to_string()),
            })
    }

    /// Leader only: adds a running member: it catches up with the log as a learner, then
    /// becomes a voter and a member of the map; the slots are spread again.
    pub async fn add_member(&self, id: NodeId, addr: &str) -> Result<()> {
        let node = BasicNode {
            addr: addr.to_owned(),
        };
        self.inner
            .raft
            .add_learner(id, node, true)
            .await
            .map_err(|e| Error::Raft(format!("adding node {id} at {addr} as a learner: {e}")))?;
        self.inner
            .raft
            .change_membership(openraft::ChangeMembers::AddVoterIds([id].into()), false)
            .await
            .map_err(|e| Error::Raft(format!("making node {id} a voter: {e}")))?;
        self.propose_here(Command::AddMember {
            id,
            addr: addr.to_owned(),
        })
        .await?;
        self.propose_here(Command::Rebalance).await
    }

    /// Leader only: removes a member that owns nothing from the map, then from Raft.
    pub async fn remove_member(&self, id: NodeId) -> Result<()> {
        if id == self.id() {
            return Err(Error::Refused(crate::Refusal::Invalid(format!(
                "node {id} leads the cluster: stop it (another leader is elected), then remove it"
            ))));
        }
        self.propose_here(Command::RemoveMember { id }).await?;
        self.inner
            .raft
            .change_membership(openraft::ChangeMembers::RemoveVoters([id].into()), false)
            .await
            .map_err(|e| Error::Raft(format!("removing node {id} from Raft: {e}")))?;
        Ok(())
    }

    /// Leader only: applies `command` here (no forwarding).
    pub async fn apply_here(&self, command: Command) -> Result<()> {
        self.propose_here(command).await
    }

    /// Stops the member's duties and Raft.
    pub async fn shutdown(&self) {
        for t in self.inner.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        let _ = self.inner.raft.shutdown().await;
    }
}

async fn forward(leader: NodeId, addr: &str, command: &Command, timeout: Duration) -> Result<()> {
    let channel = network::channel(addr, timeout).map_err(Error::Network)?;
    let json = serde_json::to_vec(command).map_err(|e| Error::Network(e.to_string()))?;
    match ClusterClient::new(channel)
        .propose(pb::RaftPayload { json })
        .await
    {
        Ok(r) => {
            let Answer(answer) = serde_json::from_slice(&r.into_inner().json)
                .map_err(|e| Error::Network(format!("leader {leader}: {e}")))?;
            answer.map_err(Error::Refused)
        }
        Err(s)
            if s.code() == tonic::Code::FailedPrecondition
                || s.code() == tonic::Code::Unavailable =>
        {
            Err(Error::NoLeader(format!(
                "leader {leader} at {addr}: {}",
                s.message()
            )))
        }
        Err(s) => Err(Error::Network(format!("leader {leader} at {addr}: {s}"))),
    }
}

/// The server side of `timerdb.internal.v1.Cluster`.
#[derive(Debug, Clone)]
pub struct ClusterService {
    node: ClusterNode,
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn heartbeat(
        &self,
        request: tonic::Request<pb::HeartbeatRequest>,
    ) -> std::result::Result<tonic::Response<pb::HeartbeatReply>, tonic::Status> {
        let r = request.into_inner();
        self.node
            .inner
            .features
            .lock()
            .unwrap()
            .insert(r.node_id, r.features);
        if r.wall_ms != 0 {
            self.node.note_clock(
                r.node_id,
                ClockOffset {
                    offset_ms: r.clock_offset_ms,
                    error_ms: r.clock_error_ms,
                },
            );
        }
        match self.node.grant(r.node_id, r.applied_index).await {
            Ok(applied_index) => Ok(tonic::Response::new(pb::HeartbeatReply {
                applied_index,
                leader_id: self.node.id(),
                leader_wall_ms: self.node.wall_ms(),
            })),
            Err(e) => Err(tonic::Status::failed_precondition(e.to_string())),
        }
    }

    async fn propose(
        &self,
        request: tonic::Request<pb::RaftPayload>,
    ) -> std::result::Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        let command: Command = serde_json::from_slice(&request.into_inner().json)
            .map_err(|e| tonic::Status::invalid_argument(format!("undecodable command: {e}")))?;
        let answer = match self.node.propose_here(command).await {
            Ok(()) => Answer(Ok(())),
            Err(Error::Refused(r)) => Answer(Err(r)),
            Err(e @ Error::NoLeader(_)) => {
                return Err(tonic::Status::failed_precondition(e.to_string()));
            }
            Err(e) => return Err(tonic::Status::internal(e.to_string())),
        };
        let json =
            serde_json::to_vec(&answer).map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(pb::RaftPayload { json }))
    }
}
