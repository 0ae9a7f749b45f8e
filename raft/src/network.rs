//! openraft's network over tonic: the client side ([`Network`], one lazy channel per peer)
//! and the server side ([`RaftService`]) of `timerdb.internal.v1.Raft`. Messages travel as
//! openraft's serde encoding in a bytes field; replies carry openraft's own result, so a
//! remote Raft error arrives as the error openraft expects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use timerdb_proto::internal::v1 as pb;
use timerdb_proto::internal::v1::raft_client::RaftClient;
use tonic::transport::{Channel, Endpoint};

use crate::{NodeId, Raft, TypeConfig};

/// Largest internal message: snapshots of the map are sent in chunks well below it.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// A lazy channel to a peer's internal services at `addr` (`host:port`).
pub fn channel(addr: &str, timeout: Duration) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| format!("member address {addr:?} is not host:port"))?;
    Ok(endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Creates a connection per peer on demand, and keeps it: openraft asks for a client for
/// every quorum check (each lease renewal), and a new channel each time meant a new TCP
/// connection per peer per check.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// Bound on one call (connecting included).
    pub timeout: Duration,
    /// One channel per (peer, address); a channel reconnects by itself after a failure.
    pub channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        let key = (target, node.addr.clone());
        let cached = self.channels.lock().expect("channels").get(&key).cloned();
        let made = match cached {
            Some(c) => Ok(c),
            None => channel(&node.addr, self.timeout).inspect(|c| {
                self.channels
                    .lock()
                    .expect("channels")
                    .insert(key, c.clone());
            }),
        };
        Peer {
            target,
            client: made.map(|c| {
                RaftClient::new(c)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
            }),
        }
    }
}

/// The connection to one peer.
#[derive(Debug)]
pub struct Peer {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
}

#[derive(Debug, Clone, Copy)]
enum Call {
    Append,
    Vote,
    Snapshot,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Text(String);

impl Peer {
    async fn call<Req, Resp, E>(
        &mut self,
        call: Call,
        req: &Req,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Text(e.clone())))),
        };
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = pb::RaftPayload { json };
        let reply = match call {
            Call::Append => client.append_entries(request).await,
            Call::Vote => client.vote(request).await,
            Call::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            // Nothing listening, or the call timed out: back off before trying again.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ) =>
            {
                return Err(RPCError::Unreachable(Unreachable::new(&Text(format!(
                    "node {}: {}",
                    self.target,
                    s.message()
                )))));
            }
            Err(s) => {
                return Err(RPCError::Network(NetworkError::new(&Text(format!(
                    "node {}: {s}",
                    self.target
                )))));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&reply.json)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Call::Append, &rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Call::Snapshot, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Call::Vote, &rpc).await
    }
}

/// The server side of `timerdb.internal.v1.Raft`: hands each message to the local Raft.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftService")
    }
}

impl RaftService {
    /// Serves `raft`.
    pub fn new(raft: Raft) -> Self {
        Self { raft }
    }

    /// As a tonic service with the internal size limits.
    pub fn into_server(self) -> pb::raft_server::RaftServer<Self> {
        pb::raft_server::RaftServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn decode<T: DeserializeOwned>(r: tonic::Request<pb::RaftPayload>) -> Result<T, tonic::Status> {
    serde_json::from_slice(&r.into_inner().json)
        .map_err(|e| tonic::Status::invalid_argument(format!("undecodable raft message: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
    serde_json::to_vec(v)
        .map(|json| tonic::Response::new(pb::RaftPayload { json }))
        .map_err(|e| tonic::Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        encode(&self.raft.append_entries(decode(request)?).await)
    }

    async fn vote(
        &self,
        request: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        encode(&self.raft.vote(decode(request)?).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        encode(&self.raft.install_snapshot(decode(request)?).await)
    }
}
