use super::*;
use crate::model::{Journey, Segment};
use serde_json::json;

/// The shipped example (`journeyx/examples/onboarding.yaml`), the issue's own journey.
const ONBOARDING: &str = include_str!("../../examples/onboarding.yaml");

fn catalog(journeys: &[&str]) -> Catalog {
    let mut c = Catalog::default();
    c.publish_segment(
        Segment::parse(
            "s.yaml",
            "{id: vips, app_id: demo, where: {tags: {contains: vip}}}",
        )
        .unwrap(),
    );
    for j in journeys {
        c.publish(Journey::parse("j.yaml", j).unwrap()).unwrap();
    }
    c
}

fn ev(id: &str, name: &str, ts_ms: u64, props: Value) -> Event {
    Event {
        event_id: id.into(),
        app_id: "demo".into(),
        user_id: "u1".into(),
        name: name.into(),
        ts_ms,
        properties: props.as_object().cloned().unwrap_or_default(),
        tz: None,
    }
}

fn sends(o: &Outcome) -> Vec<(String, String)> {
    o.commands
        .iter()
        .filter_map(|c| match c {
            Command::Send(m) => Some((m.node_id.clone(), m.template.clone())),
            _ => None,
        })
        .collect()
}

fn timer_of(o: &Outcome) -> Event {
    o.commands
        .iter()
        .find_map(|c| match c {
            Command::SetTimer { fire, .. } => Some(fire.clone()),
            _ => None,
        })
        .expect("a timer was set")
}

fn counted(o: &Outcome, count: Count) -> Vec<String> {
    o.counts
        .iter()
        .filter(|c| c.count == count)
        .map(|c| c.node_id.clone())
        .collect()
}

#[test]
fn a_signed_up_user_is_welcomed_reminded_when_the_timer_fires_and_converted() {
    let c = catalog(&[ONBOARDING]);
    let o = step(
        &c,
        &User::default(),
        &ev("e1", "signed_up", 1_000, json!({})),
    );
    assert_eq!(sends(&o), vec![("welcome".into(), "welcome_v1".into())]);
    let fire = timer_of(&o);
    assert_eq!((fire.name.as_str(), fire.ts_ms), (TIMER_EVENT, 3_000));
    assert_eq!(fire.properties["node_id"], "welcome");
    let st = &o.user.journeys["onboarding"];
    assert_eq!((st.node.as_str(), st.active), ("welcome", true));
    assert_eq!(st.timer.as_ref().unwrap().token, fire.event_id);
    assert_eq!(counted(&o, Count::Entered), vec!["welcome"]);

    // The timer fires: reminder is sent, `always` moves on to done, which exits.
    let o2 = step(&c, &o.user, &fire);
    assert_eq!(sends(&o2), vec![("reminder".into(), "reminder_v1".into())]);
    let st = &o2.user.journeys["onboarding"];
    assert_eq!(
        (st.node.as_str(), st.active, st.timer.is_none()),
        ("done", false, true)
    );
    assert_eq!(counted(&o2, Count::Entered), vec!["reminder", "done"]);
    assert_eq!(counted(&o2, Count::Converted), vec!["done"]);
    assert_eq!(counted(&o2, Count::Exited), vec!["done"]);
    // Nothing to cancel: the timer that moved the user had fired.
    assert!(
        !o2.commands
            .iter()
            .any(|c| matches!(c, Command::CancelTimer { .. }))
    );

    // The same fire again (TimerDB delivers at least once) changes nothing.
    let again = step(&c, &o2.user, &fire);
    assert!(again.commands.is_empty() && !again.changed);
}

#[test]
fn a_purchase_before_the_timer_cancels_it_and_a_zero_amount_does_not_count() {
    let c = catalog(&[ONBOARDING]);
    let o = step(
        &c,
        &User::default(),
        &ev("e1", "signed_up", 1_000, json!({})),
    );
    let zero = step(
        &c,
        &o.user,
        &ev("e2", "purchased", 1_500, json!({"amount": 0})),
    );
    assert!(zero.commands.is_empty());
    assert_eq!(zero.user.journeys["onboarding"].node, "welcome");
    let bought = step(
        &c,
        &o.user,
        &ev("e2", "purchased", 1_500, json!({"amount": 9.5})),
    );
    let pending = o.user.journeys["onboarding"].timer.clone().unwrap();
    assert_eq!(
        bought.commands,
        vec![Command::CancelTimer {
            journey_id: "onboarding".into(),
            timer: pending
        }]
    );
    assert_eq!(counted(&bought, Count::Converted), vec!["done"]);
    // The timer that fires anyway (cancel raced it) is ignored.
    let late = step(&c, &bought.user, &timer_of(&o));
    assert!(late.commands.is_empty() && !late.changed);
}

#[test]
fn processing_an_event_again_yields_the_same_state_commands_and_keys() {
    let c = catalog(&[ONBOARDING]);
    let e = ev("e1", "signed_up", 1_000, json!({}));
    let a = step(&c, &User::default(), &e);
    let b = step(&c, &User::default(), &e);
    assert_eq!(a, b);
    let other = step(
        &c,
        &User::default(),
        &ev("e9", "signed_up", 1_000, json!({})),
    );
    let key_of = |o: &Outcome| match &o.commands[0] {
        Command::Send(m) => m.idempotency_key.clone(),
        c => panic!("{c:?}"),
    };
    assert_eq!(key_of(&a), key_of(&b));
    assert_ne!(key_of(&a), key_of(&other), "another event, another key");
}

#[test]
fn re_entry_never_after_exit_and_always() {
    for (policy, second_entry_while_inside, entry_after_exit) in [
        ("never", false, false),
        ("after_exit", false, true),
        ("always", true, true),
    ] {
        let c =
            catalog(&[&ONBOARDING.replace("re_entry: after_exit", &format!("re_entry: {policy}"))]);
        let inside = step(
            &c,
            &User::default(),
            &ev("e1", "signed_up", 1_000, json!({})),
        )
        .user;
        let again = step(&c, &inside, &ev("e2", "signed_up", 1_100, json!({})));
        assert_eq!(
            !sends(&again).is_empty(),
            second_entry_while_inside,
            "{policy}: signed up again while inside"
        );
        if second_entry_while_inside {
            assert_eq!(again.user.journeys["onboarding"].entries, 2);
            assert!(
                again
                    .commands
                    .iter()
                    .any(|c| matches!(c, Command::CancelTimer { .. })),
                "the old wait is cancelled"
            );
        }
        let left = step(&c, &inside, &ev("e3", "unsubscribed", 1_200, json!({}))).user;
        assert!(!left.journeys["onboarding"].active);
        let back = step(&c, &left, &ev("e4", "signed_up", 1_300, json!({})));
        assert_eq!(
            !sends(&back).is_empty(),
            entry_after_exit,
            "{policy}: after exit"
        );
    }
}

#[test]
fn an_exit_event_leaves_from_any_node_and_cancels_the_wait() {
    let c = catalog(&[ONBOARDING]);
    let o = step(
        &c,
        &User::default(),
        &ev("e1", "signed_up", 1_000, json!({})),
    );
    let out = step(&c, &o.user, &ev("e2", "unsubscribed", 1_100, json!({})));
    assert!(matches!(
        out.commands.as_slice(),
        [Command::CancelTimer { .. }]
    ));
    assert_eq!(counted(&out, Count::Exited), vec!["welcome"]);
    assert!(!out.user.journeys["onboarding"].active);
}

#[test]
fn the_frequency_cap_counts_messages_across_journeys() {
    let second = ONBOARDING
        .replace("id: onboarding", "id: promo")
        .replace("welcome_v1", "promo_v1");
    let c = catalog(&[ONBOARDING, &second]);
    // Both journeys enter on signed_up: 2 messages.
    let u = step(
        &c,
        &User::default(),
        &ev("e1", "signed_up", 1_000, json!({})),
    )
    .user;
    assert_eq!(u.sends.len(), 2);
    // Both timers fire: the third message goes out, the fourth is over the cap of 3.
    let fires: Vec<Event> = step(
        &c,
        &User::default(),
        &ev("e1", "signed_up", 1_000, json!({})),
    )
    .commands
    .iter()
    .filter_map(|c| match c {
        Command::SetTimer { fire, .. } => Some(fire.clone()),
        _ => None,
    })
    .collect();
    let o1 = step(&c, &u, &fires[0]);
    assert_eq!(sends(&o1).len(), 1);
    let o2 = step(&c, &o1.user, &fires[1]);
    assert!(sends(&o2).is_empty());
    assert_eq!(counted(&o2, Count::Capped), vec!["reminder"]);
    // A day after the first two, they are forgotten (the one of the timer, at 3 s, is
    // still inside the day): both journeys send again.
    let t = 1_000 + 86_400_000 + 1;
    let later = step(&c, &o2.user, &ev("e5", "signed_up", t, json!({})));
    assert_eq!(sends(&later).len(), 2);
    assert_eq!(later.user.sends, vec![3_000, t, t]);
}

const SPLIT: &str = r#"
id: ab
version: 1
app_id: demo
entry: {event: signed_up}
start: split
nodes:
  - id: split
    edges:
      - {when: {split: 50}, to: a}
      - {when: always, to: b}
  - id: a
    actions: [{send: {channel: push, template: a}}, exit]
  - id: b
    actions: [{send: {channel: push, template: b}}, exit]
"#;

#[test]
fn a_split_is_deterministic_per_user_and_near_its_share() {
    let c = catalog(&[SPLIT]);
    let mut a = 0;
    for i in 0..2_000 {
        let mut e = ev(&format!("e{i}"), "signed_up", 1_000, json!({}));
        e.user_id = format!("user-{i}");
        let first = sends(&step(&c, &User::default(), &e));
        e.event_id = format!("other-{i}");
        assert_eq!(
            first,
            sends(&step(&c, &User::default(), &e)),
            "same user, same arm"
        );
        a += usize::from(first[0].1 == "a");
    }
    assert!((900..1_100).contains(&a), "{a} of 2000 in the 50 % arm");
}

const QUIET: &str = r#"
id: quiet
version: 1
app_id: demo
entry: {event: signed_up}
start: check
nodes:
  - id: check
    edges:
      - {when: {window: {from: "09:00", to: "21:00"}}, to: send}
      - {when: always, to: wait}
  - id: wait
    actions: [{timer: {until: "09:00"}}]
    edges: [{when: timer, to: send}]
  - id: send
    actions: [{send: {channel: sms, template: hello}}, exit]
"#;

#[test]
fn quiet_hours_hold_a_message_until_nine_in_the_users_zone() {
    let c = catalog(&[QUIET]);
    // 22:30 UTC on 2026-01-10 is 07:30 the next morning in Tokyo: wait until 09:00 there.
    let mut e = ev("e1", "signed_up", 1_768_084_200_000, json!({}));
    e.tz = Some("Asia/Tokyo".into());
    let o = step(&c, &User::default(), &e);
    assert!(sends(&o).is_empty());
    let fire = timer_of(&o);
    assert_eq!(fire.ts_ms, 1_768_089_600_000, "00:00 UTC = 09:00 in Tokyo");
    assert_eq!(o.user.tz.as_deref(), Some("Asia/Tokyo"));
    assert_eq!(
        sends(&step(&c, &o.user, &fire)),
        vec![("send".into(), "hello".into())]
    );
    // The same instant in Berlin is 23:30: also quiet. In New York it is 17:30: sent now.
    e.tz = Some("America/New_York".into());
    assert_eq!(sends(&step(&c, &User::default(), &e)).len(), 1);
}

const VIP: &str = r#"
id: vip
version: 1
app_id: demo
entry: {segment: vips}
exit: [{not_segment: vips}]
start: hello
nodes:
  - id: hello
    actions: [{send: {channel: push, template: vip_hello}}]
    edges: [{when: {event: bought}, to: thanks}]
  - id: thanks
    actions: [{send: {channel: push, template: vip_thanks}}, exit]
"#;

const TAGGER: &str = r#"
id: tagger
version: 1
app_id: demo
entry: {event: spent}
re_entry: always
start: tag
nodes:
  - id: tag
    actions: [{tag: vip}, exit]
"#;

#[test]
fn a_segment_enters_users_as_they_join_it_and_exits_them_as_they_leave() {
    let c = catalog(&[VIP, TAGGER]);
    let plain = step(&c, &User::default(), &ev("e1", "browsed", 1_000, json!({})));
    assert!(plain.commands.is_empty());
    // The tag is set by `tagger`; journeys run in id order, so `vip` sees it in the same
    // event and enters.
    let entered = step(&c, &plain.user, &ev("e2", "spent", 2_000, json!({})));
    assert!(entered.user.tags.contains("vip"));
    assert_eq!(sends(&entered), vec![("hello".into(), "vip_hello".into())]);
    let again = step(&c, &entered.user, &ev("e3", "browsed", 3_000, json!({})));
    assert!(sends(&again).is_empty(), "inside already: no second entry");
    let mut untagged = entered.user.clone();
    untagged.tags.clear();
    let left = step(&c, &untagged, &ev("e4", "browsed", 4_000, json!({})));
    assert!(!left.user.journeys["vip"].active);
    assert_eq!(counted(&left, Count::Exited), vec!["hello"]);
}

/// A loader event enters a user only at the entry count it was made for: its copy,
/// arriving after the entry, enters nobody (with `re_entry: always` it re-entered, setting
/// the timer again under the first entry's key, which TimerDB answers with the cancelled
/// timer); a later load of the user who left makes a new event with new keys.
#[test]
fn a_loader_event_enters_once_even_when_it_arrives_twice() {
    let waits = r#"
id: waits
version: 1
app_id: demo
entry: {segment: vips}
re_entry: always
exit: [{event: quit}]
start: hello
nodes:
  - id: hello
    actions: [{send: {channel: push, template: hi}}, {timer: 1h}]
    edges: [{when: timer, to: bye}]
  - id: bye
    actions: [exit]
"#;
    let c = catalog(&[waits]);
    let mut u = User::default();
    u.tags.insert("vip".into());
    let load = |id: &str, entries: u32| {
        ev(
            id,
            ENTER_EVENT,
            1_000,
            json!({"journey_id": "waits", "entries": entries}),
        )
    };
    let first = step(&c, &u, &load("l-0", 0));
    assert_eq!(sends(&first), vec![("hello".into(), "hi".into())]);
    let fire = timer_of(&first);
    let again = step(&c, &first.user, &load("l-0", 0));
    assert!(again.commands.is_empty(), "{:?}", again.commands);
    assert_eq!(again.user.journeys["waits"], first.user.journeys["waits"]);
    // The user leaves; a later load, reading one entry, enters them again under new keys.
    let left = step(&c, &first.user, &ev("q", "quit", 2_000, json!({})));
    assert!(!left.user.journeys["waits"].active);
    let second = step(&c, &left.user, &load("l-1", 1));
    assert_eq!(second.user.journeys["waits"].entries, 2);
    assert_ne!(timer_of(&second).event_id, fire.event_id, "a new timer key");
    let key = |o: &Outcome| {
        o.commands
            .iter()
            .find_map(|c| match c {
                Command::Send(m) => Some(m.idempotency_key.clone()),
                _ => None,
            })
            .unwrap()
    };
    assert_ne!(key(&second), key(&first), "a new message key");
    // An event from an older loader, without the count, enters as before.
    let old = step(
        &c,
        &left.user,
        &ev("l-old", ENTER_EVENT, 3_000, json!({"journey_id": "waits"})),
    );
    assert_eq!(old.user.journeys["waits"].entries, 2);
}

#[test]
fn the_loaders_enter_event_concerns_only_its_journey() {
    let c = catalog(&[VIP]);
    let mut u = User::default();
    u.tags.insert("vip".into());
    let other = step(
        &c,
        &u,
        &ev("l1", ENTER_EVENT, 1_000, json!({"journey_id": "else"})),
    );
    assert!(other.commands.is_empty());
    let mine = step(
        &c,
        &u,
        &ev("l2", ENTER_EVENT, 1_000, json!({"journey_id": "vip"})),
    );
    assert_eq!(sends(&mine).len(), 1);
}

#[test]
fn a_new_version_keeps_users_on_theirs_unless_it_maps_their_node() {
    let mut c = catalog(&[ONBOARDING]);
    let entered = step(
        &c,
        &User::default(),
        &ev("e1", "signed_up", 1_000, json!({})),
    );
    let (at_welcome, fire) = (entered.user.clone(), timer_of(&entered));
    // Version 2 without a mapping: the user stays on version 1, new users enter version 2.
    let v2 = ONBOARDING
        .replace("version: 1", "version: 2")
        .replace("reminder_v1", "reminder_v2");
    c.publish(Journey::parse("j.yaml", &v2).unwrap()).unwrap();
    let stays = step(&c, &at_welcome, &ev("e2", "noise", 1_100, json!({})));
    assert_eq!(stays.user.journeys["onboarding"].version, 1);
    let reminded = step(&c, &at_welcome, &fire);
    assert_eq!(
        sends(&reminded),
        vec![("reminder".into(), "reminder_v1".into())]
    );
    // Version 3 maps v2's `welcome` to its `welcome`: a v2 user moves, a v1 user does not.
    let v3 = format!(
        "{}migrate_from: {{version: 2, nodes: {{welcome: welcome}}}}\n",
        ONBOARDING
            .replace("version: 1", "version: 3")
            .replace("reminder_v1", "reminder_v3")
    );
    c.publish(Journey::parse("j.yaml", &v3).unwrap()).unwrap();
    let on_v2 = step(
        &c,
        &User::default(),
        &ev("n1", "signed_up", 1_000, json!({})),
    )
    .user;
    assert_eq!(
        on_v2.journeys["onboarding"].version, 3,
        "new users enter the newest"
    );
    let mut v2_user = at_welcome.clone();
    v2_user.journeys.get_mut("onboarding").unwrap().version = 2;
    let moved = step(&c, &v2_user, &fire);
    assert_eq!(moved.user.journeys["onboarding"].version, 3);
    assert_eq!(
        sends(&moved),
        vec![("reminder".into(), "reminder_v3".into())]
    );
    let v1_user = step(&c, &at_welcome, &fire);
    assert_eq!(
        sends(&v1_user),
        vec![("reminder".into(), "reminder_v1".into())]
    );
}

#[test]
fn set_unset_and_user_conditions() {
    let j = r#"
id: props
version: 1
app_id: demo
entry: {event: signed_up}
start: a
nodes:
  - id: a
    actions: [{set: {plan: pro, trial: true}}, {unset: [trial]}]
    edges:
      - {when: {user: {plan: pro, trial: {exists: false}}}, to: b}
  - id: b
    actions: [{webhook: {url: "http://hooks.invalid/pro", body: {hello: 1}}}, exit]
"#;
    let c = catalog(&[j]);
    let o = step(
        &c,
        &User::default(),
        &ev("e1", "signed_up", 1_000, json!({})),
    );
    assert_eq!(o.user.properties.get("plan"), Some(&json!("pro")));
    assert!(!o.user.properties.contains_key("trial"));
    assert!(
        matches!(&o.commands[..], [Command::Webhook { url, body, .. }] if url == "http://hooks.invalid/pro" && body == &json!({"hello": 1}))
    );
}

/// The schemas in `journeyx/schemas/` name exactly the fields journeyx writes, and every
/// field they require; ids and keys are 32 hex digits.
#[test]
fn records_match_their_published_schemas() {
    fn schema(name: &str) -> Value {
        let path = format!("{}/schemas/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }
    fn check(schema: &Value, record: &Value, what: &str) {
        let props = schema["properties"].as_object().unwrap();
        let fields = record.as_object().unwrap();
        for k in fields.keys() {
            assert!(props.contains_key(k), "{what}: `{k}` is not in the schema");
        }
        for r in schema["required"].as_array().unwrap() {
            assert!(
                fields.contains_key(r.as_str().unwrap()),
                "{what}: required `{r}` missing"
            );
        }
        for (k, p) in props {
            if p.get("pattern").is_some() {
                let v = fields[k].as_str().unwrap();
                assert!(
                    v.len() == 32 && v.chars().all(|c| c.is_ascii_hexdigit()),
                    "{what}.{k} = {v}"
                );
            }
            if let Some(c) = p.get("const") {
                assert_eq!(&fields[k], c, "{what}.{k}");
            }
            if let Some(inner) = p.get("properties").filter(|_| fields.contains_key(k)) {
                let sub =
                    serde_json::json!({"properties": inner, "required": p["required"].clone()});
                check(&sub, &fields[k], &format!("{what}.{k}"));
            }
        }
    }
    let c = catalog(&[ONBOARDING]);
    let e = ev("e1", "signed_up", 1_000, json!({"plan": "pro"}));
    check(
        &schema("event.schema.json"),
        &serde_json::to_value(&e).unwrap(),
        "event",
    );
    let o = step(&c, &User::default(), &e);
    let Command::Send(m) = &o.commands[0] else {
        panic!("{:?}", o.commands)
    };
    check(&schema("message.schema.json"), &m.record(1_234), "message");
    check(
        &schema("timer-event.schema.json"),
        &serde_json::to_value(timer_of(&o)).unwrap(),
        "timer",
    );
}
