//! Shared fixture: starts real `timerdb` nodes, in this process ([`Node::embedded`]) or as
//! child processes on loopback ports for the tests that kill them, and reads what they fired.
#![allow(dead_code)]

pub mod flaky;
pub mod kafka;
pub mod local_cluster;
pub mod netns;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use timerdb::sink::jsonl::FiredLine;
use timerdb_proto::v1::timer_service_client::TimerServiceClient;
use tonic::transport::Channel;

/// A free loopback port (the small race with other processes is acceptable in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    timerdb::timer::now_ms()
}

/// A `timerdb serve` child process with an embedded store and a JSON-lines sink in `dir`.
pub struct Node {
    child: Option<Child>,
    /// The node when it runs in this process.
    embedded: Option<timerdb::server::NodeHandle>,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: PathBuf,
    pub fired_path: PathBuf,
    store: String,
    sink: String,
    extra: Vec<String>,
    /// Environment of the next start (e.g. `FAILPOINTS`).
    pub env: Vec<(String, String)>,
    starts: u32,
}

impl Node {
    /// Starts a node in `dir` on the embedded store and a JSON-lines sink, and waits until
    /// it answers health checks.
    pub async fn start(dir: &Path, extra: &[&str]) -> Node {
        Node::start_with(dir, None, None, extra).await
    }

    /// Starts a node with the given store and sink URLs (defaults: embedded in `dir`,
    /// JSON lines in `dir/fired.jsonl`).
    pub async fn start_with(
        dir: &Path,
        store: Option<String>,
        sink: Option<String>,
        extra: &[&str],
    ) -> Node {
        Node::start_full(dir, store, sink, extra, &[]).await
    }

    /// Starts a node like [`Node::start_with`], with extra environment variables
    /// (e.g. `FAILPOINTS`).
    pub async fn start_full(
        dir: &Path,
        store: Option<String>,
        sink: Option<String>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let fired_path = dir.join("fired.jsonl");
        let mut node = Node {
            child: None,
            grpc: SocketAddr::from(([127, 0, 0, 1], free_port())),
            metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
            dir: dir.to_path_buf(),
            store: store.unwrap_or_else(|| format!("embedded://{}", dir.join("data").display())),
            sink: sink.unwrap_or_else(|| format!("jsonl://{}", fired_path.display())),
            fired_path,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            embedded: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            starts: 0,
        };
        node.spawn().await;
        node
    }

    /// Starts a node in this process (`timerdb::server::start`) on a port the system picks:
    /// the embedded store in `dir/data` and JSON lines in `dir/fired.jsonl` unless
    /// `overrides` says otherwise. It has no metrics endpoint and cannot be killed; tests
    /// that need either spawn the binary ([`Node::start`]).
    pub async fn embedded(dir: &Path, overrides: timerdb::config::Overrides) -> Node {
        let fired_path = dir.join("fired.jsonl");
        let store = format!("embedded://{}", dir.join("data").display());
        let sink = format!("jsonl://{}", fired_path.display());
        let config = timerdb::config::Config::load(timerdb::config::Overrides {
            listen: Some("127.0.0.1:0".into()),
            metrics_listen: Some("off".into()),
            store: overrides.store.clone().or(Some(store.clone())),
            sink: overrides.sink.clone().or(Some(sink.clone())),
            ..overrides
        })
        .expect("configuration");
        let handle = timerdb::server::start(config)
            .await
            .expect("start the node");
        Node {
            child: None,
            grpc: handle.addr,
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir: dir.to_path_buf(),
            fired_path,
            store,
            sink,
            extra: Vec::new(),
            env: Vec::new(),
            starts: 1,
            embedded: Some(handle),
        }
    }

    /// Stops an embedded node gracefully and waits until it has.
    pub async fn shutdown(&mut self) {
        let handle = self.embedded.take().expect("an embedded node");
        handle.shutdown().await.expect("clean shutdown");
    }

    /// Waits (up to `timeout`) for the process to exit by itself, as a kill-point makes it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timerdb did not exit:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The node's Prometheus text.
    pub async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("node-{}.log", self.starts))
    }

    async fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_timerdb"))
            .arg("serve")
            .arg("--listen")
            .arg(self.grpc.to_string())
            .arg("--metrics-listen")
            .arg(self.metrics.to_string())
            .arg("--store")
            .arg(&self.store)
            .arg("--sink")
            .arg(&self.sink)
            .args(&self.extra)
            .env("TIMERDB_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start timerdb");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("timerdb exited with {status}:\n{}", self.log_tail());
            }
            if let Ok(ch) = self.channel().await {
                let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
                let ok = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: "timerdb.v1.TimerService".into(),
                    })
                    .await
                    .map(|r| r.into_inner().status == 1)
                    .unwrap_or(false);
                if ok {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("timerdb did not become ready:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The whole current log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last lines of the current log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
    }

    /// A gRPC client for this node.
    pub async fn client(&self) -> TimerServiceClient<Channel> {
        TimerServiceClient::new(self.channel().await.expect("connect"))
    }

    /// Kills the process with SIGKILL: no shutdown work at all.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let ok = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill -TERM failed");
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "timerdb exited with {status} after SIGTERM"
            );
        }
    }

    /// Starts the node again on the same data, sink file and port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the node first");
        self.spawn().await;
    }

    /// Every complete line the sink has written so far.
    pub fn fired(&self) -> Vec<FiredLine> {
        read_fired(&self.fired_path)
    }

    /// Waits until every id in `ids` has fired at least once; panics with the missing ones
    /// after `timeout`.
    pub async fn wait_fired(&self, ids: &[String], timeout: Duration) -> Vec<FiredLine> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.fired();
            let seen: std::collections::HashSet<&str> =
                lines.iter().map(|l| l.timer_id.as_str()).collect();
            let missing: Vec<&String> = ids.iter().filter(|i| !seen.contains(i.as_str())).collect();
            if missing.is_empty() {
                return lines;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} of {} timers never fired, e.g. {:?}\nnode log:\n{}",
                    missing.len(),
                    ids.len(),
                    &missing[..missing.len().min(5)],
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Parses the complete lines of a JSON-lines sink file.
pub fn read_fired(path: &Path) -> Vec<FiredLine> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// How many times each timer id fired.
pub fn fire_counts(lines: &[FiredLine]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for l in lines {
        *m.entry(l.timer_id.clone()).or_insert(0) += 1;
    }
    m
}

/// Base64 decode for assertions.
pub fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// Addresses of the real Kafka and Cassandra the README's test command starts.
#[derive(Debug, Clone)]
pub struct Services {
    /// `host:port` of Kafka.
    pub kafka: String,
    /// `host:port` of Cassandra / ScyllaDB.
    pub scylla: String,
}

/// The services from `TIMERDB_KAFKA` / `TIMERDB_SCYLLA`. Without them the calling test is
/// skipped with a message, except under `CI=true`, where a missing service fails the run.
pub fn services() -> Option<Services> {
    let kafka = std::env::var("TIMERDB_KAFKA")
        .ok()
        .filter(|v| !v.is_empty());
    let scylla = std::env::var("TIMERDB_SCYLLA")
        .ok()
        .filter(|v| !v.is_empty());
    match (kafka, scylla) {
        (Some(kafka), Some(scylla)) => Some(Services { kafka, scylla }),
        _ if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "TIMERDB_KAFKA and TIMERDB_SCYLLA must be set under CI=true; run ./scripts/test, \
             which starts Kafka and Cassandra with deploy/local/up"
        ),
        _ => {
            eprintln!(
                "SKIPPED: TIMERDB_KAFKA / TIMERDB_SCYLLA not set (run ./scripts/test, or \
                 eval \"$(deploy/local/up)\" first)"
            );
            None
        }
    }
}

/// A name no other test or run uses (for topics and keyspaces).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Runs `deploy/local/ctl SERVICE ACTION` (stop/start/kill) for fault tests.
pub fn ctl(service: &str, action: &str) {
    ctl_with_env(service, action, &[]);
}

/// [`ctl`] with extra environment (e.g. `TIMERDB_LOCAL_KAFKA_OVERRIDES` for a start).
pub fn ctl_with_env(service: &str, action: &str, env: &[(&str, &str)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/ctl");
    let status = Command::new("bash")
        .arg(script)
        .args([service, action])
        .envs(env.iter().copied())
        .status()
        .expect("run deploy/local/ctl");
    assert!(
        status.success(),
        "deploy/local/ctl {service} {action} failed"
    );
}

/// A `SetTimeoutRequest` with the common fields set.
pub fn request(
    fire_at_ms: u64,
    topic: &str,
    partition: i32,
    payload: &str,
) -> timerdb_proto::v1::SetTimeoutRequest {
    timerdb_proto::v1::SetTimeoutRequest {
        fire_at: Some(timerdb::api::convert::timestamp(fire_at_ms)),
        payload: bytes::Bytes::from(payload.to_owned()),
        topic: topic.into(),
        partition,
        ..Default::default()
    }
}

/// The ids of a `SetTimeouts` answer in which every item was accepted.
pub fn accepted_ids(r: timerdb_proto::v1::SetTimeoutsResponse) -> Vec<String> {
    r.results
        .into_iter()
        .map(|r| match r.result {
            Some(timerdb_proto::v1::set_timeout_result::Result::TimerId(id)) => id,
            other => panic!("an item was refused: {other:?}"),
        })
        .collect()
}

/// Starts a node on the embedded store and a JSON-lines sink with `FAILPOINTS` set.
pub async fn start_with_failpoints(dir: &Path, store: Option<String>, failpoints: &str) -> Node {
    Node::start_full(dir, store, None, &[], &[("FAILPOINTS", failpoints)]).await
}

/// The epoch (ms) a request asks for.
pub fn fire_ms(r: &timerdb_proto::v1::SetTimeoutRequest) -> u64 {
    let t = r.fire_at.unwrap();
    t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000
}

/// Sends one `SetTimeouts` call; returns (id, requested epoch) of each accepted item.
pub async fn send_batch(
    client: &mut TimerServiceClient<Channel>,
    timers: Vec<timerdb_proto::v1::SetTimeoutRequest>,
) -> Result<Vec<(String, u64)>, tonic::Status> {
    let due: Vec<u64> = timers.iter().map(fire_ms).collect();
    let r = client
        .set_timeouts(timerdb_proto::v1::SetTimeoutsRequest { timers })
        .await?;
    Ok(r.into_inner()
        .results
        .into_iter()
        .zip(due)
        .filter_map(|(res, f)| match res.result {
            Some(timerdb_proto::v1::set_timeout_result::Result::TimerId(id)) => Some((id, f)),
            _ => None,
        })
        .collect())
}

/// The embedded store's table of timer rows (key: the id's 16 bytes).
const EMBEDDED_TIMERS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("timers");

/// The stored value of timer `id` in the embedded store in `dir`, read from the file once
/// the store has let go of it (tasks holding it may take a moment after a shutdown).
pub async fn embedded_row(dir: &Path, id: timerdb::timer::TimerId) -> Option<Vec<u8>> {
    let started = Instant::now();
    let db = loop {
        match redb::Database::open(dir.join("timers.redb")) {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let table = txn.open_table(EMBEDDED_TIMERS).unwrap();
    table
        .get(id.to_bytes().as_slice())
        .unwrap()
        .map(|v| v.value().to_vec())
}

/// Overwrites the stored value of timer `id` in the embedded store in `dir` (closed) with
/// `raw`, as a row the store cannot decode.
pub fn corrupt_embedded_row(dir: &Path, id: timerdb::timer::TimerId, raw: &[u8]) {
    const TIMERS: redb::TableDefinition<&[u8], &[u8]> = EMBEDDED_TIMERS;
    let db = redb::Database::open(dir.join("timers.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(TIMERS)
        .unwrap()
        .insert(id.to_bytes().as_slice(), raw)
        .unwrap();
    txn.commit().unwrap();
}
