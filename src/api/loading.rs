//! The routes served while the model loads, on the same port the server will use: `/health`
//! 200 (the process is alive: liveness probes must not kill a long load), `/ready` 503 (no
//! balancer sends work yet), `/info` the start-up phase and download progress, `/metrics` (empty),
//! and 503 `unavailable` with `Retry-After` for everything else.
//!
//! May use: `startup` (read only) and this module's error and wire types.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::error::ApiError;
use super::wire::LoadingInfo;
use crate::startup::Startup;

struct Loading {
    startup: Arc<Startup>,
    model_id: String,
}

/// The router for the time before the model is in memory.
pub fn loading_app(startup: Arc<Startup>, model_id: String) -> Router {
    let state = Arc::new(Loading { startup, model_id });
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/info", get(info))
        .route("/metrics", get(|| async { "" }))
        .fallback(unavailable)
        .with_state(state)
}

fn loading_error(s: &Loading) -> Response {
    let phase = s.startup.info().phase;
    let mut response =
        ApiError::unavailable(format!("the model is loading ({phase})")).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

async fn ready(State(s): State<Arc<Loading>>) -> Response {
    loading_error(&s)
}

async fn unavailable(State(s): State<Arc<Loading>>) -> Response {
    loading_error(&s)
}

async fn info(State(s): State<Arc<Loading>>) -> Response {
    Json(LoadingInfo {
        ready: false,
        model_id: s.model_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        startup: s.startup.info(),
    })
    .into_response()
}
