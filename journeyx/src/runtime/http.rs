//! The HTTP API of a running `journeyx run --http ADDR`: what the other commands
//! (`publish`, `list`, `user`, `stats`) talk to, since the embedded store is open in this
//! one process; and `/metrics` for Prometheus.
//!
//! - `POST /api/publish` (body: a journey or segment file, YAML or JSON) → 201 published,
//!   200 unchanged, 400 with the problems;
//! - `GET /api/journeys` → every published journey version;
//! - `GET /api/users/{app}/{user}` → the user's record, with its version;
//! - `GET /api/stats/{journey}` → the counters of every version and node of the journey;
//! - `POST /api/load/{journey}?rate=N&from_start=true` → starts the loader (202) and
//!   `GET /api/load/{journey}` → its progress;
//! - `GET /metrics` → the Prometheus text format;
//! - `GET /` → a self-contained page drawing each journey's graph with its live counts.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};

use super::{Runtime, count_name};
use crate::Error;
use crate::model::{Journey, Segment};

#[derive(Clone)]
struct Api {
    rt: Arc<Runtime>,
    metrics: Option<PrometheusHandle>,
}

/// The API's routes over `rt`; `/metrics` renders `metrics` if given.
pub fn router(rt: Arc<Runtime>, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/publish", post(publish))
        .route("/api/journeys", get(journeys))
        .route("/api/users/{app}/{user}", get(user))
        .route("/api/stats/{journey}", get(stats))
        .route("/api/load/{journey}", post(load).get(load_progress))
        .route("/metrics", get(prometheus))
        .with_state(Api { rt, metrics })
}

fn failure(code: StatusCode, e: impl std::fmt::Display) -> Response {
    (code, Json(json!({"error": e.to_string()}))).into_response()
}

fn store_failure(e: Error) -> Response {
    match e {
        Error::Invalid(_) => failure(StatusCode::BAD_REQUEST, e),
        Error::Store(_) => failure(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Whether a file is a segment (it has `where` and no `nodes`) rather than a journey.
pub fn is_segment(text: &str) -> bool {
    serde_norway::from_str::<Value>(text)
        .ok()
        .is_some_and(|v| v.get("where").is_some() && v.get("nodes").is_none())
}

async fn publish(State(api): State<Api>, body: String) -> Response {
    let store = api.rt.store();
    let published = if is_segment(&body) {
        match Segment::parse("the request", &body) {
            Ok(s) => store
                .publish_segment(&s)
                .await
                .map(|new| (new, json!({"segment": s.id, "app_id": s.app_id}))),
            Err(e) => Err(e),
        }
    } else {
        match Journey::parse("the request", &body) {
            Ok(j) => store.publish_journey(&j).await.map(|new| {
                (
                    new,
                    json!({"journey": j.id, "version": j.version, "app_id": j.app_id}),
                )
            }),
            Err(e) => Err(e),
        }
    };
    match published {
        Ok((new, mut what)) => {
            if let Err(e) = api.rt.reload_catalog().await {
                return store_failure(e);
            }
            what["published"] = new.into();
            let code = if new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (code, Json(what)).into_response()
        }
        Err(e) => store_failure(e),
    }
}

async fn journeys(State(api): State<Api>) -> Response {
    let catalog = api.rt.catalog();
    let list: Vec<Value> = catalog
        .all_journeys()
        .map(|j| {
            json!({
                "app_id": j.app_id,
                "id": j.id,
                "version": j.version,
                "nodes": j.nodes.len(),
                "entry": j.entry,
                "journey": j,
            })
        })
        .collect();
    Json(json!({"journeys": list})).into_response()
}

async fn user(State(api): State<Api>, Path((app, user)): Path<(String, String)>) -> Response {
    match api.rt.store().load_user(&app, &user).await {
        Ok(v) if v.version == 0 => failure(
            StatusCode::NOT_FOUND,
            format!("app {app} has no record of user {user}"),
        ),
        Ok(v) => Json(json!({"version": v.version, "user": v.user})).into_response(),
        Err(e) => store_failure(e),
    }
}

async fn stats(State(api): State<Api>, Path(journey): Path<String>) -> Response {
    if api.rt.catalog().find(&journey).is_none() {
        return failure(
            StatusCode::NOT_FOUND,
            format!("no journey {journey} is published"),
        );
    }
    let counts = match api.rt.journey_counts(&journey).await {
        Ok(counts) => counts,
        Err(e) => return store_failure(e),
    };
    let rows: Vec<Value> = counts
        .into_iter()
        .map(|((_, version, node, count), n)| {
            json!({"version": version, "node": node, "count": count_name(count), "n": n})
        })
        .collect();
    Json(json!({"journey": journey, "counters": rows})).into_response()
}

#[derive(serde::Deserialize)]
struct LoadParams {
    rate: Option<u32>,
    #[serde(default)]
    from_start: bool,
}

async fn load(
    State(api): State<Api>,
    Path(journey): Path<String>,
    axum::extract::Query(q): axum::extract::Query<LoadParams>,
) -> Response {
    match super::loader::start(
        api.rt.clone(),
        &journey,
        q.rate.unwrap_or(1_000),
        q.from_start,
    )
    .await
    {
        Ok(p) => (StatusCode::ACCEPTED, Json(p.as_ref())).into_response(),
        Err(e) => store_failure(e),
    }
}

async fn load_progress(State(api): State<Api>, Path(journey): Path<String>) -> Response {
    match super::loader::progress(&api.rt, &journey) {
        Some(p) => Json(p.as_ref()).into_response(),
        None => failure(
            StatusCode::NOT_FOUND,
            format!("no load of {journey} was started in this process"),
        ),
    }
}

/// The page: no external resources, it draws from `/api/journeys` and `/api/stats`.
async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("page.html"))
}

async fn prometheus(State(api): State<Api>) -> Response {
    match &api.metrics {
        Some(h) => h.render().into_response(),
        None => failure(StatusCode::NOT_FOUND, "no metrics recorder in this process"),
    }
}
