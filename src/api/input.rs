//! Request bodies: JSON (images as base64, `data:` URLs or http(s) URLs, which `fetch` gets)
//! or multipart/form-data (file fields
//! `image`, repeatable; the other fields as form fields), read into one [`Input`].

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};
use base64::Engine as _;
use serde::{Deserialize, Deserializer};

use super::error::ApiError;
use crate::generation::GenerationOverrides;
use crate::preprocess::ImageSize;

/// An image as the request gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    Bytes(Vec<u8>),
    /// An http(s) URL, fetched under the server's `image_url_*` policy.
    Url(String),
    /// `image_embeds`: the image as its language-model inputs, a `/v1/features` answer of
    /// stage `projected` ([queries, D_lm] row-major).
    Embeds {
        shape: Vec<usize>,
        data: Vec<f32>,
    },
}

/// `image_embeds`: a `/v1/features` answer object, exactly as returned (either encoding).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedsBody {
    stage: String,
    shape: Vec<usize>,
    dtype: String,
    data: serde_json::Value,
}

fn embeds_of(b: EmbedsBody) -> Result<ImageSource, ApiError> {
    let bad = |m: String| ApiError::validation(format!("image_embeds: {m}"));
    if b.stage != "projected" {
        return Err(bad(format!(
            "stage {:?}: only `projected` features (what the language model is conditioned on) stand for an image",
            b.stage
        )));
    }
    if b.dtype != "float32" {
        return Err(bad(format!("dtype {:?}: expected float32", b.dtype)));
    }
    let data: Vec<f32> = match b.data {
        serde_json::Value::String(text) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| bad(format!("data is not base64: {e}")))?;
            if bytes.len() % 4 != 0 {
                return Err(bad("data is not a whole number of f32 values".into()));
            }
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        serde_json::Value::Array(values) => values
            .iter()
            .map(|v| v.as_f64().map(|x| x as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| bad("data must hold numbers".into()))?,
        _ => {
            return Err(bad(
                "data must be a list of numbers or a base64 string".into()
            ))
        }
    };
    if data.iter().any(|v| !v.is_finite()) {
        return Err(bad("data holds a value that is not finite".into()));
    }
    if b.shape.len() != 2 || b.shape.iter().product::<usize>() != data.len() {
        return Err(bad(format!(
            "shape {:?} does not match {} values (expected [queries, hidden])",
            b.shape,
            data.len()
        )));
    }
    Ok(ImageSource::Embeds {
        shape: b.shape,
        data,
    })
}

/// Whether `s` starts like an http(s) URL (schemes are case-insensitive).
pub(super) fn is_http_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// `image`: an http(s) URL, else base64 or a `data:` URL.
pub(super) fn image_source(image: &str, index: usize) -> Result<ImageSource, ApiError> {
    if is_http_url(image) {
        return Ok(ImageSource::Url(image.to_string()));
    }
    decode_base64_image(image, index).map(ImageSource::Bytes)
}

/// What a caption or VQA request asks, whatever its encoding.
pub struct Input {
    pub images: Vec<ImageSource>,
    /// `prompt` (caption) or `question` (VQA).
    pub text: Option<String>,
    /// VQA's `questions`: several questions about one image (then `text` is `None`).
    pub questions: Vec<String>,
    pub parameters: Parameters,
    pub stream: bool,
    /// `images: [...]` was used (the answer is a `results` list, even for one image).
    pub many: bool,
    /// `image_size`: resize to this instead of the server's size (checked later, with the
    /// model's patch size and the server's `max_image_side`).
    pub image_size: Option<ImageSize>,
}

/// `parameters`: the decoding settings, plus `details` (HTTP only: each generated token's
/// `{id, text, logprob}` in the answer). Unknown names are refused by the settings' own type.
#[derive(Debug, Default, Clone)]
pub struct Parameters {
    pub generation: GenerationOverrides,
    pub details: bool,
}

impl<'de> Deserialize<'de> for Parameters {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let details = match map.remove("details") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "details: invalid type {other}, expected a boolean"
                )))
            }
        };
        let generation = GenerationOverrides::deserialize(serde_json::Value::Object(map))
            .map_err(D::Error::custom)?;
        Ok(Self {
            generation,
            details,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptionBody {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    image_size: Option<ImageSize>,
    #[serde(default)]
    image_embeds: Option<EmbedsBody>,
    #[serde(default)]
    images: Option<Vec<String>>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(default)]
    stream: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VqaBody {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    image_size: Option<ImageSize>,
    #[serde(default)]
    image_embeds: Option<EmbedsBody>,
    #[serde(default)]
    images: Option<Vec<String>>,
    #[serde(default)]
    question: Option<String>,
    #[serde(default)]
    questions: Option<Vec<String>>,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(default)]
    stream: Option<bool>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Caption,
    Vqa,
}

impl Endpoint {
    fn text_field(self) -> &'static str {
        match self {
            Endpoint::Caption => "prompt",
            Endpoint::Vqa => "question",
        }
    }
}

pub(super) fn json_error(e: serde_json::Error) -> ApiError {
    if e.is_syntax() || e.is_eof() {
        ApiError::bad_request(format!("invalid JSON body: {e}"))
    } else {
        ApiError::validation(format!("invalid request: {e}"))
    }
}

/// `image`: base64, or a `data:<mime>;base64,` URL.
pub(super) fn decode_base64_image(image: &str, index: usize) -> Result<Vec<u8>, ApiError> {
    let payload = match image.strip_prefix("data:") {
        Some(rest) => rest.split_once(";base64,").map(|(_, b)| b).ok_or_else(|| {
            ApiError::validation(format!(
                "image {index}: a data: URL must be base64 (data:<type>;base64,...)"
            ))
        })?,
        None => image,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::validation(format!("image {index} is not valid base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::validation(format!("image {index} is empty")));
    }
    Ok(bytes)
}

fn images_of(
    image: Option<String>,
    images: Option<Vec<String>>,
    embeds: Option<EmbedsBody>,
) -> Result<(Vec<ImageSource>, bool), ApiError> {
    if let Some(e) = embeds {
        if image.is_some() || images.is_some() {
            return Err(ApiError::validation(
                "give `image`, `images` or `image_embeds`, not several",
            ));
        }
        return Ok((vec![embeds_of(e)?], false));
    }
    match (image, images) {
        (Some(one), None) => Ok((vec![image_source(&one, 0)?], false)),
        (None, Some(many)) => Ok((
            many.iter()
                .enumerate()
                .map(|(i, s)| image_source(s, i))
                .collect::<Result<_, _>>()?,
            true,
        )),
        (Some(_), Some(_)) => Err(ApiError::validation("give `image` or `images`, not both")),
        (None, None) => Err(ApiError::validation("missing `image` (or `images`)")),
    }
}

fn from_value(endpoint: Endpoint, value: serde_json::Value) -> Result<Input, ApiError> {
    let input = match endpoint {
        Endpoint::Caption => {
            let b: CaptionBody = serde_json::from_value(value).map_err(json_error)?;
            let (images, many) = images_of(b.image, b.images, b.image_embeds)?;
            Input {
                images,
                text: b.prompt,
                questions: Vec::new(),
                parameters: b.parameters.unwrap_or_default(),
                stream: b.stream.unwrap_or(false),
                many,
                image_size: b.image_size,
            }
        }
        Endpoint::Vqa => {
            let b: VqaBody = serde_json::from_value(value).map_err(json_error)?;
            let (images, many) = images_of(b.image, b.images, b.image_embeds)?;
            let (text, questions) = match (b.question, b.questions) {
                (Some(q), None) => (Some(q), Vec::new()),
                (None, Some(qs)) if qs.is_empty() => {
                    return Err(ApiError::validation("`questions` is empty"))
                }
                (None, Some(_)) if many => {
                    return Err(ApiError::validation(
                        "`questions` are about one image: give `image`, not `images`",
                    ))
                }
                (None, Some(qs)) => (None, qs),
                (Some(_), Some(_)) => {
                    return Err(ApiError::validation(
                        "give `question` or `questions`, not both",
                    ))
                }
                (None, None) => return Err(ApiError::validation("missing field `question`")),
            };
            Input {
                many: many || !questions.is_empty(),
                images,
                text,
                questions,
                parameters: b.parameters.unwrap_or_default(),
                stream: b.stream.unwrap_or(false),
                image_size: b.image_size,
            }
        }
    };
    Ok(input)
}

/// Reads the body by its content type: JSON (also when none is given) or multipart.
pub async fn read(
    endpoint: Endpoint,
    request: Request,
    max_body_bytes: usize,
) -> Result<Input, ApiError> {
    refuse_declared_length(&request, max_body_bytes)?;
    let content_type = content_type(&request);
    if content_type.starts_with("multipart/form-data") {
        return read_multipart(endpoint, multipart(request).await?).await;
    }
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence != "application/json" && !essence.ends_with("+json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content type {essence:?} is not accepted: send application/json or multipart/form-data"),
        ));
    }
    let body = body_bytes(request).await?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(json_error)?;
    if !value.is_object() {
        return Err(ApiError::validation("the body must be a JSON object"));
    }
    from_value(endpoint, value)
}

/// `read` (a body reader) within `body_timeout_s`: a body that has not arrived by then is a 408,
/// and the slow sender's connection is closed.
pub(super) async fn within_body_timeout<T>(
    timeout: std::time::Duration,
    read: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s (body_timeout_s)",
                    timeout.as_secs()
                ),
            ))
        })
}

/// A declared length over the limit is refused before any of the body is read.
pub(super) fn refuse_declared_length(
    request: &Request,
    max_body_bytes: usize,
) -> Result<(), ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body_bytes as u64) {
        return Err(too_large());
    }
    Ok(())
}

/// The request's content type, lower-cased (JSON when none is given).
pub(super) fn content_type(request: &Request) -> String {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase()
}

pub(super) async fn multipart(request: Request) -> Result<Multipart, ApiError> {
    Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

/// The whole body, within the router's body limit (413 past it).
pub(super) async fn body_bytes(request: Request) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, &()).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::bad_request(e.body_text())
        }
    })
}

pub(super) fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than the server accepts (max_body_bytes)",
    )
}

async fn read_multipart(endpoint: Endpoint, mut multipart: Multipart) -> Result<Input, ApiError> {
    let multipart_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::bad_request(format!("invalid multipart body: {}", e.body_text()))
        }
    };
    let mut images = Vec::new();
    let mut fields = serde_json::Map::new();
    let mut parameters = serde_json::Map::new();
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" | "images" => {
                let bytes = field.bytes().await.map_err(multipart_error)?;
                if bytes.is_empty() {
                    return Err(ApiError::validation(format!(
                        "image {} is empty",
                        images.len()
                    )));
                }
                images.push(ImageSource::Bytes(bytes.to_vec()));
            }
            _ => {
                let text = field.text().await.map_err(multipart_error)?;
                if name == endpoint.text_field() {
                    fields.insert(name, serde_json::Value::String(text));
                } else if name == "image_size" {
                    fields.insert(name, image_size_field(&text)?);
                } else if name == "stream" {
                    let value = parse_bool(&text).ok_or_else(|| {
                        ApiError::validation(format!("stream must be true or false, got {text:?}"))
                    })?;
                    fields.insert(name, serde_json::Value::Bool(value));
                } else if name == "parameters" {
                    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                        ApiError::validation(format!("the parameters field is not JSON: {e}"))
                    })?;
                    let serde_json::Value::Object(map) = value else {
                        return Err(ApiError::validation(
                            "the parameters field must be a JSON object",
                        ));
                    };
                    parameters.extend(map);
                } else {
                    add_parameter_field(&mut parameters, name, text);
                }
            }
        }
    }
    if images.is_empty() {
        return Err(ApiError::validation("missing the `image` file field"));
    }
    if !parameters.is_empty() {
        fields.insert("parameters".into(), serde_json::Value::Object(parameters));
    }
    if endpoint == Endpoint::Vqa && !fields.contains_key("question") {
        return Err(ApiError::validation("missing field `question`"));
    }
    let mut input = from_value(endpoint, {
        // Validate the fields with the JSON schema, with a placeholder for the image.
        fields.insert("image".into(), serde_json::Value::String("AA==".into()));
        serde_json::Value::Object(fields)
    })?;
    input.many = images.len() > 1;
    input.images = images;
    Ok(input)
}

/// A generation parameter sent as its own form field: a number or boolean when it reads as
/// one, else a string (unknown names are refused later, by the settings' type). `stop` may be
/// repeated; its values collect into a list.
fn add_parameter_field(
    parameters: &mut serde_json::Map<String, serde_json::Value>,
    name: String,
    text: String,
) {
    let value = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v,
        _ if name == "stop" => serde_json::Value::Array(vec![text.into()]),
        _ => serde_json::Value::String(text),
    };
    if name == "stop" {
        if let Some(serde_json::Value::Array(list)) = parameters.get_mut("stop") {
            if let serde_json::Value::Array(more) = value {
                list.extend(more);
            }
            return;
        }
    }
    parameters.insert(name, value);
}

/// A form field `image_size`: "N" or "HxW", as the JSON value the body schema takes.
pub(super) fn image_size_field(text: &str) -> Result<serde_json::Value, ApiError> {
    let size = ImageSize::parse(text).map_err(ApiError::validation)?;
    let side = |n: usize| serde_json::Value::from(n);
    Ok(if text.contains(['x', 'X']) {
        serde_json::Value::Array(vec![side(size.height), side(size.width)])
    } else {
        side(size.height)
    })
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}
