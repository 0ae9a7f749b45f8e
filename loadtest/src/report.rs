//! What a run produces: a JSON report, a plain-text summary and (in `chart`) an SVG.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::{RunConfig, Scenario, Source};
use crate::tracker::{Counts, Finished};

/// Percentiles of one histogram.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Percentiles {
    /// Reads `h`.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The settings that shaped the run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// gRPC endpoints, comma-separated.
    pub target: String,
    /// Failed calls retried on another node with idempotency keys.
    pub retry: bool,
    /// `jsonl:PATH` or `kafka:BROKERS`.
    pub source: String,
    /// Target rate, timers/s.
    pub rate: u64,
    /// Timers in the measured phase.
    pub total: u64,
    /// Fire-time distribution.
    pub fire: String,
    /// Payload size, bytes.
    pub payload_bytes: usize,
    /// Timers per call.
    pub batch: usize,
    /// Connections.
    pub connections: usize,
    /// Calls in flight per connection.
    pub inflight: usize,
    /// Topics.
    pub topics: usize,
    /// Partitions per topic.
    pub partitions: i32,
    /// Drain after the last fire time, s.
    pub drain_s: f64,
}

/// The backlog fill before the measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct BacklogReport {
    /// Timers asked for.
    pub count: u64,
    /// Acknowledged.
    pub acked: u64,
    /// Refused or lost in failed calls.
    pub failed: u64,
    /// How long the fill took, s.
    pub secs: f64,
    /// Acknowledged per second during the fill.
    pub rate: f64,
    /// Node RSS right after the fill, bytes.
    pub rss_after_bytes: Option<u64>,
}

/// The node's resource use over the measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    /// Largest RSS seen, bytes.
    pub peak_rss_bytes: u64,
    /// Last RSS seen, bytes.
    pub last_rss_bytes: u64,
    /// Mean CPU, percent of one core.
    pub mean_cpu_pct: f64,
    /// Busiest second, percent of one core.
    pub max_cpu_pct: f64,
}

/// One second of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct SecondReport {
    /// Seconds since the measured phase started.
    pub t: usize,
    /// Acknowledged in this second.
    pub acked: u64,
    /// Fired (and read back) in this second.
    pub delivered: u64,
    /// Fire lateness of what fired in this second, ms.
    pub lateness_ms: Percentiles,
    /// Receive lateness, ms (Kafka only).
    pub recv_lateness_ms: Option<Percentiles>,
    /// Call latency of calls answered in this second, µs.
    pub call_us: Percentiles,
    /// Node RSS, bytes.
    pub rss_bytes: Option<u64>,
    /// Node CPU, percent of one core.
    pub cpu_pct: Option<f64>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Preset it started from.
    pub scenario: Scenario,
    /// Run id (hex), as stamped in the payloads.
    pub run_id: String,
    /// Start of the measured phase, ms since the epoch.
    pub started_at_ms: u64,
    /// Settings.
    pub settings: Settings,
    /// Backlog fill, when the scenario has one.
    pub backlog: Option<BacklogReport>,
    /// Per-timer verdicts.
    pub counts: Counts,
    /// Timers never sent because the node was too slow to take them in time.
    pub unsent: u64,
    /// Acknowledged timers per second, between the first and the last acknowledgement.
    pub acked_rate: f64,
    /// Arrivals per second, between the first and the last fire time.
    pub delivered_rate: f64,
    /// Busiest second of arrivals.
    pub peak_delivered_per_s: u64,
    /// `SetTimeouts` call latency, µs.
    pub call_latency_us: Percentiles,
    /// Fire lateness (node's fired-at − due), ms.
    pub lateness_ms: Percentiles,
    /// Receive lateness (consumer clock − due), ms; Kafka only.
    pub recv_lateness_ms: Option<Percentiles>,
    /// Node resource use, when `server_pid` was given.
    pub server: Option<ServerReport>,
    /// The machine's 1-minute load average at the start and the end of the measured phase.
    pub load_avg: (Option<f64>, Option<f64>),
    /// Per second.
    pub timeline: Vec<SecondReport>,
    /// The kill and what came again after it (crash scenario).
    pub crash: Option<CrashReport>,
    /// How the killed member's slots were taken over (failover scenario).
    pub failover: Option<FailoverReport>,
    /// Nothing acknowledged was lost, nothing fired early, nothing arrived corrupt or
    /// unexpected, and nothing came twice that no crash explains.
    pub passed: bool,
    /// Ids of some lost timers, and of some that arrived under another id than the one
    /// acknowledged.
    pub samples: crate::tracker::Samples,
}

/// The crash scenario's findings.
#[derive(Debug, Clone, Serialize)]
pub struct CrashReport {
    /// Re-deliveries around the kill.
    #[serde(flatten)]
    pub redelivery: crate::tracker::Redelivery,
    /// When the restart command ran, ms since the epoch.
    pub restarted_ms: u64,
}

/// The failover scenario's findings about the killed member's slots.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    /// The member killed.
    pub node: u64,
    /// Slots it owned right before the kill, and the cluster's slot count.
    pub slots_owned: u32,
    /// See `slots_owned`.
    pub slot_count: u32,
    /// Its timers: acknowledged, in its slots, not delivered before the kill.
    pub timers: u64,
    /// Of those, never delivered.
    pub lost: u64,
    /// From the kill to the first delivery of one of its timers, ms.
    pub gap_ms: Option<u64>,
    /// Fire lateness of its timers, ms.
    pub lateness_ms: Percentiles,
    /// Fire lateness of the other members' timers due after the kill, ms.
    pub others_lateness_ms: Percentiles,
    /// Its timers delivered per second in the 5 s before the kill.
    pub fired_per_s_before: f64,
    /// The run's duplicates, in seconds of its firing.
    pub duplicates_in_s_of_its_fires: Option<f64>,
    /// Timers that arrived more than once, in its slots and in the others'.
    pub repeated: [Repeated; 2],
}

/// Timers of one group that arrived more than once.
#[derive(Debug, Clone, Serialize)]
pub struct Repeated {
    /// How many.
    pub timers: u64,
    /// Earliest first delivery among them, ms after the kill (negative: before).
    pub first_from_ms: Option<i64>,
    /// Latest repeat among them, ms after the kill.
    pub last_until_ms: Option<i64>,
}

impl FailoverReport {
    fn of(t: &crate::tracker::Takeover) -> FailoverReport {
        FailoverReport {
            node: t.node,
            slots_owned: t.slots_owned,
            slot_count: t.slot_count,
            timers: t.timers,
            lost: t.lost,
            gap_ms: t.gap_ms,
            lateness_ms: Percentiles::of(&t.lateness),
            others_lateness_ms: Percentiles::of(&t.others_lateness),
            fired_per_s_before: t.fired_per_s_before,
            duplicates_in_s_of_its_fires: t.duplicates_in_s_of_its_fires,
            repeated: t.repeated.map(|(timers, from, until)| Repeated {
                timers,
                first_from_ms: (timers > 0).then_some(from),
                last_until_ms: (timers > 0).then_some(until),
            }),
        }
    }
}

impl Report {
    /// Assembles the report of a finished run.
    pub fn build(
        cfg: &RunConfig,
        run_id: u64,
        started_at_ms: u64,
        f: Finished,
        unsent: u64,
        backlog: Option<BacklogReport>,
    ) -> Report {
        let kafka = matches!(cfg.source, Source::Kafka(_));
        let rate = |n: u64, (a, b): (u64, u64)| {
            if b > a {
                n as f64 * 1000.0 / (b - a) as f64
            } else {
                n as f64
            }
        };
        let timeline: Vec<SecondReport> = f
            .seconds
            .iter()
            .enumerate()
            .map(|(t, s)| SecondReport {
                t,
                acked: s.acked,
                delivered: s.delivered,
                lateness_ms: Percentiles::of(&s.lateness),
                recv_lateness_ms: kafka.then(|| Percentiles::of(&s.recv_lateness)),
                call_us: Percentiles::of(&s.call_us),
                rss_bytes: s.rss_bytes,
                cpu_pct: s.cpu_pct,
            })
            .collect();
        let rss: Vec<u64> = timeline.iter().filter_map(|s| s.rss_bytes).collect();
        let cpu: Vec<f64> = timeline.iter().filter_map(|s| s.cpu_pct).collect();
        let server = (!rss.is_empty()).then(|| ServerReport {
            peak_rss_bytes: rss.iter().copied().max().unwrap_or(0),
            last_rss_bytes: rss.last().copied().unwrap_or(0),
            mean_cpu_pct: cpu.iter().sum::<f64>() / cpu.len().max(1) as f64,
            max_cpu_pct: cpu.iter().copied().fold(0.0, f64::max),
        });
        let c = f.counts;
        Report {
            scenario: cfg.scenario,
            run_id: format!("{run_id:016x}"),
            started_at_ms,
            settings: Settings {
                target: cfg.targets.join(","),
                retry: cfg.retry,
                source: match &cfg.source {
                    Source::Jsonl(p) => format!("jsonl:{}", p.display()),
                    Source::Kafka(b) => format!("kafka:{b}"),
                },
                rate: cfg.rate,
                total: cfg.total(),
                fire: cfg.fire.to_string(),
                payload_bytes: cfg.payload_bytes,
                batch: cfg.batch,
                connections: cfg.connections,
                inflight: cfg.inflight,
                topics: cfg.topics,
                partitions: cfg.partitions,
                drain_s: cfg.drain.as_secs_f64(),
            },
            backlog,
            unsent,
            acked_rate: rate(c.acked, f.ack_span_ms),
            delivered_rate: rate(c.arrivals, f.arrival_span_ms),
            peak_delivered_per_s: timeline.iter().map(|s| s.delivered).max().unwrap_or(0),
            call_latency_us: Percentiles::of(&f.call_us),
            lateness_ms: Percentiles::of(&f.lateness),
            recv_lateness_ms: kafka.then(|| Percentiles::of(&f.recv_lateness)),
            server,
            load_avg: (None, None),
            timeline,
            passed: c.lost == 0
                && c.early == 0
                && c.corrupt == 0
                && c.unexpected == 0
                && f.redelivery.as_ref().is_none_or(|r| r.after_kill == 0),
            failover: f.takeover.as_ref().map(FailoverReport::of),
            crash: f.redelivery.map(|redelivery| CrashReport {
                redelivery,
                restarted_ms: 0,
            }),
            counts: c,
            samples: f.samples,
        }
    }

    /// The plain-text summary printed at the end.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let c = &self.counts;
        let p = |p: &Percentiles, unit: &str| {
            format!(
                "p50 {} p90 {} p99 {} p99.9 {} max {} {unit}",
                p.p50, p.p90, p.p99, p.p999, p.max
            )
        };
        let _ = writeln!(
            s,
            "scenario {:?}  run {}  target {} rate {}/s total {} fire {}",
            self.scenario,
            self.run_id,
            self.settings.target,
            self.settings.rate,
            self.settings.total,
            self.settings.fire
        );
        if let Some(b) = &self.backlog {
            let rss = b.rss_after_bytes.map_or(String::new(), |r| {
                format!(", node RSS after {:.0} MiB", r as f64 / 1048576.0)
            });
            let _ = writeln!(
                s,
                "backlog   stored {} of {} in {:.1} s ({:.0}/s), {} failed{rss}",
                b.acked, b.count, b.secs, b.rate, b.failed
            );
        }
        let _ = writeln!(
            s,
            "sent      {}  acked {}  rejected {}  failed {}  unsent {}  retried {}",
            c.sent, c.acked, c.rejected, c.failed, self.unsent, c.retried
        );
        let _ = writeln!(
            s,
            "checked   delivered {}  LOST {}  EARLY {}  duplicates {} (under two ids {})  corrupt {}  unexpected {}  (unacked delivered {}, other runs {})",
            c.delivered,
            c.lost,
            c.early,
            c.duplicates,
            c.two_ids,
            c.corrupt,
            c.unexpected,
            c.unacked_delivered,
            c.foreign
        );
        if let Some(k) = &self.crash {
            let r = &k.redelivery;
            let _ = writeln!(
                s,
                "crash     killed at +{:.1} s, restarted {:.1} s later; re-delivered {} timers, \
                 the oldest first delivered {} ms before the kill; repeated after the kill {}",
                r.kill_ms.saturating_sub(self.started_at_ms) as f64 / 1000.0,
                k.restarted_ms.saturating_sub(r.kill_ms) as f64 / 1000.0,
                r.timers,
                r.window_ms,
                r.after_kill
            );
        }
        if let Some(f) = &self.failover {
            let _ = writeln!(
                s,
                "failover  node {} owned {} of {} slots, {} of its timers still to fire at the kill ({} LOST); \
                 first fired {} after the kill",
                f.node,
                f.slots_owned,
                f.slot_count,
                f.timers,
                f.lost,
                f.gap_ms.map_or("never".to_owned(), |g| format!("{g} ms")),
            );
            let _ = writeln!(s, "          its lateness    {}", p(&f.lateness_ms, "ms"));
            let _ = writeln!(
                s,
                "          others' lateness {}",
                p(&f.others_lateness_ms, "ms")
            );
            let _ = writeln!(
                s,
                "          it fired {:.0}/s before the kill; duplicates = {} of its fires",
                f.fired_per_s_before,
                f.duplicates_in_s_of_its_fires
                    .map_or("?".to_owned(), |d| format!("{d:.2} s")),
            );
            for (whose, r) in ["its slots", "others'"].iter().zip(&f.repeated) {
                if r.timers > 0 {
                    let _ = writeln!(
                        s,
                        "          repeated in {whose}: {} timers, first delivered from {} ms, repeated until {} ms after the kill",
                        r.timers,
                        r.first_from_ms.unwrap_or(0),
                        r.last_until_ms.unwrap_or(0)
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "rates     acked {:.0}/s  delivered {:.0}/s  peak delivered {}/s",
            self.acked_rate, self.delivered_rate, self.peak_delivered_per_s
        );
        let _ = writeln!(s, "call      {}", p(&self.call_latency_us, "µs"));
        let _ = writeln!(s, "lateness  {}", p(&self.lateness_ms, "ms"));
        if let Some(r) = &self.recv_lateness_ms {
            let _ = writeln!(s, "received  {}", p(r, "ms"));
        }
        if let Some(sv) = &self.server {
            let _ = writeln!(
                s,
                "node      RSS peak {:.0} MiB last {:.0} MiB  CPU mean {:.0}% max {:.0}%",
                sv.peak_rss_bytes as f64 / 1048576.0,
                sv.last_rss_bytes as f64 / 1048576.0,
                sv.mean_cpu_pct,
                sv.max_cpu_pct
            );
        }
        if let (Some(a), Some(b)) = self.load_avg {
            let _ = writeln!(s, "machine   load average {a:.2} at start, {b:.2} at end");
        }
        if !self.samples.lost.is_empty() {
            let _ = writeln!(s, "lost ids  {}", self.samples.lost.join(" "));
        }
        if !self.samples.other_id.is_empty() {
            let pairs: Vec<String> = self
                .samples
                .other_id
                .iter()
                .map(|(acked, seen)| format!("{acked} came as {seen}"))
                .collect();
            let _ = writeln!(s, "other id  {}", pairs.join(", "));
        }
        let _ = writeln!(
            s,
            "verdict   {}",
            if self.passed {
                "PASS (nothing lost, early, corrupt, unexpected or repeated without a crash)"
            } else {
                "FAIL"
            }
        );
        s
    }

    /// Writes `<name>.json`, `<name>.txt` and `<name>.svg` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = format!(
            "{}-{}",
            serde_json::to_value(self.scenario)?
                .as_str()
                .unwrap_or("run"),
            self.run_id
        );
        let json = dir.join(format!("{name}.json"));
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)?;
        let txt = dir.join(format!("{name}.txt"));
        std::fs::write(&txt, self.summary())?;
        let svg = dir.join(format!("{name}.svg"));
        crate::chart::write_svg(self, &svg)?;
        Ok(vec![json, txt, svg])
    }
}
