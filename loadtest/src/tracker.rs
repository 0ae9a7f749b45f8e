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
    /// Sent again, to another node, after a failed call or an UNAVAILABLE answer (each
    /// time counts; with `retry` only).
    pub retried: u64,
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
    /// With retries: timers that arrived under two ids, the acknowledged one and that of
    /// an earlier attempt whose outcome never reached the loadtest (a failed or timed-out
    /// call it sent again): the at-least-once case of an unknown outcome, not corruption.
    /// Counted in `duplicates` too.
    pub two_ids: u64,
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
    /// How the killed member's slots fared, in the failover scenario.
    pub takeover: Option<Takeover>,
    /// Some of the timers that failed the check, by id, to look up in the nodes' logs.
    pub samples: Samples,
}

/// Up to [`SAMPLES`] ids of each kind of failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Samples {
    /// Acknowledged ids never read back.
    pub lost: Vec<String>,
    /// (acknowledged id, id first read back) of timers that arrived under another id.
    pub other_id: Vec<(String, String)>,
}

/// How many ids of each failure a report names.
pub const SAMPLES: usize = 20;

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
    /// Another id a timer arrived under after its first arrival (0: none).
    other_id: Vec<u128>,
    hits: Vec<u8>,
    /// Node fire time of each timer's first arrival.
    first_fired: Vec<u64>,
    /// Node fire time of each timer's latest arrival.
    last_fired: Vec<u64>,
    /// When each acknowledged timer is due.
    due: Vec<u64>,
    /// When the node was killed (crash scenario).
    kill_ms: Option<u64>,
    /// Failover: the member hit, the slot count, and the slots it owned then.
    fault: Option<(u64, u32, Vec<bool>)>,
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
    /// Failed calls are sent again (so one timer may arrive under two ids).
    retries: bool,
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
            retries: false,
            inner: Mutex::new(Inner {
                acked: vec![0; n],
                seen: vec![0; n],
                other_id: vec![0; n],
                hits: vec![0; n],
                first_fired: vec![0; n],
                last_fired: vec![0; n],
                due: vec![0; n],
                kill_ms: None,
                fault: None,
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

    /// A tracker of a run that sends failed calls again (`retries`).
    pub fn with_retries(mut self, retries: bool) -> Tracker {
        self.retries = retries;
        self
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
            inner.due[i] = o.due_ms;
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

    /// Records `n` timers sent again.
    pub fn record_retried(&self, n: u64) {
        self.lock().counts.retried += n;
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
        let arrived_as = parse_id(&a.timer_id).unwrap_or(u128::MAX);
        if inner.hits[i] == 1 {
            inner.seen[i] = arrived_as;
            if inner.acked[i] != 0 {
                inner.matched += 1;
            }
        } else if arrived_as != inner.seen[i] {
            inner.other_id[i] = arrived_as;
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
        inner.last_fired[i] = inner.last_fired[i].max(fired);
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

    /// Records the member the failover fault hits and the slots (of `slots`) it owned
    /// right before.
    pub fn record_fault_slots(&self, node: u64, slots: u32, owned: Vec<bool>) {
        self.lock().fault = Some((node, slots, owned));
    }

    /// Final verdict per timer, and everything measured.
    pub fn finish(&self) -> Finished {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut c = std::mem::take(&mut inner.counts);
        let mut samples = Samples::default();
        let mut redelivery = inner.kill_ms.map(|kill_ms| Redelivery {
            kill_ms,
            ..Redelivery::default()
        });
        for i in 0..inner.acked.len() {
            let (acked, seen, hits) = (inner.acked[i], inner.seen[i], inner.hits[i]);
            // Under two ids, one of them the acknowledged retry of an unknown outcome.
            let other = inner.other_id[i];
            let retried_twice =
                self.retries && acked != 0 && other != 0 && (acked == seen || acked == other);
            if hits > 1 {
                c.duplicates += u64::from(hits - 1);
                if retried_twice {
                    c.two_ids += 1;
                } else if let Some(r) = redelivery.as_mut() {
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
                    if acked != seen || other != 0 {
                        if !retried_twice {
                            c.corrupt += 1;
                        }
                        if samples.other_id.len() < SAMPLES {
                            samples
                                .other_id
                                .push((format!("{acked:032x}"), format!("{seen:032x}")));
                        }
                    }
                }
                (true, false) => {
                    c.lost += 1;
                    if samples.lost.len() < SAMPLES {
                        samples.lost.push(format!("{acked:032x}"));
                    }
                }
                (false, true) => c.unacked_delivered += 1,
                (false, false) => {}
            }
        }
        let takeover = match (&inner.fault, inner.kill_ms) {
            (Some((node, slots, owned)), Some(kill_ms)) => {
                Some(takeover(inner, *node, *slots, owned, kill_ms, c.duplicates))
            }
            _ => None,
        };
        Finished {
            takeover,
            counts: c,
            lateness: std::mem::replace(&mut inner.lateness, histogram(3)),
            recv_lateness: std::mem::replace(&mut inner.recv_lateness, histogram(3)),
            call_us: std::mem::replace(&mut inner.call_us, histogram(3)),
            seconds: std::mem::take(&mut inner.seconds),
            ack_span_ms: inner.ack_span_ms,
            arrival_span_ms: inner.arrival_span_ms,
            redelivery,
            samples,
        }
    }
}

/// The failover scenario's findings about the killed member's slots.
#[derive(Debug)]
pub struct Takeover {
    /// The member killed.
    pub node: u64,
    /// Slots it owned right before the kill, of `slot_count`.
    pub slots_owned: u32,
    /// The cluster's slot count.
    pub slot_count: u32,
    /// When it was killed, ms since the epoch.
    pub kill_ms: u64,
    /// Its timers: acknowledged, in its slots, not delivered before the kill.
    pub timers: u64,
    /// How many of those never arrived.
    pub lost: u64,
    /// From the kill to the first delivery of one of its timers, ms; `None` if none came.
    pub gap_ms: Option<u64>,
    /// Fire lateness of its timers, ms.
    pub lateness: Histogram<u64>,
    /// Fire lateness of the other members' timers due after the kill, ms (the baseline).
    pub others_lateness: Histogram<u64>,
    /// Its timers delivered per second in the 5 s before the kill.
    pub fired_per_s_before: f64,
    /// All duplicates of the run, in seconds of its firing (`duplicates / fired_per_s_before`).
    pub duplicates_in_s_of_its_fires: Option<f64>,
    /// Timers that arrived more than once: (in its slots, in the others'), each as (count,
    /// earliest first fire, latest repeat), the times in ms relative to the kill.
    pub repeated: [(u64, i64, i64); 2],
}

/// Splits the acknowledged timers by the killed member's slots and measures its takeover.
fn takeover(
    inner: &Inner,
    node: u64,
    slots: u32,
    owned: &[bool],
    kill_ms: u64,
    duplicates: u64,
) -> Takeover {
    const BEFORE_MS: u64 = 5_000;
    let mut t = Takeover {
        node,
        slots_owned: owned.iter().filter(|o| **o).count() as u32,
        slot_count: slots,
        kill_ms,
        timers: 0,
        lost: 0,
        gap_ms: None,
        lateness: histogram(3),
        others_lateness: histogram(3),
        fired_per_s_before: 0.0,
        duplicates_in_s_of_its_fires: None,
        repeated: [(0, i64::MAX, i64::MIN); 2],
    };
    let mut before = 0u64;
    for i in 0..inner.acked.len() {
        let id = inner.acked[i];
        if id == 0 {
            continue;
        }
        let delivered = inner.hits[i] > 0;
        let first = inner.first_fired[i];
        let late = first.saturating_sub(inner.due[i]);
        let slot = timerdb_client::slot_of(&format!("{id:032x}"), slots);
        let its = slot.is_some_and(|s| owned.get(s as usize).copied().unwrap_or(false));
        if inner.hits[i] > 1 {
            let r = &mut t.repeated[usize::from(!its)];
            r.0 += 1;
            r.1 = r.1.min(first as i64 - kill_ms as i64);
            r.2 = r.2.max(inner.last_fired[i] as i64 - kill_ms as i64);
        }
        if !its {
            if delivered && inner.due[i] >= kill_ms {
                let _ = t.others_lateness.record(late);
            }
            continue;
        }
        if delivered && first < kill_ms {
            if first + BEFORE_MS >= kill_ms {
                before += 1;
            }
            continue;
        }
        t.timers += 1;
        if !delivered {
            t.lost += 1;
            continue;
        }
        let _ = t.lateness.record(late);
        let gap = first - kill_ms;
        t.gap_ms = Some(t.gap_ms.map_or(gap, |g| g.min(gap)));
    }
    t.fired_per_s_before = before as f64 * 1000.0 / BEFORE_MS as f64;
    t.duplicates_in_s_of_its_fires = (before > 0).then(|| duplicates as f64 / t.fired_per_s_before);
    t
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
        // The report names the lost timer's id, to look it up in the nodes' logs.
        assert_eq!(f.samples.lost, vec![id(3)]);
        assert!(f.samples.other_id.is_empty());
    }

    /// A timer acknowledged under one id and read back under another (a retry stored it
    /// again) is corrupt, and the report names both ids; in a run with retries, a timer
    /// that arrived under both its acknowledged id and an earlier attempt's is counted
    /// apart (the at-least-once case of an unknown outcome), not as corrupt.
    #[test]
    fn an_arrival_under_another_id_is_named_with_both_ids() {
        let t = Tracker::new(9, 1, vec!["t-0".into()], 1);
        let now = now_ms();
        let id = |n: u128| format!("{n:032x}");
        t.ingest(&[arrival(&t, 0, now, now + 1, &id(7))]);
        t.record_acks(
            &[Outcome {
                seq: 0,
                due_ms: now,
                id: Some(8),
            }],
            100,
        );
        let f = t.finish();
        assert_eq!((f.counts.delivered, f.counts.corrupt), (1, 1));
        assert_eq!(f.samples.other_id, vec![(id(8), id(7))]);

        let t = Tracker::new(9, 2, vec!["t-0".into()], 1).with_retries(true);
        t.ingest(&[
            arrival(&t, 0, now, now + 1, &id(7)),
            arrival(&t, 0, now, now + 2, &id(8)),
            arrival(&t, 1, now, now + 1, &id(5)),
        ]);
        let acks = [(0, 8), (1, 6)].map(|(seq, n)| Outcome {
            seq,
            due_ms: now,
            id: Some(n),
        });
        t.record_acks(&acks, 100);
        let f = t.finish();
        // Timer 0 came as the first attempt's 7 and as the acknowledged 8; timer 1 came
        // only as 5, never as its acknowledged 6: that stays corrupt.
        assert_eq!(
            (f.counts.two_ids, f.counts.duplicates, f.counts.corrupt),
            (1, 1, 1)
        );
    }

    /// An id whose slot (of `slots`) is `want`.
    fn id_in_slot(want: u32, slots: u32, from: u128) -> u128 {
        (from..)
            .find(|id| timerdb_client::slot_of(&format!("{id:032x}"), slots) == Some(want))
            .expect("some id lands in every slot")
    }

    #[test]
    fn failover_follows_the_killed_members_slots() {
        let t = Tracker::new(7, 5, vec!["t-0".into()], 1);
        let kill = now_ms();
        let hex = |n: u128| format!("{n:032x}");
        // Member 2 owns slot 1 of 4. Seq 0: its, fired before the kill (not its to take
        // over); seq 1: its, due 100 ms before the kill, fired 900 ms after it; seq 2: its,
        // due at the kill, fired 1,200 ms after it, twice; seq 3: its, never fired; seq 4:
        // another member's, due after the kill, fired 5 ms late.
        let ids: Vec<u128> = vec![
            id_in_slot(1, 4, 1),
            id_in_slot(1, 4, 1000),
            id_in_slot(1, 4, 2000),
            id_in_slot(1, 4, 3000),
            id_in_slot(0, 4, 4000),
        ];
        let dues = [kill - 2000, kill - 100, kill, kill + 10, kill + 50];
        let outcomes: Vec<Outcome> = (0..5)
            .map(|s| Outcome {
                seq: s,
                due_ms: dues[s as usize],
                id: Some(ids[s as usize]),
            })
            .collect();
        t.record_acks(&outcomes, 100);
        t.ingest(&[arrival(&t, 0, dues[0], kill - 1990, &hex(ids[0]))]);
        t.record_fault_slots(2, 4, vec![false, true, false, false]);
        t.record_kill(kill);
        t.ingest(&[arrival(&t, 1, dues[1], kill + 900, &hex(ids[1]))]);
        t.ingest(&[arrival(&t, 2, dues[2], kill + 1200, &hex(ids[2]))]);
        t.ingest(&[arrival(&t, 2, dues[2], kill + 1300, &hex(ids[2]))]);
        t.ingest(&[arrival(&t, 4, dues[4], kill + 55, &hex(ids[4]))]);
        let f = t.finish();
        let k = f.takeover.expect("failover findings");
        assert_eq!((k.node, k.slots_owned, k.slot_count), (2, 1, 4));
        assert_eq!(
            (k.timers, k.lost),
            (3, 1),
            "seqs 1, 2, 3 were its to take over"
        );
        assert_eq!(k.gap_ms, Some(900));
        assert_eq!(k.lateness.max(), 1200);
        assert_eq!(k.lateness.len(), 2);
        assert_eq!(k.others_lateness.max(), 5);
        // One timer of it fired in the 5 s before the kill: 0.2/s, one duplicate = 5 s.
        assert!((k.fired_per_s_before - 0.2).abs() < 1e-9);
        assert_eq!(k.duplicates_in_s_of_its_fires, Some(5.0));
        assert_eq!((f.counts.lost, f.counts.duplicates), (1, 1));
    }
}
