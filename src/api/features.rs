//! `POST /v1/features`: the reference's feature APIs over HTTP. For each image, one stage of
//! `get_image_features`: `vision` (the vision model's `last_hidden_state` [tokens, Dv]),
//! `vision_pooled` (its `pooler_output` [Dv]), `qformer` (the Q-Former's `last_hidden_state`
//! [queries, Dq]) or `projected` (the language projection of it [queries, D_lm], what the
//! language model is conditioned on; served from the vision cache when the image was seen).
//! JSON `{image | images, stage, encoding_format: float | base64, image_size}` or multipart
//! (`image` file fields, `stage`, `encoding_format` and `image_size` form fields). Jobs run on the model thread between
//! decode steps, batched with each other.
//!
//! May use: the native handlers' steps (`infer`), the input readers. May not touch: the model.

use std::sync::Arc;

use axum::extract::{Multipart, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::infer::{self, Admitted, Submitted};
use super::input::{self, image_source, too_large, ImageSource};
use super::AppState;
use crate::engine::{FeatureStage, Job, JobEvent};
use crate::preprocess::ImageSize;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
enum Stage {
    Vision,
    VisionPooled,
    #[serde(rename = "qformer")]
    QFormer,
    #[default]
    Projected,
}

impl Stage {
    fn engine(self) -> FeatureStage {
        match self {
            Stage::Vision => FeatureStage::Vision,
            Stage::VisionPooled => FeatureStage::VisionPooled,
            Stage::QFormer => FeatureStage::QFormer,
            Stage::Projected => FeatureStage::Projected,
        }
    }
    fn parse(s: &str) -> Result<Self, ApiError> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            ApiError::validation(format!(
                "stage {s:?}: expected vision, vision_pooled, qformer or projected"
            ))
        })
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
enum Encoding {
    #[default]
    Float,
    Base64,
}

impl Encoding {
    fn parse(s: &str) -> Result<Self, ApiError> {
        match s {
            "float" => Ok(Self::Float),
            "base64" => Ok(Self::Base64),
            _ => Err(ApiError::validation(format!(
                "encoding_format {s:?}: expected float or base64"
            ))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeaturesBody {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    images: Option<Vec<String>>,
    #[serde(default)]
    stage: Stage,
    #[serde(default)]
    encoding_format: Encoding,
    #[serde(default)]
    image_size: Option<ImageSize>,
}

struct FeaturesInput {
    images: Vec<ImageSource>,
    many: bool,
    stage: Stage,
    encoding: Encoding,
    image_size: Option<ImageSize>,
}

/// Row-major f32 values, as numbers or as base64 of their little-endian bytes.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Data {
    Float(Vec<f32>),
    Base64(String),
}

/// One image's features (`FeatureResult` in openapi.yaml).
#[derive(Debug, Serialize)]
struct FeatureResult {
    stage: Stage,
    shape: Vec<usize>,
    dtype: &'static str,
    data: Data,
}

#[derive(Debug, Serialize)]
struct FeatureResults {
    results: Vec<FeatureResult>,
}

pub async fn features(State(s): State<Arc<AppState>>, request: Request) -> Response {
    handle(s, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn read(s: &AppState, request: Request) -> Result<FeaturesInput, ApiError> {
    input::refuse_declared_length(&request, s.limits.max_body_bytes)?;
    if input::content_type(&request).starts_with("multipart/form-data") {
        return read_multipart(input::multipart(request).await?).await;
    }
    let body = input::body_bytes(request).await?;
    let b: FeaturesBody = serde_json::from_slice(&body).map_err(input::json_error)?;
    let (images, many) = match (b.image, b.images) {
        (Some(one), None) => (vec![image_source(&one, 0)?], false),
        (None, Some(list)) => (
            list.iter()
                .enumerate()
                .map(|(i, x)| image_source(x, i))
                .collect::<Result<_, _>>()?,
            true,
        ),
        (Some(_), Some(_)) => {
            return Err(ApiError::validation("give `image` or `images`, not both"))
        }
        (None, None) => return Err(ApiError::validation("missing `image` (or `images`)")),
    };
    Ok(FeaturesInput {
        images,
        many,
        stage: b.stage,
        encoding: b.encoding_format,
        image_size: b.image_size,
    })
}

async fn read_multipart(mut multipart: Multipart) -> Result<FeaturesInput, ApiError> {
    let error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::bad_request(format!("invalid multipart body: {}", e.body_text()))
        }
    };
    let (mut images, mut stage, mut encoding) = (Vec::new(), Stage::default(), Encoding::default());
    let mut image_size = None;
    while let Some(field) = multipart.next_field().await.map_err(error)? {
        match field.name().unwrap_or_default() {
            "image" | "images" => {
                let bytes = field.bytes().await.map_err(error)?;
                if bytes.is_empty() {
                    return Err(ApiError::validation(format!(
                        "image {} is empty",
                        images.len()
                    )));
                }
                images.push(ImageSource::Bytes(bytes.to_vec()));
            }
            "stage" => stage = Stage::parse(&field.text().await.map_err(error)?)?,
            "encoding_format" => encoding = Encoding::parse(&field.text().await.map_err(error)?)?,
            "image_size" => {
                let text = field.text().await.map_err(error)?;
                image_size = Some(ImageSize::parse(&text).map_err(ApiError::validation)?);
            }
            other => {
                return Err(ApiError::validation(format!(
                    "unknown field `{other}`: expected image, stage, encoding_format, image_size"
                )))
            }
        }
    }
    if images.is_empty() {
        return Err(ApiError::validation("missing the `image` file field"));
    }
    Ok(FeaturesInput {
        many: images.len() > 1,
        images,
        stage,
        encoding,
        image_size,
    })
}

async fn handle(s: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let Admitted {
        permit,
        deadline,
        mut incoming,
    } = infer::admit(&s, request.headers()).await?;
    let input = input::within_body_timeout(s.limits.body_timeout, read(&s, request)).await?;
    incoming.received(&s);
    let n = input.images.len();
    if n > s.limits.max_images_per_request {
        return Err(ApiError::validation(format!(
            "{n} images in one request; at most {} (max_images_per_request)",
            s.limits.max_images_per_request
        )));
    }
    if n == 0 {
        return Err(ApiError::validation("`images` is empty"));
    }
    let image_size = infer::checked_image_size(&s, input.image_size)?;
    let images = infer::load_images(&s, input.images).await?;
    let pixels = infer::preprocess_all(&s, images, image_size).await?;
    let stage = input.stage.engine();
    let jobs = pixels
        .into_iter()
        .map(|p| {
            let (mut job, rx) = Job::features(p, stage);
            job.image_size = image_size;
            ((job, rx), 0)
        })
        .collect();
    let submitted = infer::enqueue(&s, jobs)?;
    drop(incoming);
    let guard = infer::cancel_guard(&submitted);
    let collected = async {
        let mut results = Vec::with_capacity(submitted.len());
        for job in submitted {
            results.push(answer(job, input.stage, input.encoding).await?);
        }
        Ok::<_, ApiError>(results)
    };
    let results = infer::within(deadline, collected).await?;
    drop(guard);
    drop(permit);
    Ok(if input.many {
        Json(FeatureResults { results }).into_response()
    } else {
        let one = results.into_iter().next();
        Json(one.ok_or_else(|| ApiError::internal("no result"))?).into_response()
    })
}

async fn answer(
    mut job: Submitted,
    stage: Stage,
    encoding: Encoding,
) -> Result<FeatureResult, ApiError> {
    match job.rx.recv().await {
        Some(JobEvent::Features { shape, data }) => Ok(FeatureResult {
            stage,
            shape,
            dtype: "float32",
            data: match encoding {
                Encoding::Float => Data::Float(data),
                Encoding::Base64 => {
                    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    Data::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            },
        }),
        Some(JobEvent::Error(e)) => Err(e.into()),
        _ => Err(ApiError::internal("the model worker dropped the request")),
    }
}
