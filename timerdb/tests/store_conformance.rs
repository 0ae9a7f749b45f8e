//! The `TimerStore` conformance suite on the embedded store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use timerdb::store::conformance::insert_ok;
use timerdb::store::embedded::EmbeddedStore;
use timerdb::store::{StoreOptions, TimerStore};
use timerdb::timer::{TimerSpec, now_ms};

/// A new embedded store in a directory of its own (kept until the test process ends).
async fn make(retention: Duration) -> Option<Arc<dyn TimerStore>> {
    let dir = tempfile::tempdir().unwrap().keep();
    let store = EmbeddedStore::open(
        &dir,
        StoreOptions {
            idempotency_retention: retention,
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    Some(Arc::new(store))
}

/// Each conformance check is a test of its own: `conformance::<check>`.
mod conformance {
    timerdb::timer_store_conformance!(super::make);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_survives_reopen_and_keeps_its_layout() {
    use timerdb::timer::{Layout, TimerSpec, now_ms};
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        layout: Layout {
            slots: 64,
            bucket_ms: 2000,
        },
        ..StoreOptions::default()
    };
    let spec = TimerSpec {
        fire_at_ms: now_ms() + 60_000,
        topic: "t".into(),
        partition: 1,
        key: None,
        headers: vec![],
        payload: "p".into(),
        idempotency_key: Some("k".into()),
    };
    let id = {
        let store = EmbeddedStore::open(dir.path(), opts.clone()).await.unwrap();
        let id = insert_ok(&store, std::slice::from_ref(&spec)).await[0].id;
        store.close().await.unwrap();
        id
    };
    // Reopened with another requested layout: the stored one wins, data and keys survive.
    let store = EmbeddedStore::open(dir.path(), StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(store.layout(), opts.layout);
    assert_eq!(store.get(id).await.unwrap().unwrap().timer.spec, spec);
    let again = insert_ok(&store, &[spec]).await[0];
    assert_eq!(again.id, id);
    assert!(!again.created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_refuses_a_file_of_another_format_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), StoreOptions::default())
        .await
        .unwrap();
    store.close().await.unwrap();
    drop(store);
    // What a store written by the first release (keys `bucket | slot | rand`) holds.
    let path = dir.path().join("timers.redb");
    const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert("format", [1u8].as_slice())
        .unwrap();
    txn.commit().unwrap();
    drop(db);
    let meta = || {
        let db = redb::Database::open(&path).unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let table = txn.open_table(META).unwrap();
        let rows: Vec<(String, Vec<u8>)> = redb::ReadableTable::iter(&table)
            .unwrap()
            .map(|r| {
                r.map(|(k, v)| (k.value().to_string(), v.value().to_vec()))
                    .unwrap()
            })
            .collect();
        rows
    };
    let before = meta();
    assert!(before.contains(&("format".to_string(), vec![1])));
    let err = EmbeddedStore::open(dir.path(), StoreOptions::default())
        .await
        .err()
        .expect("a format 1 store must not open");
    let text = err.to_string();
    assert!(
        text.contains("on-disk format 1") && text.contains(&dir.path().display().to_string()),
        "{text}"
    );
    assert_eq!(meta(), before, "refusing the store changed its records");
}

/// A row that cannot be decoded is skipped (and counted), not a load error: one bad row
/// must not stop its range from firing the rest of the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_skipped_and_the_rest_of_its_bucket_loads() {
    let dir = tempfile::tempdir().unwrap();
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
    let store = EmbeddedStore::open(dir.path(), StoreOptions::default())
        .await
        .unwrap();
    let ids = insert_ok(&store, &[spec("good"), spec("bad")]).await;
    let layout = store.layout();
    store.close().await.unwrap();
    drop(store);
    common::corrupt_embedded_row(dir.path(), ids[1].id, &[0xff, 0xff, 0x01]);
    let store = EmbeddedStore::open(dir.path(), StoreOptions::default())
        .await
        .unwrap();
    let loaded = store
        .load_bucket(layout.all_slots(), ids[0].id.bucket_ms)
        .await
        .expect("one bad row must not fail the load");
    let got: Vec<_> = loaded.timers.iter().map(|t| t.id).collect();
    assert_eq!(got, vec![ids[0].id]);
    assert_eq!(loaded.timers[0].spec.payload, "good");
}

/// Expired idempotency keys go as fast as they come: 12,000 keys expire together and are
/// all gone within a few seconds of the first purge after their expiry (before, at most
/// 10,000 went per 10 s, so a keyed write rate above 1,000/s grew the tables for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_idempotency_keys_are_purged_faster_than_they_come() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(
        dir.path(),
        StoreOptions {
            idempotency_retention: Duration::from_secs(1),
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    let fire = now_ms() + 3_600_000;
    for chunk in 0..12 {
        let specs: Vec<TimerSpec> = (0..1000)
            .map(|i| TimerSpec {
                fire_at_ms: fire,
                topic: "t".into(),
                partition: 0,
                key: None,
                headers: vec![],
                payload: "p".into(),
                idempotency_key: Some(format!("k-{chunk}-{i}")),
            })
            .collect();
        insert_ok(&store, &specs).await;
    }
    assert_eq!(store.idempotency_keys().await.unwrap(), 12_000);
    // The first purge ran at open; the next comes 10 s later and must clear all of them.
    let started = std::time::Instant::now();
    while store.idempotency_keys().await.unwrap() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(14),
            "{} keys left",
            store.idempotency_keys().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
