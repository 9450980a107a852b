//! The step executor on the model thread: runs admitted jobs' vision + Q-Former (or the cache)
//! and prefill, joins them to the running [`DecodeBatch`], steps it, streams tokens and retires
//! finished requests. What to admit is the scheduler's decision (`scheduler.rs`); a failure or a
//! panic in the model fails the requests it touched, never the thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc;

use super::cache::{FeatureCache, Image};
use super::scheduler::Scheduler;
use super::{EngineError, FeatureStage, Job, JobEvent};
use crate::generation::{DecodeBatch, FinishReason, GeneratedSequence, SequenceRequest};
use crate::metrics::Metrics;
use crate::pipeline::Blip2Pipeline;
use crate::preprocess::ImageSize;

/// One image's features: the shape without the batch dimension, and row-major values.
type FeatureRow = (Vec<usize>, Vec<f32>);

/// Row `i` of a batched tensor [B, ...] as a [`FeatureRow`] in f32.
fn row(t: &Tensor, i: usize) -> Result<FeatureRow, EngineError> {
    let internal = |e: candle_core::Error| EngineError::Internal(e.to_string());
    let r = t.get(i).map_err(internal)?;
    let values = r
        .to_dtype(candle_core::DType::F32)
        .and_then(|r| r.flatten_all()?.to_vec1::<f32>())
        .map_err(internal)?;
    Ok((r.dims().to_vec(), values))
}

/// The job's image at its size (the processor's when the job names none).
fn image_of<'j>(pipeline: &Blip2Pipeline, job: &'j Job) -> Image<'j> {
    Image {
        pixels: &job.pixel_values,
        size: job.image_size.unwrap_or_else(|| pipeline.images.size()),
    }
}

/// The images' indices grouped by size, groups in order of first appearance.
fn by_size(images: &[Image]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(ImageSize, Vec<usize>)> = Vec::new();
    for (i, image) in images.iter().enumerate() {
        match groups.iter_mut().find(|(size, _)| *size == image.size) {
            Some((_, members)) => members.push(i),
            None => groups.push((image.size, vec![i])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// The pixels of `members` (all of one size) as [B, 3, H, W].
fn pixel_batch(
    images: &[Image],
    members: &[usize],
    device: &candle_core::Device,
) -> Result<Tensor, String> {
    let size = images[members[0]].size;
    let mut data = Vec::with_capacity(members.len() * 3 * size.height * size.width);
    for &i in members {
        if images[i].pixels.len() != 3 * size.height * size.width {
            return Err(format!(
                "{} pixel values do not make a 3 x {size} image",
                images[i].pixels.len()
            ));
        }
        data.extend_from_slice(images[i].pixels);
    }
    Tensor::from_vec(data, (members.len(), 3, size.height, size.width), device)
        .map_err(|e| e.to_string())
}

/// Vision + Q-Former + projection [B, Q, D_lm] of images of any sizes: one batch per size,
/// rows back in the images' order.
fn projected_by_size(pipeline: &Blip2Pipeline, images: &[Image]) -> Result<Tensor, String> {
    let device = pipeline.model.device();
    let groups = by_size(images);
    let project = |members: &[usize]| {
        let pixels = pixel_batch(images, members, device)?;
        let features = pipeline.model.image_features(&pixels);
        Ok::<_, String>(features.map_err(|e| e.to_string())?.query_embeds)
    };
    if let [members] = groups.as_slice() {
        return project(members);
    }
    let mut rows: Vec<Option<Tensor>> = vec![None; images.len()];
    for members in &groups {
        let embeds = project(members)?;
        for (k, &i) in members.iter().enumerate() {
            rows[i] = Some(embeds.narrow(0, k, 1).map_err(|e| e.to_string())?);
        }
    }
    let rows: Vec<Tensor> = rows.into_iter().flatten().collect();
    Tensor::cat(&rows, 0).map_err(|e| e.to_string())
}

/// A request in the running batch, aligned with the batch's requests, in order.
struct Running {
    events: mpsc::UnboundedSender<JobEvent>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    last_token: Option<Instant>,
    /// Its share of the token budget.
    cost: usize,
}

pub(super) struct Worker<'m> {
    pipeline: &'m Blip2Pipeline,
    metrics: Arc<Metrics>,
    cache: FeatureCache,
    scheduler: Scheduler,
    batch: Option<DecodeBatch<'m>>,
    running: Vec<Running>,
}

impl<'m> Worker<'m> {
    pub(super) fn new(
        pipeline: &'m Blip2Pipeline,
        metrics: Arc<Metrics>,
        cache: FeatureCache,
        scheduler: Scheduler,
    ) -> Self {
        Self {
            pipeline,
            metrics,
            cache,
            scheduler,
            batch: None,
            running: Vec::new(),
        }
    }

    /// Admit, step, retire, until the queue is closed and nothing runs.
    pub(super) fn run(mut self) {
        loop {
            let tokens_in_use = self.running.iter().map(|r| r.cost).sum();
            let Some(admitted) = self.scheduler.admit(self.running.len(), tokens_in_use) else {
                return;
            };
            if !admitted.is_empty() && !self.start(admitted) {
                continue;
            }
            self.metrics.running_requests.set(self.running.len() as i64);
            if self.batch.is_some() {
                self.step();
            }
        }
    }

    /// Prefills admitted jobs and joins them to the batch. False when the join failed (every
    /// running job has then been failed).
    fn start(&mut self, admitted: Vec<Job>) -> bool {
        let now = Instant::now();
        for job in &admitted {
            self.metrics
                .queue_duration
                .observe((now - job.submitted).as_secs_f64());
        }
        let (features, admitted): (Vec<Job>, Vec<Job>) =
            admitted.into_iter().partition(|j| j.features.is_some());
        if !features.is_empty() {
            self.answer_features(features);
        }
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
                self.running.push(Running {
                    cost: self.scheduler.cost(&job),
                    events: job.events,
                    cancel: job.cancel,
                    submitted: job.submitted,
                    last_token: None,
                });
            }
            let joined = match self.batch.as_mut() {
                Some(b) => b.join(new).map_err(EngineError::from),
                None => {
                    self.batch = Some(new);
                    Ok(())
                }
            };
            if let Err(e) = joined {
                self.fail_all(e);
                return false;
            }
        }
        true
    }

    /// One decode step of the running batch, then its tokens and finished requests.
    fn step(&mut self) {
        // A caller that stopped listening is cancelled.
        for r in &self.running {
            if r.events.is_closed() {
                r.cancel.store(true, Ordering::Relaxed);
            }
        }
        self.metrics.batch_size.observe(self.running.len() as f64);
        let Some(b) = self.batch.as_mut() else { return };
        // A panic in the model must fail this batch's requests, not the server.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.step()));
        let outcome = match stepped {
            Ok(Ok(())) => {
                let events = b.take_stream_events();
                b.take_finished()
                    .map(|finished| (events, finished))
                    .map_err(EngineError::from)
            }
            Ok(Err(e)) => Err(EngineError::from(e)),
            Err(_) => Err(EngineError::panicked()),
        };
        let (events, finished) = match outcome {
            Ok(done) => done,
            Err(e) => return self.fail_all(e),
        };
        self.observe_token_times();
        for ev in events {
            let _ = self.running[ev.request].events.send(JobEvent::Token {
                id: ev.token,
                text: ev.text,
                logprob: ev.logprob,
            });
        }
        self.retire(finished);
        if self.running.is_empty() {
            self.batch = None;
        }
        self.metrics.running_requests.set(self.running.len() as i64);
    }

    fn observe_token_times(&mut self) {
        let now = Instant::now();
        for r in self.running.iter_mut() {
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
    }

    /// Answers the finished requests (positions as before their removal).
    fn retire(&mut self, finished: Vec<(usize, Vec<GeneratedSequence>)>) {
        // Positions refer to the order before removal: remove from the back.
        for (position, sequences) in finished.into_iter().rev() {
            let r = self.running.remove(position);
            // Before the caller hears: a client that reads the metrics after its answer must
            // not still count itself.
            self.metrics.running_requests.set(self.running.len() as i64);
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

    /// Features jobs, answered at once (they do not join the decode batch): projected-only
    /// batches through the vision cache, others through the whole image path.
    fn answer_features(&mut self, jobs: Vec<Job>) {
        let computed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.features(&jobs)))
                .unwrap_or_else(|_| Err(EngineError::panicked()));
        match computed {
            Ok(rows) => {
                for (job, (shape, data)) in jobs.iter().zip(rows) {
                    let _ = job.events.send(JobEvent::Features { shape, data });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, requests = jobs.len(), "features failed");
                for job in &jobs {
                    let _ = job.events.send(JobEvent::Error(e.clone()));
                }
            }
        }
    }

    /// Each job's stage as (shape without the batch dimension, row-major values).
    fn features(&mut self, jobs: &[Job]) -> Result<Vec<FeatureRow>, EngineError> {
        let pipeline = self.pipeline;
        let images: Vec<Image> = jobs.iter().map(|j| image_of(pipeline, j)).collect();
        if jobs
            .iter()
            .all(|j| j.features == Some(FeatureStage::Projected))
        {
            let embeds = self
                .cache
                .query_embeds(&images, &self.metrics, |images| {
                    projected_by_size(pipeline, images)
                })
                .map_err(EngineError::Internal)?;
            return (0..jobs.len()).map(|i| row(&embeds, i)).collect();
        }
        let device = pipeline.model.device();
        let mut rows: Vec<Option<FeatureRow>> = vec![None; jobs.len()];
        for members in by_size(&images) {
            let pixels = pixel_batch(&images, &members, device).map_err(EngineError::Internal)?;
            let f = pipeline.model.image_features(&pixels)?;
            let pooled = if members
                .iter()
                .any(|&i| jobs[i].features == Some(FeatureStage::VisionPooled))
            {
                Some(pipeline.model.pooled_vision(&f.vision_states)?)
            } else {
                None
            };
            // Each job converts only its own row of the stage it asked for.
            for (k, &i) in members.iter().enumerate() {
                let stage = match jobs[i].features.unwrap_or(FeatureStage::Projected) {
                    FeatureStage::Vision => &f.vision_states,
                    FeatureStage::VisionPooled => pooled
                        .as_ref()
                        .ok_or_else(|| EngineError::Internal("no pooled output".into()))?,
                    FeatureStage::QFormer => &f.query_states,
                    FeatureStage::Projected => &f.query_embeds,
                };
                rows[i] = Some(row(stage, k)?);
            }
        }
        rows.into_iter()
            .map(|r| r.ok_or_else(|| EngineError::Internal("a features row is missing".into())))
            .collect()
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

    /// The jobs' language-model inputs [B, Q, D_lm]: given ones as they are, the others from
    /// the vision cache or vision + Q-Former + projection, batched by image size.
    fn query_embeds(&mut self, jobs: &[Job]) -> Result<Tensor, EngineError> {
        let pipeline = self.pipeline;
        let device = pipeline.model.device().clone();
        let compute = |images: &[Image]| projected_by_size(pipeline, images);
        let images: Vec<Image> = jobs
            .iter()
            .filter(|j| j.query_embeds.is_none())
            .map(|j| image_of(pipeline, j))
            .collect();
        if images.len() == jobs.len() {
            return self
                .cache
                .query_embeds(&images, &self.metrics, compute)
                .map_err(EngineError::Internal);
        }
        let computed = if images.is_empty() {
            None
        } else {
            let t = self.cache.query_embeds(&images, &self.metrics, compute);
            Some(t.map_err(EngineError::Internal)?)
        };
        let q = pipeline.model.config.num_query_tokens;
        let internal = |e: candle_core::Error| EngineError::Internal(e.to_string());
        let mut next = 0;
        let mut rows = Vec::with_capacity(jobs.len());
        for job in jobs {
            let row = match (&job.query_embeds, &computed) {
                (Some(e), _) => Tensor::from_vec(e.clone(), (1, q, e.len() / q.max(1)), &device)
                    .and_then(|t| t.to_dtype(pipeline.model.dtype()))
                    .map_err(internal)?,
                (None, Some(c)) => {
                    next += 1;
                    c.narrow(0, next - 1, 1).map_err(internal)?
                }
                (None, None) => return Err(EngineError::Internal("no image".into())),
            };
            rows.push(row);
        }
        Tensor::cat(&rows, 0).map_err(internal)
    }

    /// Vision + Q-Former (or the cache) and prefill of newly admitted jobs, as one batch.
    fn prefill(&mut self, jobs: &[Job]) -> Result<DecodeBatch<'m>, EngineError> {
        let started = Instant::now();
        let pipeline = self.pipeline;
        let query_embeds = self.query_embeds(jobs)?;
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
    fn fail_all(&mut self, error: EngineError) {
        tracing::error!(error = %error, requests = self.running.len(), "batch failed");
        self.metrics.running_requests.set(0);
        for r in self.running.drain(..) {
            let _ = r.events.send(JobEvent::Error(error.clone()));
        }
        self.batch = None;
    }
}
