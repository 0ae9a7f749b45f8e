//! `timerdb.admin.v1.Admin`: status and membership of a cluster, on every node. A member
//! that does not lead forwards changes (and the status, which needs the leader's view of
//! heartbeats) to the leader.

use std::sync::Arc;
use std::time::Duration;

use timerdb_proto::admin::v1 as pb;
use timerdb_proto::admin::v1::admin_client::AdminClient;
use timerdb_raft::map::{Command, MemberState};
use tonic::{Request, Response, Status};

use crate::cluster::{FORWARDED, Member};
use crate::scheduler::Scheduler;
use crate::timer::now_ms;

/// The admin service of one node.
pub struct AdminService {
    member: Option<Arc<Member>>,
    scheduler: Arc<Scheduler>,
    addr: String,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService")
            .field("addr", &self.addr)
            .finish()
    }
}

type Reply<T> = std::result::Result<Response<T>, Status>;

fn not_a_member() -> Status {
    Status::failed_precondition(
        "this node is not a cluster member (it was started without --node-id): it owns every \
         slot by itself; `status` is the only admin command it answers",
    )
}

fn refused(e: timerdb_raft::Error) -> Status {
    match e {
        timerdb_raft::Error::Refused(r) => Status::failed_precondition(r.to_string()),
        timerdb_raft::Error::NoLeader(m) => Status::unavailable(m),
        e => Status::unavailable(e.to_string()),
    }
}

impl AdminService {
    /// The service of a node (a cluster member when `member` is set) that clients reach on
    /// `addr`.
    pub fn new(member: Option<Arc<Member>>, scheduler: Arc<Scheduler>, addr: String) -> Self {
        Self {
            member,
            scheduler,
            addr,
        }
    }

    /// As a tonic service.
    pub fn into_server(self) -> pb::admin_server::AdminServer<Self> {
        pb::admin_server::AdminServer::new(self)
    }

    fn member(&self) -> Result<&Arc<Member>, Status> {
        self.member.as_ref().ok_or_else(not_a_member)
    }

    /// The leader's admin client when this member does not lead (and the call was not
    /// forwarded here already).
    fn leader_client<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Option<AdminClient<tonic::transport::Channel>>, Status> {
        let member = self.member()?;
        let node = member.node();
        if node.is_leader() {
            return Ok(None);
        }
        let Some((leader, addr)) = node.leader() else {
            return Err(Status::unavailable(format!(
                "node {} knows no leader right now (an election is under way, or it cannot \
                 reach a majority); retry",
                node.id()
            )));
        };
        if request.metadata().contains_key(FORWARDED) {
            return Err(Status::unavailable(format!(
                "node {} is not the leader (node {leader} at {addr} is) and the call was \
                 forwarded here already; retry",
                node.id()
            )));
        }
        let channel = timerdb_raft::network::channel(&addr, Duration::from_secs(5))
            .map_err(Status::unavailable)?;
        Ok(Some(AdminClient::new(channel)))
    }

    fn applied(&self) -> pb::ChangeReply {
        pb::ChangeReply {
            applied_index: self
                .member
                .as_ref()
                .map(|m| m.node().map().borrow().index)
                .unwrap_or(0),
        }
    }

    fn node_stats(&self) -> pb::NodeStatsReply {
        let now = now_ms();
        pb::NodeStatsReply {
            id: self.member.as_ref().map(|m| m.node().id()).unwrap_or(0),
            lease_left_ms: self.member.as_ref().and_then(|m| {
                m.node().lease_until().map(|t| {
                    t.saturating_duration_since(tokio::time::Instant::now())
                        .as_millis() as u64
                })
            }),
            ranges: self
                .scheduler
                .report()
                .into_iter()
                .map(|r| pb::RunningRange {
                    first: r.range.first,
                    last: r.range.last,
                    low_water_ms: r.low_water_ms.min(now),
                    in_memory: r.in_memory as u64,
                    fired_per_s: r.fired_per_s,
                })
                .collect(),
        }
    }

    async fn stats_of(&self, id: u64, addr: &str) -> Option<pb::NodeStatsReply> {
        if self.member.as_ref().is_some_and(|m| m.node().id() == id) {
            return Some(self.node_stats());
        }
        let channel = timerdb_raft::network::channel(addr, Duration::from_secs(1)).ok()?;
        let mut client = AdminClient::new(channel);
        let call = client.node_stats(pb::NodeStatsRequest {});
        match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// The status as this node sees it, with each owner's figures.
    async fn local_status(&self) -> pb::StatusReply {
        let now = now_ms();
        let Some(member) = &self.member else {
            // A single node: one member owning every slot.
            let stats = self.node_stats();
            let ranges = stats
                .ranges
                .iter()
                .map(|r| pb::Range {
                    start: r.first,
                    end: r.last,
                    owner: Some(0),
                    epoch: 0,
                    lease_left_ms: None,
                    low_water_lag_ms: Some(now.saturating_sub(r.low_water_ms)),
                    in_memory: Some(r.in_memory),
                    fired_per_s: Some(r.fired_per_s),
                })
                .collect();
            return pb::StatusReply {
                leader: None,
                term: 0,
                members: vec![pb::Member {
                    id: 0,
                    address: self.addr.clone(),
                    state: "active".into(),
                    last_heartbeat_ms_ago: None,
                }],
                ranges,
                answered_by: 0,
            };
        };
        let node = member.node();
        let applied = node.map().borrow().clone();
        let heard = node.heard_from();
        let mut stats = std::collections::HashMap::new();
        let asks = applied
            .map
            .members
            .iter()
            .filter(|(_, m)| m.state != MemberState::Gone)
            .map(|(id, m)| async move { (*id, self.stats_of(*id, &m.addr).await) });
        for (id, s) in futures::future::join_all(asks).await {
            if let Some(s) = s {
                stats.insert(id, s);
            }
        }
        let members = applied
            .map
            .members
            .iter()
            .map(|(id, m)| pb::Member {
                id: *id,
                address: m.addr.clone(),
                state: m.state.as_str().into(),
                last_heartbeat_ms_ago: heard.get(id).map(|d| d.as_millis() as u64),
            })
            .collect();
        let ranges = applied
            .map
            .ranges()
            .into_iter()
            .map(|r| {
                let owner_stats = r.owner.and_then(|o| stats.get(&o));
                let running = owner_stats.and_then(|s| {
                    s.ranges
                        .iter()
                        .find(|x| x.first <= r.start && r.end <= x.last)
                });
                pb::Range {
                    start: r.start,
                    end: r.end,
                    owner: r.owner,
                    epoch: r.epoch,
                    lease_left_ms: owner_stats.and_then(|s| s.lease_left_ms),
                    low_water_lag_ms: running.map(|x| now.saturating_sub(x.low_water_ms)),
                    in_memory: running.map(|x| x.in_memory),
                    fired_per_s: running.map(|x| x.fired_per_s),
                }
            })
            .collect();
        let leader = node.leader().map(|(id, _)| id);
        pb::StatusReply {
            leader,
            term: node.term(),
            members,
            ranges,
            answered_by: node.id(),
        }
    }
}

fn forwarded<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r.set_timeout(Duration::from_secs(30));
    r
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(&self, request: Request<pb::StatusRequest>) -> Reply<pb::StatusReply> {
        // The leader knows when each member last renewed its lease: ask it when there is one.
        if self.member.is_some()
            && let Ok(Some(mut leader)) = self.leader_client(&request)
            && let Ok(r) = leader.status(forwarded(pb::StatusRequest {})).await
        {
            return Ok(r);
        }
        Ok(Response::new(self.local_status().await))
    }

    async fn init(&self, request: Request<pb::InitRequest>) -> Reply<pb::ChangeReply> {
        let member = self.member()?;
        let members = crate::config::parse_members(&request.get_ref().members)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        member.node().initialize(&members).await.map_err(refused)?;
        Ok(Response::new(self.applied()))
    }

    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Reply<pb::ChangeReply> {
        if let Some(mut leader) = self.leader_client(&request)? {
            return leader.add_node(forwarded(request.into_inner())).await;
        }
        let r = request.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument("node ids start at 1"));
        }
        crate::config::parse_members(&format!("{}={}", r.id, r.address))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.member()?
            .node()
            .add_member(r.id, &r.address)
            .await
            .map_err(refused)?;
        Ok(Response::new(self.applied()))
    }

    async fn remove_node(&self, request: Request<pb::NodeRequest>) -> Reply<pb::ChangeReply> {
        if let Some(mut leader) = self.leader_client(&request)? {
            return leader.remove_node(forwarded(request.into_inner())).await;
        }
        let id = request.into_inner().id;
        self.member()?
            .node()
            .remove_member(id)
            .await
            .map_err(refused)?;
        Ok(Response::new(self.applied()))
    }

    async fn drain(&self, request: Request<pb::NodeRequest>) -> Reply<pb::ChangeReply> {
        if let Some(mut leader) = self.leader_client(&request)? {
            return leader.drain(forwarded(request.into_inner())).await;
        }
        let id = request.into_inner().id;
        self.member()?
            .node()
            .apply_here(Command::Drain { id })
            .await
            .map_err(refused)?;
        Ok(Response::new(self.applied()))
    }

    async fn activate(&self, request: Request<pb::NodeRequest>) -> Reply<pb::ChangeReply> {
        if let Some(mut leader) = self.leader_client(&request)? {
            return leader.activate(forwarded(request.into_inner())).await;
        }
        let id = request.into_inner().id;
        self.member()?
            .node()
            .apply_here(Command::Activate { id })
            .await
            .map_err(refused)?;
        Ok(Response::new(self.applied()))
    }

    async fn move_range(&self, request: Request<pb::MoveRangeRequest>) -> Reply<pb::ChangeReply> {
        if let Some(mut leader) = self.leader_client(&request)? {
            return leader.move_range(forwarded(request.into_inner())).await;
        }
        let r = request.into_inner();
        self.member()?
            .node()
            .apply_here(Command::MoveRange {
                start: r.start,
                end: r.end,
                to: r.to,
            })
            .await
            .map_err(refused)?;
        Ok(Response::new(self.applied()))
    }

    async fn rebalance(&self, request: Request<pb::RebalanceRequest>) -> Reply<pb::ChangeReply> {
        if let Some(mut leader) = self.leader_client(&request)? {
            return leader.rebalance(forwarded(request.into_inner())).await;
        }
        self.member()?
            .node()
            .apply_here(Command::Rebalance)
            .await
            .map_err(refused)?;
        Ok(Response::new(self.applied()))
    }

    async fn node_stats(&self, _: Request<pb::NodeStatsRequest>) -> Reply<pb::NodeStatsReply> {
        Ok(Response::new(self.node_stats()))
    }
}
