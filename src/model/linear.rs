//! Linear layers with a decode-shaped fast path.
//!
//! Weights stay in the checkpoint's [out, in] layout. Decoding multiplies a handful of rows
//! (one per sequence in the batch) by every weight matrix; candle's CPU matmul packs the whole
//! matrix on each such call, so a step of batch 2 cost several times batch 1 although both must
//! read the same weights. For f32 inputs of at most [`SKINNY_ROWS`] rows we instead stream
//! each weight row once and dot it with every input row, split across threads: the cost is
//! reading the weights, whatever the batch. Larger inputs (prefill, the vision encoder) use
//! candle's matmul.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Row counts up to this take the weight-streaming path.
pub const SKINNY_ROWS: usize = 8;

#[derive(Debug, Clone)]
pub struct Linear {
    /// [out, in], contiguous.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a weight in the checkpoint's [out, in] layout.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight: weight.contiguous()?,
            bias,
        })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let k = *dims
            .last()
            .expect("Linear input has at least one dimension");
        let rows = xs.elem_count() / k.max(1);
        let n = self.weight.dim(0)?;
        let x2 = xs.contiguous()?.reshape((rows, k))?;
        let out = if rows <= SKINNY_ROWS
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && matches!(xs.device(), Device::Cpu)
            && matches!(self.weight.device(), Device::Cpu)
        {
            let x = x2.flatten_all()?.to_vec1::<f32>()?;
            // Borrow the weight's storage: copying it would cost what we are saving.
            let (storage, layout) = self.weight.storage_and_layout();
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("Linear weight is not contiguous".into()))?;
            let out = match &*storage {
                candle_core::Storage::Cpu(cpu) => {
                    let w = &cpu.as_slice::<f32>()?[start..end];
                    skinny_matmul(&x, w, rows, k, n)
                }
                _ => unreachable!("checked: CPU f32"),
            };
            drop(storage);
            Tensor::from_vec(out, (rows, n), xs.device())?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let mut shape = dims;
        *shape.last_mut().expect("non-empty") = n;
        let out = out.reshape(shape)?;
        match &self.bias {
            Some(b) => out.broadcast_add(b),
            None => Ok(out),
        }
    }
}

/// `x [m, k] @ w[n, k]^T -> [m, n]`, reading `w` once.
fn skinny_matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    const BLOCK: usize = 32;
    // Output blocks transposed ([n, m]) so each thread writes one contiguous chunk.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(BLOCK * m)
        .zip(w.par_chunks(BLOCK * k))
        .for_each(|(out_block, w_block)| {
            for (o, w_row) in out_block.chunks_mut(m).zip(w_block.chunks(k)) {
                for (i, slot) in o.iter_mut().enumerate() {
                    *slot = dot(&x[i * k..(i + 1) * k], w_row);
                }
            }
        });
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// Sixteen independent accumulators, so the compiler vectorises the loop.
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (ca, cb) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for j in 0..16 {
            acc[j] = ca[j].mul_add(cb[j], acc[j]);
        }
    }
    let mut tail = 0f32;
    for j in chunks * 16..a.len() {
        tail = a[j].mul_add(b[j], tail);
    }
    acc.iter().sum::<f32>() + tail
}

pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Linear::new(weight, bias)
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, false, vb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skinny_path_agrees_with_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 53), &dev).unwrap();
        let lin = Linear::new(w.clone(), None).unwrap();
        for rows in [1, 3, SKINNY_ROWS, SKINNY_ROWS + 1] {
            let x = Tensor::randn(0f32, 1.0, (rows, 53), &dev).unwrap();
            let ours = lin.forward(&x).unwrap();
            let reference = x.matmul(&w.t().unwrap()).unwrap();
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "rows {rows}: {diff}");
        }
    }
}
