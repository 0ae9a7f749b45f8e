//! Times as TimerDB speaks them: milliseconds since the Unix epoch, protobuf timestamps,
//! RFC 3339 text and durations from now.

use prost_types::Timestamp;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Now, in milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch as a protobuf timestamp.
pub fn timestamp(ms: u64) -> Timestamp {
    Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp in milliseconds since the Unix epoch, rounded up (a firing time is
/// never made earlier); times before 1970 become 0.
pub fn ms_of(ts: &Timestamp) -> u64 {
    if ts.seconds < 0 {
        return 0;
    }
    (ts.seconds as u64)
        .saturating_mul(1000)
        .saturating_add((ts.nanos.max(0) as u64).div_ceil(1_000_000))
}

/// Parses a point in time: RFC 3339 (`2030-01-01T00:00:00Z`) or epoch milliseconds.
/// Sub-millisecond times round up, like the server rounds them.
pub fn parse_at(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
        format!("{s:?}: expected RFC 3339 (2030-01-01T00:00:00Z) or epoch milliseconds")
    })?;
    let ns = t.unix_timestamp_nanos();
    let ms = ns / 1_000_000 + i128::from(ns % 1_000_000 > 0);
    u64::try_from(ms).map_err(|_| format!("{s:?} is before 1970"))
}

/// Epoch milliseconds as RFC 3339 text (`2030-01-01T00:00:00.5Z`).
pub fn format_rfc3339(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_rounds_sub_millisecond_times_up() {
        assert_eq!(
            parse_at("2023-11-14T22:13:20.0001Z").unwrap(),
            1_700_000_000_001
        );
        assert_eq!(
            parse_at("2023-11-14T22:13:20.001Z").unwrap(),
            1_700_000_000_001
        );
    }

    #[test]
    fn at_accepts_rfc3339_and_epoch_ms_and_names_what_it_refuses() {
        assert_eq!(parse_at("1700000000123").unwrap(), 1_700_000_000_123);
        assert_eq!(
            parse_at("2023-11-14T22:13:20.5Z").unwrap(),
            1_700_000_000_500
        );
        assert!(parse_at("tomorrow").unwrap_err().contains("RFC 3339"));
        assert!(
            parse_at("1969-12-31T23:59:59Z")
                .unwrap_err()
                .contains("before 1970")
        );
    }

    #[test]
    fn timestamps_round_trip_and_round_up() {
        assert_eq!(ms_of(&timestamp(1_700_000_000_123)), 1_700_000_000_123);
        let ts = Timestamp {
            seconds: 1,
            nanos: 1,
        };
        assert_eq!(ms_of(&ts), 1001);
        assert_eq!(format_rfc3339(1_700_000_000_500), "2023-11-14T22:13:20.5Z");
    }
}
