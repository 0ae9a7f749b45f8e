//! What a run does: the scenario presets and the settings they fill in.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};

/// When the timers of a run fire, relative to when each is sent (or to the run start).
#[derive(Debug, Clone, PartialEq)]
pub enum FireDist {
    /// `fixed:5s`: every timer fires this long after it is sent.
    Fixed(Duration),
    /// `uniform:1s..30s` (or just `1s..30s`): uniformly between the two delays.
    Uniform(Duration, Duration),
    /// `burst:10s`: every timer is due in the same millisecond, this long after the run starts.
    Burst(Duration),
    /// `past:0s..60s`: epochs this far in the past, which must fire at once.
    Past(Duration, Duration),
}

impl FromStr for FireDist {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<FireDist> {
        let (kind, arg) = s.split_once(':').unwrap_or(("uniform", s));
        let one = |a: &str| -> anyhow::Result<Duration> {
            humantime::parse_duration(a.trim()).with_context(|| format!("bad duration {a:?}"))
        };
        let range = |a: &str| -> anyhow::Result<(Duration, Duration)> {
            let (lo, hi) = a
                .split_once("..")
                .with_context(|| format!("expected LO..HI, got {a:?}"))?;
            let (lo, hi) = (one(lo)?, one(hi)?);
            if lo > hi {
                bail!("empty range {a:?}");
            }
            Ok((lo, hi))
        };
        Ok(match kind {
            "fixed" => FireDist::Fixed(one(arg)?),
            "uniform" => {
                let (lo, hi) = range(arg)?;
                FireDist::Uniform(lo, hi)
            }
            "burst" => FireDist::Burst(one(arg)?),
            "past" => {
                let (lo, hi) = range(arg)?;
                FireDist::Past(lo, hi)
            }
            _ => bail!("unknown fire distribution {kind:?} (fixed, uniform, burst, past)"),
        })
    }
}

impl std::fmt::Display for FireDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |d: &Duration| humantime::format_duration(*d).to_string();
        match self {
            FireDist::Fixed(x) => write!(f, "fixed:{}", d(x)),
            FireDist::Uniform(lo, hi) => write!(f, "uniform:{}..{}", d(lo), d(hi)),
            FireDist::Burst(x) => write!(f, "burst:{}", d(x)),
            FireDist::Past(lo, hi) => write!(f, "past:{}..{}", d(lo), d(hi)),
        }
    }
}

/// Where fired timers are read back from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Tail the node's JSON-lines sink file, from its length when the run starts.
    Jsonl(PathBuf),
    /// Consume the target topics from this Kafka bootstrap address.
    Kafka(String),
}

/// The named presets; every setting can be overridden afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// A constant rate for a while, delays 1–30 s.
    Steady,
    /// Many timers due in the same millisecond.
    Burst,
    /// Store many far-future timers first, then run `steady`.
    Backlog,
    /// Long and at a low rate.
    Soak,
    /// Steady load while the node is killed with SIGKILL and started again: counts lost,
    /// early and re-delivered timers and the re-delivery window.
    Crash,
    /// Steady load spread over the nodes of a cluster while one member (`--kill-node`) is
    /// killed with SIGKILL (or hit by `--fault-cmd`) and started again: later batches avoid
    /// a node whose call failed (`retry` also sends the failed ones again, keyed), and the
    /// report adds how long the member's ranges stayed silent and how late its timers fired.
    Failover,
}

/// The crash and failover scenarios' kill and restart.
#[derive(Debug, Clone)]
pub struct Crash {
    /// Kill the node (`server_pid`) with SIGKILL this long into the measured phase.
    pub kill_at: Duration,
    /// Instead of SIGKILL, run this shell command at `kill_at` (e.g. a drain, then a stop).
    pub fault_cmd: Option<String>,
    /// Failover: the member (id in the cluster map) the fault hits; its slots at the
    /// moment of the fault are the ones the report follows.
    pub node: Option<u64>,
    /// Then wait this long...
    pub down_for: Duration,
    /// ...and run this shell command, which starts the node again (in the background).
    pub restart_cmd: String,
}

/// Far-future timers stored before the measured phase (never checked for delivery: they
/// are due after the run; one that arrives counts as early).
#[derive(Debug, Clone)]
pub struct Backlog {
    /// How many to store.
    pub count: u64,
    /// Send rate while storing them, timers/s (set it above what the node takes to mean
    /// "as fast as it goes").
    pub rate: u64,
    /// They fire between `delay` and `delay + spread` from when they are sent.
    pub delay: Duration,
    /// See `delay`.
    pub spread: Duration,
    /// Payload size of each.
    pub payload_bytes: usize,
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The preset this started from (named in the reports).
    pub scenario: Scenario,
    /// gRPC endpoints, e.g. `http://127.0.0.1:7420`; batches are spread over them.
    pub targets: Vec<String>,
    /// Retry a call that failed (or items refused as UNAVAILABLE) on the next target, with
    /// an idempotency key on every timer so a retry cannot store a timer twice.
    pub retry: bool,
    /// Where fired timers are read back.
    pub source: Source,
    /// Target send rate, timers/s.
    pub rate: u64,
    /// How long to send; `count` wins when set.
    pub duration: Duration,
    /// Number of timers to send instead of `rate * duration`.
    pub count: Option<u64>,
    /// Fire-time distribution.
    pub fire: FireDist,
    /// Payload size in bytes (at least the 40-byte stamp).
    pub payload_bytes: usize,
    /// Timers per `SetTimeouts` call.
    pub batch: usize,
    /// gRPC connections (HTTP/2 channels) per target.
    pub connections: usize,
    /// Calls in flight per connection.
    pub inflight: usize,
    /// Timers are spread round-robin over this many topics...
    pub topics: usize,
    /// ...and this many partitions per topic.
    pub partitions: i32,
    /// Topic names are `{prefix}-{i}`.
    pub topic_prefix: String,
    /// How long to wait after the last fire time for stragglers.
    pub drain: Duration,
    /// A backlog stored before the measured phase.
    pub backlog: Option<Backlog>,
    /// Sample this process's RSS and CPU (the node's pid).
    pub server_pid: Option<u32>,
    /// Deadline of one `SetTimeouts` call.
    pub call_timeout: Duration,
    /// Show a progress bar on stderr (only drawn when it is a terminal).
    pub progress: bool,
    /// Kill and restart the node during the run.
    pub crash: Option<Crash>,
}

impl RunConfig {
    /// The preset `scenario` against `target`, reading fired timers from `source`.
    pub fn preset(scenario: Scenario, target: impl Into<String>, source: Source) -> RunConfig {
        let mut c = RunConfig {
            scenario,
            targets: vec![target.into()],
            retry: false,
            source,
            rate: 10_000,
            duration: Duration::from_secs(30),
            count: None,
            fire: FireDist::Uniform(Duration::from_secs(1), Duration::from_secs(30)),
            payload_bytes: 64,
            batch: 500,
            connections: 4,
            inflight: 2,
            topics: 4,
            partitions: 8,
            topic_prefix: "timerdb-loadtest".into(),
            drain: Duration::from_secs(10),
            backlog: None,
            server_pid: None,
            call_timeout: Duration::from_secs(30),
            progress: true,
            crash: None,
        };
        match scenario {
            Scenario::Steady => {}
            Scenario::Burst => {
                c.count = Some(100_000);
                c.rate = 50_000;
                c.fire = FireDist::Burst(Duration::from_secs(10));
            }
            Scenario::Backlog => {
                c.backlog = Some(Backlog {
                    count: 1_000_000,
                    rate: 1_000_000,
                    delay: Duration::from_secs(86_400),
                    spread: Duration::from_secs(3_600),
                    payload_bytes: 64,
                });
            }
            Scenario::Crash => {
                c.duration = Duration::from_secs(20);
                c.fire = FireDist::Uniform(Duration::from_secs(1), Duration::from_secs(5));
                c.call_timeout = Duration::from_secs(5);
                c.crash = Some(Crash {
                    kill_at: Duration::from_secs(8),
                    fault_cmd: None,
                    node: None,
                    down_for: Duration::ZERO,
                    restart_cmd: String::new(),
                });
            }
            Scenario::Failover => {
                c.duration = Duration::from_secs(30);
                c.fire = FireDist::Uniform(Duration::from_secs(1), Duration::from_secs(5));
                c.call_timeout = Duration::from_secs(5);
                c.crash = Some(Crash {
                    kill_at: Duration::from_secs(10),
                    fault_cmd: None,
                    node: None,
                    down_for: Duration::from_secs(10),
                    restart_cmd: String::new(),
                });
            }
            Scenario::Soak => {
                c.rate = 1_000;
                c.duration = Duration::from_secs(3_600);
                c.fire = FireDist::Uniform(Duration::from_secs(1), Duration::from_secs(300));
            }
        }
        c
    }

    /// Timers in the measured phase.
    pub fn total(&self) -> u64 {
        self.count
            .unwrap_or_else(|| (self.rate as f64 * self.duration.as_secs_f64()).round() as u64)
    }

    /// Refuses settings that cannot make a meaningful run.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.rate == 0 || self.batch == 0 || self.connections == 0 || self.inflight == 0 {
            bail!("rate, batch, connections and inflight must be > 0");
        }
        if self.topics == 0 || self.partitions <= 0 {
            bail!("topics and partitions must be > 0");
        }
        if self.payload_bytes < crate::payload::STAMP_LEN {
            bail!(
                "payload_bytes must be at least {} (the stamp)",
                crate::payload::STAMP_LEN
            );
        }
        if self.targets.is_empty() || self.targets.iter().any(|t| t.trim().is_empty()) {
            bail!("--target needs at least one address, and no empty one in the list");
        }
        if let Some(c) = &self.crash {
            let name = if self.scenario == Scenario::Failover {
                "failover"
            } else {
                "crash"
            };
            if self.server_pid.is_none() && c.fault_cmd.is_none() {
                bail!(
                    "the {name} scenario needs --server-pid (the process to kill) or --fault-cmd"
                );
            }
            if c.restart_cmd.trim().is_empty() {
                bail!("the {name} scenario needs --restart-cmd (how to start the node again)");
            }
            if self.scenario == Scenario::Failover {
                if c.node.is_none() {
                    bail!("the failover scenario needs --kill-node (the member id the fault hits)");
                }
                if self.targets.len() < 2 {
                    bail!("the failover scenario needs --target with at least two nodes (A,B,...)");
                }
            }
        }
        if let Some(b) = &self.backlog
            && (b.rate == 0 || b.payload_bytes < crate::payload::STAMP_LEN)
        {
            bail!("backlog rate must be > 0 and its payload at least the stamp");
        }
        Ok(())
    }

    /// The timer's idempotency key when `retry` is on: unique per run and timer.
    pub fn idempotency_key(&self, run_id: u64, seq: u64) -> String {
        if self.retry {
            format!("lt-{run_id:016x}-{seq}")
        } else {
            String::new()
        }
    }

    /// The target topic names, indexed by what `route` returns.
    pub fn topic_names(&self) -> Vec<String> {
        (0..self.topics)
            .map(|t| format!("{}-{t}", self.topic_prefix))
            .collect()
    }

    /// The topic index and partition of timer `seq`, so the checker can tell a misrouted one.
    pub fn route(&self, seq: u64) -> (usize, i32) {
        let topics = self.topics as u64;
        let t = seq % topics;
        let p = (seq / topics) % self.partitions as u64;
        (t as usize, p as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_distributions() {
        let s = Duration::from_secs;
        assert_eq!(
            "fixed:5s".parse::<FireDist>().unwrap(),
            FireDist::Fixed(s(5))
        );
        assert_eq!(
            "0s..3s".parse::<FireDist>().unwrap(),
            FireDist::Uniform(s(0), s(3))
        );
        assert_eq!(
            "past:1s..1m".parse::<FireDist>().unwrap(),
            FireDist::Past(s(1), s(60))
        );
        assert_eq!(
            "burst:10s".parse::<FireDist>().unwrap(),
            FireDist::Burst(s(10))
        );
        assert!("uniform:5s..1s".parse::<FireDist>().is_err());
        assert!("weird:1s".parse::<FireDist>().is_err());
    }
}
