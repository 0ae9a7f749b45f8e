//! The shared state store on ScyllaDB (or Apache Cassandra, same protocol): what several
//! `journeyx run` processes in one consumer group share, so a user whose partition moves
//! to another process on a rebalance keeps their record.
//!
//! URL: `scylla://host:port[,host:port...]/keyspace[?replication_factor=N]`. Tables:
//! - `users ((app_id, user_id)) → version, record`: one partition per user, so one read
//!   loads all of a user's journeys; a save is a lightweight transaction on the version
//!   (`IF NOT EXISTS` for the first), so of two processes that read the same version
//!   exactly one writes;
//! - `app_users (app_id, user_id)`: the app's users in id order, for the loader (written
//!   with a user's first save; one partition per app);
//! - `journeys ((app_id), id, version) → body`, inserted `IF NOT EXISTS`, so a version is
//!   never overwritten even by two processes publishing at once;
//! - `segments ((app_id), id) → body`; `loader (journey) → position`.

use std::time::Duration;

use async_trait::async_trait;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};

use super::{CountKey, Saved, StateStore, Versioned, check_publish};
use crate::catalog::Catalog;
use crate::engine::{Count, User};
use crate::model::{Journey, Segment};
use crate::{Error, Result};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {ks}.users (app_id text, user_id text, version bigint, \
     record blob, PRIMARY KEY ((app_id, user_id)))",
    "CREATE TABLE IF NOT EXISTS {ks}.app_users (app_id text, user_id text, \
     PRIMARY KEY (app_id, user_id))",
    "CREATE TABLE IF NOT EXISTS {ks}.journeys (app_id text, id text, version int, body text, \
     PRIMARY KEY (app_id, id, version))",
    "CREATE TABLE IF NOT EXISTS {ks}.segments (app_id text, id text, body text, \
     PRIMARY KEY (app_id, id))",
    "CREATE TABLE IF NOT EXISTS {ks}.loader (journey text PRIMARY KEY, position text)",
    "CREATE TABLE IF NOT EXISTS {ks}.counts (journey text, version int, node text, what text, \
     n counter, PRIMARY KEY (journey, version, node, what))",
];

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("scylla state store, {what}: {e}"))
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreUrl {
    pub hosts: Vec<String>,
    pub keyspace: String,
    pub replication_factor: u32,
}

impl StoreUrl {
    /// Parses `scylla://host:port[,host:port]/keyspace[?replication_factor=N]`.
    pub fn parse(url: &str) -> Result<StoreUrl> {
        let bad = |why: &str| Error::Invalid(format!("state store URL {url:?}: {why}"));
        let rest = url
            .strip_prefix("scylla://")
            .ok_or_else(|| bad("it must start with scylla://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hosts, keyspace) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no keyspace (scylla://host:port/keyspace)"))?;
        let hosts: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if hosts.is_empty() {
            return Err(bad("it names no host"));
        }
        let valid = !keyspace.is_empty()
            && keyspace.len() <= 48
            && keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !keyspace.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(bad(&format!(
                "keyspace {keyspace:?} must be 1-48 letters, digits or _, not starting with a digit"
            )));
        }
        let mut replication_factor = 1;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("replication_factor", v)) => {
                    replication_factor = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        bad(&format!(
                            "replication_factor {v:?} is not a positive number"
                        ))
                    })?;
                }
                _ => {
                    return Err(bad(&format!(
                        "unknown option {pair:?} (known: replication_factor)"
                    )));
                }
            }
        }
        Ok(StoreUrl {
            hosts,
            keyspace: keyspace.to_owned(),
            replication_factor,
        })
    }
}

struct Statements {
    load_user: PreparedStatement,
    insert_user: PreparedStatement,
    update_user: PreparedStatement,
    index_user: PreparedStatement,
    page_users: PreparedStatement,
    page_users_after: PreparedStatement,
    count_users: PreparedStatement,
    count_users_after: PreparedStatement,
    insert_journey: PreparedStatement,
    upsert_segment: PreparedStatement,
    all_journeys: PreparedStatement,
    all_segments: PreparedStatement,
    loader_position: PreparedStatement,
    set_loader_position: PreparedStatement,
    add_count: PreparedStatement,
    counts: PreparedStatement,
}

/// User records, journeys and segments in ScyllaDB / Cassandra.
pub struct ScyllaStateStore {
    session: Session,
    st: Statements,
    publish: tokio::sync::Mutex<()>,
}

impl ScyllaStateStore {
    /// Connects, creates the keyspace and tables if needed.
    pub async fn open(url: &str) -> Result<ScyllaStateStore> {
        let url = StoreUrl::parse(url)?;
        let profile = ExecutionProfile::builder()
            .consistency(Consistency::Quorum)
            .serial_consistency(Some(SerialConsistency::Serial))
            .request_timeout(Some(Duration::from_secs(10)))
            .build();
        let session = SessionBuilder::new()
            .known_nodes(&url.hosts)
            .connection_timeout(Duration::from_secs(5))
            .default_execution_profile_handle(profile.into_handle())
            .build()
            .await
            .map_err(|e| failed(&format!("connecting to {}", url.hosts.join(",")), e))?;
        let ks = &url.keyspace;
        let ddl = |q: String| {
            let mut s = scylla::statement::unprepared::Statement::new(q);
            s.set_request_timeout(Some(Duration::from_secs(60)));
            s
        };
        session
            .query_unpaged(
                ddl(format!(
                    "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
                     {{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                    url.replication_factor
                )),
                (),
            )
            .await
            .map_err(|e| failed("creating the keyspace", e))?;
        for table in SCHEMA {
            session
                .query_unpaged(ddl(table.replace("{ks}", ks)), ())
                .await
                .map_err(|e| failed("creating tables", e))?;
        }
        let prep = |q: String| {
            let session = &session;
            async move {
                session
                    .prepare(q.clone())
                    .await
                    .map_err(|e| failed(&format!("preparing {q}"), e))
            }
        };
        let st = Statements {
            load_user: prep(format!(
                "SELECT version, record FROM {ks}.users WHERE app_id = ? AND user_id = ?"
            ))
            .await?,
            insert_user: prep(format!(
                "INSERT INTO {ks}.users (app_id, user_id, version, record) VALUES (?, ?, 1, ?) \
                 IF NOT EXISTS"
            ))
            .await?,
            update_user: prep(format!(
                "UPDATE {ks}.users SET version = ?, record = ? WHERE app_id = ? AND user_id = ? \
                 IF version = ?"
            ))
            .await?,
            index_user: prep(format!(
                "INSERT INTO {ks}.app_users (app_id, user_id) VALUES (?, ?)"
            ))
            .await?,
            page_users: prep(format!(
                "SELECT user_id FROM {ks}.app_users WHERE app_id = ? LIMIT ?"
            ))
            .await?,
            page_users_after: prep(format!(
                "SELECT user_id FROM {ks}.app_users WHERE app_id = ? AND user_id > ? LIMIT ?"
            ))
            .await?,
            count_users: prep(format!(
                "SELECT COUNT(*) FROM {ks}.app_users WHERE app_id = ?"
            ))
            .await?,
            count_users_after: prep(format!(
                "SELECT COUNT(*) FROM {ks}.app_users WHERE app_id = ? AND user_id > ?"
            ))
            .await?,
            insert_journey: prep(format!(
                "INSERT INTO {ks}.journeys (app_id, id, version, body) VALUES (?, ?, ?, ?) \
                 IF NOT EXISTS"
            ))
            .await?,
            upsert_segment: prep(format!(
                "INSERT INTO {ks}.segments (app_id, id, body) VALUES (?, ?, ?)"
            ))
            .await?,
            all_journeys: prep(format!("SELECT body FROM {ks}.journeys")).await?,
            all_segments: prep(format!("SELECT body FROM {ks}.segments")).await?,
            loader_position: prep(format!(
                "SELECT position FROM {ks}.loader WHERE journey = ?"
            ))
            .await?,
            set_loader_position: prep(format!(
                "INSERT INTO {ks}.loader (journey, position) VALUES (?, ?)"
            ))
            .await?,
            add_count: prep(format!(
                "UPDATE {ks}.counts SET n = n + ? WHERE journey = ? AND version = ? AND node = ? \
                 AND what = ?"
            ))
            .await?,
            counts: prep(format!(
                "SELECT version, node, what, n FROM {ks}.counts WHERE journey = ?"
            ))
            .await?,
        };
        Ok(ScyllaStateStore {
            session,
            st,
            publish: tokio::sync::Mutex::new(()),
        })
    }

    async fn bodies(&self, st: &PreparedStatement, what: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut rows = self
            .session
            .execute_iter(st.clone(), ())
            .await
            .map_err(|e| failed(what, e))?
            .rows_stream::<(String,)>()
            .map_err(|e| failed(what, e))?;
        use futures::TryStreamExt;
        while let Some((body,)) = rows.try_next().await.map_err(|e| failed(what, e))? {
            out.push(body);
        }
        Ok(out)
    }
}

/// `[applied]` of a lightweight transaction's answer.
fn applied(r: scylla::response::query_result::QueryResult, what: &str) -> Result<bool> {
    let rows = r.into_rows_result().map_err(|e| failed(what, e))?;
    let row = rows
        .first_row::<scylla::value::Row>()
        .map_err(|e| failed(what, e))?;
    row.columns
        .first()
        .and_then(|c| c.as_ref())
        .and_then(|v| v.as_boolean())
        .ok_or_else(|| failed(what, "no [applied] in the answer"))
}

#[async_trait]
impl StateStore for ScyllaStateStore {
    async fn load_user(&self, app: &str, user: &str) -> Result<Versioned> {
        let rows = self
            .session
            .execute_unpaged(&self.st.load_user, (app, user))
            .await
            .map_err(|e| failed("reading a user", e))?
            .into_rows_result()
            .map_err(|e| failed("reading a user", e))?;
        match rows
            .maybe_first_row::<(i64, Vec<u8>)>()
            .map_err(|e| failed("reading a user", e))?
        {
            None => Ok(Versioned::default()),
            Some((version, record)) => Ok(Versioned {
                user: serde_json::from_slice(&record)
                    .map_err(|e| failed(&format!("decoding user {app}/{user}"), e))?,
                version: version as u64,
            }),
        }
    }

    async fn save_user(
        &self,
        app: &str,
        user: &str,
        expected: u64,
        record: &User,
    ) -> Result<Saved> {
        let json = serde_json::to_vec(record).map_err(|e| failed("encoding a user", e))?;
        let what = "saving a user";
        let r = if expected == 0 {
            // The index first: a user listed without a record is skipped by the loader,
            // a record never listed would be missed.
            self.session
                .execute_unpaged(&self.st.index_user, (app, user))
                .await
                .map_err(|e| failed(what, e))?;
            self.session
                .execute_unpaged(&self.st.insert_user, (app, user, json))
                .await
        } else {
            self.session
                .execute_unpaged(
                    &self.st.update_user,
                    ((expected + 1) as i64, json, app, user, expected as i64),
                )
                .await
        }
        .map_err(|e| failed(what, e))?;
        Ok(if applied(r, what)? {
            Saved::Written(expected + 1)
        } else {
            Saved::Conflict
        })
    }

    async fn publish_journey(&self, journey: &Journey) -> Result<bool> {
        let _one = self.publish.lock().await;
        if !check_publish(self, journey).await? {
            return Ok(false);
        }
        let body = serde_json::to_string(journey).map_err(|e| failed("encoding a journey", e))?;
        let r = self
            .session
            .execute_unpaged(
                &self.st.insert_journey,
                (&journey.app_id, &journey.id, journey.version as i32, body),
            )
            .await
            .map_err(|e| failed("publishing a journey", e))?;
        if applied(r, "publishing a journey")? {
            return Ok(true);
        }
        // Another process published this version meanwhile: the same content is a no-op,
        // other content is refused, as for any version published before.
        check_publish(self, journey).await
    }

    async fn publish_segment(&self, segment: &Segment) -> Result<bool> {
        let _one = self.publish.lock().await;
        let catalog = self.catalog().await?;
        if catalog.segment(&segment.app_id, &segment.id) == Some(segment) {
            return Ok(false);
        }
        let body = serde_json::to_string(segment).map_err(|e| failed("encoding a segment", e))?;
        self.session
            .execute_unpaged(
                &self.st.upsert_segment,
                (&segment.app_id, &segment.id, body),
            )
            .await
            .map_err(|e| failed("publishing a segment", e))?;
        Ok(true)
    }

    async fn catalog(&self) -> Result<Catalog> {
        let segments = self
            .bodies(&self.st.all_segments, "reading segments")
            .await?
            .iter()
            .map(|b| serde_json::from_str(b).map_err(|e| failed("decoding a segment", e)))
            .collect::<Result<_>>()?;
        let journeys = self
            .bodies(&self.st.all_journeys, "reading journeys")
            .await?
            .iter()
            .map(|b| serde_json::from_str(b).map_err(|e| failed("decoding a journey", e)))
            .collect::<Result<_>>()?;
        Catalog::from_stored(segments, journeys)
    }

    async fn users(
        &self,
        app: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, User)>> {
        let what = "listing users";
        let wanted = limit.max(1);
        let limit = wanted.min(i32::MAX as usize) as i32;
        let mut out = Vec::with_capacity(wanted);
        let mut cursor = after.map(str::to_owned);
        // An id is indexed before its record is first written, so an id may have no
        // record (its first save lost, or not landed yet): skipped. The next ids are read
        // until the page has a user or the index ends, so a page of such ids does not
        // look like the end (the loader would stop there).
        loop {
            let r = match &cursor {
                None => {
                    self.session
                        .execute_unpaged(&self.st.page_users, (app, limit))
                        .await
                }
                Some(a) => {
                    self.session
                        .execute_unpaged(&self.st.page_users_after, (app, a, limit))
                        .await
                }
            }
            .map_err(|e| failed(what, e))?
            .into_rows_result()
            .map_err(|e| failed(what, e))?;
            let ids: Vec<String> = r
                .rows::<(String,)>()
                .map_err(|e| failed(what, e))?
                .map(|row| row.map(|(id,)| id).map_err(|e| failed(what, e)))
                .collect::<Result<_>>()?;
            let end = ids.len() < limit as usize;
            cursor = ids.last().cloned().or(cursor);
            for id in ids {
                let read = self.load_user(app, &id).await?;
                if read.version > 0 {
                    out.push((id, read.user));
                }
            }
            if !out.is_empty() || end {
                return Ok(out);
            }
        }
    }

    async fn count_users(&self, app: &str, after: Option<&str>) -> Result<u64> {
        let what = "counting users";
        // One partition, counted by the server a page at a time.
        let r = match after {
            None => {
                self.session
                    .execute_unpaged(&self.st.count_users, (app,))
                    .await
            }
            Some(a) => {
                self.session
                    .execute_unpaged(&self.st.count_users_after, (app, a))
                    .await
            }
        }
        .map_err(|e| failed(what, e))?
        .into_rows_result()
        .map_err(|e| failed(what, e))?;
        let (n,) = r.single_row::<(i64,)>().map_err(|e| failed(what, e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn loader_position(&self, journey: &str) -> Result<Option<String>> {
        let rows = self
            .session
            .execute_unpaged(&self.st.loader_position, (journey,))
            .await
            .map_err(|e| failed("reading the loader's position", e))?
            .into_rows_result()
            .map_err(|e| failed("reading the loader's position", e))?;
        Ok(rows
            .maybe_first_row::<(Option<String>,)>()
            .map_err(|e| failed("reading the loader's position", e))?
            .and_then(|(p,)| p))
    }

    async fn set_loader_position(&self, journey: &str, user: &str) -> Result<()> {
        self.session
            .execute_unpaged(&self.st.set_loader_position, (journey, user))
            .await
            .map_err(|e| failed("recording the loader's position", e))?;
        Ok(())
    }

    async fn add_counts(&self, deltas: &[(CountKey, u64)]) -> Result<()> {
        // Counter updates, one statement each, concurrently (a counter batch is no cheaper
        // and fails whole).
        let updates = deltas.iter().map(|((journey, version, node, what), n)| {
            self.session.execute_unpaged(
                &self.st.add_count,
                (
                    scylla::value::Counter(*n as i64),
                    journey.as_str(),
                    *version as i32,
                    node.as_str(),
                    what.as_str(),
                ),
            )
        });
        for r in futures::future::join_all(updates).await {
            r.map_err(|e| failed("adding to a counter", e))?;
        }
        Ok(())
    }

    async fn counts(&self, journey: &str) -> Result<Vec<(CountKey, u64)>> {
        let rows = self
            .session
            .execute_unpaged(&self.st.counts, (journey,))
            .await
            .map_err(|e| failed("reading counters", e))?
            .into_rows_result()
            .map_err(|e| failed("reading counters", e))?;
        let mut out = Vec::new();
        for row in rows
            .rows::<(i32, String, String, scylla::value::Counter)>()
            .map_err(|e| failed("reading counters", e))?
        {
            let (version, node, what, n) = row.map_err(|e| failed("reading counters", e))?;
            let what = Count::parse(&what)
                .ok_or_else(|| failed("reading counters", format!("unknown count {what:?}")))?;
            out.push(((journey.to_owned(), version as u32, node, what), n.0 as u64));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A fresh keyspace on the Cassandra of deploy/local (`TIMERDB_SCYLLA`).
    async fn fresh() -> Arc<dyn StateStore> {
        Arc::new(fresh_store().await)
    }

    async fn fresh_store() -> ScyllaStateStore {
        let host = match std::env::var("TIMERDB_SCYLLA") {
            Ok(h) if !h.is_empty() => h,
            _ if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("TIMERDB_SCYLLA is not set: run deploy/local/up (CI=true needs Cassandra)")
            }
            _ => {
                panic!("TIMERDB_SCYLLA is not set: run deploy/local/up, or skip with --skip scylla")
            }
        };
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let ks = format!(
            "jx_{}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % 1_000_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        ScyllaStateStore::open(&format!("scylla://{host}/{ks}"))
            .await
            .unwrap()
    }

    crate::state_store_suite!(fresh().await);

    /// Ids listed without a record (a first save that indexed the user and then lost)
    /// are skipped, and a page of nothing but such ids does not end the listing: before,
    /// the page came back empty and the loader stopped there.
    #[tokio::test]
    async fn a_page_of_ids_without_records_does_not_end_the_listing() {
        let store = fresh_store().await;
        for id in ["a", "b", "c"] {
            store
                .session
                .execute_unpaged(&store.st.index_user, ("demo", id))
                .await
                .unwrap();
        }
        store
            .save_user("demo", "d", 0, &User::default())
            .await
            .unwrap();
        let page = store.users("demo", None, 2).await.unwrap();
        assert_eq!(
            page.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
        assert!(store.users("demo", Some("d"), 2).await.unwrap().is_empty());
        assert_eq!(
            store.count_users("demo", None).await.unwrap(),
            4,
            "ids counted"
        );
    }

    #[test]
    fn urls_name_what_is_wrong() {
        let ok = StoreUrl::parse("scylla://a:9042,b:9042/jx?replication_factor=3").unwrap();
        assert_eq!(ok.hosts, ["a:9042", "b:9042"]);
        assert_eq!((ok.keyspace.as_str(), ok.replication_factor), ("jx", 3));
        for (url, why) in [
            ("cassandra://a/jx", "must start with scylla://"),
            ("scylla://a:9042", "names no keyspace"),
            ("scylla://a/9x", "not starting with a digit"),
            (
                "scylla://a/jx?replication_factor=0",
                "not a positive number",
            ),
            ("scylla://a/jx?consistency=one", "unknown option"),
        ] {
            let e = StoreUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
