//! Kafka sink on rdkafka: idempotent producer, `acks=all`, delivery reports awaited before
//! a timer counts as fired.
//!
//! URL: `kafka://host:port[,host:port...][?dead_letter_topic=T&compression=lz4&linger_ms=5
//! &max_message_bytes=1000000&message_timeout_ms=30000]`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{Delivery, Sink, message_headers, message_key};
use crate::metrics as m;
use crate::timer::Timer;
use crate::{Error, Result};

/// How long a topic's partition count is trusted before asking the cluster again.
const METADATA_TTL: Duration = Duration::from_secs(30);
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest message produced unless the URL says otherwise: Kafka brokers accept about
/// 1 MB by default (`message.max.bytes`), and so does librdkafka.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// Produces fired timers to Kafka.
pub struct KafkaSink {
    producer: FutureProducer,
    dead_letter_topic: Option<String>,
    max_message_bytes: usize,
    partitions: Mutex<PartitionCache>,
}

/// Partition counts by topic (`None`: no such topic), each trusted for `METADATA_TTL`.
/// Bounded: every `SetTimeout` naming a new topic, even one that does not exist, adds an
/// entry, so expired entries are dropped once `PARTITION_CACHE_MAX` are held, and the
/// cache starts over if that is not enough.
#[derive(Debug, Default)]
struct PartitionCache {
    map: HashMap<String, (Option<i32>, Instant)>,
}

/// Most topics whose partition count is remembered.
const PARTITION_CACHE_MAX: usize = 10_000;

impl PartitionCache {
    fn get(&self, topic: &str) -> Option<Option<i32>> {
        self.map
            .get(topic)
            .filter(|(_, at)| at.elapsed() < METADATA_TTL)
            .map(|(n, _)| *n)
    }

    fn put(&mut self, topic: &str, n: Option<i32>) {
        if self.map.len() >= PARTITION_CACHE_MAX && !self.map.contains_key(topic) {
            self.map.retain(|_, (_, at)| at.elapsed() < METADATA_TTL);
            if self.map.len() >= PARTITION_CACHE_MAX {
                self.map.clear();
            }
        }
        self.map.insert(topic.to_owned(), (n, Instant::now()));
    }
}

/// A parsed `kafka://` sink URL (no I/O: every mistake in it shows at configuration load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaUrl {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Where undeliverable timers (and copies of unreadable rows) go.
    pub dead_letter_topic: Option<String>,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: String,
    /// How long the producer waits to fill a batch.
    pub linger_ms: u64,
    /// Largest message produced (payload, key and headers).
    pub max_message_bytes: usize,
    /// How long one delivery may take before it counts as failed.
    pub message_timeout_ms: u64,
}

impl KafkaUrl {
    /// Parses `kafka://host:port[,host:port...][?option=value&...]`.
    pub fn parse(url: &str) -> Result<KafkaUrl> {
        let bad = |why: String| Error::Config(format!("sink URL {url:?}: {why}"));
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| Error::Config(format!("sink URL {url:?} must start with kafka://")))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() {
            return Err(Error::Config(format!(
                "sink URL {url:?} names no broker; use kafka://host:port"
            )));
        }
        let mut out = KafkaUrl {
            brokers: hosts.to_owned(),
            dead_letter_topic: None,
            compression: "none".into(),
            linger_ms: 5,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            message_timeout_ms: 30_000,
        };
        let number = |k: &str, v: &str, range: std::ops::RangeInclusive<u64>, why: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| {
                    bad(format!(
                        "{k} {v:?}: want {}..={} ({why})",
                        range.start(),
                        range.end()
                    ))
                })
        };
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "dead_letter_topic" if !v.is_empty() => {
                    out.dead_letter_topic = Some(v.into_owned())
                }
                "compression" => {
                    if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&v.as_ref()) {
                        return Err(bad(format!(
                            "compression {v:?}: want none, gzip, snappy, lz4 or zstd"
                        )));
                    }
                    out.compression = v.into_owned();
                }
                "linger_ms" => {
                    out.linger_ms = number("linger_ms", &v, 0..=10_000, "batching delay")?;
                }
                "message_timeout_ms" => {
                    out.message_timeout_ms = number(
                        "message_timeout_ms",
                        &v,
                        1000..=3_600_000,
                        "how long one delivery may take before the scheduler retries it",
                    )?;
                }
                "max_message_bytes" => {
                    out.max_message_bytes = number(
                        "max_message_bytes",
                        &v,
                        1000..=1_000_000_000,
                        "and no more than the broker's message.max.bytes",
                    )? as usize;
                }
                other => {
                    return Err(bad(format!(
                        "unknown option {other:?} (known: dead_letter_topic, compression, linger_ms, max_message_bytes, message_timeout_ms)"
                    )));
                }
            }
        }
        Ok(out)
    }
}

impl KafkaSink {
    /// Connects a producer as described by `url` (no round trip is made here).
    pub async fn open(url: &str) -> Result<KafkaSink> {
        let u = KafkaUrl::parse(url)?;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &u.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", u.linger_ms.to_string())
            .set("compression.type", &u.compression)
            // librdkafka would otherwise ask the broker to create any topic it is asked
            // about: a typo in a topic would then pass the check at SetTimeout, and a
            // deleted topic would come back instead of its timers being dead-lettered.
            .set("allow.auto.create.topics", "false")
            // A delivery that cannot finish in this time is reported failed; the scheduler
            // keeps the timer and retries, so nothing is dropped.
            .set("message.timeout.ms", u.message_timeout_ms.to_string())
            .set("message.max.bytes", u.max_message_bytes.to_string());
        let producer: FutureProducer = config
            .create()
            .map_err(|e| Error::Config(format!("sink URL {url:?}: {e}")))?;
        Ok(KafkaSink {
            producer,
            dead_letter_topic: u.dead_letter_topic,
            max_message_bytes: u.max_message_bytes,
            partitions: Mutex::new(PartitionCache::default()),
        })
    }

    async fn partition_count(&self, topic: &str) -> Result<Option<i32>> {
        if let Some(n) = self.partitions.lock().expect("lock").get(topic) {
            return Ok(n);
        }
        let producer = self.producer.clone();
        let t = topic.to_owned();
        let md = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&t), METADATA_TIMEOUT)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| Error::Unavailable(format!("Kafka metadata for topic {topic:?}: {e}")))?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32);
        self.partitions.lock().expect("lock").put(topic, n);
        Ok(n)
    }

    async fn dead_letter(&self, timer: &Timer, fired_at_ms: u64, why: &str) -> Delivery {
        let Some(dlq) = &self.dead_letter_topic else {
            return Delivery::Failed(format!(
                "{why}; no dead-letter topic is configured, so the timer is kept and retried"
            ));
        };
        let key = message_key(timer);
        let partition = timer.spec.partition.to_string();
        let headers = headers(timer, fired_at_ms)
            .insert(Header {
                key: "timerdb-original-topic",
                value: Some(timer.spec.topic.as_bytes()),
            })
            .insert(Header {
                key: "timerdb-original-partition",
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: "timerdb-error",
                value: Some(why.as_bytes()),
            });
        let record = FutureRecord::to(dlq)
            .key(&key)
            .payload(timer.spec.payload.as_ref())
            .headers(headers);
        match self.producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => {
                m::dead_lettered(dlq);
                Delivery::DeadLettered
            }
            Err((e, _)) => Delivery::Failed(format!("{why}; dead-letter topic {dlq:?}: {e}")),
        }
    }
}

fn headers(timer: &Timer, fired_at_ms: u64) -> OwnedHeaders {
    let hs = message_headers(timer, fired_at_ms);
    let mut out = OwnedHeaders::new_with_capacity(hs.len());
    for (k, v) in &hs {
        out = out.insert(Header {
            key: k,
            value: Some(v.as_slice()),
        });
    }
    out
}

/// Errors after which producing to this target can never succeed.
fn is_permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidTopic
        )
    )
}

#[async_trait]
impl Sink for KafkaSink {
    fn max_message_bytes(&self) -> Option<usize> {
        Some(self.max_message_bytes)
    }

    async fn dead_letter_unreadable(&self, row: &crate::store::Unreadable) -> Result<bool> {
        let Some(dlq) = &self.dead_letter_topic else {
            return Ok(false);
        };
        let id = row.id.to_string();
        let why = format!("stored row cannot be decoded: {}", row.error);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: super::HEADER_ID,
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: "timerdb-error",
                value: Some(why.as_bytes()),
            });
        let record = FutureRecord::to(dlq)
            .key(id.as_bytes())
            .payload(row.raw.as_slice())
            .headers(headers);
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| Error::Unavailable(format!("dead-letter topic {dlq:?}: {e}")))?;
        m::dead_lettered(dlq);
        Ok(true)
    }

    async fn check_target(&self, topic: &str, partition: i32) -> Result<()> {
        match self.partition_count(topic).await? {
            None => Err(Error::FailedPrecondition(format!(
                "Kafka topic {topic:?} does not exist; create it before scheduling timers to it"
            ))),
            Some(n) if partition >= n => Err(Error::FailedPrecondition(format!(
                "Kafka topic {topic:?} has {n} partitions (0..={}); partition {partition} does not exist",
                n - 1
            ))),
            Some(_) => Ok(()),
        }
    }

    async fn deliver(&self, batch: &[Timer], fired_at_ms: u64) -> Vec<Delivery> {
        let keys: Vec<Vec<u8>> = batch.iter().map(message_key).collect();
        let mut pending = Vec::with_capacity(batch.len());
        for (t, key) in batch.iter().zip(&keys) {
            let mut record = FutureRecord::to(&t.spec.topic)
                .partition(t.spec.partition)
                .key(key.as_slice())
                .payload(t.spec.payload.as_ref())
                .headers(headers(t, fired_at_ms));
            // A full local queue clears as deliveries complete; wait rather than fail.
            let fut = loop {
                match self.producer.send_result(record) {
                    Ok(f) => break Ok(f),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => break Err(e),
                }
            };
            pending.push(fut);
        }
        let mut out = Vec::with_capacity(batch.len());
        let results = join_all(pending.into_iter().map(|p| async move {
            match p {
                Ok(f) => match f.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(e) => Err(e),
            }
        }))
        .await;
        for (t, r) in batch.iter().zip(results) {
            out.push(match r {
                Ok(()) => Delivery::Delivered,
                Err(e) if is_permanent(&e) => {
                    let why = format!(
                        "cannot produce to topic {:?} partition {}: {e}",
                        t.spec.topic, t.spec.partition
                    );
                    tracing::warn!(timer_id = %t.id, topic = %t.spec.topic, error = %e, "sink.deliver permanent failure");
                    self.dead_letter(t, fired_at_ms, &why).await
                }
                Err(e) => Delivery::Failed(format!("producing to {:?}: {e}", t.spec.topic)),
            });
        }
        out
    }

    async fn flush(&self) -> Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::Unavailable(format!("flushing Kafka producer: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_cache_stays_bounded_by_distinct_topic_names() {
        let mut c = PartitionCache::default();
        for i in 0..(3 * PARTITION_CACHE_MAX) {
            c.put(&format!("typo-{i}"), None);
            assert!(c.map.len() <= PARTITION_CACHE_MAX);
        }
        c.put("real", Some(3));
        assert_eq!(c.get("real"), Some(Some(3)));
        assert_eq!(c.get("never-asked"), None);
    }
}
