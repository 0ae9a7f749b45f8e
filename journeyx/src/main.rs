//! The `journeyx` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use journeyx::runtime::{self, Settings};
use serde_json::Value;

// Every event allocates (its JSON, the user record read and written, the step's clone of
// it): glibc's malloc/free were 13 % of journeyx's CPU in the profile of
// docs/benchmarks.md, section 20.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "journeyx",
    version,
    about = "Moves users through journeys as their events arrive; TimerDB keeps every wait"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks journey and segment files (YAML or JSON) without publishing them: every
    /// problem is named, with its node, edge or action.
    Validate {
        /// Journey files, and segment files (a file with `where` and no `nodes`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// One JSON object per file.
        #[arg(long)]
        json: bool,
    },
    /// Runs journeyx: consumes the events topic, moves users through the published
    /// journeys, sends messages, sets TimerDB timers for the waits.
    Run(RunArgs),
    /// Publishes journey or segment files to the running `journeyx run` (a segment before
    /// the journeys that name it).
    Publish {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Lists the published journeys (every version).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Shows a user's record: properties, tags, and their place in each journey.
    User {
        app: String,
        user: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Enters the users already in a journey's entry segment (they would otherwise wait
    /// for their next event): the running process emits one `journeyx.enter` event per
    /// such user, at most `--rate` per second, and resumes where a stopped load left off.
    Load {
        journey: String,
        /// Events per second, at most.
        #[arg(long, default_value_t = 1_000)]
        rate: u32,
        /// Starts over from the first user instead of where the last load stopped.
        #[arg(long)]
        from_start: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Shows a journey's counters (entered, exited, converted, capped, errors) per version
    /// and node: the store's durable counts, every process's, plus what the running one
    /// has not flushed yet.
    Stats {
        journey: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "JOURNEYX_KAFKA", default_value = "127.0.0.1:9092")]
    kafka: String,
    /// The TimerDB node timers are set on (`host:port` or URL).
    #[arg(long, env = "JOURNEYX_TIMERDB", default_value = timerdb_client::DEFAULT_SERVER)]
    timerdb: String,
    /// The state store: a directory for the embedded store (one process), or
    /// `scylla://host:port[,host:port]/keyspace[?replication_factor=N]` for ScyllaDB or
    /// Cassandra, which several processes in one consumer group share.
    #[arg(long, env = "JOURNEYX_STORE", default_value = "journeyx-data")]
    store: String,
    #[arg(long, env = "JOURNEYX_EVENTS_TOPIC", default_value = "journeyx-events")]
    events_topic: String,
    #[arg(
        long,
        env = "JOURNEYX_MESSAGES_TOPIC",
        default_value = "journeyx-messages"
    )]
    messages_topic: String,
    /// Where malformed events go; empty: counted and logged only.
    #[arg(
        long,
        env = "JOURNEYX_DEAD_LETTER_TOPIC",
        default_value = "journeyx-dead-letters"
    )]
    dead_letter_topic: String,
    /// Consumer group shared by the journeyx processes of one deployment.
    #[arg(long, env = "JOURNEYX_GROUP", default_value = "journeyx")]
    group: String,
    /// Queues the events are spread over by user (processed concurrently).
    #[arg(long, env = "JOURNEYX_QUEUES", default_value_t = 512)]
    queues: usize,
    /// Serves the HTTP API (publish, list, user, stats) and /metrics on this address.
    #[arg(long, env = "JOURNEYX_HTTP", default_value = "127.0.0.1:7480")]
    http: String,
    /// Journey and segment files to publish before consuming (as `journeyx publish`).
    #[arg(long = "publish")]
    publish: Vec<PathBuf>,
    /// An external audience service answering segment membership (`http://host:port/path`,
    /// asked once per event; docs/journeyx.md, "Audience"); empty: journeyx evaluates
    /// segments itself from the properties and tags it keeps.
    #[arg(long, env = "JOURNEYX_AUDIENCE", default_value = "")]
    audience: String,
    /// How journeyx picks the partition of what it produces keyed by user (the loader's
    /// events, messages): set it to the upstream producers' partitioner, so a user's
    /// events stay on one partition. `murmur2_random` is the Java client's (and Kafka's
    /// tools'), `consistent_random` librdkafka's, `fnv1a_random` sarama's.
    #[arg(long, env = "JOURNEYX_PARTITIONER", default_value = "murmur2_random",
          value_parser = clap::builder::PossibleValuesParser::new(runtime::PARTITIONERS))]
    partitioner: String,
}

#[derive(Args)]
struct ApiArgs {
    /// The running `journeyx run`'s HTTP address.
    #[arg(long, env = "JOURNEYX_HTTP", default_value = "127.0.0.1:7480")]
    http: String,
    /// The answer as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files, json } => validate(&files, json),
        Command::Run(args) => tokio_main(run(args)),
        Command::Publish { files, api } => tokio_main(publish(files, api)),
        Command::List { api } => tokio_main(call(api, "/api/journeys".into())),
        Command::User { app, user, api } => {
            tokio_main(call(api, format!("/api/users/{app}/{user}")))
        }
        Command::Stats { journey, api } => tokio_main(call(api, format!("/api/stats/{journey}"))),
        Command::Load {
            journey,
            rate,
            from_start,
            api,
        } => tokio_main(load(journey, rate, from_start, api)),
    }
}

fn tokio_main(f: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("journeyx: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if !args.audience.is_empty() {
        // Checked before anything is opened.
        journeyx::audience::HttpAudience::new(&args.audience, std::time::Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("metrics recorder: {e}"))?;
    let listener = tokio::net::TcpListener::bind(&args.http)
        .await
        .map_err(|e| format!("--http {}: {e}", args.http))?;
    let store: Arc<dyn journeyx::store::StateStore> = if args.store.starts_with("scylla://") {
        Arc::new(
            journeyx::store::scylla::ScyllaStateStore::open(&args.store)
                .await
                .map_err(|e| format!("--store {}: {e}", args.store))?,
        )
    } else {
        Arc::new(
            journeyx::store::embedded::EmbeddedStore::open(std::path::Path::new(&args.store))
                .await
                .map_err(|e| format!("--store {}: {e}", args.store))?,
        )
    };
    for f in &args.publish {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let name = f.display().to_string();
        if runtime::http::is_segment(&text) {
            let s = journeyx::model::Segment::parse(&name, &text).map_err(|e| e.to_string())?;
            store.publish_segment(&s).await.map_err(|e| e.to_string())?;
        } else {
            let j = journeyx::model::Journey::parse(&name, &text).map_err(|e| e.to_string())?;
            store.publish_journey(&j).await.map_err(|e| e.to_string())?;
        }
    }
    let mut settings = Settings::new(args.kafka, args.timerdb);
    settings.group = args.group;
    settings.events_topic = args.events_topic;
    settings.messages_topic = args.messages_topic;
    settings.dead_letter_topic =
        (!args.dead_letter_topic.is_empty()).then_some(args.dead_letter_topic);
    settings.queues = args.queues.max(1);
    settings.audience = (!args.audience.is_empty()).then_some(args.audience);
    settings.partitioner = args.partitioner;
    let rt = runtime::Runtime::new(settings, store)
        .await
        .map_err(|e| e.to_string())?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let http = axum::serve(listener, runtime::http::router(rt.clone(), Some(metrics)));
    tracing::info!(http = %args.http, "journeyx: running");
    let consumer = tokio::spawn(runtime::kafka::run(rt.clone(), stop));
    tokio::spawn(async move {
        let _ = http.await;
    });
    shutdown_signal().await;
    tracing::info!("journeyx: stopping; finishing the events in the queues");
    let _ = stop_tx.send(true);
    let consumed = consumer.await.map_err(|e| e.to_string())?;
    // The last second's counts.
    rt.flush_counts().await;
    consumed.map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// One request to the running process's API: its status and JSON answer.
async fn request(
    http: &str,
    method: &str,
    path: &str,
    body: String,
) -> Result<(u16, Value), String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let url = format!("http://{http}{path}");
    let req = hyper::Request::builder()
        .method(method)
        .uri(&url)
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| format!("{url}: {e}"))?;
    let answer = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| format!("{url}: no answer within 30 s"))?
        .map_err(|e| {
            format!(
                "cannot reach journeyx at {http} ({e}); is `journeyx run --http {http}` running?"
            )
        })?;
    let status = answer.status().as_u16();
    let bytes = answer
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok((status, value))
}

async fn call(api: ApiArgs, path: String) -> Result<(), String> {
    let (status, v) = request(&api.http, "GET", &path, String::new()).await?;
    if status >= 300 {
        return Err(v["error"]
            .as_str()
            .map_or_else(|| v.to_string(), str::to_owned));
    }
    if api.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON prints"));
    }
    Ok(())
}

async fn publish(files: Vec<PathBuf>, api: ApiArgs) -> Result<(), String> {
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let (status, v) = request(&api.http, "POST", "/api/publish", text).await?;
        if status >= 300 {
            let why = v["error"]
                .as_str()
                .map_or_else(|| v.to_string(), str::to_owned);
            return Err(format!("{}: {why}", f.display()));
        }
        if api.json {
            println!("{v}");
        } else {
            let what = match (v.get("journey"), v.get("segment")) {
                (Some(j), _) => format!(
                    "journey {} version {}",
                    j.as_str().unwrap_or("?"),
                    v["version"]
                ),
                (_, Some(s)) => format!("segment {}", s.as_str().unwrap_or("?")),
                _ => v.to_string(),
            };
            let done = if v["published"] == true {
                "published"
            } else {
                "unchanged (published already)"
            };
            println!("{}: {what} {done}", f.display());
        }
    }
    Ok(())
}

fn validate(files: &[PathBuf], json: bool) -> ExitCode {
    let mut ok = true;
    for f in files {
        let name = f.display().to_string();
        let outcome = std::fs::read_to_string(f)
            .map_err(|e| format!("{name}: {e}"))
            .and_then(|text| journeyx_file(&name, &text).map_err(|e| e.to_string()));
        ok &= outcome.is_ok();
        if json {
            let v = match &outcome {
                Ok(what) => serde_json::json!({"file": name, "valid": true, "kind": what}),
                Err(e) => {
                    serde_json::json!({"file": name, "valid": false, "problems": e.lines().collect::<Vec<_>>()})
                }
            };
            println!("{v}");
        } else {
            match outcome {
                Ok(what) => println!("{name}: a valid {what}"),
                Err(e) => eprintln!("{e}"),
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Parses a journey or segment file; returns which it is.
fn journeyx_file(name: &str, text: &str) -> journeyx::Result<&'static str> {
    if runtime::http::is_segment(text) {
        journeyx::model::Segment::parse(name, text).map(|_| "segment")
    } else {
        journeyx::model::Journey::parse(name, text).map(|_| "journey")
    }
}

/// The load's progress on its bar: a spinner until the users to read are counted, then a
/// bar of users read out of that count.
fn show_load(b: &indicatif::ProgressBar, v: &serde_json::Value) {
    let scanned = v["scanned"].as_u64().unwrap_or(0);
    if let Some(total) = v["total"].as_u64()
        && b.length().is_none()
    {
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed} loading {prefix}: [{wide_bar}] {pos}/{len} users read, \
                 {msg}, eta {eta}",
            )
            .expect("a valid template"),
        );
        b.set_length(total);
    }
    if let Some(total) = b.length() {
        // Users added during the load are read too.
        b.set_length(total.max(scanned));
        b.set_position(scanned);
        b.set_message(format!("{} entered", v["emitted"]));
    } else {
        b.set_message(format!("{scanned} users read, {} entered", v["emitted"]));
    }
}

async fn load(journey: String, rate: u32, from_start: bool, api: ApiArgs) -> Result<(), String> {
    let path = format!("/api/load/{journey}");
    let (status, v) = request(
        &api.http,
        "POST",
        &format!("{path}?rate={rate}&from_start={from_start}"),
        String::new(),
    )
    .await?;
    if status >= 300 {
        return Err(v["error"]
            .as_str()
            .map_or_else(|| v.to_string(), str::to_owned));
    }
    let bar = (!api.json).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed} loading {prefix}: {msg}")
                .expect("a valid template"),
        );
        b.set_prefix(journey.clone());
        b.enable_steady_tick(Duration::from_millis(100));
        b
    });
    let last = loop {
        let (status, v) = request(&api.http, "GET", &path, String::new()).await?;
        if status >= 300 {
            return Err(v["error"]
                .as_str()
                .map_or_else(|| v.to_string(), str::to_owned));
        }
        if let Some(b) = &bar {
            show_load(b, &v);
        }
        if v["done"] == true {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some(b) = bar {
        show_load(&b, &last);
        b.finish();
    }
    if let Some(e) = last["error"].as_str() {
        return Err(format!("the load of {journey} stopped: {e}"));
    }
    if api.json {
        println!("{last}");
    } else {
        let resumed = last["resumed_after"]
            .as_str()
            .map(|u| format!(", resumed after user {u}"))
            .unwrap_or_default();
        println!(
            "{journey}: {} users read, {} in segment {} entered (at most {rate}/s){resumed}",
            last["scanned"], last["emitted"], last["segment"]
        );
    }
    Ok(())
}
