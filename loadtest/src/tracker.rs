//! The checker: remembers what the node acknowledged, matches every arrival against it and
//! keeps the latency histograms, overall and per second of the run.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::payload::{Arrival, SEQ_HEADER, Stamp, key_for};

/// Wall-clock now, ms since the epoch (the node stamps `timerdb-fired-at` on the same clock).
pub use timerdb_client::time::now_ms;

/// A fresh auto-resizing histogram; `sigfig` 3 overall, 2 per second to keep them small.
pub fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new(sigfig).expect("valid sigfig")
}

/// What happened to the timers of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Timers sent in `SetTimeouts` calls.
    pub sent: u64,
    /// Acknowledged with an id.
    pub acked: u64,
    /// Refused by the node, item by item.
    pub rejected: u64,
    /// In calls that failed or timed out (neither acknowledged nor refused).
    pub failed: u64,
    /// Messages of this run read back, duplicates included.
    pub arrivals: u64,
    /// Acknowledged timers read back at least once.
    pub delivered: u64,
    /// Acknowledged and never read back.
    pub lost: u64,
    /// Produced before their epoch (backlog timers that fired count here too).
    pub early: u64,
    /// Extra copies beyond the first.
    pub duplicates: u64,
    /// Payload, key, headers, id or route not what was sent.
    pub corrupt: u64,
    /// Arrived although their call failed: allowed (the write may have landed).
    pub unacked_delivered: u64,
    /// Timers of other runs on the same sink (ignored).
    pub foreign: u64,
    /// Messages that are not loadtest timers, or carry an unknown sequence number.
    pub unexpected: u64,
    /// Backlog timers that fired during the run (also counted in `early`).
    pub backlog_fired: u64,
}

/// One second of the run (by ack time for sends, by fire time for arrivals).
#[derive(Debug)]
pub struct Second {
    /// Timers acknowledged in this second.
    pub acked: u64,
    /// Arrivals fired in this second.
    pub delivered: u64,
    /// Fire lateness (node's `fired_at` − due), ms.
    pub lateness: Histogram<u64>,
    /// Receive lateness (consumer clock − due), ms; Kafka only.
    pub recv_lateness: Histogram<u64>,
    /// `SetTimeouts` call latency, µs.
    pub call_us: Histogram<u64>,
    /// Node RSS, bytes, when sampled.
    pub rss_bytes: Option<u64>,
    /// Node CPU over the second, percent of one core, when sampled.
    pub cpu_pct: Option<f64>,
}

impl Default for Second {
    fn default() -> Second {
        Second {
            acked: 0,
            delivered: 0,
            lateness: histogram(2),
            recv_lateness: histogram(2),
            call_us: histogram(2),
            rss_bytes: None,
            cpu_pct: None,
        }
    }
}

/// The outcome of one item of a `SetTimeouts` call.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Sequence number of the item.
    pub seq: u64,
    /// When it is due (see `Stamp::due_ms`).
    pub due_ms: u64,
    /// The id the node gave it, `None` when refused.
    pub id: Option<u128>,
}

/// Everything measured, taken out of the tracker at the end.
#[derive(Debug)]
pub struct Finished {
    /// Final counts.
    pub counts: Counts,
    /// Fire lateness, ms.
    pub lateness: Histogram<u64>,
    /// Receive lateness, ms (Kafka only).
    pub recv_lateness: Histogram<u64>,
    /// Call latency, µs.
    pub call_us: Histogram<u64>,
    /// Per second of the run.
    pub seconds: Vec<Second>,
    /// First and last acknowledgement, ms since the epoch.
    pub ack_span_ms: (u64, u64),
    /// First and last arrival (node fire time), ms since the epoch.
    pub arrival_span_ms: (u64, u64),
    /// Re-deliveries after the kill, in the crash scenario.
    pub redelivery: Option<Redelivery>,
}

/// Live figures for the progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    /// Timers sent so far.
    pub sent: u64,
    /// Acknowledged so far.
    pub acked: u64,
    /// Acknowledged timers seen so far.
    pub delivered: u64,
    /// Acked in the last full second.
    pub acked_rate: u64,
    /// Arrivals in the last full second.
    pub delivered_rate: u64,
    /// p99 lateness in the last full second, ms.
    pub p99_ms: u64,
    /// Lost or early so far (early is final; lost only means "not yet").
    pub early: u64,
}

struct Inner {
    acked: Vec<u128>,
    seen: Vec<u128>,
    hits: Vec<u8>,
    /// Node fire time of each timer's first arrival.
    first_fired: Vec<u64>,
    /// When the node was killed (crash scenario).
    kill_ms: Option<u64>,
    counts: Counts,
    /// Acknowledged timers seen at least once, maintained as either side comes first.
    matched: u64,
    max_due_ms: u64,
    lateness: Histogram<u64>,
    recv_lateness: Histogram<u64>,
    call_us: Histogram<u64>,
    seconds: Vec<Second>,
    ack_span_ms: (u64, u64),
    arrival_span_ms: (u64, u64),
}

/// Shared between the senders, the consumer and the sampler of one run.
pub struct Tracker {
    run_id: u64,
    t0_ms: u64,
    topics: Vec<String>,
    partitions: i32,
    inner: Mutex<Inner>,
}

/// Longest run the per-second timeline covers; arrivals outside it still count overall.
const MAX_SECONDS: usize = 7 * 24 * 3600;

impl Tracker {
    /// A tracker for `total` timers whose clock starts now.
    pub fn new(run_id: u64, total: u64, topics: Vec<String>, partitions: i32) -> Tracker {
        let n = total as usize;
        Tracker {
            run_id,
            t0_ms: now_ms(),
            topics,
            partitions,
            inner: Mutex::new(Inner {
                acked: vec![0; n],
                seen: vec![0; n],
                hits: vec![0; n],
                first_fired: vec![0; n],
                kill_ms: None,
                counts: Counts::default(),
                matched: 0,
                max_due_ms: 0,
                lateness: histogram(3),
                recv_lateness: histogram(3),
                call_us: histogram(3),
                seconds: Vec::new(),
                ack_span_ms: (u64::MAX, 0),
                arrival_span_ms: (u64::MAX, 0),
            }),
        }
    }

    /// Random per run; stamped into every payload.
    pub fn run_id(&self) -> u64 {
        self.run_id
    }

    /// Start of the run, ms since the epoch.
    pub fn t0_ms(&self) -> u64 {
        self.t0_ms
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("tracker lock")
    }

    fn second_index(&self, at_ms: u64) -> Option<usize> {
        let i = (at_ms.saturating_sub(self.t0_ms) / 1000) as usize;
        (i < MAX_SECONDS).then_some(i)
    }

    /// Records `n` timers about to be sent.
    pub fn record_sent(&self, n: u64) {
        self.lock().counts.sent += n;
    }

    /// Records the answer to one call.
    pub fn record_acks(&self, outcomes: &[Outcome], call_us: u64) {
        let now = now_ms();
        let sec = self.second_index(now);
        let mut g = self.lock();
        let inner = &mut *g;
        let _ = inner.call_us.record(call_us);
        let mut acked = 0;
        for o in outcomes {
            let Some(id) = o.id else {
                inner.counts.rejected += 1;
                continue;
            };
            let i = o.seq as usize;
            if i >= inner.acked.len() {
                continue;
            }
            inner.acked[i] = id;
            acked += 1;
            inner.max_due_ms = inner.max_due_ms.max(o.due_ms);
            if inner.hits[i] > 0 {
                inner.matched += 1;
            }
        }
        inner.counts.acked += acked;
        inner.ack_span_ms.0 = inner.ack_span_ms.0.min(now);
        inner.ack_span_ms.1 = inner.ack_span_ms.1.max(now);
        if let Some(s) = sec {
            let s = second(&mut inner.seconds, s);
            s.acked += acked;
            let _ = s.call_us.record(call_us);
        }
    }

    /// Records a call that got no answer.
    pub fn record_failed(&self, n: u64) {
        self.lock().counts.failed += n;
    }

    /// Checks and records messages read back from the sink.
    pub fn ingest(&self, arrivals: &[Arrival]) {
        let mut g = self.lock();
        for a in arrivals {
            self.ingest_one(&mut g, a);
        }
    }

    fn ingest_one(&self, inner: &mut Inner, a: &Arrival) {
        let Some(stamp) = Stamp::decode(&a.payload) else {
            inner.counts.unexpected += 1;
            return;
        };
        if stamp.run_id != self.run_id {
            inner.counts.foreign += 1;
            return;
        }
        if stamp.backlog {
            inner.counts.backlog_fired += 1;
            inner.counts.early += 1;
            return;
        }
        let i = stamp.seq as usize;
        if i >= inner.hits.len() {
            inner.counts.unexpected += 1;
            return;
        }
        inner.counts.arrivals += 1;
        inner.hits[i] = inner.hits[i].saturating_add(1);
        if inner.hits[i] == 1 {
            inner.seen[i] = parse_id(&a.timer_id).unwrap_or(u128::MAX);
            if inner.acked[i] != 0 {
                inner.matched += 1;
            }
        }
        if !self.intact(a, &stamp) {
            inner.counts.corrupt += 1;
        }
        let Some(fired) = a.fired_at_ms else {
            inner.counts.corrupt += 1;
            return;
        };
        if inner.hits[i] == 1 {
            inner.first_fired[i] = fired;
        }
        let early = fired < stamp.fire_at_ms || a.received_ms.is_some_and(|r| r < stamp.fire_at_ms);
        if early {
            inner.counts.early += 1;
        }
        let due = stamp.due_ms();
        let late = fired.saturating_sub(due);
        let _ = inner.lateness.record(late);
        inner.arrival_span_ms.0 = inner.arrival_span_ms.0.min(fired);
        inner.arrival_span_ms.1 = inner.arrival_span_ms.1.max(fired);
        let recv_late = a.received_ms.map(|r| r.saturating_sub(due));
        if let Some(r) = recv_late {
            let _ = inner.recv_lateness.record(r);
        }
        if let Some(s) = self.second_index(fired) {
            let s = second(&mut inner.seconds, s);
            s.delivered += 1;
            let _ = s.lateness.record(late);
            if let Some(r) = recv_late {
                let _ = s.recv_lateness.record(r);
            }
        }
    }

    /// Whether key, headers and route are what timer `stamp.seq` was sent with.
    fn intact(&self, a: &Arrival, stamp: &Stamp) -> bool {
        let topics = self.topics.len() as u64;
        let topic = &self.topics[(stamp.seq % topics) as usize];
        let partition = ((stamp.seq / topics) % self.partitions as u64) as i32;
        a.key == key_for(stamp.seq)
            && a.topic == *topic
            && a.partition == partition
            && a.header_u64(SEQ_HEADER) == Some(stamp.seq)
            && a.header_u64("timerdb-fire-at") == Some(stamp.fire_at_ms)
            && a.header("timerdb-id") == Some(a.timer_id.as_bytes())
    }

    /// Records one sample of the node's resource use.
    pub fn record_server(&self, at_ms: u64, rss_bytes: u64, cpu_pct: Option<f64>) {
        if let Some(s) = self.second_index(at_ms) {
            let mut g = self.lock();
            let s = second(&mut g.seconds, s);
            s.rss_bytes = Some(rss_bytes);
            s.cpu_pct = cpu_pct;
        }
    }

    /// Whether every acknowledged timer has arrived, and the latest due time among them.
    pub fn progress(&self) -> (bool, u64) {
        let g = self.lock();
        (g.matched >= g.counts.acked, g.max_due_ms)
    }

    /// Figures for the progress bar.
    pub fn live(&self) -> Live {
        let g = self.lock();
        let last_full = self.second_index(now_ms()).and_then(|s| s.checked_sub(1));
        let sec = last_full.and_then(|s| g.seconds.get(s));
        Live {
            sent: g.counts.sent,
            acked: g.counts.acked,
            delivered: g.matched,
            acked_rate: sec.map_or(0, |s| s.acked),
            delivered_rate: sec.map_or(0, |s| s.delivered),
            p99_ms: sec.map_or(0, |s| s.lateness.value_at_quantile(0.99)),
            early: g.counts.early,
        }
    }

    /// Records that the node was killed now (the crash scenario).
    pub fn record_kill(&self, at_ms: u64) {
        self.lock().kill_ms = Some(at_ms);
    }

    /// Final verdict per timer, and everything measured.
    pub fn finish(&self) -> Finished {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut c = std::mem::take(&mut inner.counts);
        let mut redelivery = inner.kill_ms.map(|kill_ms| Redelivery {
            kill_ms,
            ..Redelivery::default()
        });
        for i in 0..inner.acked.len() {
            let (acked, seen, hits) = (inner.acked[i], inner.seen[i], inner.hits[i]);
            if hits > 1 {
                c.duplicates += u64::from(hits - 1);
                if let Some(r) = redelivery.as_mut() {
                    let first = inner.first_fired[i];
                    if first < r.kill_ms {
                        r.timers += 1;
                        r.window_ms = r.window_ms.max(r.kill_ms - first);
                    } else {
                        r.after_kill += 1;
                    }
                }
            }
            match (acked != 0, hits > 0) {
                (true, true) => {
                    c.delivered += 1;
                    if acked != seen {
                        c.corrupt += 1;
                    }
                }
                (true, false) => c.lost += 1,
                (false, true) => c.unacked_delivered += 1,
                (false, false) => {}
            }
        }
        Finished {
            counts: c,
            lateness: std::mem::replace(&mut inner.lateness, histogram(3)),
            recv_lateness: std::mem::replace(&mut inner.recv_lateness, histogram(3)),
            call_us: std::mem::replace(&mut inner.call_us, histogram(3)),
            seconds: std::mem::take(&mut inner.seconds),
            ack_span_ms: inner.ack_span_ms,
            arrival_span_ms: inner.arrival_span_ms,
            redelivery,
        }
    }
}

/// What came again after a kill -9 (the crash scenario).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Redelivery {
    /// When the node was killed, ms since the epoch.
    pub kill_ms: u64,
    /// Timers first delivered before the kill and delivered again after it.
    pub timers: u64,
    /// How long before the kill the oldest of them was first delivered (the re-delivery
    /// window), ms.
    pub window_ms: u64,
    /// Timers first delivered after the kill and delivered again (no crash explains these).
    pub after_kill: u64,
}

fn second(seconds: &mut Vec<Second>, i: usize) -> &mut Second {
    if seconds.len() <= i {
        seconds.resize_with(i + 1, Second::default);
    }
    &mut seconds[i]
}

/// A timer id (32 hex digits) as a number; ids are never 0.
pub fn parse_id(id: &str) -> Option<u128> {
    if id.len() != 32 {
        return None;
    }
    u128::from_str_radix(id, 16).ok().filter(|v| *v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(t: &Tracker, seq: u64, fire_at: u64, fired: u64, id: &str) -> Arrival {
        let stamp = Stamp {
            run_id: t.run_id(),
            seq,
            fire_at_ms: fire_at,
            sent_ms: fire_at - 5,
            backlog: false,
        };
        Arrival {
            timer_id: id.into(),
            topic: "t-0".into(),
            partition: 0,
            key: key_for(seq).to_vec(),
            payload: stamp.encode(64),
            headers: vec![
                (SEQ_HEADER.into(), seq.to_string().into_bytes()),
                ("timerdb-fire-at".into(), fire_at.to_string().into_bytes()),
                ("timerdb-id".into(), id.as_bytes().to_vec()),
            ],
            fired_at_ms: Some(fired),
            received_ms: None,
        }
    }

    #[test]
    fn classifies_lost_early_duplicate_and_late_acks() {
        let t = Tracker::new(9, 4, vec!["t-0".into()], 1);
        let now = now_ms();
        let id = |n: u128| format!("{n:032x}");
        // Seq 0 arrives before its ack is recorded, twice; seq 1 is early; seq 2 is lost;
        // seq 3 is refused.
        t.ingest(&[arrival(&t, 0, now, now + 3, &id(1))]);
        t.ingest(&[arrival(&t, 0, now, now + 4, &id(1))]);
        t.ingest(&[arrival(&t, 1, now, now - 1, &id(2))]);
        let outcomes: Vec<Outcome> = (0..4)
            .map(|s| Outcome {
                seq: s,
                due_ms: now,
                id: (s < 3).then_some(s as u128 + 1),
            })
            .collect();
        t.record_acks(&outcomes, 100);
        assert!(!t.progress().0);
        let f = t.finish();
        let c = f.counts;
        assert_eq!((c.acked, c.rejected, c.delivered), (3, 1, 2));
        assert_eq!((c.lost, c.early, c.duplicates, c.corrupt), (1, 1, 1, 0));
        assert_eq!(f.lateness.max(), 4);
    }
}
