//! The client commands: `set-timeout`, `get`, `cancel`. They speak to a node through
//! `timerdb-client`, as any other program would.

use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use timerdb_client::time::{format_rfc3339, now_ms, parse_at};
use timerdb_client::{Client, DEFAULT_SERVER, NewTimer, state_name};

/// `timerdb set-timeout`
#[derive(Debug, Args)]
pub struct SetTimeoutArgs {
    /// Server: host:port or a URL.
    #[arg(long, env = "TIMERDB_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Fire after this long, e.g. 5s, 1m30s, 0s.
    #[arg(long = "in", conflicts_with = "at", required_unless_present = "at")]
    pub in_: Option<String>,
    /// Fire at this time: RFC 3339 (2030-01-01T00:00:00Z) or milliseconds since the epoch.
    #[arg(long)]
    pub at: Option<String>,
    /// Kafka topic.
    #[arg(long)]
    pub topic: String,
    /// Kafka partition.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub partition: i32,
    /// Payload text.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from this file.
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Kafka key (defaults to the timer id).
    #[arg(long)]
    pub key: Option<String>,
    /// A header NAME=VALUE; repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Idempotency key: repeating it returns the first id.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Print one JSON object: `timer_id`, `fire_at_ms`, `fire_at`.
    #[arg(long)]
    pub json: bool,
}

/// `timerdb get ID` / `timerdb cancel ID`
#[derive(Debug, Args)]
pub struct IdArgs {
    /// Server: host:port or a URL.
    #[arg(long, env = "TIMERDB_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Timer id as printed by set-timeout.
    pub id: String,
    /// Print one JSON object (`get`: the timer's fields; `cancel`: `timer_id`, `cancelled`).
    #[arg(long)]
    pub json: bool,
}

async fn connect(server: &str) -> anyhow::Result<Client> {
    Client::connect(server).await.context("--server")
}

/// Schedules a timer and prints its id.
pub async fn set_timeout(a: SetTimeoutArgs) -> anyhow::Result<()> {
    let fire_at_ms = match (&a.in_, &a.at) {
        (Some(d), _) => {
            let d = humantime::parse_duration(d)
                .with_context(|| format!("--in {d:?}: expected a duration like 5s"))?;
            now_ms() + d.as_millis() as u64
        }
        (None, Some(at)) => parse_at(at).map_err(|e| anyhow::anyhow!("--at {e}"))?,
        (None, None) => anyhow::bail!("give --in or --at"),
    };
    let mut timer = NewTimer::new(fire_at_ms, a.topic, a.partition);
    timer.payload = match (a.payload, a.payload_file) {
        (_, Some(p)) => Bytes::from(
            std::fs::read(&p).with_context(|| format!("--payload-file {}", p.display()))?,
        ),
        (Some(s), None) => Bytes::from(s),
        (None, None) => Bytes::new(),
    };
    for h in &a.headers {
        let (k, v) = h
            .split_once('=')
            .with_context(|| format!("--header {h:?}: expected NAME=VALUE"))?;
        timer = timer.header(k, v.to_owned());
    }
    if let Some(key) = a.key {
        timer = timer.key(key);
    }
    if let Some(key) = a.idempotency_key {
        timer = timer.idempotency_key(key);
    }
    let id = connect(&a.server).await?.set_timeout(timer).await?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "timer_id": id,
                "fire_at_ms": fire_at_ms,
                "fire_at": format_rfc3339(fire_at_ms),
            })
        );
    } else {
        println!("{id}");
    }
    Ok(())
}

/// Prints what the node knows of a timer.
pub async fn get(a: IdArgs) -> anyhow::Result<()> {
    let t = connect(&a.server).await?.get(&a.id).await?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "timer_id": t.id,
                "state": state_name(t.state),
                "fire_at_ms": t.fire_at_ms,
                "fire_at": format_rfc3339(t.fire_at_ms),
                "topic": t.topic,
                "partition": t.partition,
                "payload_size": t.payload_size,
                "has_idempotency_key": t.has_idempotency_key,
            })
        );
        return Ok(());
    }
    println!("id:           {}", t.id);
    println!("state:        {}", state_name(t.state));
    println!("fire_at:      {}", format_rfc3339(t.fire_at_ms));
    println!("topic:        {}", t.topic);
    println!("partition:    {}", t.partition);
    println!("payload_size: {}", t.payload_size);
    Ok(())
}

/// Cancels a timer.
pub async fn cancel(a: IdArgs) -> anyhow::Result<()> {
    let cancelled = connect(&a.server).await?.cancel(&a.id).await?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"timer_id": a.id, "cancelled": cancelled})
        );
    } else if cancelled {
        println!("cancelled {}", a.id);
    } else {
        println!("{} was already cancelled", a.id);
    }
    Ok(())
}
