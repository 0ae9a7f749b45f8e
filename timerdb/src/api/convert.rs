//! Protobuf ⇄ domain conversions, with the request validation they imply.

use timerdb_proto::v1;

use crate::config::Limits;
use crate::sink::RESERVED_HEADER_PREFIX;
use crate::timer::TimerSpec;
use crate::{Error, Result};

pub use timerdb_client::time::timestamp;

/// Whether `topic` is a legal Kafka topic name.
pub fn valid_topic(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Validates a `SetTimeoutRequest` and turns it into a [`TimerSpec`]. `index` is the
/// item's position in a batch (error messages then start `timers[3].`), `now_ms` bounds
/// the fire time.
pub fn timer_spec(
    req: v1::SetTimeoutRequest,
    limits: &Limits,
    now_ms: u64,
    index: Option<usize>,
) -> Result<TimerSpec> {
    // Built only on error: the happy path of a large batch allocates nothing for it.
    let bad = |m: String| {
        Error::InvalidArgument(match index {
            Some(i) => format!("timers[{i}].{m}"),
            None => m,
        })
    };
    let Some(at) = req.fire_at else {
        return Err(bad(
            "fire_at is required (a timestamp; one in the past fires at once)".into(),
        ));
    };
    if at.seconds < 0 || !(0..1_000_000_000).contains(&at.nanos) {
        return Err(bad(format!(
            "fire_at {}s {}ns is out of range: it must be at or after 1970-01-01T00:00:00Z",
            at.seconds, at.nanos
        )));
    }
    // Rounded up: firing at the millisecond never precedes the requested instant.
    let fire_at_ms = (at.seconds as u64)
        .saturating_mul(1000)
        .saturating_add((at.nanos as u64).div_ceil(1_000_000));
    let latest = now_ms.saturating_add(limits.max_delay.as_millis() as u64);
    if fire_at_ms > latest {
        return Err(bad(format!(
            "fire_at is {} ms from now, beyond the limit of {} (limits.max_delay)",
            fire_at_ms - now_ms,
            humantime::format_duration(limits.max_delay)
        )));
    }
    if !valid_topic(&req.topic) {
        return Err(bad(format!(
            "topic {:?} is not a valid Kafka topic name: use 1-249 characters of [a-zA-Z0-9._-]",
            req.topic
        )));
    }
    if req.partition < 0 {
        return Err(bad(format!(
            "partition {} is negative; Kafka partitions start at 0",
            req.partition
        )));
    }
    if req.payload.len() > limits.max_payload_bytes {
        return Err(bad(format!(
            "payload is {} bytes, over the limit of {} (limits.max_payload_bytes)",
            req.payload.len(),
            limits.max_payload_bytes
        )));
    }
    if req.key.len() > limits.max_key_bytes {
        return Err(bad(format!(
            "key is {} bytes, over the limit of {} (limits.max_key_bytes)",
            req.key.len(),
            limits.max_key_bytes
        )));
    }
    if req.headers.len() > limits.max_headers {
        return Err(bad(format!(
            "{} headers, over the limit of {} (limits.max_headers)",
            req.headers.len(),
            limits.max_headers
        )));
    }
    let mut header_bytes = 0;
    for (name, value) in &req.headers {
        if name.is_empty() {
            return Err(bad("a header has an empty name".into()));
        }
        if name
            .to_ascii_lowercase()
            .starts_with(RESERVED_HEADER_PREFIX)
        {
            return Err(bad(format!(
                "header {name:?} uses the reserved prefix {RESERVED_HEADER_PREFIX:?}"
            )));
        }
        header_bytes += name.len() + value.len();
    }
    if header_bytes > limits.max_header_bytes {
        return Err(bad(format!(
            "headers total {header_bytes} bytes, over the limit of {} (limits.max_header_bytes)",
            limits.max_header_bytes
        )));
    }
    if req.idempotency_key.len() > limits.max_idempotency_key_bytes {
        return Err(bad(format!(
            "idempotency_key is {} bytes, over the limit of {} (limits.max_idempotency_key_bytes)",
            req.idempotency_key.len(),
            limits.max_idempotency_key_bytes
        )));
    }
    // A stable order, so the stored timer and the fired message list headers alike.
    let mut headers: Vec<_> = req.headers.into_iter().collect();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(TimerSpec {
        fire_at_ms,
        topic: req.topic,
        partition: req.partition,
        key: (!req.key.is_empty()).then_some(req.key),
        headers,
        payload: req.payload,
        idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;

    fn req() -> v1::SetTimeoutRequest {
        v1::SetTimeoutRequest {
            fire_at: Some(timestamp(10_000)),
            payload: "hi".into(),
            topic: "orders.v1_x-y".into(),
            partition: 0,
            ..Default::default()
        }
    }

    #[test]
    fn a_good_request_converts() {
        let s = timer_spec(req(), &Limits::default(), 5_000, None).unwrap();
        assert_eq!(s.fire_at_ms, 10_000);
        assert_eq!(s.key, None);
    }

    #[test]
    fn sub_millisecond_fire_times_round_up() {
        let mut r = req();
        r.fire_at = Some(Timestamp {
            seconds: 10,
            nanos: 1,
        });
        assert_eq!(
            timer_spec(r, &Limits::default(), 0, None)
                .unwrap()
                .fire_at_ms,
            10_001
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let limits = Limits {
            max_payload_bytes: 4,
            ..Limits::default()
        };
        type Mutate = Box<dyn Fn(&mut v1::SetTimeoutRequest)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|r| r.fire_at = None), "fire_at is required"),
            (Box::new(|r| r.topic = "".into()), "not a valid Kafka topic"),
            (
                Box::new(|r| r.topic = "a b".into()),
                "not a valid Kafka topic",
            ),
            (
                Box::new(|r| r.topic = "x".repeat(250)),
                "not a valid Kafka topic",
            ),
            (Box::new(|r| r.partition = -1), "negative"),
            (
                Box::new(|r| r.payload = "12345".into()),
                "max_payload_bytes",
            ),
            (
                Box::new(|r| {
                    r.fire_at = Some(Timestamp {
                        seconds: -1,
                        nanos: 0,
                    })
                }),
                "out of range",
            ),
            (
                Box::new(|r| r.fire_at = Some(timestamp(u64::MAX / 2000))),
                "max_delay",
            ),
            (
                Box::new(|r| {
                    r.headers.insert("timerdb-id".into(), "x".into());
                }),
                "reserved prefix",
            ),
        ];
        for (mutate, expect) in cases {
            let mut r = req();
            mutate(&mut r);
            let err = timer_spec(r, &limits, 5_000, Some(2)).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)));
            let msg = err.to_string();
            assert!(msg.starts_with("timers[2]."), "{msg}");
            assert!(msg.contains(expect), "{msg} should mention {expect}");
        }
    }
}
