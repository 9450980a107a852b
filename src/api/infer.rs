//! `POST /v1/caption` and `POST /v1/vqa`: validate, preprocess off the runtime, submit to the
//! model worker, then answer with JSON or stream Server-Sent Events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant as Deadline;

use super::budget::Reservation;
use super::error::ApiError;
use super::fetch;
use super::input::{self, Endpoint, ImageSource, Input, Parameters};
use super::wire::{GenerationResult, Results, TextField, TokenEvent, TokenInfo};
use super::{AppState, Limits};
use crate::engine::{job_tokens, Incoming, Job, JobEvent, SubmitError};
use crate::generation::{GeneratedSequence, GenerationParams};
use crate::pipeline::check_image_size;
use crate::preprocess::{ImageSize, PreprocessError};
use crate::prompt::Prompt;

pub async fn caption(State(s): State<Arc<AppState>>, request: Request) -> Response {
    handle(s, Endpoint::Caption, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn vqa(State(s): State<Arc<AppState>>, request: Request) -> Response {
    handle(s, Endpoint::Vqa, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub(super) fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// One submitted image: its events, cancel flag and prompt length.
pub(super) struct Submitted {
    pub(super) rx: mpsc::UnboundedReceiver<JobEvent>,
    cancel: Arc<AtomicBool>,
    pub(super) prompt_tokens: usize,
}

/// Sets every cancel flag when dropped: the client went away (or timed out) before the end.
pub(super) struct CancelOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for c in &self.0 {
            c.store(true, Ordering::Relaxed);
        }
    }
}

/// What a request holds from its admission to its answer: an in-flight slot, the deadline, and
/// (until its jobs are queued) the worker's notice that it is on its way and its share of the
/// body memory budget.
pub(super) struct Admitted {
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) deadline: Option<Deadline>,
    pub(super) incoming: Receiving,
}

/// Held while a request's body is read and its images decoded; dropped once its jobs are
/// queued (or it failed).
pub(super) struct Receiving {
    _body: Reservation,
    incoming: Option<Incoming>,
}

impl Receiving {
    /// The body has arrived: from now until its jobs are queued, an idle worker may wait
    /// (`max_wait_ms`) to batch this request with others. Not while the body is still on its
    /// way: a client that sends it slowly would make every other request wait.
    pub(super) fn received(&mut self, s: &AppState) {
        self.incoming.get_or_insert_with(|| s.engine.incoming());
    }
}

/// Takes an in-flight slot (429 when none is free), checks the worker runs (503), then
/// reserves the body's memory (waiting for room, else 503).
pub(super) async fn admit(s: &AppState, headers: &HeaderMap) -> Result<Admitted, ApiError> {
    let deadline = s.limits.request_timeout.map(|t| Deadline::now() + t);
    let permit = s.in_flight.clone().try_acquire_owned().map_err(|_| {
        ApiError::overloaded("too many requests in flight (max_concurrent_requests)")
    })?;
    // Not `is_ready`: while draining, /ready already answers 503 but requests that still
    // arrive (for `shutdown_delay_s`, until the balancer notices) are served.
    if !s.engine.is_running() {
        return Err(ApiError::unavailable("the model worker has stopped"));
    }
    let body = s.buffered.reserve(headers).await?;
    Ok(Admitted {
        permit,
        deadline,
        incoming: Receiving {
            _body: body,
            incoming: None,
        },
    })
}

/// Sets the cancel flag of every job when dropped.
pub(super) fn cancel_guard(submitted: &[Submitted]) -> CancelOnDrop {
    CancelOnDrop(submitted.iter().map(|j| j.cancel.clone()).collect())
}

async fn handle(
    s: Arc<AppState>,
    endpoint: Endpoint,
    request: Request,
) -> Result<Response, ApiError> {
    let Admitted {
        permit,
        deadline,
        mut incoming,
    } = admit(&s, request.headers()).await?;
    let stream_header = wants_sse(request.headers());
    let Input {
        images,
        text,
        questions,
        parameters,
        stream,
        many,
        image_size,
    } = input::within_body_timeout(
        s.limits.body_timeout,
        input::read(endpoint, request, s.limits.max_body_bytes),
    )
    .await?;
    incoming.received(&s);
    let stream = stream || stream_header;
    let image_size = checked_image_size(&s, image_size)?;
    let details = parameters.details;
    let (prompts, params) = if questions.is_empty() {
        let (prompt, params) =
            checked_request(&s, endpoint, images.len(), text, parameters, stream)?;
        (vec![prompt; images.len()], params)
    } else {
        checked_questions(&s, questions, parameters, stream)?
    };
    let submitted = if let Some(embeds) = given_embeds(&s, &images)? {
        if image_size.is_some() {
            return Err(ApiError::validation(
                "image_size resizes an image: it does not apply to image_embeds",
            ));
        }
        let jobs = prompts
            .into_iter()
            .map(|prompt| {
                let prompt_tokens = prompt.text_ids.len();
                let (mut job, rx) = Job::new(Vec::new(), prompt, params.clone());
                job.query_embeds = Some(embeds.clone());
                ((job, rx), prompt_tokens)
            })
            .collect();
        enqueue(&s, jobs)?
    } else {
        let images = load_images(&s, images).await?;
        let mut pixels = preprocess_all(&s, images, image_size).await?;
        // Several questions about one image: one job each, the same pixels (the vision
        // encoder runs once: identical images admitted together share it, later ones hit the
        // cache).
        if prompts.len() > pixels.len() {
            let one = pixels.pop().ok_or_else(|| ApiError::internal("no image"))?;
            pixels = vec![one; prompts.len()];
        }
        submit(
            &s,
            pixels.into_iter().zip(prompts).collect(),
            &params,
            image_size,
        )?
    };
    drop(incoming);
    let guard = cancel_guard(&submitted);
    let field = match endpoint {
        Endpoint::Caption => TextField::Text,
        Endpoint::Vqa => TextField::Answer,
    };
    if stream {
        let one = submitted
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::internal("no job"))?;
        let format = NativeStream {
            field,
            details,
            tokens: Vec::new(),
        };
        return Ok(sse(s, one, guard, permit, deadline, format));
    }
    let collected = async {
        let mut results = Vec::with_capacity(submitted.len());
        for job in submitted {
            let prompt_tokens = job.prompt_tokens;
            let (seqs, tokens) = collect(job, details).await?;
            let tokens = details.then_some(tokens);
            results.push(GenerationResult::new(&seqs, prompt_tokens, field, tokens));
        }
        Ok::<_, ApiError>(results)
    };
    let results = within(deadline, collected).await?;
    drop(guard);
    drop(permit);
    Ok(if many {
        Json(Results { results }).into_response()
    } else {
        let one = results.into_iter().next();
        Json(one.ok_or_else(|| ApiError::internal("no result"))?).into_response()
    })
}

/// Every check a request passes before its images are decoded: image count, settings and the
/// server's limits, the prompt (VQA template applied) and its token budget.
pub(super) fn checked_request(
    s: &AppState,
    endpoint: Endpoint,
    n_images: usize,
    text: Option<String>,
    parameters: Parameters,
    stream: bool,
) -> Result<(Prompt, GenerationParams), ApiError> {
    let details = parameters.details;
    if n_images > s.limits.max_images_per_request {
        return Err(ApiError::validation(format!(
            "{} images in one request; at most {} (max_images_per_request)",
            n_images, s.limits.max_images_per_request
        )));
    }
    if n_images == 0 {
        return Err(ApiError::validation("`images` is empty"));
    }
    if stream && n_images > 1 {
        return Err(ApiError::validation(
            "streaming takes one image: send one request per image",
        ));
    }
    let params = parameters.generation.apply(s.defaults.clone());
    params
        .validate()
        .map_err(|e| ApiError::validation(e.to_string()))?;
    if params.max_new_tokens > s.limits.max_new_tokens {
        return Err(ApiError::validation(format!(
            "max_new_tokens {} is above this server's limit of {}",
            params.max_new_tokens, s.limits.max_new_tokens
        )));
    }
    let one_sequence = params.num_beams == 1 && params.num_return_sequences == 1;
    if (stream || details) && !one_sequence {
        return Err(ApiError::validation(
            "stream and details need one sequence: num_beams 1 and num_return_sequences 1",
        ));
    }
    let prompt_text = match endpoint {
        Endpoint::Caption => text,
        Endpoint::Vqa => {
            let question = text.unwrap_or_default();
            if question.trim().is_empty() {
                return Err(ApiError::validation("question is empty"));
            }
            Some(s.vqa_template.replace("{}", question.trim()))
        }
    };
    let prompt = s
        .prompts
        .build(prompt_text.as_deref())
        .map_err(|e| ApiError::validation(e.to_string()))?;
    check_budgets(&s.limits, &prompt, &params)?;
    Ok((prompt, params))
}

/// `questions`: each one checked as a single-image VQA request; at most
/// `max_images_per_request` of them (each is a job), not streamed.
fn checked_questions(
    s: &AppState,
    questions: Vec<String>,
    parameters: Parameters,
    stream: bool,
) -> Result<(Vec<Prompt>, GenerationParams), ApiError> {
    if stream {
        return Err(ApiError::validation(
            "streaming takes one question: send one request per question",
        ));
    }
    if questions.len() > s.limits.max_images_per_request {
        return Err(ApiError::validation(format!(
            "{} questions in one request; at most {} (max_images_per_request)",
            questions.len(),
            s.limits.max_images_per_request
        )));
    }
    let mut prompts = Vec::with_capacity(questions.len());
    let mut params = None;
    for q in questions {
        let (prompt, p) = checked_request(s, Endpoint::Vqa, 1, Some(q), parameters.clone(), false)?;
        prompts.push(prompt);
        params = Some(p);
    }
    let params = params.ok_or_else(|| ApiError::validation("`questions` is empty"))?;
    Ok((prompts, params))
}

/// The prompt and its generation fit the server's token limits and the model's positions.
fn check_budgets(
    limits: &Limits,
    prompt: &Prompt,
    params: &GenerationParams,
) -> Result<(), ApiError> {
    if prompt.text_ids.len() > limits.max_prompt_tokens {
        return Err(ApiError::validation(format!(
            "the prompt has {} tokens; at most {} (max_prompt_tokens)",
            prompt.text_ids.len(),
            limits.max_prompt_tokens
        )));
    }
    if let Some(max) = limits.max_positions {
        let total = limits.num_query_tokens + prompt.text_ids.len() + params.max_new_tokens;
        if total > max {
            return Err(ApiError::validation(format!(
                "{} query + {} prompt + {} new tokens exceed the model's {max} positions: \
                 lower max_new_tokens",
                limits.num_query_tokens,
                prompt.text_ids.len(),
                params.max_new_tokens
            )));
        }
    }
    let cost = job_tokens(limits.num_query_tokens, prompt, params);
    if cost > limits.max_batch_tokens {
        return Err(ApiError::validation(format!(
            "this request needs {cost} batch tokens ((query + prompt + max_new_tokens) x rows); \
             the server's budget is {} (max_batch_tokens)",
            limits.max_batch_tokens
        )));
    }
    Ok(())
}

/// A request's `image_size`, once the vision encoder takes it (multiples of the patch size,
/// within `max_image_side`); `None` when it asks for none (the server's size).
pub(super) fn checked_image_size(
    s: &AppState,
    size: Option<ImageSize>,
) -> Result<Option<ImageSize>, ApiError> {
    let Some(size) = size else { return Ok(None) };
    check_image_size(size, s.limits.patch_size, s.limits.max_image_side)
        .map_err(ApiError::validation)?;
    Ok((size != s.images.size()).then_some(size))
}

/// `image_embeds` in place of an image: its values, once their shape is the model's
/// [num_query_tokens, D_lm].
fn given_embeds(s: &AppState, images: &[ImageSource]) -> Result<Option<Vec<f32>>, ApiError> {
    let [ImageSource::Embeds { shape, data }] = images else {
        return Ok(None);
    };
    let want = [s.limits.num_query_tokens, s.limits.lm_hidden_size];
    if shape.as_slice() != want {
        return Err(ApiError::validation(format!(
            "image_embeds: shape {shape:?}; this model's projected features are {want:?}"
        )));
    }
    Ok(Some(data.clone()))
}

/// The images' bytes: URLs fetched (at most `preprocess_workers` at once, off the runtime)
/// under the server's policy, each within `image_url_timeout_s`.
pub(super) async fn load_images(
    s: &Arc<AppState>,
    sources: Vec<ImageSource>,
) -> Result<Vec<Vec<u8>>, ApiError> {
    let tasks = sources.into_iter().enumerate().map(|(index, source)| {
        let s = s.clone();
        async move {
            let url = match source {
                ImageSource::Bytes(b) => return Ok(b),
                ImageSource::Url(url) => url,
                ImageSource::Embeds { .. } => {
                    return Err(ApiError::validation(format!(
                        "image {index}: image_embeds stand alone (one per request)"
                    )))
                }
            };
            let _permit = s
                .decode_permits
                .acquire()
                .await
                .map_err(|_| ApiError::unavailable("shutting down"))?;
            let (policy, resolve) = (s.url_policy.clone(), s.resolve.clone());
            let started = Instant::now();
            let fetched =
                tokio::task::spawn_blocking(move || fetch::fetch_blocking(&policy, &resolve, &url))
                    .await
                    .map_err(|_| ApiError::internal("the image fetch failed"))?;
            let result = if fetched.is_ok() { "ok" } else { "error" };
            s.metrics
                .image_fetch_duration
                .with_label_values(&[result])
                .observe(started.elapsed().as_secs_f64());
            fetched.map_err(|mut e| {
                e.message = format!("image {index}: {}", e.message);
                e
            })
        }
    });
    futures_util::future::try_join_all(tasks).await
}

/// Decodes and preprocesses each image on the blocking pool, at most `preprocess_workers` at
/// once across the server.
pub(super) async fn preprocess_all(
    s: &Arc<AppState>,
    images: Vec<Vec<u8>>,
    size: Option<ImageSize>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let tasks = images.into_iter().enumerate().map(|(index, bytes)| {
        let s = s.clone();
        async move {
            let _permit = s
                .decode_permits
                .acquire()
                .await
                .map_err(|_| ApiError::unavailable("shutting down"))?;
            let processor = match size {
                Some(size) => s.images.at_size(size),
                None => s.images.clone(),
            };
            let started = Instant::now();
            let result = tokio::task::spawn_blocking(move || processor.pixel_values(&bytes))
                .await
                .map_err(|_| ApiError::internal("the image worker failed"))?;
            s.metrics
                .preprocess_duration
                .observe(started.elapsed().as_secs_f64());
            result.map_err(|e| image_error(index, e))
        }
    });
    futures_util::future::try_join_all(tasks).await
}

fn image_error(index: usize, e: PreprocessError) -> ApiError {
    let (status, kind) = match e {
        PreprocessError::TooManyBytes { .. } | PreprocessError::TooManyPixels { .. } => {
            (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large")
        }
        PreprocessError::UnknownFormat => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image"),
        _ => (StatusCode::BAD_REQUEST, "invalid_image"),
    };
    ApiError::new(status, kind, format!("image {index}: {e}"))
}

/// Submits one job per (image, prompt), the images at `size` (`None`: the server's); all or
/// none (a full queue cancels those already queued).
pub(super) fn submit(
    s: &Arc<AppState>,
    jobs: Vec<(Vec<f32>, Prompt)>,
    params: &crate::generation::GenerationParams,
    size: Option<ImageSize>,
) -> Result<Vec<Submitted>, ApiError> {
    let jobs = jobs
        .into_iter()
        .map(|(pixel_values, prompt)| {
            let prompt_tokens = prompt.text_ids.len();
            let (mut job, rx) = Job::new(pixel_values, prompt, params.clone());
            job.image_size = size;
            ((job, rx), prompt_tokens)
        })
        .collect();
    enqueue(s, jobs)
}

/// Queues jobs (each with its prompt's length); all or none.
pub(super) fn enqueue(
    s: &Arc<AppState>,
    jobs: Vec<((Job, mpsc::UnboundedReceiver<JobEvent>), usize)>,
) -> Result<Vec<Submitted>, ApiError> {
    let mut submitted: Vec<Submitted> = Vec::with_capacity(jobs.len());
    for ((job, rx), prompt_tokens) in jobs {
        let cancel = job.cancel.clone();
        if let Err(e) = s.engine.try_submit(job) {
            for done in &submitted {
                done.cancel.store(true, Ordering::Relaxed);
            }
            return Err(match e {
                SubmitError::QueueFull(_) => ApiError::overloaded(e.to_string()),
                SubmitError::Stopped => ApiError::unavailable(e.to_string()),
            });
        }
        submitted.push(Submitted {
            rx,
            cancel,
            prompt_tokens,
        });
    }
    Ok(submitted)
}

/// `answer` by the deadline, if any (else 504 `timeout`).
pub(super) async fn within<T>(
    deadline: Option<Deadline>,
    answer: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, answer)
            .await
            .map_err(|_| ApiError::timeout())?,
        None => answer.await,
    }
}

/// Waits for one job's result: its sequences, and its tokens when `details` (one sequence).
pub(super) async fn collect(
    mut job: Submitted,
    details: bool,
) -> Result<(Vec<GeneratedSequence>, Vec<TokenInfo>), ApiError> {
    let mut tokens = Vec::new();
    while let Some(event) = job.rx.recv().await {
        match event {
            JobEvent::Token { id, text, logprob } => {
                if details {
                    tokens.push(TokenInfo { id, text, logprob });
                }
            }
            JobEvent::Done(seqs) if !seqs.is_empty() => return Ok((seqs, tokens)),
            JobEvent::Done(_) | JobEvent::Features { .. } => break,
            JobEvent::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal("the model worker dropped the request"))
}

/// How a stream's events are written: the native `{token}` events and result, or another wire
/// format's chunks. Each call returns the events to send, in order.
pub(super) trait StreamFormat: Send + 'static {
    fn token(&mut self, token: TokenInfo) -> Vec<Event>;
    /// The last events of a finished stream (`seqs` is never empty).
    fn done(&mut self, seqs: &[GeneratedSequence], prompt_tokens: usize) -> Vec<Event>;
    fn error(&mut self, e: &ApiError) -> Vec<Event>;
}

/// `data: {"token": {...}}` per token, then the result as `/v1/caption` or `/v1/vqa` answers it;
/// failures as an `error` event with the `{error, error_type}` body.
struct NativeStream {
    field: TextField,
    details: bool,
    tokens: Vec<TokenInfo>,
}

impl StreamFormat for NativeStream {
    fn token(&mut self, token: TokenInfo) -> Vec<Event> {
        let event = Event::default().data(json_text(&TokenEvent { token: &token }));
        if self.details {
            self.tokens.push(token);
        }
        vec![event]
    }
    fn done(&mut self, seqs: &[GeneratedSequence], prompt_tokens: usize) -> Vec<Event> {
        let tokens = self.details.then(|| std::mem::take(&mut self.tokens));
        let body = GenerationResult::new(seqs, prompt_tokens, self.field, tokens);
        vec![Event::default().data(json_text(&body))]
    }
    fn error(&mut self, e: &ApiError) -> Vec<Event> {
        vec![Event::default().event("error").data(json_text(&e.body()))]
    }
}

/// What the stream still holds: its events, and what must live as long as it.
struct StreamState<F> {
    s: Arc<AppState>,
    job: Submitted,
    _guard: CancelOnDrop,
    _permit: OwnedSemaphorePermit,
    deadline: Option<Deadline>,
    format: F,
}

/// Streams one job's events as Server-Sent Events in `format`, until its result, an error or
/// the deadline; the client hanging up cancels the job (the guard drops).
pub(super) fn sse<F: StreamFormat>(
    s: Arc<AppState>,
    job: Submitted,
    guard: CancelOnDrop,
    permit: OwnedSemaphorePermit,
    deadline: Option<Deadline>,
    format: F,
) -> Response {
    let state = StreamState {
        s,
        job,
        _guard: guard,
        _permit: permit,
        deadline,
        format,
    };
    let stream = futures_util::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        let next = match st.deadline {
            Some(d) => tokio::time::timeout_at(d, st.job.rx.recv())
                .await
                .map_err(|_| ()),
            None => Ok(st.job.rx.recv().await),
        };
        let failed = |st: &mut StreamState<F>, e: ApiError| {
            st.s.metrics.errors.with_label_values(&[e.error_type]).inc();
            st.format.error(&e)
        };
        let last = match next {
            Ok(Some(JobEvent::Token { id, text, logprob })) => {
                let events = st.format.token(TokenInfo { id, text, logprob });
                return Some((events, Some(st)));
            }
            Ok(Some(JobEvent::Done(seqs))) if !seqs.is_empty() => {
                let prompt_tokens = st.job.prompt_tokens;
                st.format.done(&seqs, prompt_tokens)
            }
            Ok(Some(JobEvent::Error(e))) => failed(&mut st, e.into()),
            Ok(_) => failed(
                &mut st,
                ApiError::internal("the model worker dropped the request"),
            ),
            Err(()) => failed(&mut st, ApiError::timeout()),
        };
        // The last events: dropping the state cancels the job if it still runs.
        Some((last, None))
    })
    .flat_map(|events| futures_util::stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A wire type as one line of JSON (an SSE `data:` field). These types have string keys and
/// finite-or-null numbers only, so serialisation cannot fail; the fallback keeps a stream alive
/// if that ever stops being true.
pub(super) fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, "a response body did not serialise");
        r#"{"error":"response serialisation failed","error_type":"internal"}"#.to_string()
    })
}
