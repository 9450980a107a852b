//! The Flan-T5 encoder-decoder as transformers' `T5ForConditionalGeneration` runs it inside
//! BLIP-2: the encoder takes input embeddings (image rows already replaced) and a padding mask;
//! RMSNorm with the variance in f32; unscaled attention; relative position bias computed in
//! block 0 of each stack and reused by the later blocks (bidirectional buckets in the encoder,
//! causal buckets in the decoder, none in cross-attention); gated FFN with the activation from
//! `dense_act_fn`; an untied `lm_head` without the d_model^-0.5 rescale.
//!
//! candle-transformers' t5.rs takes no embeddings or masks and buckets the decoder
//! bidirectionally, so this is our own. Weights are immutable: decoding state lives in
//! [`T5DecoderState`], owned by the caller.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};

use std::any::Any;

use crate::nn::attention::{attend, merge_heads, scale, split_heads};
use crate::nn::kv::{cat_padded, is_identity, merge_masks, KvBuffer};
use crate::nn::{linear_no_bias, linear_with, Activation, Linear, LinearLoad};

use super::config::T5Config;
use super::lm::{downcast, downcast_box, DecodeState, LanguageModel, Prefilled};
use super::{ModelError, Result};

/// T5's LayerNorm: no mean subtraction, no bias, variance in f32.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(d, "weight")?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x32 = xs.to_dtype(DType::F32)?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

/// transformers' `T5Attention._relative_position_bucket`, with the log computed in f32 as torch
/// does (the bucket edges depend on it).
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut buckets = 0usize;
    let mut num_buckets = num_buckets as i64;
    let rp = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            buckets += num_buckets as usize;
        }
        relative_position.abs()
    } else {
        (-relative_position).max(0)
    };
    let max_exact = num_buckets / 2;
    if rp < max_exact {
        return buckets + rp as usize;
    }
    let scaled = ((rp as f32) / (max_exact as f32)).ln()
        / ((max_distance as f64 / max_exact as f64).ln() as f32)
        * ((num_buckets - max_exact) as f32);
    let large = (max_exact + scaled as i64).min(num_buckets - 1);
    buckets + large as usize
}

struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    /// Present in block 0 of each stack's self-attention: [num_buckets, num_heads].
    relative_attention_bias: Option<Embedding>,
}

impl T5Attention {
    fn new(cfg: &T5Config, has_bias: bool, vb: VarBuilder, q: &LinearLoad) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let relative_attention_bias = if has_bias {
            Some(embedding(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                vb.pp("relative_attention_bias"),
            )?)
        } else {
            None
        };
        Ok(Self {
            q: linear_no_bias(cfg.d_model, inner, vb.pp("q"), q)?,
            k: linear_no_bias(cfg.d_model, inner, vb.pp("k"), q)?,
            v: linear_no_bias(cfg.d_model, inner, vb.pp("v"), q)?,
            o: linear_no_bias(inner, cfg.d_model, vb.pp("o"), q)?,
            num_heads: cfg.num_heads,
            relative_attention_bias,
        })
    }

    /// `bias` [1 or B, H, S, T] is added to the unscaled scores (position bias + mask).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        Ok(self.o.forward(&merge_heads(&attend(q, k, v, bias)?)?)?)
    }

    fn project_kv(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.k.forward(xs)?, self.num_heads)?,
            split_heads(&self.v.forward(xs)?, self.num_heads)?,
        ))
    }
}

/// Position bias [1, H, S, T] for queries at `q_start..q_start+s` over keys `0..t`.
fn position_bias(
    table: &Embedding,
    cfg: &T5Config,
    bidirectional: bool,
    q_start: usize,
    s: usize,
    t: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut buckets = Vec::with_capacity(s * t);
    for i in q_start..q_start + s {
        for j in 0..t {
            buckets.push(relative_position_bucket(
                j as i64 - i as i64,
                bidirectional,
                cfg.relative_attention_num_buckets,
                cfg.relative_attention_max_distance,
            ) as u32);
        }
    }
    let buckets = Tensor::from_vec(buckets, (s, t), device)?;
    // [S, T, H] -> [1, H, S, T]
    Ok(table
        .forward(&buckets)?
        .to_dtype(DType::F32)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

/// Bias [B, H, 1, T] for one new query per row over that row's cached keys: causal relative
/// position buckets counted over the row's real positions, padding masked with f32::MIN. The new
/// query is the last entry of each row, so it sees every real key (no causal mask needed).
fn decoder_step_bias(
    table: &Embedding,
    cfg: &T5Config,
    masks: &[Vec<u8>],
    device: &Device,
) -> Result<Tensor> {
    let b = masks.len();
    let t = masks.first().map(Vec::len).unwrap_or(0);
    let mut buckets = Vec::with_capacity(b * t);
    let mut pad = Vec::with_capacity(b * t);
    for m in masks {
        let query = m.iter().map(|&v| v as i64).sum::<i64>() - 1;
        let mut pos = -1i64;
        for &keep in m {
            pos += keep as i64;
            let rel = if keep == 1 { pos - query } else { 0 };
            buckets.push(relative_position_bucket(
                rel,
                false,
                cfg.relative_attention_num_buckets,
                cfg.relative_attention_max_distance,
            ) as u32);
            pad.push(if keep == 1 { 0f32 } else { f32::MIN });
        }
    }
    let buckets = Tensor::from_vec(buckets, (b, t), device)?;
    // [B, T, H] -> [B, H, 1, T]
    let bias = table
        .forward(&buckets)?
        .to_dtype(DType::F32)?
        .permute((0, 2, 1))?
        .unsqueeze(2)?;
    let pad = Tensor::from_vec(pad, (b, 1, 1, t), device)?;
    Ok(bias.broadcast_add(&pad)?.contiguous()?)
}

struct T5Ffn {
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    act: Activation,
}

impl T5Ffn {
    fn new(cfg: &T5Config, vb: VarBuilder, q: &LinearLoad) -> Result<Self> {
        let (act, gated) = cfg.activation()?;
        let (wi_0, wi_1) = if gated {
            (
                linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_0"), q)?,
                Some(linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_1"), q)?),
            )
        } else {
            (linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi"), q)?, None)
        };
        Ok(Self {
            wi_0,
            wi_1,
            wo: linear_no_bias(cfg.d_ff, cfg.d_model, vb.pp("wo"), q)?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.act.forward(&self.wi_0.forward(xs)?)?;
        if let Some(wi_1) = &self.wi_1 {
            h = (h * wi_1.forward(xs)?)?;
        }
        Ok(self.wo.forward(&h)?)
    }
}

struct EncoderBlock {
    attn_norm: RmsNorm,
    attn: T5Attention,
    ffn_norm: RmsNorm,
    ffn: T5Ffn,
}

struct DecoderBlock {
    self_norm: RmsNorm,
    self_attn: T5Attention,
    cross_norm: RmsNorm,
    cross_attn: T5Attention,
    ffn_norm: RmsNorm,
    ffn: T5Ffn,
}

/// Per-batch decoding state: self-attention keys/values so far, cross-attention keys/values
/// computed once from the encoder output, and both padding masks. Rows may sit at different
/// decoder positions (after [`T5DecoderState::merge`]): their self-attention caches are
/// left-padded, and each row's position comes from its own mask.
pub struct T5DecoderState {
    self_kv: Vec<Option<KvBuffer>>,
    /// Per row, one entry per cached decoder position: 1 real, 0 padding.
    self_mask: Vec<Vec<u8>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    /// Per row, the encoder padding mask (1 real, 0 padding).
    cross_keep: Vec<Vec<u8>>,
    /// [B, 1, 1, L] additive (0 or f32::MIN), from `cross_keep`.
    cross_mask: Tensor,
}

impl T5DecoderState {
    /// Keeps only the given batch rows, in that order (nothing is copied when that is every
    /// row in place, as in most greedy and sampling steps).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if is_identity(rows, self.self_mask.len()) {
            return Ok(());
        }
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            self.cross_mask.device(),
        )?;
        for buffer in self.self_kv.iter_mut().flatten() {
            buffer.select_rows(&idx)?;
        }
        for (k, v) in self.cross_kv.iter_mut() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.cross_mask = self.cross_mask.index_select(&idx, 0)?;
        self.self_mask = rows.iter().map(|&r| self.self_mask[r].clone()).collect();
        self.cross_keep = rows.iter().map(|&r| self.cross_keep[r].clone()).collect();
        Ok(())
    }

    /// Appends `other`'s rows after this state's: self-attention caches are left-padded and
    /// encoder keys/values right-padded to a common length, the padding masked.
    pub fn merge(&mut self, other: T5DecoderState) -> Result<()> {
        let device = self.cross_mask.device().clone();
        for (mine, theirs) in self.self_kv.iter_mut().zip(other.self_kv) {
            *mine = match (mine.take(), theirs) {
                (Some(a), Some(b)) => Some(a.merge(b, true)?),
                (None, None) => None,
                _ => {
                    return Err(ModelError::Input(
                        "cannot merge a batch before its first step".into(),
                    ))
                }
            };
        }
        for (mine, theirs) in self.cross_kv.iter_mut().zip(other.cross_kv) {
            *mine = (
                cat_padded(&mine.0, &theirs.0, 2, false)?,
                cat_padded(&mine.1, &theirs.1, 2, false)?,
            );
        }
        self.self_mask = merge_masks(&self.self_mask, &other.self_mask, true);
        self.cross_keep = merge_masks(&self.cross_keep, &other.cross_keep, false);
        self.cross_mask = padding_mask(&self.cross_keep, &device)?;
        Ok(())
    }
}

/// `[B, 1, 1, L]` additive mask from a 0/1 padding mask.
fn padding_mask(mask: &[Vec<u8>], device: &Device) -> Result<Tensor> {
    let b = mask.len();
    let l = mask.first().map(Vec::len).unwrap_or(0);
    let mut data = Vec::with_capacity(b * l);
    for row in mask {
        if row.len() != l {
            return Err(ModelError::Input("ragged attention mask".into()));
        }
        data.extend(row.iter().map(|&m| if m == 0 { f32::MIN } else { 0.0 }));
    }
    Ok(Tensor::from_vec(data, (b, 1, 1, l), device)?)
}

pub struct T5Model {
    shared: Embedding,
    encoder: Vec<EncoderBlock>,
    encoder_norm: RmsNorm,
    decoder: Vec<DecoderBlock>,
    decoder_norm: RmsNorm,
    lm_head: Linear,
    /// Tied heads scale the decoder output by d_model^-0.5 before the projection.
    head_scale: Option<f64>,
    decoder_start: u32,
    cfg: T5Config,
}

impl EncoderBlock {
    /// Block `i` (the first holds the relative position bias).
    fn new(cfg: &T5Config, i: usize, b: VarBuilder, quantize: &LinearLoad) -> Result<Self> {
        let (d, eps) = (cfg.d_model, cfg.layer_norm_epsilon);
        Ok(Self {
            attn_norm: RmsNorm::new(d, eps, b.pp("layer.0.layer_norm"))?,
            attn: T5Attention::new(cfg, i == 0, b.pp("layer.0.SelfAttention"), quantize)?,
            ffn_norm: RmsNorm::new(d, eps, b.pp("layer.1.layer_norm"))?,
            ffn: T5Ffn::new(cfg, b.pp("layer.1.DenseReluDense"), quantize)?,
        })
    }
}

impl DecoderBlock {
    /// Block `i` (the first holds the self-attention's relative position bias; cross-attention
    /// has none).
    fn new(cfg: &T5Config, i: usize, b: VarBuilder, quantize: &LinearLoad) -> Result<Self> {
        let (d, eps) = (cfg.d_model, cfg.layer_norm_epsilon);
        Ok(Self {
            self_norm: RmsNorm::new(d, eps, b.pp("layer.0.layer_norm"))?,
            self_attn: T5Attention::new(cfg, i == 0, b.pp("layer.0.SelfAttention"), quantize)?,
            cross_norm: RmsNorm::new(d, eps, b.pp("layer.1.layer_norm"))?,
            cross_attn: T5Attention::new(cfg, false, b.pp("layer.1.EncDecAttention"), quantize)?,
            ffn_norm: RmsNorm::new(d, eps, b.pp("layer.2.layer_norm"))?,
            ffn: T5Ffn::new(cfg, b.pp("layer.2.DenseReluDense"), quantize)?,
        })
    }
}

impl T5Model {
    /// `vb` points at the language model (`language_model.` in BLIP-2 checkpoints).
    /// `quantize` applies to its linear weights (the head included) as they are read.
    pub fn new(cfg: &T5Config, vb: VarBuilder, quantize: &LinearLoad) -> Result<Self> {
        let d = cfg.d_model;
        let eps = cfg.layer_norm_epsilon;
        let shared = embedding(cfg.vocab_size, d, vb.pp("shared"))?;
        let enc = vb.pp("encoder");
        let on_cpu = vb.device().is_cpu();
        let encoder = super::build_layers(cfg.num_layers, on_cpu, |i| {
            EncoderBlock::new(cfg, i, enc.pp(format!("block.{i}")), quantize)
        })?;
        let dec = vb.pp("decoder");
        let decoder = super::build_layers(cfg.decoder_layers(), on_cpu, |i| {
            DecoderBlock::new(cfg, i, dec.pp(format!("block.{i}")), quantize)
        })?;
        let (lm_head, head_scale) = if cfg.tie_word_embeddings {
            // A tied head is `shared`; the reference rescales its input by d_model^-0.5.
            // (BLIP-2's Flan-T5 checkpoints are untied.)
            (
                Linear::new(shared.embeddings().clone(), None, quantize.quantize)?,
                Some((d as f64).powf(-0.5)),
            )
        } else if vb.contains_tensor("lm_head.weight") {
            (
                linear_with(d, cfg.vocab_size, vb.pp("lm_head"), None, quantize)?,
                None,
            )
        } else {
            return Err(ModelError::Weights(format!(
                "tensor {}.lm_head.weight is missing from the checkpoint (tie_word_embeddings is false)",
                vb.prefix()
            )));
        };
        // generate() starts the decoder from decoder_start_token_id, else bos_token_id.
        let decoder_start = cfg
            .decoder_start_token_id
            .or(cfg.bos_token_id)
            .ok_or_else(|| {
                ModelError::Config(
                    "text_config has neither decoder_start_token_id nor bos_token_id".into(),
                )
            })?;
        Ok(Self {
            shared,
            encoder,
            encoder_norm: RmsNorm::new(d, eps, enc.pp("final_layer_norm"))?,
            decoder,
            decoder_norm: RmsNorm::new(d, eps, dec.pp("final_layer_norm"))?,
            lm_head,
            head_scale,
            decoder_start,
            cfg: cfg.clone(),
        })
    }

    pub fn decoder_start_token_id(&self) -> u32 {
        self.decoder_start
    }

    /// Token ids [B, S] (u32) -> embeddings [B, S, d_model].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.shared.forward(ids)?)
    }

    /// Encoder over input embeddings [B, L, d] with a 0/1 padding `mask` -> last_hidden_state.
    pub fn encode(&self, embeds: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        let (_, l, _) = embeds.dims3()?;
        let device = embeds.device();
        let mut bias: Option<Tensor> = None;
        let pad = padding_mask(mask, device)?;
        let mut xs = embeds.clone();
        for block in &self.encoder {
            if bias.is_none() {
                let table = block.attn.relative_attention_bias.as_ref().ok_or_else(|| {
                    ModelError::Weights("encoder block 0 has no relative_attention_bias".into())
                })?;
                let pb = position_bias(table, &self.cfg, true, 0, l, l, device)?;
                bias = Some(pb.broadcast_add(&pad)?);
            }
            let bias = bias.as_ref().expect("set above");
            let h = block.attn_norm.forward(&xs)?;
            let q = split_heads(&block.attn.q.forward(&h)?, block.attn.num_heads)?;
            let (k, v) = block.attn.project_kv(&h)?;
            xs = (xs + block.attn.attend(&q, &k, &v, bias)?)?;
            let h = block.ffn_norm.forward(&xs)?;
            xs = (&xs + block.ffn.forward(&h)?)?;
        }
        self.encoder_norm.forward(&xs)
    }

    /// Prepares decoding against `encoder_out` [B, L, d]: cross keys/values once per request.
    pub fn start_decoding(&self, encoder_out: &Tensor, mask: &[Vec<u8>]) -> Result<T5DecoderState> {
        let cross_kv = self
            .decoder
            .iter()
            .map(|b| b.cross_attn.project_kv(encoder_out))
            .collect::<Result<Vec<_>>>()?;
        Ok(T5DecoderState {
            self_kv: (0..self.decoder.len()).map(|_| None).collect(),
            self_mask: vec![Vec::new(); mask.len()],
            cross_kv,
            cross_keep: mask.to_vec(),
            cross_mask: padding_mask(mask, encoder_out.device())?,
        })
    }

    /// Feeds one token per row and returns the next-token logits [B, V] in f32.
    pub fn decode_step(&self, ids: &[u32], state: &mut T5DecoderState) -> Result<Tensor> {
        let device = state.cross_mask.device().clone();
        let ids = Tensor::from_vec(ids.to_vec(), (ids.len(), 1), &device)?;
        let mut xs = self.shared.forward(&ids)?;
        for m in state.self_mask.iter_mut() {
            m.push(1);
        }
        let mut self_bias: Option<Tensor> = None;
        for (i, block) in self.decoder.iter().enumerate() {
            if self_bias.is_none() {
                let table = block
                    .self_attn
                    .relative_attention_bias
                    .as_ref()
                    .ok_or_else(|| {
                        ModelError::Weights("decoder block 0 has no relative_attention_bias".into())
                    })?;
                self_bias = Some(decoder_step_bias(
                    table,
                    &self.cfg,
                    &state.self_mask,
                    &device,
                )?);
            }
            let bias = self_bias.as_ref().expect("set above");
            let h = block.self_norm.forward(&xs)?;
            let q = split_heads(&block.self_attn.q.forward(&h)?, block.self_attn.num_heads)?;
            let (k, v) = block.self_attn.project_kv(&h)?;
            let (k, v) = KvBuffer::push(&mut state.self_kv[i], k, v)?;
            xs = (xs + block.self_attn.attend(&q, &k, &v, bias)?)?;

            let h = block.cross_norm.forward(&xs)?;
            let q = split_heads(&block.cross_attn.q.forward(&h)?, block.cross_attn.num_heads)?;
            let (ck, cv) = &state.cross_kv[i];
            xs = (xs + block.cross_attn.attend(&q, ck, cv, &state.cross_mask)?)?;

            let h = block.ffn_norm.forward(&xs)?;
            xs = (&xs + block.ffn.forward(&h)?)?;
        }
        let mut xs = self.decoder_norm.forward(&xs)?.squeeze(1)?;
        if let Some(s) = self.head_scale {
            xs = scale(&xs, s)?;
        }
        Ok(self.lm_head.forward(&xs)?.to_dtype(DType::F32)?)
    }
}

impl DecodeState for T5DecoderState {
    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        T5DecoderState::select_rows(self, rows)
    }

    fn merge(&mut self, other: Box<dyn DecodeState>) -> Result<()> {
        T5DecoderState::merge(self, *downcast_box::<T5DecoderState>(other)?)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

impl LanguageModel for T5Model {
    fn model_type(&self) -> &'static str {
        "t5"
    }

    /// Right padding (as the reference's processor pads T5 batches): the encoder reads
    /// `[queries][text][pads]`, the pads masked; the decoder starts from its start id.
    fn prefill(&self, query_embeds: &Tensor, prompts: &[&[u32]], pad: u32) -> Result<Prefilled> {
        let (b, q, _) = query_embeds.dims3()?;
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * longest);
        let mut mask = Vec::with_capacity(b);
        for text in prompts {
            let pads = longest - text.len();
            ids.extend_from_slice(text);
            ids.extend(std::iter::repeat_n(pad, pads));
            mask.push(
                std::iter::repeat_n(1u8, q + text.len())
                    .chain(std::iter::repeat_n(0, pads))
                    .collect::<Vec<_>>(),
            );
        }
        let ids = Tensor::from_vec(ids, (b, longest), query_embeds.device())?;
        let embeds = Tensor::cat(&[query_embeds, &self.embed(&ids)?], 1)?;
        let encoded = self.encode(&embeds, &mask)?;
        let mut state = self.start_decoding(&encoded, &mask)?;
        let logits = self.decode_step(&vec![self.decoder_start; b], &mut state)?;
        Ok(Prefilled {
            state: Box::new(state),
            logits,
            encoder_output: Some(encoded),
        })
    }

    fn step(&self, state: &mut dyn DecodeState, tokens: &[u32]) -> Result<Tensor> {
        self.decode_step(tokens, downcast::<T5DecoderState>(state)?)
    }

    fn position_limit(&self) -> Option<usize> {
        None
    }

    fn decoder_start(&self) -> Option<u32> {
        Some(self.decoder_start)
    }

    fn default_vqa_template(&self) -> &'static str {
        "Question: {} Short answer:"
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_match_t5_reference_values() {
        // Small distances map to themselves; the causal decoder folds future positions to 0.
        assert_eq!(relative_position_bucket(-3, false, 32, 128), 3);
        assert_eq!(relative_position_bucket(3, false, 32, 128), 0);
        assert_eq!(relative_position_bucket(3, true, 32, 128), 16 + 3);
        assert_eq!(relative_position_bucket(-3, true, 32, 128), 3);
        // Far distances saturate at the last bucket.
        assert_eq!(relative_position_bucket(-1000, false, 32, 128), 31);
        assert_eq!(relative_position_bucket(1000, true, 32, 128), 31);
    }
}
