//! The `Sink` conformance suite on the JSON-lines sink and on the Kafka sink (against the
//! real broker of the test command), each check a test of its own.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use timerdb::sink::Sink;
use timerdb::sink::conformance::{SinkHarness, Written};

/// A JSON-lines sink writing to a file of its own.
struct Jsonl {
    sink: Arc<dyn Sink>,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

#[async_trait]
impl SinkHarness for Jsonl {
    fn sink(&self) -> Arc<dyn Sink> {
        self.sink.clone()
    }

    async fn topic(&self, _partitions: i32) -> String {
        common::unique("jsonl")
    }

    fn missing_topic(&self) -> Option<String> {
        None
    }

    async fn read(&self, topic: &str, n: usize, timeout: Duration) -> Vec<Written> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got: Vec<Written> = common::read_fired(&self.path)
                .into_iter()
                .filter(|l| l.topic == topic)
                .map(|l| Written {
                    topic: l.topic,
                    partition: l.partition,
                    key: common::b64(&l.key),
                    payload: common::b64(&l.payload),
                    headers: l
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), common::b64(v)))
                        .collect(),
                })
                .collect();
            if std::time::Instant::now() >= deadline {
                return got;
            }
            if got.len() >= n {
                // Anything more (a duplicate) would have been written with the rest.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if common::read_fired(&self.path).len() == got.len() {
                    return got;
                }
                continue;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn jsonl() -> Option<Jsonl> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fired.jsonl");
    let sink = timerdb::sink::open(&format!("jsonl://{}", path.display()))
        .await
        .unwrap();
    Some(Jsonl {
        sink,
        path,
        _dir: dir,
    })
}

/// The Kafka sink on the test command's broker; topics are created per check.
struct Kafka {
    sink: Arc<dyn Sink>,
    brokers: String,
}

#[async_trait]
impl SinkHarness for Kafka {
    fn sink(&self) -> Arc<dyn Sink> {
        self.sink.clone()
    }

    async fn topic(&self, partitions: i32) -> String {
        let t = common::unique("sinkconf");
        common::kafka::create_topic(&self.brokers, &t, partitions).await;
        t
    }

    fn missing_topic(&self) -> Option<String> {
        Some(common::unique("missing"))
    }

    async fn read(&self, topic: &str, n: usize, timeout: Duration) -> Vec<Written> {
        let c = common::kafka::consumer(&self.brokers, &[topic]);
        let mut got = common::kafka::collect(&c, timeout, |m| n > 0 && m.len() >= n).await;
        // Anything more (a duplicate) that comes shortly after.
        got.extend(common::kafka::collect(&c, Duration::from_millis(1000), |_| false).await);
        got.into_iter()
            .map(|m| Written {
                topic: m.topic,
                partition: m.partition,
                key: m.key,
                payload: m.payload,
                headers: m.headers.into_iter().collect(),
            })
            .collect()
    }
}

async fn kafka() -> Option<Kafka> {
    let svc = common::services()?;
    let sink = timerdb::sink::open(&format!("kafka://{}", svc.kafka))
        .await
        .unwrap();
    Some(Kafka {
        sink,
        brokers: svc.kafka,
    })
}

mod jsonl_sink {
    timerdb::sink_conformance!(super::jsonl);
}

mod kafka_sink {
    timerdb::sink_conformance!(super::kafka);
}
