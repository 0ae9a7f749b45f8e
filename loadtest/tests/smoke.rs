//! Smoke test: a real TimerDB node as a child process (JSON-lines sink, loopback port), a
//! short `steady` run and a small `burst` against it; nothing acknowledged may be lost or
//! fire early. It asserts correctness only, never speed, so a slow CI machine passes.
//!
//! The node binary is taken from the same target directory as this test (`cargo build
//! --workspace --all-targets` builds it), or from `TIMERDB_BIN`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use timerdb_loadtest::{FireDist, RunConfig, Scenario, Source};

fn timerdb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TIMERDB_BIN") {
        return PathBuf::from(p);
    }
    // This test runs from <target>/<profile>/deps/; the node binary is in <target>/<profile>/.
    let exe = std::env::current_exe().expect("test executable path");
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("timerdb"));
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let candidates = beside
        .into_iter()
        .chain(["debug", "release"].map(|p| manifest.join(p).join("timerdb")));
    for c in candidates.clone() {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "timerdb binary not found (looked at {:?}); build it first with \
         `cargo build --workspace --all-targets`, or set TIMERDB_BIN",
        candidates.collect::<Vec<_>>()
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free loopback port")
        .port()
}

/// Kills the node when the test ends, however it ends.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_and_burst_lose_nothing_and_fire_nothing_early() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sink = dir.path().join("fired.jsonl");
    // The sink file must exist before the run tails it; the node appends to it.
    std::fs::write(&sink, b"").expect("create sink file");
    let port = free_port();
    let child = Command::new(timerdb_bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "off"])
        .arg("--store")
        .arg(format!("embedded://{}", dir.path().join("data").display()))
        .arg("--sink")
        .arg(format!("jsonl://{}", sink.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start timerdb");
    let node = Node(child);
    let target = format!("http://127.0.0.1:{port}");

    let mut steady = RunConfig::preset(Scenario::Steady, &target, Source::Jsonl(sink.clone()));
    steady.rate = 2_000;
    steady.duration = Duration::from_secs(5);
    steady.fire = FireDist::Uniform(Duration::ZERO, Duration::from_secs(3));
    steady.batch = 200;
    // Generous on a slow machine: the run ends early once everything arrived.
    steady.drain = Duration::from_secs(60);
    steady.server_pid = Some(node.0.id());
    steady.progress = false;
    let r = timerdb_loadtest::run(steady).await.expect("steady run");
    print!("{}", r.summary());
    assert_eq!(r.counts.acked, 10_000, "every timer acknowledged");
    assert_eq!(r.counts.lost, 0, "lost timers");
    assert_eq!(r.counts.early, 0, "early timers");
    assert_eq!(r.counts.corrupt, 0, "corrupted timers");
    assert_eq!(r.counts.unexpected, 0, "unexpected messages");
    assert!(r.passed);

    let mut burst = RunConfig::preset(Scenario::Burst, &target, Source::Jsonl(sink.clone()));
    burst.count = Some(5_000);
    burst.rate = 5_000;
    burst.fire = FireDist::Burst(Duration::from_secs(3));
    burst.drain = Duration::from_secs(60);
    burst.progress = false;
    let r = timerdb_loadtest::run(burst).await.expect("burst run");
    print!("{}", r.summary());
    assert_eq!(r.counts.acked, 5_000);
    assert_eq!((r.counts.lost, r.counts.early, r.counts.corrupt), (0, 0, 0));
    assert!(r.passed);

    // Reports are written where asked, chart included.
    let files = r.write(&dir.path().join("reports")).expect("write reports");
    assert!(files.iter().all(|f| f.is_file()));

    // Two targets, the first of which stops answering after the connections opened: with
    // retries every batch sent to it goes to the other, keyed, and nothing is lost.
    let doomed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a port that will go away");
    let doomed_addr = doomed.local_addr().expect("its address");
    let accepting = tokio::spawn(async move {
        // Accept the loadtest's connections, then drop them all with the listener.
        let mut held = Vec::new();
        while let Ok(Ok((conn, _))) =
            tokio::time::timeout(Duration::from_secs(2), doomed.accept()).await
        {
            held.push(conn);
        }
    });
    let mut split = RunConfig::preset(Scenario::Steady, &target, Source::Jsonl(sink.clone()));
    split.targets = vec![format!("http://{doomed_addr}"), target.clone()];
    split.retry = true;
    split.rate = 2_000;
    split.count = Some(2_000);
    split.batch = 100;
    split.fire = FireDist::Uniform(Duration::ZERO, Duration::from_secs(2));
    split.drain = Duration::from_secs(60);
    split.call_timeout = Duration::from_secs(2);
    split.progress = false;
    let r = timerdb_loadtest::run(split).await.expect("two-target run");
    let _ = accepting.await;
    print!("{}", r.summary());
    assert_eq!(
        r.counts.acked, 2_000,
        "every timer acknowledged by the live node"
    );
    assert!(
        r.counts.retried > 0,
        "batches to the dead target were retried"
    );
    assert_eq!((r.counts.lost, r.counts.early, r.counts.corrupt), (0, 0, 0));
    assert_eq!(r.counts.duplicates, 0);
    assert!(r.passed);
    drop(node);
}
