//! `journeyx run` end to end: the real binary, a real Kafka broker (deploy/local, address in
//! `TIMERDB_KAFKA`) and a real TimerDB node (started in this process on its embedded
//! store, firing to that Kafka). The messages topic is checked exactly (every field but
//! `sent_at_ms`) against what the pure engine says the same events must produce.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use journeyx::catalog::Catalog;
use journeyx::engine::{self, Command as Effect, Event, User};
use journeyx::model::Journey;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

/// Kafka's address, or `None` (a skip) when it is not configured outside CI.
fn kafka() -> Option<String> {
    match std::env::var("TIMERDB_KAFKA") {
        Ok(k) if !k.is_empty() => Some(k),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("TIMERDB_KAFKA is not set: run deploy/local/up (CI=true needs Kafka)")
        }
        _ => {
            eprintln!("SKIPPED: TIMERDB_KAFKA is not set (deploy/local/up starts Kafka)");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// The DOM of `url` after its scripts ran, in headless Chromium (`None`: a skip, when
/// Chromium is missing outside CI; scripts/test installs it).
fn browser_dom(url: &str) -> Option<String> {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => panic!("chromium failed: {:?}", o.status),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("chromium is needed for the page test (apt-get install chromium): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: the page test needs chromium ({e})");
            None
        }
    }
}

/// The topics of one test.
struct Topics {
    events: String,
    messages: String,
    dead: String,
}

async fn create_topics(kafka: &str, prefix: &str) -> Topics {
    let t = Topics {
        events: unique(&format!("{prefix}-events")),
        messages: unique(&format!("{prefix}-messages")),
        dead: unique(&format!("{prefix}-dead")),
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .unwrap();
    let topics = [
        NewTopic::new(&t.events, 3, TopicReplication::Fixed(1)),
        NewTopic::new(&t.messages, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&t.dead, 1, TopicReplication::Fixed(1)),
    ];
    for r in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    t
}

/// A TimerDB node in this process, on its own embedded store, firing to `kafka`.
async fn timerdb(dir: &Path, kafka: &str) -> timerdb::server::NodeHandle {
    let config = timerdb::config::Config::load(timerdb::config::Overrides {
        listen: Some("127.0.0.1:0".into()),
        metrics_listen: Some("off".into()),
        store: Some(format!("embedded://{}", dir.join("timerdb").display())),
        sink: Some(format!("kafka://{kafka}")),
        ..Default::default()
    })
    .unwrap();
    timerdb::server::start(config).await.unwrap()
}

/// What an end-to-end test starts from: Kafka's address, a scratch directory, fresh
/// topics, a TimerDB node (on its embedded store, firing to that Kafka) and a free address
/// for journeyx's API; `None` (a skip) when Kafka is not configured outside CI.
struct Bed {
    kafka: String,
    dir: tempfile::TempDir,
    t: Topics,
    node: timerdb::server::NodeHandle,
    http: String,
}

async fn bed(topics: &str) -> Option<Bed> {
    let kafka = kafka()?;
    let dir = tempfile::tempdir().unwrap();
    let t = create_topics(&kafka, topics).await;
    let node = timerdb(dir.path(), &kafka).await;
    let http = format!("127.0.0.1:{}", free_port());
    Some(Bed {
        kafka,
        dir,
        t,
        node,
        http,
    })
}

/// `journeyx run` as a child process.
struct Journeyx {
    child: Child,
    http: String,
}

impl Journeyx {
    fn start(
        kafka: &str,
        timerdb: &str,
        store: &std::ffi::OsStr,
        t: &Topics,
        group: &str,
        http: &str,
        publish: &[PathBuf],
    ) -> Self {
        Self::start_with(kafka, timerdb, store, t, group, http, publish, &[])
    }

    /// [`Journeyx::start`] with `extra` flags for `journeyx run`.
    #[allow(clippy::too_many_arguments)]
    fn start_with(
        kafka: &str,
        timerdb: &str,
        store: &std::ffi::OsStr,
        t: &Topics,
        group: &str,
        http: &str,
        publish: &[PathBuf],
        extra: &[&str],
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_journeyx"));
        cmd.args(["run", "--kafka", kafka, "--timerdb", timerdb])
            .args(extra)
            .arg("--store")
            .arg(store)
            .args(["--events-topic", &t.events, "--messages-topic", &t.messages])
            .args([
                "--dead-letter-topic",
                &t.dead,
                "--group",
                group,
                "--http",
                http,
            ])
            .env("RUST_LOG", "info,journeyx=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for p in publish {
            cmd.arg("--publish").arg(p);
        }
        let child = cmd.spawn().unwrap();
        let j = Self {
            child,
            http: http.to_owned(),
        };
        j.wait_ready();
        j
    }

    /// Until its HTTP API answers.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&self.http).is_err() {
            assert!(
                Instant::now() < deadline,
                "journeyx never listened on {}",
                self.http
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_journeyx"))
            .args(args)
            .args(["--http", &self.http])
            .output()
            .unwrap()
    }

    /// `journeyx user demo USER --json`, which must succeed.
    fn user_json(&self, user: &str) -> Value {
        let out = self.cli(&["user", "demo", user, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Journeyx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A producer partitioning by key as the Java client does (journeyx's default).
fn producer(kafka: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap()
}

async fn produce(p: &FutureProducer, topic: &str, key: Option<&str>, value: &[u8]) {
    let mut r = FutureRecord::to(topic).payload(value);
    if let Some(k) = key {
        r = r.key(k);
    }
    p.send(r, Duration::from_secs(10)).await.unwrap();
}

fn event(id: &str, user: &str, name: &str, props: Value) -> Event {
    Event {
        event_id: id.into(),
        app_id: "demo".into(),
        user_id: user.into(),
        name: name.into(),
        ts_ms: now_ms(),
        properties: props.as_object().cloned().unwrap_or_default(),
        tz: None,
    }
}

/// One record read back: key, JSON value, headers.
#[derive(Debug, Clone)]
struct Record {
    value: Value,
    headers: BTreeMap<String, String>,
    partition: i32,
}

/// Reads `topic` from the start until `done` holds for what was read, or `wait` passes;
/// with `settle`, goes on after that while records keep coming (up to a second apart),
/// so a repeat right behind is read too.
async fn read(
    kafka: &str,
    topic: &str,
    wait: Duration,
    settle: bool,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while Instant::now() < deadline && (settle || !done(&out)) {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(1_000), c.recv()).await else {
            if done(&out) {
                break;
            }
            continue;
        };
        let value = m
            .payload()
            .map(|p| {
                serde_json::from_slice(p)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(p).into()))
            })
            .unwrap_or(Value::Null);
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Record {
            value,
            headers,
            partition: m.partition(),
        });
    }
    out
}

/// What the engine says `events` (per user, in order) must send, with each timer firing
/// unless a later event of the user came first: the messages without `sent_at_ms`.
fn expected(catalog: &Catalog, per_user: &BTreeMap<String, Vec<Event>>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for events in per_user.values() {
        let mut user = User::default();
        let mut queue: Vec<Event> = events.clone();
        let mut i = 0;
        while i < queue.len() {
            let o = engine::step(catalog, &user, &queue[i]);
            user = o.user;
            for c in o.commands {
                match c {
                    Effect::Send(m) => {
                        out.insert(serde_json::to_value(&m).unwrap().to_string());
                    }
                    // The fire comes after the user's other events (they are sent at once,
                    // the timer waits seconds).
                    Effect::SetTimer { fire, .. } => queue.push(fire),
                    _ => {}
                }
            }
            i += 1;
        }
    }
    out
}

/// Produces, for users `{prefix}{n}` of `range`, a `signed_up` and, for every third, a
/// `purchased` (all at once: one user's events keep their order, sharing a key, so a
/// partition, and one producer), and records them in `per_user`.
async fn onboarding_traffic(
    p: &FutureProducer,
    topic: &str,
    prefix: &str,
    range: std::ops::Range<u32>,
    per_user: &mut BTreeMap<String, Vec<Event>>,
) {
    let mut sends = Vec::new();
    for n in range {
        let user = format!("{prefix}{n}");
        let mut evs = vec![event(
            &format!("{prefix}-{n}-a"),
            &user,
            "signed_up",
            json!({}),
        )];
        if n % 3 == 0 {
            let bought = json!({"amount": 5});
            evs.push(event(
                &format!("{prefix}-{n}-b"),
                &user,
                "purchased",
                bought,
            ));
        }
        for e in &evs {
            let value = serde_json::to_string(e).unwrap();
            let (p, topic, user) = (p.clone(), topic.to_owned(), user.clone());
            sends.push(async move {
                let r = FutureRecord::to(&topic).key(&user).payload(&value);
                p.send(r, Duration::from_secs(30)).await.unwrap();
            });
        }
        per_user.insert(user, evs);
    }
    futures::future::join_all(sends).await;
}

/// The onboarding example, published.
fn onboarding_catalog() -> Catalog {
    let mut catalog = Catalog::default();
    let text = std::fs::read_to_string(example("onboarding.yaml")).unwrap();
    catalog
        .publish(Journey::parse("onboarding", &text).unwrap())
        .unwrap();
    catalog
}

/// Asserts the messages read are exactly `want` (all fields but `sent_at_ms`), any repeat
/// being the same message under the same key; returns how many repeats there were.
fn assert_exactly(all: &[Record], want: &BTreeSet<String>) -> usize {
    let distinct: BTreeSet<String> = all.iter().map(without_sent_at).collect();
    assert_eq!(
        distinct.len(),
        want.len(),
        "every message, and only those ({} read)",
        all.len()
    );
    assert_eq!(&distinct, want);
    let mut by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in all {
        by_key
            .entry(r.value["idempotency_key"].as_str().unwrap().to_owned())
            .or_default()
            .insert(without_sent_at(r));
    }
    assert!(
        by_key.values().all(|v| v.len() == 1),
        "a repeat is the same message under the same key"
    );
    all.len() - distinct.len()
}

/// Asserts the messages read are exactly `want` (all fields but `sent_at_ms`), each once,
/// each with its idempotency key in the header too.
fn assert_each_once(got: &[Record], want: &BTreeSet<String>) {
    let got_set: BTreeSet<String> = got.iter().map(without_sent_at).collect();
    assert_eq!(
        &got_set, want,
        "the messages topic holds exactly what the engine computes"
    );
    assert_eq!(got.len(), want.len(), "no message twice: {got:#?}");
    for r in got {
        assert_eq!(
            r.headers
                .get("journeyx-idempotency-key")
                .map(String::as_str),
            r.value["idempotency_key"].as_str(),
            "the key is in the header too"
        );
    }
}

fn without_sent_at(r: &Record) -> String {
    let mut v = r.value.clone();
    v.as_object_mut().unwrap().remove("sent_at_ms");
    v.to_string()
}

/// The example onboarding journey, driven through Kafka and TimerDB: welcome at once, the
/// reminder only after the 2 s wait and only for users who did not buy meanwhile; every
/// message exactly as the engine computes it, with its idempotency key in the header.
/// Malformed events (not JSON, an app with no journey, no user id) go to the dead-letter
/// topic with the reason and do not hold up the events behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_runs_on_kafka_and_timerdb_and_bad_events_are_dead_lettered() {
    let Some(Bed {
        kafka,
        dir,
        t,
        node,
        http,
    }) = bed("jx").await
    else {
        return;
    };
    let jx = Journeyx::start(
        &kafka,
        &node.addr.to_string(),
        dir.path().join("jx").as_os_str(),
        &t,
        &unique("group"),
        &http,
        &[example("onboarding.yaml")],
    );
    let p = producer(&kafka);
    // Bad events first, on every partition's way: they must not hold anything up.
    produce(&p, &t.events, Some("u-bad"), b"{not json").await;
    let mut unknown_app =
        serde_json::to_value(event("e-x", "u-x", "signed_up", json!({}))).unwrap();
    unknown_app["app_id"] = "nobody".into();
    produce(
        &p,
        &t.events,
        Some("u-x"),
        unknown_app.to_string().as_bytes(),
    )
    .await;
    let mut no_user = serde_json::to_value(event("e-y", "", "signed_up", json!({}))).unwrap();
    no_user["user_id"] = "".into();
    produce(&p, &t.events, None, no_user.to_string().as_bytes()).await;
    // A user id too long for a store key (fjall panicked on it, Cassandra refused it on
    // every retry), and a record over the producer's 1,000,000-byte limit, whose dead
    // letter was refused on every retry: each held every partition before.
    let long_user = "x".repeat(70_000);
    let long_id = event("e-long", &long_user, "signed_up", json!({}));
    produce(
        &p,
        &t.events,
        Some("u-long"),
        serde_json::to_string(&long_id).unwrap().as_bytes(),
    )
    .await;
    let big: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    produce(&big, &t.events, Some("u-big"), &vec![b'#'; 1_020_000]).await;
    // A value whose parse error quotes it whole: the reason header alone was over the
    // producer's limit.
    let quoted = format!(
        r#"{{"event_id": "e-q", "ts_ms": "{}"}}"#,
        "q".repeat(900_000)
    );
    produce(&big, &t.events, Some("u-quoted"), quoted.as_bytes()).await;

    let mut per_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for n in 0..6 {
        let user = format!("u{n}");
        let mut evs = vec![event(&format!("e-{n}-a"), &user, "signed_up", json!({}))];
        if n % 2 == 1 {
            evs.push(event(
                &format!("e-{n}-b"),
                &user,
                "purchased",
                json!({"amount": 12}),
            ));
        }
        for e in &evs {
            produce(
                &p,
                &t.events,
                Some(&user),
                serde_json::to_string(e).unwrap().as_bytes(),
            )
            .await;
        }
        per_user.insert(user, evs);
    }
    let sent_at = now_ms();
    let want = expected(&onboarding_catalog(), &per_user);
    assert_eq!(want.len(), 6 + 3, "six welcomes, three reminders");

    let more = read(&kafka, &t.messages, Duration::from_secs(40), true, |r| {
        r.len() >= want.len()
    })
    .await;
    assert_each_once(&more, &want);
    for r in &more {
        if r.value["template"] == "reminder_v1" {
            assert!(
                r.value["sent_at_ms"].as_u64().unwrap() >= sent_at + 2_000 - 500,
                "a reminder before its 2 s wait: {r:?}"
            );
        }
    }
    let dead = read(&kafka, &t.dead, Duration::from_secs(10), true, |r| {
        r.len() >= 6
    })
    .await;
    let reasons: Vec<&str> = dead
        .iter()
        .map(|r| r.headers["journeyx-error"].as_str())
        .collect();
    assert_eq!(reasons.len(), 6, "{}", reasons.len());
    assert!(
        reasons.iter().all(|r| r.len() <= 4_096),
        "reasons cut to 4 KiB"
    );
    let cut: BTreeMap<&str, usize> = dead
        .iter()
        .filter_map(|r| {
            let from = r.headers.get("journeyx-truncated-from")?;
            assert_eq!(
                r.value.as_str().map(str::len),
                Some(256 * 1024),
                "its first 256 KiB"
            );
            Some((from.as_str(), r.headers["journeyx-error"].len()))
        })
        .collect();
    assert_eq!(
        cut.keys().copied().collect::<Vec<_>>(),
        ["1020000", &quoted.len().to_string()],
        "only the large records are cut short"
    );
    for why in [
        "the value is not an event",
        "no journey is published for app_id \"nobody\"",
        "the event has no user_id",
        "the event's user_id is 70000 bytes long; at most 1024",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(why)),
            "{why:?} in {reasons:?}"
        );
    }

    // The CLI, beside the running process.
    let u = jx.user_json("u0");
    assert_eq!(u["user"]["journeys"]["onboarding"]["node"], "done");
    assert_eq!(u["user"]["journeys"]["onboarding"]["active"], false);
    let out = jx.cli(&["stats", "onboarding", "--json"]);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    let converted: u64 = s["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["count"] == "converted")
        .map(|c| c["n"].as_u64().unwrap())
        .sum();
    assert_eq!(converted, 6, "{s}");
    // The page, in a real headless browser: the journey's nodes with their counts.
    if let Some(dom) = browser_dom(&format!("http://{http}/")) {
        let node = |id: &str| {
            let at = dom
                .find(&format!("data-node=\"{id}\""))
                .unwrap_or_else(|| panic!("node {id} drawn: {dom}"));
            dom[at..].split("</g>").next().unwrap().to_owned()
        };
        assert!(node("welcome").contains("entered 6"), "{}", node("welcome"));
        assert!(
            node("reminder").contains("entered 3"),
            "{}",
            node("reminder")
        );
        assert!(node("done").contains("converted 6"), "{}", node("done"));
        assert!(dom.contains("onboarding (app demo, version 1)"), "{dom}");
    }
    let out = jx.cli(&["user", "demo", "nobody-here"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no record of user nobody-here"));
    drop(jx);
    node.shutdown().await.unwrap();
}

/// The latest instant at or before `before_ms` at which a UTC clock reads `hh:mm`.
fn last_utc(before_ms: u64, hh: u64, mm: u64) -> u64 {
    const DAY: u64 = 86_400_000;
    let at = before_ms - before_ms % DAY + (hh * 60 + mm) * 60_000;
    if at > before_ms { at - DAY } else { at }
}

/// The other shipped examples, published together and driven through Kafka and TimerDB:
/// abandoned cart (a 30 min wait for `checked_out`), quiet hours (a send held until 09:00
/// in the user's zone) and the A/B split. Their events carry times in the past, so the
/// waits they set in TimerDB are due at once and fire within the test: a cart left 31 min
/// ago is nudged unless its `checked_out` came first, an order shipped at 08:59 is
/// notified after the 09:00 timer fires, one shipped at noon at once, and each split user
/// gets the variant the engine computes. The messages topic holds exactly what the pure
/// engine says, each message once, its key in the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cart_quiet_hours_and_split_examples_run_on_kafka_and_timerdb() {
    let Some(Bed {
        kafka,
        dir,
        t,
        node,
        http: _,
    }) = bed("jx-examples").await
    else {
        return;
    };
    // The split sends the `vips` segment to variant b: the segment is published first.
    let files = [
        "vips.segment.yaml",
        "abandoned_cart.yaml",
        "quiet_hours.yaml",
        "ab_split.yaml",
    ];
    let jx = Journeyx::start(
        &kafka,
        &node.addr.to_string(),
        dir.path().join("jx").as_os_str(),
        &t,
        &unique("group"),
        &format!("127.0.0.1:{}", free_port()),
        &files.map(example),
    );
    let mut catalog = Catalog::default();
    let segment = std::fs::read_to_string(example(files[0])).unwrap();
    catalog.publish_segment(journeyx::model::Segment::parse(files[0], &segment).unwrap());
    for f in &files[1..] {
        let text = std::fs::read_to_string(example(f)).unwrap();
        catalog.publish(Journey::parse(f, &text).unwrap()).unwrap();
    }
    let now = now_ms();
    let at = |id: &str, user: &str, name: &str, ts_ms: u64, props: Value| Event {
        ts_ms,
        tz: Some("UTC".into()),
        ..event(id, user, name, props)
    };
    let mut per_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for n in 0..6 {
        let user = format!("cart{n}");
        let left = now - 31 * 60_000;
        let mut evs = vec![at(
            &format!("c-{n}-a"),
            &user,
            "cart_updated",
            left,
            json!({"items": 2}),
        )];
        if n % 2 == 0 {
            evs.push(at(
                &format!("c-{n}-b"),
                &user,
                "checked_out",
                left + 60_000,
                json!({}),
            ));
        }
        per_user.insert(user, evs);
    }
    let before = now - 60_000;
    for (n, shipped) in [last_utc(before, 8, 59), last_utc(before, 12, 0)]
        .into_iter()
        .enumerate()
    {
        let user = format!("ship{n}");
        let e = at(
            &format!("s-{n}"),
            &user,
            "order_shipped",
            shipped,
            json!({}),
        );
        per_user.insert(user, vec![e]);
    }
    for n in 0..12 {
        let user = format!("trial{n}");
        let e = at(&format!("t-{n}"), &user, "trial_started", now, json!({}));
        per_user.insert(user, vec![e]);
    }
    // All at once, as one producer's queue: a user's `checked_out` is on its partition
    // right behind its `cart_updated`, long before the timer the first sets can fire.
    let p = producer(&kafka);
    let mut sends = Vec::new();
    for (user, evs) in &per_user {
        for e in evs {
            let (p, topic, user) = (p.clone(), t.events.clone(), user.clone());
            let value = serde_json::to_string(e).unwrap();
            sends.push(async move {
                let r = FutureRecord::to(&topic).key(&user).payload(&value);
                p.send(r, Duration::from_secs(30)).await.unwrap();
            });
        }
    }
    futures::future::join_all(sends).await;
    let want = expected(&catalog, &per_user);
    let templates = |set: &BTreeSet<String>, name: &str| {
        set.iter()
            .filter(|m| m.contains(&format!("\"template\":\"{name}\"")))
            .count()
    };
    assert_eq!(
        templates(&want, "cart_reminder"),
        3,
        "the carts not checked out: {want:#?}"
    );
    assert_eq!(
        templates(&want, "shipped"),
        2,
        "both orders, one after 09:00: {want:#?}"
    );
    assert_eq!(
        templates(&want, "trial_tips_a") + templates(&want, "trial_tips_b"),
        12,
        "{want:#?}"
    );
    assert!(templates(&want, "trial_tips_a") > 0 && templates(&want, "trial_tips_b") > 0);

    let got = read(&kafka, &t.messages, Duration::from_secs(40), true, |r| {
        r.len() >= want.len()
    })
    .await;
    assert_each_once(&got, &want);
    // The held notification went out through its timer: the user waited at `wait` and
    // has passed `notify` since.
    let u = jx.user_json("ship0");
    assert_eq!(
        u["user"]["journeys"]["quiet_hours"]["node"], "notify",
        "{u}"
    );
    drop(jx);
    node.shutdown().await.unwrap();
}

/// `journeyx run` is killed with SIGKILL mid-stream and started again on the same store
/// and consumer group: every message the engine computes is on the messages topic, a
/// message repeats only with an idempotency key seen before (the same message), and no
/// user skipped or repeated a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_sends_every_message_and_repeats_only_known_keys() {
    let Some(Bed {
        kafka,
        dir,
        t,
        node,
        http,
    }) = bed("jx-kill").await
    else {
        return;
    };
    let group = unique("group");
    let store = dir.path().join("jx");
    let start = |publish: &[PathBuf]| {
        Journeyx::start(
            &kafka,
            &node.addr.to_string(),
            store.as_os_str(),
            &t,
            &group,
            &http,
            publish,
        )
    };
    let mut jx = start(&[example("onboarding.yaml")]);
    let p = producer(&kafka);
    let mut per_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    onboarding_traffic(&p, &t.events, "k", 0..3_000, &mut per_user).await;
    let want = expected(&onboarding_catalog(), &per_user);
    let before = read(&kafka, &t.messages, Duration::from_secs(60), false, |r| {
        r.len() >= want.len() / 3
    })
    .await;
    jx.kill_9();
    assert!(
        before.len() < want.len(),
        "killed after all {} messages: the test needs more events",
        before.len()
    );
    let jx = start(&[]);
    let all = read(&kafka, &t.messages, Duration::from_secs(90), true, |r| {
        r.iter().map(without_sent_at).collect::<BTreeSet<_>>().len() >= want.len()
    })
    .await;
    for missing in want
        .difference(&all.iter().map(without_sent_at).collect())
        .take(3)
    {
        let m: Value = serde_json::from_str(missing).unwrap();
        let out = jx.cli(&["user", "demo", m["user_id"].as_str().unwrap(), "--json"]);
        eprintln!(
            "missing {m}\n  its user: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let repeats = assert_exactly(&all, &want);
    eprintln!(
        "killed after {} of {} messages; {repeats} sent again after the restart",
        before.len(),
        want.len()
    );
    for n in (0..3_000).step_by(250) {
        let out = jx.cli(&["user", "demo", &format!("k{n}"), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let u: Value = serde_json::from_slice(&out.stdout).unwrap();
        let st = &u["user"]["journeys"]["onboarding"];
        assert_eq!(
            (st["node"].as_str(), st["active"].as_bool()),
            (Some("done"), Some(false)),
            "k{n}: {u}"
        );
        assert_eq!(st["entries"], 1, "k{n} entered once: {u}");
    }
    drop(jx);
    node.shutdown().await.unwrap();
}

/// `journeyx load`: users tagged `vip` before `vip_welcome` (entered from the `vips`
/// segment) was published are entered by the loader, each once, and nobody else; a second
/// load resumes at the end and enters nobody, and one from the start sends nothing more
/// (the journey allows no re-entry).
/// With `--audience URL`, segment membership is the service's answer, not journeyx's own
/// evaluation: a user the service names goes the `vip` way though none of its properties
/// match the segment's `where`, and one it does not name goes the plain way though they
/// do. The service is asked once per event, about the segments the app's journeys name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_audience_service_decides_segment_membership() {
    let Some(Bed {
        kafka,
        dir,
        t,
        node,
        http: _,
    }) = bed("jx-aud").await
    else {
        return;
    };
    // The audience service: members of `gold_list` are the users whose id starts "gold".
    let questions = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let asked = questions.clone();
    let service = axum::Router::new().route(
        "/members",
        axum::routing::post(move |axum::Json(q): axum::Json<Value>| {
            let asked = asked.clone();
            async move {
                let gold = q["user_id"].as_str().unwrap_or("").starts_with("gold");
                asked.lock().unwrap().push(q);
                axum::Json(json!({"segments": {"gold_list": gold}}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let audience = format!("http://{}/members", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, service).await });
    let segment = dir.path().join("gold.segment.yaml");
    std::fs::write(
        &segment,
        "{id: gold_list, app_id: demo, where: {tier: gold}}",
    )
    .unwrap();
    let routing = dir.path().join("routing.yaml");
    std::fs::write(
        &routing,
        "{id: routing, version: 1, app_id: demo, entry: {event: visited}, start: route, \
         nodes: [{id: route, edges: [{when: {segment: gold_list}, to: vip}, \
         {when: always, to: plain}]}, \
         {id: vip, actions: [{send: {channel: push, template: vip_v1}}, exit]}, \
         {id: plain, actions: [{send: {channel: push, template: plain_v1}}, exit]}]}",
    )
    .unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let _jx = Journeyx::start_with(
        &kafka,
        &node.addr.to_string(),
        dir.path().join("jx").as_os_str(),
        &t,
        &unique("group"),
        &http,
        &[segment, routing],
        &["--audience", &audience],
    );
    let p = producer(&kafka);
    // `tier: gold` on the event is no user property: locally neither user is a member.
    for (id, user) in [("e-1", "gold-1"), ("e-2", "basic-1")] {
        let e = event(id, user, "visited", json!({"tier": "gold"}));
        produce(
            &p,
            &t.events,
            Some(user),
            serde_json::to_string(&e).unwrap().as_bytes(),
        )
        .await;
    }
    let got = read(&kafka, &t.messages, Duration::from_secs(30), true, |r| {
        r.len() >= 2
    })
    .await;
    let mut sent: Vec<(String, String)> = got
        .iter()
        .map(|r| {
            (
                r.value["user_id"].as_str().unwrap().to_owned(),
                r.value["template"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        vec![
            ("basic-1".to_owned(), "plain_v1".to_owned()),
            ("gold-1".to_owned(), "vip_v1".to_owned()),
        ]
    );
    let questions = questions.lock().unwrap().clone();
    assert_eq!(questions.len(), 2, "one question per event: {questions:?}");
    for q in &questions {
        assert_eq!(q["app_id"], "demo");
        assert_eq!(q["segments"], json!(["gold_list"]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loader_enters_the_segment_s_users_once() {
    let Some(Bed {
        kafka,
        dir,
        t,
        node,
        http,
    }) = bed("jx-load").await
    else {
        return;
    };
    let tagger = dir.path().join("tagger.yaml");
    std::fs::write(
        &tagger,
        "{id: tagger, version: 1, app_id: demo, entry: {event: upgraded}, start: t, \
         nodes: [{id: t, actions: [{tag: vip}, exit]}]}",
    )
    .unwrap();
    let jx = Journeyx::start(
        &kafka,
        &node.addr.to_string(),
        dir.path().join("jx").as_os_str(),
        &t,
        &unique("group"),
        &http,
        &[
            example("vips.segment.yaml"),
            tagger,
            example("onboarding.yaml"),
        ],
    );
    let p = producer(&kafka);
    for n in 0..60 {
        let e = event(&format!("v-{n}"), &format!("v{n}"), "upgraded", json!({}));
        produce(
            &p,
            &t.events,
            Some(&e.user_id),
            serde_json::to_string(&e).unwrap().as_bytes(),
        )
        .await;
    }
    for n in 0..40 {
        let e = event(&format!("n-{n}"), &format!("n{n}"), "signed_up", json!({}));
        produce(
            &p,
            &t.events,
            Some(&e.user_id),
            serde_json::to_string(&e).unwrap().as_bytes(),
        )
        .await;
    }
    // Every user has a state before the load scans them: users are processed by queues
    // of their own, so the last one produced is not the last one saved.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut unsaved: Vec<String> = (0..60)
        .map(|n| format!("v{n}"))
        .chain((0..40).map(|n| format!("n{n}")))
        .collect();
    loop {
        unsaved.retain(|u| !jx.cli(&["user", "demo", u]).status.success());
        if unsaved.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the events were not processed: no state for {unsaved:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = jx.cli(&["publish", example("vip_welcome.yaml").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let load = |extra: &[&str]| {
        let mut args = vec!["load", "vip_welcome", "--rate", "500", "--json"];
        args.extend_from_slice(extra);
        let out = jx.cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let first = load(&[]);
    assert_eq!(
        (first["scanned"].as_u64(), first["emitted"].as_u64()),
        (Some(100), Some(60)),
        "{first}"
    );
    let vip_messages = |r: &[Record]| {
        r.iter()
            .filter(|m| m.value["template"] == "vip_welcome_v1")
            .map(|m| m.value["user_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let got = read(&kafka, &t.messages, Duration::from_secs(30), true, |r| {
        vip_messages(r).len() >= 60
    })
    .await;
    let mut users = vip_messages(&got);
    users.sort();
    let want: Vec<String> = {
        let mut w: Vec<String> = (0..60).map(|n| format!("v{n}")).collect();
        w.sort();
        w
    };
    assert_eq!(users, want, "each vip welcomed once, nobody else");
    // The loader's events land on the partitions the upstream producer put the users on
    // (3 partitions; both partition as the Java client does).
    let events = read(&kafka, &t.events, Duration::from_secs(10), true, |r| {
        r.iter()
            .filter(|e| e.value["name"] == "journeyx.enter")
            .count()
            >= 60
    })
    .await;
    let upstream: BTreeMap<&str, i32> = events
        .iter()
        .filter(|e| e.value["name"] == "upgraded")
        .map(|e| (e.value["user_id"].as_str().unwrap(), e.partition))
        .collect();
    let loaded: Vec<(&str, i32)> = events
        .iter()
        .filter(|e| e.value["name"] == "journeyx.enter")
        .map(|e| (e.value["user_id"].as_str().unwrap(), e.partition))
        .collect();
    assert_eq!(loaded.len(), 60);
    assert!(
        upstream.values().collect::<BTreeSet<_>>().len() > 1,
        "the users are spread: {upstream:?}"
    );
    for (user, partition) in loaded {
        assert_eq!(Some(&partition), upstream.get(user), "{user}'s partition");
    }
    let again = load(&[]);
    assert_eq!(
        again["emitted"].as_u64(),
        Some(0),
        "resumed at the end: {again}"
    );
    let from_start = load(&["--from-start"]);
    assert_eq!(from_start["scanned"].as_u64(), Some(100), "{from_start}");
    let after = read(&kafka, &t.messages, Duration::from_secs(5), true, |r| {
        r.len() >= got.len()
    })
    .await;
    assert_eq!(
        vip_messages(&after).len(),
        60,
        "no re-entry, so no second welcome"
    );
    let out = jx.cli(&["load", "onboarding"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("entered on an event, not a segment"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(jx);
    node.shutdown().await.unwrap();
}

/// `GET http://{http}{path}`, answered with JSON (the progress of a load, which the CLI
/// shows only at its end under `--json`).
fn get_json(http: &str, path: &str) -> Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    serde_json::from_str(body).unwrap()
}

/// The sum of journey `id`'s `entered` counters (`journeyx stats ID --json`).
fn entered(jx: &Journeyx, id: &str) -> u64 {
    let out = jx.cli(&["stats", id, "--json"]);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    s["counters"].as_array().map_or(0, |cs| {
        cs.iter()
            .filter(|c| c["count"] == "entered")
            .map(|c| c["n"].as_u64().unwrap())
            .sum()
    })
}

/// A load killed (kill -9) after its first page resumes after the last user it recorded
/// once the process is back: the second load reads only the users after that one, as its
/// count says, and every VIP is welcomed, nobody else, each entering the journey once
/// (the part of a page produced before the kill is produced again and applied once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_killed_mid_way_resumes_where_it_stopped_and_enters_each_user_once() {
    let Some(Bed {
        kafka,
        dir,
        t,
        node,
        http,
    }) = bed("jx-resume").await
    else {
        return;
    };
    let group = unique("group");
    let store = dir.path().join("jx");
    let mut publish = vec![example("vips.segment.yaml")];
    for (id, event, tag) in [
        ("tagger", "upgraded", "vip"),
        ("plain", "signed_up", "basic"),
    ] {
        let f = dir.path().join(format!("{id}.yaml"));
        std::fs::write(
            &f,
            format!(
                "{{id: {id}, version: 1, app_id: demo, entry: {{event: {event}}}, start: t, \
                 nodes: [{{id: t, actions: [{{tag: {tag}}}, exit]}}]}}"
            ),
        )
        .unwrap();
        publish.push(f);
    }
    let start = |publish: &[PathBuf]| {
        Journeyx::start(
            &kafka,
            &node.addr.to_string(),
            store.as_os_str(),
            &t,
            &group,
            &http,
            publish,
        )
    };
    let mut jx = start(&publish);
    // 1,200 users, every other one a VIP: each page of 500 holds 250 VIPs.
    const USERS: usize = 1_200;
    let p = producer(&kafka);
    let sends = (0..USERS).map(|n| {
        let name = if n % 2 == 0 { "upgraded" } else { "signed_up" };
        let e = event(&format!("e-{n}"), &format!("u{n:04}"), name, json!({}));
        let p = p.clone();
        let topic = t.events.clone();
        async move {
            let value = serde_json::to_string(&e).unwrap();
            produce(&p, &topic, Some(&e.user_id), value.as_bytes()).await;
        }
    });
    futures::future::join_all(sends).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while entered(&jx, "tagger") < 600 || entered(&jx, "plain") < 600 {
        assert!(
            Instant::now() < deadline,
            "the events were not processed: {} tagged vip, {} basic",
            entered(&jx, "tagger"),
            entered(&jx, "plain")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = jx.cli(&["publish", example("vip_welcome.yaml").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 100 VIPs a second: the first page takes 2.5 s, the whole load 6 s.
    let first = Command::new(env!("CARGO_BIN_EXE_journeyx"))
        .args([
            "load",
            "vip_welcome",
            "--rate",
            "100",
            "--json",
            "--http",
            &http,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let at_kill = loop {
        std::thread::sleep(Duration::from_millis(50));
        let v = get_json(&http, "/api/load/vip_welcome");
        if v["position"].is_string() && v["emitted"].as_u64() > Some(260) {
            break v;
        }
        assert!(Instant::now() < deadline, "no page was recorded: {v}");
    };
    jx.kill_9();
    assert_eq!(
        at_kill["total"], USERS,
        "the first load counts every user: {at_kill}"
    );
    assert!(at_kill["done"] == false, "killed mid-way: {at_kill}");
    let first = first.wait_with_output().unwrap();
    assert!(!first.status.success(), "the CLI reports a load it lost");
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(said.contains("cannot reach journeyx"), "{said}");

    let jx = start(&[]);
    let out = jx.cli(&["load", "vip_welcome", "--rate", "1000", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second: Value = serde_json::from_slice(&out.stdout).unwrap();
    let resumed = second["resumed_after"].as_str().unwrap_or_else(|| {
        panic!("the second load resumes: {second}");
    });
    // The position is recorded after each page, so it is at least the one seen.
    assert!(
        resumed >= at_kill["position"].as_str().unwrap(),
        "{second} after {at_kill}"
    );
    let after: u64 = resumed.trim_start_matches('u').parse::<u64>().unwrap() + 1;
    assert_eq!(
        (second["total"].as_u64(), second["scanned"].as_u64()),
        (Some(USERS as u64 - after), Some(USERS as u64 - after)),
        "reads only the users after {resumed}: {second}"
    );
    let vips: BTreeSet<String> = (0..USERS).step_by(2).map(|n| format!("u{n:04}")).collect();
    let got = read(&kafka, &t.messages, Duration::from_secs(60), true, |r| {
        r.iter()
            .filter_map(|m| m.value["user_id"].as_str())
            .collect::<BTreeSet<_>>()
            .len()
            >= vips.len()
    })
    .await;
    let mut by_user: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &got {
        assert_eq!(r.value["template"], "vip_welcome_v1", "{:?}", r.value);
        by_user
            .entry(r.value["user_id"].as_str().unwrap().to_owned())
            .or_default()
            .insert(without_sent_at(r));
    }
    assert_eq!(
        by_user.keys().cloned().collect::<BTreeSet<_>>(),
        vips,
        "every VIP welcomed, nobody else"
    );
    assert!(
        by_user.values().all(|m| m.len() == 1),
        "a repeat is the same message under the same key"
    );
    for n in (0..USERS).step_by(50) {
        let u = jx.user_json(&format!("u{n:04}"));
        let st = &u["user"]["journeys"]["vip_welcome"];
        if n % 2 == 0 {
            assert_eq!(st["entries"], 1, "u{n:04} entered once: {u}");
        } else {
            assert!(st.is_null(), "u{n:04} is no VIP: {u}");
        }
    }
    eprintln!(
        "killed at {at_kill}; resumed after {resumed}; {} messages for {} VIPs",
        got.len(),
        vips.len()
    );
    drop(jx);
    node.shutdown().await.unwrap();
}

/// An event produced twice (the same `event_id` at two offsets, as from a producer that
/// retried) is applied once: with `re_entry: always` its copy re-entered the user, set the
/// node's timer again under the first entry's key, and TimerDB answered with the timer the
/// re-entry had just cancelled, so the user never moved on. Now the welcome goes out once
/// and the timer's goodbye arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_produced_twice_is_applied_once() {
    let Some(Bed {
        kafka,
        dir,
        t,
        node,
        http,
    }) = bed("jx-twice").await
    else {
        return;
    };
    let again = dir.path().join("again.yaml");
    std::fs::write(
        &again,
        "{id: again, version: 1, app_id: demo, entry: {event: ping}, re_entry: always, \
         start: hi, nodes: [{id: hi, actions: [{send: {channel: push, template: hi}}, \
         {timer: 2s}], edges: [{when: timer, to: bye}]}, \
         {id: bye, actions: [{send: {channel: push, template: bye}}, exit]}]}",
    )
    .unwrap();
    let jx = Journeyx::start(
        &kafka,
        &node.addr.to_string(),
        dir.path().join("jx").as_os_str(),
        &t,
        &unique("group"),
        &http,
        &[again],
    );
    let p = producer(&kafka);
    let ping = serde_json::to_string(&event("p-1", "d1", "ping", json!({}))).unwrap();
    for _ in 0..2 {
        produce(&p, &t.events, Some("d1"), ping.as_bytes()).await;
    }
    let got = read(&kafka, &t.messages, Duration::from_secs(20), true, |r| {
        r.iter().any(|m| m.value["template"] == "bye")
    })
    .await;
    let templates: Vec<&str> = got
        .iter()
        .map(|m| m.value["template"].as_str().unwrap())
        .collect();
    assert_eq!(templates, ["hi", "bye"], "{got:#?}");
    let u = jx.user_json("d1");
    let st = &u["user"]["journeys"]["again"];
    assert_eq!(
        (st["entries"].as_u64(), st["active"].as_bool()),
        (Some(1), Some(false)),
        "{u}"
    );
    drop(jx);
    node.shutdown().await.unwrap();
}

/// Live edits through `journeyx publish` on a running process: users who entered version 1
/// and wait on its timer move to version 3, which maps their node (`migrate_from`), and
/// get version 3's reminder when the timer set under version 1 fires; users who entered
/// version 2 (which nothing maps) finish version 2; new users enter the newest. A version
/// that maps to a node it lacks is refused with the node named and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_version_moves_the_users_its_mapping_names_and_no_others() {
    let Some(Bed {
        kafka,
        dir,
        t,
        node,
        http,
    }) = bed("jx-edit").await
    else {
        return;
    };
    let version = |v: u32, migrate: &str| {
        let f = dir.path().join(format!("edit_v{v}.yaml"));
        std::fs::write(
            &f,
            format!(
                "{{id: edit, version: {v}, app_id: demo, entry: {{event: signed_up}}, \
                 start: welcome, {migrate} nodes: [\
                 {{id: welcome, actions: [{{send: {{channel: push, template: welcome_v{v}}}}}, \
                 {{timer: 6s}}], edges: [{{when: timer, to: remind}}]}}, \
                 {{id: remind, actions: [{{send: {{channel: push, template: remind_v{v}}}}}, exit]}}]}}"
            ),
        )
        .unwrap();
        f
    };
    let jx = Journeyx::start(
        &kafka,
        &node.addr.to_string(),
        dir.path().join("jx").as_os_str(),
        &t,
        &unique("group"),
        &http,
        &[version(1, "")],
    );
    let p = producer(&kafka);
    let sign_up = |group: &'static str| {
        let p = p.clone();
        let topic = t.events.clone();
        async move {
            for n in 0..5 {
                let user = format!("{group}{n}");
                let e = event(&format!("s-{user}"), &user, "signed_up", json!({}));
                let value = serde_json::to_string(&e).unwrap();
                produce(&p, &topic, Some(&user), value.as_bytes()).await;
            }
        }
    };
    let templates = |r: &[Record]| -> BTreeMap<String, BTreeSet<String>> {
        let mut by_user: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for m in r {
            by_user
                .entry(m.value["user_id"].as_str().unwrap().to_owned())
                .or_default()
                .insert(m.value["template"].as_str().unwrap().to_owned());
        }
        by_user
    };
    let welcomed = |group: &'static str, v: u32| {
        let kafka = kafka.clone();
        let topic = t.messages.clone();
        async move {
            let want = format!("welcome_v{v}");
            let got = read(&kafka, &topic, Duration::from_secs(30), false, |r| {
                r.iter()
                    .filter(|m| {
                        m.value["template"] == want.as_str()
                            && m.value["user_id"].as_str().unwrap().starts_with(group)
                    })
                    .count()
                    >= 5
            })
            .await;
            assert!(
                got.iter()
                    .filter(|m| m.value["template"] == want.as_str())
                    .count()
                    >= 5,
                "group {group} was not welcomed by version {v}"
            );
        }
    };
    let publish = |f: PathBuf| {
        let out = jx.cli(&["publish", f.to_str().unwrap()]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let started = Instant::now();
    sign_up("a").await;
    welcomed("a", 1).await;
    let (ok, said) = publish(version(2, ""));
    assert!(ok, "{said}");
    sign_up("b").await;
    welcomed("b", 2).await;
    let (ok, said) = publish(version(
        3,
        "migrate_from: {version: 1, nodes: {welcome: welcome}},",
    ));
    assert!(ok, "{said}");
    let (ok, said) = publish(version(
        4,
        "migrate_from: {version: 3, nodes: {welcome: greet}},",
    ));
    assert!(!ok, "a mapping to a missing node is refused");
    assert!(said.contains("greet"), "the node is named: {said}");
    sign_up("c").await;
    welcomed("c", 3).await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the edits came after group a's timers fired ({:?}): the test needs a longer wait",
        started.elapsed()
    );
    let got = read(&kafka, &t.messages, Duration::from_secs(60), true, |r| {
        templates(r)
            .values()
            .filter(|ts| ts.iter().any(|t| t.starts_with("remind")))
            .count()
            >= 15
    })
    .await;
    let want = |welcome: u32, remind: u32| {
        BTreeSet::from([format!("welcome_v{welcome}"), format!("remind_v{remind}")])
    };
    let by_user = templates(&got);
    for (group, welcome, remind) in [("a", 1, 3), ("b", 2, 2), ("c", 3, 3)] {
        for n in 0..5 {
            let user = format!("{group}{n}");
            assert_eq!(by_user.get(&user), Some(&want(welcome, remind)), "{user}");
            let u = jx.user_json(&user);
            let st = &u["user"]["journeys"]["edit"];
            assert_eq!(
                (st["version"].as_u64(), st["active"].as_bool()),
                (Some(u64::from(remind)), Some(false)),
                "{user} finished version {remind}: {u}"
            );
        }
    }
    assert_eq!(by_user.len(), 15, "nobody else: {by_user:?}");
    assert_eq!(got.len(), 30, "each message once: {got:#?}");
    drop(jx);
    node.shutdown().await.unwrap();
}

/// Two `journeyx run` processes in one consumer group on the shared Cassandra store; the
/// second starts mid-stream, so partitions move between them (a rebalance): every message
/// the engine computes arrives, a repeat is the same message under the same key, and the
/// users sampled entered once and ended at `done`. Both processes did part of the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_users_through_a_rebalance() {
    let Some(kafka) = kafka() else { return };
    let Some(scylla) = std::env::var("TIMERDB_SCYLLA")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "TIMERDB_SCYLLA is not set: run deploy/local/up (CI=true needs Cassandra)"
        );
        eprintln!("SKIPPED: TIMERDB_SCYLLA is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let t = create_topics(&kafka, "jx-reb").await;
    let node = timerdb(dir.path(), &kafka).await;
    let store = format!("scylla://{scylla}/{}", unique("jx_reb").replace('-', "_"));
    let group = unique("group");
    let (http_a, http_b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let start = |http: &str, publish: &[PathBuf]| {
        Journeyx::start(
            &kafka,
            &node.addr.to_string(),
            std::ffi::OsStr::new(&store),
            &t,
            &group,
            http,
            publish,
        )
    };
    let a = start(&http_a, &[example("onboarding.yaml")]);
    let p = producer(&kafka);
    let mut per_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    onboarding_traffic(&p, &t.events, "r", 0..600, &mut per_user).await;
    read(&kafka, &t.messages, Duration::from_secs(60), false, |r| {
        r.len() >= 200
    })
    .await;
    let b = start(&http_b, &[]);
    onboarding_traffic(&p, &t.events, "r", 600..1_200, &mut per_user).await;
    let want = expected(&onboarding_catalog(), &per_user);
    let all = read(&kafka, &t.messages, Duration::from_secs(120), true, |r| {
        r.iter().map(without_sent_at).collect::<BTreeSet<_>>().len() >= want.len()
    })
    .await;
    let repeats = assert_exactly(&all, &want);
    let processed = |http: &str| -> u64 {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(http).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text.lines()
            .find(|l| l.starts_with("journeyx_events_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let (by_a, by_b) = (processed(&http_a), processed(&http_b));
    eprintln!(
        "{} messages ({repeats} repeats); process A handled {by_a} events, B {by_b}",
        all.len()
    );
    assert!(
        by_a > 0 && by_b > 0,
        "both processes worked: {by_a}, {by_b}"
    );
    for n in (0..1_200).step_by(100) {
        let out = b.cli(&["user", "demo", &format!("r{n}"), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let u: Value = serde_json::from_slice(&out.stdout).unwrap();
        let st = &u["user"]["journeys"]["onboarding"];
        assert_eq!(
            (st["node"].as_str(), st["entries"].as_u64()),
            (Some("done"), Some(1)),
            "r{n}: {u}"
        );
    }
    // The statistics are the store's: both processes show every user's entry, though
    // each processed only its share (a second for the last counts to be flushed).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let entered = |j: &Journeyx| -> u64 {
        let out = j.cli(&["stats", "onboarding", "--json"]);
        let s: Value = serde_json::from_slice(&out.stdout).unwrap();
        s["counters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["node"] == "welcome" && c["count"] == "entered")
            .map(|c| c["n"].as_u64().unwrap())
            .sum()
    };
    let (seen_by_a, seen_by_b) = (entered(&a), entered(&b));
    assert_eq!(
        seen_by_a, seen_by_b,
        "both processes show the same statistics"
    );
    assert!(
        seen_by_a >= 1_200,
        "every user's entry is counted (an event processed again after the rebalance may \
         count twice): {seen_by_a}"
    );
    drop((a, b));
    node.shutdown().await.unwrap();
}
