//! The `timerdb` binary: parses the command line and hands over to the library.

use clap::Parser;
use timerdb::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

// The node allocates per timer on every path (requests, loads, fires): the profile in
// docs/benchmarks.md put glibc's malloc/free at about a fifth of the node's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `timerdb serve`: the process-wide Prometheus recorder is installed here, once, not by
/// the node (several nodes may run in one process).
async fn serve(config: timerdb::config::Config) -> timerdb::Result<()> {
    config.validate()?;
    if let Some(addr) = config.metrics_listen {
        timerdb::metrics::install(addr)?;
    }
    timerdb::server::run(config).await
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
        Command::Serve(args) => match args.config() {
            Ok(config) => serve(config).await.map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        },
        other => timerdb::cli::run_client(other).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
