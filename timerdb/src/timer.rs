//! Timers, their ids, and the store layout (slots × buckets) every component agrees on.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// How timers are spread over the store: `slots` hash slots (the unit of ownership) and
/// buckets of `bucket_ms` milliseconds (the unit of loading and deleting).
/// Fixed when a store is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Number of hash slots.
    pub slots: u32,
    /// Width of a time bucket in milliseconds.
    pub bucket_ms: u64,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            slots: 256,
            bucket_ms: 1000,
        }
    }
}

impl Layout {
    /// Start (ms since the Unix epoch) of the bucket holding `ms`.
    pub fn bucket_start(&self, ms: u64) -> u64 {
        ms - ms % self.bucket_ms
    }

    /// The slot a timer with this random id part belongs to (crc32 of its bytes).
    pub fn slot_of(&self, rand: u64) -> u32 {
        crc32fast::hash(&rand.to_be_bytes()) % self.slots
    }

    /// All slots, as one range.
    pub fn all_slots(&self) -> SlotRange {
        SlotRange {
            first: 0,
            last: self.slots - 1,
        }
    }

    /// Checks the values are usable.
    pub fn validate(&self) -> Result<()> {
        if self.slots == 0 || self.slots > 65_536 {
            return Err(Error::Config(format!(
                "slots must be between 1 and 65536, got {}",
                self.slots
            )));
        }
        if !(100..=60_000).contains(&self.bucket_ms) {
            return Err(Error::Config(format!(
                "bucket width must be between 100 ms and 60 s, got {} ms",
                self.bucket_ms
            )));
        }
        Ok(())
    }
}

/// An inclusive range of slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SlotRange {
    /// First slot of the range.
    pub first: u32,
    /// Last slot of the range (inclusive).
    pub last: u32,
}

impl SlotRange {
    /// Whether `slot` is in the range.
    pub fn contains(&self, slot: u32) -> bool {
        self.first <= slot && slot <= self.last
    }
}

impl fmt::Display for SlotRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.first, self.last)
    }
}

/// A timer id: the start of the bucket the timer is stored in plus 64 bits that tell
/// timers of one bucket apart. That is enough to find the row without any index: the
/// bucket and the slot (crc32 of the second part) name its partition. Written as 32
/// lowercase hex digits.
///
/// The second part is a 24-bit sequence number (per process, started at a random value)
/// followed by 40 random bits. Ids made one after another therefore sort one after
/// another within a bucket, so a group of new timers lands at the end of each bucket's
/// key range in the embedded store's B-tree instead of on one page per timer (7× less
/// work per commit, see `docs/design.md`). Uniqueness is unchanged: within a process the
/// sequence separates ids until it wraps every 16.7 M ids; otherwise two ids of one bucket
/// collide only if 64 bits agree, as with 64 random bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TimerId {
    /// Start of the storage bucket, ms since the Unix epoch.
    pub bucket_ms: u64,
    /// Random part; also decides the slot.
    pub rand: u64,
}

impl TimerId {
    /// A new id in the bucket starting at `bucket_ms`.
    pub fn generate(bucket_ms: u64) -> TimerId {
        static SEQUENCE: std::sync::OnceLock<std::sync::atomic::AtomicU64> =
            std::sync::OnceLock::new();
        let seq = SEQUENCE
            .get_or_init(|| std::sync::atomic::AtomicU64::new(rand::random()))
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TimerId {
            bucket_ms,
            rand: (seq & SEQUENCE_MASK) << RANDOM_BITS
                | rand::random::<u64>() >> (64 - RANDOM_BITS),
        }
    }

    /// The 16 bytes of the id.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.bucket_ms.to_be_bytes());
        b[8..].copy_from_slice(&self.rand.to_be_bytes());
        b
    }
}

impl fmt::Display for TimerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.bucket_ms, self.rand)
    }
}

impl FromStr for TimerId {
    type Err = Error;

    fn from_str(s: &str) -> Result<TimerId> {
        let bad = || {
            Error::InvalidArgument(format!(
                "malformed timer id {s:?}: expected 32 hexadecimal digits as returned by SetTimeout"
            ))
        };
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let bucket_ms = u64::from_str_radix(&s[..16], 16).map_err(|_| bad())?;
        let rand = u64::from_str_radix(&s[16..], 16).map_err(|_| bad())?;
        Ok(TimerId { bucket_ms, rand })
    }
}

/// Random low bits of an id's second part; the 24 bits above them are a sequence number.
const RANDOM_BITS: u32 = 40;
const SEQUENCE_MASK: u64 = (1 << (64 - RANDOM_BITS)) - 1;

/// What a client asked for: fire `payload` to `topic`/`partition` at `fire_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerSpec {
    /// Requested fire time, ms since the Unix epoch.
    pub fire_at_ms: u64,
    /// Kafka topic.
    pub topic: String,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka key; the timer id is used when absent.
    pub key: Option<Bytes>,
    /// Extra Kafka headers, in request order.
    pub headers: Vec<(String, Bytes)>,
    /// Kafka value.
    pub payload: Bytes,
    /// Optional idempotency key.
    pub idempotency_key: Option<String>,
}

impl TimerSpec {
    /// Compact binary form (postcard), as both stores keep it.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        postcard::to_allocvec(self).map_err(|e| Error::Internal(format!("encoding timer: {e}")))
    }

    /// Reads the form written by [`TimerSpec::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<TimerSpec, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// A stored timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// Its id.
    pub id: TimerId,
    /// When it was accepted, ms since the Unix epoch.
    pub created_ms: u64,
    /// What to fire.
    pub spec: TimerSpec,
}

/// Lifecycle of a timer as the store records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredState {
    /// Will fire.
    Pending,
    /// Will never fire.
    Cancelled,
}

/// Now, in milliseconds since the Unix epoch.
pub use timerdb_client::time::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_through_text() {
        let id = TimerId::generate(1_700_000_000_000);
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<TimerId>().unwrap(), id);
    }

    #[test]
    fn ids_made_in_a_row_sort_in_a_row_and_spread_over_slots() {
        let layout = Layout::default();
        let ids: Vec<TimerId> = (0..100_000).map(|_| TimerId::generate(5_000)).collect();
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        // Apart from one wrap of the 24-bit sequence, each id sorts after the previous one.
        let descents = ids.windows(2).filter(|w| w[1] <= w[0]).count();
        assert!(
            descents <= 1,
            "{descents} ids sorted before their predecessor"
        );
        let mut counts = vec![0u32; layout.slots as usize];
        for id in &ids {
            counts[layout.slot_of(id.rand) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        let mean = ids.len() as u32 / layout.slots;
        assert!(
            *min > mean * 2 / 3 && *max < mean * 3 / 2,
            "mean {mean} min {min} max {max}"
        );
    }

    #[test]
    fn malformed_ids_are_rejected_with_a_clear_message() {
        for bad in ["", "xyz", "0123", &"g".repeat(32), &"0".repeat(33)] {
            let err = bad.parse::<TimerId>().unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}");
            assert!(err.to_string().contains("32 hexadecimal digits"));
        }
    }

    #[test]
    fn slots_spread_evenly() {
        let layout = Layout::default();
        let n = 200_000;
        let mut counts = vec![0u32; layout.slots as usize];
        for _ in 0..n {
            counts[layout.slot_of(rand::random()) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // crc32 of uniform input should stay well inside 1.5x of the mean either way.
        let mean = n / layout.slots;
        assert!(
            *min > mean * 2 / 3 && *max < mean * 3 / 2,
            "mean {mean} min {min} max {max}"
        );
    }

    #[test]
    fn bucket_start_rounds_down() {
        let l = Layout::default();
        assert_eq!(l.bucket_start(12_345), 12_000);
        assert_eq!(l.bucket_start(12_000), 12_000);
    }
}
