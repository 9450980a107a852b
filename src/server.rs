//! `run(pipeline, options, listener, shutdown)`: the HTTP server around one loaded model. Tests
//! start it on 127.0.0.1:0 and stop it through `shutdown`; `main` passes SIGTERM/SIGINT.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::{app, AppState};
use crate::engine::{self, EngineConfig};
use crate::model::TextConfig;
use crate::pipeline::Blip2Pipeline;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub engine: EngineConfig,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Images decoded at once (a bounded pool off the async runtime).
    pub decode_concurrency: usize,
    /// Reported by `/info`.
    pub model_id: String,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            max_body_bytes: 32 * 1024 * 1024,
            decode_concurrency: 2,
            model_id: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub async fn run(
    pipeline: Blip2Pipeline,
    options: ServeOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let images = pipeline.images.clone();
    let prompts = pipeline.prompts.clone();
    let defaults = pipeline.default_params();
    let vqa_template = match pipeline.model.config.text {
        TextConfig::Opt(_) => "Question: {} Answer:",
        TextConfig::T5(_) => "Question: {} Short answer:",
    }
    .to_string();
    let info = serde_json::json!({
        "model_id": options.model_id,
        "model_type": pipeline.model.config.text.model_type(),
        "dtype": format!("{:?}", pipeline.model.dtype()).to_lowercase(),
        "device": "cpu",
        "max_batch_size": options.engine.max_batch_size,
        "max_queue": options.engine.max_queue,
        "max_body_bytes": options.max_body_bytes,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let (engine, worker) = engine::start(pipeline, options.engine.clone());
    let metrics = prometheus::Registry::new();
    let requests = prometheus::IntCounterVec::new(
        prometheus::Opts::new("blip2_requests_total", "Requests by endpoint and status"),
        &["endpoint", "status"],
    )?;
    let latency = prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new(
            "blip2_request_duration_seconds",
            "Request duration by endpoint",
        ),
        &["endpoint"],
    )?;
    metrics.register(Box::new(requests.clone()))?;
    metrics.register(Box::new(latency.clone()))?;
    let state = Arc::new(AppState {
        engine,
        images,
        prompts,
        defaults,
        vqa_template,
        decode_permits: Semaphore::new(options.decode_concurrency.max(1)),
        info,
        ready: AtomicBool::new(true),
        metrics,
        requests,
        latency,
        body_limit: options.max_body_bytes,
    });
    let draining = state.clone();
    let router = app(state.clone());
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // /ready turns 503 while in-flight requests finish.
            draining.ready.store(false, Ordering::Relaxed);
        })
        .await?;
    drop(state);
    // The worker ends once every handle is gone and its running requests are done.
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    Ok(())
}
