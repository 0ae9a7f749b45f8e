//! Faults against the real services: Kafka and Cassandra outages, `kill -9` under load.
//! These stop shared servers, so they run one at a time (and cargo runs test binaries
//! one after another, so no other test sees the outage).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::kafka::{collect, consumer, create_topic};
use common::{Node, ctl, ctl_with_env, fire_ms, now_ms, services, unique};
use timerdb::api::convert::timestamp;
use timerdb_proto::v1;
use tonic::Code;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn timers(
    now: u64,
    n: u64,
    from_ms: u64,
    spread_ms: u64,
    topic: &str,
    seq: u64,
) -> Vec<v1::SetTimeoutRequest> {
    (0..n)
        .map(|i| v1::SetTimeoutRequest {
            fire_at: Some(timestamp(
                now + from_ms + (i * 7919 + seq * 131) % spread_ms,
            )),
            payload: Bytes::from(format!("{seq}-{i}")),
            topic: topic.into(),
            partition: (i % 3) as i32,
            ..Default::default()
        })
        .collect()
}

async fn schedule(node: &Node, reqs: Vec<v1::SetTimeoutRequest>) -> HashMap<String, u64> {
    let fires: Vec<u64> = reqs.iter().map(fire_ms).collect();
    let r = node
        .client()
        .await
        .set_timeouts(v1::SetTimeoutsRequest { timers: reqs })
        .await
        .unwrap()
        .into_inner();
    r.results
        .into_iter()
        .zip(fires)
        .map(|(r, f)| match r.result {
            Some(v1::set_timeout_result::Result::TimerId(id)) => (id, f),
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Consumes `topic` until every id in `want` arrived; checks none came early.
/// `in_flight`: payload prefix of the one batch whose call was cut off by a crash. Its
/// timers may have been stored without the client hearing so, and may then fire; any other
/// unknown message fails the test.
async fn all_arrive_allowing(
    kafka: &str,
    topic: &str,
    want: &HashMap<String, u64>,
    timeout: Duration,
    in_flight: Option<&str>,
) -> usize {
    let c = consumer(kafka, &[topic]);
    let got = collect(&c, timeout, |m| {
        let seen: std::collections::HashSet<String> = m.iter().map(|r| r.timer_id()).collect();
        want.keys().all(|k| seen.contains(k))
    })
    .await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut unacked = 0;
    for m in &got {
        let id = m.timer_id();
        let fire_at = m.header_ms("timerdb-fire-at");
        let due = match want.get(&id) {
            Some(due) => *due,
            None if in_flight.is_some_and(|p| m.payload.starts_with(p.as_bytes())) => {
                unacked += 1;
                fire_at
            }
            None => panic!("unexpected message {m:?}"),
        };
        assert_eq!(fire_at, due, "fire-at header: {m:?}");
        assert!(
            m.received_ms >= due && m.header_ms("timerdb-fired-at") >= due,
            "early: {m:?}"
        );
        *seen.entry(id).or_default() += 1;
    }
    let missing: Vec<&String> = want.keys().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} never arrived",
        missing.len(),
        want.len()
    );
    if unacked > 0 {
        eprintln!("{unacked} timers of the batch cut off by the crash were stored and fired");
    }
    seen.iter()
        .filter(|(id, _)| want.contains_key(*id))
        .map(|(_, c)| c - 1)
        .sum()
}

async fn all_arrive(
    kafka: &str,
    topic: &str,
    want: &HashMap<String, u64>,
    timeout: Duration,
) -> usize {
    all_arrive_allowing(kafka, topic, want, timeout, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_outage_delays_timers_but_loses_none() {
    let Some(svc) = services() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("outage");
    create_topic(&svc.kafka, &topic, 3).await;
    // Deliveries time out after 2 s, well inside the 10 s outage: the scheduler's own
    // retry path runs against the real broker, not only librdkafka's internal retries.
    let node = Node::start_with(
        dir.path(),
        None,
        Some(format!("kafka://{}?message_timeout_ms=2000", svc.kafka)),
        &[],
    )
    .await;
    let now = now_ms();
    // Due 3-9 s from now: all of them while Kafka is down.
    let want = schedule(&node, timers(now, 300, 3000, 6000, &topic, 1)).await;
    ctl("kafka", "stop");
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(10_000).saturating_sub(stopped_at.elapsed())).await;
    ctl("kafka", "start");
    let dups = all_arrive(&svc.kafka, &topic, &want, Duration::from_secs(120)).await;
    let m = node.metrics_text().await;
    let failed = m
        .lines()
        .find(|l| l.starts_with("timerdb_sink_failed_attempts_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    eprintln!(
        "kafka outage: {} timers delivered, {dups} duplicates, {failed} failed attempts retried",
        want.len()
    );
    assert!(
        failed > 0.0,
        "deliveries failed during the outage and were retried by the scheduler"
    );
}

/// On a broker that creates any topic it is asked about (auto-create on, as in the compose
/// file), a timer for a topic that does not exist is still refused with
/// FAILED_PRECONDITION, and the topic is not created: the producer never asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_auto_create_on_gets_no_topic_created() {
    let Some(svc) = services() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    ctl("kafka", "stop");
    ctl_with_env(
        "kafka",
        "start",
        &[(
            "TIMERDB_LOCAL_KAFKA_OVERRIDES",
            "auto.create.topics.enable=true",
        )],
    );
    let outcome = std::panic::AssertUnwindSafe(async {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start_with(
            dir.path(),
            None,
            Some(format!("kafka://{}", svc.kafka)),
            &[],
        )
        .await;
        let typo = unique("typo");
        let err = node
            .client()
            .await
            .set_timeout(common::request(now_ms() + 1000, &typo, 0, "x"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(&typo), "{err:?}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !common::kafka::topic_exists(&svc.kafka, &typo).await,
            "the broker created {typo}"
        );
    });
    let result = futures::FutureExt::catch_unwind(outcome).await;
    // Back to the plain broker (auto-create off) for every other test.
    ctl("kafka", "stop");
    ctl("kafka", "start");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cassandra_outage_gives_unavailable_and_recovers() {
    let Some(svc) = services() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("cass_outage");
    create_topic(&svc.kafka, &topic, 3).await;
    let store = format!(
        "scylla://{}/{}?request_timeout=2s",
        svc.scylla,
        unique("outage")
    );
    let mut node = Node::start_with(
        dir.path(),
        Some(store),
        Some(format!("kafka://{}", svc.kafka)),
        &[],
    )
    .await;
    let now = now_ms();
    // Due within the look-ahead: in memory before the outage, so they fire during it.
    let mut want = schedule(&node, timers(now, 100, 500, 1500, &topic, 1)).await;
    // Due well after the store comes back.
    want.extend(schedule(&node, timers(now, 100, 20_000, 5000, &topic, 2)).await);
    ctl("cassandra", "stop");
    let started = Instant::now();
    let s = node
        .client()
        .await
        .set_timeout(timers(now_ms(), 1, 1000, 1, &topic, 3).remove(0))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    eprintln!(
        "SetTimeout with the store down answered {:?} in {:?}",
        s.code(),
        started.elapsed()
    );
    // The timers already in memory still fire while the store is down.
    let early: HashMap<String, u64> = want
        .iter()
        .filter(|(_, f)| **f < now + 2500)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    all_arrive(&svc.kafka, &topic, &early, Duration::from_secs(30)).await;
    ctl("cassandra", "start");
    // Writes succeed again once the driver has reconnected.
    let deadline = Instant::now() + Duration::from_secs(60);
    let late = loop {
        let reqs = timers(now_ms(), 20, 1000, 2000, &topic, 4);
        let fires: Vec<u64> = reqs.iter().map(fire_ms).collect();
        let call = node
            .client()
            .await
            .set_timeouts(v1::SetTimeoutsRequest { timers: reqs })
            .await;
        match call {
            Ok(r) => break r.into_inner().results.into_iter().zip(fires),
            Err(s) if Instant::now() < deadline && s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(s) => panic!("store did not recover: {s:?}\n{}", node.log_tail()),
        }
    };
    for (r, f) in late {
        match r.result {
            Some(v1::set_timeout_result::Result::TimerId(id)) => {
                want.insert(id, f);
            }
            other => panic!("refused after recovery: {other:?}"),
        }
    }
    let dups = all_arrive(&svc.kafka, &topic, &want, Duration::from_secs(90)).await;
    eprintln!(
        "cassandra outage: {} timers delivered, {dups} duplicates",
        want.len()
    );
    node.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_on_scylla_and_kafka_loses_nothing() {
    let Some(svc) = services() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("crash");
    create_topic(&svc.kafka, &topic, 3).await;
    let store = format!("scylla://{}/{}", svc.scylla, unique("crash"));
    let mut node = Node::start_with(
        dir.path(),
        Some(store),
        Some(format!("kafka://{}", svc.kafka)),
        &[],
    )
    .await;
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let writer = {
        let acked = acked.clone();
        let mut client = node.client().await;
        let topic = topic.clone();
        tokio::spawn(async move {
            for seq in 0..10_000u64 {
                let reqs = timers(now_ms(), 50, 0, 4000, &topic, seq);
                let fires: Vec<u64> = reqs.iter().map(fire_ms).collect();
                match client
                    .set_timeouts(v1::SetTimeoutsRequest { timers: reqs })
                    .await
                {
                    Ok(r) => {
                        let mut a = acked.lock().unwrap();
                        for (r, f) in r.into_inner().results.into_iter().zip(fires) {
                            if let Some(v1::set_timeout_result::Result::TimerId(id)) = r.result {
                                a.insert(id, f);
                            }
                        }
                    }
                    Err(_) => return Some(seq),
                }
            }
            None
        })
    };
    tokio::time::sleep(Duration::from_millis(3000)).await;
    node.kill9();
    let cut_off = writer.await.unwrap();
    let want = acked.lock().unwrap().clone();
    assert!(want.len() >= 200, "the writer got going: {}", want.len());
    node.restart().await;
    let prefix = cut_off.map(|seq| format!("{seq}-"));
    let dups = all_arrive_allowing(
        &svc.kafka,
        &topic,
        &want,
        Duration::from_secs(120),
        prefix.as_deref(),
    )
    .await;
    eprintln!(
        "kill -9 on scylla+kafka: {} acknowledged, all delivered, {dups} duplicates",
        want.len()
    );
}
