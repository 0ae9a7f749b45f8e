//! CPU priority of background work.
//!
//! Firing runs on the async runtime's worker threads at the process's own priority. Bulk
//! work that has slack (the embedded store's writer thread, and the blocking threads that
//! read whole buckets seconds before they are due) runs a few nice levels lower, so when a
//! bucket load and a bucket delete coincide on a busy machine they wait for the firing
//! path rather than the other way round. Measured in `docs/benchmarks.md` (section 9).

/// How many nice levels background threads sit below the process.
pub const BACKGROUND_NICE_DELTA: i32 = 10;

/// Lowers the calling thread's CPU priority by [`BACKGROUND_NICE_DELTA`] (Linux, where the
/// nice value is per thread; elsewhere nothing changes). Failure only costs priority.
pub fn lower_current_thread() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        let result = rustix::process::getpriority_process(Some(tid)).and_then(|nice| {
            rustix::process::setpriority_process(Some(tid), (nice + BACKGROUND_NICE_DELTA).min(19))
        });
        if let Err(e) = result {
            tracing::debug!(error = %e, "priority: background thread keeps the process priority");
        }
    }
}

/// [`lower_current_thread`] once per thread, for pooled threads that run many jobs.
pub fn lower_current_thread_once() {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    LOWERED.with(|done| {
        if !done.replace(true) {
            lower_current_thread();
        }
    });
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    #[test]
    fn only_the_calling_thread_is_lowered_and_only_once() {
        let before = nice();
        let (lowered, again) = std::thread::spawn(|| {
            let start = nice();
            lower_current_thread_once();
            let lowered = nice();
            lower_current_thread_once();
            assert_eq!(lowered, (start + BACKGROUND_NICE_DELTA).min(19));
            (lowered, nice())
        })
        .join()
        .unwrap();
        assert_eq!(again, lowered, "a second call must not lower it further");
        assert_eq!(
            nice(),
            before,
            "the calling thread of the test kept its priority"
        );
    }
}
