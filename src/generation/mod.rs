//! Batched greedy decoding over the language model with per-row KV state.
//!
//! Rows enter together after one batched prefill (OPT: `[queries][left pads][text]` with
//! positions `cumsum(mask) - 1`; T5: `[queries][text][right pads]` through the encoder) and leave
//! as soon as they finish, their cache rows dropped, so a finished row costs nothing and never
//! influences the others: each row's tokens equal what it would get alone.

use candle_core::Tensor;
use serde::Serialize;

use crate::model::opt::{causal_mask, OptKvCache};
use crate::model::t5::T5DecoderState;
use crate::model::{Blip2Model, LanguageModel, ModelError, Result};
use crate::prompt::Prompt;

/// Per-request decoding settings (greedy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// EOS is masked (logit -inf) until this many tokens exist, as transformers'
    /// `MinNewTokensLengthLogitsProcessor` does.
    pub min_new_tokens: usize,
}

impl Default for GenerationParams {
    /// transformers' defaults for BLIP-2: greedy, 20 new tokens.
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            min_new_tokens: 0,
        }
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(ModelError::Input("max_new_tokens must be >= 1".into()));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(ModelError::Input(format!(
                "min_new_tokens ({}) must not exceed max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// The model produced an EOS id (kept as the last token).
    EosToken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedSequence {
    /// New tokens only (EOS included when it ended the sequence).
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

enum LmState {
    Opt {
        cache: OptKvCache,
        key_mask: Vec<Vec<u8>>,
    },
    T5 {
        state: T5DecoderState,
    },
}

struct Row {
    params: GenerationParams,
    generated: Vec<u32>,
    finish: Option<FinishReason>,
}

/// A batch of sequences being decoded together. `active` maps the model-side batch rows to
/// `rows`; finished rows leave `active` (and the KV state) at once.
pub struct DecodeBatch<'m> {
    model: &'m Blip2Model,
    state: LmState,
    rows: Vec<Row>,
    active: Vec<usize>,
    /// Next-token logits [active, V] in f32.
    logits: Tensor,
    eos: Vec<u32>,
    /// T5 only: the encoder's `last_hidden_state` [B, L, d] of the prefill.
    encoder_output: Option<Tensor>,
}

impl<'m> DecodeBatch<'m> {
    /// Runs the prefill for `query_embeds` [B, Q, D] and one prompt and params per row.
    pub fn prefill(
        model: &'m Blip2Model,
        query_embeds: &Tensor,
        prompts: &[Prompt],
        params: &[GenerationParams],
    ) -> Result<Self> {
        let (b, q, _) = query_embeds.dims3()?;
        if prompts.len() != b || params.len() != b {
            return Err(ModelError::Input(format!(
                "{b} images but {} prompts and {} parameter sets",
                prompts.len(),
                params.len()
            )));
        }
        if prompts.iter().any(|p| p.text_ids.is_empty()) {
            return Err(ModelError::Input("a prompt tokenised to no ids".into()));
        }
        for p in params {
            p.validate()?;
        }
        let device = model.device();
        let pad = model.config.text.pad_token_id().unwrap_or(0);
        let longest = prompts.iter().map(|p| p.text_ids.len()).max().unwrap_or(0);
        let mut encoder_output = None;
        let (state, logits) = match &model.language_model {
            LanguageModel::Opt(opt) => {
                let max_positions = match &model.config.text {
                    crate::model::TextConfig::Opt(c) => c.max_position_embeddings,
                    _ => unreachable!("OPT weights with an OPT config"),
                };
                let longest_new = params.iter().map(|p| p.max_new_tokens).max().unwrap_or(0);
                if q + longest + longest_new > max_positions {
                    return Err(ModelError::Input(format!(
                        "{q} query tokens + {longest} prompt tokens + {longest_new} new tokens exceed the model's {max_positions} positions"
                    )));
                }
                let mut ids = Vec::with_capacity(b * longest);
                let mut key_mask = Vec::with_capacity(b);
                let mut positions = Vec::with_capacity(b);
                for p in prompts {
                    let pads = longest - p.text_ids.len();
                    ids.extend(std::iter::repeat_n(pad, pads));
                    ids.extend_from_slice(&p.text_ids);
                    let mask: Vec<u8> = std::iter::repeat_n(1u8, q)
                        .chain(std::iter::repeat_n(0, pads))
                        .chain(std::iter::repeat_n(1, p.text_ids.len()))
                        .collect();
                    let mut seen = 0i64;
                    positions.push(
                        mask.iter()
                            .map(|&m| {
                                seen += m as i64;
                                if m == 1 {
                                    seen - 1
                                } else {
                                    -1
                                }
                            })
                            .collect::<Vec<_>>(),
                    );
                    key_mask.push(mask);
                }
                let ids = Tensor::from_vec(ids, (b, longest), device)?;
                let embeds = Tensor::cat(&[query_embeds, &opt.embed(&ids)?], 1)?;
                let mask = causal_mask(&key_mask, 0, q + longest, device)?;
                let mut cache = opt.new_cache();
                let hidden = opt.forward(&embeds, &positions, &mask, &mut cache)?;
                (LmState::Opt { cache, key_mask }, opt.last_logits(&hidden)?)
            }
            LanguageModel::T5(t5) => {
                let mut ids = Vec::with_capacity(b * longest);
                let mut mask = Vec::with_capacity(b);
                for p in prompts {
                    let pads = longest - p.text_ids.len();
                    ids.extend_from_slice(&p.text_ids);
                    ids.extend(std::iter::repeat_n(pad, pads));
                    mask.push(
                        std::iter::repeat_n(1u8, q + p.text_ids.len())
                            .chain(std::iter::repeat_n(0, pads))
                            .collect::<Vec<_>>(),
                    );
                }
                let ids = Tensor::from_vec(ids, (b, longest), device)?;
                let embeds = Tensor::cat(&[query_embeds, &t5.embed(&ids)?], 1)?;
                let encoded = t5.encode(&embeds, &mask)?;
                let mut state = t5.start_decoding(&encoded, &mask)?;
                let start = vec![t5.decoder_start_token_id(); b];
                let logits = t5.decode_step(&start, &mut state)?;
                encoder_output = Some(encoded);
                (LmState::T5 { state }, logits)
            }
        };
        Ok(Self {
            model,
            state,
            rows: params
                .iter()
                .map(|p| Row {
                    params: p.clone(),
                    generated: Vec::new(),
                    finish: None,
                })
                .collect(),
            active: (0..b).collect(),
            logits,
            eos: model.config.text.eos_token_ids(),
            encoder_output,
        })
    }

    /// Next-token logits of the active rows [active, V] (f32).
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// The T5 encoder's output for the prefilled rows (None for OPT).
    pub fn encoder_output(&self) -> Option<&Tensor> {
        self.encoder_output.as_ref()
    }

    pub fn is_done(&self) -> bool {
        self.active.is_empty()
    }

    /// Picks one token per active row, retires finished rows, and runs the next forward step.
    pub fn step(&mut self) -> Result<()> {
        if self.active.is_empty() {
            return Ok(());
        }
        let logits = self.logits.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(self.active.len());
        let mut keep = Vec::with_capacity(self.active.len());
        for (slot, &row_idx) in self.active.iter().enumerate() {
            let row = &mut self.rows[row_idx];
            let mut scores = logits[slot].clone();
            if row.generated.len() < row.params.min_new_tokens {
                for &e in &self.eos {
                    if let Some(s) = scores.get_mut(e as usize) {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
            let token = argmax(&scores);
            row.generated.push(token);
            if self.eos.contains(&token) {
                row.finish = Some(FinishReason::EosToken);
            } else if row.generated.len() >= row.params.max_new_tokens {
                row.finish = Some(FinishReason::Length);
            } else {
                keep.push(slot);
                next.push(token);
            }
        }
        if keep.len() != self.active.len() {
            self.active = keep.iter().map(|&s| self.active[s]).collect();
            match &mut self.state {
                LmState::Opt { cache, key_mask } => {
                    cache.select_rows(&keep)?;
                    *key_mask = keep.iter().map(|&s| key_mask[s].clone()).collect();
                }
                LmState::T5 { state } => {
                    if !keep.is_empty() {
                        state.select_rows(&keep)?;
                    }
                }
            }
        }
        if self.active.is_empty() {
            return Ok(());
        }
        let device = self.model.device();
        self.logits = match (&self.model.language_model, &mut self.state) {
            (LanguageModel::Opt(opt), LmState::Opt { cache, key_mask }) => {
                let past = cache.len();
                let mut positions = Vec::with_capacity(next.len());
                for m in key_mask.iter_mut() {
                    m.push(1);
                    positions.push(vec![m.iter().map(|&v| v as i64).sum::<i64>() - 1]);
                }
                let ids = Tensor::from_vec(next.clone(), (next.len(), 1), device)?;
                let embeds = opt.embed(&ids)?;
                let mask = causal_mask(key_mask, past, 1, device)?;
                let hidden = opt.forward(&embeds, &positions, &mask, cache)?;
                opt.last_logits(&hidden)?
            }
            (LanguageModel::T5(t5), LmState::T5 { state }) => t5.decode_step(&next, state)?,
            _ => unreachable!("state is built for the model it runs"),
        };
        Ok(())
    }

    /// Runs every row to completion.
    pub fn run(mut self) -> Result<Vec<GeneratedSequence>> {
        while !self.is_done() {
            self.step()?;
        }
        Ok(self
            .rows
            .into_iter()
            .map(|r| GeneratedSequence {
                token_ids: r.generated,
                finish_reason: r.finish.unwrap_or(FinishReason::Length),
            })
            .collect())
    }
}

/// Index of the largest score; the first one on ties, as torch's argmax.
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1.0]), 1);
    }

    #[test]
    fn min_above_max_is_refused() {
        let p = GenerationParams {
            max_new_tokens: 3,
            min_new_tokens: 4,
        };
        assert!(p.validate().is_err());
        assert!(GenerationParams {
            max_new_tokens: 0,
            min_new_tokens: 0
        }
        .validate()
        .is_err());
    }
}
