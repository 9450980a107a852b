//! The OPT decoder as transformers' `OPTForCausalLM` runs it: learned positions with offset 2,
//! pre-LN blocks (post-LN when `do_layer_norm_before` is false), q scaled by hd^-0.5 after its
//! projection, ReLU FFN, final LayerNorm, and a head tied to `embed_tokens` unless one is stored.
//!
//! The weights are read-only; keys and values of past tokens live in an [`OptKvCache`] that the
//! caller owns, so one decoder serves any number of sequences and batches at once.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, LayerNorm, VarBuilder};

use super::kv::KvBuffer;
use super::linear::{linear_b, Linear};

use super::config::{Activation, OptConfig};
use super::vision::{merge_heads, split_heads};
use super::{ModelError, Result};

/// transformers' `OPTLearnedPositionalEmbedding.offset`.
const POSITION_OFFSET: usize = 2;

/// `rows` is `0..batch`: a gather that would change nothing.
pub fn is_identity(rows: &[usize], batch: usize) -> bool {
    rows.len() == batch && rows.iter().enumerate().all(|(i, &r)| i == r)
}

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
    /// pads the key masks the same way (see [`merge_masks`]).
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

/// `xs * factor`, computed in f32 as torch does for half dtypes (candle would round the factor
/// to the tensor's dtype first).
pub(crate) fn scale(xs: &Tensor, factor: f64) -> candle_core::Result<Tensor> {
    if xs.dtype() == DType::F32 {
        xs * factor
    } else {
        (xs.to_dtype(DType::F32)? * factor)?.to_dtype(xs.dtype())
    }
}

/// A decode step's attention (one query per row) for f32 CPU tensors: q [B, H, 1, hd] (scaled),
/// k and v [B, H, T, hd], the additive mask [B, 1, 1, T]. candle's matmul runs two small
/// matrix products per row and head (512 per layer at batch 8, each with gemm's setup); this
/// computes them directly, one task per row and head. Masked keys get exactly zero weight,
/// so a row's result does not depend on how far the batch pads it. `None` for other shapes.
fn attend_one_query(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    let (b, h, s, hd) = q.dims4()?;
    let t = k.dim(2)?;
    let all_f32 = [q, k, v, mask]
        .iter()
        .all(|x| x.dtype() == DType::F32 && x.device().is_cpu());
    if s != 1 || !all_f32 || mask.dims() != [b, 1, 1, t] || v.dims() != k.dims() {
        return Ok(None);
    }
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let mask = mask.flatten_all()?.to_vec1::<f32>()?;
    // Views into a KV buffer ([B, H, capacity, hd], the first t positions) are read in place.
    let head_major = |x: &Tensor| {
        let st = x.layout().stride();
        st[3] == 1 && st[2] == hd && st[0] == h * st[1]
    };
    let k = if head_major(k) {
        k.clone()
    } else {
        k.contiguous()?
    };
    let v = if head_major(v) {
        v.clone()
    } else {
        v.contiguous()?
    };
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
        return Ok(None);
    };
    // Where row-and-head `bh`'s t keys (values) start: `start + bh * step`.
    let (k_start, k_step) = (kl.start_offset(), kl.stride()[1]);
    let (v_start, v_step) = (vl.start_offset(), vl.stride()[1]);
    let (kd, vd) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
    let mut out = vec![0f32; b * h * hd];
    out.par_chunks_mut(hd).enumerate().for_each(|(bh, o)| {
        let (qr, row_mask) = (
            &q[bh * hd..(bh + 1) * hd],
            &mask[(bh / h) * t..(bh / h + 1) * t],
        );
        let keys = &kd[k_start + bh * k_step..][..t * hd];
        let values = &vd[v_start + bh * v_step..][..t * hd];
        let mut scores: Vec<f32> = keys
            .chunks_exact(hd)
            .zip(row_mask)
            .map(|(kr, m)| dot(qr, kr) + m)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in scores.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for (p, vr) in scores.iter().zip(values.chunks_exact(hd)) {
            let p = p / sum;
            if p != 0.0 {
                for (o, x) in o.iter_mut().zip(vr) {
                    *o += p * x;
                }
            }
        }
    });
    drop((ks, vs));
    Ok(Some(Tensor::from_vec(out, (b, h, 1, hd), &Device::Cpu)?))
}

/// A dot product in 8 interleaved partial sums (so that it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Concatenates `a` and `b` along dim 0 after zero-padding the shorter one along `dim` to the
/// longer's length, at the front (`front`) or the back.
pub(crate) fn cat_padded(
    a: &Tensor,
    b: &Tensor,
    dim: usize,
    front: bool,
) -> candle_core::Result<Tensor> {
    let len = a.dim(dim)?.max(b.dim(dim)?);
    let pad = |t: &Tensor| -> candle_core::Result<Tensor> {
        let missing = len - t.dim(dim)?;
        if missing == 0 {
            return Ok(t.clone());
        }
        let mut shape = t.dims().to_vec();
        shape[dim] = missing;
        let zeros = Tensor::zeros(shape, t.dtype(), t.device())?;
        if front {
            Tensor::cat(&[&zeros, t], dim)
        } else {
            Tensor::cat(&[t, &zeros], dim)
        }
    };
    Tensor::cat(&[&pad(a)?, &pad(b)?], 0)
}

/// Row masks of two batches padded with 0 to a common length (at the front or the back), `a`'s
/// rows first.
pub(crate) fn merge_masks(a: &[Vec<u8>], b: &[Vec<u8>], front: bool) -> Vec<Vec<u8>> {
    let len = a.iter().chain(b).map(Vec::len).max().unwrap_or(0);
    a.iter()
        .chain(b)
        .map(|m| {
            let pad = std::iter::repeat_n(0u8, len - m.len());
            if front {
                pad.chain(m.iter().copied()).collect()
            } else {
                m.iter().copied().chain(pad).collect()
            }
        })
        .collect()
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
    fn new(cfg: &OptConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let bias = cfg.enable_bias;
        Ok(Self {
            q_proj: linear_b(d, d, bias, vb.pp("q_proj"))?,
            k_proj: linear_b(d, d, bias, vb.pp("k_proj"))?,
            v_proj: linear_b(d, d, bias, vb.pp("v_proj"))?,
            out_proj: linear_b(d, d, bias, vb.pp("out_proj"))?,
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
        let ctx = match attend_one_query(&q, &k, &v, mask)? {
            Some(ctx) => ctx,
            None => {
                // Scores and softmax in f32 whatever the weights' dtype, as the reference does.
                let scores = q
                    .matmul(&k.t()?)?
                    .to_dtype(DType::F32)?
                    .broadcast_add(mask)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
                probs.matmul(&v)?
            }
        };
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
    fn new(cfg: &OptConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            self_attn: OptAttention::new(cfg, vb.pp("self_attn"))?,
            self_attn_layer_norm: opt_layer_norm(cfg, vb.pp("self_attn_layer_norm"))?,
            fc1: linear_b(d, cfg.ffn_dim, cfg.enable_bias, vb.pp("fc1"))?,
            fc2: linear_b(cfg.ffn_dim, d, cfg.enable_bias, vb.pp("fc2"))?,
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
    /// `vb` points at the language model (`language_model.` in BLIP-2 checkpoints).
    pub fn new(cfg: &OptConfig, vb: VarBuilder) -> Result<Self> {
        let dec = vb.pp("model.decoder");
        let d = cfg.hidden_size;
        let embed_tokens = embedding(cfg.vocab_size, d, dec.pp("embed_tokens"))?;
        let embed_positions = embedding(
            cfg.max_position_embeddings + POSITION_OFFSET,
            d,
            dec.pp("embed_positions"),
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| OptLayer::new(cfg, dec.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
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
            lm_head: Linear::new(head_weight, None)?,
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
                    return Err(ModelError::Input(format!(
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
