//! `timerdb serve`: runs a node until SIGINT/SIGTERM.

use std::path::PathBuf;

use clap::Args;
use timerdb::config::{Config, Overrides};

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
    pub fn config(self) -> timerdb::Result<Config> {
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

/// Runs the node these flags describe. The process-wide Prometheus recorder is installed
/// here, once, not by the node (several nodes may run in one process).
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    config.validate()?;
    if let Some(addr) = config.metrics_listen {
        timerdb::metrics::install(addr)?;
    }
    Ok(timerdb::server::run(config).await?)
}
