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
    /// Image URL fetches, by result (ok, error).
    pub image_fetch_duration: HistogramVec,
    /// Image feature cache lookups, by result (hit, miss).
    pub image_cache: IntCounterVec,
}

/// Makes metrics and registers each one as it is made (the struct keeps a handle, the registry
/// another).
struct Registrar(Registry);

impl Registrar {
    fn add<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        metric: Result<M, prometheus::Error>,
    ) -> Result<M, prometheus::Error> {
        let metric = metric?;
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }
    fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
    ) -> prometheus::Result<Histogram> {
        self.add(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(buckets),
        ))
    }
    fn counters(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registrar(Registry::new());
        let latency = exponential_buckets(0.001, 2.0, 18)?;
        let request_duration = r.add(HistogramVec::new(
            HistogramOpts::new(
                "blip2_request_duration_seconds",
                concat!(
                    "Time from the request to the end of its response body ",
                    "(a stream: its last event), by endpoint and status"
                ),
            )
            .buckets(latency.clone()),
            &["endpoint", "status"],
        ))?;
        Ok(Self {
            requests: r.counters(
                "blip2_requests_total",
                "Requests by endpoint and status",
                &["endpoint", "status"],
            )?,
            request_duration,
            errors: r.counters(
                "blip2_errors_total",
                "Error answers by error_type",
                &["error_type"],
            )?,
            preprocess_duration: r.histogram(
                "blip2_preprocess_duration_seconds",
                "Image decode and preprocessing time",
                latency.clone(),
            )?,
            queue_duration: r.histogram(
                "blip2_queue_duration_seconds",
                "Time from submission to admission into the batch",
                latency.clone(),
            )?,
            time_to_first_token: r.histogram(
                "blip2_time_to_first_token_seconds",
                "Time from submission to the first token",
                latency.clone(),
            )?,
            inter_token_latency: r.histogram(
                "blip2_inter_token_latency_seconds",
                "Time between two tokens of one request",
                latency,
            )?,
            generated_tokens: r.histogram(
                "blip2_generated_tokens",
                "New tokens per finished request",
                exponential_buckets(1.0, 2.0, 13)?,
            )?,
            batch_size: r.histogram(
                "blip2_batch_size",
                "Requests in the running batch at each decode step",
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0],
            )?,
            queue_depth: r.add(IntGauge::new(
                "blip2_queue_depth",
                "Requests waiting for admission",
            ))?,
            running_requests: r.add(IntGauge::new(
                "blip2_running_requests",
                "Requests in the running batch",
            ))?,
            cancelled: r.add(IntCounter::new(
                "blip2_cancelled_requests_total",
                "Requests stopped because the client went away or timed out",
            ))?,
            image_fetch_duration: r.add(HistogramVec::new(
                HistogramOpts::new(
                    "blip2_image_fetch_duration_seconds",
                    "Time to fetch an image URL, by result (ok, error)",
                )
                .buckets(exponential_buckets(0.001, 2.0, 15)?),
                &["result"],
            ))?,
            image_cache: r.counters(
                "blip2_image_cache_lookups_total",
                "Vision + Q-Former cache lookups by result",
                &["result"],
            )?,
            registry: r.0,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
