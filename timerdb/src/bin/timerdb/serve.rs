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
    /// Cluster: this node's id (1, 2, ...); makes the node a member (needs a scylla:// store).
    #[arg(long, env = "TIMERDB_NODE_ID")]
    pub node_id: Option<u64>,
    /// Cluster: host:port other nodes and clients reach this node on [default: --listen].
    #[arg(long, env = "TIMERDB_ADVERTISE")]
    pub advertise: Option<String>,
    /// Cluster: where the Raft log lives [default: timerdb-data/raft-ID].
    #[arg(long, env = "TIMERDB_RAFT_DIR")]
    pub raft_dir: Option<PathBuf>,
    /// Cluster: the members of a new cluster, 1=host:port,2=host:port,3=host:port.
    #[arg(long, env = "TIMERDB_INITIAL_MEMBERS", conflicts_with = "join")]
    pub initial_members: Option<String>,
    /// Cluster: join the cluster that the member at host:port belongs to.
    #[arg(long, env = "TIMERDB_JOIN")]
    pub join: Option<String>,
    /// Cluster: on SIGTERM, wait this long for this member's ranges to move to the others
    /// before stopping (0s: stop at once; they take over after the failure timeout)
    /// [default: 15s].
    #[arg(long, env = "TIMERDB_LEAVE_TIMEOUT")]
    pub leave_timeout: Option<String>,
    /// Check the configuration (file, environment and flags) and exit without opening
    /// anything: 0 and the settings a start would use, or 1 and the bad setting named.
    #[arg(long)]
    pub check: bool,
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
            node_id: self.node_id,
            advertise: self.advertise,
            raft_dir: self.raft_dir,
            initial_members: self.initial_members,
            join: self.join,
            leave_timeout: self.leave_timeout,
        })
    }
}

/// Runs the node these flags describe. The process-wide Prometheus recorder is installed
/// here, once, not by the node (several nodes may run in one process).
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let check = args.check;
    let config = args.config()?;
    config.validate()?;
    if check {
        print!("{}", describe(&config));
        return Ok(());
    }
    if let Some(addr) = config.metrics_listen {
        timerdb::metrics::install(addr)?;
    }
    Ok(timerdb::server::run(config).await?)
}

/// The settings a node started with `config` runs with, one per line (`serve --check`).
fn describe(c: &Config) -> String {
    let off = |a: Option<std::net::SocketAddr>| a.map_or("off".to_owned(), |a| a.to_string());
    let layout = c.store_options.layout;
    let mut s = format!(
        "configuration valid\n\
         listen            {}\n\
         metrics_listen    {}\n\
         store             {}\n\
         sink              {}\n\
         slots             {} (for a new store)\n\
         bucket_width      {} ms (for a new store)\n\
         lookahead         {:?}\n\
         grace             {:?}\n",
        c.listen,
        off(c.metrics_listen),
        c.store,
        c.sink,
        layout.slots,
        layout.bucket_ms,
        c.scheduler.lookahead,
        c.scheduler.grace,
    );
    match &c.cluster {
        None => s.push_str("cluster           none (a single node owns every slot)\n"),
        Some(cl) => {
            let members: Vec<String> = cl
                .initial_members
                .iter()
                .map(|(id, addr)| format!("{id}={addr}"))
                .collect();
            s.push_str(&format!(
                "node_id           {}\n\
                 advertise         {}\n\
                 raft_dir          {}\n\
                 initial_members   {}\n\
                 join              {}\n\
                 lease             {:?}\n\
                 leave_timeout     {:?}\n",
                cl.node_id,
                cl.advertise,
                cl.raft_dir.display(),
                if members.is_empty() {
                    "-".to_owned()
                } else {
                    members.join(",")
                },
                cl.join.as_deref().unwrap_or("-"),
                cl.lease,
                cl.leave_timeout,
            ));
        }
    }
    s
}
