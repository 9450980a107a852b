//! The model worker: one OS thread owns the loaded model and runs continuous batching.
//!
//! Callers (the HTTP handlers, the tests) decode and preprocess images and tokenise prompts
//! themselves, then submit a [`Job`] through a cloneable [`EngineHandle`]. The queue is bounded:
//! a full queue is refused at once ([`SubmitError::QueueFull`], a 429 to a client). Between two
//! decode steps the worker admits waiting jobs (their vision + Q-Former + prefill run as one
//! batch) into the running [`DecodeBatch`], within `max_batch_size` and the `max_batch_tokens`
//! budget, and retires finished requests, so a short request never waits for a long one. A job
//! whose event receiver is gone (client disconnected) or whose `cancel` flag is set is stopped at
//! the next step and frees its rows. Vision + Q-Former outputs of recent images are kept in a
//! small cache keyed by content ([`cache`]).

mod cache;
mod scheduler;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::generation::{GeneratedSequence, GenerationParams};
use crate::metrics::Metrics;
use crate::model::ModelError;
use crate::pipeline::Blip2Pipeline;
use crate::prompt::Prompt;
use cache::FeatureCache;
use scheduler::Scheduler;
use worker::Worker;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most requests decoding together.
    pub max_batch_size: usize,
    /// Token budget of the running batch (see [`job_tokens`]).
    pub max_batch_tokens: usize,
    /// Most jobs waiting for admission.
    pub max_queue: usize,
    /// How long an idle worker, given a first job, waits for requests whose bodies have
    /// arrived and are being preprocessed (see [`EngineHandle::incoming`]) so that a burst starts as one
    /// batch. With none on their way it starts at once.
    pub max_wait: Duration,
    /// Recent images whose query embeddings are kept (0 = no cache).
    pub image_cache_size: usize,
}

impl EngineConfig {
    /// The engine's share of the server's settings.
    pub fn from_config(c: &crate::config::ServerConfig) -> Self {
        Self {
            max_batch_size: c.max_batch_size,
            max_batch_tokens: c.max_batch_tokens,
            max_queue: c.max_queue,
            max_wait: Duration::from_millis(c.max_wait_ms),
            image_cache_size: c.image_cache_size,
        }
    }
}

impl Default for EngineConfig {
    /// What config/default.toml says.
    fn default() -> Self {
        Self::from_config(&crate::config::ServerConfig::defaults())
    }
}

/// What a job costs in the batch's token budget: every row it occupies (beams, or returned
/// sequences) holds the query tokens, the prompt and up to `max_new_tokens` new ones.
pub fn job_tokens(num_query_tokens: usize, prompt: &Prompt, params: &GenerationParams) -> usize {
    let rows = params.num_beams.max(params.num_return_sequences).max(1);
    (num_query_tokens + prompt.text_ids.len() + params.max_new_tokens) * rows
}

/// What `/v1/features` returns for an image (the reference's `get_image_features` outputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureStage {
    /// The vision model's `last_hidden_state` [tokens, Dv].
    Vision,
    /// Its `pooler_output` [Dv].
    VisionPooled,
    /// The Q-Former's `last_hidden_state` [queries, Dq].
    QFormer,
    /// The language projection of it [queries, D_lm]: what the language model is conditioned on.
    Projected,
}

/// One request for the worker: preprocessed pixels [3, H, W], the prompt, its settings; or,
/// with `features`, one image's features (no generation: prompt and settings unused).
pub struct Job {
    pub pixel_values: Vec<f32>,
    /// The size `pixel_values` were resized to; `None`: the processor's (the checkpoint's).
    /// Jobs of different sizes run the vision encoder in separate batches.
    pub image_size: Option<crate::preprocess::ImageSize>,
    pub prompt: Prompt,
    pub params: GenerationParams,
    pub features: Option<FeatureStage>,
    /// The image as its language-model inputs ([queries, D_lm] row-major, a `/v1/features`
    /// `projected` answer) instead of pixels: vision and Q-Former are skipped.
    pub query_embeds: Option<Vec<f32>>,
    pub events: mpsc::UnboundedSender<JobEvent>,
    /// Set by the caller to stop the job at the next step.
    pub cancel: Arc<AtomicBool>,
    /// When the caller submitted it (queue time and time to first token count from here).
    pub submitted: Instant,
}

impl Job {
    /// A job and the receiver of its events.
    pub fn new(
        pixel_values: Vec<f32>,
        prompt: Prompt,
        params: GenerationParams,
    ) -> (Self, mpsc::UnboundedReceiver<JobEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let job = Self {
            pixel_values,
            image_size: None,
            prompt,
            params,
            features: None,
            query_embeds: None,
            events,
            cancel: Arc::new(AtomicBool::new(false)),
            submitted: Instant::now(),
        };
        (job, rx)
    }
}

impl Job {
    /// A features job for one image, and the receiver of its answer
    /// ([`JobEvent::Features`]).
    pub fn features(
        pixel_values: Vec<f32>,
        stage: FeatureStage,
    ) -> (Self, mpsc::UnboundedReceiver<JobEvent>) {
        let prompt = Prompt {
            text_ids: Vec::new(),
        };
        let params = GenerationParams {
            max_new_tokens: 0,
            ..GenerationParams::default()
        };
        let (mut job, rx) = Self::new(pixel_values, prompt, params);
        job.features = Some(stage);
        (job, rx)
    }
}

/// What a job hears back.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// A features job's answer: row-major f32 values of `shape` (no batch dimension).
    Features { shape: Vec<usize>, data: Vec<f32> },
    /// A streamed token (requests with one sequence and no beams).
    Token { id: u32, text: String, logprob: f32 },
    /// The job is finished: its sequences (one, or `num_return_sequences`).
    Done(Vec<GeneratedSequence>),
    /// The job failed (the model refused it, or its batch failed); the worker goes on.
    Error(EngineError),
}

/// Why a job failed, by kind: `api/` maps each kind to its status. Carried over the job's channel
/// (so it is `Clone`), and reads as its message (`Deref<Target = str>`) for logs and clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The model refuses this request's input (a setting, an empty prompt).
    #[error("{0}")]
    InvalidRequest(String),
    /// Query + prompt + new tokens do not fit the model's positions.
    #[error("{0}")]
    TooLong(String),
    /// A failure that is not the request's fault: a tensor op failed, the model panicked.
    #[error("{0}")]
    Internal(String),
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Input(m) => Self::InvalidRequest(m),
            ModelError::TooLong(m) => Self::TooLong(m),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl EngineError {
    fn panicked() -> Self {
        Self::Internal("internal error in the model worker".to_string())
    }
}

impl std::ops::Deref for EngineError {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Self::InvalidRequest(m) | Self::TooLong(m) | Self::Internal(m) => m,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the model worker has stopped")]
    Stopped,
}

/// A cloneable handle to the worker's queue.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    max_queue: usize,
    metrics: Arc<Metrics>,
    incoming: Arc<AtomicUsize>,
}

/// A request on its way to the queue (being read, decoded, preprocessed); see
/// [`EngineHandle::incoming`]. Dropping it says it has arrived or failed.
pub struct Incoming(Arc<AtomicUsize>);

impl Drop for Incoming {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EngineHandle {
    /// Tells the worker a request is on its way, until the guard is dropped (after
    /// [`EngineHandle::try_submit`], or on failure). An idle worker holding a first job waits
    /// for such requests, up to `max_wait`, so that requests arriving together are batched
    /// together: their vision encoder and prefill run as one batch and they decode in step.
    pub fn incoming(&self) -> Incoming {
        self.incoming.fetch_add(1, Ordering::AcqRel);
        Incoming(self.incoming.clone())
    }

    pub fn try_submit(&self, job: Job) -> Result<(), SubmitError> {
        self.metrics.queue_depth.inc();
        self.tx.try_send(job).map_err(|e| {
            self.metrics.queue_depth.dec();
            match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull(self.max_queue),
                mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
            }
        })
    }

    /// False once the worker thread has ended.
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// Starts the worker thread on `pipeline`. It stops when every handle is dropped and the running
/// requests are done.
pub fn start(
    pipeline: Blip2Pipeline,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.max_queue.max(1));
    let incoming = Arc::new(AtomicUsize::new(0));
    let handle = EngineHandle {
        tx,
        max_queue: config.max_queue,
        metrics: metrics.clone(),
        incoming: incoming.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("blip2-model".into())
        .spawn(move || {
            let cache = FeatureCache::new(config.image_cache_size);
            let num_query_tokens = pipeline.model.config.num_query_tokens;
            let scheduler = Scheduler::new(config, num_query_tokens, metrics.clone(), rx, incoming);
            Worker::new(&pipeline, metrics, cache, scheduler).run()
        })
        .expect("spawning the model thread");
    (handle, thread)
}
