//! The OPT decoder as transformers' `OPTForCausalLM` runs it: learned positions with offset 2,
//! pre-LN blocks (post-LN when `do_layer_norm_before` is false), q scaled by hd^-0.5 after its
//! projection, ReLU FFN, final LayerNorm, and a head tied to `embed_tokens` unless one is stored.
//!
//! The weights are read-only; keys and values of past tokens live in an [`OptKvCache`] that the
//! caller owns, so one decoder serves any number of sequences and batches at once.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, LayerNorm, VarBuilder};

use crate::nn::attention::{attend, merge_heads, scale, split_heads};
use std::any::Any;

use crate::nn::kv::{is_identity, merge_masks, KvBuffer};
use crate::nn::{linear_b, Activation, Linear, LinearLoad};

use super::config::OptConfig;
use super::lm::{downcast, downcast_box, DecodeState, LanguageModel, Prefilled};
use super::{ModelError, Result};

/// transformers' `OPTLearnedPositionalEmbedding.offset`.
const POSITION_OFFSET: usize = 2;

/// Keys and values of every layer for a batch of rows, `[B, H, T, hd]` each.
#[derive(Debug)]
pub struct OptKvCache {
    layers: Vec<Option<KvBuffer>>,
}

impl OptKvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of cached positions (0 before the prefill).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(KvBuffer::len)
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `other`'s rows after these, left-padding the shorter cache with zeros; the caller
    /// pads the key masks the same way (see `nn::kv::merge_masks`).
    pub fn merge(&mut self, other: OptKvCache) -> Result<()> {
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            *mine = match (mine.take(), theirs) {
                (Some(a), Some(b)) => Some(a.merge(b, true)?),
                (None, None) => None,
                _ => return Err(ModelError::Input("cannot merge an empty KV cache".into())),
            };
        }
        Ok(())
    }

    /// Keeps only the given batch rows, in that order (rows that finished cost nothing after).
    /// Every row in place (most greedy and sampling steps) copies nothing.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let Some(first) = self.layers.iter().flatten().next() else {
            return Ok(());
        };
        if is_identity(rows, first.rows()?) {
            return Ok(());
        }
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            first.keys()?.device(),
        )?;
        for buffer in self.layers.iter_mut().flatten() {
            buffer.select_rows(&idx)?;
        }
        Ok(())
    }
}

/// Additive attention mask `[B, 1, S, past + S]`: query `i` of row `b` (absolute position
/// `past + i`) sees key `j` iff `j <= past + i` and `key_mask[b][j] == 1`. Masked entries get
/// `f32::MIN` as the reference does (not -inf, so a fully padded row stays finite).
pub fn causal_mask(key_mask: &[Vec<u8>], past: usize, s: usize, device: &Device) -> Result<Tensor> {
    let b = key_mask.len();
    let t = past + s;
    let mut data = vec![0f32; b * s * t];
    for (row, keys) in key_mask.iter().enumerate() {
        if keys.len() != t {
            return Err(ModelError::Input(format!(
                "attention mask row {row} has {} entries, expected {t}",
                keys.len()
            )));
        }
        for i in 0..s {
            let base = (row * s + i) * t;
            for (j, &keep) in keys.iter().enumerate() {
                if j > past + i || keep == 0 {
                    data[base + j] = f32::MIN;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, s, t), device)?)
}

struct OptAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    scaling: f64,
}

impl OptAttention {
    fn new(cfg: &OptConfig, vb: VarBuilder, q: &LinearLoad) -> Result<Self> {
        let d = cfg.hidden_size;
        let bias = cfg.enable_bias;
        Ok(Self {
            q_proj: linear_b(d, d, bias, vb.pp("q_proj"), q)?,
            k_proj: linear_b(d, d, bias, vb.pp("k_proj"), q)?,
            v_proj: linear_b(d, d, bias, vb.pp("v_proj"), q)?,
            out_proj: linear_b(d, d, bias, vb.pp("out_proj"), q)?,
            num_heads: cfg.num_attention_heads,
            scaling: ((d / cfg.num_attention_heads) as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor, cache: &mut Option<KvBuffer>) -> Result<Tensor> {
        let q = split_heads(
            &scale(&self.q_proj.forward(xs)?, self.scaling)?,
            self.num_heads,
        )?;
        let k = split_heads(&self.k_proj.forward(xs)?, self.num_heads)?;
        let v = split_heads(&self.v_proj.forward(xs)?, self.num_heads)?;
        let (k, v) = KvBuffer::push(cache, k, v)?;
        let ctx = attend(&q, &k, &v, mask)?;
        let ctx = merge_heads(&ctx)?;
        Ok(self.out_proj.forward(&ctx)?)
    }
}

fn opt_layer_norm(cfg: &OptConfig, vb: VarBuilder) -> Result<LayerNorm> {
    let d = cfg.hidden_size;
    if cfg.layer_norm_elementwise_affine {
        Ok(candle_nn::layer_norm(d, 1e-5, vb)?)
    } else {
        let ones = Tensor::ones(d, vb.dtype(), vb.device())?;
        Ok(LayerNorm::new(ones.clone(), ones.zeros_like()?, 1e-5))
    }
}

struct OptLayer {
    self_attn: OptAttention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    act: Activation,
    pre_norm: bool,
}

impl OptLayer {
    fn new(cfg: &OptConfig, vb: VarBuilder, q: &LinearLoad) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            self_attn: OptAttention::new(cfg, vb.pp("self_attn"), q)?,
            self_attn_layer_norm: opt_layer_norm(cfg, vb.pp("self_attn_layer_norm"))?,
            fc1: linear_b(d, cfg.ffn_dim, cfg.enable_bias, vb.pp("fc1"), q)?,
            fc2: linear_b(cfg.ffn_dim, d, cfg.enable_bias, vb.pp("fc2"), q)?,
            final_layer_norm: opt_layer_norm(cfg, vb.pp("final_layer_norm"))?,
            act: cfg.activation_function,
            pre_norm: cfg.do_layer_norm_before,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor, cache: &mut Option<KvBuffer>) -> Result<Tensor> {
        let h = if self.pre_norm {
            self.self_attn_layer_norm.forward(xs)?
        } else {
            xs.clone()
        };
        let mut xs = (xs + self.self_attn.forward(&h, mask, cache)?)?;
        if !self.pre_norm {
            xs = self.self_attn_layer_norm.forward(&xs)?;
        }
        let h = if self.pre_norm {
            self.final_layer_norm.forward(&xs)?
        } else {
            xs.clone()
        };
        let h = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&h)?)?)?;
        let mut xs = (xs + h)?;
        if !self.pre_norm {
            xs = self.final_layer_norm.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// `OPTForCausalLM` without its own cache.
pub struct OptDecoder {
    embed_tokens: Embedding,
    embed_positions: Embedding,
    layers: Vec<OptLayer>,
    final_layer_norm: Option<LayerNorm>,
    lm_head: Linear,
    max_positions: usize,
}

impl OptDecoder {
    /// `vb` points at the language model (`language_model.` in BLIP-2 checkpoints); `quantize`
    /// applies to its linear weights (the head included) as they are read.
    pub fn new(cfg: &OptConfig, vb: VarBuilder, quantize: &LinearLoad) -> Result<Self> {
        let dec = vb.pp("model.decoder");
        let d = cfg.hidden_size;
        let embed_tokens = embedding(cfg.vocab_size, d, dec.pp("embed_tokens"))?;
        let embed_positions = embedding(
            cfg.max_position_embeddings + POSITION_OFFSET,
            d,
            dec.pp("embed_positions"),
        )?;
        let layers = super::build_layers(cfg.num_hidden_layers, dec.device().is_cpu(), |i| {
            OptLayer::new(cfg, dec.pp(format!("layers.{i}")), quantize)
        })?;
        let final_layer_norm = if cfg.do_layer_norm_before && !cfg.remove_final_layer_norm {
            Some(opt_layer_norm(cfg, dec.pp("final_layer_norm"))?)
        } else {
            None
        };
        // Tied (the default): the head is `embed_tokens`, whatever a shard stores under
        // lm_head.weight (transformers' tie_weights overwrites it). Untied: it must be stored.
        let head_weight = if cfg.tie_word_embeddings {
            embed_tokens.embeddings().clone()
        } else {
            vb.get((cfg.vocab_size, d), "lm_head.weight")?
        };
        Ok(Self {
            embed_tokens,
            embed_positions,
            layers,
            final_layer_norm,
            lm_head: Linear::new(head_weight, None, quantize.quantize)?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn new_cache(&self) -> OptKvCache {
        OptKvCache::new(self.layers.len())
    }

    /// Token ids [B, S] (u32) -> embeddings [B, S, D].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(ids)?)
    }

    /// Runs `embeds` [B, S, D] at `positions` [B, S] (u32, `cumsum(mask) - 1`; pads may be any
    /// valid index) with the additive `mask` from [`causal_mask`]; appends to `cache` and
    /// returns the final hidden states [B, S, D].
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[Vec<i64>],
        mask: &Tensor,
        cache: &mut OptKvCache,
    ) -> Result<Tensor> {
        let (b, s, _) = embeds.dims3()?;
        let mut flat = Vec::with_capacity(b * s);
        for row in positions {
            for &p in row {
                // The reference looks pads up at position -1 + 2 = 1; they are masked anyway.
                let idx = p + POSITION_OFFSET as i64;
                if idx < 0 || p >= self.max_positions as i64 {
                    return Err(ModelError::TooLong(format!(
                        "sequence too long: position {p} is past max_position_embeddings {}",
                        self.max_positions
                    )));
                }
                flat.push(idx as u32);
            }
        }
        if flat.len() != b * s {
            return Err(ModelError::Input(
                "position ids do not match the embeddings".into(),
            ));
        }
        let pos = Tensor::from_vec(flat, (b, s), embeds.device())?;
        let mut xs = (embeds
            + self
                .embed_positions
                .forward(&pos)?
                .to_dtype(embeds.dtype())?)?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            xs = layer.forward(&xs, mask, layer_cache)?;
        }
        if let Some(norm) = &self.final_layer_norm {
            xs = norm.forward(&xs)?;
        }
        Ok(xs)
    }

    /// Logits [B, V] (f32) of the last position of `hidden` [B, S, D].
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let s = hidden.dim(1)?;
        let last = hidden.narrow(1, s - 1, 1)?.squeeze(1)?;
        Ok(self.lm_head.forward(&last)?.to_dtype(DType::F32)?)
    }
}

/// A batch's OPT state: the KV cache and, per row, which cached positions are real (1) or
/// padding (0). A row's position is the count of its real keys, so rows padded differently
/// decode as they would alone.
struct OptState {
    cache: OptKvCache,
    key_mask: Vec<Vec<u8>>,
}

impl DecodeState for OptState {
    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        self.cache.select_rows(rows)?;
        self.key_mask = rows.iter().map(|&p| self.key_mask[p].clone()).collect();
        Ok(())
    }

    fn merge(&mut self, other: Box<dyn DecodeState>) -> Result<()> {
        let other = downcast_box::<OptState>(other)?;
        self.cache.merge(other.cache)?;
        self.key_mask = merge_masks(&self.key_mask, &other.key_mask, true);
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

impl LanguageModel for OptDecoder {
    fn model_type(&self) -> &'static str {
        "opt"
    }

    /// Left padding (as the reference's processor pads OPT batches): `[queries][pads][text]`,
    /// the pads masked and skipped by the positions.
    fn prefill(&self, query_embeds: &Tensor, prompts: &[&[u32]], pad: u32) -> Result<Prefilled> {
        let (b, q, _) = query_embeds.dims3()?;
        let device = query_embeds.device();
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * longest);
        let mut key_mask = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(b);
        for text in prompts {
            let pads = longest - text.len();
            ids.extend(std::iter::repeat_n(pad, pads));
            ids.extend_from_slice(text);
            let mask: Vec<u8> = std::iter::repeat_n(1u8, q)
                .chain(std::iter::repeat_n(0, pads))
                .chain(std::iter::repeat_n(1, text.len()))
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
        let embeds = Tensor::cat(&[query_embeds, &self.embed(&ids)?], 1)?;
        let mask = causal_mask(&key_mask, 0, q + longest, device)?;
        let mut cache = self.new_cache();
        let hidden = self.forward(&embeds, &positions, &mask, &mut cache)?;
        Ok(Prefilled {
            state: Box::new(OptState { cache, key_mask }),
            logits: self.last_logits(&hidden)?,
            encoder_output: None,
        })
    }

    fn step(&self, state: &mut dyn DecodeState, tokens: &[u32]) -> Result<Tensor> {
        let OptState { cache, key_mask } = downcast::<OptState>(state)?;
        let device = self.embed_tokens.embeddings().device().clone();
        let past = cache.len();
        let mut positions = Vec::with_capacity(key_mask.len());
        for m in key_mask.iter_mut() {
            m.push(1);
            positions.push(vec![m.iter().map(|&v| v as i64).sum::<i64>() - 1]);
        }
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), &device)?;
        let embeds = self.embed(&ids)?;
        let mask = causal_mask(key_mask, past, 1, &device)?;
        let hidden = self.forward(&embeds, &positions, &mask, cache)?;
        self.last_logits(&hidden)
    }

    fn position_limit(&self) -> Option<usize> {
        Some(self.max_positions)
    }

    fn decoder_start(&self) -> Option<u32> {
        None
    }

    fn default_vqa_template(&self) -> &'static str {
        "Question: {} Answer:"
    }
}
