//! Kafka helpers for tests: topics and a consumer that collects what TimerDB produced.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;

/// One message as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, Vec<u8>>,
    /// When this consumer received it, ms since the epoch.
    pub received_ms: u64,
}

impl Received {
    /// The `timerdb-id` header as text.
    pub fn timer_id(&self) -> String {
        String::from_utf8(self.headers["timerdb-id"].clone()).unwrap()
    }

    /// A numeric `timerdb-*` header.
    pub fn header_ms(&self, name: &str) -> u64 {
        std::str::from_utf8(&self.headers[name])
            .unwrap()
            .parse()
            .unwrap()
    }
}

fn admin(kafka: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .expect("admin client")
}

/// Creates `name` with `partitions` partitions and waits until the broker knows it.
pub async fn create_topic(kafka: &str, name: &str, partitions: i32) {
    let r = admin(kafka)
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("create topic");
    for t in r {
        t.unwrap_or_else(|(n, e)| panic!("create topic {n}: {e}"));
    }
}

/// Whether the broker has a topic `name`, from the metadata of all topics (asking about
/// the one topic by name could itself make an auto-creating broker create it).
pub async fn topic_exists(kafka: &str, name: &str) -> bool {
    let kafka = kafka.to_owned();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let md = admin(&kafka)
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        md.topics().iter().any(|t| t.name() == name)
    })
    .await
    .unwrap()
}

/// Deletes `name`.
pub async fn delete_topic(kafka: &str, name: &str) {
    let r = admin(kafka)
        .delete_topics(
            &[name],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("delete topic");
    for t in r {
        t.unwrap_or_else(|(n, e)| panic!("delete topic {n}: {e}"));
    }
}

/// A consumer reading `topics` from the beginning.
pub fn consumer(kafka: &str, topics: &[&str]) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", super::unique("test"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()
        .expect("consumer");
    c.subscribe(topics).expect("subscribe");
    c
}

/// Collects messages until `done(all so far)` holds or `timeout` passes.
pub async fn collect(
    c: &StreamConsumer,
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while !done(&out) && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(msg) = tokio::time::timeout(left.min(Duration::from_millis(500)), c.recv()).await
        else {
            continue;
        };
        let m = msg.expect("consume");
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for hd in h.iter() {
                headers.insert(hd.key.to_owned(), hd.value.unwrap_or_default().to_vec());
            }
        }
        out.push(Received {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            key: m.key().unwrap_or_default().to_vec(),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
            received_ms: super::now_ms(),
        });
    }
    out
}
