//! The embedded state store: one redb file, so `journeyx run` needs no database server.
//! Records are JSON; a user's record sits under `app \0 user` with its version.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{CountKey, Saved, StateStore, Versioned, check_publish};
use crate::catalog::Catalog;
use crate::engine::{Count, User};
use crate::model::{Journey, Segment};
use crate::{Error, Result};

/// `app \0 user` → version (8 bytes, big-endian) + JSON record.
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// `app \0 journey \0 version (10 digits)` → JSON journey.
const JOURNEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("journeys");
/// `app \0 segment` → JSON segment.
const SEGMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("segments");
/// journey id → last user the loader emitted.
const LOADER: TableDefinition<&str, &str> = TableDefinition::new("loader");
/// Journey counters: `journey \0 version (8 bytes, big-endian) \0 node \0 what` → count.
const COUNTS: TableDefinition<&[u8], u64> = TableDefinition::new("counts");

fn count_key((journey, version, node, what): &CountKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(journey.len() + node.len() + 24);
    k.extend_from_slice(journey.as_bytes());
    k.push(0);
    k.extend_from_slice(&u64::from(*version).to_be_bytes());
    k.push(0);
    k.extend_from_slice(node.as_bytes());
    k.push(0);
    k.extend_from_slice(what.as_str().as_bytes());
    k
}

fn parse_count_key(k: &[u8]) -> Result<CountKey> {
    let bad = || failed("decoding a counter", String::from_utf8_lossy(k));
    let j = k.iter().position(|b| *b == 0).ok_or_else(bad)?;
    let journey = std::str::from_utf8(&k[..j]).map_err(|_| bad())?.to_owned();
    let rest = k.get(j + 1..).ok_or_else(bad)?;
    let version = u64::from_be_bytes(rest.get(..8).ok_or_else(bad)?.try_into().expect("8"));
    let rest = rest.get(9..).ok_or_else(bad)?;
    let n = rest.iter().position(|b| *b == 0).ok_or_else(bad)?;
    let node = std::str::from_utf8(&rest[..n])
        .map_err(|_| bad())?
        .to_owned();
    let what = std::str::from_utf8(&rest[n + 1..])
        .ok()
        .and_then(Count::parse)
        .ok_or_else(bad)?;
    Ok((journey, version as u32, node, what))
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Publishing reads the catalog and then writes: one at a time.
    publish: tokio::sync::Mutex<()>,
    /// User saves, to the writer thread (group commit).
    saves: Option<std::sync::mpsc::Sender<Save>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    /// Lets the writer finish what it was given, so the file is closed when this returns
    /// (the store can be opened again at once).
    fn drop(&mut self) {
        self.saves.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// One conditional save for the writer thread.
struct Save {
    key: String,
    expected: u64,
    /// The stored value: 8 bytes left for the version the writer gives it, then the JSON.
    value: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Result<Saved>>,
}

/// Saves waiting when the writer starts a commit go into it together: one durable commit
/// (one fsync) for all of them, so saves from many queues cost far less than one commit
/// each. A user's saves are in order anyway (one queue per user).
fn writer(db: Arc<Database>, saves: std::sync::mpsc::Receiver<Save>) {
    while let Ok(first) = saves.recv() {
        let mut group = vec![first];
        while group.len() < 4_096
            && let Ok(more) = saves.try_recv()
        {
            group.push(more);
        }
        match apply(&db, &mut group) {
            Ok(outcomes) => {
                for (s, o) in group.into_iter().zip(outcomes) {
                    let _ = s.reply.send(Ok(o));
                }
            }
            Err(e) => {
                for s in group {
                    let _ = s.reply.send(Err(failed("commit", &e)));
                }
            }
        }
    }
}

/// Applies `group` in one write transaction: each save only if its record is still at
/// its expected version (a conflict leaves that record alone and the others go on).
fn apply(db: &Database, group: &mut [Save]) -> Result<Vec<Saved>> {
    let txn = db.begin_write().map_err(|e| failed("write", e))?;
    let mut out = Vec::with_capacity(group.len());
    {
        let mut t = txn.open_table(USERS).map_err(|e| failed("write", e))?;
        for s in group.iter_mut() {
            // Only the version is compared: the record behind it is not decoded.
            let current = match t.get(s.key.as_str()).map_err(|e| failed("read", e))? {
                None => 0,
                Some(v) => stored_version(v.value())?,
            };
            if current != s.expected {
                out.push(Saved::Conflict);
                continue;
            }
            s.value[..8].copy_from_slice(&(s.expected + 1).to_be_bytes());
            t.insert(s.key.as_str(), s.value.as_slice())
                .map_err(|e| failed("write", e))?;
            out.push(Saved::Written(s.expected + 1));
        }
    }
    txn.commit().map_err(|e| failed("commit", e))?;
    Ok(out)
}

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("embedded store, {what}: {e}"))
}

fn user_key(app: &str, user: &str) -> String {
    format!("{app}\0{user}")
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `dir/journeyx.redb`.
    pub async fn open(dir: &Path) -> Result<EmbeddedStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed(&format!("creating {}", dir.display()), e))?;
        let path = dir.join("journeyx.redb");
        let db = tokio::task::spawn_blocking(move || -> Result<Database> {
            let db = Database::create(&path)
                .map_err(|e| failed(&format!("opening {}", path.display()), e))?;
            let txn = db.begin_write().map_err(|e| failed("creating tables", e))?;
            txn.open_table(USERS)
                .map_err(|e| failed("creating tables", e))?;
            txn.open_table(JOURNEYS)
                .map_err(|e| failed("creating tables", e))?;
            txn.open_table(SEGMENTS)
                .map_err(|e| failed("creating tables", e))?;
            txn.open_table(LOADER)
                .map_err(|e| failed("creating tables", e))?;
            txn.commit().map_err(|e| failed("creating tables", e))?;
            Ok(db)
        })
        .await
        .map_err(|e| failed("opening", e))??;
        let db = Arc::new(db);
        let (saves, rx) = std::sync::mpsc::channel();
        let for_writer = db.clone();
        let writer = std::thread::Builder::new()
            .name("journeyx-store-writer".into())
            .spawn(move || writer(for_writer, rx))
            .map_err(|e| failed("starting the writer", e))?;
        Ok(EmbeddedStore {
            db,
            publish: tokio::sync::Mutex::new(()),
            saves: Some(saves),
            writer: Some(writer),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| failed("task", e))?
    }

    async fn put(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: String,
        value: Vec<u8>,
    ) -> Result<()> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(|e| failed("write", e))?;
            txn.open_table(table)
                .and_then(|mut t| {
                    t.insert(key.as_str(), value.as_slice())
                        .map(|_| ())
                        .map_err(Into::into)
                })
                .map_err(|e| failed("write", e))?;
            txn.commit().map_err(|e| failed("commit", e))
        })
        .await
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    /// Read on the calling task, not handed to the blocking pool: a read is one short
    /// lookup, mostly in redb's page cache (its locks are not held across the writer's
    /// flushes), and the hand-off to a pool thread and back cost more than the read itself
    /// (`spawn_blocking` alone was a tenth of journeyx's CPU at 10,000 events/s, the pool
    /// threads' wake-ups as much again; docs/benchmarks.md, section 20).
    async fn load_user(&self, app: &str, user: &str) -> Result<Versioned> {
        let txn = self.db.begin_read().map_err(|e| failed("read", e))?;
        let t = txn.open_table(USERS).map_err(|e| failed("read", e))?;
        match t
            .get(user_key(app, user).as_str())
            .map_err(|e| failed("read", e))?
        {
            None => Ok(Versioned::default()),
            Some(v) => decode_user(v.value()),
        }
    }

    async fn save_user(
        &self,
        app: &str,
        user: &str,
        expected: u64,
        record: &User,
    ) -> Result<Saved> {
        let mut value = Vec::with_capacity(256);
        value.extend_from_slice(&[0; 8]);
        serde_json::to_writer(&mut value, record).map_err(|e| failed("encoding a user", e))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.saves
            .as_ref()
            .expect("open until dropped")
            .send(Save {
                key: user_key(app, user),
                expected,
                value,
                reply,
            })
            .map_err(|_| failed("save", "the writer stopped"))?;
        answer
            .await
            .map_err(|_| failed("save", "the writer stopped"))?
    }

    async fn publish_journey(&self, journey: &Journey) -> Result<bool> {
        let _one = self.publish.lock().await;
        if !check_publish(self, journey).await? {
            return Ok(false);
        }
        let key = format!(
            "{}\0{}\0{:010}",
            journey.app_id, journey.id, journey.version
        );
        let json = serde_json::to_vec(journey).map_err(|e| failed("encoding a journey", e))?;
        self.put(JOURNEYS, key, json).await?;
        Ok(true)
    }

    async fn publish_segment(&self, segment: &Segment) -> Result<bool> {
        let _one = self.publish.lock().await;
        let catalog = self.catalog().await?;
        if catalog.segment(&segment.app_id, &segment.id) == Some(segment) {
            return Ok(false);
        }
        let key = format!("{}\0{}", segment.app_id, segment.id);
        let json = serde_json::to_vec(segment).map_err(|e| failed("encoding a segment", e))?;
        self.put(SEGMENTS, key, json).await?;
        Ok(true)
    }

    async fn catalog(&self) -> Result<Catalog> {
        let (segments, journeys) = self
            .blocking(|db| {
                let txn = db.begin_read().map_err(|e| failed("read", e))?;
                let all = |table: TableDefinition<&str, &[u8]>| -> Result<Vec<Vec<u8>>> {
                    let t = txn.open_table(table).map_err(|e| failed("read", e))?;
                    t.iter()
                        .map_err(|e| failed("read", e))?
                        .map(|r| {
                            r.map(|(_, v)| v.value().to_vec())
                                .map_err(|e| failed("read", e))
                        })
                        .collect()
                };
                Ok((all(SEGMENTS)?, all(JOURNEYS)?))
            })
            .await?;
        let segments = segments
            .iter()
            .map(|s| serde_json::from_slice(s).map_err(|e| failed("decoding a segment", e)))
            .collect::<Result<_>>()?;
        let journeys = journeys
            .iter()
            .map(|j| serde_json::from_slice(j).map_err(|e| failed("decoding a journey", e)))
            .collect::<Result<_>>()?;
        Catalog::from_stored(segments, journeys)
    }

    async fn users(
        &self,
        app: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, User)>> {
        let from = user_key(app, after.unwrap_or(""));
        let end = format!("{app}\u{1}");
        let skip = after.map(|a| user_key(app, a));
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(|e| failed("read", e))?;
            let t = txn.open_table(USERS).map_err(|e| failed("read", e))?;
            let mut out = Vec::new();
            for r in t
                .range(from.as_str()..end.as_str())
                .map_err(|e| failed("read", e))?
            {
                let (k, v) = r.map_err(|e| failed("read", e))?;
                if Some(k.value()) == skip.as_deref() {
                    continue;
                }
                if out.len() == limit {
                    break;
                }
                let id = k
                    .value()
                    .split_once('\0')
                    .map(|(_, u)| u.to_owned())
                    .unwrap_or_default();
                out.push((id, decode_user(v.value())?.user));
            }
            Ok(out)
        })
        .await
    }

    async fn add_counts(&self, deltas: &[(CountKey, u64)]) -> Result<()> {
        let deltas: Vec<(Vec<u8>, u64)> = deltas.iter().map(|(k, n)| (count_key(k), *n)).collect();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(|e| failed("write", e))?;
            {
                let mut t = txn.open_table(COUNTS).map_err(|e| failed("write", e))?;
                for (k, n) in &deltas {
                    let now = t
                        .get(k.as_slice())
                        .map_err(|e| failed("read", e))?
                        .map_or(0, |v| v.value());
                    t.insert(k.as_slice(), now + n)
                        .map_err(|e| failed("write", e))?;
                }
            }
            txn.commit().map_err(|e| failed("commit", e))
        })
        .await
    }

    async fn counts(&self, journey: &str) -> Result<Vec<(CountKey, u64)>> {
        let mut from = journey.as_bytes().to_vec();
        from.push(0);
        let mut to = journey.as_bytes().to_vec();
        to.push(1);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(|e| failed("read", e))?;
            let t = match txn.open_table(COUNTS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(failed("read", e)),
            };
            let mut out = Vec::new();
            for r in t
                .range(from.as_slice()..to.as_slice())
                .map_err(|e| failed("read", e))?
            {
                let (k, v) = r.map_err(|e| failed("read", e))?;
                out.push((parse_count_key(k.value())?, v.value()));
            }
            Ok(out)
        })
        .await
    }

    async fn loader_position(&self, journey: &str) -> Result<Option<String>> {
        let key = journey.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(|e| failed("read", e))?;
            let t = txn.open_table(LOADER).map_err(|e| failed("read", e))?;
            Ok(t.get(key.as_str())
                .map_err(|e| failed("read", e))?
                .map(|v| v.value().to_owned()))
        })
        .await
    }

    async fn set_loader_position(&self, journey: &str, user: &str) -> Result<()> {
        let (key, user) = (journey.to_owned(), user.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(|e| failed("write", e))?;
            txn.open_table(LOADER)
                .map_err(|e| failed("write", e))?
                .insert(key.as_str(), user.as_str())
                .map_err(|e| failed("write", e))?;
            txn.commit().map_err(|e| failed("commit", e))
        })
        .await
    }
}

/// The version a stored user record carries (its first 8 bytes).
fn stored_version(raw: &[u8]) -> Result<u64> {
    raw.first_chunk::<8>()
        .map(|v| u64::from_be_bytes(*v))
        .ok_or_else(|| failed("decoding a user", "record shorter than its version"))
}

fn decode_user(raw: &[u8]) -> Result<Versioned> {
    let version = stored_version(raw)?;
    let user = serde_json::from_slice(&raw[8..]).map_err(|e| failed("decoding a user", e))?;
    Ok(Versioned { user, version })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    async fn fresh() -> Arc<dyn StateStore> {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.keep()).await.unwrap();
        Arc::new(store)
    }

    crate::state_store_suite!(fresh().await);

    #[tokio::test]
    async fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = User::default();
        u.tags.insert("vip".into());
        {
            let s = EmbeddedStore::open(dir.path()).await.unwrap();
            s.save_user("demo", "u1", 0, &u).await.unwrap();
        }
        let s = EmbeddedStore::open(dir.path()).await.unwrap();
        let read = s.load_user("demo", "u1").await.unwrap();
        assert_eq!((read.version, read.user), (1, u));
    }
}
