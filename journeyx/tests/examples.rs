//! The example journeys in `journeyx/examples/`: each passes `journeyx validate`, and each,
//! driven by events through the engine, sends exactly the messages it describes.

use std::path::{Path, PathBuf};
use std::process::Command;

use journeyx::catalog::Catalog;
use journeyx::engine::{self, Command as Effect, Event, User};
use journeyx::model::{Journey, Segment};
use serde_json::{Value, json};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn files() -> Vec<PathBuf> {
    let mut f: Vec<PathBuf> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    f.sort();
    f
}

fn journeyx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_journeyx"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn every_example_passes_validate() {
    let files = files();
    assert!(files.len() >= 5, "four journeys and a segment: {files:?}");
    let args: Vec<&str> = std::iter::once("validate")
        .chain(files.iter().map(|f| f.to_str().unwrap()))
        .collect();
    let out = journeyx(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.matches("a valid journey").count(),
        files.len() - 1,
        "{text}"
    );
    assert_eq!(text.matches("a valid segment").count(), 1, "{text}");
}

#[test]
fn validate_names_each_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(examples().join("onboarding.yaml"))
        .unwrap()
        .replace("to: reminder", "to: remindr")
        .replace("start: welcome", "start: hello");
    std::fs::write(&bad, text).unwrap();
    let out = journeyx(&["validate", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("node welcome, edge 1: goes to `remindr`, which does not exist"),
        "{err}"
    );
    assert!(err.contains("start node `hello` does not exist"), "{err}");
    let json = journeyx(&["validate", "--json", bad.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 2, "{v}");
    let missing = journeyx(&["validate", "/nonexistent/j.yaml"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/j.yaml"));
}

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    for f in files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.to_str().unwrap();
        if name.ends_with(".segment.yaml") {
            c.publish_segment(Segment::parse(name, &text).unwrap());
        }
    }
    for f in files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.to_str().unwrap();
        if !name.ends_with(".segment.yaml") {
            c.publish(Journey::parse(name, &text).unwrap()).unwrap();
        }
    }
    c
}

/// Drives one user through `events` (timer fires are delivered when their time comes,
/// before any later event); returns the messages sent as (journey, node, template).
fn drive(
    c: &Catalog,
    user_id: &str,
    tz: Option<&str>,
    events: &[(&str, u64, Value)],
) -> Vec<(String, String, String)> {
    drive_timed(c, user_id, tz, events)
        .into_iter()
        .map(|(m, _)| m)
        .collect()
}

/// As [`drive`], with the time (ms) of the event that sent each message.
fn drive_timed(
    c: &Catalog,
    user_id: &str,
    tz: Option<&str>,
    events: &[(&str, u64, Value)],
) -> Vec<((String, String, String), u64)> {
    let mut user = User::default();
    let mut timers: Vec<Event> = Vec::new();
    let mut sent = Vec::new();
    let mut queue: Vec<Event> = events
        .iter()
        .enumerate()
        .map(|(i, (name, ts, props))| Event {
            event_id: format!("{user_id}-{i}"),
            app_id: "demo".into(),
            user_id: user_id.into(),
            name: (*name).into(),
            ts_ms: *ts,
            properties: props.as_object().cloned().unwrap_or_default(),
            tz: tz.map(str::to_owned),
        })
        .collect();
    queue.reverse();
    loop {
        timers.sort_by_key(|t| std::cmp::Reverse(t.ts_ms));
        let next_timer = timers.last().map(|t| t.ts_ms);
        let next_event = queue.last().map(|e| e.ts_ms);
        let e = match (next_timer, next_event) {
            (Some(t), Some(e)) if t <= e => timers.pop().unwrap(),
            (Some(_), None) => timers.pop().unwrap(),
            (_, Some(_)) => queue.pop().unwrap(),
            (None, None) => break,
        };
        let o = engine::step(c, &user, &e);
        for cmd in o.commands {
            match cmd {
                Effect::Send(m) => sent.push(((m.journey_id, m.node_id, m.template), e.ts_ms)),
                Effect::SetTimer { fire, .. } => timers.push(fire),
                Effect::CancelTimer { timer, .. } => timers.retain(|t| t.event_id != timer.token),
                Effect::Webhook { .. } => {}
            }
        }
        user = o.user;
    }
    sent
}

fn s(j: &str, n: &str, t: &str) -> (String, String, String) {
    (j.into(), n.into(), t.into())
}

const H: u64 = 3_600_000;
/// 2026-01-10 12:00 UTC.
const NOON: u64 = 1_768_046_400_000;

#[test]
fn onboarding_reminds_unless_the_user_buys_first() {
    let c = catalog();
    assert_eq!(
        drive(&c, "a", None, &[("signed_up", NOON, json!({}))]),
        vec![
            s("onboarding", "welcome", "welcome_v1"),
            s("onboarding", "reminder", "reminder_v1")
        ]
    );
    assert_eq!(
        drive(
            &c,
            "b",
            None,
            &[
                ("signed_up", NOON, json!({})),
                ("purchased", NOON + 1_000, json!({"amount": 5}))
            ]
        ),
        vec![s("onboarding", "welcome", "welcome_v1")]
    );
}

#[test]
fn an_abandoned_cart_is_nudged_once_and_a_checkout_ends_it() {
    let c = catalog();
    assert_eq!(
        drive(
            &c,
            "a",
            None,
            &[("cart_updated", NOON, json!({"items": 2}))]
        ),
        vec![s("abandoned_cart", "nudge", "cart_reminder")]
    );
    assert_eq!(
        drive(
            &c,
            "b",
            None,
            &[
                ("cart_updated", NOON, json!({"items": 2})),
                ("checked_out", NOON + 10 * 60_000, json!({}))
            ]
        ),
        vec![]
    );
    assert_eq!(
        drive(
            &c,
            "c",
            None,
            &[("cart_updated", NOON, json!({"items": 0}))]
        ),
        vec![],
        "an empty cart enters nothing"
    );
}

#[test]
fn quiet_hours_hold_the_message_until_nine_local() {
    let c = catalog();
    // Noon UTC is 21:00 in Tokyo: quiet there (until 09:00), not in London.
    let tokyo = drive_timed(
        &c,
        "a",
        Some("Asia/Tokyo"),
        &[("order_shipped", NOON, json!({}))],
    );
    assert_eq!(
        tokyo,
        vec![(s("quiet_hours", "notify", "shipped"), NOON + 12 * H)],
        "09:00 JST"
    );
    let london = drive_timed(
        &c,
        "b",
        Some("Europe/London"),
        &[("order_shipped", NOON, json!({}))],
    );
    assert_eq!(
        london,
        vec![(s("quiet_hours", "notify", "shipped"), NOON)],
        "at once"
    );
    // Shipped twice (re_entry: always): notified twice.
    let twice = drive(
        &c,
        "c",
        None,
        &[
            ("order_shipped", NOON, json!({})),
            ("order_shipped", NOON + H, json!({})),
        ],
    );
    assert_eq!(twice.len(), 2);
}

#[test]
fn the_split_sends_one_arm_per_user_about_half_each() {
    let c = catalog();
    let mut a = 0;
    for i in 0..1_000 {
        let sent = drive(
            &c,
            &format!("user-{i}"),
            None,
            &[("trial_started", NOON, json!({}))],
        );
        let ab: Vec<_> = sent.iter().filter(|m| m.0 == "ab_split").collect();
        assert_eq!(ab.len(), 1);
        a += usize::from(ab[0].2 == "trial_tips_a");
    }
    assert!((430..570).contains(&a), "{a} of 1000 in arm a");
}
