//! Failpoints at the places where an ordering matters (store write then hand-off, index
//! rows then timer rows, the two phases of a cancel, ...). Built only with the
//! `failpoints` feature; without it [`hit`] is an empty inline function.
//!
//! Actions (the `fail` crate's syntax, in-process with `fail::cfg`, or for a spawned node
//! in the `FAILPOINTS` environment variable, `name=action;name=action`):
//! `return` fails the operation there with `UNAVAILABLE`; `return(abort)` kills the
//! process on the spot, as `kill -9` would; `sleep(ms)` and `pause` delay it.

use crate::Result;

/// Every failpoint name, so tests and operators can list them.
pub const NAMES: &[&str] = &[
    "api.before_store",
    "api.after_store",
    "api.cancel_between_phases",
    "embedded.before_commit",
    "scylla.between_index_and_rows",
    "scylla.between_partition_and_index_delete",
    "scheduler.before_low_water",
    "scheduler.before_progress",
];

/// Passes through the failpoint `name`: an error, a crash or a delay if it is configured.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) -> Result<()> {
    debug_assert!(NAMES.contains(&name), "unknown failpoint {name}");
    fail::fail_point!(name, |arg: Option<String>| {
        if arg.as_deref() == Some("abort") {
            eprintln!("failpoint {name}: aborting the process");
            std::process::abort();
        }
        Err(crate::Error::Unavailable(format!(
            "failpoint {name}: {}",
            arg.unwrap_or_else(|| "injected failure".into())
        )))
    });
    Ok(())
}

/// Passes through the failpoint `name` (a no-op: built without `failpoints`).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) -> Result<()> {
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
