//! Save throughput of the embedded state store, the old redb one and the fjall one in the
//! same run: `tasks` tokio tasks (512, as `journeyx run`'s default queues) each read a
//! random user among 1,000,000 and save it back at the version read, as the runtime does
//! for every event. Both stores start full: the 1,000,000 records (~250 bytes of JSON
//! each, like a real `User`) are written first, straight into redb; the fjall store gets
//! them through its migration from that redb file, whose time is printed.
//!
//! `cargo bench -p journeyx --bench store` (`-- redb` or `-- fjall` for one store).
//! `JOURNEYX_BENCH_USERS` and `JOURNEYX_BENCH_TASKS` change the population and the tasks.
//! Besides criterion's report, it prints each store's samples in saves/s, their median,
//! and the ratio of the medians, so old and new are compared within one run on a noisy
//! machine.
//!
//! The redb store here is the write path of the old `EmbeddedStore`, copied: one writer
//! thread, groups of up to 4,096 saves in one durable redb commit, the version (the
//! record's first 8 bytes) checked inside it; reads on the calling task.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::{Criterion, SamplingMode, Throughput};
use journeyx::engine::{JourneyState, User};
use journeyx::store::embedded::EmbeddedStore;
use journeyx::store::{Saved, StateStore};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The old layout: `app \0 user` → version (8 bytes, big-endian) + JSON record.
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn key(n: u64) -> String {
    format!("demo\0user-{n:07}")
}

/// A user one journey in, with a few properties, sends and an applied offset: ~250 bytes
/// of JSON.
fn record(n: u64) -> User {
    let mut u = User::default();
    u.properties.insert("plan".into(), "gold".into());
    u.properties.insert("country".into(), "NO".into());
    u.properties
        .insert("signup_ms".into(), (1_763_900_000_000u64 + n).into());
    u.tags.insert("vip".into());
    u.sends = vec![1_763_990_000_000 + n, 1_763_995_000_000 + n];
    u.journeys.insert(
        "ping".into(),
        JourneyState {
            version: 1,
            node: "send".into(),
            active: false,
            entered_ms: 1_763_990_000_000 + n,
            entries: 3,
            timer: None,
        },
    );
    u.applied = BTreeMap::from([(7, 1_000_000 + n as i64)]);
    u
}

/// The two stores' common surface for this bench.
#[async_trait]
trait Saves: Send + Sync + 'static {
    async fn load(&self, key: &str) -> u64;
    async fn save(&self, key: &str, expected: u64, record: &User) -> Saved;
}

#[async_trait]
impl Saves for EmbeddedStore {
    async fn load(&self, key: &str) -> u64 {
        let (app, user) = key.split_once('\0').expect("app \\0 user");
        self.load_user(app, user).await.expect("load").version
    }

    async fn save(&self, key: &str, expected: u64, record: &User) -> Saved {
        let (app, user) = key.split_once('\0').expect("app \\0 user");
        self.save_user(app, user, expected, record)
            .await
            .expect("save")
    }
}

/// The old `EmbeddedStore`'s reads and saves (redb), as they were.
struct OldRedb {
    db: Arc<Database>,
    saves: std::sync::mpsc::Sender<OldSave>,
}

struct OldSave {
    key: String,
    expected: u64,
    value: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Saved>,
}

impl OldRedb {
    fn open(path: &Path) -> OldRedb {
        let db = Arc::new(Database::create(path).expect("redb"));
        let (saves, rx) = std::sync::mpsc::channel::<OldSave>();
        let for_writer = db.clone();
        std::thread::spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut group = vec![first];
                while group.len() < 4_096
                    && let Ok(more) = rx.try_recv()
                {
                    group.push(more);
                }
                let outcomes = old_apply(&for_writer, &mut group);
                for (s, o) in group.into_iter().zip(outcomes) {
                    let _ = s.reply.send(o);
                }
            }
        });
        OldRedb { db, saves }
    }
}

fn old_apply(db: &Database, group: &mut [OldSave]) -> Vec<Saved> {
    let txn = db.begin_write().expect("write");
    let mut out = Vec::with_capacity(group.len());
    {
        let mut t = txn.open_table(USERS).expect("table");
        for s in group.iter_mut() {
            let current = match t.get(s.key.as_str()).expect("read") {
                None => 0,
                Some(v) => u64::from_be_bytes(*v.value().first_chunk::<8>().expect("8")),
            };
            if current != s.expected {
                out.push(Saved::Conflict);
                continue;
            }
            s.value[..8].copy_from_slice(&(s.expected + 1).to_be_bytes());
            t.insert(s.key.as_str(), s.value.as_slice()).expect("write");
            out.push(Saved::Written(s.expected + 1));
        }
    }
    txn.commit().expect("commit");
    out
}

#[async_trait]
impl Saves for OldRedb {
    async fn load(&self, key: &str) -> u64 {
        let txn = self.db.begin_read().expect("read");
        let t = txn.open_table(USERS).expect("table");
        let v = t.get(key).expect("read").expect("prefilled");
        let raw = v.value();
        // Decoded as the old `load_user` did, so both stores pay for the JSON.
        let _: User = serde_json::from_slice(&raw[8..]).expect("json");
        u64::from_be_bytes(*raw.first_chunk::<8>().expect("8"))
    }

    async fn save(&self, key: &str, expected: u64, record: &User) -> Saved {
        let mut value = Vec::with_capacity(256);
        value.extend_from_slice(&[0; 8]);
        serde_json::to_writer(&mut value, record).expect("json");
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.saves
            .send(OldSave {
                key: key.to_owned(),
                expected,
                value,
                reply,
            })
            .expect("writer");
        answer.await.expect("writer")
    }
}

/// Writes `users` records at version 1 into a new redb file at `path`.
fn prefill(path: &Path, users: u64) {
    let db = Database::create(path).expect("redb");
    let mut n = 0;
    while n < users {
        let txn = db.begin_write().expect("write");
        {
            let mut t = txn.open_table(USERS).expect("table");
            for i in n..(n + 100_000).min(users) {
                let mut value = 1u64.to_be_bytes().to_vec();
                serde_json::to_writer(&mut value, &record(i)).expect("json");
                t.insert(key(i).as_str(), value.as_slice()).expect("write");
            }
        }
        txn.commit().expect("commit");
        n += 100_000;
    }
}

/// Runs `saves` read-then-save cycles over `tasks` tasks; how long they took.
async fn run(store: Arc<dyn Saves>, saves: u64, tasks: u64, users: u64) -> Duration {
    static SEED: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let left = Arc::new(AtomicU64::new(saves));
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks.min(saves))
        .map(|_| {
            let (store, left) = (store.clone(), left.clone());
            let mut x = SEED.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) | 1;
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    // xorshift64: no generator crate for a uniform pick.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = x % users;
                    let k = key(n);
                    let version = store.load(&k).await;
                    // Another task may have saved this user since the read: a conflict,
                    // which the runtime would retry, and still one commit's work here.
                    store.save(&k, version, &record(n)).await;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("task");
    }
    start.elapsed()
}

/// Each sample's saves/s, per store, in the order taken.
static SAMPLES: Mutex<Vec<(&'static str, u64, f64)>> = Mutex::new(Vec::new());

fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

fn saves(c: &mut Criterion) {
    let users = env("JOURNEYX_BENCH_USERS", 1_000_000);
    let tasks = env("JOURNEYX_BENCH_TASKS", 512);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "record: {} bytes of JSON; {users} users; {tasks} tasks",
        serde_json::to_vec(&record(1)).expect("json").len()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let old: OnceLock<Arc<dyn Saves>> = OnceLock::new();
    let new: OnceLock<Arc<dyn Saves>> = OnceLock::new();

    let mut group = c.benchmark_group("store_save");
    group
        .throughput(Throughput::Elements(1))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(5))
        .measurement_time(Duration::from_secs(30));
    let mut bench = |name: &'static str,
                     store: &OnceLock<Arc<dyn Saves>>,
                     open: &dyn Fn() -> Arc<dyn Saves>| {
        group.bench_function(name, |b| {
            let store = store.get_or_init(open).clone();
            b.iter_custom(|iters| {
                let took = rt.block_on(run(store.clone(), iters, tasks, users));
                SAMPLES.lock().expect("samples").push((
                    name,
                    iters,
                    iters as f64 / took.as_secs_f64(),
                ));
                took
            });
        });
        if store.get().is_some() {
            println!("{name}: after the samples: {}", rss());
        }
    };
    bench("redb", &old, &|| {
        let path = dir.path().join("redb").join("journeyx.redb");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        let t = Instant::now();
        prefill(&path, users);
        println!("redb: prefilled in {:.1?}; {}", t.elapsed(), rss());
        Arc::new(OldRedb::open(&path))
    });
    bench("fjall", &new, &|| {
        let at = dir.path().join("fjall");
        std::fs::create_dir_all(&at).expect("mkdir");
        prefill(&at.join("journeyx.redb"), users);
        let t = Instant::now();
        let store = rt.block_on(EmbeddedStore::open(&at)).expect("open");
        println!(
            "fjall: {users} records moved from redb in {:.1?}; {}",
            t.elapsed(),
            rss()
        );
        Arc::new(store)
    });
    group.finish();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The measured samples of each store (criterion's warm-up calls come first and are
/// left out: the last `sample_size` calls are the samples).
fn summary() {
    let samples = SAMPLES.lock().expect("samples");
    let mut medians = Vec::new();
    for name in ["redb", "fjall"] {
        let all: Vec<f64> = samples
            .iter()
            .filter(|(n, _, _)| *n == name)
            .map(|(_, _, r)| *r)
            .collect();
        if all.is_empty() {
            continue;
        }
        let measured = all[all.len().saturating_sub(10)..].to_vec();
        let m = median(measured.clone());
        println!(
            "{name}: saves/s median {m:.0} of {:?}",
            measured
                .iter()
                .map(|r| r.round() as u64)
                .collect::<Vec<_>>()
        );
        medians.push((name, m));
    }
    if let [(_, old), (_, new)] = medians[..] {
        println!("fjall / redb: {:.2}x", new / old);
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    saves(&mut c);
    c.final_summary();
    summary();
}
