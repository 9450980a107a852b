//! The Querying Transformer as transformers' `Blip2QFormerModel` runs it for generation: learned
//! query tokens, LayerNorm before the layers, post-LN BERT blocks whose every
//! `cross_attention_frequency`-th layer also attends to the vision tokens, and the query FFN
//! (`intermediate_query` / `output_query`). The text FFN is never on this path.

use candle_core::{Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use crate::nn::attention::{merge_heads, split_heads};
use crate::nn::{linear, Activation, Linear, LinearLoad};

use super::config::QFormerConfig;
use super::Result;

/// BERT attention (`attention.attention` + `attention.output`): `LN(dense(ctx) + x)`.
struct QFormerAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: LayerNorm,
    num_heads: usize,
    /// sqrt(head_dim): the reference divides the scores by it (not a multiply by its inverse).
    sqrt_head_dim: f64,
}

impl QFormerAttention {
    fn new(
        cfg: &QFormerConfig,
        kv_width: usize,
        vb: VarBuilder,
        load: &LinearLoad,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("attention");
        let out = vb.pp("output");
        Ok(Self {
            query: linear(d, d, attn.pp("query"), load)?,
            key: linear(kv_width, d, attn.pp("key"), load)?,
            value: linear(kv_width, d, attn.pp("value"), load)?,
            dense: linear(d, d, out.pp("dense"), load)?,
            layer_norm: layer_norm(d, cfg.layer_norm_eps, out.pp("LayerNorm"))?,
            num_heads: cfg.num_attention_heads,
            sqrt_head_dim: ((d / cfg.num_attention_heads) as f64).sqrt(),
        })
    }

    /// `context` is `xs` for self-attention and the vision states for cross-attention.
    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.query.forward(xs)?, self.num_heads)?;
        let k = split_heads(&self.key.forward(context)?, self.num_heads)?;
        let v = split_heads(&self.value.forward(context)?, self.num_heads)?;
        let divisor = Tensor::new(self.sqrt_head_dim as f32, q.device())?.to_dtype(q.dtype())?;
        let scores = q.matmul(&k.t()?)?.broadcast_div(&divisor)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = merge_heads(&probs.matmul(&v)?)?;
        let h = self.dense.forward(&ctx)?;
        Ok(self.layer_norm.forward(&(h + xs)?)?)
    }
}

struct QFormerLayer {
    self_attention: QFormerAttention,
    cross_attention: Option<QFormerAttention>,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: Activation,
}

impl QFormerLayer {
    fn new(cfg: &QFormerConfig, index: usize, vb: VarBuilder, load: &LinearLoad) -> Result<Self> {
        let d = cfg.hidden_size;
        let cross_attention = if index.is_multiple_of(cfg.cross_attention_frequency) {
            Some(QFormerAttention::new(
                cfg,
                cfg.encoder_hidden_size,
                vb.pp("crossattention"),
                load,
            )?)
        } else {
            None
        };
        Ok(Self {
            self_attention: QFormerAttention::new(cfg, d, vb.pp("attention"), load)?,
            cross_attention,
            intermediate: linear(
                d,
                cfg.intermediate_size,
                vb.pp("intermediate_query.dense"),
                load,
            )?,
            output: linear(cfg.intermediate_size, d, vb.pp("output_query.dense"), load)?,
            output_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("output_query.LayerNorm"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, vision_states: &Tensor) -> Result<Tensor> {
        let mut h = self.self_attention.forward(xs, xs)?;
        if let Some(cross) = &self.cross_attention {
            h = cross.forward(&h, vision_states)?;
        }
        let ffn = self
            .output
            .forward(&self.intermediate.forward_then(&h, self.act)?)?;
        Ok(self.output_norm.forward(&(ffn + h)?)?)
    }
}

/// Vision states [B, N, Dv] -> query states [B, Q, Dq].
pub struct QFormer {
    query_tokens: Tensor,
    layernorm: LayerNorm,
    layers: Vec<QFormerLayer>,
}

impl QFormer {
    /// `vb` is the checkpoint root: the query tokens live outside the `qformer.` prefix.
    /// `load`'s quantisation applies to every linear layer here.
    pub fn new(
        cfg: &QFormerConfig,
        num_query_tokens: usize,
        vb: VarBuilder,
        load: &LinearLoad,
    ) -> Result<Self> {
        let q = vb.pp("qformer");
        let layers = super::build_layers(cfg.num_hidden_layers, vb.device().is_cpu(), |i| {
            QFormerLayer::new(cfg, i, q.pp(format!("encoder.layer.{i}")), load)
        })?;
        Ok(Self {
            query_tokens: vb.get((1, num_query_tokens, cfg.hidden_size), "query_tokens")?,
            layernorm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, q.pp("layernorm"))?,
            layers,
        })
    }

    /// The dtype the Q-Former runs in (f32 when the rest of the model is f16, as the reference
    /// keeps `query_tokens` and `qformer` in f32 then).
    pub fn dtype(&self) -> candle_core::DType {
        self.query_tokens.dtype()
    }

    /// Vision states (any dtype; cast to the Q-Former's) -> query states in the Q-Former's dtype.
    pub fn forward(&self, vision_states: &Tensor) -> Result<Tensor> {
        let vision_states = &vision_states.to_dtype(self.dtype())?;
        let b = vision_states.dim(0)?;
        let (_, nq, d) = self.query_tokens.dims3()?;
        let queries = self.query_tokens.broadcast_as((b, nq, d))?.contiguous()?;
        let mut xs = self.layernorm.forward(&queries)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, vision_states)?;
        }
        Ok(xs)
    }
}
