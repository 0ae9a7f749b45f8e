//! Local time in a user's time zone (the tz database, compiled in): quiet-hour windows
//! and "at 09:00" timers. An unknown or missing zone is UTC.

use chrono::{DateTime, Days, LocalResult, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use crate::model::LocalTime;

/// The zone named `name` (IANA, e.g. `Europe/Berlin`), if the tz database knows it.
pub fn zone(name: &str) -> Option<Tz> {
    name.parse().ok()
}

fn zone_or_utc(name: Option<&str>) -> Tz {
    name.and_then(zone).unwrap_or(Tz::UTC)
}

/// The last instant local times are computed for: 9999-12-31T23:59:59.999Z. Later ones
/// are taken as it (chrono's calendar ends at year 262143, and a zone ahead of UTC would
/// pass that end; journeyx refuses events after this instant anyway).
pub const LAST_MS: u64 = 253_402_300_799_999;

fn utc(ms: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms.min(LAST_MS) as i64).unwrap_or_default()
}

/// Minutes since local midnight at `ms`.
pub fn local_minutes(ms: u64, tz: Option<&str>) -> u32 {
    let local = utc(ms).with_timezone(&zone_or_utc(tz));
    local.hour() * 60 + local.minute()
}

/// The first instant after `ms` at which the local clock reads `at` (a local time that a
/// daylight-saving change skips is taken at the first instant after the gap; one it
/// repeats, at its first occurrence).
pub fn next_local(ms: u64, at: LocalTime, tz: Option<&str>) -> u64 {
    if ms > LAST_MS {
        return ms.saturating_add(86_400_000);
    }
    let zone = zone_or_utc(tz);
    let local = utc(ms).with_timezone(&zone);
    let time = NaiveTime::from_hms_opt(at.minutes / 60, at.minutes % 60, 0).expect("valid");
    let mut day = local.date_naive();
    for _ in 0..3 {
        let naive = day.and_time(time);
        let candidate = match zone.from_local_datetime(&naive) {
            LocalResult::Single(t) => Some(t),
            LocalResult::Ambiguous(first, _) => Some(first),
            // Skipped by a clock change: the first valid minute after.
            LocalResult::None => (1..=180).find_map(|m| {
                zone.from_local_datetime(&(naive + chrono::Duration::minutes(m)))
                    .earliest()
            }),
        };
        if let Some(t) = candidate {
            let t_ms = t.timestamp_millis() as u64;
            if t_ms > ms {
                return t_ms;
            }
        }
        let Some(next) = day.checked_add_days(Days::new(1)) else {
            break;
        };
        day = next;
    }
    ms.saturating_add(86_400_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Times at and past the end of chrono's calendar (year 262143) find no next 09:00
    /// to compute: a day later, no panic (a panic killed the queue's worker).
    #[test]
    fn the_calendar_s_end_does_not_panic() {
        let at = LocalTime { minutes: 9 * 60 };
        let last = DateTime::<Utc>::MAX_UTC.timestamp_millis() as u64;
        for ms in [LAST_MS, LAST_MS + 1, last, i64::MAX as u64, u64::MAX] {
            for tz in [None, Some("Pacific/Kiritimati"), Some("America/New_York")] {
                assert!(next_local(ms, at, tz) >= ms, "{ms} {tz:?}");
                assert!(local_minutes(ms, tz) < 24 * 60);
            }
        }
    }

    fn ms(rfc3339: &str) -> u64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis() as u64
    }

    fn at(s: &str) -> LocalTime {
        LocalTime::try_from(s.to_owned()).unwrap()
    }

    #[test]
    fn next_nine_o_clock_is_today_or_tomorrow_in_the_users_zone() {
        let berlin = Some("Europe/Berlin");
        // 06:00 in Berlin (05:00 UTC in winter): 09:00 the same day.
        assert_eq!(
            next_local(ms("2026-01-10T05:00:00Z"), at("09:00"), berlin),
            ms("2026-01-10T08:00:00Z")
        );
        // 10:00 in Berlin: 09:00 the next day.
        assert_eq!(
            next_local(ms("2026-01-10T09:00:00Z"), at("09:00"), berlin),
            ms("2026-01-11T08:00:00Z")
        );
        // Unknown zone: UTC.
        assert_eq!(
            next_local(
                ms("2026-01-10T05:00:00Z"),
                at("09:00"),
                Some("Mars/Olympus")
            ),
            ms("2026-01-10T09:00:00Z")
        );
        assert_eq!(
            local_minutes(ms("2026-07-01T20:30:00Z"), berlin),
            22 * 60 + 30
        );
    }

    #[test]
    fn a_time_skipped_by_daylight_saving_fires_right_after_the_gap() {
        // Berlin skips 02:00–03:00 on 2026-03-29: "02:30" is 03:00 local (01:00 UTC).
        assert_eq!(
            next_local(
                ms("2026-03-28T23:00:00Z"),
                at("02:30"),
                Some("Europe/Berlin")
            ),
            ms("2026-03-29T01:00:00Z")
        );
    }
}
