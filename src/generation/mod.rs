//! Decoding over the language model: per-request settings, the logits processors and
//! samplers transformers' `generate()` applies, beam search, stop strings, and the batch that
//! runs many requests together.
//!
//! A [`DecodeBatch`] owns the KV state of all its model rows. Each request maps to one row
//! (greedy), `num_return_sequences` rows (sampling) or `num_beams` rows (beam search); after
//! every step the rows are re-gathered in one `index_select` that both reorders beams and drops
//! finished rows, so finished work costs nothing and no request influences another.

mod beam;
mod detok;
pub mod processors;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use beam::BeamSearch;
pub use detok::IncrementalDecoder;

pub use crate::model::config::GenerationDefaults;
use crate::model::{Blip2Model, DecodeState, ModelError, Prefilled, Result};
use crate::prompt::{Prompt, PromptBuilder};

/// Per-request decoding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// EOS is masked (logit -inf) until this many tokens exist.
    pub min_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f32,
    /// transformers samples with top_k 50 unless told otherwise; `None` or 0 disables it.
    pub top_k: Option<usize>,
    pub top_p: f32,
    pub repetition_penalty: f32,
    /// Beam scores are divided by `length ** length_penalty` (the power in f64, as Python).
    pub length_penalty: f64,
    pub num_beams: usize,
    pub num_return_sequences: usize,
    pub no_repeat_ngram_size: usize,
    /// Generation ends when the text contains one of these; it is cut from the text.
    pub stop: Vec<String>,
    /// Seed of this request's sampler (reproducible whatever else is batched with it).
    pub seed: Option<u64>,
}

impl Default for GenerationParams {
    /// transformers' defaults for BLIP-2: greedy, 20 new tokens.
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: Some(50),
            top_p: 1.0,
            repetition_penalty: 1.0,
            length_penalty: 1.0,
            num_beams: 1,
            num_return_sequences: 1,
            no_repeat_ngram_size: 0,
            stop: Vec::new(),
            seed: None,
        }
    }
}

/// The most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 8;
/// Upper bounds that keep one request from taking the machine (memory grows with beams and
/// returned sequences, time with new tokens).
pub const MAX_BEAMS: usize = 16;
pub const MAX_RETURN_SEQUENCES: usize = 16;
pub const MAX_NEW_TOKENS: usize = 4096;

impl GenerationParams {
    /// The defaults with the checkpoint's text-config overrides applied.
    pub fn from_defaults(d: &GenerationDefaults) -> Self {
        let base = Self::default();
        Self {
            max_new_tokens: d.max_new_tokens.unwrap_or(base.max_new_tokens),
            min_new_tokens: d.min_new_tokens.unwrap_or(base.min_new_tokens),
            do_sample: d.do_sample.unwrap_or(base.do_sample),
            temperature: d.temperature.unwrap_or(base.temperature),
            top_k: d.top_k.or(base.top_k),
            top_p: d.top_p.unwrap_or(base.top_p),
            repetition_penalty: d.repetition_penalty.unwrap_or(base.repetition_penalty),
            length_penalty: d.length_penalty.unwrap_or(base.length_penalty),
            num_beams: d.num_beams.unwrap_or(base.num_beams),
            num_return_sequences: d.num_return_sequences.unwrap_or(base.num_return_sequences),
            no_repeat_ngram_size: d.no_repeat_ngram_size.unwrap_or(base.no_repeat_ngram_size),
            ..base
        }
    }

    /// Refuses settings the reference refuses or that make no sense, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ModelError::Input(msg));
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS {
            return bad(format!(
                "max_new_tokens must be in 1..={MAX_NEW_TOKENS}, got {}",
                self.max_new_tokens
            ));
        }
        if self.num_beams > MAX_BEAMS || self.num_return_sequences > MAX_RETURN_SEQUENCES {
            return bad(format!(
                "num_beams must be <= {MAX_BEAMS} and num_return_sequences <= {MAX_RETURN_SEQUENCES}"
            ));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return bad(format!(
                "min_new_tokens ({}) must not exceed max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            ));
        }
        // The warpers only run when sampling, as in transformers.
        if self.do_sample && !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature must be > 0 when sampling, got {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad(format!("top_p must be in [0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if !self.length_penalty.is_finite() {
            return bad("length_penalty must be finite".into());
        }
        if self.num_beams == 0 || self.num_return_sequences == 0 {
            return bad("num_beams and num_return_sequences must be >= 1".into());
        }
        if self.num_beams > 1 && self.do_sample {
            return bad("beam sampling (do_sample with num_beams > 1) is not supported".into());
        }
        if self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            return bad(format!(
                "num_return_sequences ({}) must be <= num_beams ({})",
                self.num_return_sequences, self.num_beams
            ));
        }
        if self.num_beams == 1 && !self.do_sample && self.num_return_sequences > 1 {
            return bad("greedy search returns one sequence: set do_sample or num_beams for num_return_sequences > 1".into());
        }
        if self.stop.len() > MAX_STOP_STRINGS || self.stop.iter().any(String::is_empty) {
            return bad(format!(
                "stop takes at most {MAX_STOP_STRINGS} non-empty strings"
            ));
        }
        Ok(())
    }
}

/// Decoding settings a caller may give (the CLI's flags, the HTTP API's `parameters`, minus
/// their own presentation fields);
/// each one left out takes the checkpoint's text-config value, else transformers' default
/// (greedy, 20 new tokens, top_k 50 when sampling).
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationOverrides {
    /// Maximum number of new tokens [default: 20].
    pub max_new_tokens: Option<usize>,
    /// EOS is suppressed until this many new tokens exist [default: 0].
    pub min_new_tokens: Option<usize>,
    /// Beam search with this many beams [default: 1 = greedy or sampling].
    pub num_beams: Option<usize>,
    /// Sample instead of taking the most likely token (`--do-sample false` turns a checkpoint's
    /// default off).
    pub do_sample: Option<bool>,
    /// Sampling temperature [default: 1.0].
    pub temperature: Option<f32>,
    /// Sampling: keep the k most likely tokens (0 disables) [default: 50].
    pub top_k: Option<usize>,
    /// Sampling: keep the smallest set of tokens whose probability reaches p [default: 1.0].
    pub top_p: Option<f32>,
    /// Penalise tokens already present (prompt included, as transformers does) [default: 1.0].
    pub repetition_penalty: Option<f32>,
    /// Beam search: scores are divided by length ** this [default: 1.0].
    pub length_penalty: Option<f64>,
    /// Sequences returned per image (<= num_beams for beam search; needs sampling otherwise).
    pub num_return_sequences: Option<usize>,
    /// Forbid repeating any n-gram of this size [default: 0 = off].
    pub no_repeat_ngram_size: Option<usize>,
    /// Seed of the sampler, for reproducible sampling.
    pub seed: Option<u64>,
    /// Stop when the text contains this string (cut from the output); repeatable.
    pub stop: Option<Vec<String>>,
}

impl GenerationOverrides {
    /// `base` with every given setting replaced.
    pub fn apply(self, mut p: GenerationParams) -> GenerationParams {
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { p.$field = v; })* };
        }
        set!(
            max_new_tokens,
            min_new_tokens,
            num_beams,
            do_sample,
            temperature,
            top_p,
            repetition_penalty,
            length_penalty,
            num_return_sequences,
            no_repeat_ngram_size,
            stop
        );
        if self.top_k.is_some() {
            p.top_k = self.top_k;
        }
        if self.seed.is_some() {
            p.seed = self.seed;
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// The model produced an EOS id (kept as the last token).
    EosToken,
    /// A stop string appeared; it is cut from the text.
    StopSequence,
    /// The caller cancelled the request.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedSequence {
    /// New tokens only (EOS included when it ended the sequence).
    pub token_ids: Vec<u32>,
    /// Decoded text (special tokens skipped), cut before a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    /// Beam search: the length-normalised score; otherwise the sum of the chosen tokens'
    /// log-probabilities.
    pub score: f32,
}

/// One request entering a batch.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    pub prompt: Prompt,
    pub params: GenerationParams,
    /// Set from outside to stop this request at the next step.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl SequenceRequest {
    pub fn new(prompt: Prompt, params: GenerationParams) -> Self {
        Self {
            prompt,
            params,
            cancel: None,
        }
    }
}

/// A sampled or greedy sequence in progress.
struct Candidate {
    tokens: Vec<u32>,
    logprob: f32,
    text: IncrementalDecoder,
    shown: String,
    finish: Option<FinishReason>,
    /// Its row among the rows the request had this step.
    row: usize,
    /// What the last token added, for streaming.
    last_piece: String,
    last_logprob: f32,
}

enum Search {
    Sampled {
        candidates: Vec<Candidate>,
        rng: Option<Box<StdRng>>,
    },
    Beam(BeamSearch),
}

impl Search {
    /// Beam search for `num_beams` > 1; otherwise `num_return_sequences` greedy or sampled
    /// candidates (sampling seeded by `seed` when given).
    fn new(params: &GenerationParams) -> Self {
        if params.num_beams > 1 {
            return Search::Beam(BeamSearch::new(params.num_beams));
        }
        let candidates = (0..params.num_return_sequences)
            .map(|_| Candidate {
                tokens: Vec::new(),
                logprob: 0.0,
                text: IncrementalDecoder::new(),
                shown: String::new(),
                finish: None,
                row: 0,
                last_piece: String::new(),
                last_logprob: 0.0,
            })
            .collect();
        let rng = params.do_sample.then(|| {
            Box::new(match params.seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_os_rng(),
            })
        });
        Search::Sampled { candidates, rng }
    }
}

struct RequestState {
    params: GenerationParams,
    /// What the reference's processors see before the new tokens (OPT: the input ids;
    /// T5: the decoder start id).
    context: Vec<u32>,
    search: Search,
    cancel: Option<Arc<AtomicBool>>,
    /// Rows this request has in the current model batch.
    live_rows: usize,
}

/// A batch of requests being decoded together.
pub struct DecodeBatch<'m> {
    model: &'m Blip2Model,
    tok: &'m PromptBuilder,
    /// The language model's state for the live rows (opaque: see `model::lm`).
    state: Box<dyn DecodeState>,
    requests: Vec<RequestState>,
    /// Next-token logits of the live model rows [rows, V] in f32, rows grouped by request.
    logits: Tensor,
    eos: Vec<u32>,
    /// T5 only: the encoder's `last_hidden_state` [B, L, d] of the prefill.
    encoder_output: Option<Tensor>,
    /// Streamed tokens of the last step, see [`DecodeBatch::take_stream_events`].
    events: Vec<StreamEvent>,
}

/// One streamed token.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// Position of the request in the batch when the step ran.
    pub request: usize,
    pub token: u32,
    /// Text this token completes (empty while a character is incomplete).
    pub text: String,
    pub logprob: f32,
}

impl<'m> DecodeBatch<'m> {
    /// Runs the prefill for `query_embeds` [B, Q, D] and one request per row.
    pub fn prefill(
        model: &'m Blip2Model,
        tok: &'m PromptBuilder,
        query_embeds: &Tensor,
        requests: &[SequenceRequest],
    ) -> Result<Self> {
        let (b, q, _) = query_embeds.dims3()?;
        if requests.len() != b {
            return Err(ModelError::Input(format!(
                "{b} images but {} requests",
                requests.len()
            )));
        }
        if requests.iter().any(|r| r.prompt.text_ids.is_empty()) {
            return Err(ModelError::Input("a prompt tokenised to no ids".into()));
        }
        for r in requests {
            r.params.validate()?;
        }
        let lm = model.language_model.as_ref();
        let pad = model.config.text.pad_token_id().unwrap_or(0);
        if let Some(max_positions) = lm.position_limit() {
            // Positions count each row's real tokens only, so the limit is per request.
            for r in requests {
                let (len, new) = (r.prompt.text_ids.len(), r.params.max_new_tokens);
                if q.saturating_add(len).saturating_add(new) > max_positions {
                    return Err(ModelError::TooLong(format!(
                        "{q} query tokens + {len} prompt tokens + {new} new tokens exceed the model's {max_positions} positions"
                    )));
                }
            }
        }
        let prompts: Vec<&[u32]> = requests
            .iter()
            .map(|r| r.prompt.text_ids.as_slice())
            .collect();
        let Prefilled {
            state,
            logits,
            encoder_output,
        } = lm.prefill(query_embeds, &prompts, pad)?;
        let decoder_start = lm.decoder_start();
        let requests = requests
            .iter()
            .map(|r| {
                let context = match decoder_start {
                    Some(start) => vec![start],
                    None => tok.reference_input_ids(&r.prompt),
                };
                let search = Search::new(&r.params);
                RequestState {
                    params: r.params.clone(),
                    context,
                    search,
                    cancel: r.cancel.clone(),
                    live_rows: 1,
                }
            })
            .collect();
        Ok(Self {
            model,
            tok,
            state,
            requests,
            logits,
            eos: model.config.text.eos_token_ids(),
            encoder_output,
            events: Vec::new(),
        })
    }

    /// Adds the requests of `other` (prefilled separately, possibly with prompts of other
    /// lengths, possibly at another step) to this batch between two steps: KV caches are
    /// re-padded to a common length with the padding masked, so every request keeps decoding
    /// exactly as it would alone. Continuous batching admits new requests this way.
    pub fn join(&mut self, other: DecodeBatch<'m>) -> Result<()> {
        if !std::ptr::eq(self.model, other.model) {
            return Err(ModelError::Input(
                "cannot join batches of different models".into(),
            ));
        }
        if self.is_done() {
            // Nothing of ours is live (our state may still hold the rows of the last step).
            self.state = other.state;
            self.logits = other.logits;
            self.requests.extend(other.requests);
            self.encoder_output = None;
            return Ok(());
        }
        // Rows are grouped by request in order; a finished request holds no rows.
        self.state.merge(other.state)?;
        self.logits = Tensor::cat(&[&self.logits, &other.logits], 0)?;
        self.requests.extend(other.requests);
        self.encoder_output = None;
        Ok(())
    }

    /// Next-token logits of the live rows [rows, V] (f32), grouped by request.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// The T5 encoder's output for the prefilled rows (None for OPT).
    pub fn encoder_output(&self) -> Option<&Tensor> {
        self.encoder_output.as_ref()
    }

    pub fn is_done(&self) -> bool {
        self.requests.iter().all(|r| r.live_rows == 0)
    }

    /// Chooses the next token of every live sequence, retires finished ones, and runs the
    /// model on the survivors.
    pub fn step(&mut self) -> Result<()> {
        if self.is_done() {
            return Ok(());
        }
        let logits = self.logits.to_vec2::<f32>()?;
        let mut parents = Vec::new();
        let mut tokens = Vec::new();
        let mut base = 0;
        for (position, req) in self.requests.iter_mut().enumerate() {
            let rows = &logits[base..base + req.live_rows];
            base += req.live_rows;
            if req.live_rows == 0 {
                continue;
            }
            let cancelled = req
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed));
            let next = if cancelled {
                match &mut req.search {
                    Search::Sampled { candidates, .. } => {
                        for c in candidates.iter_mut().filter(|c| c.finish.is_none()) {
                            c.finish = Some(FinishReason::Cancelled);
                        }
                    }
                    Search::Beam(beam) => beam.cancel(req.params.length_penalty),
                }
                Vec::new()
            } else {
                let next = advance(req, rows, &self.eos, self.tok);
                if let Search::Sampled { candidates, .. } = &req.search {
                    if let [c] = candidates.as_slice() {
                        if let Some(&token) = c.tokens.last() {
                            self.events.push(StreamEvent {
                                request: position,
                                token,
                                text: c.last_piece.clone(),
                                logprob: c.last_logprob,
                            });
                        }
                    }
                }
                next
            };
            let row_base = base - req.live_rows;
            req.live_rows = next.len();
            for (parent, token) in next {
                parents.push(row_base + parent);
                tokens.push(token);
            }
        }
        if parents.is_empty() {
            return Ok(());
        }
        let lm = self.model.language_model.as_ref();
        self.state.select_rows(&parents)?;
        self.logits = lm.step(self.state.as_mut(), &tokens)?;
        Ok(())
    }

    /// Removes the requests that have finished and returns them with their position among the
    /// requests before removal (positions of later requests shift down). They hold no model
    /// rows, so the KV state is unaffected.
    pub fn take_finished(&mut self) -> Result<Vec<(usize, Vec<GeneratedSequence>)>> {
        let mut out = Vec::new();
        let mut kept = Vec::with_capacity(self.requests.len());
        for (i, req) in std::mem::take(&mut self.requests).into_iter().enumerate() {
            if req.live_rows == 0 {
                out.push((i, finish(req, self.tok, &self.eos)?));
            } else {
                kept.push(req);
            }
        }
        self.requests = kept;
        Ok(out)
    }

    /// Tokens chosen by the last step for requests that stream (one sequence, no beams), as
    /// (request position, token id, text piece completed by it, its log-probability).
    pub fn take_stream_events(&mut self) -> Vec<StreamEvent> {
        std::mem::take(&mut self.events)
    }

    /// Number of requests in the batch (finished ones included until taken).
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Runs every request to completion; one list of sequences per request.
    pub fn run(mut self) -> Result<Vec<Vec<GeneratedSequence>>> {
        while !self.is_done() {
            self.step()?;
        }
        let tok = self.tok;
        let eos = self.eos.clone();
        self.requests
            .into_iter()
            .map(|r| finish(r, tok, &eos))
            .collect()
    }
}

/// One step of one request: returns its continuing rows as (parent row, token).
fn advance(
    req: &mut RequestState,
    rows: &[Vec<f32>],
    eos: &[u32],
    tok: &PromptBuilder,
) -> Vec<(usize, u32)> {
    let params = &req.params;
    match &mut req.search {
        Search::Beam(beam) => beam.step(rows, &req.context, params, eos),
        Search::Sampled { candidates, rng } => {
            let mut next = Vec::new();
            for c in candidates.iter_mut().filter(|c| c.finish.is_none()) {
                let mut scores = rows[c.row].clone();
                processors::process(&mut scores, &req.context, &c.tokens, params, eos);
                let token = match rng {
                    Some(rng) => {
                        processors::warp(&mut scores, params);
                        processors::sample(&scores, rng.random::<f64>())
                    }
                    None => processors::argmax(&scores),
                };
                c.last_logprob = processors::log_softmax(&scores)[token as usize];
                c.logprob += c.last_logprob;
                let shown_before = c.shown.len();
                c.tokens.push(token);
                // Decoding known ids cannot fail; were it to, the piece is only held back from
                // the stop check (the final text is decoded again at the end).
                if let Ok(Some(piece)) = c.text.push(token, tok) {
                    c.shown.push_str(&piece);
                }
                if eos.contains(&token) {
                    c.finish = Some(FinishReason::EosToken);
                } else if let Some(cut) = find_stop(&c.shown, &params.stop) {
                    c.shown.truncate(cut);
                    c.finish = Some(FinishReason::StopSequence);
                } else if c.tokens.len() >= params.max_new_tokens {
                    c.finish = Some(FinishReason::Length);
                } else {
                    next.push((c.row, token));
                    c.row = next.len() - 1;
                }
                // What this token adds to the visible text (nothing past a stop string).
                c.last_piece = c.shown.get(shown_before..).unwrap_or("").to_string();
            }
            next
        }
    }
}

/// Byte offset where the earliest stop string starts in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

fn finish(req: RequestState, tok: &PromptBuilder, eos: &[u32]) -> Result<Vec<GeneratedSequence>> {
    let decode = |ids: &[u32]| {
        tok.decode(ids)
            .map_err(|e| ModelError::Input(e.to_string()))
    };
    match req.search {
        Search::Sampled { candidates, .. } => candidates
            .into_iter()
            .map(|c| {
                let finish_reason = c.finish.unwrap_or(FinishReason::Length);
                let text = if finish_reason == FinishReason::StopSequence {
                    c.shown
                } else {
                    decode(&c.tokens)?
                };
                Ok(GeneratedSequence {
                    token_ids: c.tokens,
                    text,
                    finish_reason,
                    score: c.logprob,
                })
            })
            .collect(),
        Search::Beam(beam) => beam
            .best(req.params.num_return_sequences)
            .into_iter()
            .map(|h| {
                let mut text = decode(&h.tokens)?;
                let mut finish_reason = if h.cancelled {
                    FinishReason::Cancelled
                } else if h.tokens.last().is_some_and(|t| eos.contains(t)) {
                    FinishReason::EosToken
                } else {
                    FinishReason::Length
                };
                if let Some(cut) = find_stop(&text, &req.params.stop) {
                    text.truncate(cut);
                    finish_reason = FinishReason::StopSequence;
                }
                Ok(GeneratedSequence {
                    token_ids: h.tokens,
                    text,
                    finish_reason,
                    score: h.score,
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_are_refused_by_name() {
        let ok = GenerationParams::default();
        assert!(ok.validate().is_ok());
        let cases = [
            (
                GenerationParams {
                    max_new_tokens: 3,
                    min_new_tokens: 4,
                    ..ok.clone()
                },
                "min_new_tokens",
            ),
            (
                GenerationParams {
                    max_new_tokens: 0,
                    ..ok.clone()
                },
                "max_new_tokens",
            ),
            (
                GenerationParams {
                    temperature: 0.0,
                    do_sample: true,
                    ..ok.clone()
                },
                "temperature",
            ),
            (
                GenerationParams {
                    top_p: 1.5,
                    ..ok.clone()
                },
                "top_p",
            ),
            (
                GenerationParams {
                    repetition_penalty: -1.0,
                    ..ok.clone()
                },
                "repetition_penalty",
            ),
            (
                GenerationParams {
                    num_beams: 2,
                    num_return_sequences: 3,
                    ..ok.clone()
                },
                "num_return_sequences",
            ),
            (
                GenerationParams {
                    num_return_sequences: 2,
                    ..ok.clone()
                },
                "greedy",
            ),
            (
                GenerationParams {
                    num_beams: 2,
                    do_sample: true,
                    ..ok.clone()
                },
                "beam sampling",
            ),
            (
                GenerationParams {
                    stop: vec![String::new()],
                    ..ok.clone()
                },
                "stop",
            ),
        ];
        for (p, needle) in cases {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }

    #[test]
    fn stop_is_found_at_its_earliest_start() {
        let stops = vec!["cat".to_string(), "a c".to_string()];
        assert_eq!(find_stop("I see a cat", &stops), Some(6));
        assert_eq!(find_stop("nothing", &stops), None);
    }
}
