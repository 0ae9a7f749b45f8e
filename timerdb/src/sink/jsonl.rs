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
use std::sync::Mutex;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

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

/// Writes fired timers as JSON lines.
pub struct JsonlSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl JsonlSink {
    /// Lines to standard output.
    pub fn stdout() -> JsonlSink {
        JsonlSink {
            out: Mutex::new(Box::new(std::io::stdout())),
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
            out: Mutex::new(Box::new(f)),
        })
    }
}

#[async_trait]
impl Sink for JsonlSink {
    async fn deliver(&self, batch: &[Timer], fired_at_ms: u64) -> Vec<Delivery> {
        let mut buf = Vec::with_capacity(batch.len() * 256);
        for t in batch {
            // Serializing plain strings and numbers cannot fail.
            serde_json::to_writer(&mut buf, &FiredLine::new(t, fired_at_ms))
                .expect("serialize fired line");
            buf.push(b'\n');
        }
        // One write for the whole batch keeps lines whole even with concurrent batches.
        let written = {
            let mut out = self.out.lock().expect("sink lock");
            out.write_all(&buf).and_then(|()| out.flush())
        };
        match written {
            Ok(()) => vec![Delivery::Delivered; batch.len()],
            Err(e) => vec![Delivery::Failed(format!("writing fired timers: {e}")); batch.len()],
        }
    }

    async fn flush(&self) -> Result<()> {
        self.out
            .lock()
            .expect("sink lock")
            .flush()
            .map_err(|e| Error::Unavailable(format!("flushing sink: {e}")))
    }
}
