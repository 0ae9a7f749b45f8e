//! Moving an older store into fjall: before fjall, the embedded store was one redb file,
//! `dir/journeyx.redb`. At open, its tables are copied into the fjall keyspaces of the same
//! names, durably, and the file is renamed `journeyx.redb.migrated`, so it is copied once
//! and kept for an operator who wants to go back.
//!
//! The order makes a crash at any point safe: rows are copied with their stored values
//! (versions and counts as they are, never added to), so a copy cut short is simply done
//! again; a mark in `meta`, written durably after the last row, tells a later open that
//! only the rename is left; the rename is synced before the store takes a write, so the
//! old file cannot come back after new records were written and be copied over them.

use std::path::Path;

use fjall::{Database, Keyspace, OwnedWriteBatch, PersistMode, Slice};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{Keyspaces, failed};
use crate::Result;

/// `app \0 user` → version (8 bytes, big-endian) + JSON record.
pub(super) const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// `app \0 journey \0 version (10 digits)` → JSON journey.
pub(super) const JOURNEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("journeys");
/// `app \0 segment` → JSON segment.
pub(super) const SEGMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("segments");
/// journey id → last user the loader emitted.
pub(super) const LOADER: TableDefinition<&str, &str> = TableDefinition::new("loader");
/// Journey counters: `journey \0 version (8 bytes, big-endian) \0 node \0 what` → count.
pub(super) const COUNTS: TableDefinition<&[u8], u64> = TableDefinition::new("counts");

const REDB_FILE: &str = "journeyx.redb";
const MIGRATED_FILE: &str = "journeyx.redb.migrated";
/// In `meta`: every row of `journeyx.redb` is in fjall, durably.
const COPIED: &str = "copied journeyx.redb";
/// Rows per batch while copying: a batch is held in memory whole until it is committed.
const CHUNK: usize = 10_000;

/// Copies `dir/journeyx.redb` into `db` if it is there, then renames it.
pub(super) fn migrate(dir: &Path, db: &Database, ks: &Keyspaces) -> Result<()> {
    let old = dir.join(REDB_FILE);
    if !exists(&old)? {
        return Ok(());
    }
    let done = dir.join(MIGRATED_FILE);
    if exists(&done)? {
        // A second redb file after a migration: written by an older journeyx started on
        // this directory since. Copying it would put its records over newer ones.
        return Err(failed(
            &format!("opening {}", old.display()),
            format!(
                "{} is there too: this store was moved to {} before, and {REDB_FILE} was \
                 written after that (by an older journeyx?); move one of them away",
                done.display(),
                dir.join(super::FJALL_DIR).display()
            ),
        ));
    }
    if ks
        .meta
        .get(COPIED)
        .map_err(|e| failed("read", e))?
        .is_none()
    {
        let rows = copy(&old, db, ks)?;
        let mut mark = db.batch().durability(Some(PersistMode::SyncAll));
        mark.insert(&ks.meta, COPIED, rows.to_be_bytes());
        mark.commit()
            .map_err(|e| failed("marking the redb copy done", e))?;
        tracing::info!(rows, from = %old.display(), "journeyx: embedded store moved to fjall");
    }
    std::fs::rename(&old, &done).map_err(|e| {
        failed(
            &format!("renaming {} to {}", old.display(), done.display()),
            e,
        )
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| failed(&format!("syncing {}", dir.display()), e))
}

fn exists(path: &Path) -> Result<bool> {
    path.try_exists()
        .map_err(|e| failed(&format!("looking for {}", path.display()), e))
}

/// Every row of every table of the redb file at `path`, into the keyspace of the same
/// name; the number of rows.
fn copy(path: &Path, db: &Database, ks: &Keyspaces) -> Result<u64> {
    let what = format!("reading {}", path.display());
    // A read from start to end needs no page cache: redb's default (1 GiB) would only
    // grow the process by the file's size while the copy runs.
    let old = redb::Builder::new()
        .set_cache_size(16 << 20)
        .open(path)
        .map_err(|e| failed(&what, e))?;
    let txn = old.begin_read().map_err(|e| failed(&what, e))?;
    let mut out = Copier {
        db,
        batch: db.batch(),
        rows: 0,
    };
    macro_rules! each_row {
        ($table:expr, |$k:ident, $v:ident| $into:expr, $key:expr, $value:expr) => {
            match txn.open_table($table) {
                // Tables were created as first written (`counts`): a missing one is empty.
                Err(TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(failed(&what, e)),
                Ok(t) => {
                    for row in t.iter().map_err(|e| failed(&what, e))? {
                        let ($k, $v) = row.map_err(|e| failed(&what, e))?;
                        out.add($into, $key, $value)?;
                    }
                }
            }
        };
    }
    each_row!(USERS, |k, v| &ks.users, k.value(), v.value());
    each_row!(JOURNEYS, |k, v| &ks.journeys, k.value(), v.value());
    each_row!(SEGMENTS, |k, v| &ks.segments, k.value(), v.value());
    each_row!(LOADER, |k, v| &ks.loader, k.value(), v.value());
    each_row!(
        COUNTS,
        |k, v| &ks.counts,
        k.value(),
        v.value().to_be_bytes()
    );
    out.finish()
}

/// Writes rows in batches of [`CHUNK`], flushed to the OS only: the mark written after
/// the last one syncs them all.
struct Copier<'a> {
    db: &'a Database,
    batch: OwnedWriteBatch,
    rows: u64,
}

impl Copier<'_> {
    fn add(&mut self, into: &Keyspace, k: impl Into<Slice>, v: impl Into<Slice>) -> Result<()> {
        self.batch.insert(into, k, v);
        self.rows += 1;
        if self.batch.len() >= CHUNK {
            self.commit()?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        std::mem::replace(&mut self.batch, self.db.batch())
            .commit()
            .map_err(|e| failed("copying the redb store", e))
    }

    fn finish(mut self) -> Result<u64> {
        self.commit()?;
        Ok(self.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Count, User};
    use crate::model::{Journey, Segment};
    use crate::store::embedded::{EmbeddedStore, count_key};
    use crate::store::{Saved, StateStore};

    fn user(plan: &str) -> User {
        let mut u = User::default();
        u.properties.insert("plan".into(), plan.into());
        u
    }

    /// Writes a store as the redb implementation did: each table, its keys and values.
    fn old_store(dir: &Path, j: &Journey, s: &Segment) {
        let db = redb::Database::create(dir.join(REDB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(USERS).unwrap();
            for (id, version, plan) in [("u1", 3u64, "gold"), ("u2", 1, "free")] {
                let mut value = version.to_be_bytes().to_vec();
                serde_json::to_writer(&mut value, &user(plan)).unwrap();
                t.insert(format!("demo\0{id}").as_str(), value.as_slice())
                    .unwrap();
            }
            let key = format!("{}\0{}\0{:010}", j.app_id, j.id, j.version);
            txn.open_table(JOURNEYS)
                .unwrap()
                .insert(key.as_str(), serde_json::to_vec(j).unwrap().as_slice())
                .unwrap();
            let key = format!("{}\0{}", s.app_id, s.id);
            txn.open_table(SEGMENTS)
                .unwrap()
                .insert(key.as_str(), serde_json::to_vec(s).unwrap().as_slice())
                .unwrap();
            txn.open_table(LOADER).unwrap().insert("s", "u1").unwrap();
            let k = ("s".to_owned(), 1, "a".to_owned(), Count::Entered);
            txn.open_table(COUNTS)
                .unwrap()
                .insert(count_key(&k).as_slice(), 7)
                .unwrap();
        }
        txn.commit().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_old_redb_store_is_moved_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let vips =
            Segment::parse("s.yaml", "{id: vips, app_id: demo, where: {tier: gold}}").unwrap();
        let j = Journey::parse(
            "j.yaml",
            "{id: s, version: 1, app_id: demo, entry: {segment: vips}, start: a, \
             nodes: [{id: a}]}",
        )
        .unwrap();
        old_store(dir.path(), &j, &vips);
        let entered = ("s".to_owned(), 1, "a".to_owned(), Count::Entered);

        {
            let s = EmbeddedStore::open(dir.path()).await.unwrap();
            let u1 = s.load_user("demo", "u1").await.unwrap();
            assert_eq!((u1.version, u1.user), (3, user("gold")));
            assert_eq!(s.load_user("demo", "u2").await.unwrap().version, 1);
            let ids: Vec<String> = s
                .users("demo", None, 10)
                .await
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            assert_eq!(ids, ["u1", "u2"]);
            let c = s.catalog().await.unwrap();
            assert_eq!(c.segment("demo", "vips"), Some(&vips));
            assert_eq!(c.latest("demo", "s"), Some(&j));
            assert_eq!(s.loader_position("s").await.unwrap().as_deref(), Some("u1"));
            assert_eq!(s.counts("s").await.unwrap(), vec![(entered.clone(), 7)]);
            // The versions carried over are the ones a save is checked against.
            assert_eq!(
                s.save_user("demo", "u1", 2, &user("x")).await.unwrap(),
                Saved::Conflict
            );
            assert_eq!(
                s.save_user("demo", "u1", 3, &user("platinum"))
                    .await
                    .unwrap(),
                Saved::Written(4)
            );
            s.add_counts(&[(entered.clone(), 1)]).await.unwrap();
        }
        assert!(!dir.path().join(REDB_FILE).exists());
        assert!(dir.path().join(MIGRATED_FILE).exists());

        // Opened again: nothing copied a second time, what was written since is there.
        let s = EmbeddedStore::open(dir.path()).await.unwrap();
        assert_eq!(s.counts("s").await.unwrap(), vec![(entered, 8)]);
        let u1 = s.load_user("demo", "u1").await.unwrap();
        assert_eq!((u1.version, u1.user), (4, user("platinum")));
        assert_eq!(s.catalog().await.unwrap().latest("demo", "s"), Some(&j));
    }

    /// A crash after the copy was marked done but before the rename: the next open only
    /// renames, and does not copy the old rows over what is in fjall.
    #[tokio::test]
    async fn a_copy_marked_done_is_not_done_again() {
        let dir = tempfile::tempdir().unwrap();
        let vips = Segment::parse("s.yaml", "{id: vips, app_id: demo, where: {}}").unwrap();
        let j = Journey::parse(
            "j.yaml",
            "{id: s, version: 1, app_id: demo, entry: {event: go}, start: a, nodes: [{id: a}]}",
        )
        .unwrap();
        {
            let db = Database::builder(dir.path().join(super::super::FJALL_DIR))
                .open()
                .unwrap();
            let ks = Keyspaces::open(&db).unwrap();
            let mut value = 9u64.to_be_bytes().to_vec();
            serde_json::to_writer(&mut value, &user("newer")).unwrap();
            ks.users.insert("demo\0u1", value).unwrap();
            ks.meta.insert(COPIED, 5u64.to_be_bytes()).unwrap();
        }
        old_store(dir.path(), &j, &vips);
        let s = EmbeddedStore::open(dir.path()).await.unwrap();
        let u1 = s.load_user("demo", "u1").await.unwrap();
        assert_eq!((u1.version, u1.user), (9, user("newer")));
        assert!(dir.path().join(MIGRATED_FILE).exists());
        drop(s);

        // A redb file appearing after the migration is refused, not copied.
        old_store(dir.path(), &j, &vips);
        let Err(e) = EmbeddedStore::open(dir.path()).await else {
            panic!("opened with both redb files there");
        };
        assert!(e.to_string().contains("move one of them away"), "{e}");
    }
}
