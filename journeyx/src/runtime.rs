//! The runtime around the pure engine: reads events from Kafka ([`kafka`]), runs each
//! through [`engine::step`] against the user's stored record, carries
//! out the commands, then writes the record (conditional on its version), then lets the
//! offset be committed ([`offsets`]). Reprocessing an event after a crash or a rebalance
//! therefore changes nothing visible: every effect carries an idempotency key derived from
//! the event, and a user never skips or repeats a node.

pub mod http;
pub mod kafka;
pub mod loader;
pub mod offsets;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use rdkafka::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::audience::{self, Audience};
use crate::catalog::Catalog;
use crate::engine::{self, Command, Count, Event};
use crate::store::{Saved, StateStore};
use crate::{Error, Result};

/// Header carrying a message's idempotency key (also in its JSON).
pub const IDEMPOTENCY_HEADER: &str = "journeyx-idempotency-key";
/// Header of a dead-lettered event: why it was refused.
pub const DEAD_LETTER_REASON: &str = "journeyx-error";
/// Header of a dead letter whose record was cut short: the original value's length.
pub const DEAD_LETTER_TRUNCATED: &str = "journeyx-truncated-from";
/// Header of a dead letter whose key was cut short: the original key's length.
pub const DEAD_LETTER_KEY_TRUNCATED: &str = "journeyx-key-truncated-from";
/// The longest reason put in a dead letter's `journeyx-error` header (bytes).
pub const DEAD_LETTER_REASON_MAX_BYTES: usize = 4 * 1024;

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
fn cut_text(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}
/// How long a catalog read answers for an app it does not know ([`Runtime::admission`]):
/// a flood of events for unknown apps reads the catalog at most this often.
pub const CATALOG_FRESH: Duration = Duration::from_millis(200);
/// The latest `ts_ms` taken: 9999-12-31T23:59:59.999Z (the calendar's end); later is
/// dead-lettered.
pub const MAX_TS_MS: u64 = crate::clock::LAST_MS;
/// The longest `user_id`, `app_id` or `event_id` taken (bytes); longer is dead-lettered.
pub const MAX_ID_BYTES: usize = 1_024;
/// The longest value or key copied into a dead letter (bytes); the producer takes at most
/// 1,000,000, so a refused record of any size is dead-lettered, cut short.
pub const DEAD_LETTER_MAX_BYTES: usize = 256 * 1024;

/// Where the runtime reads and writes, and how.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Kafka bootstrap servers.
    pub kafka: String,
    /// Consumer group of the journeyx processes sharing the events topic.
    pub group: String,
    pub events_topic: String,
    pub messages_topic: String,
    /// Where malformed events go (with the reason in a header); `None`: counted and
    /// logged only.
    pub dead_letter_topic: Option<String>,
    /// The TimerDB node (`host:port` or URL) timers are set on.
    pub timerdb: String,
    /// Queues each process spreads its events over by user (events of one user stay in
    /// order in one queue; the queues run concurrently).
    pub queues: usize,
    /// One webhook attempt's time limit, and how many attempts.
    pub webhook_timeout: Duration,
    pub webhook_attempts: u32,
    /// An external audience service's URL ([`audience::HttpAudience`]); `None`: segments
    /// are evaluated here ([`audience::LocalAudience`]).
    pub audience: Option<String>,
    /// librdkafka's partitioner for what journeyx produces keyed by user (the loader's
    /// events, messages): the one the upstream producers of the events use, so the
    /// loader's events for a user land on that user's partition. See [`PARTITIONERS`].
    pub partitioner: String,
}

/// The partitioners journeyx can produce with (librdkafka's names): `murmur2_random` is
/// the Java client's default (and Kafka's own tools'), `consistent_random` librdkafka's
/// (CRC32), `fnv1a_random` sarama's (Go).
pub const PARTITIONERS: [&str; 7] = [
    "murmur2_random",
    "murmur2",
    "consistent_random",
    "consistent",
    "fnv1a_random",
    "fnv1a",
    "random",
];

impl Settings {
    /// The defaults, on Kafka at `kafka` and TimerDB at `timerdb`.
    pub fn new(kafka: impl Into<String>, timerdb: impl Into<String>) -> Self {
        Self {
            kafka: kafka.into(),
            group: "journeyx".into(),
            events_topic: "journeyx-events".into(),
            messages_topic: "journeyx-messages".into(),
            dead_letter_topic: Some("journeyx-dead-letters".into()),
            timerdb: timerdb.into(),
            queues: 512,
            webhook_timeout: Duration::from_secs(5),
            webhook_attempts: 4,
            audience: None,
            partitioner: "murmur2_random".into(),
        }
    }
}

/// Per (journey, version, node, what) counters.
pub type Counters = BTreeMap<CountKey, u64>;

pub use crate::store::CountKey;

/// One counter of this process: its count, the part of it already added to the store,
/// and its Prometheus handle (labels built once).
struct Tally {
    n: u64,
    flushed: u64,
    counter: metrics::Counter,
}

/// The shared part of a running journeyx process.
pub struct Runtime {
    settings: Settings,
    store: Arc<dyn StateStore>,
    catalog: RwLock<Arc<Catalog>>,
    /// When the catalog was last read (see [`Runtime::admission`]).
    catalog_read_at: Mutex<std::time::Instant>,
    producer: FutureProducer,
    timers: timerdb_client::Client,
    webhooks: webhook::Webhooks,
    /// Where segment membership comes from.
    audience: Arc<dyn Audience>,
    /// Each counter with its Prometheus handle, registered on its first use: looking a
    /// labelled counter up in the recorder allocated its labels on every event.
    /// Each holds its count since this process started, and how much of it the store's
    /// durable counters have ([`Runtime::flush_counts`]).
    counters: Mutex<BTreeMap<CountKey, Tally>>,
    /// `journeyx_events_total` and `journeyx_messages_total`, registered once.
    events_total: metrics::Counter,
    messages_total: metrics::Counter,
    /// The loads started in this process, by journey.
    loads: Mutex<HashMap<String, Arc<loader::Progress>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("settings", &self.settings)
            .finish()
    }
}

/// Tries an effect until it succeeds, pausing longer each time (up to 5 s): a store or
/// service that is down holds the user's queue, it never skips the event. An
/// [`Error::Invalid`] (the service refused the request itself) is not tried again.
async fn until_done<T, F, Fut>(what: &str, f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    f.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times(),
    )
    .when(|e| !matches!(e, Error::Invalid(_)))
    .notify(|e, pause| {
        tracing::warn!(error = %e, "journeyx: {what} failed; trying again in {pause:?}");
        metrics::counter!("journeyx_retries_total", "what" => what.to_owned()).increment(1);
    })
    .await
}

impl Runtime {
    /// Connects the producer and the TimerDB client (lazily) and reads the catalog.
    pub async fn new(settings: Settings, store: Arc<dyn StateStore>) -> Result<Arc<Self>> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &settings.kafka)
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .set("partitioner", &settings.partitioner)
            .create()
            .map_err(|e| Error::Invalid(format!("kafka producer for {}: {e}", settings.kafka)))?;
        let timers = timerdb_client::Client::connect_lazy(&settings.timerdb)
            .map_err(|e| Error::Invalid(format!("timerdb {}: {e}", settings.timerdb)))?;
        let catalog = store.catalog().await?;
        let audience: Arc<dyn Audience> = match &settings.audience {
            Some(url) => Arc::new(audience::HttpAudience::new(url, settings.webhook_timeout)?),
            None => Arc::new(audience::LocalAudience),
        };
        let rt = Arc::new(Self {
            audience,
            webhooks: webhook::Webhooks::new(settings.webhook_timeout, settings.webhook_attempts),
            settings,
            store,
            catalog: RwLock::new(Arc::new(catalog)),
            catalog_read_at: Mutex::new(std::time::Instant::now()),
            producer,
            timers,
            counters: Mutex::new(BTreeMap::new()),
            events_total: metrics::counter!("journeyx_events_total"),
            messages_total: metrics::counter!("journeyx_messages_total"),
            loads: Mutex::new(HashMap::new()),
        });
        let flushing = Arc::downgrade(&rt);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            loop {
                every.tick().await;
                let Some(rt) = flushing.upgrade() else { return };
                rt.flush_counts().await;
            }
        });
        Ok(rt)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// Where segment membership comes from.
    pub fn audience(&self) -> &Arc<dyn Audience> {
        &self.audience
    }

    /// The published journeys and segments as this process sees them.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().expect("catalog lock").clone()
    }

    /// Reads the catalog again (after a publish, here or by another process).
    pub async fn reload_catalog(&self) -> Result<()> {
        *self.catalog_read_at.lock().expect("catalog time lock") = std::time::Instant::now();
        let fresh = Arc::new(self.store.catalog().await?);
        *self.catalog.write().expect("catalog lock") = fresh;
        Ok(())
    }

    /// Adds the counts of the events processed since the last flush to the store's
    /// durable counters (every second, and at the end of `journeyx run`). A flush that
    /// fails is kept for the next one; a crash loses at most a second of counts, and
    /// events processed again after it count again: the statistics are close, not exact.
    pub async fn flush_counts(&self) {
        let deltas: Vec<(CountKey, u64)> = {
            let mut counters = self.counters.lock().expect("counters lock");
            counters
                .iter_mut()
                .filter(|(_, t)| t.n > t.flushed)
                .map(|(k, t)| {
                    let delta = t.n - t.flushed;
                    t.flushed = t.n;
                    (k.clone(), delta)
                })
                .collect()
        };
        if deltas.is_empty() {
            return;
        }
        if let Err(e) = self.store.add_counts(&deltas).await {
            tracing::warn!(error = %e, "journeyx: the counters were not saved; trying again in a second");
            let mut counters = self.counters.lock().expect("counters lock");
            for (k, delta) in deltas {
                if let Some(t) = counters.get_mut(&k) {
                    t.flushed -= delta;
                }
            }
        }
    }

    /// Journey `id`'s counters: the store's, which every process adds to, with this
    /// process's counts not flushed yet.
    pub async fn journey_counts(&self, id: &str) -> Result<Counters> {
        let mut out: Counters = self.store.counts(id).await?.into_iter().collect();
        for (k, t) in self.counters.lock().expect("counters lock").iter() {
            if k.0 == id && t.n > t.flushed {
                *out.entry(k.clone()).or_insert(0) += t.n - t.flushed;
            }
        }
        Ok(out)
    }

    /// The counters moved since this process started.
    pub fn counters(&self) -> Counters {
        let counters = self.counters.lock().expect("counters lock");
        counters.iter().map(|(k, t)| (k.clone(), t.n)).collect()
    }

    /// Why `event` cannot be processed at all (it goes to the dead-letter topic), if so.
    pub fn refusal(&self, event: &Event) -> Option<String> {
        for (field, value) in [
            ("user_id", &event.user_id),
            ("app_id", &event.app_id),
            ("event_id", &event.event_id),
        ] {
            // The ids make store keys (fjall takes at most 64 KiB, Cassandra's partition
            // keys as much) and TimerDB idempotency keys: a longer one would fail at the
            // store on every retry and hold its queue.
            if value.len() > MAX_ID_BYTES {
                return Some(format!(
                    "the event's {field} is {} bytes long; at most {MAX_ID_BYTES}",
                    value.len()
                ));
            }
        }
        if event.ts_ms > MAX_TS_MS {
            return Some(format!(
                "the event's ts_ms {} is after 9999-12-31 (at most {MAX_TS_MS})",
                event.ts_ms
            ));
        }
        if event.user_id.is_empty() {
            return Some("the event has no user_id".into());
        }
        if event.event_id.is_empty() {
            return Some("the event has no event_id".into());
        }
        if self.catalog().journey_ids(&event.app_id).is_empty() {
            return Some(format!(
                "no journey is published for app_id {:?}",
                event.app_id
            ));
        }
        None
    }

    /// [`Runtime::refusal`], except that for an app no journey of this process's catalog
    /// names, the catalog is read again first (unless it was read in the last
    /// [`CATALOG_FRESH`]): a journey published through another process is otherwise seen
    /// here only at the next periodic reload (5 s), and its app's events went meanwhile
    /// to the dead-letter topic.
    pub async fn admission(&self, event: &Event) -> Option<String> {
        let refused = self.refusal(event)?;
        if !self.catalog().journey_ids(&event.app_id).is_empty() {
            return Some(refused);
        }
        let stale = self
            .catalog_read_at
            .lock()
            .expect("catalog time lock")
            .elapsed()
            >= CATALOG_FRESH;
        if stale && let Err(e) = self.reload_catalog().await {
            tracing::warn!(error = %e, "journeyx: could not read the catalog again");
        }
        self.refusal(event)
    }

    /// Processes one event that arrived at `offset` of `partition` of the events topic:
    /// the step, its effects, then the user's record. Returns when all of it is durable; a
    /// record saved meanwhile by another process (a rebalance) makes it start over from a
    /// fresh read (the effects repeat with the same keys). An event the record shows as
    /// applied already (read again after a crash or a rebalance, behind later ones) is
    /// skipped: applying it again on a record that moved on could re-enter a journey.
    pub async fn handle(&self, partition: i32, offset: i64, event: &Event) {
        self.events_total.increment(1);
        loop {
            let read = match until_done("loading a user", || {
                self.store.load_user(&event.app_id, &event.user_id)
            })
            .await
            {
                Ok(read) => read,
                Err(e) => {
                    // An unreadable record: the event cannot be applied to it.
                    tracing::error!(app = %event.app_id, user = %event.user_id, error = %e, "journeyx: skipping an event");
                    metrics::counter!("journeyx_event_errors_total").increment(1);
                    return;
                }
            };
            let topic = &self.settings.events_topic;
            let same_topic = read.user.applied_topic.as_ref().is_none_or(|t| t == topic);
            if same_topic
                && read
                    .user
                    .applied
                    .get(&partition)
                    .is_some_and(|&done| done >= offset)
                || read.user.applied_recently(&event.event_id)
            {
                metrics::counter!("journeyx_events_applied_before_total").increment(1);
                return;
            }
            let catalog = self.catalog();
            let memberships = match until_done("asking the audience", || {
                self.audience
                    .memberships(&catalog, &event.app_id, &event.user_id, &read.user)
            })
            .await
            {
                Ok(m) => m,
                Err(e) => {
                    // Refused for good (a request it cannot take): the event cannot be applied.
                    tracing::error!(app = %event.app_id, user = %event.user_id, error = %e, "journeyx: skipping an event");
                    metrics::counter!("journeyx_event_errors_total").increment(1);
                    return;
                }
            };
            let mut outcome = engine::step_with(&catalog, &read.user, event, &memberships);
            // A user with a record records every event applied to it; a user without one
            // gets one only once an event changes something.
            let mut changed = outcome.changed || read.version > 0;
            if !same_topic {
                outcome.user.applied.clear();
            }
            if !same_topic || outcome.user.applied_topic.is_none() {
                outcome.user.applied_topic = Some(topic.clone());
            }
            outcome.user.applied.insert(partition, offset);
            // A loader event is not remembered: its count (`entries`) already keeps a copy
            // from entering twice, and one that entered nobody (a catalog not yet reloaded,
            // an audience that said no) must stay free to enter at the next load.
            if event.name != engine::ENTER_EVENT {
                outcome.user.remember(&event.event_id);
            }
            // The event's messages go out together, in order (produced in the order of
            // the commands, so one user's messages keep it on their partition).
            let messages = outcome.commands.iter().filter_map(|c| match c {
                Command::Send(m) => Some(self.send(m)),
                _ => None,
            });
            futures::future::join_all(messages).await;
            // The other effects: each journey's in order (a cancel may need the id of a
            // timer its journey set just now), the journeys side by side.
            let mut per_journey: Vec<(&str, Vec<&Command>)> = Vec::new();
            for command in &outcome.commands {
                let journey = match command {
                    Command::Send(_) => continue,
                    Command::Webhook { journey_id, .. }
                    | Command::SetTimer { journey_id, .. }
                    | Command::CancelTimer { journey_id, .. } => journey_id.as_str(),
                };
                match per_journey.iter_mut().find(|(j, _)| *j == journey) {
                    Some((_, commands)) => commands.push(command),
                    None => per_journey.push((journey, vec![command])),
                }
            }
            let runs = per_journey.into_iter().map(|(_, commands)| async move {
                let mut set_now = HashMap::new();
                let mut timers = Vec::new();
                for command in commands {
                    timers.extend(self.execute(partition, command, &mut set_now).await);
                }
                timers
            });
            for (journey, token, id) in futures::future::join_all(runs).await.concat() {
                let pending = outcome
                    .user
                    .journeys
                    .get_mut(&journey)
                    .and_then(|s| s.timer.as_mut())
                    .filter(|t| t.token == token);
                if let Some(t) = pending
                    && t.timer_id.as_deref() != Some(id.as_str())
                {
                    t.timer_id = Some(id);
                    changed = true;
                }
            }
            if changed {
                let saved = until_done("saving a user", || {
                    self.store
                        .save_user(&event.app_id, &event.user_id, read.version, &outcome.user)
                })
                .await;
                let saved = match saved {
                    Ok(saved) => saved,
                    Err(e) => {
                        tracing::error!(app = %event.app_id, user = %event.user_id, error = %e, "journeyx: a user's record could not be saved");
                        metrics::counter!("journeyx_event_errors_total").increment(1);
                        return;
                    }
                };
                if saved == Saved::Conflict {
                    metrics::counter!("journeyx_state_conflicts_total").increment(1);
                    continue;
                }
            }
            let mut counters = self.counters.lock().expect("counters lock");
            for c in outcome.counts {
                let key = (c.journey_id, c.version, c.node_id, c.count);
                if let Some(t) = counters.get_mut(&key) {
                    t.n += 1;
                    t.counter.increment(1);
                    continue;
                }
                let counter = metrics::counter!(
                    "journeyx_node_total",
                    "journey" => key.0.clone(),
                    "version" => key.1.to_string(),
                    "node" => key.2.clone(),
                    "count" => count_name(key.3),
                );
                counter.increment(1);
                counters.insert(
                    key,
                    Tally {
                        n: 1,
                        flushed: 0,
                        counter,
                    },
                );
            }
            return;
        }
    }

    /// Carries out one command other than a send; for a timer set, `(journey, token, id)`,
    /// for the caller to record on the user's pending timer. `set_now` keeps the ids of
    /// timers its journey set for this event (token → id), so a timer set and left within
    /// one event is cancelled too.
    async fn execute(
        &self,
        partition: i32,
        command: &Command,
        set_now: &mut HashMap<String, String>,
    ) -> Option<(String, String, String)> {
        let failed = |what: &str, e: Error| {
            tracing::error!(error = %e, "journeyx: {what} was refused; going on without it");
            metrics::counter!("journeyx_effect_errors_total", "what" => what.to_owned())
                .increment(1);
        };
        match command {
            // Sent already, with the event's other messages (`handle`).
            Command::Send(_) => None,
            Command::Webhook {
                url,
                body,
                idempotency_key,
                journey_id,
                node_id,
            } => {
                if let Err(e) = self.webhooks.post(url, body, idempotency_key).await {
                    tracing::warn!(journey = %journey_id, node = %node_id, error = %e, "journeyx: webhook gave up");
                    metrics::counter!("journeyx_webhook_failures_total", "journey" => journey_id.clone())
                        .increment(1);
                }
                None
            }
            Command::SetTimer {
                journey_id,
                fire,
                fire_at_ms,
            } => {
                let payload = serde_json::to_vec(fire).expect("events serialize");
                let id = until_done("setting a timer", || {
                    let mut client = self.timers.clone();
                    let timer = timerdb_client::NewTimer::new(
                        *fire_at_ms,
                        &self.settings.events_topic,
                        partition,
                    )
                    .key(fire.user_id.clone().into_bytes())
                    .payload(payload.clone())
                    .idempotency_key(fire.event_id.clone());
                    async move { client.set_timeout(timer).await.map_err(set_timer_error) }
                })
                .await;
                let id = match id {
                    Ok(id) => id,
                    Err(e) => {
                        failed("a timer", e);
                        return None;
                    }
                };
                set_now.insert(fire.event_id.clone(), id.clone());
                Some((journey_id.clone(), fire.event_id.clone(), id))
            }
            Command::CancelTimer { timer, .. } => {
                let Some(id) = timer
                    .timer_id
                    .as_ref()
                    .or_else(|| set_now.get(&timer.token))
                else {
                    // Never set: its fire, should one come, no longer matches the state.
                    return None;
                };
                let cancelled = until_done("cancelling a timer", || {
                    let mut client = self.timers.clone();
                    let id = id.clone();
                    async move {
                        match client.cancel(&id).await {
                            Ok(_) => Ok(()),
                            // Fired already, or cleaned up: its fire is ignored.
                            Err(timerdb_client::Error::Status(s))
                                if matches!(
                                    s.code(),
                                    tonic::Code::NotFound | tonic::Code::FailedPrecondition
                                ) =>
                            {
                                Ok(())
                            }
                            Err(e) => Err(timerdb_error(e)),
                        }
                    }
                })
                .await;
                if let Err(e) = cancelled {
                    failed("a timer's cancel", e);
                }
                None
            }
        }
    }

    /// Produces one message to the messages topic, its idempotency key in the header.
    async fn send(&self, message: &engine::Message) {
        let value = message.to_json(now_ms());
        let sent = self
            .produce(
                "producing a message",
                &self.settings.messages_topic,
                Some(message.user_id.as_bytes()),
                Some(&value),
                &[(IDEMPOTENCY_HEADER, message.idempotency_key.as_bytes())],
            )
            .await;
        match sent {
            Ok(()) => self.messages_total.increment(1),
            Err(e) => {
                tracing::error!(error = %e, "journeyx: a message was refused; going on without it");
                metrics::counter!("journeyx_effect_errors_total", "what" => "a message")
                    .increment(1);
            }
        }
    }

    /// Produces `event` onto the events topic, keyed by its user (so onto the partition of
    /// the user's other events).
    pub async fn produce_event(&self, event: &Event) -> Result<()> {
        let value = serde_json::to_vec(event).expect("events serialize");
        self.produce(
            "producing an event",
            &self.settings.events_topic,
            Some(event.user_id.as_bytes()),
            Some(&value),
            &[],
        )
        .await
    }

    /// Produces one record, tried until Kafka takes it.
    async fn produce(
        &self,
        what: &str,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<()> {
        until_done(what, || async {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic);
            if !headers.is_empty() {
                let mut owned = OwnedHeaders::new_with_capacity(headers.len());
                for (name, value) in headers {
                    owned = owned.insert(Header {
                        key: name,
                        value: Some(*value),
                    });
                }
                record = record.headers(owned);
            }
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            self.producer
                .send(record, Duration::from_secs(30))
                .await
                .map(|_| ())
                .map_err(|(e, _)| match e.rdkafka_error_code() {
                    // The same record is refused again on every try: giving up is the only
                    // way on for the records behind it.
                    Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                        Error::Invalid(format!("kafka: {e}; not tried again"))
                    }
                    _ => Error::Store(format!("kafka: {e}")),
                })
        })
        .await
    }

    /// Sends a refused event to the dead-letter topic (if one is set), with the reason.
    pub async fn dead_letter<'a>(
        &self,
        key: Option<&'a [u8]>,
        payload: Option<&'a [u8]>,
        reason: &str,
    ) {
        metrics::counter!("journeyx_dead_letters_total").increment(1);
        tracing::warn!(reason, "journeyx: event refused");
        let Some(topic) = &self.settings.dead_letter_topic else {
            return;
        };
        // A record too large for the producer would be refused on every retry and hold
        // the consumer: its value and key go out cut short, each with its original length,
        // and the reason (a parse error may quote the whole value) cut to 4 KiB. A dead
        // letter refused as too large all the same is given up (`produce`).
        let cut = |b: &'a [u8]| &b[..b.len().min(DEAD_LETTER_MAX_BYTES)];
        let (long_value, long_key) = (
            payload.map_or(0, <[u8]>::len).to_string(),
            key.map_or(0, <[u8]>::len).to_string(),
        );
        let reason = cut_text(reason, DEAD_LETTER_REASON_MAX_BYTES);
        let mut headers = vec![(DEAD_LETTER_REASON, reason.as_bytes())];
        if payload.is_some_and(|p| p.len() > DEAD_LETTER_MAX_BYTES) {
            headers.push((DEAD_LETTER_TRUNCATED, long_value.as_bytes()));
        }
        if key.is_some_and(|k| k.len() > DEAD_LETTER_MAX_BYTES) {
            headers.push((DEAD_LETTER_KEY_TRUNCATED, long_key.as_bytes()));
        }
        let sent = self
            .produce(
                "dead-lettering an event",
                topic,
                key.map(cut),
                payload.map(cut),
                &headers,
            )
            .await;
        if let Err(e) = sent {
            tracing::error!(error = %e, "journeyx: an event could not be dead-lettered");
        }
    }
}

/// A TimerDB error as journeyx's: a refusal of the request itself is [`Error::Invalid`]
/// (not tried again), anything else may pass.
fn timerdb_error(e: timerdb_client::Error) -> Error {
    match &e {
        timerdb_client::Error::Status(s)
            if matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::OutOfRange
                    | tonic::Code::PermissionDenied
            ) =>
        {
            Error::Invalid(format!("timerdb: {e}"))
        }
        _ => Error::Store(format!("timerdb: {e}")),
    }
}

/// A `SetTimeout` error as journeyx's. As [`timerdb_error`], except `FAILED_PRECONDITION`
/// is tried again: the timer goes to the partition its event arrived on, so TimerDB saying
/// that partition (or the topic) does not exist is its partition-count cache, which lives
/// 30 s, speaking from before partitions were added. Given up, the timer would leave the
/// user waiting at its node for ever.
fn set_timer_error(e: timerdb_client::Error) -> Error {
    match &e {
        timerdb_client::Error::Status(s) if s.code() == tonic::Code::FailedPrecondition => {
            Error::Store(format!("timerdb: {e}"))
        }
        _ => timerdb_error(e),
    }
}

/// The label of a counter.
pub fn count_name(c: Count) -> &'static str {
    c.as_str()
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::catalog::Catalog;
    use crate::engine::User;
    use crate::model::{Journey, Segment};
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{Saved, Versioned};

    /// A timer TimerDB says it cannot deliver yet is tried again; a malformed one is not.
    #[test]
    fn a_set_timer_refused_for_a_missing_partition_is_tried_again() {
        let status = |code, m: &str| timerdb_client::Error::from(tonic::Status::new(code, m));
        let e = set_timer_error(status(
            tonic::Code::FailedPrecondition,
            "Kafka topic \"e\" has 1 partitions (0..=0); partition 1 does not exist",
        ));
        assert!(matches!(e, Error::Store(_)), "{e:?}");
        let e = set_timer_error(status(tonic::Code::InvalidArgument, "bad key"));
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        let e = set_timer_error(status(tonic::Code::Unavailable, "down"));
        assert!(matches!(e, Error::Store(_)), "{e:?}");
    }

    /// Event `go` of app `demo`'s `user`, at 1 s after the epoch.
    fn go(id: &str, user: &str) -> Event {
        Event {
            event_id: id.into(),
            app_id: "demo".into(),
            user_id: user.into(),
            name: "go".into(),
            ts_ms: 1_000,
            properties: Default::default(),
            tz: None,
        }
    }

    /// An embedded store in a scratch directory (kept while the directory lives) with
    /// the journey `yaml` published.
    async fn store_with(yaml: &str) -> (tempfile::TempDir, Arc<EmbeddedStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
        let j = Journey::parse("t.yaml", yaml).unwrap();
        store.publish_journey(&j).await.unwrap();
        (dir, store)
    }

    /// Publishes the segment `vips` of app `demo`: users tagged `vip`.
    async fn publish_vips(store: &impl StateStore) {
        let s = Segment::parse(
            "s.yaml",
            "{id: vips, app_id: demo, where: {tags: {contains: vip}}}",
        )
        .unwrap();
        store.publish_segment(&s).await.unwrap();
    }

    /// The embedded store, whose `add_counts` and `count_users` fail while `failing` is
    /// set.
    struct Flaky {
        inner: EmbeddedStore,
        failing: AtomicBool,
    }

    #[async_trait]
    impl StateStore for Flaky {
        async fn load_user(&self, app: &str, user: &str) -> Result<Versioned> {
            self.inner.load_user(app, user).await
        }
        async fn save_user(&self, app: &str, user: &str, v: u64, r: &User) -> Result<Saved> {
            self.inner.save_user(app, user, v, r).await
        }
        async fn publish_journey(&self, j: &Journey) -> Result<bool> {
            self.inner.publish_journey(j).await
        }
        async fn publish_segment(&self, s: &Segment) -> Result<bool> {
            self.inner.publish_segment(s).await
        }
        async fn catalog(&self) -> Result<Catalog> {
            self.inner.catalog().await
        }
        async fn users(
            &self,
            app: &str,
            after: Option<&str>,
            n: usize,
        ) -> Result<Vec<(String, User)>> {
            self.inner.users(app, after, n).await
        }
        async fn count_users(&self, app: &str, after: Option<&str>) -> Result<u64> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::Store("count_users: failing on purpose".into()));
            }
            self.inner.count_users(app, after).await
        }
        async fn loader_position(&self, j: &str) -> Result<Option<String>> {
            self.inner.loader_position(j).await
        }
        async fn set_loader_position(&self, j: &str, u: &str) -> Result<()> {
            self.inner.set_loader_position(j, u).await
        }
        async fn add_counts(&self, deltas: &[(CountKey, u64)]) -> Result<()> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::Store("add_counts: failing on purpose".into()));
            }
            self.inner.add_counts(deltas).await
        }
        async fn counts(&self, journey: &str) -> Result<Vec<(CountKey, u64)>> {
            self.inner.counts(journey).await
        }
    }

    /// A flush whose store write fails loses nothing and counts nothing twice: the counts
    /// stay visible (as not yet flushed) and the next flush adds each exactly once.
    #[tokio::test]
    async fn a_failed_flush_is_kept_for_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky {
            inner: EmbeddedStore::open(dir.path()).await.unwrap(),
            failing: AtomicBool::new(true),
        });
        let j = Journey::parse(
            "t.yaml",
            "{id: t, version: 1, app_id: demo, entry: {event: go}, start: a, \
             nodes: [{id: a, actions: [{tag: seen}, exit]}]}",
        )
        .unwrap();
        store.publish_journey(&j).await.unwrap();
        // No Kafka or TimerDB is reached: the journey sends nothing and sets no timer.
        let rt = Runtime::new(Settings::new("127.0.0.1:9", "127.0.0.1:9"), store.clone())
            .await
            .unwrap();
        for (n, user) in ["u1", "u2", "u3"].iter().enumerate() {
            let event = go(&format!("e{n}"), user);
            rt.handle(0, n as i64, &event).await;
        }
        let entered = |c: &Counters| {
            c.get(&("t".to_owned(), 1, "a".to_owned(), Count::Entered))
                .copied()
        };
        rt.flush_counts().await;
        assert!(
            store.counts("t").await.unwrap().is_empty(),
            "the flush failed"
        );
        assert_eq!(entered(&rt.journey_counts("t").await.unwrap()), Some(3));
        store.failing.store(false, Ordering::SeqCst);
        rt.flush_counts().await;
        rt.flush_counts().await;
        let stored: Counters = store.counts("t").await.unwrap().into_iter().collect();
        assert_eq!(entered(&stored), Some(3), "{stored:?}");
        assert_eq!(entered(&rt.journey_counts("t").await.unwrap()), Some(3));
    }

    /// Events journeyx cannot process are refused with the field named, before any
    /// store call: an id too long for a store key, a time past the calendar's end. A
    /// load at a rate of 0 or over a million a second is refused with the bounds.
    #[tokio::test]
    async fn bad_events_and_rates_are_refused_naming_what_is_wrong() {
        let (_dir, store) = store_with(
            "{id: t, version: 1, app_id: demo, entry: {event: go}, start: a, \
             nodes: [{id: a, actions: [exit]}]}",
        )
        .await;
        let rt = Runtime::new(Settings::new("127.0.0.1:9", "127.0.0.1:9"), store.clone())
            .await
            .unwrap();
        let good = go("e1", "u1");
        assert_eq!(rt.refusal(&good), None);
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let cases = [
            (
                Event {
                    user_id: long.clone(),
                    ..good.clone()
                },
                "the event's user_id is 1025 bytes long; at most 1024",
            ),
            (
                Event {
                    event_id: long.clone(),
                    ..good.clone()
                },
                "the event's event_id is 1025 bytes long",
            ),
            (
                Event {
                    app_id: long,
                    ..good.clone()
                },
                "the event's app_id is 1025 bytes long",
            ),
            (
                Event {
                    ts_ms: u64::MAX,
                    ..good.clone()
                },
                "is after 9999-12-31",
            ),
        ];
        for (event, why) in cases {
            let said = rt.refusal(&event).unwrap_or_default();
            assert!(said.contains(why), "{why:?} in {said:?}");
        }
        for rate in [0, MAX_RATE_PLUS_ONE] {
            let e = super::loader::start(rt.clone(), "t", rate, false)
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("must be from 1 to 1000000"), "{rate}: {e}");
        }
    }
    const MAX_RATE_PLUS_ONE: u32 = super::loader::MAX_RATE + 1;

    /// A load whose count of users fails still reads every user, records its place and
    /// ends without an error: only its progress has no total.
    #[tokio::test]
    async fn a_load_whose_count_fails_still_runs_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky {
            inner: EmbeddedStore::open(dir.path()).await.unwrap(),
            failing: AtomicBool::new(true),
        });
        publish_vips(store.as_ref()).await;
        let j = Journey::parse(
            "t.yaml",
            "{id: t, version: 1, app_id: demo, entry: {segment: vips}, start: a, \
             nodes: [{id: a, actions: [exit]}]}",
        )
        .unwrap();
        store.publish_journey(&j).await.unwrap();
        // Nobody is in the segment, so the load produces nothing (no Kafka is reached).
        for u in ["a", "b", "c"] {
            store
                .save_user("demo", u, 0, &User::default())
                .await
                .unwrap();
        }
        let rt = Runtime::new(Settings::new("127.0.0.1:9", "127.0.0.1:9"), store.clone())
            .await
            .unwrap();
        let p = super::loader::start(rt, "t", 1_000, false).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !p.done.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "the load never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*p.error.lock().unwrap(), None);
        assert_eq!(*p.total.lock().unwrap(), None, "the count failed");
        assert_eq!(p.scanned.load(Ordering::SeqCst), 3);
        assert_eq!(
            store.loader_position("t").await.unwrap().as_deref(),
            Some("c")
        );
    }

    /// A loader event that entered nobody (the journey not yet in this process's
    /// catalog) enters the user when the next load sends it again: it is not skipped as
    /// a copy, as the last 8 event ids are.
    #[tokio::test]
    async fn a_loader_event_that_entered_nobody_enters_at_the_next_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
        publish_vips(store.as_ref()).await;
        let mut vip = User::default();
        vip.tags.insert("vip".into());
        store.save_user("demo", "u1", 0, &vip).await.unwrap();
        let rt = Runtime::new(Settings::new("127.0.0.1:9", "127.0.0.1:9"), store.clone())
            .await
            .unwrap();
        // Published after this process read its catalog.
        let j = Journey::parse(
            "t.yaml",
            "{id: t, version: 1, app_id: demo, entry: {segment: vips}, start: a, \
             nodes: [{id: a, actions: [{tag: welcomed}, exit]}]}",
        )
        .unwrap();
        store.publish_journey(&j).await.unwrap();
        let mut properties = serde_json::Map::new();
        properties.insert("journey_id".into(), "t".into());
        properties.insert(engine::ENTER_ENTRIES.into(), 0.into());
        let load = Event {
            event_id: "l-0".into(),
            app_id: "demo".into(),
            user_id: "u1".into(),
            name: engine::ENTER_EVENT.into(),
            ts_ms: 1_000,
            properties,
            tz: None,
        };
        rt.handle(0, 10, &load).await;
        let user = || async { store.load_user("demo", "u1").await.unwrap().user };
        assert!(user().await.journeys.is_empty(), "not in the catalog yet");
        rt.reload_catalog().await.unwrap();
        rt.handle(0, 20, &load).await;
        let u = user().await;
        assert_eq!(u.journeys["t"].entries, 1, "{u:?}");
        assert!(u.tags.contains("welcomed"));
    }

    #[test]
    fn a_reason_is_cut_on_a_character_boundary() {
        assert_eq!(cut_text("short", 10), "short");
        let long = "é".repeat(3_000);
        let cut = cut_text(&long, 4_096);
        assert!(cut.len() <= 4_096 && cut.ends_with('…'), "{}", cut.len());
    }

    /// An event for an app whose first journey was published through another process
    /// (straight to the store here) since this one read its catalog is taken, not
    /// dead-lettered: the catalog is read again first. An app nobody published stays
    /// refused.
    #[tokio::test]
    async fn an_app_published_elsewhere_is_found_before_its_events_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
        let rt = Runtime::new(Settings::new("127.0.0.1:9", "127.0.0.1:9"), store.clone())
            .await
            .unwrap();
        let e = go("e1", "u1");
        assert!(
            rt.admission(&e)
                .await
                .is_some_and(|r| r.contains("no journey"))
        );
        let j = Journey::parse(
            "t.yaml",
            "{id: t, version: 1, app_id: demo, entry: {event: go}, start: a, \
             nodes: [{id: a, actions: [exit]}]}",
        )
        .unwrap();
        store.publish_journey(&j).await.unwrap();
        tokio::time::sleep(CATALOG_FRESH).await;
        assert_eq!(rt.admission(&e).await, None);
        let other = Event {
            app_id: "nobody".into(),
            ..e
        };
        assert!(rt.admission(&other).await.is_some());
    }

    /// `applied` speaks of one events topic: read from another topic (a new
    /// `--events-topic`), an event at an offset below the recorded one is applied, where
    /// before it was skipped as applied. A copy of an event (its id among the record's
    /// recent ones) is skipped, whatever its offset.
    #[tokio::test]
    async fn offsets_of_another_topic_do_not_skip_events() {
        let (_dir, store) = store_with(
            "{id: t, version: 1, app_id: demo, entry: {event: go}, re_entry: always, \
             start: a, nodes: [{id: a, actions: [exit]}]}",
        )
        .await;
        let event = |id: &str| go(id, "u1");
        let on = |topic: &str| {
            let mut s = Settings::new("127.0.0.1:9", "127.0.0.1:9");
            s.events_topic = topic.into();
            Runtime::new(s, store.clone())
        };
        let entries = || async {
            let u = store.load_user("demo", "u1").await.unwrap().user;
            (u.journeys["t"].entries, u.applied_topic.clone(), u.applied)
        };
        // No Kafka or TimerDB is reached: the journey sends nothing and sets no timer.
        let old = on("old").await.unwrap();
        old.handle(0, 100, &event("e1")).await;
        old.handle(0, 101, &event("e1")).await;
        assert_eq!(
            entries().await,
            (1, Some("old".into()), [(0, 100)].into()),
            "the copy at offset 101 is skipped"
        );
        old.handle(0, 50, &event("e2")).await;
        assert_eq!(
            entries().await.0,
            1,
            "offset 50 of the same topic: applied before"
        );
        let new = on("new").await.unwrap();
        new.handle(0, 5, &event("e3")).await;
        assert_eq!(entries().await, (2, Some("new".into()), [(0, 5)].into()));
        new.handle(0, 5, &event("e4")).await;
        assert_eq!(
            entries().await.0,
            2,
            "offset 5 of the new topic: applied before"
        );
    }

    /// One event entering five journeys, each calling a webhook that takes 300 ms to
    /// answer: the five calls are under way at once, not one after another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_journeys_an_event_advances_run_their_effects_side_by_side() {
        use std::sync::atomic::AtomicUsize;
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post({
                let (now, most) = (now.clone(), most.clone());
                move || async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    axum::http::StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
        for k in 0..5 {
            let j = Journey::parse(
                "w.yaml",
                &format!(
                    "{{id: w{k}, version: 1, app_id: demo, entry: {{event: go}}, start: a, \
                     nodes: [{{id: a, actions: [{{webhook: {{url: 'http://{addr}/hook'}}}}, exit]}}]}}"
                ),
            )
            .unwrap();
            store.publish_journey(&j).await.unwrap();
        }
        // No Kafka or TimerDB is reached: the journeys send nothing and set no timer.
        let rt = Runtime::new(Settings::new("127.0.0.1:9", "127.0.0.1:9"), store.clone())
            .await
            .unwrap();
        let event = go("e1", "u1");
        rt.handle(0, 0, &event).await;
        assert_eq!(
            most.load(Ordering::SeqCst),
            5,
            "the five journeys' webhooks were called one at a time"
        );
        let user = store.load_user("demo", "u1").await.unwrap().user;
        assert_eq!(user.journeys.len(), 5, "{user:?}");
    }
}
