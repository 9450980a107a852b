//! The BLIP-2 vision encoder (EVA ViT-g/14 on the real checkpoints), as transformers'
//! `Blip2VisionModel`: patch embedding + CLS + learned positions, pre-LN blocks with a fused
//! `qkv` projection, and `post_layernorm` over every token. Images at another size than the
//! checkpoint's get position embeddings resized as `interpolate_pos_encoding=True` does.

use candle_core::{Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use crate::nn::attention::attend_unmasked;
use crate::nn::interpolate::bicubic_grid;
use crate::nn::{linear, linear_with, Activation, Linear, LinearLoad};

use super::config::VisionConfig;
use super::Result;

struct VisionEmbeddings {
    /// Conv2d(3 -> D, kernel = stride = patch) stored as the conv weight flattened to [D, 3*p*p]:
    /// with stride == kernel the convolution is exactly one matmul over non-overlapping patches.
    patch_weight: Tensor,
    patch_bias: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
    /// The checkpoint's patch grid side (image_size / patch_size).
    grid: usize,
}

impl VisionEmbeddings {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let num_positions = (cfg.image_size / p).pow(2) + 1;
        let weight = vb.get((d, 3, p, p), "patch_embedding.weight")?;
        Ok(Self {
            patch_weight: weight.reshape((d, 3 * p * p))?.t()?.contiguous()?,
            patch_bias: vb.get(d, "patch_embedding.bias")?,
            class_embedding: vb.get((1, 1, d), "class_embedding")?,
            position_embedding: vb.get((1, num_positions, d), "position_embedding")?,
            patch_size: p,
            grid: cfg.image_size / p,
        })
    }

    /// The position table for a `gh` x `gw` patch grid [1, 1 + gh*gw, D]: as stored for the
    /// checkpoint's grid; otherwise the CLS row kept and the patch rows, as an s x s grid,
    /// resized with torch's bicubic (transformers' `interpolate_pos_encoding`), computed in f32.
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let s = self.grid;
        if (gh, gw) == (s, s) {
            return Ok(self.position_embedding.clone());
        }
        let table = &self.position_embedding;
        let d = table.dim(2)?;
        let cls = table.narrow(1, 0, 1)?;
        let patches: Vec<f32> = table
            .narrow(1, 1, s * s)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let resized = bicubic_grid(&patches, (s, s), d, (gh, gw));
        let resized =
            Tensor::from_vec(resized, (1, gh * gw, d), table.device())?.to_dtype(table.dtype())?;
        Ok(Tensor::cat(&[&cls, &resized], 1)?)
    }

    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let p = self.patch_size;
        if c != 3 || h % p != 0 || w % p != 0 {
            return Err(super::ModelError::Input(format!(
                "pixel_values must be [B, 3, H, W] with H and W multiples of {p}, got [{b}, {c}, {h}, {w}]"
            )));
        }
        let (gh, gw) = (h / p, w / p);
        let patches = pixel_values
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * gh * gw, c * p * p))?;
        let embeds = patches
            .matmul(&self.patch_weight)?
            .broadcast_add(&self.patch_bias)?
            .reshape((b, gh * gw, ()))?;
        let d = embeds.dim(2)?;
        let cls = self.class_embedding.broadcast_as((b, 1, d))?;
        let embeds = Tensor::cat(&[&cls, &embeds], 1)?;
        Ok(embeds.broadcast_add(&self.positions(gh, gw)?)?)
    }
}

struct VisionAttention {
    qkv: Linear,
    projection: Linear,
    num_heads: usize,
    scale: f64,
}

impl VisionAttention {
    fn new(cfg: &VisionConfig, vb: VarBuilder, q: &LinearLoad) -> Result<Self> {
        let d = cfg.hidden_size;
        // Older snapshots store q_bias and v_bias; the key has no bias.
        let qkv_bias = if vb.contains_tensor("qkv.bias") {
            Some(vb.get(3 * d, "qkv.bias")?)
        } else if vb.contains_tensor("q_bias") {
            let q = vb.get(d, "q_bias")?;
            let v = vb.get(d, "v_bias")?;
            Some(Tensor::cat(&[&q, &q.zeros_like()?, &v], 0)?)
        } else if cfg.qkv_bias {
            return Err(super::ModelError::Weights(format!(
                "tensor {}.qkv.bias (or q_bias/v_bias) is missing from the checkpoint",
                vb.prefix()
            )));
        } else {
            None
        };
        let head_dim = d / cfg.num_attention_heads;
        Ok(Self {
            qkv: linear_with(d, 3 * d, vb.pp("qkv"), qkv_bias, q)?,
            projection: linear(d, d, vb.pp("projection"), q)?,
            num_heads: cfg.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let hd = d / self.num_heads;
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((b, n, 3, self.num_heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let ctx = attend_unmasked(&q, &k, &v, self.scale)?
            .transpose(1, 2)?
            .reshape((b, n, d))?;
        Ok(self.projection.forward(&ctx)?)
    }
}

struct VisionLayer {
    layer_norm1: LayerNorm,
    self_attn: VisionAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl VisionLayer {
    fn new(cfg: &VisionConfig, vb: VarBuilder, q: &LinearLoad) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            layer_norm1: layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: VisionAttention::new(cfg, vb.pp("self_attn"), q)?,
            layer_norm2: layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"), q)?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"), q)?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.layer_norm1.forward(xs)?)?;
        let xs = (xs + h)?;
        let h = self.layer_norm2.forward(&xs)?;
        let h = self.fc2.forward(&self.fc1.forward_then(&h, self.act)?)?;
        Ok((xs + h)?)
    }
}

/// `Blip2VisionModel`: pixels [B, 3, H, W] -> `last_hidden_state` [B, N+1, D] (post-LN, CLS first).
pub struct VisionEncoder {
    embeddings: VisionEmbeddings,
    layers: Vec<VisionLayer>,
    post_layernorm: LayerNorm,
}

impl VisionEncoder {
    /// `quantize`: the encoder's linear weights, as they are read.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder, quantize: &LinearLoad) -> Result<Self> {
        let layers = super::build_layers(cfg.num_hidden_layers, vb.device().is_cpu(), |i| {
            VisionLayer::new(cfg, vb.pp(format!("encoder.layers.{i}")), quantize)
        })?;
        Ok(Self {
            embeddings: VisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            post_layernorm: layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("post_layernorm"),
            )?,
        })
    }

    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut xs = self.embeddings.forward(pixel_values)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(self.post_layernorm.forward(&xs)?)
    }

    /// `pooler_output` [B, D]: the CLS row of `last_hidden_state`, through `post_layernorm`
    /// once more (the reference normalises it twice).
    pub fn pool(&self, last_hidden_state: &Tensor) -> Result<Tensor> {
        let cls = last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.post_layernorm.forward(&cls)?)
    }
}
