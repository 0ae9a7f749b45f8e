//! The numbers behind `docs/scaling.md`: what 1,000 members and 10 B stored timers cost the
//! cluster map, the Raft leader and Scylla, and which limit is reached first.
//!
//! Cluster maps are built with the real [`ClusterMap::apply`] (`Init`, then `AddMember` +
//! `Rebalance` per join, as `ClusterNode::add_member` does) and serialised as the Raft store
//! does (serde_json). Two things are models, labelled as such in the output: the slot split
//! (there is no split command yet) and the request rates (formulas read off `raft/src/node.rs`,
//! openraft 0.9's `ensure_linearizable` and `timerdb/src/store/scylla.rs`). Deterministic:
//! no clock, no randomness beyond a fixed-seed generator.
//!
//! `cargo run --release -p timerdb-raft --example scaling [-- --help]`

use std::collections::HashSet;

use clap::Parser;
use serde::Serialize;
use timerdb_raft::ClusterConfig;
use timerdb_raft::map::{ClusterMap, Command, LeaseSettings};

#[derive(Debug, Parser)]
#[command(about = "TimerDB scaling simulation (numbers for docs/scaling.md)")]
struct Args {
    /// Member counts to report.
    #[arg(long, value_delimiter = ',', default_value = "3,10,25,100,250,1000")]
    members: Vec<u64>,
    /// Timers stored.
    #[arg(long, default_value_t = 10_000_000_000)]
    stored: u64,
    /// Payload bytes of a timer.
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// Kafka topic name length of a timer.
    #[arg(long, default_value_t = 16)]
    topic_len: usize,
    /// Share of all stored timers due in the same bucket (a campaign at a round time).
    #[arg(long, default_value_t = 0.001)]
    hot_fraction: f64,
    /// Replication factor of the keyspace.
    #[arg(long, default_value_t = 3)]
    rf: u64,
    /// ASSUMED small internal calls per second one leader serves (to be measured).
    #[arg(long, default_value_t = 20_000)]
    leader_budget: u64,
    /// Busiest member's share over the mean that counts as unbalanced.
    #[arg(long, default_value_t = 0.10)]
    imbalance: f64,
}

/// Mirror of `timerdb::timer::TimerSpec`, field for field, so postcard encodes it to the same
/// length (`Bytes` and `Vec<u8>` both encode as a varint length and the bytes).
#[derive(Serialize)]
struct TimerSpec {
    fire_at_ms: u64,
    topic: String,
    partition: i32,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    payload: Vec<u8>,
    idempotency_key: Option<String>,
}

/// Slot counts the Scylla tables cover; the first two are also grown as cluster maps.
const SLOT_COUNTS: [u32; 4] = [256, 4_096, 16_384, 65_536];
/// The live split modelled below: 256 slots split 64 ways when the cluster has 25 members.
const SPLIT_AT: u64 = 25;
const SPLIT_K: u32 = 64;
/// Bucket width (`Layout::default().bucket_ms`, timerdb/src/timer.rs).
const BUCKET_MS: u64 = 1_000;
/// Progress records per range per second (`PROGRESS_EVERY` = 100 ms, scheduler/range.rs).
const PROGRESS_PER_S: f64 = 10.0;
/// Estimated storage overhead per CQL row (row flags, sizes, timestamp deltas, 3 cells'
/// flags, blob length) and per partition (key, header, index entry), uncompressed.
const ROW_OVERHEAD: u64 = 16;
const PARTITION_OVERHEAD: u64 = 40;
/// Linux: seconds a closed connection stays in TIME_WAIT, and the default ephemeral port
/// range (32768-60999), i.e. the connections to one peer that can be open or waiting at once.
const TIME_WAIT_S: f64 = 60.0;
const EPHEMERAL_PORTS: f64 = 28_232.0;
/// Scylla's `compaction_rows_count_warning_threshold` default.
const SCYLLA_ROWS_WARNING: f64 = 100_000.0;

fn addr(id: u64) -> String {
    format!("10.0.{}.{}:7000", id / 256, id % 256)
}

fn init(slots: u32, members: u64) -> ClusterMap {
    let mut m = ClusterMap::default();
    m.apply(&Command::Init {
        slots,
        members: (1..=members).map(|id| (id, addr(id))).collect(),
        lease: LeaseSettings::default(),
    })
    .expect("init");
    m
}

fn join(m: &mut ClusterMap, id: u64) {
    m.apply(&Command::AddMember { id, addr: addr(id) })
        .expect("add member");
    m.apply(&Command::Rebalance).expect("rebalance");
}

/// MODEL (no such command yet): every slot `s` becomes `s*k .. s*k+k-1`, same owner, same
/// epoch, same handover. The slot function that matches is [`slot_v2`].
fn split(m: &ClusterMap, k: u32) -> ClusterMap {
    let mut out = m.clone();
    out.slots = m.slots * k;
    out.owners = m
        .owners
        .iter()
        .flat_map(|o| std::iter::repeat_n(*o, k as usize))
        .collect();
    out
}

/// MODEL: the slot of hash `h` after a split by `k` of a store of `s` slots: the old slot,
/// then the next bits of the same crc32 (`h mod s` picks the parent, `(h / s) mod k` the child).
fn slot_v2(h: u32, s: u32, k: u32) -> u32 {
    (h % s) * k + (h / s) % k
}

/// When to split the map (model), and how many ways: at that member count.
type Split = Option<(u64, u32)>;

struct Row {
    slots: u32,
    members: u64,
    ranges: usize,
    busiest_over_mean: f64,
    idle: usize,
    map_json: usize,
    snapshot_json: usize,
    map_postcard: usize,
    ranges_json: usize,
    moved: usize,
    ideal: u32,
    new_ranges: usize,
    ranges_ever: usize,
}

fn stats(m: &ClusterMap, ranges_ever: usize) -> Row {
    let mut per = std::collections::BTreeMap::new();
    for id in m.members.keys() {
        per.insert(*id, 0usize);
    }
    for o in &m.owners {
        *per.entry(o.owner.expect("owned")).or_default() += 1;
    }
    let mean = m.slots as f64 / per.len() as f64;
    let map_json = serde_json::to_vec(m).expect("json");
    Row {
        slots: m.slots,
        members: per.len() as u64,
        ranges: m.ranges().len(),
        busiest_over_mean: *per.values().max().expect("members") as f64 / mean,
        idle: per.values().filter(|n| **n == 0).count(),
        // The snapshot keeps the map's JSON as a byte vector inside JSON (store.rs
        // `StoredSnapshot`, network.rs `encode`): a JSON array of numbers.
        snapshot_json: serde_json::to_vec(&map_json).expect("json").len(),
        map_json: map_json.len(),
        map_postcard: postcard::to_allocvec(m).expect("postcard").len(),
        ranges_json: serde_json::to_vec(&m.ranges()).expect("json").len(),
        moved: 0,
        ideal: 0,
        new_ranges: 0,
        ranges_ever,
    }
}

/// Grows a cluster from `m` one member at a time; at each checkpoint records the map and the
/// join of the next member. `split_at`: split the map (model) when it has that many members.
fn grow(mut m: ClusterMap, checkpoints: &[u64], split_at: Split) -> Vec<Row> {
    let max = *checkpoints.iter().max().expect("checkpoints");
    let mut ever: HashSet<(u32, u32)> = HashSet::new();
    let mut last: Vec<(u32, u32)> = Vec::new();
    let mut rows = Vec::new();
    let mut n = m.members.len() as u64;
    loop {
        if let Some((at, k)) = split_at
            && n == at
        {
            // Progress rows of the old numbering are rewritten into the new one.
            ever = ever.iter().map(|(a, b)| (a * k, b * k + k - 1)).collect();
            last.clear();
            m = split(&m, k);
        }
        // Only ranges that are new since the last step can add to `ever` (both sorted).
        let now: Vec<(u32, u32)> = m.ranges().iter().map(|r| (r.start, r.end)).collect();
        let mut old = last.iter().peekable();
        for r in &now {
            while old.next_if(|o| *o < r).is_some() {}
            if old.peek() != Some(&r) {
                ever.insert(*r);
            }
        }
        last = now;
        let before = checkpoints
            .contains(&n)
            .then(|| (stats(&m, ever.len()), m.owners.clone()));
        join(&mut m, n + 1);
        n += 1;
        if let Some((mut row, owners)) = before {
            row.moved = owners
                .iter()
                .zip(&m.owners)
                .filter(|(a, b)| a.owner != b.owner)
                .count();
            row.ideal = m.slots / n as u32;
            row.new_ranges = m.ranges_of(n).len();
            rows.push(row);
        }
        if n > max {
            break;
        }
    }
    rows
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn human(x: f64) -> String {
    let (v, unit) = match x.abs() {
        a if a >= 1e12 => (x / 1e12, "T"),
        a if a >= 1e9 => (x / 1e9, "G"),
        a if a >= 1e6 => (x / 1e6, "M"),
        a if a >= 1e3 => (x / 1e3, "k"),
        _ => (x, ""),
    };
    if unit.is_empty() && v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.1}{unit}")
    }
}

fn main() {
    let args = Args::parse();
    let mut checkpoints = args.members.clone();
    checkpoints.sort_unstable();
    checkpoints.dedup();
    let start = *checkpoints.first().expect("--members");
    let defaults = ClusterConfig::new(1, addr(1), "unused");
    let lease = defaults.lease;
    let raft_heartbeat_ms = defaults.election_timeout_ms.0 / 3;
    println!(
        "TimerDB scaling simulation. Defaults read from the code: {} slots, bucket {} ms, \
         lease renewal every {} ms (lease {} ms), Raft heartbeat every {} ms.\n",
        defaults.slots, BUCKET_MS, lease.heartbeat_ms, lease.lease_ms, raft_heartbeat_ms
    );

    // 1. The cluster map.
    println!(
        "1. Cluster map, grown one member at a time from {start} (real Init / AddMember + Rebalance)"
    );
    println!(
        "{:>14} {:>7} {:>6} {:>7} {:>4} {:>8} {:>8} {:>8} {:>9} {:>14} {:>10} {:>11}",
        "slots",
        "members",
        "ranges",
        "busiest",
        "idle",
        "map JSON",
        "snapshot",
        "postcard",
        "as ranges",
        "join: moved",
        "new ranges",
        "ranges ever"
    );
    let mut at_max = Vec::new();
    let scenarios: Vec<(String, ClusterMap, Split)> = SLOT_COUNTS[..2]
        .iter()
        .map(|s| (s.to_string(), init(*s, start), None))
        .chain(std::iter::once((
            format!("256>{}@{SPLIT_AT}*", 256 * SPLIT_K),
            init(256, start),
            Some((SPLIT_AT, SPLIT_K)),
        )))
        .collect();
    // The scenarios are independent: grow them side by side, print in order.
    let grown: Vec<(String, Vec<Row>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = scenarios
            .into_iter()
            .map(|(label, m, split_at)| {
                let checkpoints = &checkpoints;
                scope.spawn(move || (label, grow(m, checkpoints, split_at)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("scenario"))
            .collect()
    });
    for (label, mut rows) in grown {
        for r in &rows {
            println!(
                "{:>14} {:>7} {:>6} {:>6.2}x {:>4} {:>8} {:>8} {:>8} {:>9} {:>8} ({:>4}) {:>10} {:>11}",
                label,
                r.members,
                r.ranges,
                r.busiest_over_mean,
                r.idle,
                human(r.map_json as f64),
                human(r.snapshot_json as f64),
                human(r.map_postcard as f64),
                human(r.ranges_json as f64),
                r.moved,
                r.ideal,
                r.new_ranges,
                r.ranges_ever
            );
        }
        at_max.push((label, rows.pop().expect("rows")));
    }
    println!(
        "  busiest = the busiest member's slots over the mean; idle = members owning no slot;\n  \
         snapshot = the map as the Raft store keeps and sends it (JSON bytes inside JSON);\n  \
         postcard = the same map in postcard; as ranges = the ranges alone as JSON;\n  \
         join = the next member's join: slots moved (ideal: slots / members) and ranges it gets;\n  \
         ranges ever = distinct ranges seen, i.e. the rows `range_progress` keeps.\n  \
         * MODEL: split x{SPLIT_K} when the cluster has \
         {SPLIT_AT} members.\n"
    );

    // 2. The split (model) checked against the real slot function.
    let base = init(256, start);
    let mut m = base.clone();
    for id in start + 1..=SPLIT_AT {
        join(&mut m, id);
    }
    let contiguous = split(&m, SPLIT_K);
    for r in m.ranges() {
        let (a, b) = (r.start * SPLIT_K, r.end * SPLIT_K + SPLIT_K - 1);
        let whole = contiguous
            .ranges()
            .into_iter()
            .any(|n| (n.start, n.end, n.owner, n.epoch) == (a, b, r.owner, r.epoch));
        assert!(whole, "range {r:?} did not stay one range");
    }
    let mut modulo = m.clone();
    modulo.slots = m.slots * SPLIT_K;
    modulo.owners = (0..modulo.slots)
        .map(|c| m.owners[(c % m.slots) as usize])
        .collect();
    let (s, k, samples) = (256u32, SPLIT_K, 1u64 << 22);
    let mut counts = vec![0u32; (s * k) as usize];
    let mut seed = 42u64;
    for _ in 0..samples {
        let rand = splitmix(&mut seed);
        let id = format!("{:016x}{rand:016x}", 1_800_000_000_000u64);
        let v1 = timerdb_client::slot_of(&id, s).expect("id");
        let v2 = slot_v2(crc32fast::hash(&rand.to_be_bytes()), s, k);
        assert_eq!(v2 / k, v1, "a child must stay inside its parent slot");
        counts[v2 as usize] += 1;
    }
    let mean = samples as f64 / counts.len() as f64;
    let var = counts
        .iter()
        .map(|c| (*c as f64 - mean).powi(2))
        .sum::<f64>()
        / counts.len() as f64;
    println!(
        "2. Splitting 256 slots x{k} (MODEL) on the {SPLIT_AT}-member map of section 1\n   \
         ranges before: {}\n   \
         ranges after, slot_v2 = (h mod 256)*{k} + (h/256) mod {k}: {} (each kept whole, same \
         owner and epoch)\n   \
         ranges after, slot = h mod {}: {}\n   \
         {samples} ids: slot_v2 / {k} == timerdb_client::slot_of(id, 256) for every one;\n   \
         spread over {} slots: standard deviation / Poisson's = {:.3} (1 = uniform)\n",
        m.ranges().len(),
        contiguous.ranges().len(),
        s * k,
        modulo.ranges().len(),
        s * k,
        var.sqrt() / mean.sqrt()
    );

    // 3. Lease renewals at the leader.
    let renew_per_s = 1000.0 / lease.heartbeat_ms as f64;
    let raft_hb_per_s = 1000.0 / raft_heartbeat_ms as f64;
    println!(
        "3. Calls per second at the Raft leader (MODEL of node.rs + openraft 0.9; budget {} is ASSUMED)",
        args.leader_budget
    );
    println!(
        "{:>8} {:>10} {:>14} {:>11} {:>12} {:>15} | {:>13} {:>15}",
        "members",
        "renewals",
        "quorum checks",
        "raft beats",
        "today total",
        "TIME_WAIT/peer",
        "one check/tick",
        "+ 5 voters only"
    );
    let today = |n: f64| n * renew_per_s * (n - 1.0) + n * renew_per_s + (n - 1.0) * raft_hb_per_s;
    let coalesced = |n: f64| renew_per_s * (n - 1.0) + n * renew_per_s + (n - 1.0) * raft_hb_per_s;
    let five = |n: f64| renew_per_s * 4.0 + n * renew_per_s + (n - 1.0) * raft_hb_per_s;
    // Each quorum check closes its connections: one socket per peer per renewal sits in
    // TIME_WAIT at the leader for Linux's 60 s.
    let time_wait = |n: f64| n * renew_per_s * TIME_WAIT_S;
    for &n in &checkpoints {
        let f = n as f64;
        println!(
            "{:>8} {:>10} {:>14} {:>11} {:>12} {:>15} | {:>13} {:>15}",
            n,
            human(f * renew_per_s),
            human(f * renew_per_s * (f - 1.0)),
            human((f - 1.0) * raft_hb_per_s),
            human(today(f)),
            human(time_wait(f)),
            human(coalesced(f)),
            human(five(f))
        );
    }
    println!(
        "  today: every member is a voter and asks every {} ms; each renewal runs\n  \
         ensure_linearizable, which sends an AppendEntries to every other voter (on a new\n  \
         connection: Network::new_client builds a fresh channel per call). one check/tick: one\n  \
         quorum check per {} ms answers all renewals waiting. + 5 voters only: the rest learners.\n  \
         TIME_WAIT/peer: closed check connections to one peer held {TIME_WAIT_S} s by the \
         leader's kernel\n  \
         (ESTIMATE; Linux's default ephemeral range has {EPHEMERAL_PORTS} ports per peer).\n",
        lease.heartbeat_ms, lease.heartbeat_ms
    );

    // 4. Scylla.
    let spec = TimerSpec {
        fire_at_ms: 1_800_000_000_000,
        topic: "t".repeat(args.topic_len),
        partition: 7,
        key: None,
        headers: Vec::new(),
        payload: vec![0xa5; args.payload],
        idempotency_key: None,
    };
    let spec_bytes = postcard::to_allocvec(&spec).expect("postcard").len() as u64;
    // rand bigint + state tinyint + created_ms bigint + spec blob + overhead.
    let row = 8 + 1 + 8 + spec_bytes + ROW_OVERHEAD;
    let stored = args.stored as f64;
    println!(
        "4. Scylla: {} timers, row ~{row} B (postcard spec {spec_bytes} B: {} B payload, {}-char \
         topic; +17 B columns, +{ROW_OVERHEAD} B row overhead, ESTIMATED), {:.1} TB with RF {}",
        human(stored),
        args.payload,
        args.topic_len,
        stored * row as f64 * args.rf as f64 / 1e12,
        args.rf
    );
    println!(
        "{:>8} {:>9} {:>7} {:>10} {:>10} {:>11} {:>13} {:>13}",
        "horizon",
        "fires/s",
        "slots",
        "rows/part",
        "part size",
        "partitions",
        "hot rows/part",
        "hot part size"
    );
    let horizons = [("1 h", 3_600u64), ("1 day", 86_400), ("30 days", 2_592_000)];
    let part_bytes = |rows: f64| rows * row as f64 + PARTITION_OVERHEAD as f64;
    for (name, secs) in horizons {
        let rate = stored / secs as f64;
        let per_bucket = rate * BUCKET_MS as f64 / 1000.0;
        for s in SLOT_COUNTS {
            let s = s as f64;
            let nonempty = s * (1.0 - (-per_bucket / s).exp());
            let hot = stored * args.hot_fraction / s;
            println!(
                "{:>8} {:>9} {:>7} {:>10.1} {:>9}B {:>11} {:>13} {:>12}B",
                name,
                human(rate),
                s,
                per_bucket / s,
                human(part_bytes(per_bucket / s)),
                human(nonempty * (secs * 1000 / BUCKET_MS) as f64),
                human(hot),
                human(part_bytes(hot))
            );
        }
    }
    let crossing: Vec<String> = SLOT_COUNTS
        .iter()
        .map(|s| {
            let f = SCYLLA_ROWS_WARNING * *s as f64 / stored;
            format!("{s} slots: {:.2}%", f * 100.0)
        })
        .collect();
    println!(
        "  uniform fire times over the horizon; hot = {}% of all timers due in one bucket.\n  \
         Share of all timers due in one bucket that makes a partition pass Scylla's\n  \
         {SCYLLA_ROWS_WARNING} rows warning: {}.\n",
        args.hot_fraction * 100.0,
        crossing.join(", ")
    );

    let members = *checkpoints.last().expect("members") as f64;
    println!(
        "   Requests per second besides the timer inserts, {members} members \
         (MODEL of scylla.rs; ranges from section 1)"
    );
    println!(
        "{:>8} {:>9} {:>14} {:>6} {:>10} {:>11} {:>10} {:>9} {:>9} {:>8} {:>9}",
        "horizon",
        "inserts",
        "slots",
        "ranges",
        "index rows",
        "part. reads",
        "part. dels",
        "range ops",
        "low-water",
        "progress",
        "per timer"
    );
    for (name, secs) in &horizons[..2] {
        let rate = stored / *secs as f64;
        let per_bucket = rate * BUCKET_MS as f64 / 1000.0;
        for (label, r) in &at_max {
            let s = r.slots as f64;
            let nonempty = s * (1.0 - (-per_bucket / s).exp());
            // One bucket_slots row per (writing process, bucket, slot): its cache helps only
            // while few processes write into a slot's bucket.
            let combos = members * s;
            let index = combos * (1.0 - (-per_bucket / combos).exp());
            let range_ops = 4.0 * r.ranges as f64;
            let lwm = s;
            let progress = PROGRESS_PER_S * r.ranges as f64;
            let total = index + 2.0 * nonempty + range_ops + lwm + progress;
            println!(
                "{:>8} {:>9} {:>14} {:>6} {:>10} {:>11} {:>10} {:>9} {:>9} {:>8} {:>9.2}",
                name,
                human(rate),
                label,
                r.ranges,
                human(index),
                human(nonempty),
                human(nonempty),
                human(range_ops),
                human(lwm),
                human(progress),
                total / rate
            );
        }
    }
    println!(
        "  per bucket: one partition read and one partition delete per non-empty (slot, bucket),\n  \
         4 index calls per range (load, delete, index delete, 'others?' read); a low-water row\n  \
         per slot per second (written once a second per range, one row per slot); a progress\n  \
         row per range every 100 ms. per timer = all of these / fires per second.\n"
    );

    // 5. What is reached first.
    println!(
        "5. Member count at which each limit is reached (first N from 2 up, or never below 100,000)"
    );
    let first = |f: &dyn Fn(f64) -> bool| (2..100_000u64).find(|n| f(*n as f64));
    let budget = args.leader_budget as f64;
    let mut limits: Vec<(Option<u64>, String)> = vec![
        (
            first(&|n| today(n) > budget),
            format!("leader calls/s today > {budget} (assumed budget)"),
        ),
        (
            first(&|n| {
                let s = 256.0;
                (s / n).ceil() / (s / n) > 1.0 + args.imbalance
            }),
            format!(
                "256 slots: busiest member > {:.0}% over the mean",
                args.imbalance * 100.0
            ),
        ),
        (
            first(&|n| time_wait(n) > EPHEMERAL_PORTS),
            "today: the leader's closed connections to one peer fill its ephemeral ports".into(),
        ),
        (
            first(&|n| n > 256.0),
            "256 slots: a member owns nothing".into(),
        ),
        (
            first(&|n| coalesced(n) > budget),
            "leader calls/s with one quorum check per tick > budget".into(),
        ),
        (
            first(&|n| five(n) > budget),
            "leader calls/s with 5 voters + one check per tick > budget".into(),
        ),
    ];
    for slots in [4_096.0, 16_384.0, 65_536.0] {
        limits.push((
            first(&|n| (slots / n).ceil() / (slots / n) > 1.0 + args.imbalance),
            format!(
                "{slots} slots: busiest member > {:.0}% over the mean",
                args.imbalance * 100.0
            ),
        ));
    }
    limits.sort_by_key(|(n, _)| n.unwrap_or(u64::MAX));
    for (n, what) in limits {
        let n = n.map_or("never".into(), |n| n.to_string());
        println!("{n:>8}  {what}");
    }
}
