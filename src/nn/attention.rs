//! Attention helpers shared by the towers: head split and merge, f32 scaling as torch does it,
//! [`attend`], the one attention function that picks a kernel (the CPU decode-step kernel for
//! one query per row, else candle's matmul + softmax), and [`softmax_scaled`] for unmasked
//! scores (the vision encoder's).

use candle_core::{DType, Result, Tensor};

use super::dispatch::cpu_kernels_for;
use crate::kernels::cpu::attention::attend_one_query;

/// `xs * factor`, computed in f32 as torch does for half dtypes (candle would round the factor
/// to the tensor's dtype first).
pub fn scale(xs: &Tensor, factor: f64) -> Result<Tensor> {
    if xs.dtype() == DType::F32 {
        xs * factor
    } else {
        (xs.to_dtype(DType::F32)? * factor)?.to_dtype(xs.dtype())
    }
}

/// `softmax(xs * factor)` over the last axis: the CPU kernel (a vectorised exp, the scaling in
/// the same pass) for f32 CPU tensors, else candle's [`scale`] and softmax. For scores without
/// a mask: the kernel's sums are not those of candle's op, so a row padded with masked keys
/// would not keep its bits.
pub fn softmax_scaled(xs: &Tensor, factor: f64) -> Result<Tensor> {
    if cpu_kernels_for(xs) {
        if let Some(probs) = crate::kernels::cpu::softmax::softmax_scaled(xs, factor as f32)? {
            return Ok(probs);
        }
    }
    candle_nn::ops::softmax_last_dim(&scale(xs, factor)?)
}

/// `softmax(q k^T * factor) v` for unmasked attention (the vision encoder's), q, k and v
/// [B, H, T, hd]. f32 CPU tensors take the CPU kernels: the heads' products one per thread
/// and the vectorised softmax; anything else candle's matmul and [`softmax_scaled`].
pub fn attend_unmasked(q: &Tensor, k: &Tensor, v: &Tensor, factor: f64) -> Result<Tensor> {
    if cpu_kernels_for(q) {
        if let Some(ctx) = attend_unmasked_cpu(q, k, v, factor)? {
            return Ok(ctx);
        }
    }
    softmax_scaled(&q.matmul(&k.t()?)?, factor)?.matmul(v)
}

fn attend_unmasked_cpu(q: &Tensor, k: &Tensor, v: &Tensor, factor: f64) -> Result<Option<Tensor>> {
    use crate::kernels::cpu::{gemm::batched_matmul, with_f32_slice};
    let (b, h, s, hd) = q.dims4()?;
    let t = k.dim(2)?;
    if k.dims() != [b, h, t, hd] || v.dims() != k.dims() {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let scores = with_f32_slice(&q, |qs| {
        with_f32_slice(&k, |ks| batched_matmul(qs, ks, b * h, (s, hd, t), true))
    })?
    .transpose()?
    .flatten();
    let Some(scores) = scores else {
        return Ok(None);
    };
    let scores = Tensor::from_vec(scores, (b, h, s, t), q.device())?;
    let probs = softmax_scaled(&scores, factor)?;
    let ctx = with_f32_slice(&probs, |ps| {
        with_f32_slice(&v, |vs| batched_matmul(ps, vs, b * h, (s, t, hd), false))
    })?
    .transpose()?
    .flatten();
    ctx.map(|c| Tensor::from_vec(c, (b, h, s, hd), q.device()))
        .transpose()
}

/// `softmax(q k^T + bias) v` with q [B, H, S, hd], k and v [B, H, T, hd] and an additive
/// `bias` broadcastable to [B, H, S, T] (masks with f32::MIN, T5's position bias). Scores and
/// softmax run in f32 whatever the weights' dtype, as the reference does. One query per row with
/// a [B, 1, 1, T] mask in f32 on the CPU takes the decode-step kernel (unless `--kernels generic`).
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if cpu_kernels_for(q) {
        if let Some(ctx) = attend_one_query(q, k, v, bias)? {
            return Ok(ctx);
        }
    }
    let scores = q
        .matmul(&k.t()?)?
        .to_dtype(DType::F32)?
        .broadcast_add(bias)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(v)
}
/// Splits `[B, T, H*hd]` into heads `[B, H, T, hd]` (contiguous, ready for matmul).
pub fn split_heads(xs: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, t, d) = xs.dims3()?;
    xs.reshape((b, t, num_heads, d / num_heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Joins heads `[B, H, T, hd]` back into `[B, T, H*hd]`.
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, t, h * hd))
}
