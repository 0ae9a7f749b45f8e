//! The `TimerStore` conformance suite on the Scylla store, against a real Cassandra
//! (`TIMERDB_SCYLLA`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use timerdb::store::scylla::ScyllaStore;
use timerdb::store::{StoreOptions, TimerStore};

/// A store on a fresh keyspace named `{prefix}_…`, with `layout`.
async fn make(
    prefix: &str,
    layout: timerdb::timer::Layout,
    retention: Duration,
) -> Option<Arc<dyn TimerStore>> {
    let svc = common::services()?;
    let url = format!("scylla://{}/{}", svc.scylla, common::unique(prefix));
    let store = ScyllaStore::open(
        &url,
        StoreOptions {
            idempotency_retention: retention,
            layout,
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("open {url}: {e}"));
    Some(Arc::new(store))
}

/// Each conformance check is a test of its own: `conformance::<check>`.
mod conformance {
    use super::*;

    async fn make(retention: Duration) -> Option<Arc<dyn TimerStore>> {
        super::make("conf", timerdb::timer::Layout::default(), retention).await
    }

    timerdb::timer_store_conformance!(make);
}

/// With two slots, most timers of a call share a partition, so inserts go as unlogged
/// single-partition batches (up to 64 rows); the suite must pass the same.
mod conformance_batched_inserts {
    use super::*;

    async fn make(retention: Duration) -> Option<Arc<dyn TimerStore>> {
        let layout = timerdb::timer::Layout {
            slots: 2,
            bucket_ms: 1000,
        };
        super::make("batch", layout, retention).await
    }

    timerdb::timer_store_conformance!(make);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scylla_store_reopens_with_its_layout_and_migrations_run_once() {
    use timerdb::timer::Layout;
    let Some(svc) = common::services() else {
        return;
    };
    let url = format!("scylla://{}/{}", svc.scylla, common::unique("reopen"));
    let layout = Layout {
        slots: 128,
        bucket_ms: 5000,
    };
    let first = ScyllaStore::open(
        &url,
        StoreOptions {
            layout,
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(first.layout(), layout);
    let again = ScyllaStore::open(&url, StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(again.layout(), layout, "the stored layout wins");
    let parsed = timerdb::store::scylla::ScyllaUrl::parse(&url).unwrap();
    let session = timerdb::store::scylla::connect(&parsed).await.unwrap();
    let applied = timerdb::store::scylla::migrate(&session, &parsed)
        .await
        .unwrap();
    assert!(applied.is_empty(), "nothing left to migrate: {applied:?}");
}

#[test]
fn timerdb_migrate_applies_the_schema_once() {
    let Some(svc) = common::services() else {
        return;
    };
    let url = format!("scylla://{}/{}", svc.scylla, common::unique("migrate"));
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_timerdb"))
            .args(["migrate", "--store", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(run().contains("applied migrations [1, 2, 3, 4, 5]"));
    assert!(run().contains("is up to date"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_timerdb"))
        .args(["migrate", "--store", "scylla://127.0.0.1:1/bad-keyspace"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keyspace \"bad-keyspace\""));
}

/// A keyspace made by an older build (schema version 1 only) gets the later migrations
/// when a node opens it, and its timers are kept. A column an interrupted run added
/// already (its version not recorded) does not stop the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_keyspace_is_migrated_forward() {
    let Some(svc) = common::services() else {
        return;
    };
    let url = format!("scylla://{}/{}", svc.scylla, common::unique("older"));
    let parsed = timerdb::store::scylla::ScyllaUrl::parse(&url).unwrap();
    let session = timerdb::store::scylla::connect(&parsed).await.unwrap();
    // What a version-1 build would have left: migration 1 applied and recorded.
    let v1_only = timerdb::store::scylla::migrate_upto(&session, &parsed, 1)
        .await
        .unwrap();
    assert_eq!(v1_only, vec![1]);
    session
        .query_unpaged(
            format!(
                "ALTER TABLE {}.idempotency ADD confirmed boolean",
                parsed.keyspace
            ),
            (),
        )
        .await
        .unwrap();
    let applied = timerdb::store::scylla::migrate(&session, &parsed)
        .await
        .unwrap();
    assert_eq!(applied, vec![2, 3, 4, 5], "only the missing migrations run");
    let store = ScyllaStore::open(&url, StoreOptions::default())
        .await
        .unwrap();
    let all = store.layout().all_slots();
    let p = timerdb::store::Progress {
        fired_through_ms: 42,
        loaded_through: 1000,
        unconfirmed: vec![],
        delivered_after: vec![],
    };
    store.set_progress(all, &p).await.unwrap();
    assert_eq!(store.progress(all).await.unwrap(), vec![(all, p)]);
}

/// A row whose spec cannot be decoded is skipped and counted; the rest of its bucket loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_skipped_and_the_rest_of_its_bucket_loads() {
    use timerdb::timer::{TimerSpec, now_ms};
    let Some(svc) = common::services() else {
        return;
    };
    let ks = common::unique("unreadable");
    let url = format!("scylla://{}/{ks}", svc.scylla);
    let store = ScyllaStore::open(&url, StoreOptions::default())
        .await
        .unwrap();
    let fire = now_ms() + 60_000;
    let spec = |p: &str| TimerSpec {
        fire_at_ms: fire,
        topic: "t".into(),
        partition: 0,
        key: None,
        headers: vec![],
        payload: p.to_owned().into(),
        idempotency_key: None,
    };
    let ids = timerdb::store::conformance::insert_ok(&store, &[spec("good"), spec("bad")]).await;
    let parsed = timerdb::store::scylla::ScyllaUrl::parse(&url).unwrap();
    let session = timerdb::store::scylla::connect(&parsed).await.unwrap();
    let bad = ids[1].id;
    session
        .query_unpaged(
            format!(
                "UPDATE {ks}.timers SET spec = 0xffff01 WHERE slot = ? AND bucket = ? AND rand = ?"
            ),
            (
                store.layout().slot_of(bad.rand) as i32,
                bad.bucket_ms as i64,
                bad.rand as i64,
            ),
        )
        .await
        .unwrap();
    let loaded = store
        .load_bucket(store.layout().all_slots(), ids[0].id.bucket_ms)
        .await
        .expect("one bad row must not fail the load");
    let got: Vec<_> = loaded.timers.iter().map(|t| t.id).collect();
    assert_eq!(got, vec![ids[0].id]);
}

/// A member withdrawing a timer releases its key, then cancels its row; one that dies
/// between the two leaves the row pending. A load of its bucket must neither fire that row
/// nor keep the free key claimed for it (the caller, told the timer was withdrawn, retries
/// with the key and must not be answered with the withdrawn id): the withdraw recorded the
/// row first. The retry stores the timer anew, and only it fires. Withdrawn twice (the
/// retry's timer too), the first row stays withdrawn. A repeated call and a withdraw
/// interleaved either way agree on whether the timer is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_withdrawn_but_not_yet_cancelled_is_not_fired_nor_given_its_key_again() {
    use timerdb::store::{Abandoned, TimerStore};
    use timerdb::timer::now_ms;
    let Some(svc) = common::services() else {
        return;
    };
    let ks = common::unique("withdrawn");
    let url = format!("scylla://{}/{ks}", svc.scylla);
    let store = ScyllaStore::open(&url, StoreOptions::default())
        .await
        .unwrap();
    let l = store.layout();
    let parsed = timerdb::store::scylla::ScyllaUrl::parse(&url).unwrap();
    let session = timerdb::store::scylla::connect(&parsed).await.unwrap();
    // As if the withdrawing member died after the release, before the cancel.
    let uncancel = |id: timerdb::timer::TimerId| {
        let session = &session;
        let ks = &ks;
        async move {
            session
                .query_unpaged(
                    format!(
                        "UPDATE {ks}.timers SET state = 0 WHERE slot = ? AND bucket = ? AND rand = ?"
                    ),
                    (
                        l.slot_of(id.rand) as i32,
                        id.bucket_ms as i64,
                        id.rand as i64,
                    ),
                )
                .await
                .unwrap();
        }
    };
    let fire = now_ms() + 60_000;
    let bucket = l.bucket_start(fire);
    let insert = |key: &'static str| {
        let store = &store;
        let mut spec = timerdb::store::conformance::spec(fire, 1);
        spec.idempotency_key = Some(key.into());
        async move {
            timerdb::store::conformance::insert_ok(store, std::slice::from_ref(&spec)).await[0]
        }
    };

    let first = insert("signup-5").await.id;
    assert_eq!(
        store.abandon(first, Some("signup-5")).await.unwrap(),
        Abandoned::Withdrawn
    );
    uncancel(first).await;
    let loaded = store.load_bucket(l.all_slots(), bucket).await.unwrap();
    assert!(loaded.timers.is_empty(), "the withdrawn row is not fired");
    assert_eq!(loaded.superseded, vec![first]);
    assert!(
        !store.confirm_key("signup-5", first).await.unwrap(),
        "the load left the key free"
    );
    let retry = insert("signup-5").await;
    assert!(retry.created, "the retry stores the timer anew");
    assert_ne!(retry.id, first);
    let loaded = store.load_bucket(l.all_slots(), bucket).await.unwrap();
    let ids: Vec<_> = loaded.timers.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![retry.id], "only the retry fires");

    // A loader claimed the released key for the withdrawn row (as a load that read the row
    // while it was pending does): a repeated call confirming that claim is refused and
    // frees the key, so its retry stores the timer anew.
    let second = insert("signup-6").await.id;
    store.abandon(second, Some("signup-6")).await.unwrap();
    uncancel(second).await;
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.idempotency (key, timer_id, created_ms) VALUES (?, ?, ?)"),
            ("signup-6", second.to_bytes().to_vec(), now_ms() as i64),
        )
        .await
        .unwrap();
    assert!(
        !store.confirm_key("signup-6", second).await.unwrap(),
        "a repeat is never answered with a withdrawn id"
    );
    let again = insert("signup-6").await;
    assert!(again.created && again.id != second, "the key was freed");

    // Two withdraws under one key: the first row is still known as withdrawn.
    let third = insert("signup-7").await.id;
    store.abandon(third, Some("signup-7")).await.unwrap();
    uncancel(third).await;
    let fourth = insert("signup-7").await;
    assert!(fourth.created);
    store.abandon(fourth.id, Some("signup-7")).await.unwrap();
    let loaded = store.load_bucket(l.all_slots(), bucket).await.unwrap();
    assert!(
        !loaded.timers.iter().any(|t| t.id == third),
        "a row withdrawn before another withdraw of its key is not fired"
    );
    assert!(!store.confirm_key("signup-7", third).await.unwrap());

    // A repeated call and a withdraw of the same timer, each between the other's steps.
    // The withdraw's record, then the call's confirmation and release: the withdraw
    // finds the key gone and withdraws; neither answers with the timer.
    let record = |key: &'static str, id: timerdb::timer::TimerId| {
        let session = &session;
        let ks = &ks;
        async move {
            session
                .query_unpaged(
                    format!("INSERT INTO {ks}.withdrawn_keys (key, timer_id) VALUES (?, ?)"),
                    (key, id.to_bytes().to_vec()),
                )
                .await
                .unwrap();
        }
    };
    let fifth = insert("signup-8").await.id;
    record("signup-8", fifth).await;
    assert!(!store.confirm_key("signup-8", fifth).await.unwrap());
    assert_eq!(
        store.abandon(fifth, Some("signup-8")).await.unwrap(),
        Abandoned::Withdrawn
    );
    let retried = insert("signup-8").await;
    assert!(retried.created && retried.id != fifth);
    // The record, then the call's confirmation, then the withdraw's release (refused)
    // and its keep, then the call's release (refused): both answer with the timer, and
    // it fires.
    let sixth = insert("signup-9").await.id;
    record("signup-9", sixth).await;
    session
        .query_unpaged(
            format!("UPDATE {ks}.idempotency SET confirmed = true WHERE key = ? IF timer_id = ?"),
            ("signup-9", sixth.to_bytes().to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(
        store.abandon(sixth, Some("signup-9")).await.unwrap(),
        Abandoned::Kept
    );
    assert!(store.confirm_key("signup-9", sixth).await.unwrap());
    let loaded = store.load_bucket(l.all_slots(), bucket).await.unwrap();
    assert!(
        loaded.timers.iter().any(|t| t.id == sixth),
        "the kept timer fires"
    );
    assert!(!loaded.timers.iter().any(|t| t.id == fifth));
}

/// Partitions larger than the server's 5,000-row pages: with three slots and 15,000
/// timers in one bucket (~5,000 per partition), a load of 20,000 rows at a time (the
/// scheduler's page) and one of 3,000 at a time each return every timer exactly once, and
/// say when the bucket ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_larger_than_a_server_page_load_every_row_once() {
    use std::collections::HashSet;
    use timerdb::timer::{TimerSpec, now_ms};
    let layout = timerdb::timer::Layout {
        slots: 3,
        bucket_ms: 1000,
    };
    let Some(store) = make("bigpart", layout, Duration::from_secs(86_400)).await else {
        return;
    };
    let fire = layout.bucket_start(now_ms() + 120_000) + 1;
    let specs: Vec<TimerSpec> = (0..15_000)
        .map(|i| timerdb::store::conformance::spec(fire, i))
        .collect();
    let mut want = HashSet::new();
    for chunk in specs.chunks(1_000) {
        for i in timerdb::store::conformance::insert_ok(&*store, chunk).await {
            want.insert(i.id);
        }
    }
    let bucket = *want.iter().map(|i| &i.bucket_ms).next().unwrap();
    assert!(want.iter().all(|i| i.bucket_ms == bucket));
    for limit in [20_000, 3_000] {
        let mut seen = HashSet::new();
        let mut after = None;
        loop {
            let page = store
                .load_page(layout.all_slots(), bucket, after, limit)
                .await
                .unwrap();
            assert!(page.rows.timers.len() <= limit);
            for t in &page.rows.timers {
                assert!(seen.insert(t.id), "{} came twice (pages of {limit})", t.id);
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen.len(), want.len(), "pages of {limit}");
        assert_eq!(seen, want);
    }
}
