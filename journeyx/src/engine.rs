//! The pure engine: an event, the user's state and the published journeys in; the user's
//! new state, the commands to carry out and the counters to move, out. No I/O, no clock:
//! the event's own time (`ts_ms`) is the engine's "now", so processing the same event
//! again (after a crash or a rebalance) yields the same state, the same commands and the
//! same idempotency keys.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::audience::Memberships;
use crate::catalog::Catalog;
use crate::clock;
use crate::model::{Action, Condition, Journey, Node, ReEntry, TimerSpec};

/// The event a timer fire comes back as.
pub const TIMER_EVENT: &str = "journeyx.timer";
/// The loader's no-op event: re-evaluates segment entry for one journey.
pub const ENTER_EVENT: &str = "journeyx.enter";
/// The property of [`ENTER_EVENT`] holding how many times the user had entered the journey
/// when the loader read their record; the event enters only a user still at that count.
pub const ENTER_ENTRIES: &str = "entries";
/// Most edges one event may take in one journey (validation refuses cycles without a
/// wait; this bounds the work if a published graph had one anyway).
const MAX_MOVES: usize = 64;

/// An input event (the Kafka value; the key is the user id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub app_id: String,
    pub user_id: String,
    pub name: String,
    pub ts_ms: u64,
    #[serde(default)]
    pub properties: Map<String, Value>,
    /// The user's IANA time zone, if the event knows it (kept on the user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
}

/// Everything journeyx keeps about one user of one app: one record, so one read loads
/// all of the user's journeys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    #[serde(default)]
    pub properties: Map<String, Value>,
    #[serde(default)]
    pub tags: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// When messages went out (ms), for frequency caps; older than every cap is dropped.
    #[serde(default)]
    pub sends: Vec<u64>,
    /// Journey id → where the user is in it.
    #[serde(default)]
    pub journeys: BTreeMap<String, JourneyState>,
    /// The runtime's, not the engine's: per partition of the events topic, the offset of
    /// the last event applied to this record, so an event read again after a crash or a
    /// rebalance, behind later ones already applied, is not applied a second time.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub applied: BTreeMap<i32, i64>,
    /// The events topic `applied` speaks of (none in records written before it was kept:
    /// they speak of the topic being read). Another topic's offsets say nothing of this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_topic: Option<String>,
    /// The runtime's too: a hash of each of the last [`RECENT_EVENTS`] event ids applied
    /// to this record, so a copy of an event at another offset (a producer that retried)
    /// is not applied again: applied twice, it would re-enter a journey under the keys of
    /// the first entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent: Vec<u64>,
}

/// How many event ids a user's record remembers ([`User::recent`]).
pub const RECENT_EVENTS: usize = 8;

/// The hash [`User::recent`] keeps of an event id.
pub fn event_hash(event_id: &str) -> u64 {
    twox_hash::XxHash3_128::oneshot(event_id.as_bytes()) as u64
}

impl User {
    /// Whether an event of this id was among the last [`RECENT_EVENTS`] applied.
    pub fn applied_recently(&self, event_id: &str) -> bool {
        self.recent.contains(&event_hash(event_id))
    }

    /// Remembers `event_id` as applied, forgetting the oldest beyond [`RECENT_EVENTS`].
    pub fn remember(&mut self, event_id: &str) {
        self.recent.push(event_hash(event_id));
        if self.recent.len() > RECENT_EVENTS {
            let extra = self.recent.len() - RECENT_EVENTS;
            self.recent.drain(..extra);
        }
    }
}

/// A user's place in one journey.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JourneyState {
    pub version: u32,
    pub node: String,
    /// Inside (`true`), or left (exited or reached an `exit`).
    pub active: bool,
    pub entered_ms: u64,
    /// How many times the user entered.
    pub entries: u32,
    /// The node's timer, while it is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<PendingTimer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingTimer {
    /// Also the TimerDB idempotency key and the fire event's `event_id`.
    pub token: String,
    pub fire_at_ms: u64,
    /// TimerDB's id, once the runtime has set the timer (to cancel it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer_id: Option<String>,
}

/// A message for the messages topic (`sent_at_ms` is added when it is produced).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub idempotency_key: String,
    pub app_id: String,
    pub user_id: String,
    pub journey_id: String,
    pub journey_version: u32,
    pub node_id: String,
    pub channel: String,
    pub template: String,
    pub event_id: String,
}

impl Message {
    /// The record value produced to the messages topic.
    pub fn record(&self, sent_at_ms: u64) -> Value {
        serde_json::from_slice(&self.to_json(sent_at_ms)).expect("a message is JSON")
    }

    /// [`Message::record`] as the bytes produced, written straight from the fields (going
    /// through a [`Value`] first cost a map of owned strings per message).
    pub fn to_json(&self, sent_at_ms: u64) -> Vec<u8> {
        #[derive(Serialize)]
        struct Record<'a> {
            #[serde(flatten)]
            message: &'a Message,
            sent_at_ms: u64,
        }
        serde_json::to_vec(&Record {
            message: self,
            sent_at_ms,
        })
        .expect("plain fields serialize")
    }
}

/// An effect for the runtime to carry out; each is idempotent by its key.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Send(Message),
    Webhook {
        url: String,
        body: Value,
        idempotency_key: String,
        journey_id: String,
        node_id: String,
    },
    /// Set a TimerDB timer that produces `fire` back onto the events topic (on the
    /// partition the triggering event came from). `fire.event_id` is the idempotency key.
    SetTimer {
        journey_id: String,
        fire: Event,
        fire_at_ms: u64,
    },
    /// Cancel a pending timer (the user left its node).
    CancelTimer {
        journey_id: String,
        timer: PendingTimer,
    },
}

/// What moved, per (journey, version, node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Count {
    /// A user reached the node (entering the journey counts at its start node).
    Entered,
    /// A user left the journey at the node.
    Exited,
    /// A user reached a goal node.
    Converted,
    /// A send skipped by the frequency cap.
    Capped,
    /// The step could not be taken (e.g. the user's version is no longer published).
    Errors,
}

impl Count {
    /// Every kind, in order.
    pub const ALL: [Count; 5] = [
        Count::Entered,
        Count::Exited,
        Count::Converted,
        Count::Capped,
        Count::Errors,
    ];

    /// Its name in records, the API and metrics (`entered`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Count::Entered => "entered",
            Count::Exited => "exited",
            Count::Converted => "converted",
            Count::Capped => "capped",
            Count::Errors => "errors",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<Count> {
        Count::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Counted {
    pub journey_id: String,
    pub version: u32,
    pub node_id: String,
    pub count: Count,
}

/// The result of one event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub user: User,
    pub commands: Vec<Command>,
    pub counts: Vec<Counted>,
    /// Whether the user's state changed (if not, nothing needs writing).
    pub changed: bool,
}

/// Advances every journey of the event's app for this user.
pub fn step(catalog: &Catalog, user: &User, event: &Event) -> Outcome {
    step_with(catalog, user, event, &Memberships::Local)
}

/// [`step`], reading segment membership from `memberships` (an external audience's
/// answers, fetched before the step; [`Memberships::Local`] evaluates them here).
pub fn step_with(
    catalog: &Catalog,
    user: &User,
    event: &Event,
    memberships: &Memberships,
) -> Outcome {
    let mut s = Step {
        catalog,
        memberships,
        event,
        user: user.clone(),
        commands: Vec::new(),
        counts: Vec::new(),
    };
    if let Some(tz) = &event.tz
        && clock::zone(tz).is_some()
    {
        s.user.tz = Some(tz.clone());
    }
    if event.name == TIMER_EVENT {
        s.timer_fired();
    } else {
        for journey_id in catalog.journey_ids(&event.app_id) {
            s.advance(&journey_id);
        }
    }
    let horizon = catalog.longest_cap_ms(&event.app_id);
    s.user
        .sends
        .retain(|t| t.saturating_add(horizon) > event.ts_ms);
    let changed = s.user != *user;
    Outcome {
        user: s.user,
        commands: s.commands,
        counts: s.counts,
        changed,
    }
}

/// A stable 128-bit key of `parts`, as 32 hex digits.
pub fn key(parts: &[&str]) -> String {
    let mut h = twox_hash::XxHash3_128::new();
    for p in parts {
        h.write(p.as_bytes());
        h.write(&[0]);
    }
    format!("{:032x}", h.finish_128())
}

/// Whether `user` of `app` is in segment `id` (a segment not published holds nobody).
pub fn in_segment(catalog: &Catalog, app: &str, user: &User, id: &str) -> bool {
    catalog
        .segment(app, id)
        .is_some_and(|s| s.where_.matches(&user_view(user)))
}

/// The user's properties, with `tags` as a list (what segments and `user` conditions
/// test).
fn user_view(user: &User) -> Map<String, Value> {
    let mut v = user.properties.clone();
    v.insert(
        "tags".into(),
        Value::Array(user.tags.iter().cloned().map(Value::String).collect()),
    );
    v
}

struct Step<'a> {
    catalog: &'a Catalog,
    memberships: &'a Memberships,
    event: &'a Event,
    user: User,
    commands: Vec<Command>,
    counts: Vec<Counted>,
}

impl<'a> Step<'a> {
    fn count(&mut self, j: &Journey, node: &str, count: Count) {
        self.counts.push(Counted {
            journey_id: j.id.clone(),
            version: j.version,
            node_id: node.to_owned(),
            count,
        });
    }

    /// A `journeyx.timer` event: only the journey it names, and only if the user still
    /// waits at that timer (same token).
    fn timer_fired(&mut self) {
        let p = &self.event.properties;
        let (Some(jid), Some(token)) = (
            p.get("journey_id").and_then(Value::as_str),
            p.get("token").and_then(Value::as_str),
        ) else {
            return;
        };
        let waiting = self
            .user
            .journeys
            .get(jid)
            .is_some_and(|st| st.active && st.timer.as_ref().is_some_and(|t| t.token == token));
        if waiting {
            if let Some(st) = self.user.journeys.get_mut(jid) {
                st.timer = None; // fired: nothing to cancel any more
            }
            self.advance(jid);
        }
    }

    fn advance(&mut self, jid: &str) {
        let catalog: &'a Catalog = self.catalog;
        let Some(latest) = catalog.latest(&self.event.app_id, jid) else {
            return;
        };
        let state = self.user.journeys.get(jid).cloned();
        match state {
            Some(st) if st.active => {
                let Some(journey) = self.migrated(jid, &st) else {
                    self.count(latest, &st.node, Count::Errors);
                    return;
                };
                let st = self.user.journeys[jid].clone();
                if self.exits(journey) {
                    self.leave(journey, &st.node);
                    return;
                }
                if journey.re_entry == ReEntry::Always && self.enters(latest) {
                    self.cancel_timer(jid);
                    self.enter(latest);
                    return;
                }
                self.move_on(journey, true);
            }
            previous => {
                let may = match latest.re_entry {
                    ReEntry::Never => previous.is_none(),
                    ReEntry::AfterExit | ReEntry::Always => true,
                };
                if may && self.enters(latest) && !self.exits(latest) {
                    self.enter(latest);
                }
            }
        }
    }

    /// The journey version the user is on, after moving them to a newer version that
    /// maps their node (`migrate_from`); `None` if their version is gone.
    fn migrated(&mut self, jid: &str, st: &JourneyState) -> Option<&'a Journey> {
        let catalog: &'a Catalog = self.catalog;
        let latest = catalog.latest(&self.event.app_id, jid)?;
        if latest.version != st.version
            && let Some(m) = &latest.migrate_from
            && m.version == st.version
            && let Some(to) = m.nodes.get(&st.node)
        {
            let s = self.user.journeys.get_mut(jid).expect("active state");
            s.version = latest.version;
            s.node = to.clone();
            return Some(latest);
        }
        catalog.version(&self.event.app_id, jid, st.version)
    }

    fn enters(&self, j: &Journey) -> bool {
        if let Some(name) = &j.entry.event {
            return *name == self.event.name
                && j.entry
                    .where_
                    .as_ref()
                    .is_none_or(|w| w.matches(&self.event.properties));
        }
        let Some(seg) = &j.entry.segment else {
            return false;
        };
        if self.event.name == ENTER_EVENT {
            let props = &self.event.properties;
            // The loader's event for another journey enters nothing here.
            if props.get("journey_id").and_then(Value::as_str) != Some(&j.id) {
                return false;
            }
            // It was made for the user's entry count when the loader read the record: a
            // copy arriving after that entry (produced twice, or by a second load) must
            // not enter again, which would set the entry's timers under the keys of the
            // first and meet them cancelled.
            let entries = self.user.journeys.get(&j.id).map_or(0, |s| s.entries);
            if let Some(made_for) = props.get(ENTER_ENTRIES).and_then(Value::as_u64)
                && made_for != u64::from(entries)
            {
                return false;
            }
        }
        self.in_segment(seg)
    }

    fn exits(&self, j: &Journey) -> bool {
        j.exit.iter().any(|rule| {
            if let Some(name) = &rule.event {
                return *name == self.event.name
                    && rule
                        .where_
                        .as_ref()
                        .is_none_or(|w| w.matches(&self.event.properties));
            }
            rule.not_segment
                .as_ref()
                .is_some_and(|seg| !self.in_segment(seg))
        })
    }

    fn in_segment(&self, id: &str) -> bool {
        self.memberships
            .contains(self.catalog, &self.event.app_id, &self.user, id)
    }

    fn user_view(&self) -> Map<String, Value> {
        user_view(&self.user)
    }

    fn enter(&mut self, j: &Journey) {
        let entries = self.user.journeys.get(&j.id).map_or(0, |s| s.entries) + 1;
        self.user.journeys.insert(
            j.id.clone(),
            JourneyState {
                version: j.version,
                node: j.start.clone(),
                active: true,
                entered_ms: self.event.ts_ms,
                entries,
                timer: None,
            },
        );
        self.arrive(j, &j.start);
        self.move_on(j, false);
    }

    /// Takes edges from the user's node while one holds: first with this event, then
    /// (after each arrival) without it.
    fn move_on(&mut self, j: &Journey, mut with_event: bool) {
        for _ in 0..MAX_MOVES {
            let Some(st) = self.user.journeys.get(&j.id) else {
                return;
            };
            if !st.active {
                return;
            }
            let Some(node) = j.node(&st.node) else {
                self.count(j, &st.node.clone(), Count::Errors);
                return;
            };
            let timer_fired = with_event
                && self.event.name == TIMER_EVENT
                && self
                    .event
                    .properties
                    .get("journey_id")
                    .and_then(Value::as_str)
                    == Some(&j.id);
            let Some(to) = node
                .edges
                .iter()
                .find(|e| self.holds(&e.when, j, node, with_event, timer_fired))
                .map(|e| e.to.clone())
            else {
                return;
            };
            self.cancel_timer(&j.id);
            if let Some(st) = self.user.journeys.get_mut(&j.id) {
                st.node = to.clone();
            }
            self.arrive(j, &to);
            with_event = false;
        }
    }

    fn holds(
        &self,
        c: &Condition,
        j: &Journey,
        node: &Node,
        with_event: bool,
        timer_fired: bool,
    ) -> bool {
        match c {
            Condition::Always => true,
            Condition::Timer => timer_fired,
            Condition::Event { name, predicates } => {
                with_event && *name == self.event.name && predicates.matches(&self.event.properties)
            }
            Condition::Segment(s) => self.in_segment(s),
            Condition::NotSegment(s) => !self.in_segment(s),
            Condition::User(p) => p.matches(&self.user_view()),
            Condition::Split(percent) => {
                let h = key(&[&self.event.user_id, &j.id, &node.id]);
                let bucket = u128::from_str_radix(&h, 16).unwrap_or(0) % 100;
                bucket < u128::from(*percent)
            }
            Condition::Window { from, to } => {
                let m = clock::local_minutes(self.event.ts_ms, self.user.tz.as_deref());
                if from <= to {
                    (from.minutes..to.minutes).contains(&m)
                } else {
                    m >= from.minutes || m < to.minutes
                }
            }
        }
    }

    /// The user reached `node_id`: count it and run its actions.
    fn arrive(&mut self, j: &Journey, node_id: &str) {
        self.count(j, node_id, Count::Entered);
        let Some(node) = j.node(node_id) else {
            self.count(j, node_id, Count::Errors);
            return;
        };
        if node.goal {
            self.count(j, node_id, Count::Converted);
        }
        let e = self.event;
        let version = j.version.to_string();
        for (i, action) in node.actions.iter().enumerate() {
            let idem = key(&[&e.event_id, &j.id, &version, node_id, &i.to_string()]);
            match action {
                Action::Send(send) => {
                    if let Some(cap) = &j.frequency_cap {
                        let since = e.ts_ms.saturating_sub(cap.per.as_millis() as u64);
                        let recent = self.user.sends.iter().filter(|t| **t > since).count();
                        if recent >= cap.messages as usize {
                            self.count(j, node_id, Count::Capped);
                            continue;
                        }
                    }
                    self.user.sends.push(e.ts_ms);
                    self.commands.push(Command::Send(Message {
                        idempotency_key: idem,
                        app_id: e.app_id.clone(),
                        user_id: e.user_id.clone(),
                        journey_id: j.id.clone(),
                        journey_version: j.version,
                        node_id: node_id.to_owned(),
                        channel: send.channel.clone(),
                        template: send.template.clone(),
                        event_id: e.event_id.clone(),
                    }));
                }
                Action::Webhook(w) => self.commands.push(Command::Webhook {
                    url: w.url.clone(),
                    body: w.body.clone().unwrap_or(Value::Null),
                    idempotency_key: idem,
                    journey_id: j.id.clone(),
                    node_id: node_id.to_owned(),
                }),
                Action::Set(props) => {
                    for (k, v) in props {
                        self.user.properties.insert(k.clone(), v.clone());
                    }
                }
                Action::Unset(props) => {
                    for k in props {
                        self.user.properties.remove(k);
                    }
                }
                Action::Tag(t) => {
                    self.user.tags.insert(t.clone());
                }
                Action::Untag(t) => {
                    self.user.tags.remove(t);
                }
                Action::Timer(spec) => {
                    let fire_at_ms = match spec {
                        TimerSpec::After(d) => e.ts_ms + d.as_millis() as u64,
                        TimerSpec::Until { until } => {
                            clock::next_local(e.ts_ms, *until, self.user.tz.as_deref())
                        }
                    };
                    let token = key(&[&e.event_id, &j.id, &version, node_id, "timer"]);
                    let mut properties = Map::new();
                    properties.insert("journey_id".into(), j.id.clone().into());
                    properties.insert("version".into(), j.version.into());
                    properties.insert("node_id".into(), node_id.into());
                    properties.insert("token".into(), token.clone().into());
                    self.commands.push(Command::SetTimer {
                        journey_id: j.id.clone(),
                        fire_at_ms,
                        fire: Event {
                            event_id: token.clone(),
                            app_id: e.app_id.clone(),
                            user_id: e.user_id.clone(),
                            name: TIMER_EVENT.into(),
                            ts_ms: fire_at_ms,
                            properties,
                            tz: None,
                        },
                    });
                    if let Some(st) = self.user.journeys.get_mut(&j.id) {
                        st.timer = Some(PendingTimer {
                            token,
                            fire_at_ms,
                            timer_id: None,
                        });
                    }
                }
                Action::Exit => {
                    self.leave(j, node_id);
                    return;
                }
            }
        }
    }

    fn cancel_timer(&mut self, jid: &str) {
        if let Some(timer) = self.user.journeys.get_mut(jid).and_then(|s| s.timer.take()) {
            self.commands.push(Command::CancelTimer {
                journey_id: jid.to_owned(),
                timer,
            });
        }
    }

    fn leave(&mut self, j: &Journey, node_id: &str) {
        self.cancel_timer(&j.id);
        if let Some(st) = self.user.journeys.get_mut(&j.id) {
            st.active = false;
        }
        self.count(j, node_id, Count::Exited);
    }
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
