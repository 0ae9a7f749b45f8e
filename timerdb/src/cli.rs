//! The `timerdb` command line: `serve`, and the client commands `set-timeout`, `get`,
//! `cancel`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use timerdb_proto::v1;
use timerdb_proto::v1::timer_service_client::TimerServiceClient;

use crate::api::convert::timestamp;
use crate::config::{Config, Overrides};
use crate::timer::now_ms;

/// Default server for the client commands.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7420";

/// TimerDB: a durable setTimeout that fires messages to Kafka.
#[derive(Debug, Parser)]
#[command(name = "timerdb", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Schedule a timer; prints its id.
    SetTimeout(SetTimeoutArgs),
    /// Show a timer.
    Get(IdArgs),
    /// Cancel a timer.
    Cancel(IdArgs),
    /// Create or upgrade a Scylla/Cassandra schema, then exit (`serve` also does this).
    Migrate(MigrateArgs),
}

/// `timerdb migrate`
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Store URL: scylla://host:9042/keyspace[?replication_factor=3&...].
    #[arg(long, env = "TIMERDB_STORE")]
    pub store: String,
}

/// `timerdb serve`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (flags and environment win over it).
    #[arg(long, env = "TIMERDB_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:7420].
    #[arg(long, env = "TIMERDB_LISTEN")]
    pub listen: Option<String>,
    /// Prometheus listen address, or "off" [default: 127.0.0.1:7421].
    #[arg(long, env = "TIMERDB_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Store URL: embedded:///dir or embedded:relative/dir [default: embedded:./timerdb-data].
    #[arg(long, env = "TIMERDB_STORE")]
    pub store: Option<String>,
    /// Sink URL: stdout:, jsonl:///file, kafka://host:port [default: stdout:].
    #[arg(long, env = "TIMERDB_SINK")]
    pub sink: Option<String>,
    /// Slots of a new store [default: 256].
    #[arg(long, env = "TIMERDB_SLOTS")]
    pub slots: Option<u32>,
    /// Bucket width of a new store [default: 1s].
    #[arg(long, env = "TIMERDB_BUCKET_WIDTH")]
    pub bucket_width: Option<String>,
    /// How early buckets are loaded into memory [default: 2s].
    #[arg(long, env = "TIMERDB_LOOKAHEAD")]
    pub lookahead: Option<String>,
    /// Delay after a bucket ends before it is deleted [default: 2s].
    #[arg(long, env = "TIMERDB_GRACE")]
    pub grace: Option<String>,
    /// How long idempotency keys are remembered [default: 24h].
    #[arg(long, env = "TIMERDB_IDEMPOTENCY_RETENTION")]
    pub idempotency_retention: Option<String>,
    /// Largest payload in bytes [default: 524288].
    #[arg(long, env = "TIMERDB_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Most timers per SetTimeouts call [default: 10000].
    #[arg(long, env = "TIMERDB_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Timers held in memory before loading pauses [default: 2000000].
    #[arg(long, env = "TIMERDB_MAX_IN_MEMORY")]
    pub max_in_memory: Option<usize>,
    /// Bytes the timers in memory may take (payload, key, headers, bookkeeping) before
    /// loading pauses [default: 1073741824].
    #[arg(long, env = "TIMERDB_MAX_IN_MEMORY_BYTES")]
    pub max_in_memory_bytes: Option<usize>,
    /// Embedded store: save the allocator state with every commit, so the store opens at
    /// once after a crash (true) or is walked and repaired then (false: less written per
    /// commit) [default: true].
    #[arg(long, env = "TIMERDB_STORE_QUICK_REPAIR")]
    pub store_quick_repair: Option<bool>,
}

impl ServeArgs {
    /// The node configuration these flags describe.
    pub fn config(self) -> crate::Result<Config> {
        Config::load(Overrides {
            config_file: self.config,
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            store: self.store,
            sink: self.sink,
            slots: self.slots,
            bucket_width: self.bucket_width,
            lookahead: self.lookahead,
            grace: self.grace,
            idempotency_retention: self.idempotency_retention,
            max_payload_bytes: self.max_payload_bytes,
            max_batch: self.max_batch,
            max_in_memory: self.max_in_memory,
            max_in_memory_bytes: self.max_in_memory_bytes,
            store_quick_repair: self.store_quick_repair,
        })
    }
}

/// `timerdb set-timeout`
#[derive(Debug, Args)]
pub struct SetTimeoutArgs {
    /// Server address.
    #[arg(long, env = "TIMERDB_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Fire after this long, e.g. 5s, 1m30s, 0s.
    #[arg(long = "in", conflicts_with = "at", required_unless_present = "at")]
    pub in_: Option<String>,
    /// Fire at this time: RFC 3339 (2030-01-01T00:00:00Z) or milliseconds since the epoch.
    #[arg(long)]
    pub at: Option<String>,
    /// Kafka topic.
    #[arg(long)]
    pub topic: String,
    /// Kafka partition.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub partition: i32,
    /// Payload text.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from this file.
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Kafka key (defaults to the timer id).
    #[arg(long)]
    pub key: Option<String>,
    /// A header NAME=VALUE; repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Idempotency key: repeating it returns the first id.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// `timerdb get ID` / `timerdb cancel ID`
#[derive(Debug, Args)]
pub struct IdArgs {
    /// Server address.
    #[arg(long, env = "TIMERDB_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Timer id as printed by set-timeout.
    pub id: String,
}

/// Parses `--at`: RFC 3339 or epoch milliseconds.
pub fn parse_at(s: &str) -> anyhow::Result<u64> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| {
            format!("--at {s:?}: expected RFC 3339 (2030-01-01T00:00:00Z) or epoch milliseconds")
        })?;
    // Rounded up, like the server does: a sub-millisecond time never becomes earlier.
    let ns = t.unix_timestamp_nanos();
    let ms = ns / 1_000_000 + i128::from(ns % 1_000_000 > 0);
    if ms < 0 {
        bail!("--at {s:?} is before 1970");
    }
    Ok(ms as u64)
}

async fn connect(server: &str) -> anyhow::Result<TimerServiceClient<tonic::transport::Channel>> {
    // `host:port` is taken as plain-text gRPC on that address.
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .with_context(|| {
            format!("--server {server:?} is not host:port or a URL like http://127.0.0.1:7420")
        })?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.with_context(|| {
        format!("cannot reach TimerDB at {server}; is `timerdb serve` running?")
    })?;
    Ok(TimerServiceClient::new(channel))
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

/// Runs a client command; output goes to stdout.
pub async fn run_client(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => unreachable!("serve is not a client command"),
        Command::Migrate(a) => {
            if a.store.starts_with("embedded:") {
                println!("embedded stores need no migration; they are set up on first start");
                return Ok(());
            }
            let url = crate::store::scylla::ScyllaUrl::parse(&a.store)?;
            let session = crate::store::scylla::connect(&url).await?;
            let applied = crate::store::scylla::migrate(&session, &url).await?;
            if applied.is_empty() {
                println!("keyspace {} is up to date", url.keyspace);
            } else {
                println!("keyspace {}: applied migrations {applied:?}", url.keyspace);
            }
        }
        Command::SetTimeout(a) => {
            let fire_at_ms = match (&a.in_, &a.at) {
                (Some(d), _) => {
                    let d = humantime::parse_duration(d)
                        .with_context(|| format!("--in {d:?}: expected a duration like 5s"))?;
                    now_ms() + d.as_millis() as u64
                }
                (None, Some(at)) => parse_at(at)?,
                (None, None) => bail!("give --in or --at"),
            };
            let payload = match (&a.payload, &a.payload_file) {
                (_, Some(p)) => Bytes::from(
                    std::fs::read(p).with_context(|| format!("--payload-file {}", p.display()))?,
                ),
                (Some(s), None) => Bytes::from(s.clone()),
                (None, None) => Bytes::new(),
            };
            let mut headers = std::collections::HashMap::new();
            for h in &a.headers {
                let (k, v) = h
                    .split_once('=')
                    .with_context(|| format!("--header {h:?}: expected NAME=VALUE"))?;
                headers.insert(k.to_owned(), Bytes::from(v.to_owned()));
            }
            let mut client = connect(&a.server).await?;
            let r = client
                .set_timeout(v1::SetTimeoutRequest {
                    fire_at: Some(timestamp(fire_at_ms)),
                    payload,
                    topic: a.topic,
                    partition: a.partition,
                    key: a.key.map(Bytes::from).unwrap_or_default(),
                    headers,
                    idempotency_key: a.idempotency_key.unwrap_or_default(),
                })
                .await
                .map_err(status)?;
            println!("{}", r.into_inner().timer_id);
        }
        Command::Get(a) => {
            let mut client = connect(&a.server).await?;
            let t = client
                .get_timer(v1::GetTimerRequest { timer_id: a.id })
                .await
                .map_err(status)?
                .into_inner();
            let state = v1::TimerState::try_from(t.state)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("TIMER_STATE_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| t.state.to_string());
            let fire_at = t
                .fire_at
                .map(|ts| {
                    let ms = ts.seconds as i128 * 1000 + ts.nanos as i128 / 1_000_000;
                    time::OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000)
                        .ok()
                        .and_then(|d| {
                            d.format(&time::format_description::well_known::Rfc3339)
                                .ok()
                        })
                        .unwrap_or_default()
                })
                .unwrap_or_default();
            println!("id:           {}", t.timer_id);
            println!("state:        {state}");
            println!("fire_at:      {fire_at}");
            println!("topic:        {}", t.topic);
            println!("partition:    {}", t.partition);
            println!("payload_size: {}", t.payload_size);
        }
        Command::Cancel(a) => {
            let mut client = connect(&a.server).await?;
            let id = a.id.clone();
            let r = client
                .cancel_timeout(v1::CancelTimeoutRequest { timer_id: a.id })
                .await
                .map_err(status)?
                .into_inner();
            if r.cancelled {
                println!("cancelled {id}");
            } else {
                println!("{id} was already cancelled");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_rounds_sub_millisecond_times_up() {
        assert_eq!(
            parse_at("2023-11-14T22:13:20.0001Z").unwrap(),
            1_700_000_000_001
        );
        assert_eq!(
            parse_at("2023-11-14T22:13:20.001Z").unwrap(),
            1_700_000_000_001
        );
    }

    #[test]
    fn at_accepts_rfc3339_and_epoch_ms() {
        assert_eq!(parse_at("1700000000123").unwrap(), 1_700_000_000_123);
        assert_eq!(
            parse_at("2023-11-14T22:13:20.5Z").unwrap(),
            1_700_000_000_500
        );
        assert!(
            parse_at("tomorrow")
                .unwrap_err()
                .to_string()
                .contains("RFC 3339")
        );
    }
}
