//! Prometheus metrics, shared by the HTTP layer and the model worker. Every name starts with
//! `blip2_`; README.md lists them.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// Requests by endpoint (route) and status code.
    pub requests: IntCounterVec,
    /// Time from the request to the end of its response body, by endpoint and status (for a
    /// stream, its last event; its tokens are also in time_to_first_token /
    /// inter_token_latency). Recorded when the body ends, so while streams run its count lags
    /// `requests`.
    pub request_duration: HistogramVec,
    /// Error answers (and stream error events) by error_type.
    pub errors: IntCounterVec,
    /// Decode + preprocess of one image, off the async runtime.
    pub preprocess_duration: Histogram,
    /// From submission to admission into the running batch.
    pub queue_duration: Histogram,
    /// From submission to the first generated token.
    pub time_to_first_token: Histogram,
    /// Between two tokens of one request.
    pub inter_token_latency: Histogram,
    /// New tokens per finished request (its first sequence).
    pub generated_tokens: Histogram,
    /// Requests in the running batch, observed at every decode step.
    pub batch_size: Histogram,
    /// Jobs waiting for admission.
    pub queue_depth: IntGauge,
    /// Requests in the running batch.
    pub running_requests: IntGauge,
    /// Requests stopped because the client went away or the timeout passed.
    pub cancelled: IntCounter,
    /// Image feature cache lookups, by result (hit, miss).
    pub image_cache: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let buckets = exponential_buckets(0.001, 2.0, 18)?;
        let latency = || buckets.clone();
        let requests = IntCounterVec::new(
            Opts::new("blip2_requests_total", "Requests by endpoint and status"),
            &["endpoint", "status"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "blip2_request_duration_seconds",
                concat!(
                    "Time from the request to the end of its response body ",
                    "(a stream: its last event), by endpoint and status"
                ),
            )
            .buckets(latency()),
            &["endpoint", "status"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new("blip2_errors_total", "Error answers by error_type"),
            &["error_type"],
        )?;
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        let preprocess_duration = histogram(
            "blip2_preprocess_duration_seconds",
            "Image decode and preprocessing time",
            latency(),
        )?;
        let queue_duration = histogram(
            "blip2_queue_duration_seconds",
            "Time from submission to admission into the batch",
            latency(),
        )?;
        let time_to_first_token = histogram(
            "blip2_time_to_first_token_seconds",
            "Time from submission to the first token",
            latency(),
        )?;
        let inter_token_latency = histogram(
            "blip2_inter_token_latency_seconds",
            "Time between two tokens of one request",
            latency(),
        )?;
        let generated_tokens = histogram(
            "blip2_generated_tokens",
            "New tokens per finished request",
            exponential_buckets(1.0, 2.0, 13)?,
        )?;
        let batch_size = histogram(
            "blip2_batch_size",
            "Requests in the running batch at each decode step",
            vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0],
        )?;
        let queue_depth = IntGauge::new("blip2_queue_depth", "Requests waiting for admission")?;
        let running_requests =
            IntGauge::new("blip2_running_requests", "Requests in the running batch")?;
        let cancelled = IntCounter::new(
            "blip2_cancelled_requests_total",
            "Requests stopped because the client went away or timed out",
        )?;
        let image_cache = IntCounterVec::new(
            Opts::new(
                "blip2_image_cache_lookups_total",
                "Vision + Q-Former cache lookups by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(preprocess_duration.clone()))?;
        registry.register(Box::new(queue_duration.clone()))?;
        registry.register(Box::new(time_to_first_token.clone()))?;
        registry.register(Box::new(inter_token_latency.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(running_requests.clone()))?;
        registry.register(Box::new(cancelled.clone()))?;
        registry.register(Box::new(image_cache.clone()))?;
        Ok(Self {
            registry,
            requests,
            request_duration,
            errors,
            preprocess_duration,
            queue_duration,
            time_to_first_token,
            inter_token_latency,
            generated_tokens,
            batch_size,
            queue_depth,
            running_requests,
            cancelled,
            image_cache,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
