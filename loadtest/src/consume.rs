//! Reads fired timers back: tails a JSON-lines sink file, or consumes Kafka topics.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

use crate::payload::Arrival;
use crate::tracker::{Tracker, now_ms};

/// A running consumer; `stop` ends it and waits for what it read so far to be counted.
pub struct Consumer {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Consumer {
    /// Stops reading and returns the consumer's error, if it failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.context("consumer task")?
    }
}

/// The JSON-lines sink's object. Declared here rather than borrowed from the `timerdb`
/// crate: the loadtest is a black-box client, so a change of the format shows as failures.
#[derive(Deserialize)]
struct Line {
    timer_id: String,
    topic: String,
    partition: i32,
    key: String,
    payload: String,
    headers: std::collections::BTreeMap<String, String>,
    fire_at_ms: u64,
    fired_at_ms: u64,
}

fn arrival_from_line(line: &[u8]) -> Option<Arrival> {
    let l: Line = serde_json::from_slice(line).ok()?;
    let mut headers = Vec::with_capacity(l.headers.len());
    for (k, v) in l.headers {
        headers.push((k, B64.decode(v).ok()?));
    }
    let a = Arrival {
        timer_id: l.timer_id,
        topic: l.topic,
        partition: l.partition,
        key: B64.decode(l.key).ok()?,
        payload: B64.decode(l.payload).ok()?,
        headers,
        fired_at_ms: Some(l.fired_at_ms),
        received_ms: None,
    };
    // The line's own fire time must agree with the header the node also wrote.
    (a.header_u64("timerdb-fire-at") == Some(l.fire_at_ms)).then_some(a)
}

/// Starts tailing `path` from its current end; lines written from now on are checked.
pub fn tail_jsonl(path: &Path, tracker: Arc<Tracker>) -> anyhow::Result<Consumer> {
    let mut file = std::fs::File::open(path).with_context(|| {
        format!(
            "opening sink file {} (is the node running?)",
            path.display()
        )
    })?;
    let start = file.seek(SeekFrom::End(0))?;
    // Starting in the middle of a line the node is writing: skip to its end, it belongs
    // to whatever ran before.
    let mut mid_line = false;
    if start > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(start - 1))?;
        file.read_exact(&mut last)?;
        mid_line = last[0] != b'\n';
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let path: PathBuf = path.to_owned();
    let handle = tokio::task::spawn_blocking(move || {
        tail_loop(file, start, mid_line, &path, &flag, &tracker)
    });
    Ok(Consumer { stop, handle })
}

fn tail_loop(
    mut file: std::fs::File,
    mut offset: u64,
    mut skip_line: bool,
    path: &Path,
    stop: &AtomicBool,
    tracker: &Tracker,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 4 << 20];
    // Bytes of a line whose end is not written yet.
    let mut partial: Vec<u8> = Vec::new();
    let mut arrivals = Vec::new();
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // A file shorter than what was read means it was truncated: start over.
            if std::fs::metadata(path)
                .map(|m| m.len() < offset)
                .unwrap_or(false)
            {
                file.seek(SeekFrom::Start(0))?;
                offset = 0;
                partial.clear();
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        offset += n as u64;
        let chunk = &buf[..n];
        let mut from = 0;
        for (i, b) in chunk.iter().enumerate() {
            if *b != b'\n' {
                continue;
            }
            let line = if partial.is_empty() {
                &chunk[from..i]
            } else {
                partial.extend_from_slice(&chunk[from..i]);
                &partial[..]
            };
            if skip_line {
                skip_line = false;
            } else {
                match arrival_from_line(line) {
                    Some(a) => arrivals.push(a),
                    // Counted as unexpected by the tracker: an empty payload is no timer of ours.
                    None => arrivals.push(Arrival::default()),
                }
            }
            partial.clear();
            from = i + 1;
        }
        partial.extend_from_slice(&chunk[from..]);
        tracker.ingest(&arrivals);
        arrivals.clear();
    }
}

/// Creates `topics` with `partitions` each where missing (TimerDB refuses timers for
/// topics Kafka does not know).
pub async fn ensure_topics(
    brokers: &str,
    topics: &[String],
    partitions: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating Kafka admin client")?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.create_topics(&new, &opts).await? {
        if let Err((topic, code)) = r
            && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
        {
            anyhow::bail!("creating topic {topic}: {code}");
        }
    }
    Ok(())
}

/// Consumes `topics` (see `ensure_topics`) from their current ends.
pub async fn consume_kafka(
    brokers: &str,
    topics: &[String],
    partitions: i32,
    tracker: Arc<Tracker>,
) -> anyhow::Result<Consumer> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::{Offset, TopicPartitionList};

    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", brokers);
    let consumer: StreamConsumer = base
        .clone()
        .set(
            "group.id",
            format!("timerdb-loadtest-{:x}", tracker.run_id()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .context("creating Kafka consumer")?;
    // Start at each partition's current end, read synchronously, so nothing produced after
    // this point is missed (an `Offset::End` assignment resolves later, racing the run).
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partitions {
            // A topic created a moment ago may have no partition leader yet: retried for
            // up to 30 s.
            let started = std::time::Instant::now();
            let high = loop {
                match consumer.fetch_watermarks(t, p, Duration::from_secs(10)) {
                    Ok((_, high)) => break high,
                    Err(e) if started.elapsed() < Duration::from_secs(30) => {
                        tracing::debug!(topic = %t, partition = p, error = %e, "loadtest.watermarks retried");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e).with_context(|| format!("watermarks of {t}/{p}")),
                }
            };
            tpl.add_partition_offset(t, p, Offset::Offset(high))?;
        }
    }
    consumer.assign(&tpl)?;

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = tokio::spawn(async move {
        use rdkafka::message::{Headers, Message};
        while !flag.load(Ordering::Relaxed) {
            let msg = match tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await
            {
                Err(_) => continue,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "loadtest.kafka_recv failed");
                    continue;
                }
                Ok(Ok(m)) => m,
            };
            let received_ms = now_ms();
            let headers: Vec<(String, Vec<u8>)> = msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            let mut a = Arrival {
                topic: msg.topic().to_owned(),
                partition: msg.partition(),
                key: msg.key().unwrap_or_default().to_vec(),
                payload: msg.payload().unwrap_or_default().to_vec(),
                headers,
                received_ms: Some(received_ms),
                ..Arrival::default()
            };
            a.fired_at_ms = a.header_u64("timerdb-fired-at");
            a.timer_id = a
                .header("timerdb-id")
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or_default()
                .to_owned();
            tracker.ingest(std::slice::from_ref(&a));
        }
        Ok(())
    });
    Ok(Consumer { stop, handle })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_sink_line() {
        let line = br#"{"timer_id":"0000018c0000000000000000000000ab","topic":"t","partition":2,"key":"AAE=","payload":"aGk=","headers":{"timerdb-fire-at":"MTIz","timerdb-fired-at":"MTI1"},"fire_at_ms":123,"fired_at_ms":125}"#;
        let a = arrival_from_line(line).expect("parses");
        assert_eq!((a.partition, a.fired_at_ms), (2, Some(125)));
        assert_eq!(
            (a.key.as_slice(), a.payload.as_slice()),
            (&[0u8, 1][..], &b"hi"[..])
        );
        assert!(arrival_from_line(b"{not json").is_none());
    }
}
