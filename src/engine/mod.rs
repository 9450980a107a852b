//! The model worker: one OS thread owns the loaded model and runs continuous batching.
//!
//! Callers (the HTTP handlers, once they exist) decode and preprocess images and tokenise
//! prompts themselves, then submit a [`Job`] through a cloneable [`EngineHandle`]. The queue is
//! bounded: a full queue is refused at once ([`SubmitError::QueueFull`], a 429 to a client).
//! Between two decode steps the worker admits waiting jobs (their vision + Q-Former + prefill run
//! as one batch) into the running [`DecodeBatch`], within `max_batch_size`, and retires finished
//! requests, so a short request never waits for a long one. A job whose event receiver is gone
//! (client disconnected) is cancelled at the next step and frees its rows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::generation::{DecodeBatch, GeneratedSequence, GenerationParams, SequenceRequest};
use crate::pipeline::Blip2Pipeline;
use crate::prompt::Prompt;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most requests decoding together.
    pub max_batch_size: usize,
    /// Most jobs waiting for admission.
    pub max_queue: usize,
    /// How long an idle worker waits for more jobs before starting a batch with what it has.
    pub max_wait: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 8,
            max_queue: 64,
            max_wait: Duration::from_millis(5),
        }
    }
}

/// One request for the worker: preprocessed pixels [3, H, W], the prompt, its settings.
pub struct Job {
    pub pixel_values: Vec<f32>,
    pub prompt: Prompt,
    pub params: GenerationParams,
    pub events: mpsc::UnboundedSender<JobEvent>,
    /// Set by the caller to stop the job at the next step.
    pub cancel: Arc<AtomicBool>,
}

/// What a job hears back.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// A streamed token (requests with one sequence and no beams).
    Token { id: u32, text: String, logprob: f32 },
    /// The job is finished: its sequences (one, or `num_return_sequences`).
    Done(Vec<GeneratedSequence>),
    /// The job failed (its batch failed in the model); the worker goes on.
    Error(String),
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
}

impl EngineHandle {
    pub fn try_submit(&self, job: Job) -> Result<(), SubmitError> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull(self.max_queue),
            mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
        })
    }
}

/// Starts the worker thread on `pipeline`. It stops when every handle is dropped and the running
/// requests are done.
pub fn start(
    pipeline: Blip2Pipeline,
    config: EngineConfig,
) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.max_queue.max(1));
    let handle = EngineHandle {
        tx,
        max_queue: config.max_queue,
    };
    let thread = std::thread::Builder::new()
        .name("blip2-model".into())
        .spawn(move || worker(pipeline, config, rx))
        .expect("spawning the model thread");
    (handle, thread)
}

struct Running {
    events: mpsc::UnboundedSender<JobEvent>,
    cancel: Arc<AtomicBool>,
}

fn worker(pipeline: Blip2Pipeline, config: EngineConfig, mut rx: mpsc::Receiver<Job>) {
    let mut batch: Option<DecodeBatch<'_>> = None;
    // Aligned with the batch's requests, in order.
    let mut running: Vec<Running> = Vec::new();
    let mut open = true;
    loop {
        // Admission: block only when idle.
        let mut admitted = Vec::new();
        if running.is_empty() {
            if !open {
                return;
            }
            match rx.blocking_recv() {
                Some(job) => admitted.push(job),
                None => return,
            }
            let deadline = Instant::now() + config.max_wait;
            while admitted.len() < config.max_batch_size && Instant::now() < deadline {
                match rx.try_recv() {
                    Ok(job) => admitted.push(job),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_micros(200))
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }
        while open && running.len() + admitted.len() < config.max_batch_size {
            match rx.try_recv() {
                Ok(job) => admitted.push(job),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if !admitted.is_empty() {
            let prefilled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                prefill(&pipeline, &admitted)
            }))
            .unwrap_or_else(|_| Err("internal error in the model worker".to_string()));
            match prefilled {
                Ok(new) => {
                    running.extend(admitted.into_iter().map(|j| Running {
                        events: j.events,
                        cancel: j.cancel,
                    }));
                    match batch.as_mut() {
                        Some(b) => {
                            if let Err(e) = b.join(new) {
                                fail_all(&mut running, &mut batch, &e.to_string());
                                continue;
                            }
                        }
                        None => batch = Some(new),
                    }
                }
                Err(e) => {
                    for job in admitted {
                        let _ = job.events.send(JobEvent::Error(e.clone()));
                    }
                }
            }
        }
        let Some(b) = batch.as_mut() else { continue };
        // A caller that stopped listening is cancelled.
        for r in &running {
            if r.events.is_closed() {
                r.cancel.store(true, Ordering::Relaxed);
            }
        }
        // A panic in the model must fail this batch's requests, not the server.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.step()));
        match stepped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                fail_all(&mut running, &mut batch, &e.to_string());
                continue;
            }
            Err(_) => {
                fail_all(
                    &mut running,
                    &mut batch,
                    "internal error in the model worker",
                );
                continue;
            }
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
                    let _ = r.events.send(JobEvent::Done(sequences));
                }
            }
            Err(e) => {
                fail_all(&mut running, &mut batch, &e.to_string());
                continue;
            }
        }
        if running.is_empty() {
            batch = None;
        }
    }
}

/// Vision + Q-Former + prefill of newly admitted jobs, as one batch.
fn prefill<'m>(pipeline: &'m Blip2Pipeline, jobs: &[Job]) -> Result<DecodeBatch<'m>, String> {
    let pixels: Vec<Vec<f32>> = jobs.iter().map(|j| j.pixel_values.clone()).collect();
    let tensor = pipeline
        .images
        .batch_tensor(&pixels, pipeline.model.device())
        .map_err(|e| e.to_string())?;
    let features = pipeline
        .model
        .image_features(&tensor)
        .map_err(|e| e.to_string())?;
    let requests: Vec<SequenceRequest> = jobs
        .iter()
        .map(|j| SequenceRequest {
            prompt: j.prompt.clone(),
            params: j.params.clone(),
            cancel: Some(j.cancel.clone()),
        })
        .collect();
    DecodeBatch::prefill(
        &pipeline.model,
        &pipeline.prompts,
        &features.query_embeds,
        &requests,
    )
    .map_err(|e| e.to_string())
}

/// The model failed mid-batch: every running job hears why; the worker carries on empty.
fn fail_all(running: &mut Vec<Running>, batch: &mut Option<DecodeBatch<'_>>, error: &str) {
    for r in running.drain(..) {
        let _ = r.events.send(JobEvent::Error(error.to_string()));
    }
    *batch = None;
}
