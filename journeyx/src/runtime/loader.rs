//! The journey loader: enters the users already in a journey's entry segment, who would
//! otherwise wait for their next event. It pages through the app's user records, and for
//! each user in the segment and not inside the journey produces the no-op event
//! `journeyx.enter` (property `journey_id`) onto the events topic, keyed by the user, at
//! most `rate` per second; the engine then enters them as for any event. After each page it
//! records the last user it went past, so a load stopped by a crash resumes there. The
//! event carries (property `entries`) how many times the user had entered the journey, and
//! its id is derived from (journey, version, user, entries): a page produced twice yields
//! the same events, and a copy that arrives after the user entered enters nobody (the
//! count moved on); a later load of a user who left meanwhile makes a new event.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::Runtime;
use crate::engine::{self, ENTER_ENTRIES, ENTER_EVENT, Event};
use crate::{Error, Result};

/// Users read per page.
const PAGE: usize = 500;
/// The highest `--rate` taken (events per second).
pub const MAX_RATE: u32 = 1_000_000;

/// Where a load stands (what `GET /api/load/{journey}` answers).
#[derive(Debug, Default, Serialize)]
pub struct Progress {
    pub journey: String,
    pub version: u32,
    pub segment: String,
    pub rate: u32,
    /// The user a resumed load started after (none when it started at the first user).
    pub resumed_after: Mutex<Option<String>>,
    /// The users this load will read, counted at its start (none until counted). Users
    /// added during the load may be read as well, so `scanned` can pass it.
    pub total: Mutex<Option<u64>>,
    /// User records read.
    pub scanned: AtomicU64,
    /// `journeyx.enter` events produced.
    pub emitted: AtomicU64,
    pub done: AtomicBool,
    /// Why the load stopped early, if it did.
    pub error: Mutex<Option<String>>,
    /// The last user gone past (recorded in the store after each page).
    pub position: Mutex<Option<String>>,
}

/// Starts loading `journey` (its latest version) unless a load of it runs already (then
/// that one's progress is returned). `from_start` forgets the recorded position.
pub async fn start(
    rt: Arc<Runtime>,
    journey: &str,
    rate: u32,
    from_start: bool,
) -> Result<Arc<Progress>> {
    if !(1..=MAX_RATE).contains(&rate) {
        return Err(Error::Invalid(format!(
            "rate {rate}: must be from 1 to {MAX_RATE} events per second"
        )));
    }
    let catalog = rt.catalog();
    let j = catalog
        .find(journey)
        .ok_or_else(|| Error::Invalid(format!("no journey {journey} is published")))?
        .clone();
    let Some(segment) = j.entry.segment.clone() else {
        return Err(Error::Invalid(format!(
            "journey {journey} is entered on an event, not a segment: there is nobody to load"
        )));
    };
    let mut loads = rt.loads.lock().expect("loads lock");
    if let Some(running) = loads.get(journey)
        && !running.done.load(Ordering::SeqCst)
    {
        return Ok(running.clone());
    }
    let progress = Arc::new(Progress {
        journey: j.id.clone(),
        version: j.version,
        segment,
        rate,
        ..Progress::default()
    });
    loads.insert(journey.to_owned(), progress.clone());
    drop(loads);
    let p = progress.clone();
    tokio::spawn(async move {
        if let Err(e) = run(&rt, &p, &j.app_id, from_start).await {
            tracing::warn!(journey = %p.journey, error = %e, "journeyx: the load stopped");
            *p.error.lock().expect("error lock") = Some(e.to_string());
        }
        p.done.store(true, Ordering::SeqCst);
    });
    Ok(progress)
}

async fn run(rt: &Runtime, p: &Progress, app: &str, from_start: bool) -> Result<()> {
    let store = rt.store();
    let after = if from_start {
        None
    } else {
        store.loader_position(&p.journey).await?
    };
    *p.resumed_after.lock().expect("resumed lock") = after.clone();
    // The count runs beside the load, so a large app's count does not delay it; a failed
    // count only leaves the progress without a total.
    let count = async {
        match store.count_users(app, after.as_deref()).await {
            Ok(n) => *p.total.lock().expect("total lock") = Some(n),
            Err(e) => {
                tracing::warn!(journey = %p.journey, error = %e, "journeyx: could not count the users to load")
            }
        }
    };
    let ((), loaded) = tokio::join!(count, pages(rt, p, app, after.clone()));
    loaded
}

/// Reads the app's users after `after` a page at a time, producing the events.
async fn pages(rt: &Runtime, p: &Progress, app: &str, mut after: Option<String>) -> Result<()> {
    let store = rt.store();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / p.rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let page = store.users(app, after.as_deref(), PAGE).await?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        let last = last.clone();
        let catalog = rt.catalog();
        for (id, user) in &page {
            p.scanned.fetch_add(1, Ordering::Relaxed);
            let state = user.journeys.get(&p.journey);
            let inside = state.is_some_and(|s| s.active);
            let entries = state.map_or(0, |s| s.entries);
            if inside
                || !rt
                    .audience()
                    .memberships(&catalog, app, id, user)
                    .await?
                    .contains(&catalog, app, user, &p.segment)
            {
                continue;
            }
            tick.tick().await;
            let mut properties = Map::new();
            properties.insert("journey_id".into(), Value::String(p.journey.clone()));
            properties.insert(ENTER_ENTRIES.into(), Value::from(entries));
            let event = Event {
                event_id: engine::key(&[
                    ENTER_EVENT,
                    &p.journey,
                    &p.version.to_string(),
                    id,
                    &entries.to_string(),
                ]),
                app_id: app.to_owned(),
                user_id: id.clone(),
                name: ENTER_EVENT.into(),
                ts_ms: super::now_ms(),
                properties,
                tz: None,
            };
            rt.produce_event(&event).await?;
            p.emitted.fetch_add(1, Ordering::Relaxed);
        }
        store.set_loader_position(&p.journey, &last).await?;
        *p.position.lock().expect("position lock") = Some(last.clone());
        after = Some(last);
    }
}

/// The progress of the last load of `journey` in this process, if any.
pub fn progress(rt: &Runtime, journey: &str) -> Option<Arc<Progress>> {
    rt.loads.lock().expect("loads lock").get(journey).cloned()
}
