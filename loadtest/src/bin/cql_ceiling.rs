//! `timerdb-cql-ceiling`: Cassandra's (or ScyllaDB's) own write ceiling on this machine,
//! so TimerDB's rate on that store can be reported as a ratio to it (docs/benchmarks.md).
//! Plain prepared INSERTs of rows shaped like TimerDB's `timers` rows (same key, same blob
//! size), at QUORUM, `--concurrency` in flight, for `--duration`; no index, no reads, no
//! deletes: everything TimerDB does on top of that is what the ratio measures.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::Consistency;

/// Measure raw CQL insert throughput with TimerDB-shaped rows.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Cassandra/ScyllaDB `host:port`.
    #[arg(long, env = "TIMERDB_SCYLLA", default_value = "127.0.0.1:19042")]
    scylla: String,
    /// How long to insert.
    #[arg(long, default_value = "20s")]
    duration: humantime::Duration,
    /// Inserts in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Size of the `spec` blob per row (TimerDB's encoded timer: payload plus ~40 bytes).
    #[arg(long, default_value_t = 110)]
    row_bytes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let session = Arc::new(SessionBuilder::new().known_node(&a.scylla).build().await?);
    let ks = format!("cql_ceiling_{}", std::process::id());
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
            ),
            (),
        )
        .await?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {ks}.timers (slot int, bucket bigint, rand bigint, state tinyint, \
                 created_ms bigint, spec blob, PRIMARY KEY ((slot, bucket), rand))"
            ),
            (),
        )
        .await?;
    let mut insert = session
        .prepare(format!(
            "INSERT INTO {ks}.timers (slot, bucket, rand, state, created_ms, spec) VALUES (?, ?, ?, 0, ?, ?)"
        ))
        .await?;
    insert.set_consistency(Consistency::Quorum);
    let insert = Arc::new(insert);
    let blob = vec![0x5au8; a.row_bytes];
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from(a.duration);
    let workers: Vec<_> = (0..a.concurrency)
        .map(|w| {
            let (session, insert, blob) = (session.clone(), insert.clone(), blob.clone());
            let (done, failed) = (done.clone(), failed.clone());
            tokio::spawn(async move {
                let mut n: i64 = 0;
                while Instant::now() < deadline {
                    n += 1;
                    let rand = (w as i64) << 40 | n;
                    // Like timers spread over 1,024 slots and a few 1 s buckets.
                    let row = (
                        (rand % 1024) as i32,
                        (n / 5000) * 1000,
                        rand,
                        n,
                        blob.clone(),
                    );
                    match session.execute_unpaged(&insert, row).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = done.load(Ordering::Relaxed);
    println!(
        "cql ceiling: {:.0} inserts/s ({ok} in {secs:.1} s, {} failed; {} in flight, {}-byte blobs, QUORUM)",
        ok as f64 / secs,
        failed.load(Ordering::Relaxed),
        a.concurrency,
        a.row_bytes
    );
    session
        .query_unpaged(format!("DROP KEYSPACE {ks}"), ())
        .await?;
    Ok(())
}
