//! `run(pipeline, options, listener, shutdown)`: the HTTP server around one loaded model. Tests
//! start it on 127.0.0.1:0 and stop it through `shutdown`; `main` passes SIGTERM/SIGINT.
//! `start(pipeline, options)` is its first half (the engine and the handlers' state), for
//! callers that send requests in process (the fuzz targets).
//!
//! On shutdown `/ready` answers 503 at once while requests are still accepted and served for
//! `shutdown_delay` (a balancer probing `/ready` stops sending first); then the listener stops
//! accepting and in-flight requests get `shutdown_grace` to finish; then `run` returns (the
//! process exits 0).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::fetch::UrlPolicy;
use crate::api::wire::StaticInfo;
use crate::api::{app, openapi_json, AppState, GuardedBody, Limits};
use crate::config::ServerConfig;
use crate::engine::{self, EngineConfig};
use crate::metrics::Metrics;
use crate::pipeline::Blip2Pipeline;
use crate::startup::Startup;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub engine: EngineConfig,
    pub max_body_bytes: usize,
    /// Memory budget of bodies being read and decoded (`max_buffered_bytes`), and how long a
    /// request waits for room in it.
    pub max_buffered_bytes: usize,
    pub max_buffered_wait: Duration,
    pub max_concurrent_requests: usize,
    /// Per connection: the request-head timeout; and how many are open at once.
    pub connections: ConnectionLimits,
    /// The whole request body must arrive within this long (408 after it).
    pub body_timeout: Duration,
    pub request_timeout: Option<Duration>,
    pub max_images_per_request: usize,
    /// Resize images to this size instead of the checkpoint's (`image_size`).
    pub image_size: Option<crate::preprocess::ImageSize>,
    /// Largest side a request's `image_size` may ask for.
    pub max_image_side: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    /// Images decoded at once (a bounded pool off the async runtime).
    pub preprocess_workers: usize,
    /// VQA prompt per `model_type` (the `vqa_template_<model_type>` keys); a family without
    /// one uses its own default.
    pub vqa_templates: std::collections::BTreeMap<String, String>,
    pub api_key: Option<String>,
    pub cors_allow_origins: Vec<String>,
    /// Which image URLs may be fetched (`image_url_*`).
    pub url_policy: UrlPolicy,
    pub shutdown_delay: Duration,
    pub shutdown_grace: Duration,
    /// Reported by `/info`.
    pub model_id: String,
    pub revision: String,
    /// Reported by `/info`: "none", "q8_0", "q4k" or "int8".
    pub quantize: String,
    /// Reported by `/info`: how start-up went, when the caller tracked it.
    pub startup: Option<Arc<Startup>>,
}

impl ServeOptions {
    pub fn from_config(c: &ServerConfig) -> Self {
        Self {
            engine: EngineConfig::from_config(c),
            max_body_bytes: c.max_body_bytes,
            max_buffered_bytes: c.max_buffered_bytes,
            max_buffered_wait: Duration::from_millis(c.max_buffered_wait_ms),
            max_concurrent_requests: c.max_concurrent_requests,
            connections: ConnectionLimits {
                header_timeout: Duration::from_secs(c.header_timeout_s),
                max_connections: c.max_connections,
            },
            body_timeout: Duration::from_secs(c.body_timeout_s),
            request_timeout: (c.request_timeout_s > 0)
                .then(|| Duration::from_secs(c.request_timeout_s)),
            max_images_per_request: c.max_images_per_request,
            // Validated with the rest of the settings.
            image_size: c.default_image_size().and_then(Result::ok),
            max_image_side: c.max_image_side,
            max_prompt_tokens: c.max_prompt_tokens,
            max_new_tokens: c.max_new_tokens,
            preprocess_workers: c.preprocess_workers,
            vqa_templates: c.vqa_templates(),
            api_key: (!c.api_key.is_empty()).then(|| c.api_key.clone()),
            cors_allow_origins: c.cors_allow_origins.clone(),
            url_policy: UrlPolicy {
                allowed_hosts: c.image_url_allowed_hosts.clone(),
                allow_private: c.image_url_allow_private,
                max_redirects: c.image_url_max_redirects,
                timeout: Duration::from_secs(c.image_url_timeout_s),
                max_bytes: c.max_image_bytes,
            },
            shutdown_delay: Duration::from_secs(c.shutdown_delay_s),
            shutdown_grace: Duration::from_secs(c.shutdown_grace_s),
            model_id: c.model.clone(),
            revision: c.revision.clone(),
            quantize: c.quantize.as_str().to_string(),
            startup: None,
        }
    }
}

impl Default for ServeOptions {
    /// What config/default.toml says.
    fn default() -> Self {
        Self::from_config(&ServerConfig::defaults())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    OpenApi(String),
    #[error("invalid setting `image_size`: {0}")]
    ImageSize(String),
}

/// What `/info` reports that does not change while the server runs.
fn static_info(
    options: &ServeOptions,
    model_type: &str,
    pipeline: &Blip2Pipeline,
    vqa_template: &str,
) -> StaticInfo {
    StaticInfo {
        model_id: options.model_id.clone(),
        revision: options.revision.clone(),
        model_type: model_type.to_string(),
        dtype: format!("{:?}", pipeline.model.dtype()).to_lowercase(),
        quantize: options.quantize.clone(),
        device: crate::device::location(pipeline.model.device()),
        device_name: crate::device::hardware_name(pipeline.model.device()),
        kernels: crate::nn::kernels().as_str().to_string(),
        max_batch_size: options.engine.max_batch_size,
        max_batch_tokens: options.engine.max_batch_tokens,
        max_queue: options.engine.max_queue,
        max_concurrent_requests: options.max_concurrent_requests,
        max_body_bytes: options.max_body_bytes,
        max_images_per_request: options.max_images_per_request,
        image_size: [pipeline.images.height, pipeline.images.width],
        max_image_side: options.max_image_side,
        patch_size: pipeline.model.config.vision.patch_size,
        max_prompt_tokens: options.max_prompt_tokens,
        max_new_tokens: options.max_new_tokens,
        request_timeout_s: options.request_timeout.map(|t| t.as_secs()),
        vqa_template: vqa_template.to_string(),
        version: env!("CARGO_PKG_VERSION"),
    }
}

/// The handlers' shared state around a started engine, and the engine's worker thread (it ends
/// once every handle to the engine is dropped and its running requests are done). `run` serves
/// `api::app(state)` on a socket; in-process callers (the fuzz targets) send it requests with
/// `tower::ServiceExt::oneshot`.
pub fn start(
    mut pipeline: Blip2Pipeline,
    options: &ServeOptions,
) -> Result<(Arc<AppState>, std::thread::JoinHandle<()>), ServeError> {
    if let Some(size) = options.image_size {
        pipeline
            .resize_images_to(size, options.max_image_side)
            .map_err(|e| ServeError::ImageSize(e.to_string()))?;
    }
    let images = pipeline.images.clone();
    let prompts = pipeline.prompts.clone();
    let defaults = pipeline.default_params();
    let lm = pipeline.model.language_model.as_ref();
    let vqa_template = options
        .vqa_templates
        .get(lm.model_type())
        .cloned()
        .unwrap_or_else(|| lm.default_vqa_template().to_string());
    let limits = Limits {
        max_body_bytes: options.max_body_bytes,
        max_images_per_request: options.max_images_per_request,
        max_prompt_tokens: options.max_prompt_tokens,
        max_new_tokens: options.max_new_tokens,
        max_batch_tokens: options.engine.max_batch_tokens,
        num_query_tokens: pipeline.model.config.num_query_tokens,
        lm_hidden_size: pipeline.model.config.text.hidden_size(),
        patch_size: pipeline.model.config.vision.patch_size,
        max_image_side: options.max_image_side,
        max_positions: lm.position_limit(),
        request_timeout: options.request_timeout,
        body_timeout: options.body_timeout,
    };
    let info = static_info(options, lm.model_type(), &pipeline, &vqa_template);
    let metrics = Arc::new(Metrics::new()?);
    let (engine, worker) = engine::start(pipeline, options.engine.clone(), metrics.clone());
    let state = Arc::new(AppState {
        engine,
        images,
        prompts,
        defaults,
        vqa_template,
        decode_permits: Semaphore::new(options.preprocess_workers.max(1)),
        in_flight: Arc::new(Semaphore::new(options.max_concurrent_requests.max(1))),
        buffered: crate::api::ByteBudget::new(
            options.max_buffered_bytes,
            options.max_buffered_wait,
            options.max_body_bytes,
        ),
        info,
        ready: AtomicBool::new(true),
        metrics,
        limits,
        api_key: options.api_key.clone(),
        cors_allow_origins: options.cors_allow_origins.clone(),
        url_policy: options.url_policy.clone(),
        resolve: crate::api::fetch::system_resolver(),
        openapi_json: openapi_json().map_err(ServeError::OpenApi)?,
        startup: options.startup.clone(),
        started_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    Ok((state, worker))
}

pub async fn run(
    pipeline: Blip2Pipeline,
    options: ServeOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (state, worker) = start(pipeline, &options)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let draining = state.clone();
    let delay = options.shutdown_delay;
    tokio::spawn(async move {
        shutdown.await;
        // /ready turns 503 first, while new requests are still served: balancers that probe it
        // take this replica out of rotation before the listener closes.
        draining.ready.store(false, Ordering::Relaxed);
        if !delay.is_zero() {
            tracing::info!(
                seconds = delay.as_secs(),
                "shutting down: /ready answers 503, still serving (shutdown_delay_s)"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!("shutting down: listener closed, draining in-flight requests");
        let _ = stop_tx.send(true);
    });
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    };
    let router = app(state.clone());
    let serve = serve_connections(
        listener,
        router,
        options.connections,
        wait_stop(stop_rx.clone()),
    );
    let grace = options.shutdown_grace;
    let drained = tokio::select! {
        served = serve => { served?; true }
        _ = async { wait_stop(stop_rx.clone()).await; tokio::time::sleep(grace).await } => false,
    };
    if !drained {
        tracing::warn!(
            seconds = grace.as_secs(),
            "grace period over: exiting with requests still in flight"
        );
        return Ok(());
    }
    drop(state);
    // The worker ends once every handle is gone and its running requests are done.
    let _ = tokio::time::timeout(grace, tokio::task::spawn_blocking(move || worker.join())).await;
    Ok(())
}

/// What each connection may take: the time a request head has to arrive (counted from when the
/// connection starts waiting for it, so it also ends idle keep-alive connections), and how many
/// connections are open at once (more wait in the listen backlog).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// One connection's requests in progress (from the request's head to its response's last
/// byte), and since when it has had none.
struct Activity(std::sync::Mutex<(usize, tokio::time::Instant)>);

/// A request in progress on its connection, until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self(std::sync::Mutex::new((0, tokio::time::Instant::now())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, tokio::time::Instant)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.lock().0 += 1;
        Busy(self.clone())
    }

    /// Resolves once the connection has had no request in progress for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let (busy, since) = *self.lock();
            let wake = if busy == 0 {
                if since.elapsed() >= limit {
                    return;
                }
                since + limit
            } else {
                tokio::time::Instant::now() + limit
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.0 -= 1;
        if state.0 == 0 {
            state.1 = tokio::time::Instant::now();
        }
    }
}

/// Accepts connections on `listener` and serves `router` on each (HTTP/1 and HTTP/2), within
/// `limits`, until `stop` resolves; then stops accepting, lets every connection finish its
/// requests (graceful shutdown) and returns when the last one closes.
async fn serve_connections(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Closed (all senders gone) when the server stops: each connection shuts down gracefully.
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(());
    // Each connection holds a receiver: the last to close ends the wait below.
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    let mut stop = std::pin::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(std::io::Error::other)?,
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors or a connection reset before it was accepted:
                    // not fatal; back off a little and go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let service = {
            let (router, activity) = (router.clone(), activity.clone());
            tower::service_fn(
                move |request: axum::extract::Request<hyper::body::Incoming>| {
                    let busy = activity.begin();
                    let router = router.clone();
                    async move {
                        let response =
                            tower::ServiceExt::oneshot(router, request.map(axum::body::Body::new))
                                .await?;
                        // Busy until the whole body is sent (an SSE stream included).
                        Ok::<_, std::convert::Infallible>(
                            response
                                .map(|body| axum::body::Body::new(GuardedBody::new(body, busy))),
                        )
                    }
                },
            )
        };
        let service = hyper_util::service::TowerToHyperService::new(service);
        let (mut stopping, open) = (stopping_rx.clone(), open_rx.clone());
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopping.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                _ = activity.idle_for(limits.header_timeout) => {
                    // Nothing in progress for a whole header timeout: a client that never sent
                    // a byte, one still sending HTTP/2's preface or a request's HEADERS, or an
                    // idle HTTP/2 connection (hyper times out only HTTP/1 heads). Closed
                    // gracefully (HTTP/2 GOAWAY); if it will not close, dropped.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(limits.header_timeout, conn).await;
                }
            }
            drop((slot, open));
        });
    }
    drop(listener);
    drop(stopping_tx);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// Serves the loading routes ([`crate::api::loading_app`]) on `listener` until `stop` resolves,
/// then closes it; the caller then serves the model on the same socket (a clone of it), so a
/// probe or request in between waits in the backlog instead of being refused.
pub async fn serve_loading(
    listener: TcpListener,
    startup: Arc<Startup>,
    model_id: String,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = crate::api::loading_app(startup, model_id);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await?;
    Ok(())
}
