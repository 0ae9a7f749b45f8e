//! Failpoints at the places where an ordering matters (store write then hand-off, index
//! rows then timer rows, the two phases of a cancel, ...). Built only with the
//! `failpoints` feature; without it [`hit`] is an empty inline function.
//!
//! Actions (the `fail` crate's syntax, in-process with `fail::cfg`, or for a spawned node
//! in the `FAILPOINTS` environment variable, `name=action;name=action`):
//! `return` fails the operation there with `UNAVAILABLE`; `return(abort)` kills the
//! process on the spot, as `kill -9` would; `return(delay:MS)` waits without blocking
//! (async sites only); `sleep(MS)` and `pause` block the thread.

use crate::Result;

/// Every failpoint name, so tests and operators can list them.
pub const NAMES: &[&str] = &[
    "api.before_store",
    "api.after_store",
    "api.cancel_between_phases",
    "api.adopt",
    "embedded.before_commit",
    "scylla.between_index_and_rows",
    "scylla.before_claim",
    "scylla.claim_answer_lost",
    "scylla.between_partition_and_index_delete",
    "scylla.between_key_release_and_cancel",
    "scheduler.before_low_water",
    "scheduler.before_load",
    "scheduler.before_progress",
    "scheduler.before_delete",
    "scheduler.delete_whole_partitions",
];

/// The argument of a `return` action configured at `name`, if any.
#[cfg(feature = "failpoints")]
fn injected(name: &str) -> Option<String> {
    debug_assert!(NAMES.contains(&name), "unknown failpoint {name}");
    fail::fail_point!(name, |arg: Option<String>| Some(arg.unwrap_or_default()));
    None
}

#[cfg(feature = "failpoints")]
fn act(name: &str, arg: String) -> Result<()> {
    if arg == "abort" {
        eprintln!("failpoint {name}: aborting the process");
        std::process::abort();
    }
    Err(crate::Error::Unavailable(format!(
        "failpoint {name}: injected failure {arg}"
    )))
}

/// Passes through the failpoint `name`: an error, a crash or a (blocking) delay if one is
/// configured there.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) -> Result<()> {
    match injected(name) {
        None => Ok(()),
        Some(arg) => act(name, arg),
    }
}

/// Like [`hit`], for async code; also takes `return(delay:MS)`, which waits without
/// blocking the thread, so a caller that goes away meanwhile really drops its future.
#[cfg(feature = "failpoints")]
pub async fn hit_async(name: &str) -> Result<()> {
    match injected(name) {
        None => Ok(()),
        Some(arg) => match arg.strip_prefix("delay:").map(str::parse::<u64>) {
            Some(Ok(ms)) => {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                Ok(())
            }
            _ => act(name, arg),
        },
    }
}

/// Passes through the failpoint `name` (a no-op: built without `failpoints`).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) -> Result<()> {
    Ok(())
}

/// Passes through the failpoint `name` (a no-op: built without `failpoints`).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn hit_async(_name: &str) -> Result<()> {
    Ok(())
}

/// Reads `FAILPOINTS` from the environment (with the `failpoints` feature); keep the
/// returned value alive for as long as the failpoints should apply.
#[cfg(feature = "failpoints")]
pub fn setup_from_env() -> Option<fail::FailScenario<'static>> {
    Some(fail::FailScenario::setup())
}

/// Without the `failpoints` feature there is nothing to set up.
#[cfg(not(feature = "failpoints"))]
pub fn setup_from_env() -> Option<()> {
    None
}
