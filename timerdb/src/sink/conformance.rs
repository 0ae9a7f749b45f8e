//! The conformance suite every [`Sink`] must pass, on what a consumer of the target would
//! read back. Run it from an integration test with a [`SinkHarness`] for the
//! implementation and [`sink_conformance!`](crate::sink_conformance), which makes each
//! check a test of its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Delivery, HEADER_FIRE_AT, HEADER_FIRED_AT, HEADER_ID, Sink};
use crate::Error;
use crate::timer::{Timer, TimerId, TimerSpec, now_ms};

/// One message as the target holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Topic written to.
    pub topic: String,
    /// Partition written to.
    pub partition: i32,
    /// Message key.
    pub key: Vec<u8>,
    /// Message value.
    pub payload: Vec<u8>,
    /// Headers by name.
    pub headers: BTreeMap<String, Vec<u8>>,
}

/// A sink under test and a reader of what it wrote.
#[async_trait]
pub trait SinkHarness: Send + Sync {
    /// The sink.
    fn sink(&self) -> Arc<dyn Sink>;
    /// A new, empty topic with `partitions` partitions that the sink may write to.
    async fn topic(&self, partitions: i32) -> String;
    /// A topic name that does not exist, if the sink checks targets at all.
    fn missing_topic(&self) -> Option<String>;
    /// What was written to `topic`, once at least `n` messages are there (or after
    /// `timeout`), plus anything else that arrives within a short settling time.
    async fn read(&self, topic: &str, n: usize, timeout: Duration) -> Vec<Written>;
}

/// One `#[tokio::test]` per conformance check. `$make` is an async function returning
/// `Option<impl SinkHarness>` (`None` skips: a service that is not configured; it should
/// panic under `CI=true` instead).
#[macro_export]
macro_rules! sink_conformance {
    ($make:path) => {
        $crate::sink_conformance!(@checks $make;
            delivers_each_item_once_with_its_exact_content,
            answers_an_empty_batch_with_nothing,
            refuses_a_missing_target,
            keeps_order_within_a_partition,
        );
    };
    (@checks $make:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(h) = $make().await else {
                    return;
                };
                $crate::sink::conformance::$check(&h).await;
            }
        )*
    };
}

fn timer(topic: &str, partition: i32, n: u32, fire_at_ms: u64) -> Timer {
    Timer {
        id: TimerId::generate(fire_at_ms - fire_at_ms % 1000),
        created_ms: fire_at_ms - 500,
        spec: TimerSpec {
            fire_at_ms,
            topic: topic.to_owned(),
            partition,
            key: n.is_multiple_of(3).then(|| Bytes::from(format!("key-{n}"))),
            headers: (0..n % 4)
                .map(|h| {
                    (
                        format!("h{h}"),
                        Bytes::from(vec![h as u8, 0, 0xff, n as u8]),
                    )
                })
                .collect(),
            // Binary, empty and larger payloads.
            payload: match n % 5 {
                0 => Bytes::new(),
                1 => Bytes::from((0..=255u8).collect::<Vec<u8>>()),
                2 => Bytes::from(vec![b'x'; 20_000 + n as usize]),
                _ => Bytes::from(format!("payload-{n}")),
            },
            idempotency_key: None,
        },
    }
}

fn expected(t: &Timer, fired_at_ms: u64) -> Written {
    let mut headers: BTreeMap<String, Vec<u8>> = t
        .spec
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.to_vec()))
        .collect();
    headers.insert(HEADER_ID.into(), t.id.to_string().into_bytes());
    headers.insert(
        HEADER_FIRE_AT.into(),
        t.spec.fire_at_ms.to_string().into_bytes(),
    );
    headers.insert(HEADER_FIRED_AT.into(), fired_at_ms.to_string().into_bytes());
    Written {
        topic: t.spec.topic.clone(),
        partition: t.spec.partition,
        key: super::message_key(t),
        payload: t.spec.payload.to_vec(),
        headers,
    }
}

/// Every item of a batch is answered `Delivered`, in order, and read back exactly once
/// with its payload, key (the timer id when it has none), partition and headers (the
/// request's plus `timerdb-id`, `timerdb-fire-at` and `timerdb-fired-at`).
pub async fn delivers_each_item_once_with_its_exact_content(h: &impl SinkHarness) {
    let topic = h.topic(3).await;
    let fire = now_ms();
    let batch: Vec<Timer> = (0..30)
        .map(|n| timer(&topic, (n % 3) as i32, n, fire))
        .collect();
    let fired_at = fire + 7;
    let sink = h.sink();
    let out = sink.deliver(&batch, fired_at).await;
    assert_eq!(out, vec![Delivery::Delivered; batch.len()]);
    sink.flush().await.expect("flush");
    let got = h.read(&topic, batch.len(), Duration::from_secs(30)).await;
    let mut by_id: HashMap<Vec<u8>, Vec<Written>> = HashMap::new();
    for w in got {
        let id = w
            .headers
            .get(HEADER_ID)
            .cloned()
            .expect("timerdb-id header");
        by_id.entry(id).or_default().push(w);
    }
    for t in &batch {
        let seen = by_id
            .remove(t.id.to_string().as_bytes())
            .unwrap_or_default();
        assert_eq!(seen, vec![expected(t, fired_at)], "timer {}", t.id);
    }
    assert!(by_id.is_empty(), "unexpected messages: {by_id:?}");
}

/// An empty batch gets an empty answer and writes nothing.
pub async fn answers_an_empty_batch_with_nothing(h: &impl SinkHarness) {
    let topic = h.topic(1).await;
    assert!(h.sink().deliver(&[], now_ms()).await.is_empty());
    assert!(
        h.read(&topic, 0, Duration::from_millis(500))
            .await
            .is_empty()
    );
}

/// A topic that does not exist, or a partition past the topic's last, is refused with
/// `FAILED_PRECONDITION` naming it (sinks that check targets); an existing one passes.
pub async fn refuses_a_missing_target(h: &impl SinkHarness) {
    let topic = h.topic(2).await;
    let sink = h.sink();
    sink.check_target(&topic, 1).await.expect("existing target");
    let Some(missing) = h.missing_topic() else {
        return;
    };
    match sink.check_target(&missing, 0).await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains(&missing), "{m}"),
        other => panic!("missing topic: {other:?}"),
    }
    match sink.check_target(&topic, 2).await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("partition 2"), "{m}"),
        other => panic!("missing partition: {other:?}"),
    }
}

/// Timers delivered in one batch to one partition are read back in batch order.
pub async fn keeps_order_within_a_partition(h: &impl SinkHarness) {
    let topic = h.topic(1).await;
    let fire = now_ms();
    let batch: Vec<Timer> = (0..50).map(|n| timer(&topic, 0, n, fire)).collect();
    let sink = h.sink();
    assert_eq!(
        sink.deliver(&batch, fire).await,
        vec![Delivery::Delivered; batch.len()]
    );
    sink.flush().await.expect("flush");
    let got: Vec<Vec<u8>> = h
        .read(&topic, batch.len(), Duration::from_secs(30))
        .await
        .into_iter()
        .map(|w| w.headers[HEADER_ID].clone())
        .collect();
    let want: Vec<Vec<u8>> = batch
        .iter()
        .map(|t| t.id.to_string().into_bytes())
        .collect();
    assert_eq!(got, want);
}
