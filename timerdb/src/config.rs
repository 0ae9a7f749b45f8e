//! Node configuration: command-line flags and environment variables over an optional TOML
//! file over defaults. Validated once at start-up; errors name the setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::scheduler::SchedulerConfig;
use crate::store::StoreOptions;
use crate::{Error, Result};

/// Default gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
/// Default Prometheus address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7421";
/// Default store.
pub const DEFAULT_STORE: &str = "embedded:./timerdb-data";
/// Default sink.
pub const DEFAULT_SINK: &str = "stdout:";

/// Limits on what a client may ask for. Requests over a limit get `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload, bytes.
    pub max_payload_bytes: usize,
    /// Largest Kafka key, bytes.
    pub max_key_bytes: usize,
    /// Most headers per timer.
    pub max_headers: usize,
    /// Largest total of header names and values per timer, bytes.
    pub max_header_bytes: usize,
    /// Most timers per `SetTimeouts` call.
    pub max_batch: usize,
    /// Latest allowed fire time, counted from now.
    pub max_delay: Duration,
    /// Longest idempotency key, bytes.
    pub max_idempotency_key_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 512 * 1024,
            max_key_bytes: 4096,
            max_headers: 64,
            max_header_bytes: 64 * 1024,
            max_batch: 10_000,
            max_delay: Duration::from_secs(10 * 366 * 24 * 3600),
            max_idempotency_key_bytes: 256,
        }
    }
}

/// Everything `timerdb serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Prometheus address; `None` disables the endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Store URL.
    pub store: String,
    /// Sink URL.
    pub sink: String,
    /// Store options (layout for a new store, idempotency retention, cache).
    pub store_options: StoreOptions,
    /// Scheduler tuning.
    pub scheduler: SchedulerConfig,
    /// Request limits.
    pub limits: Limits,
    /// Cluster membership; `None` runs a single node that owns every slot.
    pub cluster: Option<ClusterSettings>,
}

/// How this node takes part in a cluster (`--node-id` and the `[cluster]` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// This node's id (1, 2, ...).
    pub node_id: u64,
    /// The `host:port` other nodes and clients reach this node on.
    pub advertise: String,
    /// Where the Raft log lives.
    pub raft_dir: PathBuf,
    /// The members of a new cluster, `(id, host:port)`; empty to join one (`join`).
    pub initial_members: Vec<(u64, String)>,
    /// Any member of an existing cluster, to join it.
    pub join: Option<String>,
    /// Lease and failure detection.
    pub lease: timerdb_raft::map::LeaseSettings,
    /// How long a member stopping gracefully waits for its ranges to move to the other
    /// members before it stops (zero: it stops at once, and they take its ranges over after
    /// the failure timeout).
    pub leave_timeout: Duration,
    /// Whether a member that stopped a range it lost tells the cluster so, letting the new
    /// owner start at once (`cluster.release_ranges`, default true); false: the new owner
    /// always waits out the old owner's lease.
    pub release_ranges: bool,
}

/// Default of `cluster.leave_timeout`: a drain takes a lease and a bit; this leaves room
/// for a slow store within a 30 s termination grace period.
pub const DEFAULT_LEAVE_TIMEOUT: Duration = Duration::from_secs(15);

/// Parses `1=host:port,2=host:port`.
pub fn parse_members(v: &str) -> Result<Vec<(u64, String)>> {
    let bad = |why: String| {
        Error::Config(format!(
            "cluster.initial_members = {v:?}: {why} (write ID=host:port,..., e.g. \
             1=10.0.0.1:7420,2=10.0.0.2:7420,3=10.0.0.3:7420)"
        ))
    };
    let mut out: Vec<(u64, String)> = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("{item:?} has no '='")))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| bad(format!("{id:?} is not a node id (1, 2, ...)")))?;
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(bad(format!("{addr:?} is not host:port")));
        }
        if out.iter().any(|(i, _)| *i == id) {
            return Err(bad(format!("node {id} is listed twice")));
        }
        out.push((id, addr.to_owned()));
    }
    if out.is_empty() {
        return Err(bad("no members".into()));
    }
    Ok(out)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("default address"),
            metrics_listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("default address")),
            store: DEFAULT_STORE.into(),
            sink: DEFAULT_SINK.into(),
            store_options: StoreOptions::default(),
            scheduler: SchedulerConfig::default(),
            limits: Limits::default(),
            cluster: None,
        }
    }
}

/// The TOML file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// gRPC address.
    pub listen: Option<String>,
    /// Prometheus address, or "off".
    pub metrics_listen: Option<String>,
    /// Store URL.
    pub store: Option<String>,
    /// Sink URL.
    pub sink: Option<String>,
    /// How long an idempotency key is remembered, e.g. "24h".
    pub idempotency_retention: Option<String>,
    /// Embedded store cache, bytes.
    pub store_cache_bytes: Option<usize>,
    /// Embedded store: save the allocator state with every commit, so a crash needs no
    /// repair on open (fast restart, more write volume).
    pub store_quick_repair: Option<bool>,
    /// Layout for a new store.
    #[serde(default)]
    pub layout: FileLayout,
    /// Scheduler tuning.
    #[serde(default)]
    pub scheduler: FileScheduler,
    /// Request limits.
    #[serde(default)]
    pub limits: FileLimits,
    /// Cluster membership.
    #[serde(default)]
    pub cluster: FileCluster,
}

/// `[cluster]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    /// This node's id; setting it makes the node a cluster member.
    pub node_id: Option<u64>,
    /// `host:port` others reach this node on.
    pub advertise: Option<String>,
    /// Raft log directory.
    pub raft_dir: Option<PathBuf>,
    /// `1=host:port,2=host:port,...`
    pub initial_members: Option<String>,
    /// Any member of the cluster to join.
    pub join: Option<String>,
    /// How often a member renews its lease, e.g. "200ms".
    pub heartbeat: Option<String>,
    /// How long a renewal lasts, e.g. "1s".
    pub lease: Option<String>,
    /// Clock drift tolerated over one lease, e.g. "200ms".
    pub drift: Option<String>,
    /// Silence after which a member's ranges move, e.g. "1300ms".
    pub failure_timeout: Option<String>,
    /// How long a member stopping gracefully waits for its ranges to move, e.g. "15s".
    pub leave_timeout: Option<String>,
    /// Whether a member releases the ranges it stopped (default true).
    pub release_ranges: Option<bool>,
}

/// `[layout]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLayout {
    /// Number of slots.
    pub slots: Option<u32>,
    /// Bucket width, e.g. "1s".
    pub bucket_width: Option<String>,
}

/// `[scheduler]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileScheduler {
    /// e.g. "2s"
    pub lookahead: Option<String>,
    /// e.g. "2s"
    pub grace: Option<String>,
    /// Timers held in memory before loading pauses.
    pub max_in_memory: Option<usize>,
    /// Bytes the timers in memory may take before loading pauses.
    pub max_in_memory_bytes: Option<usize>,
    /// Rows read per page of a bucket.
    pub load_page_rows: Option<usize>,
    /// Timers per sink call.
    pub max_batch: Option<usize>,
    /// Sink calls in flight per range.
    pub max_inflight_batches: Option<usize>,
    /// e.g. "100ms"
    pub retry_min: Option<String>,
    /// e.g. "30s"
    pub retry_max: Option<String>,
    /// e.g. "10s"
    pub shutdown_timeout: Option<String>,
}

/// `[limits]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// Bytes.
    pub max_payload_bytes: Option<usize>,
    /// Bytes.
    pub max_key_bytes: Option<usize>,
    /// Count.
    pub max_headers: Option<usize>,
    /// Bytes.
    pub max_header_bytes: Option<usize>,
    /// Count.
    pub max_batch: Option<usize>,
    /// e.g. "3650d"
    pub max_delay: Option<String>,
    /// Bytes.
    pub max_idempotency_key_bytes: Option<usize>,
}

/// Values given on the command line or in the environment; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--config`
    pub config_file: Option<PathBuf>,
    /// `--listen`
    pub listen: Option<String>,
    /// `--metrics-listen`
    pub metrics_listen: Option<String>,
    /// `--store`
    pub store: Option<String>,
    /// `--sink`
    pub sink: Option<String>,
    /// `--slots`
    pub slots: Option<u32>,
    /// `--bucket-width`
    pub bucket_width: Option<String>,
    /// `--lookahead`
    pub lookahead: Option<String>,
    /// `--grace`
    pub grace: Option<String>,
    /// `--idempotency-retention`
    pub idempotency_retention: Option<String>,
    /// `--max-payload-bytes`
    pub max_payload_bytes: Option<usize>,
    /// `--max-batch`
    pub max_batch: Option<usize>,
    /// `--max-in-memory`
    pub max_in_memory: Option<usize>,
    /// `--max-in-memory-bytes`
    pub max_in_memory_bytes: Option<usize>,
    /// `--store-quick-repair`
    pub store_quick_repair: Option<bool>,
    /// `--node-id`
    pub node_id: Option<u64>,
    /// `--advertise`
    pub advertise: Option<String>,
    /// `--raft-dir`
    pub raft_dir: Option<PathBuf>,
    /// `--initial-members`
    pub initial_members: Option<String>,
    /// `--join`
    pub join: Option<String>,
    /// `--leave-timeout`
    pub leave_timeout: Option<String>,
}

fn duration(setting: &str, v: &str) -> Result<Duration> {
    humantime::parse_duration(v).map_err(|e| {
        Error::Config(format!(
            "{setting} = {v:?}: {e} (write a duration such as 500ms, 2s, 24h)"
        ))
    })
}

fn address(setting: &str, v: &str) -> Result<SocketAddr> {
    v.parse().map_err(|e| {
        Error::Config(format!(
            "{setting} = {v:?}: {e} (write host:port, e.g. 127.0.0.1:7420)"
        ))
    })
}

impl Config {
    /// Builds the configuration: overrides, then the file they name (if any), then defaults.
    pub fn load(o: Overrides) -> Result<Config> {
        let file = match &o.config_file {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let mut c = d.clone();
        if let Some(v) = o.listen.as_deref().or(file.listen.as_deref()) {
            c.listen = address("listen", v)?;
        }
        if let Some(v) = o
            .metrics_listen
            .as_deref()
            .or(file.metrics_listen.as_deref())
        {
            c.metrics_listen = match v {
                "off" | "" => None,
                v => Some(address("metrics_listen", v)?),
            };
        }
        if let Some(node_id) = o.node_id.or(file.cluster.node_id) {
            c.cluster = Some(cluster_settings(node_id, &o, &file.cluster, &c)?);
        }
        c.store = o.store.or(file.store).unwrap_or(d.store);
        c.sink = o.sink.or(file.sink).unwrap_or(d.sink);
        if let Some(v) = o.slots.or(file.layout.slots) {
            c.store_options.layout.slots = v;
        }
        if let Some(v) = o
            .bucket_width
            .as_deref()
            .or(file.layout.bucket_width.as_deref())
        {
            c.store_options.layout.bucket_ms = duration("bucket_width", v)?.as_millis() as u64;
        }
        if let Some(v) = o
            .idempotency_retention
            .as_deref()
            .or(file.idempotency_retention.as_deref())
        {
            c.store_options.idempotency_retention = duration("idempotency_retention", v)?;
        }
        if let Some(v) = file.store_cache_bytes {
            c.store_options.cache_bytes = v;
        }
        if let Some(v) = o.store_quick_repair.or(file.store_quick_repair) {
            c.store_options.quick_repair = v;
        }
        let s = &file.scheduler;
        let sc = &mut c.scheduler;
        if let Some(v) = o.lookahead.as_deref().or(s.lookahead.as_deref()) {
            sc.lookahead = duration("lookahead", v)?;
        }
        if let Some(v) = o.grace.as_deref().or(s.grace.as_deref()) {
            sc.grace = duration("grace", v)?;
        }
        if let Some(v) = o.max_in_memory.or(s.max_in_memory) {
            sc.max_in_memory = v;
        }
        if let Some(v) = o.max_in_memory_bytes.or(s.max_in_memory_bytes) {
            sc.max_in_memory_bytes = v;
        }
        if let Some(v) = s.load_page_rows {
            sc.load_page_rows = v;
        }
        if let Some(v) = s.max_batch {
            sc.max_batch = v;
        }
        if let Some(v) = s.max_inflight_batches {
            sc.max_inflight_batches = v;
        }
        if let Some(v) = &s.retry_min {
            sc.retry_min = duration("scheduler.retry_min", v)?;
        }
        if let Some(v) = &s.retry_max {
            sc.retry_max = duration("scheduler.retry_max", v)?;
        }
        if let Some(v) = &s.shutdown_timeout {
            sc.shutdown_timeout = duration("scheduler.shutdown_timeout", v)?;
        }
        let l = &file.limits;
        let lc = &mut c.limits;
        if let Some(v) = o.max_payload_bytes.or(l.max_payload_bytes) {
            lc.max_payload_bytes = v;
        }
        if let Some(v) = l.max_key_bytes {
            lc.max_key_bytes = v;
        }
        if let Some(v) = l.max_headers {
            lc.max_headers = v;
        }
        if let Some(v) = l.max_header_bytes {
            lc.max_header_bytes = v;
        }
        if let Some(v) = o.max_batch.or(l.max_batch) {
            lc.max_batch = v;
        }
        if let Some(v) = &l.max_delay {
            lc.max_delay = duration("limits.max_delay", v)?;
        }
        if let Some(v) = l.max_idempotency_key_bytes {
            lc.max_idempotency_key_bytes = v;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<()> {
        self.store_options.layout.validate()?;
        if let Some(cluster) = &self.cluster
            && !self.store.starts_with("scylla://")
        {
            return Err(Error::Config(format!(
                "node_id = {} makes this node a cluster member, and a cluster needs the shared \
                 Scylla store: store = {:?} is this node's own disk, which other nodes cannot \
                 read (use store = scylla://host:9042/keyspace, or drop node_id to run alone)",
                cluster.node_id, self.store
            )));
        }
        // Both URLs are read here, before any I/O: a bad sink option must not surface only
        // after the store has connected and migrated.
        crate::store::check_url(&self.store)?;
        if let Some(max) = crate::sink::check_url(&self.sink)?
            && self.limits.max_payload_bytes > max
        {
            return Err(Error::Config(format!(
                "max_payload_bytes = {} is over the sink's largest message, {max} bytes (sink \
                 URL option max_message_bytes): such timers could be accepted and never produced",
                self.limits.max_payload_bytes
            )));
        }
        let sc = &self.scheduler;
        let positive = [
            ("max_in_memory", sc.max_in_memory),
            ("max_in_memory_bytes", sc.max_in_memory_bytes),
            ("scheduler.load_page_rows", sc.load_page_rows),
            ("scheduler.max_batch", sc.max_batch),
            ("scheduler.max_inflight_batches", sc.max_inflight_batches),
            ("max_batch", self.limits.max_batch),
            ("max_payload_bytes", self.limits.max_payload_bytes),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be at least 1")));
            }
        }
        let width = self.store_options.layout.bucket_ms;
        if (sc.lookahead.as_millis() as u64) < width {
            return Err(Error::Config(format!(
                "scheduler.lookahead = {:?} is shorter than the bucket width ({width} ms): a \
                 bucket must be read before it starts, or its first timers fire late",
                sc.lookahead
            )));
        }
        if sc.grace < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "scheduler.grace = {:?} is under 100 ms: a fired bucket is deleted this long \
                 after it ends, and a hand-off acknowledged at its end must reach the \
                 scheduler first",
                sc.grace
            )));
        }
        if sc.retry_min.is_zero() || sc.retry_max < sc.retry_min {
            return Err(Error::Config(
                "scheduler.retry_min must be > 0 and <= scheduler.retry_max".into(),
            ));
        }
        if self.store_options.idempotency_retention.is_zero() {
            return Err(Error::Config("idempotency_retention must be > 0".into()));
        }
        if self.limits.max_payload_bytes > 16 << 20 {
            return Err(Error::Config(format!(
                "max_payload_bytes = {} is over 16 MiB; Kafka would refuse such messages",
                self.limits.max_payload_bytes
            )));
        }
        Ok(())
    }
}

fn cluster_settings(
    node_id: u64,
    o: &Overrides,
    f: &FileCluster,
    c: &Config,
) -> Result<ClusterSettings> {
    if node_id == 0 {
        return Err(Error::Config("node_id must be 1 or more".into()));
    }
    let advertise = match o.advertise.as_ref().or(f.advertise.as_ref()) {
        Some(a) => a.clone(),
        None if !c.listen.ip().is_unspecified() => c.listen.to_string(),
        None => {
            return Err(Error::Config(format!(
                "advertise is needed: listen = {} does not say which address other nodes \
                 reach this one on",
                c.listen
            )));
        }
    };
    let initial_members = match o.initial_members.as_ref().or(f.initial_members.as_ref()) {
        Some(v) => parse_members(v)?,
        None => Vec::new(),
    };
    let join = o.join.clone().or(f.join.clone());
    if !initial_members.is_empty() && join.is_some() {
        return Err(Error::Config(
            "give initial_members (a new cluster) or join (an existing one), not both".into(),
        ));
    }
    if !initial_members.is_empty() && !initial_members.iter().any(|(id, _)| *id == node_id) {
        return Err(Error::Config(format!(
            "initial_members does not list this node (node_id = {node_id})"
        )));
    }
    let mut lease = timerdb_raft::map::LeaseSettings::default();
    let ms = |name: &str, v: &Option<String>, into: &mut u64| -> Result<()> {
        if let Some(v) = v {
            *into = duration(name, v)?.as_millis() as u64;
        }
        Ok(())
    };
    ms("cluster.heartbeat", &f.heartbeat, &mut lease.heartbeat_ms)?;
    ms("cluster.lease", &f.lease, &mut lease.lease_ms)?;
    ms("cluster.drift", &f.drift, &mut lease.drift_ms)?;
    ms(
        "cluster.failure_timeout",
        &f.failure_timeout,
        &mut lease.failure_ms,
    )?;
    lease.validate().map_err(Error::Config)?;
    let leave_timeout = match o.leave_timeout.as_ref().or(f.leave_timeout.as_ref()) {
        Some(v) => duration("cluster.leave_timeout", v)?,
        None => DEFAULT_LEAVE_TIMEOUT,
    };
    Ok(ClusterSettings {
        leave_timeout,
        release_ranges: f.release_ranges.unwrap_or(true),
        node_id,
        advertise,
        raft_dir: o
            .raft_dir
            .clone()
            .or(f.raft_dir.clone())
            .unwrap_or_else(|| PathBuf::from(format!("timerdb-data/raft-{node_id}"))),
        initial_members,
        join,
        lease,
    })
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = Config::load(Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.store, DEFAULT_STORE);
    }

    /// Both URLs are read when the configuration loads, before any I/O: a bad sink option
    /// next to a store that would take seconds to reach fails at once, naming the option.
    #[test]
    fn bad_store_and_sink_urls_are_refused_at_load() {
        let load = |store: &str, sink: &str| {
            Config::load(Overrides {
                store: Some(store.into()),
                sink: Some(sink.into()),
                ..Overrides::default()
            })
            .unwrap_err()
            .to_string()
        };
        let unreachable = "scylla://192.0.2.1:9042/timers";
        let err = load(unreachable, "kafka://127.0.0.1:9092?compresion=lz4");
        assert!(err.contains("compresion"), "{err}");
        let err = load(unreachable, "kafka://127.0.0.1:9092?compression=brotli");
        assert!(err.contains("brotli"), "{err}");
        let err = load(unreachable, "kafka://127.0.0.1:9092?linger_ms=soon");
        assert!(err.contains("linger_ms"), "{err}");
        let err = load("scylla://192.0.2.1:9042/bad-keyspace!", "stdout:");
        assert!(err.contains("bad-keyspace!"), "{err}");
        let err = load("rocksdb:///tmp/x", "stdout:");
        assert!(err.contains("unsupported store URL"), "{err}");
        let err = load(unreachable, "kafka://127.0.0.1:9092?max_message_bytes=1000");
        assert!(err.contains("max_payload_bytes"), "{err}");
    }

    #[test]
    fn a_lookahead_under_the_bucket_width_and_a_tiny_grace_are_refused() {
        let err = Config::load(Overrides {
            lookahead: Some("500ms".into()),
            ..Overrides::default()
        })
        .and_then(|c| c.validate())
        .unwrap_err()
        .to_string();
        assert!(err.contains("scheduler.lookahead"), "{err}");
        let err = Config::load(Overrides {
            grace: Some("0s".into()),
            ..Overrides::default()
        })
        .and_then(|c| c.validate())
        .unwrap_err()
        .to_string();
        assert!(err.contains("scheduler.grace"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timerdb.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nsink = \"jsonl:/tmp/x\"\n[scheduler]\nlookahead = \"5s\"\n",
        )
        .unwrap();
        let c = Config::load(Overrides {
            config_file: Some(path.clone()),
            listen: Some("127.0.0.1:9001".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.listen.port(), 9001);
        assert_eq!(c.sink, "jsonl:/tmp/x");
        assert_eq!(c.scheduler.lookahead, Duration::from_secs(5));

        std::fs::write(&path, "listn = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(Overrides {
            config_file: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `listn`"), "{err}");
    }

    #[test]
    fn the_readme_example_file_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("README has a toml example") + 8;
        let end = start + readme[start..].find("```").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timerdb.toml");
        std::fs::write(&path, &readme[start..end]).unwrap();
        let c = Config::load(Overrides {
            config_file: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.store, "embedded:///var/lib/timerdb");
        assert_eq!(c.limits.max_delay, Duration::from_secs(3660 * 86_400));
    }

    /// The README's cluster example loads as a member of three; the same table on the
    /// embedded store is refused by name.
    #[test]
    fn the_readme_cluster_example_is_valid_and_an_embedded_member_is_refused() {
        let readme = include_str!("../../README.md");
        let at = readme
            .find("```toml\nstore = \"scylla://")
            .expect("cluster example")
            + 8;
        let text = &readme[at..at + readme[at..].find("```").unwrap()];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("member.toml");
        std::fs::write(&path, text).unwrap();
        let load = |store: Option<&str>| {
            Config::load(Overrides {
                config_file: Some(path.clone()),
                store: store.map(str::to_owned),
                ..Default::default()
            })
        };
        let c = load(None).unwrap();
        let cluster = c.cluster.expect("a member");
        assert_eq!(
            (cluster.node_id, cluster.advertise.as_str()),
            (1, "10.0.0.1:7420")
        );
        assert_eq!(cluster.initial_members.len(), 3);
        assert_eq!(cluster.lease.failure_ms, 1_300);
        assert_eq!(cluster.leave_timeout, Duration::from_secs(15));
        let c = Config::load(Overrides {
            config_file: Some(path.clone()),
            leave_timeout: Some("0s".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.cluster.unwrap().leave_timeout, Duration::ZERO);
        let err = Config::load(Overrides {
            config_file: Some(path.clone()),
            leave_timeout: Some("soon".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("cluster.leave_timeout = \"soon\""), "{err}");
        let err = load(Some("embedded:///tmp/x")).unwrap_err().to_string();
        assert!(err.contains("needs the shared Scylla store"), "{err}");
        let err = Config::load(Overrides {
            config_file: Some(path.clone()),
            initial_members: Some("1=a:1,1=b:2".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("node 1 is listed twice"), "{err}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = Config::load(Overrides {
            lookahead: Some("soon".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("lookahead"), "{err}");
        let err = Config::load(Overrides {
            slots: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("slots"), "{err}");
    }
}
