//! Segment membership, "is user X in segment Y", behind a trait, so that an external
//! audience service can replace journeyx's own answer.
//!
//! - [`LocalAudience`] (the default) tests the segment's `where` against the properties and
//!   tags journeyx keeps for the user. It follows changes a step makes (a `set` that takes
//!   the user out of a segment is seen by the next condition of the same step).
//! - [`HttpAudience`] (`journeyx run --audience URL`) asks a service, once per event,
//!   about every segment the app's journeys name, before the step; the step then reads
//!   those answers, so the engine stays pure (its input is the event, the record and the
//!   answers). The service's own data decides: journeyx's properties and tags are sent
//!   along, for a service that wants them.
//!
//! The service's protocol: `POST URL` with
//! `{"app_id", "user_id", "segments": [NAME...], "properties": {...}, "tags": [...]}`,
//! answered `200` with `{"segments": {NAME: true|false, ...}}`; a name left out of the
//! answer counts as "not a member". Any other answer is a failure, and the event waits
//! and is tried again (like a store that is down: it never skips the event).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::engine::User;
use crate::{Error, Result};

/// The segment answers one step reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memberships {
    /// Evaluated by journeyx, against the record as the step changes it.
    Local,
    /// Fetched before the step; a segment not named counts as "not a member".
    Answered(BTreeMap<String, bool>),
}

impl Memberships {
    /// Whether `user` of `app` is in segment `id`.
    pub fn contains(&self, catalog: &Catalog, app: &str, user: &User, id: &str) -> bool {
        match self {
            Memberships::Local => crate::engine::in_segment(catalog, app, user, id),
            Memberships::Answered(m) => m.get(id).copied().unwrap_or(false),
        }
    }
}

/// Where a runtime's segment answers come from.
#[async_trait]
pub trait Audience: Send + Sync + std::fmt::Debug {
    /// The answers the step of an event for `user_id` of `app` (whose record is `user`)
    /// may need.
    async fn memberships(
        &self,
        catalog: &Catalog,
        app: &str,
        user_id: &str,
        user: &User,
    ) -> Result<Memberships>;
}

/// journeyx's own answer: the segment's `where` over the user's properties and tags.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalAudience;

#[async_trait]
impl Audience for LocalAudience {
    async fn memberships(&self, _: &Catalog, _: &str, _: &str, _: &User) -> Result<Memberships> {
        Ok(Memberships::Local)
    }
}

/// An external audience service, asked over HTTP (see the module's protocol).
#[derive(Debug, Clone)]
pub struct HttpAudience {
    url: String,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

#[derive(Serialize)]
struct Question<'a> {
    app_id: &'a str,
    user_id: &'a str,
    segments: Vec<&'a str>,
    properties: &'a serde_json::Map<String, serde_json::Value>,
    tags: &'a BTreeSet<String>,
}

#[derive(Deserialize)]
struct Answer {
    segments: BTreeMap<String, bool>,
}

impl HttpAudience {
    /// The service at `url` (plain `http://`), each question bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| Error::Invalid(format!("--audience {url:?}: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(Error::Invalid(format!(
                "--audience {url:?}: give an http://host[:port]/path URL (TLS is left to a \
                 proxy beside journeyx)"
            )));
        }
        Ok(Self {
            url: url.to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout,
        })
    }

    async fn ask(&self, body: Vec<u8>) -> Result<Answer> {
        let request = hyper::Request::post(self.url.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Error::Invalid(format!("audience {}: {e}", self.url)))?;
        let failed = |why: String| Error::Store(format!("audience {}: {why}", self.url));
        let (status, bytes) = tokio::time::timeout(self.timeout, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| failed(e.to_string()))?
                .to_bytes();
            Ok::<_, Error>((status, bytes))
        })
        .await
        .map_err(|_| failed(format!("no answer within {:?}", self.timeout)))??;
        if !status.is_success() {
            return Err(failed(format!("answered {status}")));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            failed(format!(
                "an answer that is not {{\"segments\": {{...}}}}: {e}"
            ))
        })
    }
}

#[async_trait]
impl Audience for HttpAudience {
    async fn memberships(
        &self,
        catalog: &Catalog,
        app: &str,
        user_id: &str,
        user: &User,
    ) -> Result<Memberships> {
        let segments = segments_named(catalog, app);
        if segments.is_empty() {
            return Ok(Memberships::Answered(BTreeMap::new()));
        }
        let body = serde_json::to_vec(&Question {
            app_id: app,
            user_id,
            segments: segments.iter().map(String::as_str).collect(),
            properties: &user.properties,
            tags: &user.tags,
        })
        .expect("a question serializes");
        let answer = self.ask(body).await?;
        Ok(Memberships::Answered(
            segments
                .into_iter()
                .map(|s| {
                    let member = answer.segments.get(&s).copied().unwrap_or(false);
                    (s, member)
                })
                .collect(),
        ))
    }
}

/// Every segment the published journeys of `app` name (any version), in order.
pub fn segments_named(catalog: &Catalog, app: &str) -> Vec<String> {
    let mut out: BTreeSet<String> = BTreeSet::new();
    for j in catalog.all_journeys().filter(|j| j.app_id == app) {
        out.extend(j.segments().into_iter().map(str::to_owned));
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_audience_url_must_be_plain_http_with_a_host() {
        assert!(HttpAudience::new("http://127.0.0.1:9/members", Duration::from_secs(1)).is_ok());
        for bad in [
            "https://a.example/members",
            "a.example/members",
            "http:///x",
            "::",
        ] {
            let e = HttpAudience::new(bad, Duration::from_secs(1)).unwrap_err();
            assert!(e.to_string().contains("--audience"), "{bad}: {e}");
        }
    }

    #[test]
    fn answered_memberships_count_a_segment_not_named_as_outside() {
        let m = Memberships::Answered(BTreeMap::from([("a".to_owned(), true)]));
        let (catalog, user) = (Catalog::default(), User::default());
        assert!(m.contains(&catalog, "demo", &user, "a"));
        assert!(!m.contains(&catalog, "demo", &user, "b"));
    }
}
