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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc;

use crate::generation::{
    DecodeBatch, FinishReason, GeneratedSequence, GenerationParams, SequenceRequest,
};
use crate::metrics::Metrics;
use crate::model::ModelError;
use crate::pipeline::Blip2Pipeline;
use crate::prompt::Prompt;
use cache::FeatureCache;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most requests decoding together.
    pub max_batch_size: usize,
    /// Token budget of the running batch (see [`job_tokens`]).
    pub max_batch_tokens: usize,
    /// Most jobs waiting for admission.
    pub max_queue: usize,
    /// How long an idle worker, given a first job, waits for requests that are still being
    /// received or preprocessed (see [`EngineHandle::incoming`]) so that a burst starts as one
    /// batch. With none on their way it starts at once.
    pub max_wait: Duration,
    /// Recent images whose query embeddings are kept (0 = no cache).
    pub image_cache_size: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 8,
            max_batch_tokens: 32768,
            max_queue: 64,
            max_wait: Duration::from_millis(50),
            image_cache_size: 64,
        }
    }
}

/// What a job costs in the batch's token budget: every row it occupies (beams, or returned
/// sequences) holds the query tokens, the prompt and up to `max_new_tokens` new ones.
pub fn job_tokens(num_query_tokens: usize, prompt: &Prompt, params: &GenerationParams) -> usize {
    let rows = params.num_beams.max(params.num_return_sequences).max(1);
    (num_query_tokens + prompt.text_ids.len() + params.max_new_tokens) * rows
}

/// One request for the worker: preprocessed pixels [3, H, W], the prompt, its settings.
pub struct Job {
    pub pixel_values: Vec<f32>,
    pub prompt: Prompt,
    pub params: GenerationParams,
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
            prompt,
            params,
            events,
            cancel: Arc::new(AtomicBool::new(false)),
            submitted: Instant::now(),
        };
        (job, rx)
    }
}

/// What a job hears back.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
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
            Worker {
                cache: FeatureCache::new(config.image_cache_size),
                pipeline: &pipeline,
                config,
                metrics,
                rx,
                incoming,
                open: true,
                held: None,
            }
            .run()
        })
        .expect("spawning the model thread");
    (handle, thread)
}

struct Running {
    events: mpsc::UnboundedSender<JobEvent>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    last_token: Option<Instant>,
}

struct Worker<'m> {
    pipeline: &'m Blip2Pipeline,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Job>,
    /// Requests on their way to the queue ([`EngineHandle::incoming`]).
    incoming: Arc<AtomicUsize>,
    cache: FeatureCache,
    /// The queue is still open (some handle is alive).
    open: bool,
    /// A job taken from the queue that did not fit the token budget yet; admitted first.
    held: Option<Job>,
}

impl<'m> Worker<'m> {
    fn num_query_tokens(&self) -> usize {
        self.pipeline.model.config.num_query_tokens
    }

    /// The next job to consider: the held one, else one from the queue (blocking when asked).
    fn next(&mut self, block: bool) -> Option<Job> {
        if let Some(job) = self.held.take() {
            return Some(job);
        }
        if !self.open {
            return None;
        }
        let job = if block {
            self.rx.blocking_recv()
        } else {
            match self.rx.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            }
        };
        match job {
            Some(job) => {
                self.metrics.queue_depth.dec();
                Some(job)
            }
            None => {
                self.open = false;
                None
            }
        }
    }

    /// Moves jobs into `admitted` while the batch has room. Returns false when the next job
    /// must wait for room (it is held).
    fn fill(&mut self, admitted: &mut Vec<Job>, running: usize, tokens_in_use: &mut usize) {
        while running + admitted.len() < self.config.max_batch_size {
            let Some(job) = self.next(false) else { return };
            if job.cancel.load(Ordering::Relaxed) || job.events.is_closed() {
                // Gone before it started: nothing to run.
                job.cancel.store(true, Ordering::Relaxed);
                self.metrics.cancelled.inc();
                continue;
            }
            let cost = job_tokens(self.num_query_tokens(), &job.prompt, &job.params);
            let alone = running == 0 && admitted.is_empty();
            if !alone && *tokens_in_use + cost > self.config.max_batch_tokens {
                self.held = Some(job);
                return;
            }
            *tokens_in_use += cost;
            admitted.push(job);
        }
    }

    fn run(mut self) {
        let mut batch: Option<DecodeBatch<'m>> = None;
        // Aligned with the batch's requests, in order, with their token costs.
        let mut running: Vec<Running> = Vec::new();
        let mut costs: Vec<usize> = Vec::new();
        loop {
            let mut tokens_in_use: usize = costs.iter().sum();
            let mut admitted = Vec::new();
            if running.is_empty() {
                // Idle: block for the first job, then gather the requests still on their way
                // (for up to max_wait).
                let Some(first) = self.next(true) else { return };
                self.held = Some(first);
                self.fill(&mut admitted, 0, &mut tokens_in_use);
                let deadline = Instant::now() + self.config.max_wait;
                while self.open
                    && self.held.is_none()
                    && admitted.len() < self.config.max_batch_size
                    && Instant::now() < deadline
                    && (self.incoming.load(Ordering::Acquire) > 0 || !self.rx.is_empty())
                {
                    std::thread::sleep(Duration::from_micros(200));
                    self.fill(&mut admitted, 0, &mut tokens_in_use);
                }
            } else {
                self.fill(&mut admitted, running.len(), &mut tokens_in_use);
            }
            if !admitted.is_empty() {
                let now = Instant::now();
                for job in &admitted {
                    self.metrics
                        .queue_duration
                        .observe((now - job.submitted).as_secs_f64());
                }
                let mut failed = false;
                for (jobs, prefilled) in self.prefill_groups(admitted) {
                    let new = match prefilled {
                        Ok(new) => new,
                        Err(e) => {
                            tracing::warn!(error = %e, requests = jobs.len(), "prefill failed");
                            for job in jobs {
                                let _ = job.events.send(JobEvent::Error(e.clone()));
                            }
                            continue;
                        }
                    };
                    for job in jobs {
                        costs.push(job_tokens(
                            self.num_query_tokens(),
                            &job.prompt,
                            &job.params,
                        ));
                        running.push(Running {
                            events: job.events,
                            cancel: job.cancel,
                            submitted: job.submitted,
                            last_token: None,
                        });
                    }
                    match batch.as_mut() {
                        Some(b) => {
                            if let Err(e) = b.join(new) {
                                self.fail_all(&mut running, &mut costs, &mut batch, e.into());
                                failed = true;
                                break;
                            }
                        }
                        None => batch = Some(new),
                    }
                }
                if failed {
                    continue;
                }
            }
            self.metrics.running_requests.set(running.len() as i64);
            let Some(b) = batch.as_mut() else { continue };
            // A caller that stopped listening is cancelled.
            for r in &running {
                if r.events.is_closed() {
                    r.cancel.store(true, Ordering::Relaxed);
                }
            }
            self.metrics.batch_size.observe(running.len() as f64);
            // A panic in the model must fail this batch's requests, not the server.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.step()));
            let failure = match stepped {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(EngineError::from(e)),
                Err(_) => Some(EngineError::panicked()),
            };
            if let Some(e) = failure {
                self.fail_all(&mut running, &mut costs, &mut batch, e);
                continue;
            }
            let now = Instant::now();
            for r in running.iter_mut() {
                match r.last_token {
                    None => self
                        .metrics
                        .time_to_first_token
                        .observe((now - r.submitted).as_secs_f64()),
                    Some(last) => self
                        .metrics
                        .inter_token_latency
                        .observe((now - last).as_secs_f64()),
                }
                r.last_token = Some(now);
            }
            for ev in b.take_stream_events() {
                let _ = running[ev.request].events.send(JobEvent::Token {
                    id: ev.token,
                    text: ev.text,
                    logprob: ev.logprob,
                });
            }
            match b.take_finished() {
                Ok(finished) => {
                    // Positions refer to the order before removal: remove from the back.
                    for (position, sequences) in finished.into_iter().rev() {
                        let r = running.remove(position);
                        costs.remove(position);
                        // Before the caller hears: a client that reads the metrics after its
                        // answer must not still count itself.
                        self.metrics.running_requests.set(running.len() as i64);
                        if sequences
                            .first()
                            .is_some_and(|s| s.finish_reason == FinishReason::Cancelled)
                        {
                            self.metrics.cancelled.inc();
                        }
                        if let Some(first) = sequences.first() {
                            self.metrics
                                .generated_tokens
                                .observe(first.token_ids.len() as f64);
                        }
                        let _ = r.events.send(JobEvent::Done(sequences));
                    }
                }
                Err(e) => {
                    self.fail_all(&mut running, &mut costs, &mut batch, e.into());
                    continue;
                }
            }
            if running.is_empty() {
                batch = None;
            }
            self.metrics.running_requests.set(running.len() as i64);
        }
    }

    /// Prefills the admitted jobs as one batch; when that fails (a panic included) and there
    /// are several, each job alone, so that one bad request fails by itself.
    fn prefill_groups(
        &mut self,
        jobs: Vec<Job>,
    ) -> Vec<(Vec<Job>, Result<DecodeBatch<'m>, EngineError>)> {
        let attempt = |worker: &mut Self, jobs: &[Job]| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.prefill(jobs)))
                .unwrap_or_else(|_| Err(EngineError::panicked()))
        };
        let together = attempt(self, &jobs);
        if together.is_ok() || jobs.len() == 1 {
            return vec![(jobs, together)];
        }
        jobs.into_iter()
            .map(|job| {
                let alone = attempt(self, std::slice::from_ref(&job));
                (vec![job], alone)
            })
            .collect()
    }

    /// Vision + Q-Former (or the cache) and prefill of newly admitted jobs, as one batch.
    fn prefill(&mut self, jobs: &[Job]) -> Result<DecodeBatch<'m>, EngineError> {
        let started = Instant::now();
        let pipeline = self.pipeline;
        let device = pipeline.model.device().clone();
        let (height, width) = (pipeline.images.height, pipeline.images.width);
        let query_embeds = self
            .cache
            .query_embeds(jobs, &self.metrics, |pixels: &[&[f32]]| {
                let data: Vec<f32> = pixels.concat();
                let tensor = Tensor::from_vec(data, (pixels.len(), 3, height, width), &device)
                    .map_err(|e| e.to_string())?;
                let features = pipeline
                    .model
                    .image_features(&tensor)
                    .map_err(|e| e.to_string())?;
                Ok(features.query_embeds)
            })
            .map_err(EngineError::Internal)?;
        let images_done = Instant::now();
        let requests: Vec<SequenceRequest> = jobs
            .iter()
            .map(|j| SequenceRequest {
                prompt: j.prompt.clone(),
                params: j.params.clone(),
                cancel: Some(j.cancel.clone()),
            })
            .collect();
        let batch =
            DecodeBatch::prefill(&pipeline.model, &pipeline.prompts, &query_embeds, &requests)?;
        tracing::debug!(
            requests = jobs.len(),
            images_s = (images_done - started).as_secs_f64(),
            prefill_s = images_done.elapsed().as_secs_f64(),
            "admitted"
        );
        Ok(batch)
    }

    /// The model failed mid-batch: every running job hears why; the worker carries on empty.
    fn fail_all(
        &self,
        running: &mut Vec<Running>,
        costs: &mut Vec<usize>,
        batch: &mut Option<DecodeBatch<'m>>,
        error: EngineError,
    ) {
        tracing::error!(error = %error, requests = running.len(), "batch failed");
        self.metrics.running_requests.set(0);
        for r in running.drain(..) {
            let _ = r.events.send(JobEvent::Error(error.clone()));
        }
        costs.clear();
        *batch = None;
    }
}
