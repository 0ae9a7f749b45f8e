//! The Raft log, vote and snapshots on the node's own disk (one redb file), and the state
//! machine that applies the log to the [`ClusterMap`].
//!
//! Every write commits with redb's default durability (fsynced before the commit returns),
//! so an acknowledged append or vote survives a crash. The map itself lives in memory: on
//! start it is rebuilt from the last snapshot, and openraft re-applies the committed log
//! after it (the committed id is saved too).

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::map::{ClusterMap, NodeId};
use crate::{Answer, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT: &str = "snapshot";

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// Opens (or creates) the node's Raft store in `dir` and returns its log store and state
/// machine. The map the state machine applies is published on the returned receiver.
pub async fn open(
    dir: &Path,
) -> Result<(LogStore, StateMachine, watch::Receiver<AppliedMap>), crate::Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::Storage(format!("raft dir {}: {e}", dir.display())))?;
    let path = dir.join("raft.redb");
    let db = Database::create(&path)
        .map_err(|e| crate::Error::Storage(format!("{}: {e}", path.display())))?;
    let db = Arc::new(db);
    {
        let tx = db
            .begin_write()
            .map_err(|e| crate::Error::Storage(e.to_string()))?;
        tx.open_table(LOG)
            .map_err(|e| crate::Error::Storage(e.to_string()))?;
        tx.open_table(META)
            .map_err(|e| crate::Error::Storage(e.to_string()))?;
        tx.commit()
            .map_err(|e| crate::Error::Storage(e.to_string()))?;
    }
    let log = LogStore { db: db.clone() };
    let (sm, rx) = StateMachine::new(db)
        .await
        .map_err(|e| crate::Error::Storage(e.to_string()))?;
    Ok((log, sm, rx))
}

fn get_meta<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> StorageResult<Option<T>> {
    let tx = db.begin_read().map_err(read_err)?;
    let table = tx.open_table(META).map_err(read_err)?;
    match table.get(key).map_err(read_err)? {
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(read_err),
        None => Ok(None),
    }
}

fn put_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> StorageResult<()> {
    let bytes = serde_json::to_vec(value).map_err(write_err)?;
    let tx = db.begin_write().map_err(write_err)?;
    {
        let mut table = tx.open_table(META).map_err(write_err)?;
        table.insert(key, bytes.as_slice()).map_err(write_err)?;
    }
    tx.commit().map_err(write_err)
}

/// The Raft log and vote, in redb.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn last_entry_id(&self) -> StorageResult<Option<LogId<NodeId>>> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(LOG).map_err(read_err)?;
        match table.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(read_err)?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }

    fn delete_range(&self, from: u64, to_inclusive: u64) -> StorageResult<()> {
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = tx.open_table(LOG).map_err(write_err)?;
            table
                .retain_in(from..=to_inclusive, |_, _| false)
                .map_err(write_err)?;
        }
        tx.commit().map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Some(*x),
            Bound::Excluded(0) => return Ok(Vec::new()),
            Bound::Excluded(x) => Some(x - 1),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|end| end < start) {
            return Ok(Vec::new());
        }
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(LOG).map_err(read_err)?;
        let iter = match end {
            Some(end) => table.range(start..=end),
            None => table.range(start..),
        }
        .map_err(read_err)?;
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item.map_err(read_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = get_meta(&self.db, PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        put_meta(&self.db, VOTE, vote)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        get_meta(&self.db, VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        put_meta(&self.db, COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(get_meta::<Option<LogId<NodeId>>>(&self.db, COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = tx.open_table(LOG).map_err(write_err)?;
            for entry in entries {
                let bytes = serde_json::to_vec(&entry).map_err(write_err)?;
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(write_err)?;
            }
        }
        // The commit is durable when it returns: only then is the append reported done.
        let committed = tx.commit();
        let result = committed
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(result);
        committed.map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.delete_range(log_id.index, u64::MAX)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // The purge mark first: a crash between the two leaves entries the mark says are
        // gone, which openraft tolerates; the other order could lose the mark.
        put_meta(&self.db, PURGED, &log_id)?;
        self.delete_range(0, log_id.index)
    }
}

/// The cluster map as of a log position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMap {
    /// Index of the last log entry applied (0 before any).
    pub index: u64,
    /// The map.
    pub map: ClusterMap,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MachineState {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    map: ClusterMap,
}

/// Applies the log to the cluster map.
#[derive(Debug, Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    state: MachineState,
    published: watch::Sender<AppliedMap>,
    snapshots_built: u64,
}

impl StateMachine {
    async fn new(db: Arc<Database>) -> StorageResult<(Self, watch::Receiver<AppliedMap>)> {
        let (published, rx) = watch::channel(AppliedMap::default());
        let mut sm = Self {
            db,
            state: MachineState::default(),
            published,
            snapshots_built: 0,
        };
        if let Some(snap) = get_meta::<StoredSnapshot>(&sm.db, SNAPSHOT)? {
            sm.load(&snap)?;
        }
        Ok((sm, rx))
    }

    fn load(&mut self, snap: &StoredSnapshot) -> StorageResult<()> {
        let map: ClusterMap = serde_json::from_slice(&snap.data)
            .map_err(|e| StorageIOError::read_snapshot(Some(snap.meta.signature()), &e))?;
        self.state = MachineState {
            last_applied: snap.meta.last_log_id,
            membership: snap.meta.last_membership.clone(),
            map,
        };
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        let applied = AppliedMap {
            index: self.state.last_applied.map(|l| l.index).unwrap_or(0),
            map: self.state.map.clone(),
        };
        self.published.send_replace(applied);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = serde_json::to_vec(&self.state.map)
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match self.state.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.snapshots_built),
            None => format!("--{}", self.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: self.state.last_applied,
            last_membership: self.state.membership.clone(),
            snapshot_id,
        };
        put_meta(
            &self.db,
            SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            },
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, openraft::BasicNode>,
    )> {
        Ok((self.state.last_applied, self.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Answer>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut answers = Vec::new();
        for entry in entries {
            self.state.last_applied = Some(entry.log_id);
            answers.push(match entry.payload {
                EntryPayload::Blank => Answer(Ok(())),
                EntryPayload::Normal(command) => Answer(self.state.map.apply(&command)),
                EntryPayload::Membership(m) => {
                    self.state.membership = StoredMembership::new(Some(entry.log_id), m);
                    Answer(Ok(()))
                }
            });
        }
        self.publish();
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots_built += 1;
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        self.load(&snap)?;
        put_meta(&self.db, SNAPSHOT, &snap)
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(
            get_meta::<StoredSnapshot>(&self.db, SNAPSHOT)?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};
    use tempfile::TempDir;

    use super::*;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
        async fn build(&self) -> StorageResult<(TempDir, LogStore, StateMachine)> {
            let dir = TempDir::new().expect("temp dir");
            let (log, sm, _) = open(dir.path()).await.expect("open");
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage test suite: log, vote, purge, truncate, snapshots, apply.
    #[test]
    fn passes_openraft_s_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }
}
