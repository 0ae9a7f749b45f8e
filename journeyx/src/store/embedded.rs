//! The embedded state store: one fjall database (an LSM: a journal, memtables and sorted
//! files) in `dir/journeyx.fjall`, so `journeyx run` needs no database server. Records are
//! JSON; a user's record sits under `app \0 user` with its version.
//!
//! fjall rather than a B-tree (redb, before): a save of a random user among 1,000,000
//! dirtied its own 4 KiB B-tree page, so each group commit wrote ~330 pages and capped
//! journeyx near 10,000 events/s (docs/benchmarks.md, section 20). Here a save is ~270
//! bytes appended to the journal, and a group is one append and one `fdatasync`.
//! A directory still holding the old `journeyx.redb` is copied over once at open
//! (module `from_redb`).

mod from_redb;

use std::collections::HashMap;
use std::path::Path;

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{CountKey, Saved, StateStore, Versioned, check_publish};
use crate::catalog::Catalog;
use crate::engine::{Count, User};
use crate::model::{Journey, Segment};
use crate::{Error, Result};

/// The fjall database's folder inside the store's directory.
const FJALL_DIR: &str = "journeyx.fjall";

/// The keyspaces (fjall's tables). Each keeps what the redb table of the same name kept:
/// - `users`: `app \0 user` → version (8 bytes, big-endian) + JSON record;
/// - `journeys`: `app \0 journey \0 version (10 digits)` → JSON journey;
/// - `segments`: `app \0 segment` → JSON segment;
/// - `loader`: journey id → last user the loader emitted (UTF-8);
/// - `counts`: `journey \0 version (8 bytes, big-endian) \0 node \0 what` → count
///   (8 bytes, big-endian);
/// - `meta`: the store's own marks (that the old redb file was copied in).
#[derive(Clone)]
struct Keyspaces {
    users: Keyspace,
    journeys: Keyspace,
    segments: Keyspace,
    loader: Keyspace,
    counts: Keyspace,
    meta: Keyspace,
}

impl Keyspaces {
    fn open(db: &Database) -> Result<Keyspaces> {
        let open = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| failed(&format!("opening keyspace {name}"), e))
        };
        Ok(Keyspaces {
            users: open("users")?,
            journeys: open("journeys")?,
            segments: open("segments")?,
            loader: open("loader")?,
            counts: open("counts")?,
            meta: open("meta")?,
        })
    }
}

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

fn parse_count(v: &[u8]) -> Result<u64> {
    v.first_chunk::<8>()
        .map(|n| u64::from_be_bytes(*n))
        .ok_or_else(|| failed("decoding a counter", "value shorter than 8 bytes"))
}

pub struct EmbeddedStore {
    db: Database,
    ks: Keyspaces,
    /// Publishing reads the catalog and then writes: one at a time.
    publish: tokio::sync::Mutex<()>,
    /// Adding counts reads each counter and writes the sum (fjall has no read-write
    /// transaction outside its transactional databases): one at a time.
    counting: tokio::sync::Mutex<()>,
    /// User saves, to the writer thread (group commit).
    saves: Option<std::sync::mpsc::Sender<Save>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    /// Lets the writer finish what it was given, so the database is closed when the
    /// fields drop after this (the store can be opened again at once).
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

/// Saves waiting when the writer starts a commit go into it together: one journal append
/// and one `fdatasync` for all of them, so saves from many queues cost far less than one
/// commit each. A user's saves are in order anyway (one queue per user). The single
/// writer is also what makes the version check safe: no other thread writes `users`.
fn writer(db: Database, users: Keyspace, saves: std::sync::mpsc::Receiver<Save>) {
    while let Ok(first) = saves.recv() {
        let mut group = vec![first];
        while group.len() < 4_096
            && let Ok(more) = saves.try_recv()
        {
            group.push(more);
        }
        match apply(&db, &users, &mut group) {
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

/// Applies `group` in one atomic batch: each save only if its record is still at its
/// expected version (a conflict leaves that record alone and the others go on).
///
/// The batch is committed with `PersistMode::SyncData`: fjall appends it to the journal,
/// `fdatasync`s it, and only then puts it in the memtable where readers see it. So a
/// record is durable before anyone can read it (as with redb's durable commit), and
/// before any save of the group is answered.
fn apply(db: &Database, users: &Keyspace, group: &mut [Save]) -> Result<Vec<Saved>> {
    let mut out = Vec::with_capacity(group.len());
    // A batch cannot be read back before it is committed: the versions this group has
    // already written stand in for the stored ones, and `last` keeps only a key's last
    // write (two writes of one key in one batch would carry the same sequence number).
    let mut written: HashMap<&str, u64> = HashMap::new();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, s) in group.iter().enumerate() {
        let current = match written.get(s.key.as_str()) {
            Some(v) => *v,
            // Only the version is compared: the record behind it is not decoded.
            None => match users.get(&s.key).map_err(|e| failed("read", e))? {
                None => 0,
                Some(v) => stored_version(&v)?,
            },
        };
        if current != s.expected {
            out.push(Saved::Conflict);
            continue;
        }
        written.insert(&s.key, s.expected + 1);
        last.insert(&s.key, i);
        out.push(Saved::Written(s.expected + 1));
    }
    let mut chosen: Vec<usize> = last.into_values().collect();
    if chosen.is_empty() {
        return Ok(out);
    }
    chosen.sort_unstable();
    let mut batch = db.batch().durability(Some(PersistMode::SyncData));
    for i in chosen {
        let s = &mut group[i];
        s.value[..8].copy_from_slice(&(s.expected + 1).to_be_bytes());
        batch.insert(users, s.key.as_str(), std::mem::take(&mut s.value));
    }
    batch.commit().map_err(|e| failed("commit", e))?;
    Ok(out)
}

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("embedded store, {what}: {e}"))
}

fn user_key(app: &str, user: &str) -> String {
    format!("{app}\0{user}")
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `dir/journeyx.fjall`, first copying in the data of
    /// an older store's `dir/journeyx.redb` if there is one.
    pub async fn open(dir: &Path) -> Result<EmbeddedStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed(&format!("creating {}", dir.display()), e))?;
        let dir = dir.to_owned();
        let (db, ks) = tokio::task::spawn_blocking(move || -> Result<(Database, Keyspaces)> {
            let path = dir.join(FJALL_DIR);
            // fjall's defaults: a 32 MiB block cache, a 64 MiB memtable per keyspace,
            // at most 512 MiB of journals, min(cores, 4) flush and compaction threads.
            let db = Database::builder(&path)
                .open()
                .map_err(|e| failed(&format!("opening {}", path.display()), e))?;
            let ks = Keyspaces::open(&db)?;
            from_redb::migrate(&dir, &db, &ks)?;
            Ok((db, ks))
        })
        .await
        .map_err(|e| failed("opening", e))??;
        let (saves, rx) = std::sync::mpsc::channel();
        let (for_writer, users) = (db.clone(), ks.users.clone());
        let writer = std::thread::Builder::new()
            .name("journeyx-store-writer".into())
            .spawn(move || writer(for_writer, users, rx))
            .map_err(|e| failed("starting the writer", e))?;
        Ok(EmbeddedStore {
            db,
            ks,
            publish: tokio::sync::Mutex::new(()),
            counting: tokio::sync::Mutex::new(()),
            saves: Some(saves),
            writer: Some(writer),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database, &Keyspaces) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (db, ks) = (self.db.clone(), self.ks.clone());
        tokio::task::spawn_blocking(move || f(&db, &ks))
            .await
            .map_err(|e| failed("task", e))?
    }

    /// Writes `key` → `value` into the keyspace `pick` chooses, durably before returning.
    async fn put(
        &self,
        pick: fn(&Keyspaces) -> &Keyspace,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<()> {
        self.blocking(move |db, ks| {
            let mut batch = db.batch().durability(Some(PersistMode::SyncData));
            batch.insert(pick(ks), key, value);
            batch.commit().map_err(|e| failed("commit", e))
        })
        .await
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    /// Read on the calling task, not handed to the blocking pool: a read is one short
    /// lookup, in the memtable or in a block mostly cached (by fjall or the OS), and no
    /// lock it takes is held across the writer's `fdatasync` (that holds the journal's
    /// lock, which only writes take). The hand-off to a pool thread and back cost more than
    /// the read itself (`spawn_blocking` alone was a tenth of journeyx's CPU at 10,000
    /// events/s, the pool threads' wake-ups as much again; docs/benchmarks.md, section 20).
    async fn load_user(&self, app: &str, user: &str) -> Result<Versioned> {
        match self
            .ks
            .users
            .get(user_key(app, user))
            .map_err(|e| failed("read", e))?
        {
            None => Ok(Versioned::default()),
            Some(v) => decode_user(&v),
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
        self.put(|ks| &ks.journeys, key.into_bytes(), json).await?;
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
        self.put(|ks| &ks.segments, key.into_bytes(), json).await?;
        Ok(true)
    }

    async fn catalog(&self) -> Result<Catalog> {
        let (segments, journeys) = self
            .blocking(|_, ks| {
                let all = |k: &Keyspace| -> Result<Vec<fjall::Slice>> {
                    k.iter()
                        .map(|g| g.value().map_err(|e| failed("read", e)))
                        .collect()
                };
                Ok((all(&ks.segments)?, all(&ks.journeys)?))
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
        self.blocking(move |_, ks| {
            let mut out = Vec::new();
            for g in ks.users.range(from.as_bytes()..end.as_bytes()) {
                let (k, v) = g.into_inner().map_err(|e| failed("read", e))?;
                if Some(&*k) == skip.as_deref().map(str::as_bytes) {
                    continue;
                }
                if out.len() == limit {
                    break;
                }
                let id = k
                    .iter()
                    .position(|b| *b == 0)
                    .map(|z| String::from_utf8_lossy(&k[z + 1..]).into_owned())
                    .unwrap_or_default();
                out.push((id, decode_user(&v)?.user));
            }
            Ok(out)
        })
        .await
    }

    async fn count_users(&self, app: &str, after: Option<&str>) -> Result<u64> {
        let from = user_key(app, after.unwrap_or(""));
        let end = format!("{app}\u{1}");
        let skip = after.is_some();
        self.blocking(move |_, ks| {
            let mut n = 0u64;
            for g in ks.users.range(from.as_bytes()..end.as_bytes()) {
                let key = g.key().map_err(|e| failed("read", e))?;
                // The range starts at `after` itself when it is a user: not counted.
                if !(skip && *key == *from.as_bytes()) {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    async fn add_counts(&self, deltas: &[(CountKey, u64)]) -> Result<()> {
        let deltas: Vec<(Vec<u8>, u64)> = deltas.iter().map(|(k, n)| (count_key(k), *n)).collect();
        let _one = self.counting.lock().await;
        self.blocking(move |db, ks| {
            // The same counter twice in one call adds up before the batch is written.
            let mut sums: HashMap<Vec<u8>, u64> = HashMap::new();
            for (k, n) in deltas {
                let now = match sums.get(&k) {
                    Some(now) => *now,
                    None => match ks.counts.get(&k).map_err(|e| failed("read", e))? {
                        None => 0,
                        Some(v) => parse_count(&v)?,
                    },
                };
                sums.insert(k, now + n);
            }
            let mut batch = db.batch().durability(Some(PersistMode::SyncData));
            for (k, n) in sums {
                batch.insert(&ks.counts, k, n.to_be_bytes());
            }
            batch.commit().map_err(|e| failed("commit", e))
        })
        .await
    }

    async fn counts(&self, journey: &str) -> Result<Vec<(CountKey, u64)>> {
        let mut from = journey.as_bytes().to_vec();
        from.push(0);
        let mut to = journey.as_bytes().to_vec();
        to.push(1);
        self.blocking(move |_, ks| {
            let mut out = Vec::new();
            for g in ks.counts.range(from..to) {
                let (k, v) = g.into_inner().map_err(|e| failed("read", e))?;
                out.push((parse_count_key(&k)?, parse_count(&v)?));
            }
            Ok(out)
        })
        .await
    }

    async fn loader_position(&self, journey: &str) -> Result<Option<String>> {
        let key = journey.to_owned();
        self.blocking(move |_, ks| {
            ks.loader
                .get(key)
                .map_err(|e| failed("read", e))?
                .map(|v| {
                    String::from_utf8(v.to_vec())
                        .map_err(|e| failed("decoding a loader position", e))
                })
                .transpose()
        })
        .await
    }

    async fn set_loader_position(&self, journey: &str, user: &str) -> Result<()> {
        self.put(
            |ks| &ks.loader,
            journey.as_bytes().to_vec(),
            user.as_bytes().to_vec(),
        )
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

    /// Run as a child process by `a_returned_save_survives_kill_9`: saves users from 64
    /// tasks until killed, printing each user once its `save_user` has returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn child_saves_until_killed() {
        use std::io::Write;
        let Ok(dir) = std::env::var("JOURNEYX_KILL9_DIR") else {
            return;
        };
        let s = Arc::new(EmbeddedStore::open(Path::new(&dir)).await.unwrap());
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let s = s.clone();
                tokio::spawn(async move {
                    for i in 0.. {
                        let id = format!("u{t}-{i}");
                        let saved = s.save_user("demo", &id, 0, &User::default()).await;
                        assert_eq!(saved.unwrap(), Saved::Written(1));
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "saved {id}").unwrap();
                        out.flush().unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// kill -9 right after saves returned: every one of them is there after a reopen.
    #[test]
    fn a_returned_save_survives_kill_9() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::embedded::tests::child_saves_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("JOURNEYX_KILL9_DIR", dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut saved = Vec::new();
        while saved.len() < 3_000 {
            let line = lines.next().expect("the child stopped").unwrap();
            if let Some(id) = line.strip_prefix("saved ") {
                saved.push(id.to_owned());
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // What the child printed before it died was saved too.
        saved.extend(
            lines
                .map_while(|l| l.ok())
                .filter_map(|l| l.strip_prefix("saved ").map(str::to_owned)),
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let s = EmbeddedStore::open(dir.path()).await.unwrap();
            for id in &saved {
                let read = s.load_user("demo", id).await.unwrap();
                assert_eq!(read.version, 1, "{id} was saved before the kill");
            }
        });
    }

    /// Saves of one user in one group: each sees the version the one before it wrote,
    /// and the record read afterwards is the last one written.
    #[test]
    fn a_group_sees_its_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::builder(dir.path().join(FJALL_DIR))
            .open()
            .unwrap();
        let ks = Keyspaces::open(&db).unwrap();
        let save = |expected: u64, plan: &str| {
            let mut value = vec![0; 8];
            value.extend_from_slice(plan.as_bytes());
            Save {
                key: "demo\0u".into(),
                expected,
                value,
                reply: tokio::sync::oneshot::channel().0,
            }
        };
        let mut group = vec![save(0, "a"), save(0, "b"), save(1, "c"), save(1, "d")];
        let out = apply(&db, &ks.users, &mut group).unwrap();
        assert_eq!(
            out,
            [
                Saved::Written(1),
                Saved::Conflict,
                Saved::Written(2),
                Saved::Conflict
            ]
        );
        let stored = ks.users.get("demo\0u").unwrap().unwrap();
        assert_eq!(
            (stored_version(&stored).unwrap(), &stored[8..]),
            (2, &b"c"[..])
        );
    }
}
