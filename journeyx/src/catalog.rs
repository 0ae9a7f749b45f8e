//! The published journeys (every version) and segments, by app: what the engine reads.

use std::collections::BTreeMap;

use crate::model::{Journey, Segment};
use crate::{Error, Result};

/// Every published journey version and segment.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// app → journey id → version → journey.
    journeys: BTreeMap<String, BTreeMap<String, BTreeMap<u32, Journey>>>,
    /// app → segment id → segment.
    segments: BTreeMap<String, BTreeMap<String, Segment>>,
}

impl Catalog {
    /// The catalog a store holds: `segments` first, then every journey version after its
    /// predecessors (migrations are checked against them), whatever order they were read in.
    pub fn from_stored(segments: Vec<Segment>, mut journeys: Vec<Journey>) -> Result<Catalog> {
        let mut catalog = Catalog::default();
        for s in segments {
            catalog.publish_segment(s);
        }
        journeys.sort_by(|a, b| (&a.app_id, &a.id, a.version).cmp(&(&b.app_id, &b.id, b.version)));
        for j in journeys {
            catalog.publish(j)?;
        }
        Ok(catalog)
    }

    /// Adds a journey version. A version is immutable once published: publishing the same
    /// version again with other content is refused, the same content is a no-op. The
    /// segments it names must be published already.
    pub fn publish(&mut self, j: Journey) -> Result<bool> {
        j.validate()
            .map_err(|e| Error::Invalid(e.replace('\n', "; ")))?;
        for s in j.segments() {
            if self.segment(&j.app_id, s).is_none() {
                return Err(Error::Invalid(format!(
                    "journey {} names segment `{s}`, which app {} has not published",
                    j.id, j.app_id
                )));
            }
        }
        let versions = self
            .journeys
            .entry(j.app_id.clone())
            .or_default()
            .entry(j.id.clone())
            .or_default();
        if let Some(m) = &j.migrate_from
            && !versions.contains_key(&m.version)
        {
            return Err(Error::Invalid(format!(
                "journey {} version {} migrates from version {}, which was never published",
                j.id, j.version, m.version
            )));
        }
        if let Some(&newest) = versions.keys().next_back()
            && j.version < newest
            && !versions.contains_key(&j.version)
        {
            return Err(Error::Invalid(format!(
                "journey {} is at version {newest}: a new version must be above it, not {}",
                j.id, j.version
            )));
        }
        match versions.get(&j.version) {
            Some(old) if *old == j => Ok(false),
            Some(_) => Err(Error::Invalid(format!(
                "journey {} version {} is published already with other content: publish it as \
                 version {}",
                j.id,
                j.version,
                versions.keys().next_back().copied().unwrap_or(j.version) + 1
            ))),
            None => {
                versions.insert(j.version, j);
                Ok(true)
            }
        }
    }

    /// Adds or replaces a segment (segments are not versioned: a change applies from the
    /// next event on).
    pub fn publish_segment(&mut self, s: Segment) -> bool {
        let app = self.segments.entry(s.app_id.clone()).or_default();
        if app.get(&s.id) == Some(&s) {
            return false;
        }
        app.insert(s.id.clone(), s);
        true
    }

    /// The ids of an app's journeys, in order.
    pub fn journey_ids(&self, app: &str) -> Vec<String> {
        self.journeys
            .get(app)
            .map(|j| j.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The newest version of a journey: the one users enter.
    pub fn latest(&self, app: &str, id: &str) -> Option<&Journey> {
        self.journeys.get(app)?.get(id)?.values().next_back()
    }

    pub fn version(&self, app: &str, id: &str, version: u32) -> Option<&Journey> {
        self.journeys.get(app)?.get(id)?.get(&version)
    }

    pub fn segment(&self, app: &str, id: &str) -> Option<&Segment> {
        self.segments.get(app)?.get(id)
    }

    /// Every published journey version, of every app.
    pub fn all_journeys(&self) -> impl Iterator<Item = &Journey> {
        self.journeys
            .values()
            .flat_map(|a| a.values().flat_map(|v| v.values()))
    }

    pub fn all_segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.values().flat_map(|a| a.values())
    }

    /// The journey `id` in whichever app has it (ids are unique per app; the first app
    /// in order when several use the same id).
    pub fn find(&self, id: &str) -> Option<&Journey> {
        self.journeys
            .values()
            .find_map(|a| a.get(id))
            .and_then(|v| v.values().next_back())
    }

    /// The longest frequency-cap period of an app's journeys, in ms: sends older than
    /// this can be forgotten.
    pub fn longest_cap_ms(&self, app: &str) -> u64 {
        self.journeys
            .get(app)
            .into_iter()
            .flat_map(|a| a.values().flat_map(|v| v.values()))
            .filter_map(|j| j.frequency_cap.as_ref())
            .map(|c| c.per.as_millis() as u64)
            .max()
            .unwrap_or(0)
    }
}
