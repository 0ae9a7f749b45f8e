//! A real cluster of `timerdb` processes, started with `deploy/local/cluster` in a
//! directory and on ports of its own, stopped when dropped.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;

/// Cluster tests share the machine's two cores: one cluster at a time per test binary.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    pub base: u16,
    pub nodes: Vec<String>,
}

impl LocalCluster {
    fn script() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/cluster")
    }

    fn try_run(&self, args: &[&str]) -> std::process::Output {
        self.try_run_env(args, &[])
    }

    fn try_run_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        Command::new("bash")
            .arg(Self::script())
            .args(args)
            .env("TIMERDB_CLUSTER_DIR", self.dir.path())
            .env("TIMERDB_CLUSTER_PORT_BASE", self.base.to_string())
            .env("TIMERDB_BIN", env!("CARGO_BIN_EXE_timerdb"))
            .envs(env.iter().copied())
            .output()
            .expect("run deploy/local/cluster")
    }

    pub fn run(&self, args: &[&str]) -> String {
        self.run_env(args, &[])
    }

    /// [`LocalCluster::run`] with extra environment for the nodes it starts (`FAILPOINTS`,
    /// or `TIMERDB_BIN` for a node started some other way).
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.try_run_env(args, env);
        assert!(
            out.status.success(),
            "deploy/local/cluster {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts `n` nodes on ports of their own: below the kernel's ephemeral range (where
    /// outgoing connections take theirs), free when checked, and tried again elsewhere if
    /// one was taken meanwhile.
    pub fn up(n: u32) -> LocalCluster {
        Self::up_env(n, &[])
    }

    /// [`LocalCluster::up`] with extra environment for every node (`FAILPOINTS`).
    pub fn up_env(n: u32, env: &[(&str, &str)]) -> LocalCluster {
        let mut attempt = 0;
        let (c, out) = loop {
            attempt += 1;
            let base = 21_000 + (rand::random::<u16>() % 1_000) * 10;
            let free =
                (0..10).all(|p| std::net::TcpListener::bind(("127.0.0.1", base + p)).is_ok());
            if !free {
                continue;
            }
            let c = LocalCluster {
                dir: tempfile::tempdir().unwrap(),
                base,
                nodes: Vec::new(),
            };
            let out = c.try_run_env(&["up", &n.to_string()], env);
            if out.status.success() {
                break (c, String::from_utf8(out.stdout).unwrap());
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                attempt < 5 && err.contains("Address already in use"),
                "deploy/local/cluster up {n} failed:\n{err}\n{}",
                c.logs()
            );
        };
        let mut c = c;
        for line in out.lines() {
            if let Some(v) = line.strip_prefix("export TIMERDB_NODES=") {
                c.nodes = v.split(',').map(str::to_owned).collect();
            }
        }
        assert_eq!(c.nodes.len(), n as usize, "exports: {out}");
        c
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 1..=4 {
            let p = self.dir.path().join(format!("node-{i}.log"));
            if let Ok(text) = std::fs::read_to_string(&p) {
                let lines: Vec<&str> = text.lines().collect();
                out += &format!(
                    "--- node {i} ---\n{}\n",
                    lines[lines.len().saturating_sub(15)..].join("\n")
                );
            }
        }
        out
    }

    /// Every line of every node's log, for what happened early in a test.
    pub fn whole_logs(&self) -> String {
        (1..=4)
            .filter_map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("node-{i}.log"))).ok()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn status(&self, via: usize) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_timerdb"))
            .args(["admin", "--server", &self.nodes[via], "status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    pub fn leader(&self, via: usize) -> u64 {
        self.status(via)["leader"].as_u64().expect("a leader")
    }

    /// Waits until every slot has an owner that runs it, with `members` active members.
    pub async fn wait_settled(&self, via: usize, members: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status(via);
            let active = s["members"]
                .as_array()
                .map(|m| m.iter().filter(|m| m["state"] == "active").count())
                .unwrap_or(0);
            let running: u64 = s["ranges"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .filter(|r| !r["in_memory"].is_null())
                        .map(|r| r["end"].as_u64().unwrap() - r["start"].as_u64().unwrap() + 1)
                        .sum()
                })
                .unwrap_or(0);
            if active == members && running == 256 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never settled with {members} members: {s}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl LocalCluster {
    /// [`LocalCluster::wait_settled`], and then the same ranges, owners and epochs, each
    /// with a lease, over 1.5 s: a member restarted quickly may still be declared gone
    /// (and its ranges moved and moved back) after the map first looks settled.
    pub async fn wait_stable(&self, via: usize, members: usize) {
        let deadline = Instant::now() + Duration::from_secs(45);
        let shape = |s: &serde_json::Value| -> Option<Vec<(u64, u64, u64, u64)>> {
            s["ranges"]
                .as_array()?
                .iter()
                .map(|r| {
                    (r["lease_left_ms"].as_u64()? > 0).then_some(())?;
                    Some((
                        r["start"].as_u64()?,
                        r["end"].as_u64()?,
                        r["owner"].as_u64()?,
                        r["epoch"].as_u64()?,
                    ))
                })
                .collect()
        };
        loop {
            self.wait_settled(via, members).await;
            let before = shape(&self.status(via));
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            self.wait_settled(via, members).await;
            let after = shape(&self.status(via));
            if before.is_some() && before == after {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the ranges never held still: {after:?}\n{}",
                self.logs()
            );
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let _ = Command::new("bash")
            .arg(Self::script())
            .arg("down")
            .env("TIMERDB_CLUSTER_DIR", self.dir.path())
            .env("TIMERDB_CLUSTER_PORT_BASE", self.base.to_string())
            .output();
        if failed {
            self.keep_logs();
        }
    }
}

impl LocalCluster {
    /// A failed test's node logs outlive its directory: they are copied under
    /// `$TIMERDB_LOCAL_DIR/failed-clusters` (where CI's failure message points) or the
    /// system's temporary directory.
    fn keep_logs(&self) {
        let root = std::env::var_os("TIMERDB_LOCAL_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join("failed-clusters");
        let name = self
            .dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.base.to_string());
        let to = root.join(name);
        if std::fs::create_dir_all(&to).is_err() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(&p, to.join(e.file_name()));
            }
        }
        eprintln!("node logs of the failed test: {}", to.display());
    }
}

impl LocalCluster {
    /// Node `id`'s Prometheus endpoint.
    pub fn metrics_addr(&self, id: u16) -> String {
        format!("127.0.0.1:{}", self.base + 2 * id + 1)
    }

    /// Node `id`'s Prometheus text.
    pub async fn metrics_text(&self, id: u16) -> String {
        let addr = self.metrics_addr(id);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap()
    }
}
