//! The conformance suite every [`TimerStore`] must pass. Each check takes a fresh store
//! from `make` (an empty store with bucket width 1 s and the given idempotency retention).
//! Run it from an integration test of the implementation with
//! [`timer_store_conformance!`](crate::timer_store_conformance), which makes each check a
//! test of its own (one failing check does not hide the others).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Abandoned, CancelOutcome, Inserted, Progress, TimerStore};
use crate::timer::{StoredState, TimerId, TimerSpec, now_ms};

/// A timer spec due at `fire_at_ms`, its content varied by `n` (topic, partition, key,
/// headers, payload length).
pub fn spec(fire_at_ms: u64, n: u32) -> TimerSpec {
    TimerSpec {
        fire_at_ms,
        topic: format!("topic-{n}"),
        partition: (n % 7) as i32,
        key: n.is_multiple_of(2).then(|| Bytes::from(format!("key-{n}"))),
        headers: vec![("h".into(), Bytes::from(vec![n as u8, 0, 255]))],
        payload: Bytes::from(format!("payload-{n}").repeat(1 + n as usize % 5)),
        idempotency_key: None,
    }
}

/// Stores `specs`; panics if the call or any item fails.
pub async fn insert_ok(store: &dyn TimerStore, specs: &[TimerSpec]) -> Vec<Inserted> {
    store
        .insert(specs, &super::Homing::any())
        .await
        .expect("insert")
        .into_iter()
        .map(|r| r.expect("insert item"))
        .collect()
}

/// One `#[tokio::test]` per conformance check. `$make` is an async function taking the
/// idempotency retention (`Duration`) and returning `Option<Arc<dyn TimerStore>>`: a new,
/// empty store, or `None` to skip (a service that is not configured; it should panic
/// under `CI=true` instead).
#[macro_export]
macro_rules! timer_store_conformance {
    ($make:path) => {
        $crate::timer_store_conformance!(@checks $make;
            insert_then_get_round_trips: 86_400,
            batch_insert_keeps_order_and_buckets: 86_400,
            past_and_near_timers_go_to_a_future_bucket: 86_400,
            load_bucket_returns_exactly_its_slots: 86_400,
            pages_cover_a_bucket_once: 86_400,
            next_bucket_skips_empty_stretches: 86_400,
            delete_bucket_removes_only_that_bucket: 86_400,
            delete_bucket_of_named_rows_keeps_the_others: 86_400,
            cancel_is_durable_and_idempotent: 86_400,
            idempotency_key_returns_the_first_id: 86_400,
            idempotency_key_expires_after_retention: 1,
            an_abandoned_timer_never_fires_and_frees_its_key: 86_400,
            a_confirmed_key_keeps_its_timer_from_a_withdraw: 86_400,
            low_water_mark_is_the_minimum_over_slots: 86_400,
            a_newer_claim_fences_the_older_owner: 86_400,
            progress_is_kept_per_range: 86_400,
        );
    };
    (@checks $make:path; $($check:ident: $secs:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(store) = $make(::std::time::Duration::from_secs($secs)).await else {
                    return;
                };
                $crate::store::conformance::$check(store).await;
            }
        )*
    };
}

/// A stored timer reads back exactly; an unknown id reads as absent.
pub async fn insert_then_get_round_trips(store: Arc<dyn TimerStore>) {
    let fire = now_ms() + 60_000;
    let s = spec(fire, 4);
    let ids = insert_ok(&*store, std::slice::from_ref(&s)).await;
    assert_eq!(ids.len(), 1);
    assert!(ids[0].created);
    let got = store.get(ids[0].id).await.unwrap().expect("stored timer");
    assert_eq!(got.timer.spec, s);
    assert_eq!(got.timer.id, ids[0].id);
    assert_eq!(got.state, StoredState::Pending);
    let mut other = ids[0].id;
    other.rand ^= 1;
    assert!(store.get(other).await.unwrap().is_none());
}

/// A batch returns one distinct id per item, in order, each in its fire time's bucket.
pub async fn batch_insert_keeps_order_and_buckets(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let base = now_ms() + 120_000;
    let specs: Vec<TimerSpec> = (0..500).map(|n| spec(base + n as u64 * 37, n)).collect();
    let ids = insert_ok(&*store, &specs).await;
    assert_eq!(ids.len(), specs.len());
    let mut seen = std::collections::HashSet::new();
    for (i, s) in ids.iter().zip(&specs) {
        assert!(i.created);
        assert!(seen.insert(i.id));
        assert_eq!(i.id.bucket_ms, l.bucket_start(s.fire_at_ms));
        assert_eq!(store.get(i.id).await.unwrap().unwrap().timer.spec, *s);
    }
}

/// Past and immediate timers are stored in a bucket that has not started yet, so they
/// can never land in a bucket the scheduler may already have deleted.
pub async fn past_and_near_timers_go_to_a_future_bucket(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let before = now_ms();
    let ids = insert_ok(
        &*store,
        &[spec(0, 1), spec(before, 2), spec(before - 3_600_000, 3)],
    )
    .await;
    for i in ids {
        assert!(i.id.bucket_ms > l.bucket_start(before), "{:?}", i.id);
        assert!(i.id.bucket_ms <= l.bucket_start(now_ms()) + l.bucket_ms);
        let got = store.get(i.id).await.unwrap().unwrap();
        assert!(
            got.timer.spec.fire_at_ms <= before,
            "fire time is kept as requested"
        );
    }
}

/// Loading a bucket for a slot range returns its pending timers of those slots only,
/// and counts (not returns) cancelled ones.
pub async fn load_bucket_returns_exactly_its_slots(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let fire = l.bucket_start(now_ms() + 300_000) + 10;
    let specs: Vec<TimerSpec> = (0..300).map(|n| spec(fire + n as u64 % 900, n)).collect();
    let ids = insert_ok(&*store, &specs).await;
    let cancelled = ids[0].id;
    assert_eq!(
        store.cancel(cancelled).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let bucket = l.bucket_start(fire);
    let all = store.load_bucket(l.all_slots(), bucket).await.unwrap();
    assert_eq!(all.timers.len(), 299);
    assert_eq!(all.cancelled, vec![cancelled]);
    let half = crate::timer::SlotRange {
        first: 0,
        last: l.slots / 2 - 1,
    };
    let lower = store.load_bucket(half, bucket).await.unwrap();
    let expected = ids[1..]
        .iter()
        .filter(|i| half.contains(l.slot_of(i.id.rand)))
        .count();
    assert_eq!(lower.timers.len(), expected);
    assert!(
        lower
            .timers
            .iter()
            .all(|t| half.contains(l.slot_of(t.id.rand)))
    );
    assert!(expected > 100 && expected < 200, "slots spread: {expected}");
    let next = store
        .load_bucket(l.all_slots(), bucket + l.bucket_ms)
        .await
        .unwrap();
    assert!(next.timers.is_empty());
}

/// `next_bucket` finds the next bucket with timers of the range within the bounds, or none.
pub async fn next_bucket_skips_empty_stretches(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let all = l.all_slots();
    let start = l.bucket_start(now_ms() + 600_000);
    let end = start + 7_200_000;
    assert_eq!(store.next_bucket(all, start, end).await.unwrap(), None);
    let far = start + 50 * l.bucket_ms;
    let ids = insert_ok(&*store, &[spec(far + 5, 1)]).await;
    let found = store.next_bucket(all, start, end).await.unwrap();
    assert!(found.is_some_and(|b| b >= start && b <= far), "{found:?}");
    // Beyond `until` nothing is reported.
    let before = store
        .next_bucket(all, start, far - l.bucket_ms)
        .await
        .unwrap();
    assert_eq!(before, None);
    // A range holding the timer's slot finds it too, never later than its bucket.
    let slot = l.slot_of(ids[0].id.rand);
    let r = crate::timer::SlotRange {
        first: slot,
        last: slot,
    };
    let found = store.next_bucket(r, start, end).await.unwrap();
    assert!(found.is_some_and(|b| b <= far), "{found:?}");
    let after = store
        .next_bucket(all, far + l.bucket_ms, end)
        .await
        .unwrap();
    assert_eq!(after, None);
}

/// Deleting a bucket removes its rows (pending or cancelled) and nothing else.
pub async fn delete_bucket_removes_only_that_bucket(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let b = l.bucket_start(now_ms() + 900_000);
    let ids = insert_ok(
        &*store,
        &[spec(b + 1, 1), spec(b + 2, 2), spec(b + l.bucket_ms + 1, 3)],
    )
    .await;
    store.cancel(ids[1].id).await.unwrap();
    store.delete_bucket(l.all_slots(), b, None).await.unwrap();
    assert!(store.get(ids[0].id).await.unwrap().is_none());
    assert!(store.get(ids[1].id).await.unwrap().is_none());
    assert!(store.get(ids[2].id).await.unwrap().is_some());
    let loaded = store.load_bucket(l.all_slots(), b).await.unwrap();
    assert!(loaded.timers.is_empty() && loaded.cancelled.is_empty());

    // Deleting for a slot range leaves the other slots' rows of the bucket in place.
    let b2 = b + 2 * l.bucket_ms;
    let specs: Vec<TimerSpec> = (0..200u32)
        .map(|n| spec(b2 + 1 + u64::from(n) % 900, n))
        .collect();
    let ids = insert_ok(&*store, &specs).await;
    let lower = crate::timer::SlotRange {
        first: 0,
        last: l.slots / 2 - 1,
    };
    store.delete_bucket(lower, b2, None).await.unwrap();
    for i in &ids {
        let kept = store.get(i.id).await.unwrap().is_some();
        assert_eq!(kept, !lower.contains(l.slot_of(i.id.rand)), "{}", i.id);
    }
}

/// Deleting only the rows a range read leaves a row written after that read (by another
/// member) where its owner finds it by id.
pub async fn delete_bucket_of_named_rows_keeps_the_others(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let b = l.bucket_start(now_ms() + 900_000);
    let specs: Vec<TimerSpec> = (0..100u32)
        .map(|n| spec(b + 1 + u64::from(n) % 900, n))
        .collect();
    let ids = insert_ok(&*store, &specs).await;
    store.cancel(ids[0].id).await.unwrap();
    let loaded = store.load_bucket(l.all_slots(), b).await.unwrap();
    let mut read: Vec<TimerId> = loaded.timers.iter().map(|t| t.id).collect();
    read.extend(&loaded.cancelled);
    assert_eq!(
        read.len(),
        100,
        "every row is read, the cancelled one named"
    );
    // Written after the read: not named by the delete.
    let late = insert_ok(&*store, &[spec(b + 500, 1_000)]).await[0].id;
    assert_eq!(late.bucket_ms, b);
    // A row of the next bucket named by mistake is not touched.
    let next = insert_ok(&*store, &[spec(b + l.bucket_ms + 1, 1_001)]).await[0].id;
    read.push(next);
    store
        .delete_bucket(l.all_slots(), b, Some(&read))
        .await
        .unwrap();
    for i in &ids {
        assert!(store.get(i.id).await.unwrap().is_none(), "{} deleted", i.id);
    }
    let kept = store.get(late).await.unwrap().expect("the late row stays");
    assert_eq!(kept.state, StoredState::Pending);
    assert!(store.get(next).await.unwrap().is_some());
}

/// Cancel marks the row, reports repeats and unknown ids.
pub async fn cancel_is_durable_and_idempotent(store: Arc<dyn TimerStore>) {
    let ids = insert_ok(&*store, &[spec(now_ms() + 60_000, 1)]).await;
    let id = ids[0].id;
    assert_eq!(store.cancel(id).await.unwrap(), CancelOutcome::Cancelled);
    assert_eq!(
        store.cancel(id).await.unwrap(),
        CancelOutcome::AlreadyCancelled
    );
    assert_eq!(
        store.get(id).await.unwrap().unwrap().state,
        StoredState::Cancelled
    );
    let mut unknown = id;
    unknown.rand ^= 0xff;
    assert_eq!(
        store.cancel(unknown).await.unwrap(),
        CancelOutcome::NotFound
    );
}

/// The same idempotency key returns the first id and stores nothing new, also within one
/// batch.
pub async fn idempotency_key_returns_the_first_id(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let fire = now_ms() + 60_000;
    let mut a = spec(fire, 1);
    a.idempotency_key = Some("order-42".into());
    let first = insert_ok(&*store, std::slice::from_ref(&a)).await[0];
    assert!(first.created);
    let mut b = spec(fire + 5_000, 2);
    b.idempotency_key = Some("order-42".into());
    let mut c = spec(fire, 3);
    c.idempotency_key = Some("order-43".into());
    let again = insert_ok(&*store, &[b, c.clone(), c]).await;
    assert_eq!(again[0].id, first.id);
    assert!(!again[0].created);
    assert!(again[1].created);
    assert_eq!(again[2].id, again[1].id);
    assert!(!again[2].created);
    let bucket = store
        .load_bucket(l.all_slots(), l.bucket_start(fire + 5_000))
        .await
        .unwrap();
    assert!(bucket.timers.iter().all(|t| t.spec.topic != "topic-2"));
}

/// A withdrawn timer is cancelled and its key stores the timer anew; withdrawing an id its
/// key does not name leaves the key with its holder.
pub async fn an_abandoned_timer_never_fires_and_frees_its_key(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let fire = now_ms() + 60_000;
    let mut a = spec(fire, 1);
    a.idempotency_key = Some("journey-7".into());
    let first = insert_ok(&*store, std::slice::from_ref(&a)).await[0];
    assert_eq!(
        store.abandon(first.id, Some("journey-7")).await.unwrap(),
        Abandoned::Withdrawn
    );
    let got = store.get(first.id).await.unwrap().expect("row kept");
    assert_eq!(got.state, StoredState::Cancelled);
    let again = insert_ok(&*store, std::slice::from_ref(&a)).await[0];
    assert!(again.created, "the key was released");
    assert_ne!(again.id, first.id);
    // The first id no longer holds the key: withdrawing it again changes nothing, and
    // neither can a confirmation of it.
    store.abandon(first.id, Some("journey-7")).await.unwrap();
    assert!(!store.confirm_key("journey-7", first.id).await.unwrap());
    let third = insert_ok(&*store, std::slice::from_ref(&a)).await[0];
    assert_eq!((third.id, third.created), (again.id, false));
    let bucket = store
        .load_bucket(l.all_slots(), l.bucket_start(fire))
        .await
        .unwrap();
    let ids: Vec<_> = bucket.timers.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![again.id], "only the new timer fires");
    // Without a key, only the row is withdrawn.
    let b = insert_ok(&*store, &[spec(fire, 2)]).await[0];
    store.abandon(b.id, None).await.unwrap();
    assert_eq!(
        store.get(b.id).await.unwrap().map(|t| t.state),
        Some(StoredState::Cancelled)
    );
}

/// Once a repeated call confirmed a key's claim, a withdraw of its timer changes nothing:
/// the row stays pending, the key keeps naming it, and its bucket still yields it.
/// Confirming again, or confirming a key nobody holds, is harmless.
pub async fn a_confirmed_key_keeps_its_timer_from_a_withdraw(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let fire = now_ms() + 60_000;
    let mut a = spec(fire, 1);
    a.idempotency_key = Some("cart-9".into());
    let first = insert_ok(&*store, std::slice::from_ref(&a)).await[0];
    assert!(store.confirm_key("cart-9", first.id).await.unwrap());
    assert!(store.confirm_key("cart-9", first.id).await.unwrap());
    assert_eq!(
        store.abandon(first.id, Some("cart-9")).await.unwrap(),
        Abandoned::Kept
    );
    let got = store.get(first.id).await.unwrap().expect("row kept");
    assert_eq!(got.state, StoredState::Pending);
    assert!(
        store.confirm_key("cart-9", first.id).await.unwrap(),
        "a repeat after the withdraw kept the timer is still answered with it"
    );
    let again = insert_ok(&*store, std::slice::from_ref(&a)).await[0];
    assert_eq!((again.id, again.created), (first.id, false));
    let bucket = store
        .load_bucket(l.all_slots(), l.bucket_start(fire))
        .await
        .unwrap();
    let ids: Vec<_> = bucket.timers.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![first.id], "the confirmed timer fires, once");
    assert!(
        !store
            .confirm_key("nobody-holds-this", first.id)
            .await
            .unwrap()
    );
}

/// A slot's marks move under the epoch that claimed it last, and under no older one.
pub async fn a_newer_claim_fences_the_older_owner(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let range = |first, last| crate::timer::SlotRange { first, last };
    let (old, new) = (range(10, 19), range(15, 19));
    let b = l.bucket_start(now_ms()) + 10 * l.bucket_ms;
    store.claim_slots(old, 5).await.unwrap();
    store
        .claim_slots(old, 5)
        .await
        .expect("claiming again is a no-op");
    store.set_low_water_mark_fenced(old, b, 5).await.unwrap();
    assert_eq!(store.low_water_mark(old).await.unwrap(), Some(b));
    // A newer owner takes half of the range.
    store.claim_slots(new, 7).await.unwrap();
    let later = b + 20 * l.bucket_ms;
    match store.set_low_water_mark_fenced(old, later, 5).await {
        Err(crate::Error::Fenced(m)) => {
            assert!(
                m.contains("slot 15 (epoch 7)") && !m.contains("slot 14"),
                "{m}"
            )
        }
        other => panic!("the older owner's mark was not refused: {other:?}"),
    }
    assert_eq!(
        store.low_water_mark(range(10, 14)).await.unwrap(),
        Some(later)
    );
    assert_eq!(store.low_water_mark(new).await.unwrap(), Some(b), "unmoved");
    assert!(matches!(
        store.claim_slots(new, 6).await,
        Err(crate::Error::Fenced(_))
    ));
    store
        .set_low_water_mark_fenced(new, later, 7)
        .await
        .unwrap();
    assert_eq!(store.low_water_mark(new).await.unwrap(), Some(later));
    // A slot nobody claimed takes no fenced mark.
    assert!(matches!(
        store
            .set_low_water_mark_fenced(range(30, 30), later, 1)
            .await,
        Err(crate::Error::Fenced(_))
    ));
}

/// After the retention window (1 s here; CQL TTLs count whole seconds) a key may be used
/// again.
pub async fn idempotency_key_expires_after_retention(store: Arc<dyn TimerStore>) {
    let mut a = spec(now_ms() + 60_000, 1);
    a.idempotency_key = Some("short-lived".into());
    let first = insert_ok(&*store, std::slice::from_ref(&a)).await[0];
    // A confirmed claim expires with its key too.
    let mut b = spec(now_ms() + 60_000, 2);
    b.idempotency_key = Some("short-lived-confirmed".into());
    let first_b = insert_ok(&*store, std::slice::from_ref(&b)).await[0];
    store
        .confirm_key("short-lived-confirmed", first_b.id)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = insert_ok(&*store, &[a, b]).await;
    assert!(second.iter().all(|i| i.created), "{second:?}");
    assert_ne!(first.id, second[0].id);
    assert_ne!(first_b.id, second[1].id);
}

/// Low-water marks are kept per slot and read back as the minimum of a range. A new store
/// has none, or (a store shared by a cluster) the bucket it was opened in for every slot.
pub async fn low_water_mark_is_the_minimum_over_slots(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let all = l.all_slots();
    let fresh = store.low_water_mark(all).await.unwrap();
    assert!(
        fresh.is_none_or(|b| b <= l.bucket_start(now_ms())),
        "a new store's mark {fresh:?} is in the future"
    );
    store.set_low_water_mark(all, 5_000).await.unwrap();
    assert_eq!(store.low_water_mark(all).await.unwrap(), Some(5_000));
    let upper = crate::timer::SlotRange {
        first: l.slots / 2,
        last: l.slots - 1,
    };
    store.set_low_water_mark(upper, 9_000).await.unwrap();
    assert_eq!(store.low_water_mark(all).await.unwrap(), Some(5_000));
    assert_eq!(store.low_water_mark(upper).await.unwrap(), Some(9_000));
}

/// A range's progress reads back exactly, replaced by the next write; a range asking
/// gets every record of a range that overlaps it (a cluster range that split, merged or
/// moved finds what its slots' earlier owners recorded), and no other.
pub async fn progress_is_kept_per_range(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let all = l.all_slots();
    let lower = crate::timer::SlotRange {
        first: 0,
        last: l.slots / 2 - 1,
    };
    let upper = crate::timer::SlotRange {
        first: l.slots / 2,
        last: l.slots - 1,
    };
    assert_eq!(store.progress(all).await.unwrap(), vec![]);
    let ids = insert_ok(&*store, &[spec(now_ms() + 60_000, 1)]).await;
    let p1 = Progress {
        fired_through_ms: 1_700_000_000_123,
        loaded_through: 1_700_000_002_000,
        unconfirmed: vec![ids[0].id],
        delivered_after: vec![],
    };
    store.set_progress(all, &p1).await.unwrap();
    assert_eq!(store.progress(all).await.unwrap(), vec![(all, p1.clone())]);
    assert_eq!(
        store.progress(lower).await.unwrap(),
        vec![(all, p1.clone())]
    );
    let p2 = Progress {
        fired_through_ms: p1.fired_through_ms + 100,
        loaded_through: p1.loaded_through,
        unconfirmed: vec![],
        delivered_after: vec![ids[0].id],
    };
    store.set_progress(all, &p2).await.unwrap();
    assert_eq!(store.progress(all).await.unwrap(), vec![(all, p2.clone())]);
    store.set_progress(lower, &p1).await.unwrap();
    let mut got = store.progress(lower).await.unwrap();
    got.sort_by_key(|(r, _)| (r.first, r.last));
    assert_eq!(got, vec![(lower, p1.clone()), (all, p2.clone())]);
    assert_eq!(store.progress(upper).await.unwrap(), vec![(all, p2)]);
}

/// Read a page at a time (of 7 rows), a bucket's rows of a slot range come back each
/// exactly once, the same as one `load_bucket`, and the last page says there is no more.
pub async fn pages_cover_a_bucket_once(store: Arc<dyn TimerStore>) {
    let l = store.layout();
    let fire = l.bucket_start(now_ms() + 120_000) + 10;
    let specs: Vec<TimerSpec> = (0..250u32)
        .map(|i| spec(fire + u64::from(i % 900), i))
        .collect();
    let ids = insert_ok(&*store, &specs).await;
    let bucket = ids[0].id.bucket_ms;
    assert!(ids.iter().all(|i| i.id.bucket_ms == bucket));
    let half = crate::timer::SlotRange {
        first: 0,
        last: l.slots / 2 - 1,
    };
    for range in [l.all_slots(), half] {
        let mut seen = std::collections::HashSet::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = store.load_page(range, bucket, after, 7).await.unwrap();
            assert!(page.rows.timers.len() <= 7);
            for t in page.rows.timers {
                assert!(range.contains(l.slot_of(t.id.rand)));
                assert!(seen.insert(t.id), "{} came twice", t.id);
            }
            pages += 1;
            assert!(pages < 1000, "pages never end");
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let whole: std::collections::HashSet<_> = store
            .load_bucket(range, bucket)
            .await
            .unwrap()
            .timers
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(seen, whole);
        let want = ids
            .iter()
            .filter(|i| range.contains(l.slot_of(i.id.rand)))
            .count();
        assert_eq!(seen.len(), want);
        assert!(pages > 1);
    }
}
