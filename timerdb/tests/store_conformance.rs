//! The `TimerStore` conformance suite on the embedded store.

use std::sync::Arc;
use std::time::Duration;

use timerdb::store::embedded::EmbeddedStore;
use timerdb::store::{StoreOptions, TimerStore};

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
        let id = store.insert(std::slice::from_ref(&spec)).await.unwrap()[0].id;
        store.close().await.unwrap();
        id
    };
    // Reopened with another requested layout: the stored one wins, data and keys survive.
    let store = EmbeddedStore::open(dir.path(), StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(store.layout(), opts.layout);
    assert_eq!(store.get(id).await.unwrap().unwrap().timer.spec, spec);
    let again = store.insert(&[spec]).await.unwrap()[0];
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
