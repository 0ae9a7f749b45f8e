//! A sink for in-process scheduler tests: fails the first attempts at some timers on
//! purpose and records what it delivered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use timerdb::sink::{Delivery, Sink};
use timerdb::timer::{Timer, TimerSpec};

/// Fails the first `failures` attempts of every timer on topic "flaky".
pub struct FlakySink {
    failures: u32,
    pub attempts: Mutex<HashMap<String, u32>>,
    pub delivered: Mutex<Vec<(Timer, u64)>>,
}

impl FlakySink {
    /// A sink that fails the first `failures` attempts of each timer on topic "flaky".
    pub fn failing(failures: u32) -> Arc<FlakySink> {
        Arc::new(FlakySink {
            failures,
            attempts: Mutex::default(),
            delivered: Mutex::default(),
        })
    }
}

#[async_trait]
impl Sink for FlakySink {
    async fn deliver(&self, batch: &[Timer], fired_at_ms: u64) -> Vec<Delivery> {
        let mut attempts = self.attempts.lock().unwrap();
        let mut delivered = self.delivered.lock().unwrap();
        batch
            .iter()
            .map(|t| {
                let n = attempts.entry(t.id.to_string()).or_insert(0);
                *n += 1;
                if t.spec.topic == "flaky" && *n <= self.failures {
                    Delivery::Failed(format!("attempt {n} refused on purpose"))
                } else {
                    delivered.push((t.clone(), fired_at_ms));
                    Delivery::Delivered
                }
            })
            .collect()
    }

    async fn flush(&self) -> timerdb::Result<()> {
        Ok(())
    }
}

/// A timer due at `fire_at_ms` on `topic` (partition 0, payload "p"), for such tests.
pub fn spec(fire_at_ms: u64, topic: &str) -> TimerSpec {
    TimerSpec {
        fire_at_ms,
        topic: topic.into(),
        partition: 0,
        key: None,
        headers: vec![],
        payload: "p".into(),
        idempotency_key: None,
    }
}
