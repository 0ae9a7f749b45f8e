//! The scheduler in-process, on the embedded store, with a sink that fails on purpose:
//! failed deliveries are retried with backoff without holding back other timers.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::flaky::{FlakySink, spec};
use timerdb::scheduler::{Scheduler, SchedulerConfig};
use timerdb::sink::{Delivery, Sink};
use timerdb::store::conformance::insert_ok;
use timerdb::store::embedded::EmbeddedStore;
use timerdb::store::{StoreOptions, TimerStore};
use timerdb::timer::{Timer, TimerSpec, now_ms};

/// A scheduler on `store` owning every slot, firing into `sink`.
async fn run_all_slots(
    store: &Arc<dyn TimerStore>,
    sink: Arc<FlakySink>,
    config: SchedulerConfig,
) -> Arc<Scheduler> {
    let scheduler = Scheduler::new(store.clone(), sink, config);
    scheduler
        .assign(vec![store.layout().all_slots()])
        .await
        .unwrap();
    scheduler
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deliveries_are_retried_without_blocking_others() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn TimerStore> = Arc::new(
        EmbeddedStore::open(dir.path(), StoreOptions::default())
            .await
            .unwrap(),
    );
    let sink = FlakySink::failing(3);
    let scheduler = run_all_slots(
        &store,
        sink.clone(),
        SchedulerConfig {
            retry_min: Duration::from_millis(300),
            retry_max: Duration::from_secs(2),
            ..SchedulerConfig::default()
        },
    )
    .await;

    let now = now_ms();
    let specs: Vec<TimerSpec> = (0..40)
        .map(|i| {
            spec(
                now + 100 + i * 10,
                if i % 4 == 0 { "flaky" } else { "good" },
            )
        })
        .collect();
    let inserted = insert_ok(&*store, &specs).await;
    let timers: Vec<Timer> = inserted
        .iter()
        .zip(&specs)
        .map(|(i, s)| Timer {
            id: i.id,
            created_ms: now,
            spec: s.clone(),
        })
        .collect();
    scheduler.hand_off(timers.clone(), None);

    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.delivered.lock().unwrap().len() < timers.len() {
        assert!(Instant::now() < deadline, "not all timers were delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = sink.delivered.lock().unwrap().clone();
    assert_eq!(
        delivered.len(),
        timers.len(),
        "each timer delivered exactly once"
    );
    let attempts = sink.attempts.lock().unwrap().clone();
    let mut last_good = 0;
    let mut first_flaky = u64::MAX;
    for (t, fired_at) in &delivered {
        assert!(*fired_at >= t.spec.fire_at_ms, "never early");
        let n = attempts[&t.id.to_string()];
        if t.spec.topic == "flaky" {
            assert_eq!(n, 4, "three refusals, then delivered");
            first_flaky = first_flaky.min(*fired_at);
        } else {
            assert_eq!(n, 1);
            last_good = last_good.max(*fired_at);
        }
    }
    // The failing timers (backoff 300 + 600 + 1200 ms, so ~2 s late) did not hold the good
    // ones (all due within 0.5 s) back.
    assert!(
        last_good < first_flaky,
        "good timers were not held back by failing ones"
    );
    scheduler.shutdown().await;
    store.close().await.unwrap();
}

/// A cancel whose durable write fails while the timer's bucket is being read: the timer
/// was admitted under the cancel's marker, and must fire as if no cancel had been asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cancel_during_the_load_leaves_the_timer_to_fire() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn TimerStore> = Arc::new(
        EmbeddedStore::open(dir.path(), StoreOptions::default())
            .await
            .unwrap(),
    );
    let sink = FlakySink::failing(0);
    let scheduler = run_all_slots(&store, sink.clone(), SchedulerConfig::default()).await;
    // Beyond the 2 s look-ahead: not in memory when the cancel begins.
    let fire_at = now_ms() + 4000;
    let id = insert_ok(&*store, &[spec(fire_at, "good")]).await[0].id;
    assert!(!scheduler.is_loaded(id));
    assert_eq!(
        scheduler.begin_cancel(id, false).await.unwrap(),
        Some(timerdb::scheduler::CancelProbe::Proceed)
    );
    // The durable cancel is slow: its bucket is read meanwhile...
    let deadline = Instant::now() + Duration::from_secs(10);
    while !scheduler.is_loaded(id) {
        assert!(Instant::now() < deadline, "bucket never loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...and then it fails.
    scheduler.end_cancel(id, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.delivered.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the timer whose cancel failed never fired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered = sink.delivered.lock().unwrap().clone();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].0.id, id);
    assert!(delivered[0].1 >= fire_at, "never early");
    scheduler.shutdown().await;
    store.close().await.unwrap();
}

/// Loading stops at the byte budget, not only at the timer count: 24 timers of 100 KB,
/// one per bucket, all inside the look-ahead; with 350 KB allowed, memory never holds
/// much more than that (one bucket past the budget at most), and every timer still fires
/// as the earlier ones free room. Without the byte budget all 2.4 MB were loaded at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_pauses_at_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn TimerStore> = Arc::new(
        EmbeddedStore::open(dir.path(), StoreOptions::default())
            .await
            .unwrap(),
    );
    let l = store.layout();
    store
        .set_low_water_mark(l.all_slots(), l.bucket_start(now_ms()))
        .await
        .unwrap();
    let now = now_ms();
    let specs: Vec<TimerSpec> = (0..24u64)
        .map(|i| TimerSpec {
            payload: vec![7u8; 100_000].into(),
            ..spec(now + 1500 + i * 250, "big")
        })
        .collect();
    insert_ok(&*store, &specs).await;
    let sink = FlakySink::failing(0);
    let budget = 350_000;
    let scheduler = run_all_slots(
        &store,
        sink.clone(),
        SchedulerConfig {
            lookahead: Duration::from_secs(60),
            max_in_memory_bytes: budget,
            ..SchedulerConfig::default()
        },
    )
    .await;
    let started = Instant::now();
    let mut most = 0;
    while sink.delivered.lock().unwrap().len() < specs.len() {
        assert!(started.elapsed() < Duration::from_secs(30), "not all fired");
        most = most.max(scheduler.in_memory_bytes());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(most > 0, "the scheduler loaded timers");
    // The budget, plus the bucket (several timers of 250 ms apart share a 1 s bucket)
    // whose load began just under it.
    assert!(most <= budget + 5 * 101_000, "held {most} bytes");
    scheduler.shutdown().await;
}

/// A bucket holding a row that cannot be decoded: the readable timer fires, the bucket is
/// settled, but it is not deleted, so the unreadable row is still in the store for an
/// operator (a row of a newer build read after a rollback is not destroyed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_with_an_unreadable_row_is_kept_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let fire = now_ms() + 1500;
    let ids = {
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default())
            .await
            .unwrap();
        let l = store.layout();
        store
            .set_low_water_mark(l.all_slots(), l.bucket_start(now_ms()))
            .await
            .unwrap();
        let ids = insert_ok(&store, &[spec(fire, "good"), spec(fire, "bad")]).await;
        store.close().await.unwrap();
        ids
    };
    common::corrupt_embedded_row(dir.path(), ids[1].id, &[0xff, 0xff, 0x01]);
    let store: Arc<dyn TimerStore> = Arc::new(
        EmbeddedStore::open(dir.path(), StoreOptions::default())
            .await
            .unwrap(),
    );
    let sink = FlakySink::failing(0);
    let scheduler = run_all_slots(
        &store,
        sink.clone(),
        SchedulerConfig {
            grace: Duration::from_millis(200),
            ..SchedulerConfig::default()
        },
    )
    .await;
    let started = Instant::now();
    while sink.delivered.lock().unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(20), "nothing fired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the bucket's end and grace: a readable bucket would have been deleted by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    scheduler.shutdown().await;
    store.close().await.unwrap();
    drop(scheduler);
    drop(store);
    let delivered: Vec<_> = sink
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| t.id)
        .collect();
    assert_eq!(delivered, vec![ids[0].id]);
    assert!(
        common::embedded_row(dir.path(), ids[1].id).await.is_some(),
        "the unreadable row was deleted"
    );
}

/// One bucket larger than the memory limit ("everything at midnight"): it is read a page
/// at a time, so memory holds at most the limit plus a page, and every timer still fires.
/// Before, the loader read the whole bucket into memory at once (12,000 held of a 5,000
/// limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_larger_than_the_memory_limit_is_read_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn TimerStore> = Arc::new(
        EmbeddedStore::open(dir.path(), StoreOptions::default())
            .await
            .unwrap(),
    );
    // As a node that ran before: its range starts from here, whatever the inserts cost.
    let l = store.layout();
    store
        .set_low_water_mark(l.all_slots(), l.bucket_start(now_ms()))
        .await
        .unwrap();
    let fire = now_ms() + 3000;
    for _ in 0..6 {
        let specs: Vec<TimerSpec> = (0..2_000).map(|_| spec(fire, "midnight")).collect();
        insert_ok(&*store, &specs).await;
    }
    let sink = FlakySink::failing(0);
    let (limit, page) = (5_000, 2_000);
    let scheduler = run_all_slots(
        &store,
        sink.clone(),
        SchedulerConfig {
            max_in_memory: limit,
            load_page_rows: page,
            ..SchedulerConfig::default()
        },
    )
    .await;
    let started = Instant::now();
    let mut most = 0;
    while sink.delivered.lock().unwrap().len() < 12_000 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} fired",
            sink.delivered.lock().unwrap().len()
        );
        most = most.max(scheduler.in_memory());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The limit plus one page at most.
    assert!(most <= limit + page, "held {most} timers at once");
    assert!(most > 0);
    scheduler.shutdown().await;
}

/// Delivers everything; once `lapse_after` timers were delivered, the lease it shares with
/// the scheduler's authority lapses (a cluster member cut off from its quorum, or the last
/// members of a cluster being stopped).
struct LapsingSink {
    lapse_after: usize,
    lease: Arc<std::sync::atomic::AtomicBool>,
    delivered: Mutex<Vec<Timer>>,
}

#[async_trait]
impl Sink for LapsingSink {
    async fn deliver(&self, batch: &[Timer], _fired_at_ms: u64) -> Vec<Delivery> {
        let mut delivered = self.delivered.lock().unwrap();
        delivered.extend(batch.iter().cloned());
        if delivered.len() >= self.lapse_after {
            self.lease.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        batch.iter().map(|_| Delivery::Delivered).collect()
    }

    async fn flush(&self) -> timerdb::Result<()> {
        Ok(())
    }
}

/// A range whose lease lapsed right after its last fires is stopped (the last member of a
/// stopping cluster has no quorum): the progress it records at the stop covers what it
/// fired while the lease held, so after a restart none of it fires again, and covers
/// nothing due after the lease ended, so a timer due later still fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_stopped_after_its_lease_lapsed_records_what_it_fired() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn TimerStore> = Arc::new(
        EmbeddedStore::open(dir.path(), StoreOptions::default())
            .await
            .unwrap(),
    );
    let lease = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let authority = {
        let lease = lease.clone();
        timerdb::scheduler::Authority(Arc::new(move |_, _| {
            lease.load(std::sync::atomic::Ordering::SeqCst)
        }))
    };
    let config = SchedulerConfig {
        authority: Some(authority),
        ..SchedulerConfig::default()
    };
    let now = now_ms();
    let early: Vec<TimerSpec> = (0..20).map(|i| spec(now + 200 + i * 10, "t")).collect();
    let inserted = insert_ok(&*store, &early).await;
    let early: Vec<Timer> = inserted
        .iter()
        .zip(&early)
        .map(|(i, s)| Timer {
            id: i.id,
            created_ms: now,
            spec: s.clone(),
        })
        .collect();
    let sink = Arc::new(LapsingSink {
        lapse_after: early.len(),
        lease: lease.clone(),
        delivered: Mutex::default(),
    });
    let scheduler = Scheduler::new(store.clone(), sink.clone(), config.clone());
    scheduler
        .assign(vec![store.layout().all_slots()])
        .await
        .unwrap();
    scheduler.hand_off(early.clone(), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.delivered.lock().unwrap().len() < early.len() {
        assert!(Instant::now() < deadline, "not all timers were delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Due after the lease ended: never fired here, and the record must not claim it.
    let late_at = now_ms() + 300;
    let late = insert_ok(&*store, &[spec(late_at, "t")]).await[0].id;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !sink.delivered.lock().unwrap().iter().any(|t| t.id == late),
        "nothing fires without a lease"
    );
    scheduler.shutdown().await;

    // The next owner, with a lease.
    lease.store(true, std::sync::atomic::Ordering::SeqCst);
    let next = Arc::new(LapsingSink {
        lapse_after: usize::MAX,
        lease: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        delivered: Mutex::default(),
    });
    let scheduler = Scheduler::new(store.clone(), next.clone(), config);
    scheduler
        .assign(vec![store.layout().all_slots()])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !next.delivered.lock().unwrap().iter().any(|t| t.id == late) {
        assert!(
            Instant::now() < deadline,
            "the timer due after the lease ended never fired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again: Vec<_> = next
        .delivered
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.id != late)
        .map(|t| t.id)
        .collect();
    assert!(
        again.is_empty(),
        "{} of {} timers fired before the lease lapsed fired again after the restart",
        again.len(),
        early.len()
    );
    scheduler.shutdown().await;
    store.close().await.unwrap();
}
