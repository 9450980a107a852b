//! Admission policy of the model worker: the queue, the batch-size and token budgets, and the
//! idle wait (`max_wait`) that lets a burst start as one batch. It decides which jobs join the
//! running batch between two decode steps; it never runs the model (that is `worker.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{job_tokens, EngineConfig, Job};
use crate::metrics::Metrics;

pub(super) struct Scheduler {
    config: EngineConfig,
    num_query_tokens: usize,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Job>,
    /// Requests on their way to the queue (`EngineHandle::incoming`).
    incoming: Arc<AtomicUsize>,
    /// The queue is still open (some handle is alive).
    open: bool,
    /// A job taken from the queue that did not fit the token budget yet; admitted first.
    held: Option<Job>,
}

impl Scheduler {
    pub(super) fn new(
        config: EngineConfig,
        num_query_tokens: usize,
        metrics: Arc<Metrics>,
        rx: mpsc::Receiver<Job>,
        incoming: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            config,
            num_query_tokens,
            metrics,
            rx,
            incoming,
            open: true,
            held: None,
        }
    }

    /// What a job costs in the batch's token budget.
    pub(super) fn cost(&self, job: &Job) -> usize {
        if job.features.is_some() {
            // Answered at admission; it holds no rows of the decode batch.
            return 0;
        }
        job_tokens(self.num_query_tokens, &job.prompt, &job.params)
    }

    /// The jobs to admit now, given the `running` requests and the tokens they hold. With
    /// nothing running it blocks for a first job, then gathers those still on their way (for
    /// up to `max_wait`). `None`: the queue is closed and nothing runs, so the worker stops.
    pub(super) fn admit(&mut self, running: usize, tokens_in_use: usize) -> Option<Vec<Job>> {
        let mut tokens_in_use = tokens_in_use;
        let mut admitted = Vec::new();
        if running > 0 {
            self.fill(&mut admitted, running, &mut tokens_in_use);
            return Some(admitted);
        }
        let first = self.next(true)?;
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
        Some(admitted)
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

    /// Moves jobs into `admitted` while the batch has room; a job that must wait for room is
    /// held for the next call.
    fn fill(&mut self, admitted: &mut Vec<Job>, running: usize, tokens_in_use: &mut usize) {
        while running + admitted.len() < self.config.max_batch_size {
            let Some(job) = self.next(false) else { return };
            if job.cancel.load(Ordering::Relaxed) || job.events.is_closed() {
                // Gone before it started: nothing to run.
                job.cancel.store(true, Ordering::Relaxed);
                self.metrics.cancelled.inc();
                continue;
            }
            let cost = self.cost(&job);
            let alone = running == 0 && admitted.is_empty();
            if !alone && *tokens_in_use + cost > self.config.max_batch_tokens {
                self.held = Some(job);
                return;
            }
            *tokens_in_use += cost;
            admitted.push(job);
        }
    }
}
