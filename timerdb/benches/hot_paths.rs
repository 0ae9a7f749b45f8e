//! Per-timer costs on the node's hot paths, compared within one run:
//! `cargo bench -p timerdb --bench hot_paths`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use timerdb::sink::jsonl::{FiredLine, encode_lines};
use timerdb::timer::{Timer, TimerId, TimerSpec};

fn timers(n: usize) -> Vec<Timer> {
    (0..n)
        .map(|i| Timer {
            id: TimerId::generate(1_700_000_000_000),
            created_ms: 1_700_000_000_000,
            spec: TimerSpec {
                fire_at_ms: 1_700_000_000_000 + i as u64,
                topic: "events".into(),
                partition: (i % 8) as i32,
                key: (i % 2 == 0).then(|| Bytes::from(format!("user-{i}"))),
                headers: vec![("trace".into(), Bytes::from_static(b"abc123"))],
                payload: Bytes::from(vec![b'x'; 100]),
                idempotency_key: None,
            },
        })
        .collect()
}

fn jsonl(c: &mut Criterion) {
    let batch = timers(4096);
    let mut g = c.benchmark_group("jsonl_encode");
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("borrowed_view", |b| {
        let mut buf = Vec::with_capacity(batch.len() * 400);
        b.iter(|| {
            buf.clear();
            encode_lines(black_box(&batch), 1_700_000_000_500, &mut buf);
            black_box(buf.len())
        })
    });
    g.bench_function("owned_fired_line", |b| {
        let mut buf = Vec::with_capacity(batch.len() * 400);
        b.iter(|| {
            buf.clear();
            for t in black_box(&batch) {
                serde_json::to_writer(&mut buf, &FiredLine::new(t, 1_700_000_000_500)).unwrap();
                buf.push(b'\n');
            }
            black_box(buf.len())
        })
    });
    g.finish();
}

fn spec_codec(c: &mut Criterion) {
    let batch = timers(4096);
    let mut g = c.benchmark_group("spec_codec");
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| {
            for t in black_box(&batch) {
                black_box(t.spec.to_bytes().unwrap());
            }
        })
    });
    let encoded: Vec<Vec<u8>> = batch.iter().map(|t| t.spec.to_bytes().unwrap()).collect();
    g.bench_function("decode", |b| {
        b.iter(|| {
            for e in black_box(&encoded) {
                black_box(TimerSpec::from_bytes(e).unwrap());
            }
        })
    });
    g.finish();
}

/// Where a group commit's new rows land in the embedded store's B-tree: keys ordered by
/// (bucket, slot, random) scatter each group over the whole tree, one page per row;
/// keys ordered by (bucket, sequence) append at the end of the few buckets being filled.
fn store_key_order(c: &mut Criterion) {
    use redb::{Database, TableDefinition};
    const T: TableDefinition<&[u8], &[u8]> = TableDefinition::new("t");
    const BUCKETS: u64 = 30;
    const GROUP: usize = 1000;
    let dir = tempfile::tempdir_in(shm_or_tmp()).unwrap();
    let value = vec![7u8; 110];
    let mut g = c.benchmark_group("store_group_commit");
    g.throughput(Throughput::Elements(GROUP as u64));
    g.sample_size(30);
    for (name, sequential) in [("random_slot_keys", false), ("sequential_keys", true)] {
        let db = Database::create(dir.path().join(format!("{name}.redb"))).unwrap();
        let mut seq: u64 = 0;
        let key = |i: u64, seq: &mut u64| -> Vec<u8> {
            let bucket = i % BUCKETS;
            let mut k = bucket.to_be_bytes().to_vec();
            if sequential {
                *seq += 1;
                k.extend_from_slice(&(*seq << 40 | (rand::random::<u64>() >> 24)).to_be_bytes());
            } else {
                k.extend_from_slice(&(rand::random::<u32>() % 1024).to_be_bytes());
                k.extend_from_slice(&rand::random::<u64>().to_be_bytes());
            }
            k
        };
        // A tree the size of 30 s at ~30k timers/s, so pages are not all hot.
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(T).unwrap();
            for i in 0..900_000u64 {
                t.insert(key(i, &mut seq).as_slice(), value.as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut rows: Vec<Vec<u8>> = (0..GROUP)
                    .map(|_| {
                        i += 1;
                        key(i, &mut seq)
                    })
                    .collect();
                rows.sort_unstable();
                let txn = db.begin_write().unwrap();
                {
                    let mut t = txn.open_table(T).unwrap();
                    for k in &rows {
                        t.insert(k.as_slice(), value.as_slice()).unwrap();
                    }
                }
                txn.commit().unwrap();
            })
        });
    }
    g.finish();
}

fn shm_or_tmp() -> std::path::PathBuf {
    let shm = std::path::PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

criterion_group!(benches, jsonl, spec_codec, store_key_order);
criterion_main!(benches);
