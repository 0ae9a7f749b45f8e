//! The `journeyx` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files, json } => validate(&files, json),
    }
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
    let is_segment = serde_norway::from_str::<serde_json::Value>(text)
        .ok()
        .is_some_and(|v| v.get("where").is_some() && v.get("nodes").is_none());
    if is_segment {
        journeyx::model::Segment::parse(name, text).map(|_| "segment")
    } else {
        journeyx::model::Journey::parse(name, text).map(|_| "journey")
    }
}
