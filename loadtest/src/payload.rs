//! The bytes each timer carries, so the checker needs nothing but what arrives: a 40-byte
//! stamp (magic, flags, run id, sequence number, intended fire time, send time) followed by
//! padding derived from the sequence number, which makes any corruption detectable.

/// Stamp length; payloads are at least this long.
pub const STAMP_LEN: usize = 40;
const MAGIC: &[u8; 4] = b"TDLT";
const VERSION: u8 = 1;
const FLAG_BACKLOG: u8 = 1;

/// Header the loadtest adds to every timer, carrying the sequence number as decimal text.
pub const SEQ_HEADER: &str = "loadtest-seq";

/// What a payload says about its timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Random per run, so timers of other runs on the same sink are told apart.
    pub run_id: u64,
    /// Index of the timer within its run (and phase).
    pub seq: u64,
    /// Requested epoch, ms.
    pub fire_at_ms: u64,
    /// When the client sent it, ms; a timer cannot be due before it was stored.
    pub sent_ms: u64,
    /// A far-future backlog timer, not expected during the run.
    pub backlog: bool,
}

impl Stamp {
    /// When the timer is due: its epoch, or when it was sent if that epoch was already past.
    pub fn due_ms(&self) -> u64 {
        self.fire_at_ms.max(self.sent_ms)
    }

    /// The payload of `len` bytes (at least `STAMP_LEN`) for this stamp.
    pub fn encode(&self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len.max(STAMP_LEN));
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(if self.backlog { FLAG_BACKLOG } else { 0 });
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.run_id.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.fire_at_ms.to_be_bytes());
        out.extend_from_slice(&self.sent_ms.to_be_bytes());
        for i in STAMP_LEN..len {
            out.push(pad_byte(self.seq, i));
        }
        out
    }

    /// Reads a payload back; `None` when it is not a loadtest payload or its padding changed.
    pub fn decode(bytes: &[u8]) -> Option<Stamp> {
        if bytes.len() < STAMP_LEN || &bytes[..4] != MAGIC || bytes[4] != VERSION {
            return None;
        }
        let u = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let stamp = Stamp {
            run_id: u(8),
            seq: u(16),
            fire_at_ms: u(24),
            sent_ms: u(32),
            backlog: bytes[5] & FLAG_BACKLOG != 0,
        };
        let padding_intact = bytes[STAMP_LEN..]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pad_byte(stamp.seq, STAMP_LEN + i));
        padding_intact.then_some(stamp)
    }
}

fn pad_byte(seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31) ^ (i as u8)
}

/// The message key the loadtest gives timer `seq`.
pub fn key_for(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// One fired timer as read from the sink, whatever the sink.
#[derive(Debug, Clone, Default)]
pub struct Arrival {
    /// The `timerdb-id` header (or the JSON line's `timer_id`).
    pub timer_id: String,
    /// Topic it was produced to.
    pub topic: String,
    /// Partition it was produced to.
    pub partition: i32,
    /// Message key.
    pub key: Vec<u8>,
    /// Message value.
    pub payload: Vec<u8>,
    /// All headers, the node's `timerdb-*` ones included.
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the node produced it (`timerdb-fired-at`, or the line's `fired_at_ms`).
    pub fired_at_ms: Option<u64>,
    /// When this process received it (Kafka only).
    pub received_ms: Option<u64>,
}

impl Arrival {
    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Header `name` read as a decimal number.
    pub fn header_u64(&self, name: &str) -> Option<u64> {
        std::str::from_utf8(self.header(name)?).ok()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_and_detects_corruption() {
        let s = Stamp {
            run_id: 7,
            seq: 123_456,
            fire_at_ms: 1_700_000_000_000,
            sent_ms: 1_699_999_999_000,
            backlog: true,
        };
        let mut bytes = s.encode(100);
        assert_eq!(bytes.len(), 100);
        assert_eq!(Stamp::decode(&bytes), Some(s));
        bytes[77] ^= 1;
        assert_eq!(Stamp::decode(&bytes), None);
        assert_eq!(Stamp::decode(b"short"), None);
        assert_eq!(s.due_ms(), s.fire_at_ms);
    }
}
