//! TimerDB's cluster coordination: the replicated **cluster map** (members, slot owners and
//! their epochs, lease settings), kept by openraft with its log on the node's own disk.
//! It knows nothing of timers; the node asks it who owns what and is told when that changes.

// openraft's error types are large (its own examples allow this lint too); they travel only on
// the rare error paths of the cluster map.
#![allow(clippy::result_large_err)]

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub mod map;
pub mod network;
pub mod node;
pub mod store;

pub use map::{ClusterMap, Command, NodeId, Refusal};
pub use node::{ClockOffset, ClusterConfig, ClusterNode, OwnedRange};

/// What applying a command answered: done, or refused with the map unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer(pub std::result::Result<(), Refusal>);

openraft::declare_raft_types!(
    /// openraft's types for the cluster map: commands in, answers out, nodes known by
    /// their address.
    pub TypeConfig:
        D = Command,
        R = Answer,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The openraft instance of a node.
pub type Raft = openraft::Raft<TypeConfig>;

/// What can go wrong in cluster coordination.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node's Raft store could not be opened or written.
    #[error("raft store: {0}")]
    Storage(String),
    /// A command was refused; the map is unchanged.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// This node is not the leader and the leader is not known or not reachable.
    #[error("{0}")]
    NoLeader(String),
    /// Talking to another node failed.
    #[error("{0}")]
    Network(String),
    /// openraft reported an error.
    #[error("raft: {0}")]
    Raft(String),
}

/// Result of cluster calls.
pub type Result<T> = std::result::Result<T, Error>;
