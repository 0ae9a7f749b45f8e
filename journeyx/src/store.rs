//! Where journeyx keeps user records, published journeys and segments, and the loader's
//! progress: a trait with one conformance suite, and its implementations
//! ([`embedded`]: fjall in one directory, the laptop default; [`scylla`]: ScyllaDB / Cassandra,
//! shared by several processes).

use async_trait::async_trait;

use crate::Result;
use crate::catalog::Catalog;
use crate::engine::User;
use crate::model::{Journey, Segment};

pub mod embedded;
pub mod scylla;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

/// A user's record and the version it was read at (0: no record yet).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Versioned {
    pub user: User,
    pub version: u64,
}

/// What a conditional save did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Written; the record's new version.
    Written(u64),
    /// Someone saved the record since it was read at the expected version: nothing was
    /// written.
    Conflict,
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The user's record, with all their journeys, in one read.
    async fn load_user(&self, app: &str, user: &str) -> Result<Versioned>;

    /// Writes the record if it is still at `expected` (0: not there yet).
    async fn save_user(&self, app: &str, user: &str, expected: u64, record: &User)
    -> Result<Saved>;

    /// Publishes a journey version, under the catalog's rules (a version never changes;
    /// the same content again is a no-op: `false`).
    async fn publish_journey(&self, journey: &Journey) -> Result<bool>;

    /// Adds or replaces a segment; `false` if it was there unchanged.
    async fn publish_segment(&self, segment: &Segment) -> Result<bool>;

    /// Every published journey version and segment.
    async fn catalog(&self) -> Result<Catalog>;

    /// Up to `limit` users of `app` in user id order, after `after`.
    async fn users(
        &self,
        app: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, User)>>;

    /// How many users of `app` come after `after` in user id order (all of them without
    /// it): what a load will read. Read once, so users added meanwhile are not counted.
    async fn count_users(&self, app: &str, after: Option<&str>) -> Result<u64>;

    /// The last user the loader of `journey` has emitted an event for.
    async fn loader_position(&self, journey: &str) -> Result<Option<String>>;

    async fn set_loader_position(&self, journey: &str, user: &str) -> Result<()>;

    /// Adds `deltas` to the journey counters every process shares (durable statistics).
    /// Not idempotent: a call repeated after a lost answer counts twice.
    async fn add_counts(&self, deltas: &[(CountKey, u64)]) -> Result<()>;

    /// The counters of journey `id`, every version and node, summed over every process,
    /// in key order.
    async fn counts(&self, journey: &str) -> Result<Vec<(CountKey, u64)>>;
}

/// What a durable counter counts: (journey, version, node, what).
pub type CountKey = (String, u32, String, crate::engine::Count);

/// Checks `journey` against what `store` has published, as the catalog would.
pub(crate) async fn check_publish(store: &dyn StateStore, journey: &Journey) -> Result<bool> {
    let mut catalog = store.catalog().await?;
    catalog.publish(journey.clone())
}
