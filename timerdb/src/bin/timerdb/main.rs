//! The `timerdb` binary: parses the command line, sets up logging and hands over to one
//! function per command (`serve`, the client commands, `migrate`).

mod admin;
mod client;
mod migrate;
mod serve;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

// The node allocates per timer on every path (requests, loads, fires): the profile in
// docs/benchmarks.md put glibc's malloc/free at about a fifth of the node's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// TimerDB: a durable setTimeout that fires messages to Kafka.
#[derive(Debug, Parser)]
#[command(name = "timerdb", version, about)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node.
    Serve(Box<serve::ServeArgs>),
    /// Schedule a timer; prints its id.
    SetTimeout(client::SetTimeoutArgs),
    /// Show a timer.
    Get(client::IdArgs),
    /// Cancel a timer.
    Cancel(client::IdArgs),
    /// Create or upgrade a Scylla/Cassandra schema, then exit (`serve` also does this).
    Migrate(migrate::MigrateArgs),
    /// Operate a cluster: status, init, add-node, remove-node, drain, move-range, rebalance.
    Admin(admin::AdminArgs),
}

impl Command {
    /// Whether the command was asked for JSON output (then its error is JSON too).
    fn json(&self) -> bool {
        match self {
            Command::SetTimeout(a) => a.json,
            Command::Get(a) | Command::Cancel(a) => a.json,
            Command::Admin(a) => a.json,
            Command::Serve(_) | Command::Migrate(_) => false,
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let json = cli.command.json();
    // Only with the `failpoints` feature: kill-points and injected errors from FAILPOINTS.
    let _failpoints = timerdb::failpoint::setup_from_env();
    // Logs go to stderr; stdout carries command output (and the stdout: sink's lines).
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("TIMERDB_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(a) => serve::run(*a).await,
        Command::SetTimeout(a) => client::set_timeout(a).await,
        Command::Get(a) => client::get(a).await,
        Command::Cancel(a) => client::cancel(a).await,
        Command::Migrate(a) => migrate::run(a).await,
        Command::Admin(a) => admin::run(a).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if json => {
            eprintln!("{}", serde_json::json!({"error": format!("{e:#}")}));
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
