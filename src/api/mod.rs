//! HTTP: `POST /v1/caption`, `POST /v1/vqa` (JSON with a base64 or `data:` URL image; `stream`
//! for Server-Sent Events), `GET /health`, `/ready`, `/info`, `/metrics`. Handlers validate,
//! decode and preprocess off the async runtime (a bounded pool), tokenise, and hand a job to the
//! model worker; errors are `{error, error_type}` with the matching status.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

use crate::engine::{EngineHandle, Job, JobEvent, SubmitError};
use crate::generation::{GeneratedSequence, GenerationOverrides, GenerationParams};
use crate::preprocess::{ImageProcessor, PreprocessError};
use crate::prompt::PromptBuilder;

/// What the handlers share.
pub struct AppState {
    pub engine: EngineHandle,
    pub images: ImageProcessor,
    pub prompts: PromptBuilder,
    pub defaults: GenerationParams,
    /// "Question: {} Answer:" (OPT) or "Question: {} Short answer:" (T5).
    pub vqa_template: String,
    /// Bounds concurrent image decoding so a flood of large images cannot starve the runtime.
    pub decode_permits: Semaphore,
    pub info: serde_json::Value,
    pub ready: AtomicBool,
    pub metrics: prometheus::Registry,
    pub requests: prometheus::IntCounterVec,
    pub latency: prometheus::HistogramVec,
    pub body_limit: usize,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error_type: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
        }
    }
    fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(serde_json::json!({"error": self.message, "error_type": self.error_type})),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        response
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionRequest {
    image: String,
    prompt: Option<String>,
    #[serde(default)]
    parameters: GenerationOverrides,
    #[serde(default)]
    stream: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqaRequest {
    image: String,
    question: String,
    #[serde(default)]
    parameters: GenerationOverrides,
    #[serde(default)]
    stream: bool,
}

#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: usize,
    generated_tokens: usize,
}

#[derive(Debug, Serialize)]
struct SequenceOut {
    text: String,
    finish_reason: crate::generation::FinishReason,
    token_ids: Vec<u32>,
}

pub fn app(state: Arc<AppState>) -> Router {
    let limit = state.body_limit;
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/v1/caption", post(caption))
        .route("/v1/vqa", post(vqa))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn ready(State(s): State<Arc<AppState>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "not ready").into_response()
    }
}

async fn info(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(s.info.clone())
}

async fn metrics(State(s): State<Arc<AppState>>) -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&s.metrics.gather())
        .unwrap_or_default()
}

/// `image`: base64, or a `data:<mime>;base64,` URL.
fn image_bytes(image: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match image.strip_prefix("data:") {
        Some(rest) => rest.split_once(";base64,").map(|(_, b)| b).ok_or_else(|| {
            ApiError::validation("a data: URL image must be base64 (data:<type>;base64,...)")
        })?,
        None => image,
    };
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::validation(format!("image is not valid base64: {e}")))
}

async fn caption(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req: CaptionRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let stream = req.stream || wants_sse(&headers);
    run(
        s,
        "caption",
        req.image,
        req.prompt,
        req.parameters,
        stream,
        "text",
    )
    .await
}

async fn vqa(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req: VqaRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if req.question.trim().is_empty() {
        return ApiError::validation("question is empty").into_response();
    }
    let prompt = s.vqa_template.replace("{}", req.question.trim());
    let stream = req.stream || wants_sse(&headers);
    run(
        s.clone(),
        "vqa",
        req.image,
        Some(prompt),
        req.parameters,
        stream,
        "answer",
    )
    .await
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let status = if e.is_syntax() || e.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError::new(status, "validation", format!("invalid request body: {e}"))
    })
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

async fn run(
    s: Arc<AppState>,
    endpoint: &'static str,
    image: String,
    prompt: Option<String>,
    parameters: GenerationOverrides,
    stream: bool,
    text_field: &'static str,
) -> Response {
    let started = Instant::now();
    let response = match submit(&s, image, prompt, parameters).await {
        Err(e) => e.into_response(),
        Ok((rx, cancel, prompt_tokens)) if stream => sse(rx, cancel, prompt_tokens, text_field),
        Ok((rx, cancel, prompt_tokens)) => collect(rx, cancel, prompt_tokens, text_field).await,
    };
    let status = response.status().as_u16().to_string();
    s.requests.with_label_values(&[endpoint, &status]).inc();
    s.latency
        .with_label_values(&[endpoint])
        .observe(started.elapsed().as_secs_f64());
    response
}

type Submitted = (mpsc::UnboundedReceiver<JobEvent>, Arc<AtomicBool>, usize);

async fn submit(
    s: &Arc<AppState>,
    image: String,
    prompt: Option<String>,
    parameters: GenerationOverrides,
) -> Result<Submitted, ApiError> {
    if !s.ready.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is not ready",
        ));
    }
    let params = parameters.apply(s.defaults.clone());
    params
        .validate()
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let prompt = s
        .prompts
        .build(prompt.as_deref())
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let bytes = image_bytes(&image)?;
    let permit = s.decode_permits.acquire().await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "shutting down",
        )
    })?;
    let images = s.images.clone();
    let pixels = tokio::task::spawn_blocking(move || images.pixel_values(&bytes))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "image worker failed",
            )
        })?
        .map_err(|e| {
            let (status, kind) = match e {
                PreprocessError::TooManyBytes { .. } | PreprocessError::TooManyPixels { .. } => {
                    (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large")
                }
                PreprocessError::UnknownFormat => {
                    (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image")
                }
                _ => (StatusCode::BAD_REQUEST, "invalid_image"),
            };
            ApiError::new(status, kind, e.to_string())
        })?;
    drop(permit);
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let prompt_tokens = prompt.text_ids.len();
    let job = Job {
        pixel_values: pixels,
        prompt,
        params,
        events: tx,
        cancel: cancel.clone(),
    };
    s.engine.try_submit(job).map_err(|e| match e {
        SubmitError::QueueFull(_) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", e.to_string())
        }
        SubmitError::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    })?;
    Ok((rx, cancel, prompt_tokens))
}

/// Cancels the job when dropped (the client went away before it finished).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn final_body(
    seqs: &[GeneratedSequence],
    prompt_tokens: usize,
    text_field: &str,
) -> serde_json::Value {
    let first = &seqs[0];
    let mut body = serde_json::json!({
        "finish_reason": first.finish_reason,
        "usage": Usage { prompt_tokens, generated_tokens: first.token_ids.len() },
    });
    body[text_field] = serde_json::Value::String(first.text.clone());
    if seqs.len() > 1 {
        body["sequences"] = serde_json::to_value(
            seqs.iter()
                .map(|q| SequenceOut {
                    text: q.text.clone(),
                    finish_reason: q.finish_reason,
                    token_ids: q.token_ids.clone(),
                })
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default();
    }
    body
}

async fn collect(
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
    cancel: Arc<AtomicBool>,
    prompt_tokens: usize,
    text_field: &str,
) -> Response {
    let _guard = CancelOnDrop(cancel);
    while let Some(event) = rx.recv().await {
        match event {
            JobEvent::Token { .. } => {}
            JobEvent::Done(seqs) if !seqs.is_empty() => {
                return Json(final_body(&seqs, prompt_tokens, text_field)).into_response();
            }
            JobEvent::Done(_) => break,
            JobEvent::Error(e) => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e)
                    .into_response();
            }
        }
    }
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the model worker dropped the request",
    )
    .into_response()
}

fn sse(
    rx: mpsc::UnboundedReceiver<JobEvent>,
    cancel: Arc<AtomicBool>,
    prompt_tokens: usize,
    text_field: &'static str,
) -> Response {
    let guard = CancelOnDrop(cancel);
    let stream = futures_util::stream::unfold(
        (rx, Some(guard)),
        move |(mut rx, guard)| async move {
            guard.as_ref()?;
            let event = match rx.recv().await {
            Some(JobEvent::Token { id, text, logprob }) => {
                let data = serde_json::json!({"token": {"id": id, "text": text, "logprob": logprob}});
                return Some((Ok::<_, Infallible>(Event::default().data(data.to_string())), (rx, guard)));
            }
            Some(JobEvent::Done(seqs)) if !seqs.is_empty() => {
                Event::default().data(final_body(&seqs, prompt_tokens, text_field).to_string())
            }
            Some(JobEvent::Error(e)) => Event::default()
                .event("error")
                .data(serde_json::json!({"error": e, "error_type": "internal"}).to_string()),
            _ => Event::default()
                .event("error")
                .data(serde_json::json!({"error": "the model worker dropped the request", "error_type": "internal"}).to_string()),
        };
            // The last event; the next poll ends the stream.
            Some((Ok(event), (rx, None)))
        },
    );
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
