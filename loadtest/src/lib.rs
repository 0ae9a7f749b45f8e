//! TimerDB load test: drives a running node over gRPC only (a black box), reads back what
//! fires from its sink, checks every acknowledged timer (delivered, not early, intact) and
//! measures rates, call latency and fire lateness.
//!
//! `run` is the whole thing, so tests call it in-process; the binary only parses flags.

pub mod chart;
pub mod config;
pub mod consume;
pub mod driver;
pub mod payload;
pub mod procstat;
pub mod report;
pub mod tracker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use config::{Backlog, Crash, FireDist, RunConfig, Scenario, Source};
pub use report::Report;

use driver::{Load, PhaseCounts, Recorder};
use report::BacklogReport;
use tracker::{Tracker, now_ms};

/// Runs one load test to the end and returns its report (it does not write files; see
/// `Report::write`). Errors mean the run could not be made; a run that found lost or early
/// timers returns a report with `passed == false`.
pub async fn run(cfg: RunConfig) -> anyhow::Result<Report> {
    cfg.validate()?;
    // Never 0, so a zeroed payload cannot pass for one of this run's.
    let run_id = rand::random::<u64>() | 1;
    let topics = cfg.topic_names();
    if let Source::Kafka(brokers) = &cfg.source {
        consume::ensure_topics(brokers, &topics, cfg.partitions).await?;
    }
    let clients = driver::connect(&cfg.targets, cfg.connections, Duration::from_secs(30)).await?;
    // The failover scenario's member must exist before anything is sent.
    if let Some(node) = cfg.crash.as_ref().and_then(|c| c.node) {
        slots_of(&cfg.targets, node).await?;
    }

    let backlog = match &cfg.backlog {
        Some(b) => Some(fill_backlog(&cfg, &clients, b, run_id).await),
        None => None,
    };

    let total = cfg.total();
    let tracker = Arc::new(
        Tracker::new(run_id, total, topics.clone(), cfg.partitions).with_retries(cfg.retry),
    );
    let consumer = match &cfg.source {
        Source::Jsonl(path) => consume::tail_jsonl(path, tracker.clone())?,
        Source::Kafka(brokers) => {
            consume::consume_kafka(brokers, &topics, cfg.partitions, tracker.clone()).await?
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = cfg
        .server_pid
        .map(|pid| tokio::spawn(sample_server(pid, tracker.clone(), stop.clone())));
    let crash = cfg.crash.clone().map(|c| {
        tokio::spawn(kill_and_restart(
            c,
            cfg.server_pid,
            cfg.targets.clone(),
            tracker.clone(),
        ))
    });
    let load_start = procstat::load_avg();
    let bar = progress_bar(cfg.progress, total);
    let ticker = tokio::spawn(show_progress(bar.clone(), tracker.clone(), stop.clone()));

    // Give a node that cannot keep up twice the planned time (and at least 30 s more)
    // before sending stops; what was not sent is reported, not waited for.
    let planned = Duration::from_secs_f64(total as f64 / cfg.rate as f64);
    let load = Load {
        total,
        rate: cfg.rate,
        fire: cfg.fire.clone(),
        payload_bytes: cfg.payload_bytes,
        backlog: false,
        max_time: planned * 2 + Duration::from_secs(30),
    };
    let unsent = driver::drive(
        &cfg,
        &clients,
        load,
        run_id,
        Recorder::Tracked(tracker.clone()),
    )
    .await;

    let restarted_ms = match crash {
        Some(task) => Some(task.await??),
        None => None,
    };
    drain(&tracker, cfg.drain).await;
    stop.store(true, Ordering::Relaxed);
    let consumed = consumer.stop().await;
    if let Some(s) = sampler {
        let _ = s.await;
    }
    let _ = ticker.await;
    bar.finish_and_clear();
    consumed?;

    let finished = tracker.finish();
    let mut report = Report::build(&cfg, run_id, tracker.t0_ms(), finished, unsent, backlog);
    report.load_avg = (load_start, procstat::load_avg());
    if let (Some(c), Some(r)) = (report.crash.as_mut(), restarted_ms) {
        c.restarted_ms = r;
    }
    Ok(report)
}

/// The crash and failover scenarios: `kill_at` into the run, SIGKILL the node (or run the
/// fault command), then start it again with the restart command; returns when the command
/// was run (ms since the epoch). Failover first notes which slots the member owns.
async fn kill_and_restart(
    c: Crash,
    pid: Option<u32>,
    targets: Vec<String>,
    tracker: Arc<Tracker>,
) -> anyhow::Result<u64> {
    tokio::time::sleep(c.kill_at).await;
    if let Some(node) = c.node {
        let (slots, owned) = slots_of(&targets, node).await?;
        tracker.record_fault_slots(node, slots, owned);
    }
    let status = match (&c.fault_cmd, pid) {
        (Some(cmd), _) => shell(cmd).await?,
        (None, Some(pid)) => {
            tokio::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .await?
        }
        (None, None) => anyhow::bail!("nothing to kill: no --server-pid and no --fault-cmd"),
    };
    anyhow::ensure!(
        status.success(),
        "the fault ({pid:?}, {:?}) failed: {status}",
        c.fault_cmd
    );
    // Taken once the fault returned: the node fires nothing after this, while it may still
    // have fired in the milliseconds the fault took.
    tracker.record_kill(now_ms());
    tokio::time::sleep(c.down_for).await;
    let restarted_ms = now_ms();
    let status = shell(&c.restart_cmd).await?;
    anyhow::ensure!(
        status.success(),
        "restart command {:?} failed: {status}",
        c.restart_cmd
    );
    Ok(restarted_ms)
}

async fn shell(cmd: &str) -> std::io::Result<std::process::ExitStatus> {
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .status()
        .await
}

/// The slot count of the cluster, and which of its slots member `node` owns now, asked of
/// the first of `targets` that answers.
async fn slots_of(targets: &[String], node: u64) -> anyhow::Result<(u32, Vec<bool>)> {
    let mut last_err = None;
    for t in targets {
        let map = match timerdb_client::Client::connect(t).await {
            Ok(mut c) => c.cluster_map().await,
            Err(e) => Err(e),
        };
        let map = match map {
            Ok(m) => m,
            Err(e) => {
                last_err = Some(anyhow::anyhow!("{t}: {e}"));
                continue;
            }
        };
        if !map.members.iter().any(|(id, _, _)| *id == node) {
            let ids: Vec<String> = map.members.iter().map(|m| m.0.to_string()).collect();
            anyhow::bail!(
                "--kill-node {node}: no such member (the cluster's members: {})",
                ids.join(", ")
            );
        }
        let mut owned = vec![false; map.slots as usize];
        for (start, end, owner) in &map.ranges {
            if *owner == Some(node) {
                for s in *start..=*end {
                    if let Some(o) = owned.get_mut(s as usize) {
                        *o = true;
                    }
                }
            }
        }
        return Ok((map.slots, owned));
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("no target"))
        .context("reading the cluster map"))
}

/// Waits until every acknowledged timer arrived and the last one was due, or until `drain`
/// after the last due time (or after sending ended, if that is later).
async fn drain(tracker: &Tracker, drain: Duration) {
    let sent_end = now_ms();
    let drain_ms = drain.as_millis() as u64;
    // The deadline moves only with `max_due`, which is final once sending ended.
    loop {
        let (all_arrived, max_due) = tracker.progress();
        let now = now_ms();
        if all_arrived && now >= max_due {
            // A short grace so that an immediate duplicate is still counted.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        if now >= max_due.max(sent_end) + drain_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fill_backlog(
    cfg: &RunConfig,
    clients: &[driver::Target],
    b: &Backlog,
    run_id: u64,
) -> BacklogReport {
    let counts = Arc::new(PhaseCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let bar = progress_bar(cfg.progress, b.count);
    bar.set_prefix("backlog");
    let ticker = {
        let (bar, counts, stop) = (bar.clone(), counts.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let acked = counts.acked.load(Ordering::Relaxed);
                let rate = (acked - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), acked);
                bar.set_position(acked);
                bar.set_message(format!("storing far-future timers, {rate:.0}/s"));
            }
        })
    };
    let load = Load {
        total: b.count,
        rate: b.rate,
        fire: FireDist::Uniform(b.delay, b.delay + b.spread),
        payload_bytes: b.payload_bytes,
        backlog: true,
        max_time: Duration::from_secs(3600),
    };
    let started = Instant::now();
    driver::drive(
        cfg,
        clients,
        load,
        run_id,
        Recorder::Counted(counts.clone()),
    )
    .await;
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    bar.finish_and_clear();
    let acked = counts.acked.load(Ordering::Relaxed);
    BacklogReport {
        count: b.count,
        acked,
        failed: counts.failed.load(Ordering::Relaxed),
        secs,
        rate: acked as f64 / secs.max(1e-9),
        rss_after_bytes: cfg
            .server_pid
            .and_then(procstat::sample)
            .map(|s| s.rss_bytes),
    }
}

/// Samples the node once a second into the tracker's timeline.
async fn sample_server(pid: u32, tracker: Arc<Tracker>, stop: Arc<AtomicBool>) {
    let mut prev = procstat::sample(pid).map(|s| (Instant::now(), s));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let Some(s) = procstat::sample(pid) else {
            continue;
        };
        let now = Instant::now();
        let cpu = prev.map(|(t, p)| {
            (s.cpu_secs - p.cpu_secs) / now.duration_since(t).as_secs_f64().max(1e-3) * 100.0
        });
        tracker.record_server(now_ms(), s.rss_bytes, cpu);
        prev = Some((now, s));
    }
}

fn progress_bar(enabled: bool, len: u64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    // `stderr()` draws nothing when stderr is not a terminal.
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    bar
}

async fn show_progress(bar: ProgressBar, tracker: Arc<Tracker>, stop: Arc<AtomicBool>) {
    bar.set_prefix("acked");
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let l = tracker.live();
        bar.set_position(l.acked);
        bar.set_message(format!(
            "ack {}/s  fired {}/s  p99 {} ms  delivered {}  early {}",
            l.acked_rate, l.delivered_rate, l.p99_ms, l.delivered, l.early
        ));
    }
}
