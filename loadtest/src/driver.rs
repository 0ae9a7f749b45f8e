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
use tonic::Code;
use tonic::transport::Channel;

use crate::config::{FireDist, RunConfig};
use crate::payload::{SEQ_HEADER, Stamp, key_for};
use crate::tracker::{Outcome, Tracker, now_ms, parse_id};

/// One node the load goes to, and its connections.
pub struct Target {
    /// As given (`host:port` or a URL).
    pub address: String,
    /// Its connections.
    pub clients: Vec<TimerServiceClient<Channel>>,
}

/// Opens `n` connections to each of `targets`, retrying for up to `wait` while the nodes
/// start.
pub async fn connect(targets: &[String], n: usize, wait: Duration) -> anyhow::Result<Vec<Target>> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::with_capacity(targets.len());
    for target in targets {
        let endpoint = timerdb_client::endpoint(target)
            .with_context(|| format!("--target {target:?}"))?
            .tcp_nodelay(true);
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
        out.push(Target {
            address: target.clone(),
            clients,
        });
    }
    Ok(out)
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
    /// Sent again to another node after a failed call or an UNAVAILABLE item.
    pub retried: AtomicU64,
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

    fn retried(&self, n: u64) {
        match self {
            Recorder::Tracked(t) => t.record_retried(n),
            Recorder::Counted(c) => {
                c.retried.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Whether a failed call may have failed for reasons another node (or a moment later)
/// would not have: retried, with the same idempotency keys, when `retry` is on.
fn retriable_call(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
    )
}

/// Whether a refused item asks to be sent again (the node's answer while a range moves).
fn retriable_item(code: i32) -> bool {
    matches!(
        Code::from(code),
        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
    )
}

/// Sends `load` and returns when every call was answered (or `max_time` passed); returns
/// how many timers were never sent because of `max_time`.
pub async fn drive(
    cfg: &RunConfig,
    targets: &[Target],
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
    let per_target = targets.iter().map(|t| t.clients.len()).min().unwrap_or(0);
    let workers = targets.len() * per_target * cfg.inflight;
    let mut tasks = tokio::task::JoinSet::new();
    // Worker w starts its calls on target w % n, on that target's connection
    // (w / n) % per_target, so batches spread evenly over the nodes and their connections.
    let senders: Vec<Vec<TimerServiceClient<Channel>>> =
        targets.iter().map(|t| t.clients.clone()).collect();
    let down: Arc<Vec<(String, AtomicU64)>> = Arc::new(
        targets
            .iter()
            .map(|t| (t.address.clone(), AtomicU64::new(0)))
            .collect(),
    );
    for w in 0..workers {
        let n = targets.len();
        let home = w % n;
        let conn = (w / n) % per_target;
        let clients: Vec<TimerServiceClient<Channel>> =
            senders.iter().map(|c| c[conn].clone()).collect();
        let (next, generator, rec, down) = (
            next.clone(),
            generator.clone(),
            recorder.clone(),
            down.clone(),
        );
        let (timeout, retry) = (cfg.call_timeout, cfg.retry);
        tasks.spawn(async move {
            let mut sender = Sender {
                clients,
                down,
                home,
                timeout,
                retry,
                rec,
            };
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= batches || start.elapsed() > generator.load.max_time {
                    return;
                }
                // Batch k is due when the run has sent k batches at the target rate; a late
                // sender goes at once so the rate catches up.
                let due = start
                    + Duration::from_secs_f64((k * batch) as f64 / generator.load.rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let first = k * batch;
                let last = (first + batch).min(generator.load.total);
                let (items, dues) = generator.batch(first..last);
                sender.rec.sent(last - first);
                let deadline = start + generator.load.max_time;
                sender.send(first, items, dues, deadline).await;
            }
        });
    }
    tasks.join_all().await;
    let sent_batches = next.load(Ordering::Relaxed).min(batches);
    load.total.saturating_sub(sent_batches * batch)
}

/// One worker's way of getting a batch acknowledged.
struct Sender {
    /// One connection per target, in target order.
    clients: Vec<TimerServiceClient<Channel>>,
    /// Per target: its address, and until when (ms) it is skipped.
    down: Arc<Vec<(String, AtomicU64)>>,
    /// The target this worker starts on.
    home: usize,
    timeout: Duration,
    retry: bool,
    rec: Recorder,
}

/// How long a target whose call failed is skipped.
const DOWN_FOR_MS: u64 = 1_000;

impl Sender {
    /// The first target, from `from` on, that is not being skipped (`from` itself when
    /// every one is).
    fn pick(&self, from: usize) -> usize {
        let n = self.clients.len();
        let now = now_ms();
        (0..n)
            .map(|i| (from + i) % n)
            .find(|&t| self.down[t].1.load(Ordering::Relaxed) <= now)
            .unwrap_or(from % n)
    }

    /// Sends timers `first..` (`items`, due at `dues`) until each is acknowledged or
    /// refused for good; with `retry`, failed calls and UNAVAILABLE items go to the next
    /// target after a short pause, until `deadline`.
    async fn send(
        &mut self,
        first: u64,
        items: Vec<SetTimeoutRequest>,
        dues: Vec<u64>,
        deadline: Instant,
    ) {
        let t = Instant::now();
        let mut ids: Vec<Option<u128>> = vec![None; items.len()];
        // Indices (into `items`) still to be acknowledged.
        let mut pending: Vec<usize> = (0..items.len()).collect();
        let mut target = self.pick(self.home);
        let mut attempt = 0u32;
        let mut call_failed = false;
        while !pending.is_empty() {
            let timers = pending.iter().map(|&i| items[i].clone()).collect();
            let mut request = tonic::Request::new(SetTimeoutsRequest { timers });
            request.set_timeout(self.timeout);
            let mut again = Vec::new();
            match self.clients[target].set_timeouts(request).await {
                Ok(resp) => {
                    call_failed = false;
                    let results = resp.into_inner().results;
                    let mut refused = (0, None);
                    for (j, &i) in pending.iter().enumerate() {
                        match results.get(j).and_then(|r| r.result.as_ref()) {
                            Some(set_timeout_result::Result::TimerId(id)) => ids[i] = parse_id(id),
                            Some(set_timeout_result::Result::Error(e)) => {
                                refused = (refused.0 + 1, refused.1.or(Some(e)));
                                if self.retry && retriable_item(e.code) {
                                    again.push(i)
                                }
                            }
                            None => {}
                        }
                    }
                    if let (n, Some(e)) = refused {
                        // Why items were refused, once per call: the report counts them only.
                        tracing::warn!(
                            target = %self.down[target].0,
                            refused = n,
                            code = ?tonic::Code::from_i32(e.code),
                            message = %e.message,
                            "loadtest.set_timeouts refused items"
                        );
                    }
                }
                Err(status) => {
                    tracing::warn!(
                        target = %self.down[target].0,
                        code = ?status.code(),
                        message = status.message(),
                        "loadtest.set_timeouts failed"
                    );
                    call_failed = true;
                    if !retriable_call(status.code()) {
                        break;
                    }
                    // Later batches go to the other targets for a while, retried or not.
                    if self.clients.len() > 1 {
                        self.down[target]
                            .1
                            .store(now_ms() + DOWN_FOR_MS, Ordering::Relaxed);
                    }
                    if !self.retry {
                        break;
                    }
                    again = pending.clone();
                }
            }
            if again.is_empty() || Instant::now() >= deadline {
                pending = again;
                break;
            }
            self.rec.retried(again.len() as u64);
            pending = again;
            attempt += 1;
            tokio::time::sleep(Duration::from_millis((20 * u64::from(attempt)).min(500))).await;
            target = self.pick(target + 1);
        }
        // Items of a call that got no answer were neither acknowledged nor refused (their
        // write may have landed): counted as failed, not as refused.
        let unanswered: Vec<usize> = if call_failed { pending } else { Vec::new() };
        if !unanswered.is_empty() {
            self.rec.failed(unanswered.len() as u64);
        }
        let call_us = t.elapsed().as_micros() as u64;
        let outcomes: Vec<Outcome> = ids
            .into_iter()
            .zip(dues)
            .enumerate()
            .filter(|(i, _)| !unanswered.contains(i))
            .map(|(i, (id, due_ms))| Outcome {
                seq: first + i as u64,
                due_ms,
                id,
            })
            .collect();
        if !outcomes.is_empty() {
            self.rec.answered(&outcomes, call_us);
        }
    }
}

struct Generator {
    run_id: u64,
    start_ms: u64,
    load: Load,
    topics: Vec<String>,
    cfg: RunConfig,
}

impl Generator {
    /// The items for timers `seqs`, and when each is due.
    fn batch(&self, seqs: std::ops::Range<u64>) -> (Vec<SetTimeoutRequest>, Vec<u64>) {
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
                idempotency_key: self.cfg.idempotency_key(self.run_id, seq),
            });
        }
        (timers, dues)
    }
}
