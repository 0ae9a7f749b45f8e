//! Journeys and segments as their YAML (or JSON) files describe them, and the checks a
//! file must pass before it is published: every error names the journey, the node and the
//! edge or action it is about.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::predicate::Predicates;
use crate::{Error, Result};

/// A versioned journey graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journey {
    pub id: String,
    pub version: u32,
    pub app_id: String,
    /// How a user enters: an event, or membership of a segment (checked on every event of
    /// the user, and by the loader's `journeyx.enter` events).
    pub entry: Entry,
    #[serde(default)]
    pub re_entry: ReEntry,
    /// Leave the journey from any node.
    #[serde(default)]
    pub exit: Vec<ExitRule>,
    /// At most this many messages per user over the period, across all journeys of the
    /// app (a send over the cap is skipped and counted).
    #[serde(default)]
    pub frequency_cap: Option<FrequencyCap>,
    /// The node a user enters at.
    pub start: String,
    pub nodes: Vec<Node>,
    /// Users inside `version` of this journey move to this version, at the mapped nodes.
    #[serde(default)]
    pub migrate_from: Option<Migration>,
}

/// How a user enters a journey.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The event that enters the user.
    #[serde(default)]
    pub event: Option<String>,
    /// Predicates on that event's properties.
    #[serde(default, rename = "where")]
    pub where_: Option<Predicates>,
    /// Or: being in this segment enters the user.
    #[serde(default)]
    pub segment: Option<String>,
}

/// Whether a user who entered once may enter again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReEntry {
    /// Once per user, ever.
    #[default]
    Never,
    /// Again once the user has left (exited or finished).
    AfterExit,
    /// Again even while inside: the entry event restarts the user at `start`.
    Always,
}

/// Leaves the journey from any node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitRule {
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default, rename = "where")]
    pub where_: Option<Predicates>,
    /// Leaving this segment exits the user.
    #[serde(default)]
    pub not_segment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    pub messages: u32,
    #[serde(with = "duration_text")]
    pub per: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migration {
    pub version: u32,
    /// Old node id → node id in this version. Users at an unmapped node stay on their
    /// version.
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: String,
    #[serde(default)]
    pub actions: Vec<Action>,
    #[serde(default)]
    pub edges: Vec<Edge>,
    /// Reaching this node counts as converted.
    #[serde(default)]
    pub goal: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    pub when: Condition,
    pub to: String,
}

/// What a node does when a user reaches it, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A message on the messages topic.
    Send(Send),
    /// An HTTP POST with an `Idempotency-Key` header.
    Webhook(Webhook),
    /// Sets user properties.
    Set(BTreeMap<String, Value>),
    /// Removes user properties.
    Unset(Vec<String>),
    /// Adds a tag to the user.
    Tag(String),
    /// Removes a tag from the user.
    Untag(String),
    /// Starts this node's timer (a TimerDB timer firing back as `journeyx.timer`).
    Timer(TimerSpec),
    /// Leaves the journey.
    Exit,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Send {
    pub channel: String,
    pub template: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    #[serde(default)]
    pub body: Option<Value>,
}

/// When a node's timer fires: after a duration, or at the next local time of day in the
/// user's time zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TimerSpec {
    After(#[serde(with = "duration_text")] Duration),
    Until { until: LocalTime },
}

/// A time of day, `HH:MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LocalTime {
    pub minutes: u32,
}

impl TryFrom<String> for LocalTime {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not a time of day HH:MM (00:00 to 23:59)");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 || s.len() != 5 {
            return Err(bad());
        }
        Ok(LocalTime {
            minutes: h * 60 + m,
        })
    }
}

impl From<LocalTime> for String {
    fn from(t: LocalTime) -> String {
        format!("{:02}:{:02}", t.minutes / 60, t.minutes % 60)
    }
}

/// When an edge is taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawCondition", into = "RawCondition")]
pub enum Condition {
    /// Right away (after the node's actions ran).
    Always,
    /// This node's timer fired.
    Timer,
    /// An event of this name arrived, whose properties match.
    Event {
        name: String,
        predicates: Predicates,
    },
    Segment(String),
    NotSegment(String),
    /// The user's properties (and `tags`) match.
    User(Predicates),
    /// The user falls in the first `percent` % of a deterministic per-user, per-node
    /// bucket.
    Split(u8),
    /// The user's local time is within `[from, to)` (wrapping past midnight when
    /// `from > to`).
    Window {
        from: LocalTime,
        to: LocalTime,
    },
}

/// A condition as written: `always`, `timer`, or a map with one kind of key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum RawCondition {
    Word(String),
    Map(ConditionMap),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionMap {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    where_: Option<Predicates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    segment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_segment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<Predicates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    split: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<WindowSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowSpec {
    from: LocalTime,
    to: LocalTime,
}

impl TryFrom<RawCondition> for Condition {
    type Error = String;
    fn try_from(raw: RawCondition) -> std::result::Result<Self, String> {
        match raw {
            RawCondition::Word(w) => match w.as_str() {
                "always" => Ok(Condition::Always),
                "timer" => Ok(Condition::Timer),
                other => Err(format!(
                    "unknown condition `{other}` (the words are `always` and `timer`; other \
                     conditions are maps: event, segment, not_segment, user, split, window)"
                )),
            },
            RawCondition::Map(m) => {
                let kinds = [
                    m.event.is_some(),
                    m.segment.is_some(),
                    m.not_segment.is_some(),
                    m.user.is_some(),
                    m.split.is_some(),
                    m.window.is_some(),
                ];
                match kinds.iter().filter(|k| **k).count() {
                    0 => return Err("an empty condition: give one of event, segment, not_segment, user, split, window".into()),
                    1 => {}
                    _ => return Err("a condition has one kind: event (with where), segment, not_segment, user, split or window".into()),
                }
                if m.where_.is_some() && m.event.is_none() {
                    return Err("`where` belongs to an `event` condition".into());
                }
                Ok(if let Some(name) = m.event {
                    Condition::Event {
                        name,
                        predicates: m.where_.unwrap_or_default(),
                    }
                } else if let Some(s) = m.segment {
                    Condition::Segment(s)
                } else if let Some(s) = m.not_segment {
                    Condition::NotSegment(s)
                } else if let Some(p) = m.user {
                    Condition::User(p)
                } else if let Some(p) = m.split {
                    if p > 100 {
                        return Err(format!("split: {p} is not a percentage (0 to 100)"));
                    }
                    Condition::Split(p)
                } else {
                    let w = m.window.expect("one kind is set");
                    Condition::Window {
                        from: w.from,
                        to: w.to,
                    }
                })
            }
        }
    }
}

impl From<Condition> for RawCondition {
    fn from(c: Condition) -> RawCondition {
        let mut m = ConditionMap::default();
        match c {
            Condition::Always => return RawCondition::Word("always".into()),
            Condition::Timer => return RawCondition::Word("timer".into()),
            Condition::Event { name, predicates } => {
                m.event = Some(name);
                m.where_ = (!predicates.is_empty()).then_some(predicates);
            }
            Condition::Segment(s) => m.segment = Some(s),
            Condition::NotSegment(s) => m.not_segment = Some(s),
            Condition::User(p) => m.user = Some(p),
            Condition::Split(p) => m.split = Some(p),
            Condition::Window { from, to } => m.window = Some(WindowSpec { from, to }),
        }
        RawCondition::Map(m)
    }
}

/// A named predicate over a user's properties and tags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub id: String,
    pub app_id: String,
    #[serde(rename = "where")]
    pub where_: Predicates,
}

/// Durations written as text: `2s`, `90m`, `24h`, `1h 30m`.
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        let parsed = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("`{text}` is not a duration like 2s, 90m, 24h: {e}"))
        })?;
        if parsed.is_zero() {
            return Err(serde::de::Error::custom(format!(
                "`{text}`: a duration must be longer than zero"
            )));
        }
        Ok(parsed)
    }
}

/// Reads a file: `.json` as JSON, anything else as YAML (of which JSON is a subset). The
/// text becomes a JSON value first (so an action or condition is written as a one-key map,
/// as in JSON), then the type; errors name the path to what is wrong
/// (`nodes[1] (node "reminder").actions[0]: unknown variant ...`).
fn parse_text<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> Result<T> {
    let value: Value = if name.ends_with(".json") {
        serde_json::from_str(text).map_err(|e| Error::Invalid(format!("{name}: {e}")))?
    } else {
        serde_norway::from_str(text).map_err(|e| Error::Invalid(format!("{name}: {e}")))?
    };
    let nodes = value.get("nodes").cloned();
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = node_named(&e.path().to_string(), nodes.as_ref());
        Error::Invalid(format!("{name}: {path}: {}", e.into_inner()))
    })
}

/// `nodes[1].actions[0]` becomes `nodes[1] (node "reminder").actions[0]` when that node
/// has an id: an author knows nodes by id, not by position.
fn node_named(path: &str, nodes: Option<&Value>) -> String {
    let named = path
        .strip_prefix("nodes[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(i, tail)| {
            let id = nodes?.get(i.parse::<usize>().ok()?)?.get("id")?.as_str()?;
            Some(format!("nodes[{i}] (node {id:?}){tail}"))
        });
    named.unwrap_or_else(|| path.to_owned())
}

impl Journey {
    /// Parses and checks a journey file; `name` is used in messages and picks the format.
    pub fn parse(name: &str, text: &str) -> Result<Journey> {
        let j: Journey = parse_text(name, text)?;
        j.validate()
            .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
        Ok(j)
    }

    /// The node `id`.
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Every problem of the graph, in one message (one per line).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut problems = Vec::new();
        let j = &self.id;
        if !valid_name(&self.id) {
            problems.push(format!(
                "journey id `{j}` must be 1–100 of a-z A-Z 0-9 _ - ."
            ));
        }
        if self.app_id.is_empty() {
            problems.push(format!("journey {j}: app_id is empty"));
        }
        if self.version == 0 {
            problems.push(format!("journey {j}: versions start at 1"));
        }
        match (&self.entry.event, &self.entry.segment) {
            (Some(_), Some(_)) | (None, None) => problems.push(format!(
                "journey {j}: entry needs exactly one of `event` or `segment`"
            )),
            (None, Some(_)) if self.entry.where_.is_some() => problems.push(format!(
                "journey {j}: entry `where` belongs to an entry event"
            )),
            _ => {}
        }
        for (i, rule) in self.exit.iter().enumerate() {
            if rule.event.is_some() == rule.not_segment.is_some() {
                problems.push(format!(
                    "journey {j}: exit rule {i} needs exactly one of `event` or `not_segment`"
                ));
            }
        }
        if let Some(cap) = &self.frequency_cap
            && cap.messages == 0
        {
            problems.push(format!(
                "journey {j}: frequency_cap.messages must be at least 1"
            ));
        }
        let mut ids = HashSet::new();
        for n in &self.nodes {
            if !valid_name(&n.id) {
                problems.push(format!(
                    "journey {j}: node id `{}` must be 1–100 of a-z A-Z 0-9 _ - .",
                    n.id
                ));
            }
            if !ids.insert(n.id.as_str()) {
                problems.push(format!("journey {j}: node `{}` is defined twice", n.id));
            }
        }
        if self.nodes.is_empty() {
            problems.push(format!("journey {j}: no nodes"));
        }
        if !ids.contains(self.start.as_str()) {
            problems.push(format!(
                "journey {j}: start node `{}` does not exist",
                self.start
            ));
        }
        for n in &self.nodes {
            let timers = n
                .actions
                .iter()
                .filter(|a| matches!(a, Action::Timer(_)))
                .count();
            if timers > 1 {
                problems.push(format!(
                    "journey {j}, node {}: {timers} timer actions; a node has at most one",
                    n.id
                ));
            }
            for (ai, a) in n.actions.iter().enumerate() {
                match a {
                    Action::Exit if ai + 1 != n.actions.len() => problems.push(format!(
                        "journey {j}, node {}, action {ai}: `exit` must be the node's last action",
                        n.id
                    )),
                    Action::Webhook(w) if w.url.starts_with("https://") => problems.push(format!(
                        "journey {j}, node {}, action {ai}: webhook url `{}`: journeyx posts plain \
                         http:// only; put a TLS-terminating proxy beside it and name that",
                        n.id, w.url
                    )),
                    Action::Webhook(w)
                        if !w.url.starts_with("http://")
                            || w.url.parse::<hyper::Uri>().is_err() =>
                    {
                        problems.push(format!(
                            "journey {j}, node {}, action {ai}: webhook url `{}` is not an http:// URL",
                            n.id, w.url
                        ))
                    }
                    Action::Send(s) if s.channel.is_empty() || s.template.is_empty() => problems
                        .push(format!(
                            "journey {j}, node {}, action {ai}: send needs a channel and a template",
                            n.id
                        )),
                    _ => {}
                }
            }
            let exits = n.actions.iter().any(|a| matches!(a, Action::Exit));
            if exits && !n.edges.is_empty() {
                problems.push(format!(
                    "journey {j}, node {}: the node exits, so its edges are never taken",
                    n.id
                ));
            }
            for (ei, e) in n.edges.iter().enumerate() {
                if !ids.contains(e.to.as_str()) {
                    problems.push(format!(
                        "journey {j}, node {}, edge {ei}: goes to `{}`, which does not exist",
                        n.id, e.to
                    ));
                }
                if matches!(e.when, Condition::Timer) && timers == 0 {
                    problems.push(format!(
                        "journey {j}, node {}, edge {ei}: `when: timer` but the node starts no timer",
                        n.id
                    ));
                }
            }
        }
        if let Some(cycle) = self.instant_cycle() {
            problems.push(format!(
                "journey {j}: nodes {} form a cycle without a wait (every edge on it is taken at \
                 once: always, user, segment, split or window); put an event or timer edge on it",
                cycle.join(" → ")
            ));
        }
        if let Some(m) = &self.migrate_from {
            if m.version >= self.version {
                problems.push(format!(
                    "journey {j}: migrate_from.version {} must be older than version {}",
                    m.version, self.version
                ));
            }
            for (old, new) in &m.nodes {
                if !ids.contains(new.as_str()) {
                    problems.push(format!(
                        "journey {j}: migrate_from maps `{old}` to `{new}`, which does not exist"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// A cycle of edges that can all be taken without waiting for an event or a timer
    /// (the user would loop forever within one event), as node ids.
    fn instant_cycle(&self) -> Option<Vec<String>> {
        let index: HashMap<&str, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i))
            .collect();
        let next: Vec<Vec<usize>> = self
            .nodes
            .iter()
            .map(|n| {
                if n.actions.iter().any(|a| matches!(a, Action::Exit)) {
                    return Vec::new();
                }
                n.edges
                    .iter()
                    .filter(|e| e.when.is_instant())
                    .filter_map(|e| index.get(e.to.as_str()).copied())
                    .collect()
            })
            .collect();
        // Depth-first search with colours: 0 new, 1 on the stack, 2 done.
        let mut colour = vec![0u8; self.nodes.len()];
        let mut stack: Vec<usize> = Vec::new();
        fn visit(
            v: usize,
            next: &[Vec<usize>],
            colour: &mut [u8],
            stack: &mut Vec<usize>,
        ) -> Option<Vec<usize>> {
            colour[v] = 1;
            stack.push(v);
            for &w in &next[v] {
                if colour[w] == 1 {
                    let from = stack.iter().position(|x| *x == w).expect("on the stack");
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(w);
                    return Some(cycle);
                }
                if colour[w] == 0
                    && let Some(c) = visit(w, next, colour, stack)
                {
                    return Some(c);
                }
            }
            stack.pop();
            colour[v] = 2;
            None
        }
        for v in 0..self.nodes.len() {
            if colour[v] == 0
                && let Some(c) = visit(v, &next, &mut colour, &mut stack)
            {
                return Some(c.into_iter().map(|i| self.nodes[i].id.clone()).collect());
            }
        }
        None
    }

    /// The segments this journey names (entry, exit rules, edges).
    pub fn segments(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        out.extend(self.entry.segment.as_deref());
        out.extend(self.exit.iter().filter_map(|e| e.not_segment.as_deref()));
        for n in &self.nodes {
            for e in &n.edges {
                match &e.when {
                    Condition::Segment(s) | Condition::NotSegment(s) => out.push(s),
                    _ => {}
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl Condition {
    /// Whether the condition can hold without a new event (so a chain of such edges is
    /// taken within one step).
    pub fn is_instant(&self) -> bool {
        !matches!(self, Condition::Event { .. } | Condition::Timer)
    }
}

impl Segment {
    pub fn parse(name: &str, text: &str) -> Result<Segment> {
        let s: Segment = parse_text(name, text)?;
        if !valid_name(&s.id) {
            return Err(Error::Invalid(format!(
                "{name}: segment id `{}` must be 1–100 of a-z A-Z 0-9 _ - .",
                s.id
            )));
        }
        if s.app_id.is_empty() {
            return Err(Error::Invalid(format!(
                "{name}: segment {}: app_id is empty",
                s.id
            )));
        }
        Ok(s)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped example (`journeyx/examples/onboarding.yaml`), the issue's own journey.
    const ONBOARDING: &str = include_str!("../examples/onboarding.yaml");

    #[test]
    fn the_issue_s_example_parses_as_written() {
        let j = Journey::parse("onboarding.yaml", ONBOARDING).unwrap();
        assert_eq!(j.re_entry, ReEntry::AfterExit);
        assert_eq!(
            j.frequency_cap.as_ref().unwrap().per,
            Duration::from_secs(86_400)
        );
        let welcome = j.node("welcome").unwrap();
        assert_eq!(
            welcome.actions[1],
            Action::Timer(TimerSpec::After(Duration::from_secs(2)))
        );
        assert!(
            matches!(&welcome.edges[0].when, Condition::Event { name, .. } if name == "purchased")
        );
        assert_eq!(welcome.edges[1].when, Condition::Timer);
        assert_eq!(j.node("done").unwrap().actions, vec![Action::Exit]);
        // And round-trips through JSON, which is accepted too.
        let json = serde_json::to_string(&j).unwrap();
        assert_eq!(Journey::parse("onboarding.json", &json).unwrap(), j);
    }

    fn problems(text: &str) -> String {
        match Journey::parse("j.yaml", text) {
            Err(Error::Invalid(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_graph_is_refused_naming_the_node_and_edge() {
        let e = problems(&ONBOARDING.replace("to: reminder", "to: remind"));
        assert!(
            e.contains("node welcome, edge 1: goes to `remind`, which does not exist"),
            "{e}"
        );
        let e = problems(&ONBOARDING.replace("start: welcome", "start: nowhere"));
        assert!(e.contains("start node `nowhere` does not exist"), "{e}");
        let e = problems(&ONBOARDING.replace(
            "      - send: {channel: email",
            "      - shout: {channel: email",
        ));
        assert!(e.contains("unknown variant `shout`"), "{e}");
        assert!(
            e.contains("nodes[1] (node \"reminder\").actions[0]"),
            "the node is named by its id: {e}"
        );
        let e = problems(&ONBOARDING.replace("timer: 2s", "timer: soon"));
        assert!(e.contains("welcome") || e.contains("timer"), "{e}");
        let e = problems(&ONBOARDING.replace("when: timer", "when: later"));
        assert!(e.contains("unknown condition `later`"), "{e}");
    }

    #[test]
    fn a_cycle_without_a_wait_is_refused_and_one_with_a_wait_is_not() {
        let looping = ONBOARDING.replace(
            "      - when: always\n        to: done",
            "      - when: always\n        to: welcome",
        );
        // welcome → reminder is a timer edge: the loop waits, so it is allowed.
        Journey::parse("j.yaml", &looping).unwrap();
        let instant = looping.replace(
            "      - when: timer\n        to: reminder",
            "      - when: {split: 50}\n        to: reminder",
        );
        let instant = instant.replace("      - timer: 2s\n", "");
        let e = problems(&instant);
        assert!(e.contains("welcome → reminder → welcome"), "{e}");
    }

    #[test]
    fn a_timer_edge_needs_a_timer_and_exit_ends_the_node() {
        let e = problems(&ONBOARDING.replace("      - timer: 2s\n", ""));
        assert!(
            e.contains("node welcome, edge 1: `when: timer` but the node starts no timer"),
            "{e}"
        );
        let e = problems(
            &ONBOARDING.replace("    actions: [exit]", "    actions: [exit, {tag: late}]"),
        );
        assert!(
            e.contains("node done, action 0: `exit` must be the node's last action"),
            "{e}"
        );
    }

    #[test]
    fn conditions_take_every_documented_form() {
        let j = Journey::parse(
            "j.yaml",
            r#"
id: forms
version: 2
app_id: demo
entry: {segment: new_users}
exit: [{not_segment: new_users}]
start: a
migrate_from: {version: 1, nodes: {old_a: a}}
nodes:
  - id: a
    actions: [{timer: {until: "09:00"}}, {set: {plan: pro}}, {unset: [trial]}, {tag: vip}, {webhook: {url: "http://example.invalid/x", body: {k: 1}}}]
    edges:
      - {when: {segment: s1}, to: b}
      - {when: {not_segment: s2}, to: b}
      - {when: {user: {plan: {eq: pro}}}, to: b}
      - {when: {window: {from: "21:00", to: "09:00"}}, to: b}
      - {when: timer, to: b}
  - id: b
    edges: [{when: {event: x}, to: a}]
"#,
        )
        .unwrap();
        let a = j.node("a").unwrap();
        assert_eq!(
            a.actions[0],
            Action::Timer(TimerSpec::Until {
                until: LocalTime { minutes: 540 }
            })
        );
        assert_eq!(a.edges[0].when, Condition::Segment("s1".into()));
        assert!(
            matches!(a.edges[3].when, Condition::Window { from, to } if from.minutes == 1260 && to.minutes == 540)
        );
        assert_eq!(j.segments(), vec!["new_users", "s1", "s2"]);
        let e = problems(&ONBOARDING.replace("when: always", "when: {split: 150}"));
        assert!(e.contains("150 is not a percentage"), "{e}");
        let e = problems(&ONBOARDING.replace("when: always", "when: {segment: a, split: 5}"));
        assert!(e.contains("a condition has one kind"), "{e}");
    }
}
