//! Property tests of the pure engine: random event streams (every event name the shipped
//! examples react to, random gaps, amounts, time zones, timer fires, stale or not) through
//! all the examples at once. What must hold whatever arrives:
//! - the engine is a function: the same (user, event) always gives the same outcome;
//! - a user inside a journey always stands on a node of its version's graph;
//! - a capped send never exceeds its journey's frequency cap over the sends before it;
//! - every message and webhook key is unique over the stream (each is derived from its
//!   event), so only a reprocessed event repeats one;
//! - a timer is never set to fire before the event that set it, and its fire event's id
//!   is fixed by that event;
//! - a timer fire the user has moved past (stale token) sends nothing and moves nobody.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::catalog::Catalog;
use crate::model::{Journey, Segment};

const EXAMPLES: [&str; 5] = [
    include_str!("../../examples/onboarding.yaml"),
    include_str!("../../examples/abandoned_cart.yaml"),
    include_str!("../../examples/quiet_hours.yaml"),
    include_str!("../../examples/ab_split.yaml"),
    include_str!("../../examples/vip_welcome.yaml"),
];

const NAMES: [&str; 9] = [
    "signed_up",
    "purchased",
    "unsubscribed",
    "cart_updated",
    "checked_out",
    "order_shipped",
    "trial_started",
    "page_viewed",
    "journeyx.enter",
];

const ZONES: [Option<&str>; 4] = [
    None,
    Some("America/New_York"),
    Some("Asia/Tokyo"),
    Some("UTC"),
];

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.publish_segment(
        Segment::parse(
            "vips.segment.yaml",
            include_str!("../../examples/vips.segment.yaml"),
        )
        .unwrap(),
    );
    for (i, j) in EXAMPLES.iter().enumerate() {
        c.publish(Journey::parse(&format!("example-{i}.yaml"), j).unwrap())
            .unwrap();
    }
    c
}

/// One step of a stream: an event by name, or the delivery of a timer set earlier.
#[derive(Debug, Clone)]
enum Move {
    Event {
        name: usize,
        gap_ms: u64,
        amount: i64,
        zone: usize,
    },
    /// Deliver the `n`th timer set so far (modulo how many), at its time or later.
    Fire { n: usize, late_ms: u64 },
}

fn moves() -> impl Strategy<Value = Vec<Move>> {
    let event = (
        0..NAMES.len(),
        0u64..36 * 3_600_000,
        -3i64..50,
        0..ZONES.len(),
    )
        .prop_map(|(name, gap_ms, amount, zone)| Move::Event {
            name,
            gap_ms,
            amount,
            zone,
        });
    let fire = (any::<usize>(), 0u64..5_000).prop_map(|(n, late_ms)| Move::Fire { n, late_ms });
    prop::collection::vec(prop_oneof![3 => event, 1 => fire], 1..60)
}

fn check_nodes(c: &Catalog, user: &User) -> Result<(), TestCaseError> {
    for (jid, st) in &user.journeys {
        if !st.active {
            continue;
        }
        let j = c.version("demo", jid, st.version).ok_or_else(|| {
            TestCaseError::fail(format!("{jid} v{} is not published", st.version))
        })?;
        prop_assert!(
            j.nodes.iter().any(|n| n.id == st.node),
            "user stands on {:?}, not a node of {jid} v{}",
            st.node,
            st.version
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_event_stream_keeps_the_engine_s_promises(moves in moves(), user_n in 0u32..1_000) {
        let c = catalog();
        let mut user = User::default();
        let mut ts = 1_790_000_000_000u64;
        let mut timers: Vec<Event> = Vec::new();
        let mut keys: HashSet<String> = HashSet::new();
        let mut sent_at: Vec<u64> = Vec::new();
        let caps: HashMap<String, (usize, u64)> = c
            .all_journeys()
            .filter_map(|j| {
                j.frequency_cap
                    .as_ref()
                    .map(|f| (j.id.clone(), (f.messages as usize, f.per.as_millis() as u64)))
            })
            .collect();
        for (i, m) in moves.iter().enumerate() {
            let event = match m {
                Move::Event { name, gap_ms, amount, zone } => {
                    ts += gap_ms;
                    let properties = match NAMES[*name] {
                        "purchased" => json!({"amount": amount}),
                        "cart_updated" => json!({"items": amount}),
                        "journeyx.enter" => json!({"journey_id": "vip_welcome"}),
                        _ => json!({}),
                    };
                    Event {
                        event_id: format!("e{i}"),
                        app_id: "demo".into(),
                        user_id: format!("user-{user_n}"),
                        name: NAMES[*name].into(),
                        ts_ms: ts,
                        properties: properties.as_object().cloned().unwrap(),
                        tz: ZONES[*zone].map(str::to_owned),
                    }
                }
                Move::Fire { n, late_ms } => {
                    if timers.is_empty() {
                        continue;
                    }
                    let mut fire = timers[n % timers.len()].clone();
                    ts = ts.max(fire.ts_ms + late_ms);
                    fire.ts_ms = ts;
                    fire
                }
            };
            let out = step(&c, &user, &event);
            prop_assert_eq!(&out, &step(&c, &user, &event), "the engine is not a function");
            if event.name == TIMER_EVENT {
                let p = &event.properties;
                let jid = p["journey_id"].as_str().unwrap();
                let token = p["token"].as_str().unwrap();
                let waiting = user.journeys.get(jid).is_some_and(|st| {
                    st.active && st.timer.as_ref().is_some_and(|t| t.token == token)
                });
                if !waiting {
                    prop_assert!(
                        out.commands.iter().all(|c| !matches!(c, Command::Send(_) | Command::Webhook { .. })),
                        "a stale timer fire sent something: {:?}",
                        out.commands
                    );
                    prop_assert_eq!(
                        &out.user.journeys, &user.journeys,
                        "a stale timer fire moved the user"
                    );
                }
            }
            for command in &out.commands {
                match command {
                    Command::Send(msg) => {
                        prop_assert!(keys.insert(msg.idempotency_key.clone()), "key repeated: {:?}", msg);
                        prop_assert_eq!(&msg.event_id, &event.event_id);
                        if let Some((messages, per)) = caps.get(&msg.journey_id) {
                            let since = event.ts_ms.saturating_sub(*per);
                            let recent = sent_at.iter().filter(|t| **t > since).count();
                            prop_assert!(
                                recent < *messages,
                                "{} sent with {recent} messages in the window before it (cap {messages})",
                                msg.journey_id
                            );
                        }
                        sent_at.push(event.ts_ms);
                    }
                    Command::Webhook { idempotency_key, .. } => {
                        prop_assert!(keys.insert(idempotency_key.clone()), "webhook key repeated");
                    }
                    Command::SetTimer { fire, fire_at_ms, .. } => {
                        prop_assert!(*fire_at_ms >= event.ts_ms, "a timer set to fire before its event");
                        prop_assert_eq!(fire.ts_ms, *fire_at_ms);
                        prop_assert_eq!(fire.name.as_str(), TIMER_EVENT);
                        timers.push(fire.clone());
                    }
                    Command::CancelTimer { .. } => {}
                }
            }
            check_nodes(&c, &out.user)?;
            user = out.user;
        }
    }
}
