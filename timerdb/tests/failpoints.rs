//! Failures and crashes at the exact places where an ordering matters, through the real
//! binary built with the `failpoints` feature (`FAILPOINTS` in the node's environment):
//! nothing acknowledged is lost, no cancelled timer fires, nothing fires twice without
//! a crash. Run with `cargo test -p timerdb --features failpoints --test failpoints`.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Node, fire_counts, now_ms, request};
use timerdb_proto::v1;
use tonic::Code;

/// Sends batches of 20 timers due 0.5–3 s out until a call fails (the node died) or
/// `calls` succeeded; returns the acknowledged (id, fire_at) and the payload prefix of the
/// call that failed.
async fn stream_until_failure(node: &Node, calls: u64) -> (Vec<(String, u64)>, Option<String>) {
    let mut client = node.client().await;
    let mut acked = Vec::new();
    for seq in 0..calls {
        let now = now_ms();
        let timers: Vec<v1::SetTimeoutRequest> = (0..20)
            .map(|i| {
                request(
                    now + 500 + (i * 137 + seq * 61) % 2500,
                    "fp",
                    0,
                    &format!("{seq}-{i}"),
                )
            })
            .collect();
        match common::send_batch(&mut client, timers).await {
            Ok(got) => acked.extend(got),
            Err(_) => return (acked, Some(format!("{seq}-"))),
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    (acked, None)
}

/// Every acknowledged timer fired, none early; anything else that fired came from the
/// call cut off by the crash.
async fn assert_all_fired(node: &Node, acked: &[(String, u64)], cut_off: Option<&str>) {
    let ids: Vec<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    let lines = node.wait_fired(&ids, Duration::from_secs(60)).await;
    let due: HashMap<&str, u64> = acked.iter().map(|(id, f)| (id.as_str(), *f)).collect();
    for l in &lines {
        match due.get(l.timer_id.as_str()) {
            Some(f) => assert_eq!(l.fire_at_ms, *f),
            None => {
                let payload = String::from_utf8(common::b64(&l.payload)).unwrap();
                assert!(
                    cut_off.is_some_and(|c| payload.starts_with(c)),
                    "only acknowledged timers (or the cut-off call's) fire: {l:?}"
                );
            }
        }
        assert!(l.fired_at_ms >= l.fire_at_ms, "fired early: {l:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_the_write_then_an_idempotent_retry_fires_once() {
    let dir = tempfile::tempdir().unwrap();
    // The first call's write is durable, then the call fails before its hand-off.
    let node = common::start_with_failpoints(dir.path(), None, "api.after_store=1*return").await;
    let mut client = node.client().await;
    let r = v1::SetTimeoutRequest {
        idempotency_key: "order-7".into(),
        ..request(now_ms() + 800, "fp", 0, "once")
    };
    let err = client.set_timeout(r.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let id = client.set_timeout(r).await.unwrap().into_inner().timer_id;
    node.wait_fired(std::slice::from_ref(&id), Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counts = fire_counts(&node.fired());
    assert_eq!(counts.get(&id), Some(&1));
    assert_eq!(counts.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_write_and_the_hand_off_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut node =
        common::start_with_failpoints(dir.path(), None, "api.after_store=40*off->return(abort)")
            .await;
    let (acked, cut_off) = stream_until_failure(&node, 1000).await;
    assert_eq!(
        acked.len(),
        40 * 20,
        "40 calls acknowledged before the crash"
    );
    let status = node.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "the kill-point ended the process");
    node.env.clear();
    node.restart().await;
    assert_all_fired(&node, &acked, cut_off.as_deref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_commit_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = common::start_with_failpoints(
        dir.path(),
        None,
        "embedded.before_commit=60*off->return(abort)",
    )
    .await;
    let (acked, cut_off) = stream_until_failure(&node, 1000).await;
    assert!(!acked.is_empty());
    node.wait_exit(Duration::from_secs(10)).await;
    node.env.clear();
    node.restart().await;
    assert_all_fired(&node, &acked, cut_off.as_deref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_acknowledges_nothing_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path(), &[]).await;
    let mut client = node.client().await;
    let before = client
        .set_timeout(request(now_ms() + 1500, "fp", 0, "before"))
        .await
        .unwrap()
        .into_inner()
        .timer_id;
    node.terminate();
    // Every commit fails: the call gets UNAVAILABLE and no id.
    node.env = vec![("FAILPOINTS".into(), "embedded.before_commit=return".into())];
    node.restart().await;
    let mut client = node.client().await;
    let err = client
        .set_timeout(request(now_ms() + 500, "fp", 0, "refused"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    node.kill9();
    node.env.clear();
    node.restart().await;
    node.wait_fired(std::slice::from_ref(&before), Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fired: Vec<String> = node.fired().into_iter().map(|l| l.timer_id).collect();
    assert_eq!(fired, vec![before], "the refused timer was never stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cancel_write_leaves_the_timer_to_fire() {
    let dir = tempfile::tempdir().unwrap();
    let node =
        common::start_with_failpoints(dir.path(), None, "api.cancel_between_phases=return").await;
    let mut client = node.client().await;
    let now = now_ms();
    // One already in memory, one not yet loaded.
    let mut ids = Vec::new();
    for at in [now + 1000, now + 4000] {
        ids.push(
            client
                .set_timeout(request(at, "fp", 0, "keep"))
                .await
                .unwrap()
                .into_inner()
                .timer_id,
        );
    }
    for id in &ids {
        let err = client
            .cancel_timeout(v1::CancelTimeoutRequest {
                timer_id: id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    node.wait_fired(&ids, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let counts = fire_counts(&node.fired());
    assert!(
        ids.iter().all(|id| counts.get(id) == Some(&1)),
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_abandoned_between_its_phases_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = common::start_with_failpoints(
        dir.path(),
        None,
        "api.cancel_between_phases=return(delay:1500)",
    )
    .await;
    let mut client = node.client().await;
    let fire_at = now_ms() + 3000;
    let id = client
        .set_timeout(request(fire_at, "fp", 0, "cancelled"))
        .await
        .unwrap()
        .into_inner()
        .timer_id;
    // The caller gives up while the cancel sits between its two phases.
    let mut cancel = tonic::Request::new(v1::CancelTimeoutRequest {
        timer_id: id.clone(),
    });
    cancel.set_timeout(Duration::from_millis(200));
    let err = client.cancel_timeout(cancel).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // The cancel was written durably: a restart does not bring the timer back.
    node.terminate();
    node.env.clear();
    node.restart().await;
    let mut client = node.client().await;
    let got = client
        .get_timer(v1::GetTimerRequest {
            timer_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, v1::TimerState::Cancelled as i32);
    tokio::time::sleep(Duration::from_millis(
        fire_at.saturating_sub(now_ms()) + 1500,
    ))
    .await;
    assert!(node.fired().is_empty(), "a cancelled timer fired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_progress_and_low_water_writes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = common::start_with_failpoints(
        dir.path(),
        None,
        "scheduler.before_progress=return;scheduler.before_low_water=return",
    )
    .await;
    let (acked, _) = stream_until_failure(&node, 60).await;
    node.kill9();
    node.env.clear();
    node.restart().await;
    assert_all_fired(&node, &acked, None).await;
}

/// A store that keeps failing bucket deletes is not asked again every 100 ms (nor its
/// failure logged that often): the range backs off, doubling from 200 ms (to at most 5 s
/// with its jitter). Over the first 5 s of failures that is at most 5 attempts for the one
/// bucket; the timer in it fired all the same. (Before: a retry, and a warning, every
/// 100 ms: ~50.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_bucket_delete_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let node =
        common::start_with_failpoints(dir.path(), None, "scheduler.before_delete=return").await;
    let mut client = node.client().await;
    let id = client
        .set_timeout(request(now_ms() + 300, "fp", 0, "backoff"))
        .await
        .unwrap()
        .into_inner()
        .timer_id;
    node.wait_fired(std::slice::from_ref(&id), Duration::from_secs(20))
        .await;
    let failure = "scheduler.delete_bucket failed";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !node.log().contains(failure) {
        assert!(
            std::time::Instant::now() < deadline,
            "the bucket's delete was tried\n{}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let attempts = node.log().matches(failure).count();
    assert!(
        (2..=6).contains(&attempts),
        "{attempts} attempts in the first 5 s of failures\n{}",
        node.log_tail()
    );
    assert_eq!(fire_counts(&node.fired()).get(&id), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_a_progress_write_loses_nothing_and_repeats_little() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = common::start_with_failpoints(
        dir.path(),
        None,
        "scheduler.before_progress=30*off->return(abort)",
    )
    .await;
    let (acked, cut_off) = stream_until_failure(&node, 1000).await;
    let killed_ms = now_ms();
    node.wait_exit(Duration::from_secs(10)).await;
    node.env.clear();
    node.restart().await;
    assert_all_fired(&node, &acked, cut_off.as_deref()).await;
    // Timers confirmed before the last progress record do not come again.
    let lines = node.fired();
    let mut first: HashMap<&str, u64> = HashMap::new();
    let mut twice = HashSet::new();
    for l in &lines {
        if first.insert(l.timer_id.as_str(), l.fired_at_ms).is_some() {
            twice.insert(l.timer_id.as_str());
        }
    }
    for id in twice {
        assert!(
            killed_ms.saturating_sub(first[id]) <= 1500,
            "timer {id} first delivered {} ms before the crash came again",
            killed_ms - first[id]
        );
    }
}

/// A range restarted on a store whose progress record reaches further than the range has
/// read yet (its loader is held back), then stopped: the record it writes must not un-say
/// its predecessor's, or what the predecessor fired fires again at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_stopped_before_it_caught_up_keeps_its_predecessors_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = common::start_with_failpoints(dir.path(), None, "").await;
    let (acked, _) = stream_until_failure(&node, 5).await;
    let ids: Vec<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    node.wait_fired(&ids, Duration::from_secs(30)).await;
    // Stopped well inside the grace before fired buckets are deleted: the rows stay.
    node.terminate();
    node.env = vec![(
        "FAILPOINTS".into(),
        "scheduler.before_load=return(delay:4000)".into(),
    )];
    node.restart().await;
    // Long enough for its periodic progress writes (every 100 ms) and its stop.
    tokio::time::sleep(Duration::from_millis(600)).await;
    node.terminate();
    node.env.clear();
    node.restart().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for l in node.fired() {
        *counts.entry(l.timer_id).or_default() += 1;
    }
    let again: Vec<&String> = ids.iter().filter(|id| counts[*id] > 1).collect();
    assert!(
        again.is_empty(),
        "{} of {} timers fired before two restarts fired again, e.g. {:?}\n{}",
        again.len(),
        ids.len(),
        &again[..again.len().min(3)],
        node.log_tail()
    );
}

/// A cluster member's range in this process (an authority that always grants), on the
/// embedded store, with failpoints set in-process.
mod in_process {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::common::flaky::{FlakySink, spec};
    use timerdb::scheduler::{Adoption, Authority, Scheduler, SchedulerConfig};
    use timerdb::store::conformance::insert_ok;
    use timerdb::store::embedded::EmbeddedStore;
    use timerdb::store::{StoreOptions, TimerStore};
    use timerdb::timer::{Timer, TimerId, now_ms};

    /// An embedded store in `dir`.
    async fn embedded(dir: &tempfile::TempDir) -> Arc<dyn TimerStore> {
        Arc::new(
            EmbeddedStore::open(dir.path(), StoreOptions::default())
                .await
                .unwrap(),
        )
    }

    /// The authority of a cluster member whose lease always holds (ranges act, and record
    /// as a member's do).
    fn always_acting() -> Option<Authority> {
        Some(Authority(Arc::new(|_, _| true)))
    }

    /// A timer adopted into a bucket while the range's delete of that bucket is under way
    /// (held 1.5 s), whose delivery is still being retried when the delete completes, stays
    /// in memory and is delivered. (Before, the delete's completion dropped the whole
    /// bucket from memory and the timer never fired.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timer_adopted_while_its_bucket_is_deleted_still_fires() {
        let dir = tempfile::tempdir().unwrap();
        let store = embedded(&dir).await;
        let config = SchedulerConfig {
            authority: always_acting(),
            grace: Duration::from_millis(100),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_millis(500),
            ..SchedulerConfig::default()
        };
        let sink = FlakySink::failing(4);
        let scheduler = Scheduler::new(store.clone(), sink.clone(), config);
        scheduler
            .assign(vec![store.layout().all_slots()])
            .await
            .unwrap();
        fail::cfg("scheduler.before_delete", "return(delay:1500)").unwrap();
        // Stored and handed off, as a write does (its bucket is inside the look-ahead).
        let (at, created_ms) = (now_ms() + 50, now_ms());
        let first = insert_ok(&*store, &[spec(at, "ok")]).await[0].id;
        scheduler.hand_off(
            vec![Timer {
                id: first,
                created_ms,
                spec: spec(at, "ok"),
            }],
            None,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let delivered = |id: TimerId| {
            sink.delivered
                .lock()
                .unwrap()
                .iter()
                .any(|(t, _)| t.id == id)
        };
        while !delivered(first) {
            assert!(Instant::now() < deadline, "the stored timer never fired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Its bucket's delete begins once the bucket is over (plus 100 ms of grace).
        let bucket_end = first.bucket_ms + store.layout().bucket_ms;
        tokio::time::sleep(Duration::from_millis(
            (bucket_end + 600).saturating_sub(now_ms()),
        ))
        .await;
        let adopted = Timer {
            id: TimerId {
                bucket_ms: first.bucket_ms,
                rand: rand::random(),
            },
            created_ms: first.bucket_ms,
            spec: spec(first.bucket_ms + 10, "flaky"),
        };
        assert_eq!(
            scheduler.adopt(adopted.clone(), false, true).await,
            Some(Adoption::Admitted),
            "adopted while the delete is held"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !delivered(adopted.id) {
            assert!(
                Instant::now() < deadline,
                "the timer adopted during the delete never fired ({} attempts)",
                sink.attempts
                    .lock()
                    .unwrap()
                    .get(&adopted.id.to_string())
                    .unwrap_or(&0)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fail::remove("scheduler.before_delete");
        scheduler.shutdown().await;
        store.close().await.unwrap();
    }

    /// A range whose loader is held up reading a bucket (a slow store) fires a timer a
    /// write handed to it meanwhile in a later bucket, inside the look-ahead, then is given
    /// up. The range that takes the slots next loads that bucket and must not fire the
    /// timer again: the record lists it (its mark speaks only of the buckets the range had
    /// loaded). Before, the next owner fired it a second time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timer_fired_before_its_bucket_was_loaded_does_not_fire_again_after_a_move() {
        let dir = tempfile::tempdir().unwrap();
        let store = embedded(&dir).await;
        let config = SchedulerConfig {
            authority: always_acting(),
            ..SchedulerConfig::default()
        };
        let sink = FlakySink::failing(0);
        let scheduler = Scheduler::new(store.clone(), sink.clone(), config.clone());
        let all = store.layout().all_slots();
        // The bucket the loader is stuck on.
        let stuck = insert_ok(&*store, &[spec(now_ms() + 200, "ok")]).await[0].id;
        fail::cfg("scheduler.before_load", "return(delay:20000)").unwrap();
        scheduler.assign(vec![all]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (at, created_ms) = (now_ms() + 1_500, now_ms());
        let id = insert_ok(&*store, &[spec(at, "ok")]).await[0].id;
        scheduler.hand_off(
            vec![Timer {
                id,
                created_ms,
                spec: spec(at, "ok"),
            }],
            None,
        );
        let deliveries_of = |id: TimerId| {
            sink.delivered
                .lock()
                .unwrap()
                .iter()
                .filter(|(t, _)| t.id == id)
                .count()
        };
        let deliveries = || deliveries_of(id);
        let deadline = Instant::now() + Duration::from_secs(10);
        while deliveries() == 0 {
            assert!(Instant::now() < deadline, "the handed timer never fired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Given up (its record written), then taken by another member's range (another
        // scheduler: nothing remembered in memory), which loads freely.
        scheduler.assign(vec![]).await.unwrap();
        scheduler.shutdown().await;
        fail::remove("scheduler.before_load");
        let next = Scheduler::new(store.clone(), sink.clone(), config);
        next.assign(vec![all]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            deliveries(),
            1,
            "fired again by the range that took the slots next"
        );
        assert_eq!(
            deliveries_of(stuck),
            1,
            "the stuck bucket's timer fires once"
        );
        next.shutdown().await;
        store.close().await.unwrap();
    }
}

/// The Scylla store's two orderings, against the real Cassandra of the test command.
mod scylla {
    use super::*;

    pub(super) fn store_url() -> Option<String> {
        let services = common::services()?;
        Some(format!(
            "scylla://{}/{}",
            services.scylla,
            common::unique("fp")
        ))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn index_rows_without_timer_rows_refuse_the_call_and_harm_nothing() {
        let Some(url) = store_url() else { return };
        let dir = tempfile::tempdir().unwrap();
        let node = common::start_with_failpoints(
            dir.path(),
            Some(url),
            "scylla.between_index_and_rows=1*return",
        )
        .await;
        let mut client = node.client().await;
        let now = now_ms();
        let err = client
            .set_timeout(request(now + 1000, "fp", 0, "refused"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        let id = client
            .set_timeout(request(now + 1000, "fp", 0, "kept"))
            .await
            .unwrap()
            .into_inner()
            .timer_id;
        node.wait_fired(std::slice::from_ref(&id), Duration::from_secs(20))
            .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let fired: Vec<String> = node.fired().into_iter().map(|l| l.timer_id).collect();
        assert_eq!(fired, vec![id]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_between_partition_and_index_delete_loses_nothing() {
        let Some(url) = store_url() else { return };
        let dir = tempfile::tempdir().unwrap();
        let mut node = common::start_with_failpoints(
            dir.path(),
            Some(url),
            "scylla.between_partition_and_index_delete=2*off->return(abort)",
        )
        .await;
        let (acked, cut_off) = stream_until_failure(&node, 400).await;
        node.wait_exit(Duration::from_secs(30)).await;
        node.env.clear();
        node.restart().await;
        assert_all_fired(&node, &acked, cut_off.as_deref()).await;
    }
}

/// Keyed writes on Scylla: the row goes first, then the key's claim.
mod scylla_keys {
    use super::*;

    fn keyed(key: &str, fire_at_ms: u64, payload: &str) -> v1::SetTimeoutRequest {
        v1::SetTimeoutRequest {
            idempotency_key: key.into(),
            ..request(fire_at_ms, "fp", 0, payload)
        }
    }

    /// How many times each payload was delivered.
    fn payload_counts(node: &Node) -> HashMap<String, usize> {
        let mut n = HashMap::new();
        for l in node.fired() {
            *n.entry(String::from_utf8(common::b64(&l.payload)).unwrap())
                .or_default() += 1;
        }
        n
    }

    /// The process dies after the row is written and before the key is claimed; the
    /// caller retries with the key after the restart. The orphan row (its key now held by
    /// the retry's timer) must not fire as well: once, not twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_between_the_row_and_the_key_claim_then_a_retry_fires_once() {
        let Some(url) = scylla::store_url() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let mut node = common::start_with_failpoints(
            dir.path(),
            Some(url),
            "scylla.before_claim=return(abort)",
        )
        .await;
        let r = keyed("crash-key", now_ms() + 2500, "crash-once");
        let mut client = node.client().await;
        assert!(
            client.set_timeout(r.clone()).await.is_err(),
            "the node died in the call"
        );
        node.wait_exit(Duration::from_secs(30)).await;
        node.env.clear();
        node.restart().await;
        let id = node
            .client()
            .await
            .set_timeout(r)
            .await
            .unwrap()
            .into_inner()
            .timer_id;
        node.wait_fired(std::slice::from_ref(&id), Duration::from_secs(30))
            .await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // The orphan row is either claimed for itself when its bucket loads first (the
        // retry then gets its id), or dropped at load because the retry holds the key.
        assert_eq!(payload_counts(&node).get("crash-once"), Some(&1));
    }

    /// A claim applied in the store whose answer is lost: the next attempt finds the key
    /// held by this very timer, so the call succeeds and the timer fires once. Before, the
    /// call failed, the stored and claimed timer was not handed off, and a retry got its id
    /// while its (already loaded) bucket could be deleted without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_whose_answer_is_lost_is_settled_by_trying_again() {
        let Some(url) = scylla::store_url() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let node = common::start_with_failpoints(
            dir.path(),
            Some(url),
            "scylla.claim_answer_lost=1*return->off",
        )
        .await;
        let id = node
            .client()
            .await
            .set_timeout(keyed("lost-answer", now_ms() + 1000, "lost-answer"))
            .await
            .expect("the second attempt settles the claim")
            .into_inner()
            .timer_id;
        node.wait_fired(std::slice::from_ref(&id), Duration::from_secs(20))
            .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(payload_counts(&node).get("lost-answer"), Some(&1));
    }

    /// One of two keys cannot be claimed: the call answers per item (the other timer is
    /// stored and acknowledged, and handed off), and the acknowledged one fires on time.
    /// Before, the whole call failed and nothing was handed off: the stored, claimed timer
    /// fired only if a retry came before its bucket was deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_key_claim_fails_only_its_item() {
        let Some(url) = scylla::store_url() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let node = common::start_with_failpoints(
            dir.path(),
            Some(url),
            // The first claim waits 1.5 s (its bucket is loaded meanwhile), the second fails.
            "scylla.before_claim=1*return(delay:1500)->1*return->off",
        )
        .await;
        let now = now_ms();
        let batch = vec![
            keyed("claim-a", now + 1200, "claim-a"),
            keyed("claim-b", now + 1200, "claim-b"),
        ];
        let mut client = node.client().await;
        let results = client
            .set_timeouts(v1::SetTimeoutsRequest {
                timers: batch.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        let mut acked = Vec::new();
        let mut refused = 0;
        for r in results {
            match r.result {
                Some(v1::set_timeout_result::Result::TimerId(id)) => acked.push(id),
                Some(v1::set_timeout_result::Result::Error(e)) => {
                    assert_eq!(e.code, Code::Unavailable as i32, "{e:?}");
                    assert!(e.message.contains("idempotency key"), "{e:?}");
                    refused += 1;
                }
                None => panic!("no result"),
            }
        }
        assert_eq!((acked.len(), refused), (1, 1));
        // Past the bucket and its grace: the acknowledged timer fired on its own, not
        // because a retry came (before, it fired only from the retry's repeat hand-off,
        // ~6 s late, or never once its bucket was deleted).
        tokio::time::sleep(Duration::from_millis(7000)).await;
        let retry_at = now_ms();
        let again = common::accepted_ids(
            client
                .set_timeouts(v1::SetTimeoutsRequest { timers: batch })
                .await
                .unwrap()
                .into_inner(),
        );
        assert!(
            again.contains(&acked[0]),
            "the key still gives the first id"
        );
        node.wait_fired(&again, Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let first = node
            .fired()
            .into_iter()
            .find(|l| l.timer_id == acked[0])
            .expect("fired");
        assert!(
            first.fired_at_ms < retry_at,
            "{first:?} fired only after the retry"
        );
        let counts = payload_counts(&node);
        assert_eq!(counts.get("claim-a"), Some(&1), "{counts:?}");
        assert_eq!(counts.get("claim-b"), Some(&1), "{counts:?}");
    }
}

/// A write slow between its commit and its hand-off, its caller gone, an idempotent
/// retry acknowledged, then a crash before the slow hand-off: the timer still fires.
/// Two mechanisms each cover it: rule 4 keeps the low-water mark at or before the slow
/// write's bucket (the restart reads it), and the retry's repeat hand-off puts it in
/// memory. Measured: it passes with either one disabled and loses the timer with both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hand_off_then_a_retry_then_a_crash_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut node =
        common::start_with_failpoints(dir.path(), None, "api.after_store=1*return(delay:7000)")
            .await;
    let mut client = node.client().await;
    let started = std::time::Instant::now();
    let r = v1::SetTimeoutRequest {
        idempotency_key: "slow-1".into(),
        ..request(now_ms() + 300, "fp", 0, "slow")
    };
    let mut first = tonic::Request::new(r.clone());
    first.set_timeout(Duration::from_millis(100));
    assert!(
        client.set_timeout(first).await.is_err(),
        "the caller gave up"
    );
    // Past the bucket's end plus grace: it would have been deleted by now.
    tokio::time::sleep(Duration::from_millis(5000).saturating_sub(started.elapsed())).await;
    let id = client.set_timeout(r).await.unwrap().into_inner().timer_id;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < Duration::from_millis(6500),
        "the slow hand-off must still be pending at the crash"
    );
    node.kill9();
    node.env.clear();
    node.restart().await;
    node.wait_fired(std::slice::from_ref(&id), Duration::from_secs(20))
        .await;
}

/// Cluster members (three real processes, `deploy/local/cluster`).
mod cluster {
    use std::time::Duration;

    use timerdb_client::{Client, NewTimer};

    use super::common::kafka::{collect, consumer, create_topic};
    use super::common::local_cluster::{LocalCluster, ONE_AT_A_TIME};
    use super::common::{Services, now_ms, services, unique};

    /// A settled three-member cluster whose node 1 runs with `failpoints`.
    async fn with_node_1_failing(failpoints: &str) -> LocalCluster {
        with_node_1_failing_among("", failpoints).await
    }

    /// [`with_node_1_failing`], every member also running with `everywhere`.
    async fn with_node_1_failing_among(everywhere: &str, failpoints: &str) -> LocalCluster {
        let env: &[(&str, &str)] = if everywhere.is_empty() {
            &[]
        } else {
            &[("FAILPOINTS", everywhere)]
        };
        let c = LocalCluster::up_env(3, env);
        c.wait_settled(1, 3).await;
        c.run(&["stop", "1"]);
        let both = [everywhere, failpoints]
            .into_iter()
            .filter(|f| !f.is_empty())
            .collect::<Vec<_>>()
            .join(";");
        c.run_env(&["start", "1"], &[("FAILPOINTS", &both)]);
        c.wait_stable(1, 3).await;
        c
    }

    /// Members that delete a fired bucket's whole partitions, as earlier versions did (a
    /// rolling upgrade meets them): a row that landed after the owner read the bucket goes
    /// with it, unfired.
    const PARTITION_DELETES: &str = "scheduler.delete_whole_partitions=return";

    /// `timerdb admin --server <node 2> ARGS`, which must succeed.
    fn admin(c: &LocalCluster, args: &[&str]) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_timerdb"))
            .args(["admin", "--server", &c.nodes[1]])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Sends `timer` to node 1, drains node 1 half a second later (while the call is held
    /// by its failpoint), and returns the call's answer for the timer, which must be the
    /// UNAVAILABLE of a withdrawn row.
    async fn withdrawn_during_a_drain(c: &LocalCluster, timer: &NewTimer) -> tonic::Status {
        let addr = c.nodes[0].clone();
        let first = timer.clone();
        let call = tokio::spawn(async move {
            let mut client = Client::connect(&addr).await.unwrap();
            client.set_timeouts(vec![first]).await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin(c, &["drain", "1", "--no-wait"]);
        let mut results = call.await.unwrap().expect("the call itself answers");
        let e = results.remove(0).expect_err(&format!(
            "acknowledged a timer whose range moved away\n{}",
            c.logs()
        ));
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("withdrawn"), "{e:?}\n{}", c.logs());
        e
    }

    /// Sends `timer` to node 1 (whose failpoints hold its write), gives up on the call
    /// after 1.5 s as a caller with that deadline would, and drains node 1 half a second
    /// in; returns when the call began. The write goes on without its caller.
    async fn abandoned_during_a_drain(c: &LocalCluster, timer: &NewTimer) -> std::time::Instant {
        let addr = c.nodes[0].clone();
        let first = timer.clone();
        let started = std::time::Instant::now();
        let abandoned = tokio::time::timeout(Duration::from_millis(1_500), async move {
            let mut client = Client::connect(&addr).await.unwrap();
            client.set_timeouts(vec![first]).await
        });
        let drain = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            admin(c, &["drain", "1", "--no-wait"]);
        };
        let (first_answer, ()) = tokio::join!(abandoned, drain);
        assert!(first_answer.is_err(), "the first call is still under way");
        started
    }

    /// Sends `timer` to the member at `addr` until it is acknowledged (a member whose
    /// ranges are still starting refuses near-term timers for a moment); its id.
    async fn retry_until_acknowledged(addr: &str, timer: &NewTimer) -> String {
        let mut client = Client::connect(addr).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            match client
                .set_timeouts(vec![timer.clone()])
                .await
                .unwrap()
                .remove(0)
            {
                Ok(id) => return id,
                Err(e)
                    if e.code() == tonic::Code::Unavailable
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("the retry is acknowledged: {e:?}"),
            }
        }
    }

    /// A member stores a near-term timer in a slot of its own, then its range moves away
    /// (a drain) while the write is still under way, and the new owner cannot be asked to
    /// adopt it (failpoint): the timer is not acknowledged, since its row may land after
    /// the next owner read that bucket and nothing here fires it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_range_moved_away_during_the_write_acknowledges_nothing() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_cluster");
        create_topic(&s.kafka, &topic, 1).await;
        let c =
            with_node_1_failing("api.after_store=1*return(delay:3000);api.adopt=1*return").await;
        let addr = c.nodes[0].clone();
        let call = tokio::spawn(async move {
            let mut client = Client::connect(&addr).await.unwrap();
            client
                .set_timeouts(vec![NewTimer::new(now_ms() + 2_000, &topic, 0)])
                .await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin(&c, &["drain", "1", "--no-wait"]);
        let results = call.await.unwrap().expect("the call itself answers");
        let e = results[0]
            .as_ref()
            .expect_err("acknowledged a timer whose range moved away");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("moved away"), "{e:?}");
    }

    /// The same, slower: the row lands (3 s after the call) after the slot's new owner read
    /// its bucket, so no range will ever fire it (the owner cannot be asked to adopt it,
    /// by a failpoint). The caller is told UNAVAILABLE and
    /// retries with the same idempotency key on another member: the retry must store the
    /// timer anew (the first row was withdrawn), not answer with the row nobody reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_after_the_range_moved_during_a_slow_write_fires() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_retry");
        create_topic(&s.kafka, &topic, 1).await;
        let c =
            with_node_1_failing("api.before_store=1*return(delay:3000);api.adopt=1*return").await;
        let consumer = consumer(&s.kafka, &[&topic]);
        let fire_at = now_ms() + 2_500;
        let timer = NewTimer::new(fire_at, &topic, 0)
            .payload("retried")
            .idempotency_key("retry-1");
        let e = withdrawn_during_a_drain(&c, &timer).await;
        // The retry goes to the member that does not own the first row's slot (the owner
        // would find the row and hand it to its range again, hiding the loss).
        let first_id = e
            .message()
            .split_whitespace()
            .find(|w| w.len() == 32 && w.chars().all(|c| c.is_ascii_hexdigit()))
            .unwrap_or_else(|| panic!("the message names the timer: {e:?}"))
            .to_string();
        let map = Client::connect(&c.nodes[1])
            .await
            .unwrap()
            .cluster_map()
            .await
            .unwrap();
        let owner = map
            .owner_address(&first_id)
            .unwrap_or_else(|| panic!("timer {first_id} has an owner in {map:?}"))
            .to_string();
        let other = c.nodes[1..]
            .iter()
            .find(|a| **a != owner)
            .expect("a member that does not own the slot");
        let id = retry_until_acknowledged(other, &timer).await;
        let got = collect(&consumer, Duration::from_secs(30), |m| {
            m.iter().any(|r| r.timer_id() == id)
        })
        .await;
        let fired: Vec<_> = got.iter().filter(|r| r.payload == b"retried").collect();
        assert!(
            fired.iter().any(|r| r.timer_id() == id),
            "the acknowledged retry {id} never fired; fired: {:?}",
            fired.iter().map(|r| r.timer_id()).collect::<Vec<_>>()
        );
        for r in &fired {
            assert!(r.header_ms("timerdb-fired-at") >= fire_at, "fired early");
        }
        println!(
            "fired {} time(s) (1 expected: the first row was withdrawn)",
            fired.len()
        );
    }

    /// The row lands in a slot of the member's own, its range moves away (a drain), and
    /// the slot's new owner reads the row's bucket while the member, still inside the
    /// call, waits; then the member, unable to have the owner adopt it (failpoint),
    /// withdraws the row and answers UNAVAILABLE. The owner
    /// must drop the copy it holds, so the caller's retry (same key, a new row) fires once
    /// and not twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_withdrawn_row_its_new_owner_had_read_does_not_fire_too() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_unload");
        create_topic(&s.kafka, &topic, 1).await;
        let c =
            with_node_1_failing("api.after_store=1*return(delay:4000);api.adopt=1*return").await;
        let consumer = consumer(&s.kafka, &[&topic]);
        // Read by its new owner (2 s of look-ahead) about 2 s before the withdrawal, and
        // due 1 s after it.
        let fire_at = now_ms() + 5_000;
        let timer = NewTimer::new(fire_at, &topic, 0)
            .payload("withdrawn-once")
            .idempotency_key("unload-1");
        withdrawn_during_a_drain(&c, &timer).await;
        let id = retry_until_acknowledged(&c.nodes[1], &timer).await;
        let mut got = collect(&consumer, Duration::from_secs(30), |m| {
            m.iter().any(|r| r.timer_id() == id)
        })
        .await;
        // Anything still to come comes within a few seconds of the due time.
        got.extend(collect(&consumer, Duration::from_secs(3), |_| false).await);
        let fired: Vec<String> = got
            .iter()
            .filter(|r| r.payload == b"withdrawn-once")
            .map(|r| r.timer_id())
            .collect();
        assert_eq!(
            fired,
            vec![id.clone()],
            "the retry {id} should fire once, and the withdrawn row not at all\n{}",
            c.logs()
        );
    }

    /// A member checks its lease, then its low-water-mark write is held up (20 s) while
    /// its range is drained to the others, which claim the slots under newer epochs. The
    /// late write reaches Cassandra and is refused there: the store, not the member's own
    /// check, keeps a stale owner from moving the marks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_owners_late_mark_is_refused_by_the_store() {
        let Some(_s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let c = with_node_1_failing("scheduler.before_low_water=1*return(delay:20000)").await;
        let fenced = |text: &str| -> u64 {
            text.lines()
                .filter(|l| l.starts_with("timerdb_store_fenced_writes_total{"))
                .filter(|l| l.contains("low_water_mark"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        // A member's range writes its first mark about 5 s after it starts (then at most
        // every 5 s): by now that write is held up in the failpoint.
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(fenced(&c.metrics_text(1).await), 0, "nothing refused yet");
        admin(&c, &["drain", "1"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            let text = c.metrics_text(1).await;
            if fenced(&text) >= 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the late mark was not refused\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            c.logs().contains("refused by the store"),
            "the member says why its mark did not move"
        );
    }

    /// The member dies while it withdraws such a timer (not adopted, by a failpoint),
    /// after releasing the key and before
    /// cancelling the row; the caller, answered by a broken connection, retries with the
    /// same key on another member. The retry stores the timer anew and it fires (released
    /// after the cancel instead, the retry would be answered with the cancelled row).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_while_withdrawing_then_a_retry_fires() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_withdraw_crash");
        create_topic(&s.kafka, &topic, 1).await;
        let c = with_node_1_failing(
            "api.before_store=1*return(delay:3000);api.adopt=1*return;\
             scylla.between_key_release_and_cancel=1*return(abort)",
        )
        .await;
        let consumer = consumer(&s.kafka, &[&topic]);
        let fire_at = now_ms() + 2_500;
        let timer = NewTimer::new(fire_at, &topic, 0)
            .payload("withdrawn-then-crashed")
            .idempotency_key("crash-1");
        let addr = c.nodes[0].clone();
        let first = timer.clone();
        let call = tokio::spawn(async move {
            let mut client = Client::connect(&addr).await.unwrap();
            client.set_timeouts(vec![first]).await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin(&c, &["drain", "1", "--no-wait"]);
        assert!(
            call.await.unwrap().is_err(),
            "the member died before it answered"
        );
        let mut client = Client::connect(&c.nodes[1]).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let id = loop {
            match client.set_timeouts(vec![timer.clone()]).await {
                Ok(mut r) => match r.remove(0) {
                    Ok(id) => break id,
                    Err(e)
                        if e.code() == tonic::Code::Unavailable
                            && std::time::Instant::now() < deadline => {}
                    Err(e) => panic!("the retry is acknowledged: {e:?}"),
                },
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let got = collect(&consumer, Duration::from_secs(30), |m| {
            m.iter().any(|r| r.timer_id() == id)
        })
        .await;
        assert!(
            got.iter().any(|r| r.timer_id() == id),
            "the acknowledged retry {id} never fired\n{}",
            c.logs()
        );
        for r in &got {
            assert!(r.header_ms("timerdb-fired-at") >= fire_at, "fired early");
        }
    }

    /// The member withdraws such a timer (not adopted, by a failpoint) and is held 4 s
    /// between releasing the key and cancelling the row. Meanwhile the slot's new owner
    /// loads the row's bucket: it reads the row still pending and its key free. It must not
    /// claim the key for that row again: the caller, told the timer was withdrawn, retries
    /// with the same key, and a key naming the withdrawn row would answer the retry with
    /// an id that is cancelled a moment later and never fires.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loader_reading_a_row_being_withdrawn_leaves_its_key_to_the_retry() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_reclaim");
        create_topic(&s.kafka, &topic, 1).await;
        let c = with_node_1_failing(
            "api.before_store=1*return(delay:1200);api.adopt=1*return;\
             scylla.between_key_release_and_cancel=1*return(delay:2500)",
        )
        .await;
        let consumer = consumer(&s.kafka, &[&topic]);
        // Just after a bucket's start (buckets are 1 s wide), so that the row's bucket
        // starts 3.95 s in: the row lands 1.2 s in and its key is released; the new owner
        // reads the bucket (2 s of look-ahead) 1.95 s in; the row is cancelled ~3.7 s in.
        // (A near-term timer, homed in a slot of node 1's, and one whose bucket its owner
        // may have read when the row lands.)
        tokio::time::sleep(Duration::from_millis((1_050 - now_ms() % 1_000) % 1_000)).await;
        let fire_at = now_ms() + 4_900;
        let timer = NewTimer::new(fire_at, &topic, 0)
            .payload("reclaimed")
            .idempotency_key("reclaim-1");
        let e = withdrawn_during_a_drain(&c, &timer).await;
        let id = retry_until_acknowledged(&c.nodes[1], &timer).await;
        let got = collect(&consumer, Duration::from_secs(30), |m| {
            m.iter().any(|r| r.timer_id() == id)
        })
        .await;
        assert!(
            got.iter().any(|r| r.timer_id() == id),
            "the acknowledged retry {id} never fired (the first call: {})\n{}",
            e.message(),
            c.logs()
        );
        for r in &got {
            assert!(r.header_ms("timerdb-fired-at") >= fire_at, "fired early");
        }
        assert!(
            c.logs().contains("withdrawn by its writer"),
            "the owner saw the withdrawn row and left it\n{}",
            c.logs()
        );
    }

    /// Every payload of `want` that arrives within 30 s of the call (and 3 s more, for a
    /// late repeat): (timer id, fired-at header) per delivery.
    async fn deliveries(
        consumer: &rdkafka::consumer::StreamConsumer,
        payload: &[u8],
        id: &str,
    ) -> Vec<(String, u64)> {
        let mut got = collect(consumer, Duration::from_secs(30), |m| {
            m.iter().any(|r| r.timer_id() == id)
        })
        .await;
        got.extend(collect(consumer, Duration::from_secs(3), |_| false).await);
        got.iter()
            .filter(|r| r.payload == payload)
            .map(|r| (r.timer_id(), r.header_ms("timerdb-fired-at")))
            .collect()
    }

    /// The row lands (3 s after the call) after the slot's new owner read its bucket, and
    /// the timer is overdue by then: the member asks the new owner to adopt it, the owner
    /// fires it, and only then is the caller told its id. It fires exactly once, not early.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_landing_after_its_new_owner_read_the_bucket_is_adopted_and_fires_once() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_adopt");
        create_topic(&s.kafka, &topic, 1).await;
        let c = with_node_1_failing("api.before_store=1*return(delay:3000)").await;
        let consumer = consumer(&s.kafka, &[&topic]);
        let fire_at = now_ms() + 2_500;
        let timer = NewTimer::new(fire_at, &topic, 0)
            .payload("adopted")
            .idempotency_key("adopt-1");
        let addr = c.nodes[0].clone();
        let first = timer.clone();
        let call = tokio::spawn(async move {
            let mut client = Client::connect(&addr).await.unwrap();
            client.set_timeouts(vec![first]).await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin(&c, &["drain", "1", "--no-wait"]);
        let id = call
            .await
            .unwrap()
            .expect("the call itself answers")
            .remove(0)
            .unwrap_or_else(|e| panic!("the adopted timer is acknowledged: {e:?}\n{}", c.logs()));
        let fired = deliveries(&consumer, b"adopted", &id).await;
        assert_eq!(
            fired.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
            vec![id.as_str()],
            "the acknowledged timer fires once\n{}",
            c.logs()
        );
        assert!(fired[0].1 >= fire_at, "fired early");
        assert!(
            c.metrics_text(1)
                .await
                .contains("timerdb_cluster_moved_writes_total{outcome=\"adopted\"} 1"),
            "node 1 counts the adoption"
        );
    }

    /// When a timer whose write is held 4.5 s (failpoint) falls due, from before the call:
    /// at least a bucket after the held write ends, so its row lands in the bucket of its
    /// due time, which its new owner reads (2 s ahead) 0.5–1.5 s before the row lands.
    const HELD_DUE_MS: u64 = 6_000;

    /// Sends 32 timers due at `fire_at` to node 1, which homes them in its own slots: each
    /// of its slot ranges then has rows in that bucket, so whichever member takes a range
    /// over loads the bucket, fires it, and deletes it (an empty bucket is never deleted).
    async fn companions(c: &LocalCluster, topic: &str, fire_at: u64) {
        let mut client = Client::connect(&c.nodes[0]).await.unwrap();
        let timers = (0..32)
            .map(|_| NewTimer::new(fire_at, topic, 0).payload("companion"))
            .collect();
        for r in client.set_timeouts(timers).await.unwrap() {
            r.expect("a companion timer is acknowledged");
        }
    }

    /// A held-write scenario: a settled cluster whose members run with `everywhere` and
    /// node 1 also with `failpoints`, a consumer of `topic` (created), and a timer keyed
    /// `key` carrying `payload`, due [`HELD_DUE_MS`] from now, whose bucket already holds
    /// node 1's [`companions`] (the first call through the failpoints, which passes).
    struct Held {
        c: LocalCluster,
        consumer: rdkafka::consumer::StreamConsumer,
        fire_at: u64,
        timer: NewTimer,
    }

    async fn held(
        s: &Services,
        topic: &str,
        (everywhere, failpoints): (&str, &str),
        payload: &[u8],
        key: &str,
    ) -> Held {
        create_topic(&s.kafka, topic, 1).await;
        let c = with_node_1_failing_among(everywhere, failpoints).await;
        let consumer = consumer(&s.kafka, &[topic]);
        let fire_at = now_ms() + HELD_DUE_MS;
        let timer = NewTimer::new(fire_at, topic, 0)
            .payload(payload.to_vec())
            .idempotency_key(key);
        companions(&c, topic, fire_at).await;
        Held {
            c,
            consumer,
            fire_at,
            timer,
        }
    }

    type Call =
        tokio::task::JoinHandle<Result<Vec<Result<String, tonic::Status>>, timerdb_client::Error>>;

    /// Sends `timer` to node 1 and drains node 1 half a second later, while node 1's
    /// failpoints hold the call; the call, still under way.
    async fn sent_during_a_drain(c: &LocalCluster, timer: &NewTimer) -> Call {
        let addr = c.nodes[0].clone();
        let first = timer.clone();
        let call = tokio::spawn(async move {
            let mut client = Client::connect(&addr).await.unwrap();
            client.set_timeouts(vec![first]).await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin(c, &["drain", "1", "--no-wait"]);
        call
    }

    /// The id `call` is answered with, which must be an acknowledgement.
    async fn acknowledged(call: Call, c: &LocalCluster) -> String {
        call.await
            .unwrap()
            .expect("the call itself answers")
            .remove(0)
            .unwrap_or_else(|e| panic!("the adopted timer is acknowledged: {e:?}\n{}", c.logs()))
    }

    /// Node 1 (of a cluster whose members all run with `everywhere`) writes a keyed timer
    /// carrying `payload` whose write is held 4.5 s and its adoption 7 s more, while it is
    /// drained: the row lands after the slot's new owner read its bucket, and the owner is
    /// asked to adopt it only once it fired the rest of that bucket and deleted it. The
    /// call must be acknowledged, and the timer fire once, not early. The logs, for what
    /// the owner found.
    async fn held_past_the_buckets_delete(
        s: &Services,
        everywhere: &str,
        topic: &str,
        payload: &[u8],
    ) -> String {
        let Held {
            c,
            consumer,
            fire_at,
            timer,
        } = held(
            s,
            topic,
            (
                everywhere,
                "api.before_store=1*off->1*return(delay:4500);api.adopt=1*return(delay:7000)",
            ),
            payload,
            "held-1",
        )
        .await;
        let call = sent_during_a_drain(&c, &timer).await;
        let id = acknowledged(call, &c).await;
        let fired = deliveries(&consumer, payload, &id).await;
        let logs = c.logs();
        assert_eq!(
            fired.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
            vec![id.as_str()],
            "the acknowledged timer fires once\n{logs}"
        );
        assert!(fired[0].1 >= fire_at, "fired early");
        assert!(
            c.metrics_text(1)
                .await
                .contains("timerdb_cluster_moved_writes_total{outcome=\"adopted\"} 1"),
            "node 1 counts the adoption"
        );
        logs
    }

    /// [`held_past_the_buckets_delete`]: the owner deleted only the rows it read, so the
    /// late row is still there; it finds it by id and fires it. (Before, the owner deleted
    /// whole partitions, the row went unfired, and the member withdrew the timer and
    /// answered UNAVAILABLE.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_landing_after_its_owner_read_the_bucket_outlives_the_buckets_delete() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let logs = held_past_the_buckets_delete(&s, "", &unique("fp_outlives"), b"outlives").await;
        assert!(
            logs.contains("whose bucket was deleted without it"),
            "the owner had deleted the bucket and found the row still there\n{logs}"
        );
        assert!(
            !logs.contains("adopted a timer by value"),
            "the row was there: nothing was carried\n{logs}"
        );
    }

    /// [`held_past_the_buckets_delete`] among members that delete whole partitions (as
    /// earlier versions did): the row goes with its bucket, unfired. The member carries
    /// the timer by value (a 7 KiB payload, near the most a header carries), and the owner
    /// takes it into memory and fires it. (Before: the member withdrew it and answered
    /// UNAVAILABLE.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_its_new_owner_deleted_unfired_is_adopted_by_value() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let payload: Vec<u8> = (0..7 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
        let logs =
            held_past_the_buckets_delete(&s, PARTITION_DELETES, &unique("fp_carried"), &payload)
                .await;
        assert!(
            logs.contains("adopted a timer by value"),
            "the owner found the row gone and adopted the timer by value\n{logs}"
        );
    }

    /// A repeat finds the first id's row gone while the first call is still under way: the
    /// row landed (4.5 s) after the new owner read its bucket, the owner (deleting whole
    /// partitions, as earlier versions did) deleted the bucket with it, unfired, and the
    /// first call is held (10 s more) before it settles. The repeat
    /// confirms the key's claim and answers with the first id; the first call then fails
    /// to have it adopted (failpoint), cannot withdraw it (confirmed), and keeps asking
    /// the owner, by value, until it is adopted. The id the repeat was told fires, once.
    /// (Before: the repeat answered without confirming, and the first call withdrew the
    /// timer: the id never fired.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeat_finding_the_row_deleted_unfired_is_told_an_id_that_fires() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_gone");
        let Held {
            c,
            consumer,
            fire_at,
            timer,
        } = held(
            &s,
            &topic,
            (
                PARTITION_DELETES,
                "api.before_store=1*off->1*return(delay:4500);\
             api.after_store=1*off->1*return(delay:10000);api.adopt=1*return",
            ),
            b"gone",
            "gone-1",
        )
        .await;
        let started = abandoned_during_a_drain(&c, &timer).await;
        // Past the bucket's end, its grace (2 s) and the owner's delete.
        let bucket_end = fire_at - fire_at % 1_000 + 1_000;
        let repeat_at = bucket_end + 2_000 + 2_500;
        tokio::time::sleep(Duration::from_millis(repeat_at.saturating_sub(now_ms()))).await;
        let id = retry_until_acknowledged(&c.nodes[1], &timer).await;
        assert!(
            started.elapsed() < Duration::from_millis(14_500),
            "the repeat was answered while the first call was still held ({:?})",
            started.elapsed()
        );
        let fired = deliveries(&consumer, b"gone", &id).await;
        assert_eq!(
            fired.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
            vec![id.as_str()],
            "the id the repeat was told fires, once\n{}",
            c.logs()
        );
        assert!(fired[0].1 >= fire_at, "fired early");
        let logs = c.logs();
        assert!(
            logs.contains("whose row is gone; confirming"),
            "the repeat found the row gone (deleted with its bucket)\n{logs}"
        );
        assert!(
            logs.contains("adopted a timer by value"),
            "the owner adopted the timer by value\n{logs}"
        );
        assert!(
            c.metrics_text(1)
                .await
                .contains("timerdb_cluster_moved_writes_total{outcome=\"confirmed\"} 1"),
            "node 1 found the claim confirmed, kept the timer and had it adopted\n{logs}"
        );
    }

    /// The writer dies (failpoint: the process aborts) right after its row landed, 4.5 s
    /// after the call and after the slot's new owner read the bucket, so nobody settles
    /// it. The owner fires the rest of that bucket and deletes the rows it read; the late
    /// row stays. A repeat of the call (same key, another member) then finds the row,
    /// has the owner adopt it, and is told an id that fires, once, not early. (Before: the
    /// owner deleted whole partitions, the row went with them unfired, and the repeat,
    /// finding it gone, was told an id that never fired.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_dying_before_it_settles_leaves_a_repeat_an_id_that_fires() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_writer_died");
        let Held {
            c,
            consumer,
            fire_at,
            timer,
        } = held(
            &s,
            &topic,
            (
                "",
                "api.before_store=1*off->1*return(delay:4500);\
             api.after_store=1*off->1*return(abort)",
            ),
            b"writer-died",
            "died-1",
        )
        .await;
        abandoned_during_a_drain(&c, &timer).await;
        // Past the bucket's end, its grace (2 s) and the owner's delete.
        let bucket_end = fire_at - fire_at % 1_000 + 1_000;
        let repeat_at = bucket_end + 2_000 + 2_500;
        tokio::time::sleep(Duration::from_millis(repeat_at.saturating_sub(now_ms()))).await;
        let id = retry_until_acknowledged(&c.nodes[1], &timer).await;
        let fired = deliveries(&consumer, b"writer-died", &id).await;
        let logs = c.logs();
        assert!(
            logs.contains("failpoint api.after_store: aborting the process"),
            "the writer died after its row landed\n{logs}"
        );
        assert_eq!(
            fired.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
            vec![id.as_str()],
            "the id the repeat was told fires, once\n{logs}"
        );
        assert!(fired[0].1 >= fire_at, "fired early");
        assert!(
            !logs.contains("whose row is gone"),
            "the owner's delete left the row it had not read\n{logs}"
        );
    }

    /// Moves every range owned by member `a` to member `b` and every range of `b` to `a`.
    fn swap_ranges(c: &LocalCluster, a: u64, b: u64) {
        let status = c.status(1);
        for r in status["ranges"].as_array().expect("ranges") {
            let to = match r["owner"].as_u64() {
                Some(o) if o == a => b,
                Some(o) if o == b => a,
                _ => continue,
            };
            let span = format!("{}..{}", r["start"], r["end"]);
            admin(c, &["move-range", &span, "--to", &to.to_string()]);
        }
    }

    /// One range moving twice during one slow write. Node 1's keyed write is held 4.5 s
    /// while node 1 is drained, so its row lands after the slot's new owner (A) read the
    /// bucket. A fires the rest of that bucket and records progress past the timer's due
    /// time, unaware of the row; then, before A deletes the bucket (every delete is held
    /// 12 s here), the range moves on to the third member (C). C reads the bucket and finds
    /// the row covered by A's record. Node 1 then settles its write (its adoption held
    /// 8 s): C must fire the timer, since the record cannot say which rows A read. (Before:
    /// C answered "fired" from A's record, and the caller was told an id that never fired.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_a_moved_range_never_read_fires_when_adopted_after_it_moved_again() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_two_moves");
        let Held {
            c,
            consumer,
            fire_at,
            timer,
        } = held(
            &s,
            &topic,
            (
                "scheduler.before_delete=return(delay:12000)",
                "api.before_store=1*off->1*return(delay:4500);api.adopt=1*return(delay:8000)",
            ),
            b"two-moves",
            "two-moves-1",
        )
        .await;
        let call = sent_during_a_drain(&c, &timer).await;
        // The companions fired and A's progress passed the due time: every range changes
        // hands between the two other members.
        tokio::time::sleep(Duration::from_millis(
            (fire_at + 700).saturating_sub(now_ms()),
        ))
        .await;
        swap_ranges(&c, 2, 3);
        let id = acknowledged(call, &c).await;
        let fired = deliveries(&consumer, b"two-moves", &id).await;
        let logs = c.whole_logs();
        assert_eq!(
            fired.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
            vec![id.as_str()],
            "the acknowledged timer fires once\n{}",
            c.logs()
        );
        assert!(fired[0].1 >= fire_at, "fired early");
        assert!(
            logs.contains("firing a timer an earlier owner's progress claims delivered"),
            "the range's second owner found the row covered by the first one's record\n{}",
            c.logs()
        );
    }

    /// The converse of the test above: the repeat comes after the timer fell due but
    /// before the owner deleted its bucket, so it has the row adopted (fired) and confirms
    /// the key; the first call, held until long after the delete, then carries the timer
    /// by value and finds its row gone. The owner remembers adopting it: it does not fire
    /// a second time (its fire is far behind the owner's progress by then).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timer_adopted_then_deleted_is_not_revived_by_its_late_writer() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_revive");
        let Held {
            c,
            consumer,
            fire_at,
            timer,
        } = held(
            &s,
            &topic,
            (
                "",
                "api.before_store=1*off->1*return(delay:4500);\
             api.after_store=1*off->1*return(delay:10000)",
            ),
            b"revive",
            "revive-1",
        )
        .await;
        abandoned_during_a_drain(&c, &timer).await;
        tokio::time::sleep(Duration::from_millis(
            (fire_at + 500).saturating_sub(now_ms()),
        ))
        .await;
        let id = retry_until_acknowledged(&c.nodes[1], &timer).await;
        let mut fired = deliveries(&consumer, b"revive", &id).await;
        // The first call settles ~8.5 s after the timer fell due: listen until well after.
        let listen = (fire_at + 12_000).saturating_sub(now_ms());
        let later = collect(&consumer, Duration::from_millis(listen), |_| false).await;
        fired.extend(
            later
                .iter()
                .filter(|r| r.payload == b"revive")
                .map(|r| (r.timer_id(), r.header_ms("timerdb-fired-at"))),
        );
        let logs = c.logs();
        assert_eq!(
            fired.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
            vec![id.as_str()],
            "the timer fires once\n{logs}"
        );
        assert!(
            !logs.contains("whose row is gone"),
            "the repeat came before the bucket's delete\n{logs}"
        );
        assert!(
            c.metrics_text(1)
                .await
                .contains("timerdb_cluster_moved_writes_total{outcome=\"adopted\"} 1"),
            "the first call settled (its adoption found the timer fired)\n{logs}"
        );
        assert!(
            !logs.contains("adopted a timer by value"),
            "nothing was taken into memory by value\n{logs}"
        );
    }

    /// The loss this guards against: a keyed write is slow (6 s), its caller's deadline
    /// (1.5 s) passes, its range moves away meanwhile, and the caller retries on another
    /// member, which finds the key held by the first id. The retry is answered with that
    /// id only after the owner adopted the timer and the key's claim was confirmed; when
    /// the first member then fails to have the timer adopted (failpoint) it must not
    /// withdraw it: the id the retry was told fires, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_told_the_first_id_is_never_withdrawn_under_it() {
        let Some(s) = services() else { return };
        let _one = ONE_AT_A_TIME.lock().await;
        let topic = unique("fp_confirm");
        create_topic(&s.kafka, &topic, 1).await;
        let c =
            with_node_1_failing("api.after_store=1*return(delay:6000);api.adopt=1*return").await;
        let consumer = consumer(&s.kafka, &[&topic]);
        let fire_at = now_ms() + 8_000;
        let timer = NewTimer::new(fire_at, &topic, 0)
            .payload("confirmed")
            .idempotency_key("confirm-1");
        let started = abandoned_during_a_drain(&c, &timer).await;
        let id = retry_until_acknowledged(&c.nodes[1], &timer).await;
        assert!(
            started.elapsed() < Duration::from_millis(6_000),
            "the retry was answered before the first call decided ({:?})",
            started.elapsed()
        );
        let fired = deliveries(&consumer, b"confirmed", &id).await;
        assert_eq!(
            fired.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
            vec![id.as_str()],
            "the id the retry was told fires, once\n{}",
            c.logs()
        );
        assert!(fired[0].1 >= fire_at, "fired early");
        assert!(
            c.metrics_text(1)
                .await
                .contains("timerdb_cluster_moved_writes_total{outcome=\"confirmed\"} 1"),
            "node 1 found the claim confirmed and kept the timer\n{}",
            c.logs()
        );
    }
}
