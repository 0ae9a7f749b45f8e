//! What operators deploy next to the node: the Prometheus alert rules pass `promtool`, and
//! every metric the rules and the Grafana dashboard use is exported by a running cluster.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::kafka::{collect, consumer, create_topic};
use common::local_cluster::{LocalCluster, ONE_AT_A_TIME};
use common::{now_ms, services, unique};
use timerdb_client::{Client, NewTimer};

fn deploy(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// The `timerdb_*` metric names a rules or dashboard file uses.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("timerdb_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.insert(text[start..end].to_owned());
        i = end;
    }
    out
}

#[test]
fn the_alert_rules_pass_promtool() {
    let rules = deploy("prometheus/rules.yml");
    let out = match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
    {
        Ok(out) => out,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED: promtool not found ({e}); apt-get install prometheus");
            return;
        }
        Err(e) => panic!("promtool is needed under CI=true (Debian package prometheus): {e}"),
    };
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_use_is_exported() {
    let Some(s) = services() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut wanted =
        metric_names(&std::fs::read_to_string(deploy("prometheus/rules.yml")).unwrap());
    wanted.extend(metric_names(
        &std::fs::read_to_string(deploy("prometheus/grafana-dashboard.json")).unwrap(),
    ));
    assert!(wanted.len() > 10, "names found: {wanted:?}");

    let c = LocalCluster::up(3);
    // One fired timer, so the histograms have a sample.
    let topic = unique("ops");
    create_topic(&s.kafka, &topic, 1).await;
    let mut client = Client::connect(&c.nodes[0]).await.unwrap();
    let id = client
        .set_timeout(NewTimer::new(now_ms() + 200, &topic, 0))
        .await
        .unwrap();
    let got = collect(
        &consumer(&s.kafka, &[&topic]),
        Duration::from_secs(30),
        |m| m.iter().any(|m| m.timer_id() == id),
    )
    .await;
    assert!(got.iter().any(|m| m.timer_id() == id));
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let mut exported = String::new();
    for node in 1..=3u16 {
        exported += &c.metrics_text(node).await;
    }
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| {
            !exported.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "metrics used by deploy/prometheus but not exported: {missing:?}"
    );
}
