//! Linear layers, and the one place that chooses how a matrix product runs.
//!
//! Weights stay in the checkpoint's [out, in] layout. [`Linear::forward`] picks the kernel from
//! the device, dtype and shape: inputs of at most [`SKINNY_ROWS`] rows (decode steps) whose
//! weights are f32 on the CPU go through `kernels::cpu::decode` (the cost is reading the
//! weights, whatever the batch); q8_0 weights through `kernels::cpu::q8`; everything else
//! (prefill, the vision encoder, other devices, `--kernels generic`) through candle's matmul,
//! or, for f32 weights mapped from the checkpoint's files ([`MappedSource`]), through the same
//! gemm call candle makes (`kernels::cpu::gemm`).
//!
//! Quantisation (q8_0, q4k, per-channel int8) is an explicit argument of the constructor: the
//! loader asks for it for the vision encoder, the Q-Former and the language model, so the f32
//! copy of a quantised model never exists in full; the projection, norms and embeddings stay in
//! the load dtype.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::dispatch::{cpu_kernels_for, Kernels};
use crate::kernels::cpu::decode::skinny_matmul;
pub use crate::kernels::cpu::decode::SKINNY_ROWS;
use crate::kernels::cpu::gemm::matmul_transposed;
pub use crate::kernels::cpu::memory::MappedF32;
use crate::kernels::cpu::q8::Q8Matrix;
use crate::kernels::cpu::q8_panels::{Epilogue, PanelMatrix};
use crate::kernels::cpu::with_f32_slice;

/// Weight formats a `--quantize` run may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    Q8_0,
    Q4K,
    /// One scale per output feature, inputs quantised with one scale per row (AVX-512 VNNI
    /// only): `kernels::cpu::q8_panels`.
    Int8,
}

impl Quantization {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 | Self::Int8 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }
}

/// Where f32 weight matrices can be borrowed from without a copy: a checkpoint whose files are
/// mapped into memory (`model::loader`).
pub trait MappedSource: Send + Sync {
    /// The tensor `name`, when the checkpoint holds it as f32 of exactly `shape`, aligned.
    fn f32_tensor(&self, name: &str, shape: &[usize]) -> Option<MappedF32>;
}

/// How a model's constructors make their linear layers: the quantisation asked for, and the
/// mapped checkpoint that unquantised f32 weights on the CPU are borrowed from (else they are
/// read through the `VarBuilder`, a copy).
#[derive(Clone, Default)]
pub struct LinearLoad {
    pub quantize: Option<Quantization>,
    mapped: Option<Arc<dyn MappedSource>>,
    /// Whether unquantised weights may stay views of the mapping: its pages were populated at
    /// open. A quantised load maps without populating, only to quantise from the mapping, and
    /// reads its unquantised weights, so that no request faults pages in later.
    lend_dense: bool,
}

impl LinearLoad {
    pub fn new(
        quantize: Option<Quantization>,
        mapped: Option<Arc<dyn MappedSource>>,
        lend_dense: bool,
    ) -> Self {
        Self {
            quantize,
            mapped,
            lend_dense,
        }
    }

    /// The same source without quantisation (the language projection stays in the load dtype).
    pub fn unquantized(&self) -> Self {
        Self::new(None, self.mapped.clone(), self.lend_dense)
    }

    /// The weight under `vb` as a mapping, when one serves: f32 on the CPU kernels, lent as it
    /// is when `lend_dense`, else only to be quantised.
    fn mapped(&self, vb: &VarBuilder, shape: &[usize]) -> Option<MappedF32> {
        let usable = (self.quantize.is_some() || self.lend_dense)
            && vb.dtype() == DType::F32
            && vb.device().is_cpu()
            && super::dispatch::kernels() == Kernels::Auto;
        let source = self.mapped.as_ref().filter(|_| usable)?;
        let prefix = vb.prefix();
        let name = if prefix.is_empty() {
            "weight".to_string()
        } else {
            format!("{prefix}.weight")
        };
        source.f32_tensor(&name, shape)
    }
}

#[derive(Debug, Clone)]
enum Weight {
    /// [out, in], contiguous.
    Dense(Tensor),
    /// [out, in], f32, in a mapping of the checkpoint's file (CPU only).
    Mapped {
        values: MappedF32,
        out: usize,
        k: usize,
    },
    /// q8_0 with our own kernels (no repacked copy: see `kernels::cpu::q8`).
    Q8(Arc<Q8Matrix>),
    /// Per-channel int8 in column panels, every input size in integers.
    Int8(Arc<PanelMatrix>),
    /// `matmul` serves inputs of up to [`SKINNY_ROWS`] rows (decode: reading the quantised
    /// weights is the cost); larger inputs (prefill, the vision encoder) are compute-bound and
    /// multiply by `qtensor` dequantised to f32 for the call.
    Quantized {
        matmul: Arc<QMatMul>,
        qtensor: Arc<QTensor>,
        out: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a weight in the checkpoint's [out, in] layout, quantised when `quantize` asks (q4k
    /// where the input width is a multiple of 256, else q8_0 where it is a multiple of 32, else
    /// kept as it is). Quantised weights run on the CPU kernels only: asking for them on another
    /// device or with `--kernels generic` is an error, never silently ignored.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let weight = match quantize {
            Some(_) if !weight.device().is_cpu() => {
                candle_core::bail!(
                    "--quantize runs on the CPU only; on a GPU use --dtype f16 or bf16"
                )
            }
            Some(_) if super::dispatch::kernels() == Kernels::Generic => {
                candle_core::bail!(
                    "--quantize needs the CPU kernels: it cannot run with --kernels generic"
                )
            }
            Some(q) => self::quantize(&weight, q)?,
            None => None,
        }
        .unwrap_or(Weight::Dense(weight.contiguous()?));
        Ok(Self { weight, bias })
    }

    /// The ggml format of the weight, if it has one (not dense, not per-channel int8).
    pub fn quantized(&self) -> Option<GgmlDType> {
        match &self.weight {
            Weight::Dense(_) | Weight::Mapped { .. } | Weight::Int8(_) => None,
            Weight::Q8(_) => Some(GgmlDType::Q8_0),
            Weight::Quantized { qtensor, .. } => Some(qtensor.dtype()),
        }
    }
}

fn quantize(weight: &Tensor, q: Quantization) -> Result<Option<Weight>> {
    let (out, k) = weight.dims2()?;
    if q == Quantization::Int8 {
        if !PanelMatrix::available() {
            candle_core::bail!("--quantize int8 needs a CPU with AVX-512 VNNI; use q8_0");
        }
        if !k.is_multiple_of(4) {
            return Ok(None);
        }
        // Quantised from the weight's own storage: no f32 copy of it.
        let w = weight.to_dtype(DType::F32)?.contiguous()?;
        let quantize = |w: &[f32]| PanelMatrix::quantize_per_channel(w, out, k);
        let packed = match with_f32_slice(&w, quantize)? {
            Some(p) => p,
            None => quantize(&w.flatten_all()?.to_vec1::<f32>()?),
        };
        return Ok(Some(Weight::Int8(Arc::new(packed))));
    }
    let dtype = [q.ggml(), GgmlDType::Q8_0]
        .into_iter()
        .find(|d| k % d.block_size() == 0);
    let Some(dtype) = dtype else { return Ok(None) };
    if dtype == GgmlDType::Q8_0 {
        return Ok(Some(Weight::Q8(Arc::new(Q8Matrix::quantize(weight)?))));
    }
    let qtensor = Arc::new(QTensor::quantize(&weight.to_dtype(DType::F32)?, dtype)?);
    Ok(Some(Weight::Quantized {
        matmul: Arc::new(QMatMul::from_arc(qtensor.clone())?),
        qtensor,
        out,
    }))
}

/// [`quantize`] of f32 values [out, k] mapped from the checkpoint, where the format takes a
/// slice (int8, q8_0); `None` for the others (q4k through candle), which read a tensor.
fn quantize_slice(w: &[f32], out: usize, k: usize, q: Quantization) -> Result<Option<Weight>> {
    if q == Quantization::Int8 {
        if !PanelMatrix::available() {
            candle_core::bail!("--quantize int8 needs a CPU with AVX-512 VNNI; use q8_0");
        }
        if !k.is_multiple_of(4) {
            return Ok(None);
        }
        let packed = PanelMatrix::quantize_per_channel(w, out, k);
        return Ok(Some(Weight::Int8(Arc::new(packed))));
    }
    let format = [q.ggml(), GgmlDType::Q8_0]
        .into_iter()
        .find(|d| k.is_multiple_of(d.block_size()));
    if format != Some(GgmlDType::Q8_0) {
        return Ok(None);
    }
    Ok(Q8Matrix::quantize_slice(w, out, k).map(|m| Weight::Q8(Arc::new(m))))
}

/// `xs` [..., k] as rows [rows, k], and the output shape for `n` output features.
fn rows_of(xs: &Tensor, n: usize) -> Result<(Tensor, usize, Vec<usize>)> {
    let mut shape = xs.dims().to_vec();
    let k = *shape
        .last()
        .ok_or_else(|| candle_core::Error::Msg("Linear input has no dimensions".into()))?;
    let rows = xs.elem_count() / k.max(1);
    *shape.last_mut().expect("checked non-empty") = n;
    Ok((xs.contiguous()?.reshape((rows, k))?, rows, shape))
}

impl Linear {
    /// Flattens `xs` to f32 rows [rows, k], multiplies with `matmul`, restores the shape and
    /// dtype and adds the bias.
    fn quantized_forward(
        &self,
        xs: &Tensor,
        out: usize,
        matmul: impl FnOnce(&Tensor, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (x2, rows, shape) = rows_of(&xs.to_dtype(DType::F32)?, out)?;
        let y = matmul(&x2, rows)?.to_dtype(xs.dtype())?.reshape(shape)?;
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Dense weights: the decode kernel for few f32 CPU rows, else candle's matmul.
    fn dense_forward(&self, xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let n = weight.dim(0)?;
        let (x2, rows, shape) = rows_of(xs, n)?;
        let k = x2.dim(1)?;
        let skinny = rows <= SKINNY_ROWS && xs.dtype() == DType::F32 && cpu_kernels_for(xs);
        let fast = if skinny {
            let x = x2.flatten_all()?.to_vec1::<f32>()?;
            with_f32_slice(weight, |w| skinny_matmul(&x, w, rows, k, n))?
        } else {
            None
        };
        let out = match fast {
            Some(out) => Tensor::from_vec(out, (rows, n), xs.device())?,
            None => x2.matmul(&weight.t()?)?,
        };
        self.add_bias(out.reshape(shape)?)
    }

    /// Weights mapped from the checkpoint: the decode kernel for few rows, else the gemm call
    /// candle's matmul would make (the same bits as [`Self::dense_forward`]).
    fn mapped_forward(&self, xs: &Tensor, w: &MappedF32, n: usize, k: usize) -> Result<Tensor> {
        if !xs.device().is_cpu() {
            candle_core::bail!("weights mapped from the checkpoint serve CPU inputs only");
        }
        let (x2, rows, shape) = rows_of(&xs.to_dtype(DType::F32)?, n)?;
        if x2.dim(1)? != k {
            candle_core::bail!("Linear input has {} features, the weight {k}", x2.dim(1)?);
        }
        // The input read in place (rows_of made it contiguous), not copied.
        let product = |x: &[f32]| {
            if rows <= SKINNY_ROWS {
                skinny_matmul(x, w.as_slice(), rows, k, n)
            } else {
                matmul_transposed(x, rows, k, w.as_slice(), n)
            }
        };
        let out = match with_f32_slice(&x2, product)? {
            Some(out) => out,
            None => product(&x2.flatten_all()?.to_vec1::<f32>()?),
        };
        let y = Tensor::from_vec(out, (rows, n), xs.device())?.to_dtype(xs.dtype())?;
        self.add_bias(y.reshape(shape)?)
    }
}

impl Linear {
    /// The weights in column panels (per-channel int8, or q8_0 where the CPU packs it).
    fn panels(&self) -> Option<&PanelMatrix> {
        match &self.weight {
            Weight::Int8(p) => Some(p),
            Weight::Q8(q) => q.panels(),
            _ => None,
        }
    }

    /// `act(self.forward(xs))`. With panel weights on an f32 input, an exact GELU is applied
    /// as the kernel stores each output row: the same bits as the separate pass, without its
    /// read and write of the whole output.
    pub fn forward_then(&self, xs: &Tensor, act: super::Activation) -> Result<Tensor> {
        if act == super::Activation::Gelu && cpu_kernels_for(xs) {
            if let Some(y) = self
                .panels()
                .map(|p| self.panel_forward(xs, p, true))
                .transpose()?
                .flatten()
            {
                return Ok(y);
            }
        }
        act.forward(&self.forward(xs)?)
    }

    /// `xs @ W^T + bias` (then GELU) through the panel kernel, reading `xs` in place and adding
    /// the bias as each row is stored; `None` unless `xs` and the bias are f32 on the CPU.
    fn panel_forward(&self, xs: &Tensor, p: &PanelMatrix, gelu: bool) -> Result<Option<Tensor>> {
        if xs.dtype() != DType::F32 || !xs.device().is_cpu() {
            return Ok(None);
        }
        let bias = match &self.bias {
            Some(b) if b.dtype() == DType::F32 && b.device().is_cpu() => Some(b.contiguous()?),
            Some(_) => return Ok(None),
            None => None,
        };
        let n = p.out_features();
        let (x2, rows, shape) = rows_of(xs, n)?;
        let product = |x: &[f32]| -> Result<Vec<f32>> {
            let run = |bias: Option<&[f32]>| p.matmul_then(x, rows, &Epilogue { bias, gelu });
            match &bias {
                Some(b) => with_f32_slice(b, |b| run(Some(b)))?
                    .ok_or_else(|| candle_core::Error::Msg("the bias is not in CPU memory".into())),
                None => Ok(run(None)),
            }
        };
        let out = match with_f32_slice(&x2, product)? {
            Some(out) => out?,
            None => product(&x2.flatten_all()?.to_vec1::<f32>()?)?,
        };
        Ok(Some(
            Tensor::from_vec(out, (rows, n), xs.device())?.reshape(shape)?,
        ))
    }
}

impl Linear {
    /// Panel weights: the fused path, else (inputs or bias in another dtype) the input cast to
    /// f32 and the bias added after.
    fn panels_forward(&self, xs: &Tensor, p: &PanelMatrix) -> Result<Tensor> {
        if let Some(y) = self.panel_forward(xs, p, false)? {
            return Ok(y);
        }
        self.quantized_forward(xs, p.out_features(), |x2, rows| {
            let x = x2.flatten_all()?.to_vec1::<f32>()?;
            Tensor::from_vec(p.matmul(&x, rows), (rows, p.out_features()), xs.device())
        })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => self.dense_forward(xs, w),
            Weight::Mapped { values, out, k } => self.mapped_forward(xs, values, *out, *k),
            Weight::Int8(p) => self.panels_forward(xs, p),
            Weight::Q8(q) => match q.panels() {
                Some(p) => self.panels_forward(xs, p),
                None => self.quantized_forward(xs, q.out_features(), |x2, rows| {
                    if rows <= SKINNY_ROWS && xs.device().is_cpu() {
                        let x = x2.flatten_all()?.to_vec1::<f32>()?;
                        Tensor::from_vec(q.skinny(&x, rows), (rows, q.out_features()), xs.device())
                    } else {
                        x2.matmul(&q.dequantize(xs.device())?.t()?)
                    }
                }),
            },
            Weight::Quantized {
                matmul,
                qtensor,
                out,
            } => self.quantized_forward(xs, *out, |x2, rows| {
                if rows <= SKINNY_ROWS {
                    matmul.forward(x2)
                } else {
                    x2.matmul(&qtensor.dequantize(xs.device())?.t()?)
                }
            }),
        }
    }
}

/// The `weight` under `vb`, [out, in] as HF stores them, with `bias`: borrowed from the mapped
/// checkpoint where `load` has one that serves, else read and quantised as asked.
pub fn linear_with(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    bias: Option<Tensor>,
    load: &LinearLoad,
) -> Result<Linear> {
    if let Some(values) = load.mapped(&vb, &[out_dim, in_dim]) {
        let weight = match load.quantize {
            None => Some(Weight::Mapped {
                values,
                out: out_dim,
                k: in_dim,
            }),
            Some(q) => {
                let weight = quantize_slice(values.as_slice(), out_dim, in_dim, q)?;
                values.release();
                weight
            }
        };
        // A format that cannot quantise from a slice (q4k) reads the weight below.
        if let Some(weight) = weight {
            return Ok(Linear { weight, bias });
        }
    }
    let weight = vb.get((out_dim, in_dim), "weight")?;
    Linear::new(weight, bias, load.quantize)
}

/// The `weight` (and `bias`, when `bias`) under `vb`: [`linear_with`].
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
    load: &LinearLoad,
) -> Result<Linear> {
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    linear_with(in_dim, out_dim, vb, bias, load)
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder, load: &LinearLoad) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, vb, load)
}

pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    load: &LinearLoad,
) -> Result<Linear> {
    linear_b(in_dim, out_dim, false, vb, load)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn skinny_path_agrees_with_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 53), &dev).unwrap();
        let lin = Linear::new(w.clone(), None, None).unwrap();
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

    #[test]
    fn a_skinny_row_is_bit_identical_whatever_rows_are_beside_it() {
        let dev = Device::Cpu;
        // 2600 columns: several chunks of the multi-tile path, and a tail past the last 8.
        let w = Tensor::randn(0f32, 1.0, (37, 2601), &dev).unwrap();
        let lin = Linear::new(w, None, None).unwrap();
        let x = Tensor::randn(0f32, 1.0, (SKINNY_ROWS, 2601), &dev).unwrap();
        let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        let all = rows(&lin.forward(&x).unwrap());
        for m in [1, 3, 5, 8] {
            let part = rows(&lin.forward(&x.narrow(0, 2, m).unwrap()).unwrap());
            assert_eq!(part, all[2..2 + m].to_vec(), "{m} rows");
        }
    }

    #[test]
    fn quantized_weights_stay_close_and_fall_back_by_width() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 512), &dev).unwrap();
        // Both paths: decode-sized inputs (quantised matmul) and larger ones (dequantised).
        for rows in [5, SKINNY_ROWS + 3] {
            let x = Tensor::randn(0f32, 1.0, (rows, 512), &dev).unwrap();
            let dense = Linear::new(w.clone(), None, None)
                .unwrap()
                .forward(&x)
                .unwrap();
            for (q, expected, tol) in [
                (Quantization::Q8_0, GgmlDType::Q8_0, 0.01),
                (Quantization::Q4K, GgmlDType::Q4K, 0.12),
            ] {
                let lin = Linear::new(w.clone(), None, Some(q)).unwrap();
                assert_eq!(lin.quantized(), Some(expected));
                let y = lin.forward(&x).unwrap();
                let l2 = |t: &Tensor| {
                    let s: f32 = t.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
                    s.sqrt()
                };
                let (err, norm) = (l2(&(&y - &dense).unwrap()), l2(&dense));
                assert!(err / norm < tol, "{q:?}: relative error {}", err / norm);
            }
        }
        // Without the option the weight stays dense; widths that q4k cannot take fall back to
        // q8_0, and widths no format takes stay dense.
        assert_eq!(
            Linear::new(w.clone(), None, None).unwrap().quantized(),
            None
        );
        let q4k = Some(Quantization::Q4K);
        let narrow = Tensor::randn(0f32, 1.0, (8, 96), &dev).unwrap();
        assert_eq!(
            Linear::new(narrow, None, q4k).unwrap().quantized(),
            Some(GgmlDType::Q8_0)
        );
        let odd = Tensor::randn(0f32, 1.0, (8, 50), &dev).unwrap();
        assert_eq!(Linear::new(odd, None, q4k).unwrap().quantized(), None);
    }
}
