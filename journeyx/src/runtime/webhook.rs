//! The webhook action: an HTTP POST of the action's JSON body with an `Idempotency-Key`
//! header (the same for every attempt, and for a reprocessed event), each attempt bounded
//! by a timeout, failed attempts tried again with growing pauses. A 2xx answer is success;
//! a 4xx other than 408 and 429 is a refusal that no retry changes. Plain `http://` only:
//! TLS is left to a proxy beside journeyx (a journey naming `https://` fails validation).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::{Error, Result};

/// Header every webhook request carries.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// Sends the webhooks of one process (connections are pooled per host).
#[derive(Debug, Clone)]
pub struct Webhooks {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    attempts: u32,
}

impl Webhooks {
    /// `attempts` tries (at least one), each limited to `timeout`.
    pub fn new(timeout: Duration, attempts: u32) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout,
            attempts: attempts.max(1),
        }
    }

    /// POSTs `body` to `url`; `Err` once every attempt failed or the receiver refused it.
    pub async fn post(&self, url: &str, body: &Value, idempotency_key: &str) -> Result<()> {
        let bytes = Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"));
        let attempt = || async {
            let request = hyper::Request::post(url)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(IDEMPOTENCY_KEY, idempotency_key)
                .body(Full::new(bytes.clone()))
                .map_err(|e| Error::Invalid(format!("webhook {url}: {e}")))?;
            let answer = tokio::time::timeout(self.timeout, async {
                let response = self.client.request(request).await?;
                let status = response.status();
                // Read the answer to its end, so the connection can be used again.
                let _ = response.into_body().collect().await;
                Ok::<_, hyper_util::client::legacy::Error>(status)
            })
            .await
            .map_err(|_| {
                Error::Store(format!(
                    "webhook {url}: no answer within {:?}",
                    self.timeout
                ))
            })?
            .map_err(|e| Error::Store(format!("webhook {url}: {e}")))?;
            match answer.as_u16() {
                200..=299 => Ok(()),
                408 | 429 | 500..=599 => Err(Error::Store(format!("webhook {url}: {answer}"))),
                _ => Err(Error::Invalid(format!(
                    "webhook {url}: refused with {answer}"
                ))),
            }
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .with_max_times(self.attempts as usize - 1),
            )
            .when(|e| !matches!(e, Error::Invalid(_)))
            .notify(|e, pause| {
                tracing::info!(error = %e, "journeyx: webhook attempt failed; again in {pause:?}");
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A receiver that answers each request with the next status of `script` (then 200),
    /// and keeps what it received.
    async fn receiver(script: Vec<u16>) -> (String, Arc<Mutex<Vec<(String, String)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.into_iter()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post({
                let seen = seen.clone();
                move |headers: axum::http::HeaderMap, body: String| async move {
                    let key = headers[IDEMPOTENCY_KEY].to_str().unwrap().to_owned();
                    seen.lock().unwrap().push((key, body));
                    let code = script.lock().unwrap().next().unwrap_or(200);
                    axum::http::StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/hook"), seen)
    }

    #[tokio::test]
    async fn a_failing_receiver_is_tried_again_with_the_same_key() {
        let (url, seen) = receiver(vec![503, 500]).await;
        let hooks = Webhooks::new(Duration::from_secs(2), 4);
        hooks
            .post(&url, &serde_json::json!({"plan": "pro"}), "k-1")
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "two failures, then success");
        assert!(
            seen.iter()
                .all(|(k, b)| k == "k-1" && b == r#"{"plan":"pro"}"#)
        );
    }

    #[tokio::test]
    async fn a_refusal_is_not_tried_again_and_attempts_are_bounded() {
        let (url, seen) = receiver(vec![400]).await;
        let hooks = Webhooks::new(Duration::from_secs(2), 4);
        let e = hooks.post(&url, &Value::Null, "k-2").await.unwrap_err();
        assert!(e.to_string().contains("refused with 400"), "{e}");
        assert_eq!(seen.lock().unwrap().len(), 1);

        let (url, seen) = receiver(vec![503; 10]).await;
        let hooks = Webhooks::new(Duration::from_secs(2), 3);
        let e = hooks.post(&url, &Value::Null, "k-3").await.unwrap_err();
        assert!(e.to_string().contains("503"), "{e}");
        assert_eq!(seen.lock().unwrap().len(), 3, "three attempts, no more");
    }
}
