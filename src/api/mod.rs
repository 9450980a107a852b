//! HTTP: `POST /v1/caption`, `POST /v1/vqa` (JSON or multipart; `stream` for Server-Sent
//! Events), `POST /v1/features`, OpenAI's `POST /v1/chat/completions` and `GET /v1/models`, `GET /health`, `/ready`,
//! `/info`, `/metrics`, `/openapi.json`, `/docs`. Every answer carries an `x-request-id`; errors
//! are `{error, error_type}` with the matching status (OpenAI's shape on OpenAI's routes).

mod budget;
mod error;
mod features;
pub mod fetch;
mod infer;
mod input;
mod loading;
mod openai;
pub mod wire;

pub use budget::ByteBudget;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::Semaphore;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

pub use error::{ApiError, ErrorParam, ErrorType};
pub use loading::loading_app;

use crate::engine::EngineHandle;
use crate::generation::GenerationParams;
use crate::metrics::Metrics;
use crate::preprocess::ImageProcessor;
use crate::prompt::PromptBuilder;
use crate::startup::Startup;

/// The API description served at /openapi.json (this file, as JSON).
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");
const DOCS_HTML: &str = include_str!("docs.html");

/// Per-request limits (see config/default.toml).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub max_batch_tokens: usize,
    pub num_query_tokens: usize,
    /// The language model's width: `image_embeds` are [num_query_tokens, lm_hidden_size].
    pub lm_hidden_size: usize,
    /// The vision encoder's patch side: a request's `image_size` must be a multiple of it.
    pub patch_size: usize,
    /// Largest side a request's `image_size` may ask for.
    pub max_image_side: usize,
    /// OPT's learned positions: query + prompt + new tokens must fit (T5 has no such limit).
    pub max_positions: Option<usize>,
    pub request_timeout: Option<Duration>,
    /// The whole body must arrive within this long after the head (408).
    pub body_timeout: Duration,
}

/// What the handlers share.
pub struct AppState {
    pub engine: EngineHandle,
    pub images: ImageProcessor,
    pub prompts: PromptBuilder,
    pub defaults: GenerationParams,
    /// "Question: {} Answer:" (OPT) or "Question: {} Short answer:" (T5), or as configured.
    pub vqa_template: String,
    /// Bounds concurrent image decoding so a flood of large images cannot starve the runtime.
    pub decode_permits: Semaphore,
    /// Requests in flight (max_concurrent_requests).
    pub in_flight: Arc<Semaphore>,
    /// Memory of bodies being read and decoded (max_buffered_bytes).
    pub buffered: ByteBudget,
    pub info: wire::StaticInfo,
    /// False until started and while draining.
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// `Bearer <key>` expected on /v1/*, if any.
    pub api_key: Option<String>,
    pub cors_allow_origins: Vec<String>,
    pub url_policy: fetch::UrlPolicy,
    /// How image-URL host names are resolved (the system's; tests give their own).
    pub resolve: fetch::Resolve,
    /// openapi.yaml as JSON.
    pub openapi_json: String,
    /// How start-up went (phases and their times), when the caller reported it.
    pub startup: Option<Arc<Startup>>,
    /// When the server started serving (Unix seconds): `/v1/models`' `created`.
    pub started_unix_s: u64,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.engine.is_running()
    }
}

/// openapi.yaml, as the JSON that /openapi.json serves.
pub fn openapi_json() -> Result<String, String> {
    let value: serde_json::Value =
        serde_yaml::from_str(OPENAPI_YAML).map_err(|e| format!("openapi.yaml: {e}"))?;
    serde_json::to_string(&value).map_err(|e| e.to_string())
}

pub fn app(state: Arc<AppState>) -> Router {
    let inference = Router::new()
        .route("/v1/caption", post(infer::caption))
        .route("/v1/vqa", post(infer::vqa))
        .route("/v1/features", post(features::features))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    // OpenAI's routes answer errors in OpenAI's shape, the API key's included.
    let openai = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route_layer(middleware::from_fn(openai::openai_errors));
    let mut router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route(
            "/docs",
            get(|| async { ([("x-content-type-options", "nosniff")], Html(DOCS_HTML)) }),
        )
        .merge(inference)
        .merge(openai)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes));
    if let Some(cors) = cors_layer(&state.cors_allow_origins) {
        router = router.layer(cors);
    }
    router
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::ACCEPT,
                header::HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([header::HeaderName::from_static("x-request-id")])
            .max_age(Duration::from_secs(600)),
    )
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The caller's `x-request-id` when it is a sane token, else a fresh one.
fn request_id(request: &Request) -> HeaderValue {
    let given = request
        .headers()
        .get("x-request-id")
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned();
    given.unwrap_or_else(|| {
        static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let prefix = PREFIX.get_or_init(rand::random::<u32>);
        let n = REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
        // Hex digits and a dash are always a valid header value; the fallback cannot be taken.
        HeaderValue::from_str(&format!("{prefix:08x}-{n:012x}"))
            .unwrap_or_else(|_| HeaderValue::from_static("request"))
    })
}

/// One line per request. Probes and scrapes (which balancers and Prometheus send every few
/// seconds) log at debug level unless they fail.
fn log_answer(endpoint: &str, status: StatusCode, elapsed: f64) {
    let code = status.as_u16();
    if status.is_server_error() && !matches!(endpoint, "/ready") {
        tracing::error!(status = code, head_seconds = elapsed, "answered");
    } else if matches!(endpoint, "/health" | "/ready" | "/metrics") {
        tracing::debug!(status = code, head_seconds = elapsed, "answered");
    } else {
        tracing::info!(status = code, head_seconds = elapsed, "answered");
    }
}

/// Request ids, a tracing span per request, and the request / error metrics.
async fn observe(State(s): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&request);
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().clone();
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or_default(),
        method = %method,
        endpoint = %endpoint,
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    let elapsed = started.elapsed().as_secs_f64();
    let status_label = status.as_u16().to_string();
    s.metrics
        .requests
        .with_label_values(&[&endpoint, &status_label])
        .inc();
    if let Some(ErrorType(kind)) = response.extensions().get::<ErrorType>() {
        s.metrics.errors.with_label_values(&[kind]).inc();
    }
    span.in_scope(|| log_answer(&endpoint, status, elapsed));
    response.headers_mut().insert("x-request-id", id);
    // The duration runs to the end of the body (for a stream, its last event; or the client
    // hanging up), not to the head.
    let duration = s
        .metrics
        .request_duration
        .with_label_values(&[&endpoint, &status_label]);
    response.map(|body| axum::body::Body::new(GuardedBody::new(body, Timed(duration, started))))
}

/// A response body that holds `guard` until its last frame is out (or the body is dropped, as
/// when the client hangs up): what must happen when a response ends, streams included, is the
/// guard's `Drop` (its duration recorded here; its connection's request count lowered in
/// `server`).
pub struct GuardedBody<G> {
    inner: axum::body::Body,
    guard: Option<G>,
}

impl<G> GuardedBody<G> {
    pub fn new(inner: axum::body::Body, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<G: Send + Unpin + 'static> http_body::Body for GuardedBody<G> {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Records a request's duration when dropped.
struct Timed(prometheus::Histogram, Instant);

impl Drop for Timed {
    fn drop(&mut self) {
        self.0.observe(self.1.elapsed().as_secs_f64());
    }
}

/// The bearer key on /v1/* when one is configured.
async fn authorize(State(s): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key: send Authorization: Bearer <key>",
            )
            .into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn ready(State(s): State<Arc<AppState>>) -> Response {
    if s.is_ready() {
        "ready".into_response()
    } else if !s.engine.is_running() {
        ApiError::unavailable("the model worker has stopped").into_response()
    } else {
        ApiError::unavailable("not ready (starting or draining)").into_response()
    }
}

async fn info(State(s): State<Arc<AppState>>) -> Response {
    Json(wire::Info {
        fixed: &s.info,
        startup: s.startup.as_ref().map(|st| st.info()),
        ready: s.is_ready(),
        queue_depth: s.metrics.queue_depth.get(),
        running_requests: s.metrics.running_requests.get(),
    })
    .into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn openapi(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        s.openapi_json.clone(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
