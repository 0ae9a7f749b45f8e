//! JSON-lines sink: one object per fired timer, to a file or to standard output.
//!
//! `{"timer_id","topic","partition","key","payload","headers","fire_at_ms","fired_at_ms"}`
//! with key, payload and header values in standard base64. A line counts as delivered once
//! it is written to the operating system (not fsynced): this sink is for development,
//! demos and tests.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Serialize, Serializer};

use super::{Delivery, Sink, message_headers, message_key};
use crate::timer::Timer;
use crate::{Error, Result};

/// One fired timer as written by this sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FiredLine {
    /// Timer id.
    pub timer_id: String,
    /// Target topic.
    pub topic: String,
    /// Target partition.
    pub partition: i32,
    /// Message key, base64.
    pub key: String,
    /// Payload, base64.
    pub payload: String,
    /// Headers (the request's plus `timerdb-*`), values base64.
    pub headers: BTreeMap<String, String>,
    /// Scheduled epoch, ms.
    pub fire_at_ms: u64,
    /// When it was written, ms.
    pub fired_at_ms: u64,
}

impl FiredLine {
    /// The line for `timer` fired at `fired_at_ms`.
    pub fn new(timer: &Timer, fired_at_ms: u64) -> FiredLine {
        FiredLine {
            timer_id: timer.id.to_string(),
            topic: timer.spec.topic.clone(),
            partition: timer.spec.partition,
            key: B64.encode(message_key(timer)),
            payload: B64.encode(&timer.spec.payload),
            headers: message_headers(timer, fired_at_ms)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), B64.encode(v)))
                .collect(),
            fire_at_ms: timer.spec.fire_at_ms,
            fired_at_ms,
        }
    }
}

/// The same line as [`FiredLine`], serialized straight from the timer: base64 and the id
/// are written into the output buffer without intermediate strings (this is the sink's hot
/// path).
struct LineRef<'a> {
    timer: &'a Timer,
    fired_at_ms: u64,
}

struct Base64<'a>(&'a [u8]);

impl Serialize for Base64<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(&base64::display::Base64Display::new(self.0, &B64))
    }
}

struct Headers<'a>(&'a Timer, u64);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let hs = message_headers(self.0, self.1);
        // Sorted by name, as FiredLine's BTreeMap writes them.
        let mut sorted: Vec<&(&str, Vec<u8>)> = hs.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let mut m = s.serialize_map(Some(sorted.len()))?;
        for (k, v) in sorted {
            m.serialize_entry(k, &Base64(v))?;
        }
        m.end()
    }
}

impl Serialize for LineRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let t = self.timer;
        let mut st = s.serialize_struct("FiredLine", 8)?;
        st.serialize_field("timer_id", &format_args!("{}", t.id))?;
        st.serialize_field("topic", &t.spec.topic)?;
        st.serialize_field("partition", &t.spec.partition)?;
        match &t.spec.key {
            Some(k) => st.serialize_field("key", &Base64(k))?,
            None => st.serialize_field("key", &Base64(t.id.to_string().as_bytes()))?,
        }
        st.serialize_field("payload", &Base64(&t.spec.payload))?;
        st.serialize_field("headers", &Headers(t, self.fired_at_ms))?;
        st.serialize_field("fire_at_ms", &t.spec.fire_at_ms)?;
        st.serialize_field("fired_at_ms", &self.fired_at_ms)?;
        st.end()
    }
}

/// Appends one JSON line per timer to `buf`.
pub fn encode_lines(batch: &[Timer], fired_at_ms: u64, buf: &mut Vec<u8>) {
    for t in batch {
        // Serializing plain strings and numbers into memory cannot fail.
        serde_json::to_writer(
            &mut *buf,
            &LineRef {
                timer: t,
                fired_at_ms,
            },
        )
        .expect("serialize fired line");
        buf.push(b'\n');
    }
}

/// Writes fired timers as JSON lines.
pub struct JsonlSink {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl JsonlSink {
    /// Lines to standard output.
    pub fn stdout() -> JsonlSink {
        JsonlSink {
            out: Arc::new(Mutex::new(Box::new(std::io::stdout()))),
        }
    }

    /// Lines appended to `path` (created if missing).
    pub fn file(path: &Path) -> Result<JsonlSink> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Config(format!("sink directory {}: {e}", dir.display())))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Config(format!("sink file {}: {e}", path.display())))?;
        Ok(JsonlSink {
            out: Arc::new(Mutex::new(Box::new(f))),
        })
    }
}

#[async_trait]
impl Sink for JsonlSink {
    async fn deliver(&self, batch: &[Timer], fired_at_ms: u64) -> Vec<Delivery> {
        let mut buf = Vec::with_capacity(batch.len() * 256);
        encode_lines(batch, fired_at_ms, &mut buf);
        // One write for the whole batch keeps lines whole even with concurrent batches.
        // The write may block (a slow disk, a full pipe on stdout): off the runtime's
        // workers, which fire.
        let out = self.out.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut out = out.lock().expect("sink lock");
            out.write_all(&buf).and_then(|()| out.flush())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match written {
            Ok(()) => vec![Delivery::Delivered; batch.len()],
            Err(e) => vec![Delivery::Failed(format!("writing fired timers: {e}")); batch.len()],
        }
    }

    async fn flush(&self) -> Result<()> {
        let out = self.out.clone();
        tokio::task::spawn_blocking(move || out.lock().expect("sink lock").flush())
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::Unavailable(format!("flushing sink: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timer::{TimerId, TimerSpec};

    #[test]
    fn the_fast_line_is_the_documented_line() {
        for key in [None, Some(bytes::Bytes::from_static(b"user-7"))] {
            let t = Timer {
                id: TimerId::generate(1_700_000_000_000),
                created_ms: 1,
                spec: TimerSpec {
                    fire_at_ms: 1_700_000_000_123,
                    topic: "orders".into(),
                    partition: 3,
                    key,
                    headers: vec![
                        ("z-last".into(), bytes::Bytes::from_static(&[0, 255])),
                        ("a\"quote".into(), bytes::Bytes::from_static(b"x")),
                    ],
                    payload: bytes::Bytes::from_static("héllo\n".as_bytes()),
                    idempotency_key: None,
                },
            };
            let fast = serde_json::to_string(&LineRef {
                timer: &t,
                fired_at_ms: 1_700_000_000_130,
            })
            .unwrap();
            let slow = serde_json::to_string(&FiredLine::new(&t, 1_700_000_000_130)).unwrap();
            assert_eq!(fast, slow);
            let back: FiredLine = serde_json::from_str(&fast).unwrap();
            assert_eq!(back, FiredLine::new(&t, 1_700_000_000_130));
        }
    }
}
