//! TimerDB with the Kafka sink against a real broker (`TIMERDB_KAFKA`), on both stores.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::kafka::{collect, consumer, create_topic, delete_topic};
use common::{Node, now_ms, request, services, unique};
use timerdb_proto::v1;
use tonic::Code;

/// Schedules a mix of timers and checks what a Kafka consumer receives.
async fn delivers_exactly(store: Option<String>) {
    let Some(svc) = services() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (t1, t2) = (unique("events"), unique("other"));
    create_topic(&svc.kafka, &t1, 4).await;
    create_topic(&svc.kafka, &t2, 1).await;
    let node = Node::start_with(
        dir.path(),
        store,
        Some(format!("kafka://{}", svc.kafka)),
        &[],
    )
    .await;
    let mut client = node.client().await;
    let now = now_ms();
    let mut sent: HashMap<String, (v1::SetTimeoutRequest, u64)> = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..60u64 {
        let fire = if i < 3 {
            now - 60_000 * (i + 1)
        } else {
            now + i * 50
        };
        let topic = if i % 5 == 0 { &t2 } else { &t1 };
        let partition = if i % 5 == 0 { 0 } else { (i % 4) as i32 };
        let mut r = request(fire, topic, partition, &format!("payload-{i}"));
        if i % 2 == 1 {
            r.key = Bytes::from(format!("user-{i}"));
        }
        if i % 3 == 0 {
            r.headers
                .insert("tenant".into(), Bytes::from(vec![i as u8, 0, 0xff]));
        }
        if i % 2 == 0 {
            let id = client
                .set_timeout(r.clone())
                .await
                .unwrap()
                .into_inner()
                .timer_id;
            sent.insert(id, (r, fire));
        } else {
            batch.push((r, fire));
        }
    }
    let results = client
        .set_timeouts(v1::SetTimeoutsRequest {
            timers: batch.iter().map(|(r, _)| r.clone()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    for (res, (r, fire)) in results.into_iter().zip(batch) {
        let Some(v1::set_timeout_result::Result::TimerId(id)) = res.result else {
            panic!("refused: {res:?}");
        };
        sent.insert(id, (r, fire));
    }

    let c = consumer(&svc.kafka, &[&t1, &t2]);
    let n = sent.len();
    let got = collect(&c, Duration::from_secs(60), |m| m.len() >= n).await;
    assert_eq!(got.len(), n, "all {n} timers arrive\n{}", node.log_tail());
    // Nothing more (no duplicates) shows up afterwards.
    let extra = collect(&c, Duration::from_secs(2), |_| false).await;
    assert!(extra.is_empty(), "unexpected extra messages: {extra:?}");
    for m in &got {
        let id = m.timer_id();
        let (r, fire) = &sent[&id];
        assert_eq!(m.topic, r.topic);
        assert_eq!(m.partition, r.partition, "on the requested partition");
        assert_eq!(m.payload, r.payload.to_vec());
        let key = if r.key.is_empty() {
            id.as_bytes().to_vec()
        } else {
            r.key.to_vec()
        };
        assert_eq!(m.key, key);
        assert_eq!(m.header_ms("timerdb-fire-at"), *fire);
        assert!(
            m.header_ms("timerdb-fired-at") >= *fire,
            "produced early: {m:?}"
        );
        assert!(m.received_ms >= *fire, "received before its epoch: {m:?}");
        for (k, v) in &r.headers {
            assert_eq!(&m.headers[k], &v.to_vec());
        }
        assert_eq!(m.headers.len(), r.headers.len() + 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_to_kafka_delivers_exactly_what_was_asked() {
    delivers_exactly(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scylla_store_to_kafka_delivers_exactly_what_was_asked() {
    let Some(svc) = services() else { return };
    delivers_exactly(Some(format!("scylla://{}/{}", svc.scylla, unique("e2e")))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_and_partitions_are_refused() {
    let Some(svc) = services() else { return };
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("known");
    create_topic(&svc.kafka, &topic, 2).await;
    let node = Node::start_with(
        dir.path(),
        None,
        Some(format!("kafka://{}", svc.kafka)),
        &[],
    )
    .await;
    let mut client = node.client().await;
    let now = now_ms();
    let s = client
        .set_timeout(request(now, &unique("missing"), 0, "x"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("does not exist"), "{}", s.message());
    let s = client
        .set_timeout(request(now, &topic, 2, "x"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("has 2 partitions"), "{}", s.message());
    let r = client
        .set_timeouts(v1::SetTimeoutsRequest {
            timers: vec![
                request(now, &topic, 1, "ok"),
                request(now, &topic, 7, "bad"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.results[0].result,
        Some(v1::set_timeout_result::Result::TimerId(_))
    ));
    match &r.results[1].result {
        Some(v1::set_timeout_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32, "{}", e.message)
        }
        other => panic!("{other:?}"),
    }
    let c = consumer(&svc.kafka, &[&topic]);
    let got = collect(&c, Duration::from_secs(30), |m| !m.is_empty()).await;
    let extra = collect(&c, Duration::from_secs(2), |_| false).await;
    assert_eq!(got.len() + extra.len(), 1, "only the good item fired");
    assert_eq!(got[0].payload, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_deleted_before_firing_goes_to_the_dead_letter_topic() {
    let Some(svc) = services() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (topic, dlq) = (unique("doomed"), unique("dead_letter"));
    create_topic(&svc.kafka, &topic, 1).await;
    create_topic(&svc.kafka, &dlq, 1).await;
    let sink = format!("kafka://{}?dead_letter_topic={dlq}", svc.kafka);
    let node = Node::start_with(dir.path(), None, Some(sink), &[]).await;
    let mut client = node.client().await;
    let fire = now_ms() + 4000;
    let mut r = request(fire, &topic, 0, "undeliverable");
    r.headers.insert("trace".into(), Bytes::from_static(b"t-1"));
    let id = client.set_timeout(r).await.unwrap().into_inner().timer_id;
    delete_topic(&svc.kafka, &topic).await;
    let c = consumer(&svc.kafka, &[&dlq]);
    let got = collect(&c, Duration::from_secs(90), |m| !m.is_empty()).await;
    assert_eq!(got.len(), 1, "dead-lettered\n{}", node.log_tail());
    let m = &got[0];
    assert_eq!(m.timer_id(), id);
    assert_eq!(m.payload, b"undeliverable");
    assert_eq!(m.headers["timerdb-original-topic"], topic.as_bytes());
    assert_eq!(m.headers["timerdb-original-partition"], b"0");
    assert_eq!(m.headers["trace"], b"t-1");
    assert!(m.header_ms("timerdb-fired-at") >= fire);
    // The consumer may see the message before the producer's delivery report reaches
    // the node (which is when the counter moves), so the counter is given a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = node.metrics_text().await;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("timerdb_sink_dead_lettered_total"))
            .unwrap_or_else(|| panic!("metric missing:\n{metrics}"))
            .to_string();
        if line.ends_with(" 1") {
            break;
        }
        assert!(
            line.ends_with(" 0") && std::time::Instant::now() < deadline,
            "{line}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A timer whose message Kafka could never take is refused when it is set, naming the
/// limit, and a node whose payload limit is over the sink's largest message does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_sinks_limit_is_refused_when_set() {
    let Some(svc) = services() else { return };
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("big");
    create_topic(&svc.kafka, &topic, 1).await;
    let sink = format!("kafka://{}?max_message_bytes=2000", svc.kafka);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_timerdb"))
        .args([
            "serve",
            "--metrics-listen",
            "off",
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--store",
            &format!("embedded://{}", dir.path().join("x").display()),
        ])
        .args(["--sink", &sink, "--max-payload-bytes", "4000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max_payload_bytes") && stderr.contains("max_message_bytes"),
        "{stderr}"
    );

    let node = Node::start_with(
        dir.path(),
        None,
        Some(sink),
        &["--max-payload-bytes", "1500"],
    )
    .await;
    let mut client = node.client().await;
    let mut big = request(now_ms() + 200, &topic, 0, &"p".repeat(1500));
    big.key = Bytes::from("k".repeat(800));
    let err = client.set_timeout(big.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("max_message_bytes"), "{err:?}");
    let r = client
        .set_timeouts(v1::SetTimeoutsRequest {
            timers: vec![big, request(now_ms() + 200, &topic, 0, "small")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        &r.results[0].result,
        Some(v1::set_timeout_result::Result::Error(e)) if e.code == Code::InvalidArgument as i32
            && e.message.starts_with("timers[0]")
    ));
    let Some(v1::set_timeout_result::Result::TimerId(small)) = &r.results[1].result else {
        panic!("{:?}", r.results[1]);
    };
    let c = consumer(&svc.kafka, &[&topic]);
    // Wait for the small one, then a little longer for anything else.
    let got = collect(&c, Duration::from_secs(20), |got| !got.is_empty()).await;
    assert_eq!(got.len(), 1, "the small timer fired");
    assert_eq!(&got[0].timer_id(), small);
    let more = collect(&c, Duration::from_millis(1500), |_| false).await;
    assert!(more.is_empty(), "only the small one was stored and fired");
}

/// A stored row that cannot be decoded: its neighbours fire, and a copy of the row as it is
/// stored goes to the dead-letter topic, keyed and headed by its id, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_goes_to_the_dead_letter_topic() {
    use timerdb::store::TimerStore;
    let Some(svc) = services() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (topic, dlq) = (unique("neighbours"), unique("dead_letter"));
    create_topic(&svc.kafka, &topic, 1).await;
    create_topic(&svc.kafka, &dlq, 1).await;
    let fire = now_ms() + 3000;
    let data = dir.path().join("data");
    let ids = {
        let store = timerdb::store::embedded::EmbeddedStore::open(&data, Default::default())
            .await
            .unwrap();
        let spec = |p: &str| timerdb::timer::TimerSpec {
            fire_at_ms: fire,
            topic: topic.clone(),
            partition: 0,
            key: None,
            headers: vec![],
            payload: p.to_owned().into(),
            idempotency_key: None,
        };
        let ids =
            timerdb::store::conformance::insert_ok(&store, &[spec("good"), spec("bad")]).await;
        store.close().await.unwrap();
        ids
    };
    let raw = [0xffu8, 0xfe, 0x01];
    common::corrupt_embedded_row(&data, ids[1].id, &raw);
    let sink = format!("kafka://{}?dead_letter_topic={dlq}", svc.kafka);
    let node = Node::start_with(dir.path(), None, Some(sink), &[]).await;
    let c = consumer(&svc.kafka, &[&dlq]);
    let got = collect(&c, Duration::from_secs(60), |m| !m.is_empty()).await;
    assert_eq!(got.len(), 1, "dead-lettered\n{}", node.log_tail());
    let m = &got[0];
    let bad = ids[1].id.to_string();
    assert_eq!(m.timer_id(), bad);
    assert_eq!(m.key, bad.as_bytes());
    assert_eq!(m.payload, raw);
    assert!(
        String::from_utf8_lossy(&m.headers["timerdb-error"]).contains("cannot be decoded"),
        "{m:?}"
    );
    let good = consumer(&svc.kafka, &[&topic]);
    let fired = collect(&good, Duration::from_secs(30), |m| !m.is_empty()).await;
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].timer_id(), ids[0].id.to_string());
    assert_eq!(fired[0].payload, b"good");
}
