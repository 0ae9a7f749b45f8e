//! `timerdb-loadtest SCENARIO [overrides]`: runs one load test against a TimerDB node,
//! prints the summary, writes the reports; exits 1 when a timer was lost or fired early.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use timerdb_loadtest::{FireDist, RunConfig, Scenario, Source};

/// Load test for TimerDB: send timers over gRPC, check every one that fires.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Preset: steady, burst, backlog (far-future fill then steady), soak, crash (kill -9
    /// and restart mid-run), or failover (kill -9 one member of a cluster and restart it).
    #[arg(value_enum, env = "LOADTEST_SCENARIO")]
    scenario: Scenario,
    /// gRPC address of the node (`host:port` or `http://host:port`); several, comma-separated
    /// (e.g. `$TIMERDB_NODES`), spread the batches over the nodes of a cluster.
    #[arg(
        long,
        env = "LOADTEST_TARGET",
        default_value = "127.0.0.1:7420",
        value_delimiter = ','
    )]
    target: Vec<String>,
    /// Send every timer with an idempotency key and retry failed calls (and items refused
    /// as UNAVAILABLE) on the next target. Keys cost the store a conditional write each
    /// (a Paxos round on Cassandra). Without it, a call that failed is counted as failed,
    /// and later batches still avoid its node for 1 s.
    #[arg(long, env = "LOADTEST_RETRY", num_args = 0..=1, default_missing_value = "true")]
    retry: Option<bool>,
    /// Read fired timers by tailing this JSON-lines sink file.
    #[arg(
        long,
        env = "LOADTEST_JSONL",
        conflicts_with = "kafka",
        required_unless_present = "kafka"
    )]
    jsonl: Option<PathBuf>,
    /// Read fired timers from Kafka at this bootstrap address.
    #[arg(long, env = "LOADTEST_KAFKA")]
    kafka: Option<String>,
    /// Target send rate, timers/s.
    #[arg(long, env = "LOADTEST_RATE")]
    rate: Option<u64>,
    /// How long to send (e.g. 30s, 1h).
    #[arg(long, env = "LOADTEST_DURATION")]
    duration: Option<humantime::Duration>,
    /// Send exactly this many timers (wins over duration).
    #[arg(long, env = "LOADTEST_COUNT")]
    count: Option<u64>,
    /// Fire times: fixed:5s, uniform:1s..30s (or 1s..30s), burst:10s, past:0s..1m.
    #[arg(long, env = "LOADTEST_FIRE")]
    fire: Option<FireDist>,
    /// Payload bytes per timer (at least 40).
    #[arg(long, env = "LOADTEST_PAYLOAD_BYTES")]
    payload_bytes: Option<usize>,
    /// Timers per SetTimeouts call.
    #[arg(long, env = "LOADTEST_BATCH")]
    batch: Option<usize>,
    /// gRPC connections.
    #[arg(long, env = "LOADTEST_CONNECTIONS")]
    connections: Option<usize>,
    /// Calls in flight per connection.
    #[arg(long, env = "LOADTEST_INFLIGHT")]
    inflight: Option<usize>,
    /// Topics to spread timers over.
    #[arg(long, env = "LOADTEST_TOPICS")]
    topics: Option<usize>,
    /// Partitions per topic.
    #[arg(long, env = "LOADTEST_PARTITIONS")]
    partitions: Option<i32>,
    /// Topic name prefix (`{prefix}-{i}`).
    #[arg(long, env = "LOADTEST_TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// Wait this long after the last fire time for stragglers.
    #[arg(long, env = "LOADTEST_DRAIN")]
    drain: Option<humantime::Duration>,
    /// Backlog: far-future timers to store first (0 disables; presets other than backlog
    /// store none).
    #[arg(long, env = "LOADTEST_BACKLOG_COUNT")]
    backlog_count: Option<u64>,
    /// Backlog: send rate while storing, timers/s.
    #[arg(long, env = "LOADTEST_BACKLOG_RATE")]
    backlog_rate: Option<u64>,
    /// Backlog: how far in the future they fire.
    #[arg(long, env = "LOADTEST_BACKLOG_DELAY")]
    backlog_delay: Option<humantime::Duration>,
    /// Sample RSS and CPU of this process (the node).
    #[arg(long, env = "LOADTEST_SERVER_PID")]
    server_pid: Option<u32>,
    /// Where the JSON report, text summary and SVG chart go.
    #[arg(
        long,
        env = "LOADTEST_REPORT_DIR",
        default_value = "target/loadtest-reports"
    )]
    report_dir: PathBuf,
    /// Deadline of one SetTimeouts call.
    #[arg(long, env = "LOADTEST_CALL_TIMEOUT", default_value = "30s")]
    call_timeout: humantime::Duration,
    /// Crash: kill the node (--server-pid) with SIGKILL this long into the run.
    #[arg(long, env = "LOADTEST_KILL_AT")]
    kill_at: Option<humantime::Duration>,
    /// Failover: the member id (as in `timerdb admin status`) the fault hits; the report
    /// follows the slots it owned.
    #[arg(long, env = "LOADTEST_KILL_NODE")]
    kill_node: Option<u64>,
    /// Crash, failover: run this shell command at --kill-at instead of SIGKILL of
    /// --server-pid (e.g. `timerdb admin drain 2 && deploy/local/cluster stop 2`).
    #[arg(long, env = "LOADTEST_FAULT_CMD")]
    fault_cmd: Option<String>,
    /// Crash: wait this long after the kill before restarting.
    #[arg(long, env = "LOADTEST_DOWN_FOR")]
    down_for: Option<humantime::Duration>,
    /// Crash: shell command that starts the node again (it must not block; end it with &).
    #[arg(long, env = "LOADTEST_RESTART_CMD")]
    restart_cmd: Option<String>,
    /// Never draw the progress bar.
    #[arg(long, env = "LOADTEST_NO_PROGRESS")]
    no_progress: bool,
}

impl Args {
    fn config(self) -> anyhow::Result<RunConfig> {
        let targets: Vec<String> = self
            .target
            .iter()
            .map(|t| t.trim())
            .map(|t| {
                if t.contains("://") || t.is_empty() {
                    t.to_owned()
                } else {
                    format!("http://{t}")
                }
            })
            .collect();
        let source = match (self.jsonl, self.kafka) {
            (Some(p), _) => Source::Jsonl(p),
            (None, Some(k)) => Source::Kafka(k),
            (None, None) => unreachable!("clap requires one of --jsonl, --kafka"),
        };
        let mut c = RunConfig::preset(self.scenario, "", source);
        c.targets = targets;
        c.retry = self.retry.unwrap_or(c.retry);
        let d = |d: humantime::Duration| -> Duration { d.into() };
        c.rate = self.rate.unwrap_or(c.rate);
        c.duration = self.duration.map(d).unwrap_or(c.duration);
        c.count = self.count.or(c.count);
        c.fire = self.fire.unwrap_or(c.fire);
        c.payload_bytes = self.payload_bytes.unwrap_or(c.payload_bytes);
        c.batch = self.batch.unwrap_or(c.batch);
        c.connections = self.connections.unwrap_or(c.connections);
        c.inflight = self.inflight.unwrap_or(c.inflight);
        c.topics = self.topics.unwrap_or(c.topics);
        c.partitions = self.partitions.unwrap_or(c.partitions);
        c.topic_prefix = self.topic_prefix.unwrap_or(c.topic_prefix);
        c.drain = self.drain.map(d).unwrap_or(c.drain);
        c.server_pid = self.server_pid;
        c.call_timeout = self.call_timeout.into();
        c.progress = !self.no_progress;
        if c.crash.is_none() {
            let given = [
                ("--kill-at", self.kill_at.is_some()),
                ("--down-for", self.down_for.is_some()),
                ("--restart-cmd", self.restart_cmd.is_some()),
                ("--kill-node", self.kill_node.is_some()),
                ("--fault-cmd", self.fault_cmd.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                anyhow::bail!(
                    "{flag} belongs to the crash and failover scenarios, not {:?}",
                    self.scenario
                );
            }
        }
        if let Some(crash) = c.crash.as_mut() {
            crash.kill_at = self.kill_at.map(d).unwrap_or(crash.kill_at);
            crash.down_for = self.down_for.map(d).unwrap_or(crash.down_for);
            crash.restart_cmd = self.restart_cmd.unwrap_or_default();
            crash.node = self.kill_node;
            crash.fault_cmd = self.fault_cmd;
        }
        if self.backlog_count.is_some()
            || self.backlog_rate.is_some()
            || self.backlog_delay.is_some()
        {
            let preset = RunConfig::preset(Scenario::Backlog, "", c.source.clone()).backlog;
            let mut b = c.backlog.take().or(preset).expect("backlog preset");
            b.count = self.backlog_count.unwrap_or(b.count);
            b.rate = self.backlog_rate.unwrap_or(b.rate);
            b.delay = self.backlog_delay.map(d).unwrap_or(b.delay);
            c.backlog = (b.count > 0).then_some(b);
        }
        Ok(c)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOADTEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let report_dir = args.report_dir.clone();
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("timerdb-loadtest: {e:#}");
            return ExitCode::from(2);
        }
    };
    let report = match timerdb_loadtest::run(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("timerdb-loadtest: {e:#}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.summary());
    match report.write(&report_dir) {
        Ok(paths) => {
            for p in paths {
                println!("report    {}", p.display());
            }
        }
        Err(e) => eprintln!("timerdb-loadtest: writing reports: {e:#}"),
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
