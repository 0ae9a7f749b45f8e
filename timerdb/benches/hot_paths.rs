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

criterion_group!(benches, jsonl, spec_codec);
criterion_main!(benches);
