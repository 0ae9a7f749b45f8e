//! Sends timers: `SetTimeouts` batches paced to a target rate from several connections,
//! each with a few calls in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use rand::Rng;
use timerdb_proto::v1::timer_service_client::TimerServiceClient;
use timerdb_proto::v1::{SetTimeoutRequest, SetTimeoutsRequest, set_timeout_result};
use tonic::transport::Channel;

use crate::config::{FireDist, RunConfig};
use crate::payload::{SEQ_HEADER, Stamp, key_for};
use crate::tracker::{Outcome, Tracker, now_ms, parse_id};

/// Opens `n` connections to `target`, retrying for up to `wait` while the node starts.
pub async fn connect(
    target: &str,
    n: usize,
    wait: Duration,
) -> anyhow::Result<Vec<TimerServiceClient<Channel>>> {
    let endpoint = timerdb_client::endpoint(target)
        .with_context(|| format!("--target {target:?}"))?
        .tcp_nodelay(true);
    let deadline = Instant::now() + wait;
    let mut clients = Vec::with_capacity(n);
    while clients.len() < n {
        match endpoint.connect().await {
            Ok(ch) => clients.push(
                TimerServiceClient::new(ch)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            ),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to {target}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(clients)
}

/// What one phase sends.
#[derive(Debug, Clone)]
pub struct Load {
    /// Timers to send.
    pub total: u64,
    /// Timers/s.
    pub rate: u64,
    /// Fire-time distribution.
    pub fire: FireDist,
    /// Payload size.
    pub payload_bytes: usize,
    /// Backlog timers are stamped as such and not tracked.
    pub backlog: bool,
    /// Stop sending after this long even if not all were sent (the node is too slow).
    pub max_time: Duration,
}

/// Counts of an untracked phase (the backlog fill).
#[derive(Debug, Default)]
pub struct PhaseCounts {
    /// Timers sent.
    pub sent: AtomicU64,
    /// Acknowledged.
    pub acked: AtomicU64,
    /// Refused or in failed calls.
    pub failed: AtomicU64,
}

/// Where a phase's results go.
#[derive(Clone)]
pub enum Recorder {
    /// The measured phase: every timer checked.
    Tracked(Arc<Tracker>),
    /// The backlog fill: counted only.
    Counted(Arc<PhaseCounts>),
}

impl Recorder {
    fn sent(&self, n: u64) {
        match self {
            Recorder::Tracked(t) => t.record_sent(n),
            Recorder::Counted(c) => {
                c.sent.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    fn answered(&self, outcomes: &[Outcome], call_us: u64) {
        match self {
            Recorder::Tracked(t) => t.record_acks(outcomes, call_us),
            Recorder::Counted(c) => {
                let ok = outcomes.iter().filter(|o| o.id.is_some()).count() as u64;
                c.acked.fetch_add(ok, Ordering::Relaxed);
                c.failed
                    .fetch_add(outcomes.len() as u64 - ok, Ordering::Relaxed);
            }
        }
    }

    fn failed(&self, n: u64) {
        match self {
            Recorder::Tracked(t) => t.record_failed(n),
            Recorder::Counted(c) => {
                c.failed.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Sends `load` and returns when every call was answered (or `max_time` passed); returns
/// how many timers were never sent because of `max_time`.
pub async fn drive(
    cfg: &RunConfig,
    clients: &[TimerServiceClient<Channel>],
    load: Load,
    run_id: u64,
    recorder: Recorder,
) -> u64 {
    let batch = cfg.batch as u64;
    let batches = load.total.div_ceil(batch);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let start_ms = now_ms();
    let generator = Arc::new(Generator {
        run_id,
        start_ms,
        load: load.clone(),
        topics: cfg.topic_names(),
        cfg: cfg.clone(),
    });
    let mut tasks = Vec::new();
    for w in 0..clients.len() * cfg.inflight {
        let mut client = clients[w % clients.len()].clone();
        let (next, generator, rec) = (next.clone(), generator.clone(), recorder.clone());
        let timeout = cfg.call_timeout;
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= batches || start.elapsed() > generator.load.max_time {
                    return;
                }
                // Batch k is due when the run has sent k batches at the target rate; a late
                // sender goes at once so the rate catches up.
                let due = start + Duration::from_secs_f64((k * batch) as f64 / generator.load.rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let first = k * batch;
                let last = (first + batch).min(generator.load.total);
                let (req, dues) = generator.batch(first..last);
                rec.sent(last - first);
                let mut request = tonic::Request::new(req);
                request.set_timeout(timeout);
                let t = Instant::now();
                match client.set_timeouts(request).await {
                    Ok(resp) => {
                        let call_us = t.elapsed().as_micros() as u64;
                        let results = resp.into_inner().results;
                        let outcomes: Vec<Outcome> = (first..last)
                            .zip(dues)
                            .enumerate()
                            .map(|(i, (seq, due_ms))| Outcome {
                                seq,
                                due_ms,
                                id: results.get(i).and_then(|r| match &r.result {
                                    Some(set_timeout_result::Result::TimerId(id)) => parse_id(id),
                                    _ => None,
                                }),
                            })
                            .collect();
                        rec.answered(&outcomes, call_us);
                    }
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), message = status.message(), "loadtest.set_timeouts failed");
                        rec.failed(last - first);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let sent_batches = next.load(Ordering::Relaxed).min(batches);
    load.total.saturating_sub(sent_batches * batch)
}

struct Generator {
    run_id: u64,
    start_ms: u64,
    load: Load,
    topics: Vec<String>,
    cfg: RunConfig,
}

impl Generator {
    /// The request for timers `seqs`, and when each is due.
    fn batch(&self, seqs: std::ops::Range<u64>) -> (SetTimeoutsRequest, Vec<u64>) {
        let mut rng = rand::rng();
        let now = now_ms();
        let mut timers = Vec::with_capacity((seqs.end - seqs.start) as usize);
        let mut dues = Vec::with_capacity(timers.capacity());
        for seq in seqs {
            let ms = |d: Duration| d.as_millis() as u64;
            let fire_at_ms = match &self.load.fire {
                FireDist::Fixed(d) => now + ms(*d),
                FireDist::Uniform(lo, hi) => now + rng.random_range(ms(*lo)..=ms(*hi)),
                FireDist::Burst(d) => self.start_ms + ms(*d),
                FireDist::Past(lo, hi) => now.saturating_sub(rng.random_range(ms(*lo)..=ms(*hi))),
            };
            let stamp = Stamp {
                run_id: self.run_id,
                seq,
                fire_at_ms,
                sent_ms: now,
                backlog: self.load.backlog,
            };
            dues.push(stamp.due_ms());
            let (topic, partition) = self.cfg.route(seq);
            let mut headers = HashMap::with_capacity(1);
            headers.insert(SEQ_HEADER.to_owned(), Bytes::from(seq.to_string()));
            timers.push(SetTimeoutRequest {
                fire_at: Some(timerdb_client::time::timestamp(fire_at_ms)),
                payload: Bytes::from(stamp.encode(self.load.payload_bytes)),
                topic: self.topics[topic].clone(),
                partition,
                key: Bytes::copy_from_slice(&key_for(seq)),
                headers,
                idempotency_key: String::new(),
            });
        }
        (SetTimeoutsRequest { timers }, dues)
    }
}
