//! The events consumer. Each assigned partition's events are spread by user over
//! [`Settings::queues`](super::Settings) queues that run concurrently; one user's events
//! always go to the same queue, so they are processed in order. A finished event is
//! reported to the offset tracker task over a channel, which commits each partition's
//! contiguous processed prefix ([`Offsets`]). On a rebalance, what is processed is
//! committed and the revoked partitions are forgotten: their events still in a queue
//! finish, uncommitted, and the partition's next owner processes them again (which
//! changes nothing visible).

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::Runtime;
use super::offsets::{Offsets, Partition};
use crate::engine::Event;
use crate::{Error, Result};

/// How often the tracker commits the processed prefix.
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// How often the published journeys are read again from the store.
const CATALOG_EVERY: Duration = Duration::from_secs(5);
/// How often the tracker logs how many events it saw finish.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Events one queue holds before the consumer waits for it.
const QUEUE_DEPTH: usize = 256;

/// The consumer's context: commits and forgets on revocation.
struct Context {
    topic: String,
    offsets: Arc<Mutex<Offsets>>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let mut offsets = self.offsets.lock().expect("offsets lock");
            if let Err(e) = commit(consumer, &self.topic, offsets.to_commit(), CommitMode::Sync) {
                tracing::warn!(error = %e, "journeyx: commit before a rebalance failed; those events will be processed again");
            }
            for e in list.elements() {
                offsets.revoke(e.partition());
            }
            tracing::info!(partitions = ?list.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "journeyx: partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            tracing::info!(partitions = ?list.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "journeyx: partitions assigned");
        }
    }
}

fn commit<C: Consumer<Context>>(
    consumer: &C,
    topic: &str,
    upto: Vec<(Partition, i64)>,
    mode: CommitMode,
) -> KafkaResult<()> {
    if upto.is_empty() {
        return Ok(());
    }
    let mut list = TopicPartitionList::new();
    for (p, next) in upto {
        list.add_partition_offset(topic, p, Offset::Offset(next))?;
    }
    consumer.commit(&list, mode)
}

/// One event on its way to a queue.
struct Work {
    partition: Partition,
    offset: i64,
    event: Event,
}

/// Consumes the events topic until `stop` turns true; then stops reading, lets the queues
/// finish what they hold, and commits it.
pub async fn run(rt: Arc<Runtime>, mut stop: watch::Receiver<bool>) -> Result<()> {
    let s = rt.settings().clone();
    let offsets = Arc::new(Mutex::new(Offsets::default()));
    let consumer: StreamConsumer<Context> = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka)
        .set("group.id", &s.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .create_with_context(Context {
            topic: s.events_topic.clone(),
            offsets: offsets.clone(),
        })
        .map_err(|e| Error::Invalid(format!("kafka consumer for {}: {e}", s.kafka)))?;
    consumer
        .subscribe(&[&s.events_topic])
        .map_err(|e| Error::Invalid(format!("subscribing to {}: {e}", s.events_topic)))?;
    let consumer = Arc::new(consumer);

    // The queues, and the channel finished events come back on.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Partition, i64)>();
    let mut queues = Vec::with_capacity(s.queues.max(1));
    let mut workers = Vec::new();
    for _ in 0..s.queues.max(1) {
        let (tx, mut rx) = mpsc::channel::<Work>(QUEUE_DEPTH);
        let (rt, done) = (rt.clone(), done_tx.clone());
        workers.push(tokio::spawn(async move {
            while let Some(w) = rx.recv().await {
                rt.handle(w.partition, w.offset, &w.event).await;
                let _ = done.send((w.partition, w.offset));
            }
        }));
        queues.push(tx);
    }
    drop(done_tx);

    // The offset tracker: takes in finished events, commits the processed prefixes.
    let tracker = {
        let (offsets, consumer, topic) =
            (offsets.clone(), consumer.clone(), s.events_topic.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(COMMIT_EVERY);
            let (mut finished, mut reported) = (0u64, tokio::time::Instant::now());
            loop {
                tokio::select! {
                    done = done_rx.recv() => match done {
                        Some((p, o)) => {
                            offsets.lock().expect("offsets lock").finished(p, o);
                            finished += 1;
                        }
                        None => break,
                    },
                    _ = tick.tick() => {
                        let (upto, in_flight) = {
                            let mut o = offsets.lock().expect("offsets lock");
                            (o.to_commit(), o.in_flight())
                        };
                        if let Err(e) = commit(&*consumer, &topic, upto, CommitMode::Async) {
                            tracing::warn!(error = %e, "journeyx: committing offsets failed; will try again");
                        }
                        if reported.elapsed() >= PROGRESS_EVERY {
                            if finished > 0 || in_flight > 0 {
                                tracing::info!(finished, in_flight, "journeyx: events processed in the last {PROGRESS_EVERY:?}");
                            }
                            (finished, reported) = (0, tokio::time::Instant::now());
                        }
                    }
                }
            }
            let upto = offsets.lock().expect("offsets lock").to_commit();
            if let Err(e) = commit(&*consumer, &topic, upto, CommitMode::Sync) {
                tracing::warn!(error = %e, "journeyx: the last commit failed");
            }
        })
    };

    // Journeys published through another process of the group reach this one.
    let reloads = {
        let rt = rt.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CATALOG_EVERY).await;
                if let Err(e) = rt.reload_catalog().await {
                    tracing::warn!(error = %e, "journeyx: reading the published journeys failed");
                }
            }
        })
    };
    loop {
        let m = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.changed() => break,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "journeyx: reading events failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (partition, offset) = (m.partition(), m.offset());
        offsets
            .lock()
            .expect("offsets lock")
            .started(partition, offset);
        match parse(&m) {
            Ok(event) => match rt.admission(&event).await {
                None => {
                    let q = queue_of(&event, queues.len());
                    let work = Work {
                        partition,
                        offset,
                        event,
                    };
                    if queues[q].send(work).await.is_err() {
                        break;
                    }
                }
                Some(reason) => {
                    rt.dead_letter(m.key(), m.payload(), &reason).await;
                    offsets
                        .lock()
                        .expect("offsets lock")
                        .finished(partition, offset);
                }
            },
            Err(reason) => {
                rt.dead_letter(m.key(), m.payload(), &reason).await;
                offsets
                    .lock()
                    .expect("offsets lock")
                    .finished(partition, offset);
            }
        }
    }
    // Stopping: the queues finish what they hold, the tracker commits it.
    reloads.abort();
    drop(queues);
    for w in workers {
        let _ = w.await;
    }
    let _ = tracker.await;
    Ok(())
}

/// The event a record carries, or why it is not one.
fn parse(m: &BorrowedMessage<'_>) -> std::result::Result<Event, String> {
    let Some(payload) = m.payload() else {
        return Err("the record has no value".into());
    };
    let mut event: Event =
        serde_json::from_slice(payload).map_err(|e| format!("the value is not an event: {e}"))?;
    if event.user_id.is_empty()
        && let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok())
    {
        event.user_id = key.to_owned();
    }
    Ok(event)
}

/// The queue of the event's user.
fn queue_of(event: &Event, queues: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&event.app_id, &event.user_id).hash(&mut h);
    (h.finish() % queues as u64) as usize
}
