//! The OpenAI-compatible routes: `POST /v1/chat/completions` (one image per request, as a
//! `data:` URL in an `image_url` part) and `GET /v1/models`. A chat request becomes the same
//! internal request as `/v1/vqa` (the model's VQA template around the last user message's
//! text) or `/v1/caption` (no text), so its answer is theirs; only the wire format differs.
//! Errors on these routes are OpenAI's `{"error": {message, type, param, code}}`.
//!
//! May use: the native handlers' steps (`infer`), the wire types, `generation`'s result types.
//! May not touch: the engine's internals or the model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorParam};
use super::infer::{self, Admitted, StreamFormat};
use super::input::{image_source, is_http_url, Endpoint, ImageSource, Parameters};
use super::wire::TokenInfo;
use super::AppState;
use crate::generation::{FinishReason, GeneratedSequence, GenerationOverrides};
use crate::preprocess::ImageSize;

// --- request --------------------------------------------------------------------------------

/// A string or a list of strings (`stop`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ImageUrl {
    url: String,
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    image_url: Option<ImageUrl>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// The fields of OpenAI's chat request that mean something here, transformers' own decoding
/// knobs as extra fields (as vLLM accepts them), and the rest (logged, ignored).
#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    num_beams: Option<usize>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    length_penalty: Option<f64>,
    #[serde(default)]
    no_repeat_ngram_size: Option<usize>,
    #[serde(default)]
    min_tokens: Option<usize>,
    /// Not OpenAI's: the size the image is resized to, as on the native routes.
    #[serde(default)]
    image_size: Option<ImageSize>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).with_param(param)
}

/// What the chat request asks, in the native request's terms.
struct ChatInput {
    image: ImageSource,
    /// Where the image is in the request (`messages[i].content[j].image_url.url`).
    image_param: String,
    /// The last user message's text (`None`: caption).
    text: Option<String>,
    parameters: Parameters,
    stream: bool,
    include_usage: bool,
    image_size: Option<ImageSize>,
}

/// The one image of the conversation and the last user message's text.
fn read_messages(messages: &[Message]) -> Result<(ImageSource, String, Option<String>), ApiError> {
    let mut image = None;
    let mut text = None;
    for (i, m) in messages.iter().enumerate() {
        let mut texts = Vec::new();
        match &m.content {
            None => {}
            Some(Content::Text(t)) => texts.push(t.clone()),
            Some(Content::Parts(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let param = format!("messages[{i}].content[{j}]");
                    match (part.kind.as_str(), &part.text, &part.image_url) {
                        ("text", Some(t), _) => texts.push(t.clone()),
                        ("image_url", _, Some(url)) => {
                            if image.is_some() {
                                return Err(invalid(
                                    &param,
                                    "BLIP-2 conditions on one image: send one image_url per request",
                                ));
                            }
                            let param = format!("{param}.image_url.url");
                            image = Some((image_bytes(&url.url, &param)?, param));
                        }
                        ("text" | "image_url", _, _) => {
                            return Err(invalid(
                                &param,
                                format!("a {} part needs its {} field", part.kind, part.kind),
                            ))
                        }
                        (other, _, _) => {
                            return Err(invalid(
                                &format!("{param}.type"),
                                format!("content parts of type {other:?} are not supported: use text and image_url"),
                            ))
                        }
                    }
                }
            }
        }
        if m.role == "user" {
            let joined = texts.join(" ");
            text = (!joined.trim().is_empty()).then_some(joined);
        }
    }
    let (image, param) = image.ok_or_else(|| {
        invalid(
            "messages",
            "no image: BLIP-2 answers about an image, send one image_url content part",
        )
    })?;
    Ok((image, param, text))
}

/// A `data:` URL's bytes, or an http(s) URL to fetch under the server's policy.
fn image_bytes(url: &str, param: &str) -> Result<ImageSource, ApiError> {
    if !url.starts_with("data:") && !is_http_url(url) {
        return Err(invalid(
            param,
            "an image_url must be a data: URL (data:image/png;base64,...) or an http(s) URL",
        ));
    }
    image_source(url, 0).map_err(|e| invalid(param, e.message))
}

impl ChatRequest {
    fn into_input(self) -> Result<ChatInput, ApiError> {
        if !self.other.is_empty() {
            let names: Vec<&str> = self.other.keys().map(String::as_str).collect();
            tracing::info!(fields = ?names, "chat request: unknown fields ignored");
        }
        if self.messages.is_empty() {
            return Err(invalid("messages", "messages is empty"));
        }
        if let Some(model) = &self.model {
            tracing::debug!(model = %model, "chat request for a model name (one model is served)");
        }
        let (image, image_param, text) = read_messages(&self.messages)?;
        let n = self.n.unwrap_or(1);
        if n == 0 {
            return Err(invalid("n", "n must be at least 1"));
        }
        let stream = self.stream.unwrap_or(false);
        let logprobs = self.logprobs.unwrap_or(false);
        if self.top_logprobs.unwrap_or(0) > 0 {
            return Err(invalid(
                "top_logprobs",
                "top_logprobs is not supported (the chosen token's logprob is, with logprobs: true)",
            ));
        }
        if n > 1 && (stream || logprobs) {
            return Err(invalid(
                "n",
                "n > 1 cannot stream or return logprobs here: send n requests",
            ));
        }
        // Sampling follows OpenAI's temperature: 0 is greedy, above 0 samples; with neither
        // temperature nor top_p the checkpoint's defaults hold (greedy for BLIP-2), so that a
        // chat answer equals /v1/vqa's.
        let do_sample = match self.temperature {
            Some(t) if t < 0.0 || !t.is_finite() => {
                return Err(invalid("temperature", "temperature must be >= 0"))
            }
            Some(t) => Some(t > 0.0),
            None => self.top_p.map(|_| true),
        };
        if n > 1 && do_sample != Some(true) && self.num_beams.unwrap_or(1) == 1 {
            return Err(invalid(
                "n",
                "n > 1 needs sampling: set temperature above 0 (or num_beams >= n)",
            ));
        }
        let stop = self.stop.map(|s| match s {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        });
        let generation = GenerationOverrides {
            max_new_tokens: self.max_completion_tokens.or(self.max_tokens),
            min_new_tokens: self.min_tokens,
            num_beams: self.num_beams,
            do_sample,
            temperature: self.temperature.filter(|t| *t > 0.0),
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            length_penalty: self.length_penalty,
            num_return_sequences: (n > 1).then_some(n),
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            seed: self.seed,
            stop,
        };
        Ok(ChatInput {
            image,
            image_param,
            text,
            parameters: Parameters {
                generation,
                details: logprobs,
            },
            stream,
            include_usage: self
                .stream_options
                .map(|o| o.include_usage)
                .unwrap_or(false),
            image_size: self.image_size,
        })
    }
}

// --- response -------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct ChatMessage {
    role: &'static str,
    content: String,
}

#[derive(Debug, Serialize)]
struct TokenLogprob {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
    top_logprobs: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct Logprobs {
    content: Vec<TokenLogprob>,
}

#[derive(Debug, Serialize)]
struct Choice {
    index: usize,
    message: ChatMessage,
    logprobs: Option<Logprobs>,
    finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

#[derive(Debug, Serialize)]
struct ChatCompletion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<Choice>,
    usage: Usage,
}

#[derive(Debug, Serialize, Default)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

#[derive(Debug, Serialize)]
struct ChunkChoice {
    index: usize,
    delta: Delta,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence | FinishReason::Cancelled => "stop",
    }
}

fn token_logprob(t: &TokenInfo) -> TokenLogprob {
    TokenLogprob {
        token: t.text.clone(),
        logprob: t.logprob,
        bytes: t.text.as_bytes().to_vec(),
        top_logprobs: Vec::new(),
    }
}

/// Prompt tokens as the language model sees them: the image's query tokens and the text's.
fn usage(s: &AppState, prompt_tokens: usize, completion_tokens: usize) -> Usage {
    let prompt_tokens = prompt_tokens + s.limits.num_query_tokens;
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn completion_id() -> String {
    format!(
        "chatcmpl-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// The stream's chunks: the role first, a content delta per token, the finish reason, the usage
/// chunk when asked, then `[DONE]`. Errors: an `error` chunk in OpenAI's shape, then `[DONE]`.
struct ChatStream {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
    num_query_tokens: usize,
    started: bool,
}

impl ChatStream {
    fn chunk(
        &self,
        delta: Delta,
        logprobs: Option<Logprobs>,
        finish: Option<&'static str>,
    ) -> Event {
        let chunk = ChatChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason: finish,
            }],
            usage: self.include_usage.then_some(None),
        };
        Event::default().data(infer::json_text(&chunk))
    }

    fn role(&mut self) -> Vec<Event> {
        if std::mem::replace(&mut self.started, true) {
            return Vec::new();
        }
        let delta = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        vec![self.chunk(delta, None, None)]
    }
}

impl StreamFormat for ChatStream {
    fn token(&mut self, token: TokenInfo) -> Vec<Event> {
        let mut events = self.role();
        let logprobs = self.logprobs.then(|| Logprobs {
            content: vec![token_logprob(&token)],
        });
        let delta = Delta {
            role: None,
            content: Some(token.text),
        };
        events.push(self.chunk(delta, logprobs, None));
        events
    }

    fn done(&mut self, seqs: &[GeneratedSequence], prompt_tokens: usize) -> Vec<Event> {
        let mut events = self.role();
        let first = &seqs[0];
        events.push(self.chunk(
            Delta::default(),
            None,
            Some(finish_reason(first.finish_reason)),
        ));
        if self.include_usage {
            let prompt_tokens = prompt_tokens + self.num_query_tokens;
            let completion_tokens = first.token_ids.len();
            let chunk = ChatChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: Vec::new(),
                usage: Some(Some(Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                })),
            };
            events.push(Event::default().data(infer::json_text(&chunk)));
        }
        events.push(Event::default().data("[DONE]"));
        events
    }

    fn error(&mut self, e: &ApiError) -> Vec<Event> {
        vec![
            Event::default().data(infer::json_text(&openai_error_body(e, None))),
            Event::default().data("[DONE]"),
        ]
    }
}

// --- handlers -------------------------------------------------------------------------------

pub async fn chat_completions(State(s): State<Arc<AppState>>, request: Request) -> Response {
    chat(s, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn read_body(s: &AppState, request: Request) -> Result<ChatRequest, ApiError> {
    super::input::refuse_declared_length(&request, s.limits.max_body_bytes)?;
    let body = super::input::body_bytes(request).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid chat completion request: {e}")))
}

async fn chat(s: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let Admitted {
        permit,
        deadline,
        mut incoming,
    } = infer::admit(&s, request.headers()).await?;
    let input = super::input::within_body_timeout(s.limits.body_timeout, read_body(&s, request))
        .await?
        .into_input()?;
    incoming.received(&s);
    let details = input.parameters.details;
    let endpoint = if input.text.is_some() {
        Endpoint::Vqa
    } else {
        Endpoint::Caption
    };
    let (prompt, params) =
        infer::checked_request(&s, endpoint, 1, input.text, input.parameters, input.stream)?;
    let image_size = infer::checked_image_size(&s, input.image_size)
        .map_err(|e| invalid("image_size", e.message))?;
    let images = infer::load_images(&s, vec![input.image])
        .await
        .map_err(|e| e.with_param(&input.image_param))?;
    let pixels = infer::preprocess_all(&s, images, image_size)
        .await
        .map_err(|e| e.with_param(&input.image_param))?;
    let jobs = pixels.into_iter().map(|p| (p, prompt.clone())).collect();
    let submitted = infer::submit(&s, jobs, &params, image_size)?;
    drop(incoming);
    let guard = infer::cancel_guard(&submitted);
    let job = submitted
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("no job"))?;
    let (id, created, model) = (completion_id(), now_s(), s.info.model_id.clone());
    if input.stream {
        let format = ChatStream {
            id,
            created,
            model,
            logprobs: details,
            include_usage: input.include_usage,
            num_query_tokens: s.limits.num_query_tokens,
            started: false,
        };
        return Ok(infer::sse(s, job, guard, permit, deadline, format));
    }
    let prompt_tokens = job.prompt_tokens;
    let collected = infer::collect(job, details);
    let (seqs, tokens) = infer::within(deadline, collected).await?;
    drop(guard);
    drop(permit);
    let choices = seqs
        .iter()
        .enumerate()
        .map(|(index, q)| Choice {
            index,
            message: ChatMessage {
                role: "assistant",
                content: q.text.clone(),
            },
            logprobs: (details && index == 0).then(|| Logprobs {
                content: tokens.iter().map(token_logprob).collect(),
            }),
            finish_reason: finish_reason(q.finish_reason),
        })
        .collect();
    let completion_tokens = seqs.iter().map(|q| q.token_ids.len()).sum();
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model,
        choices,
        usage: usage(&s, prompt_tokens, completion_tokens),
    })
    .into_response())
}

#[derive(Debug, Serialize)]
struct Model {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Debug, Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<Model>,
}

pub async fn models(State(s): State<Arc<AppState>>) -> Response {
    Json(ModelList {
        object: "list",
        data: vec![Model {
            id: s.info.model_id.clone(),
            object: "model",
            created: s.started_unix_s,
            owned_by: "blip2-server",
        }],
    })
    .into_response()
}

// --- errors ---------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct OpenAiErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: &'a str,
}

#[derive(Debug, Serialize)]
struct OpenAiError<'a> {
    error: OpenAiErrorDetail<'a>,
}

/// OpenAI's error `type` for a status.
fn openai_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 | 403 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

fn openai_error_body<'a>(e: &'a ApiError, param: Option<&'a str>) -> OpenAiError<'a> {
    OpenAiError {
        error: OpenAiErrorDetail {
            message: &e.message,
            kind: openai_type(e.status),
            param: param.or(e.param.as_deref()),
            code: e.error_type,
        },
    }
}

/// Rewrites every native error answer on the OpenAI routes (the handler's, the API key's, the
/// router's) into OpenAI's shape; 415 (not an image we decode) and 422 (a value we cannot
/// honour) become 400, which the SDKs raise as `BadRequestError`.
pub async fn openai_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let param = response
        .extensions()
        .get::<ErrorParam>()
        .map(|p| p.0.clone());
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return (status, "error").into_response();
    };
    #[derive(Deserialize)]
    struct Native {
        error: String,
        error_type: String,
    }
    let Ok(native) = serde_json::from_slice::<Native>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let status = match status {
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            StatusCode::BAD_REQUEST
        }
        other => other,
    };
    let body = OpenAiError {
        error: OpenAiErrorDetail {
            message: &native.error,
            kind: openai_type(status),
            param: param.as_deref(),
            code: &native.error_type,
        },
    };
    parts.status = status;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(infer::json_text(&body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(v: serde_json::Value) -> Result<ChatInput, ApiError> {
        serde_json::from_value::<ChatRequest>(v)
            .unwrap()
            .into_input()
    }

    const PNG: &str = "data:image/png;base64,iVBORw0KGgo=";

    #[test]
    fn the_last_user_text_is_the_question_and_one_image_is_taken() {
        let input = request(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": PNG}},
                    {"type": "text", "text": "what is this?"}]},
                {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": "and its colour?"}
            ],
            "max_tokens": 7, "temperature": 0, "stop": "x", "some_new_field": 1
        }))
        .unwrap();
        assert_eq!(input.text.as_deref(), Some("and its colour?"));
        assert_eq!(
            input.image,
            ImageSource::Bytes(b"\x89PNG\r\n\x1a\n".to_vec())
        );
        let g = input.parameters.generation;
        assert_eq!(g.max_new_tokens, Some(7));
        assert_eq!(g.do_sample, Some(false));
        assert_eq!(g.stop, Some(vec!["x".to_string()]));
    }

    #[test]
    fn what_cannot_be_honoured_names_its_param() {
        let image = serde_json::json!({"type": "image_url", "image_url": {"url": PNG}});
        let cases = [
            (
                serde_json::json!({"messages": [{"role": "user", "content": [image, image]}]}),
                "messages[0].content[1]",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
                "messages",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}]}]}),
                "messages[0].content[0].image_url.url",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [image, {"type": "input_audio"}]}]}),
                "messages[0].content[1].type",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [image]}], "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [image]}], "n": 2}),
                "n",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [image]}], "n": 2, "temperature": 1, "stream": true}),
                "n",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [image]}], "temperature": -1}),
                "temperature",
            ),
        ];
        for (body, param) in cases {
            let e = request(body.clone())
                .err()
                .unwrap_or_else(|| panic!("accepted {body}"));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }
}
