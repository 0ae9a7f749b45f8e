//! `journeyx-bench`: drives a running `journeyx run` through Kafka and measures it from the
//! outside. It produces input events at a target rate (each for a user drawn from
//! `--users`, all named `--event`), reads the messages topic, and matches each message to
//! its event by `event_id`: the latency is the message's Kafka timestamp minus the event's.
//! With `--ceiling` it only measures how fast a plain consumer on this machine reads the
//! events topic (Kafka's own ceiling, to compare journeyx's rate with).
//! See loadtest/scripts/journeys.sh.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Measure journeyx's event throughput and event-to-message latency.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "TIMERDB_KAFKA", default_value = "127.0.0.1:19092")]
    kafka: String,
    #[arg(long, default_value = "journeyx-events")]
    events_topic: String,
    #[arg(long, default_value = "journeyx-messages")]
    messages_topic: String,
    /// The app the events belong to, and their name (the benchmark journey's entry).
    #[arg(long, default_value = "bench")]
    app: String,
    #[arg(long, default_value = "ping")]
    event: String,
    /// Distinct users the events are spread over.
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    /// Events per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long to send.
    #[arg(long, default_value = "20s")]
    duration: humantime::Duration,
    /// Messages each event yields (the number of journeys it enters).
    #[arg(long, default_value_t = 1)]
    fan_out: u64,
    /// How long to wait for the last messages after sending stopped.
    #[arg(long, default_value = "30s")]
    drain: humantime::Duration,
    /// Only measure a plain consumer reading the events topic from the start.
    #[arg(long)]
    ceiling: bool,
}

fn kafka_ms(m: &impl Message) -> Option<i64> {
    match m.timestamp() {
        Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => Some(t),
        Timestamp::NotAvailable => None,
    }
}

fn consumer(kafka: &str, topic: &str, from_start: bool) -> anyhow::Result<StreamConsumer> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", format!("journeyx-bench-{}", std::process::id()))
        .set(
            "auto.offset.reset",
            if from_start { "earliest" } else { "latest" },
        )
        .set("enable.auto.commit", "false")
        .create()?;
    c.subscribe(&[topic])?;
    Ok(c)
}

async fn ceiling(a: &Args) -> anyhow::Result<()> {
    let c = consumer(&a.kafka, &a.events_topic, true)?;
    let (mut n, mut first) = (0u64, None);
    let mut last = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.recv()).await {
            Ok(Ok(_)) => {
                n += 1;
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
            }
            Ok(Err(e)) => anyhow::bail!("reading {}: {e}", a.events_topic),
            Err(_) => break,
        }
    }
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    println!(
        "ceiling   a plain consumer read {n} events of {} in {secs:.1} s: {:.0}/s",
        a.events_topic,
        n as f64 / secs.max(0.001)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.ceiling {
        return ceiling(&a).await;
    }
    let run = format!("{:x}", std::process::id() as u64 ^ rand::random::<u64>());
    // From the start: this run's messages are told apart by their event ids.
    let messages = consumer(&a.kafka, &a.messages_topic, true)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &a.kafka)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let total = a.rate * a.duration.as_secs().max(1);
    let prefix = format!("bench-{run}-");
    let reader = {
        let prefix = prefix.clone();
        let want = total * a.fan_out;
        let drain = *a.drain;
        tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new(3).expect("histogram");
            let mut per_event: HashMap<u64, u32> = HashMap::new();
            let (mut got, mut first, mut last) = (0u64, None, Instant::now());
            let mut idle_since = Instant::now();
            while got < want && idle_since.elapsed() < drain {
                let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), messages.recv()).await
                else {
                    continue;
                };
                idle_since = Instant::now();
                let Some(v) = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                else {
                    continue;
                };
                let Some(rest) = v["event_id"].as_str().and_then(|e| e.strip_prefix(&prefix))
                else {
                    continue;
                };
                let Some((seq, sent)) = rest
                    .split_once('-')
                    .and_then(|(s, t)| Some((s.parse::<u64>().ok()?, t.parse::<i64>().ok()?)))
                else {
                    continue;
                };
                *per_event.entry(seq).or_default() += 1;
                got += 1;
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                if let Some(at) = kafka_ms(&m) {
                    let _ = latency.record((at - sent).max(0) as u64);
                }
            }
            let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
            (got, per_event.len(), span, latency)
        })
    };
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut pending = futures_like::Pending::default();
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * a.rate as f64) as u64).min(total);
        while sent < due {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64;
            let user = format!("u{}", rand::random::<u64>() % a.users.max(1));
            let value = serde_json::json!({
                "event_id": format!("{prefix}{sent}-{now}"),
                "app_id": a.app,
                "user_id": user,
                "name": a.event,
                "ts_ms": now,
            })
            .to_string();
            let record = FutureRecord::to(&a.events_topic)
                .key(&user)
                .payload(&value)
                .timestamp(now);
            pending.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("{e}"))?,
            );
            sent += 1;
        }
        pending.reap().await?;
    }
    pending.all().await?;
    let send_secs = started.elapsed().as_secs_f64();
    let (got, events_seen, span, latency) = reader.await?;
    println!(
        "sent      {sent} events in {send_secs:.1} s ({:.0}/s; target {}/s), {} users",
        sent as f64 / send_secs,
        a.rate,
        a.users
    );
    println!(
        "messages  {got} of {} for {events_seen} events; {:.0}/s over {span:.1} s",
        total * a.fan_out,
        got as f64 / span.max(0.001)
    );
    println!(
        "latency   event -> message (Kafka timestamps): p50 {} p90 {} p99 {} p99.9 {} max {} ms",
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.9),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999),
        latency.max()
    );
    if got < total * a.fan_out {
        println!("verdict   BEHIND (not every message arrived within the drain)");
    }
    Ok(())
}

/// Delivery futures of the producer, awaited in order without holding more than needed.
mod futures_like {
    use rdkafka::producer::future_producer::DeliveryFuture;

    #[derive(Default)]
    pub struct Pending(std::collections::VecDeque<DeliveryFuture>);

    impl Pending {
        pub fn push(&mut self, f: DeliveryFuture) {
            self.0.push_back(f);
        }

        /// Awaits the oldest deliveries while there are more than 100,000 outstanding.
        pub async fn reap(&mut self) -> anyhow::Result<()> {
            while self.0.len() > 100_000 {
                self.await_one().await?;
            }
            Ok(())
        }

        pub async fn all(&mut self) -> anyhow::Result<()> {
            while !self.0.is_empty() {
                self.await_one().await?;
            }
            Ok(())
        }

        async fn await_one(&mut self) -> anyhow::Result<()> {
            if let Some(f) = self.0.pop_front() {
                match f.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => anyhow::bail!("producing an event: {e}"),
                    Err(_) => anyhow::bail!("producing an event: cancelled"),
                }
            }
            Ok(())
        }
    }
}
