//! The response bodies of the native routes as serde types, one struct per shape in
//! openapi.yaml. Handlers build these from the engine's results ([`GeneratedSequence`]) and
//! never write JSON by hand, so a second wire format maps the same results onto its own types.
//!
//! May use: `generation` (its result types). May not touch: the engine or the model.

use serde::Serialize;

use crate::generation::{FinishReason, GeneratedSequence};
use crate::startup::StartupInfo;

/// One generated token, as `details.tokens[]` and each stream event carry it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenInfo {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

/// A stream's token event: `data: {"token": {...}}`.
#[derive(Debug, Serialize)]
pub struct TokenEvent<'a> {
    pub token: &'a TokenInfo,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Details {
    pub tokens: Vec<TokenInfo>,
}

/// One of several returned sequences (beam search or sampling with `num_return_sequences`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SequenceOut {
    pub text: String,
    pub finish_reason: FinishReason,
    pub token_ids: Vec<u32>,
    pub score: f32,
}

/// Which field holds the text: `text` for a caption, `answer` for VQA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextField {
    Text,
    Answer,
}

/// The answer for one image (`CaptionResult` / `VqaResult` in openapi.yaml).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GenerationResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub token_ids: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequences: Option<Vec<SequenceOut>>,
}

impl GenerationResult {
    /// The first sequence is the answer; all of them are listed when there are several.
    /// `seqs` is never empty (the engine reports an empty result as an error).
    pub fn new(
        seqs: &[GeneratedSequence],
        prompt_tokens: usize,
        field: TextField,
        tokens: Option<Vec<TokenInfo>>,
    ) -> Self {
        let first = &seqs[0];
        let text = first.text.clone();
        let (text, answer) = match field {
            TextField::Text => (Some(text), None),
            TextField::Answer => (None, Some(text)),
        };
        let sequences = (seqs.len() > 1).then(|| {
            seqs.iter()
                .map(|q| SequenceOut {
                    text: q.text.clone(),
                    finish_reason: q.finish_reason,
                    token_ids: q.token_ids.clone(),
                    score: q.score,
                })
                .collect()
        });
        Self {
            text,
            answer,
            finish_reason: first.finish_reason,
            usage: Usage {
                prompt_tokens,
                generated_tokens: first.token_ids.len(),
            },
            token_ids: first.token_ids.clone(),
            details: tokens.map(|tokens| Details { tokens }),
            sequences,
        }
    }
}

/// `images: [...]` answers: one result per image, in order.
#[derive(Debug, Serialize)]
pub struct Results {
    pub results: Vec<GenerationResult>,
}

/// Every native error body, and a stream's `error` event.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    pub error_type: &'a str,
}

/// What `/info` reports that does not change while the server runs.
#[derive(Debug, Clone, Serialize)]
pub struct StaticInfo {
    pub model_id: String,
    pub revision: String,
    pub model_type: String,
    pub dtype: String,
    pub quantize: String,
    /// Where the model runs: "cpu", "cuda:0", ...
    pub device: String,
    /// The hardware's name (the GPU's, or the CPU's model name).
    pub device_name: String,
    /// "auto" (the CPU kernels where they apply) or "generic" (candle's ops only).
    pub kernels: String,
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_queue: usize,
    pub max_concurrent_requests: usize,
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    /// [height, width] images are resized to unless a request asks for another size.
    pub image_size: [usize; 2],
    pub max_image_side: usize,
    /// Sides of a requested `image_size` are multiples of this.
    pub patch_size: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub request_timeout_s: Option<u64>,
    pub vqa_template: String,
    pub version: &'static str,
}

/// `GET /info` while the model loads: `ready` false and the start-up phase.
#[derive(Debug, Serialize)]
pub struct LoadingInfo {
    pub ready: bool,
    pub model_id: String,
    pub version: &'static str,
    pub startup: StartupInfo,
}

/// `GET /info`: the static part and the live counters.
#[derive(Debug, Serialize)]
pub struct Info<'a> {
    #[serde(flatten)]
    pub fixed: &'a StaticInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup: Option<StartupInfo>,
    pub ready: bool,
    pub queue_depth: i64,
    pub running_requests: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(text: &str, ids: &[u32], score: f32) -> GeneratedSequence {
        GeneratedSequence {
            token_ids: ids.to_vec(),
            text: text.to_string(),
            finish_reason: FinishReason::Length,
            score,
        }
    }

    #[test]
    fn one_sequence_has_no_sequences_list_and_names_its_field() {
        let r = GenerationResult::new(&[seq("a cat", &[5, 6], -1.0)], 3, TextField::Answer, None);
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["answer", "finish_reason", "token_ids", "usage"],
            "{v}"
        );
        assert_eq!(v["answer"], "a cat");
        assert_eq!(v["usage"]["generated_tokens"], 2);
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["finish_reason"], "length");
    }

    #[test]
    fn several_sequences_are_all_listed_and_details_carry_tokens() {
        let seqs = [seq("a", &[1], -0.5), seq("b", &[2, 3], -0.7)];
        let token = TokenInfo {
            id: 1,
            text: "a".into(),
            logprob: -0.5,
        };
        let r = GenerationResult::new(&seqs, 0, TextField::Text, Some(vec![token.clone()]));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["text"], "a");
        assert!(v.get("answer").is_none());
        assert_eq!(v["sequences"].as_array().unwrap().len(), 2);
        assert_eq!(v["sequences"][1]["token_ids"], serde_json::json!([2, 3]));
        assert_eq!(
            v["details"]["tokens"][0],
            serde_json::to_value(&token).unwrap()
        );
    }
}
