//! Linear layers with a decode-shaped fast path.
//!
//! Weights stay in the checkpoint's [out, in] layout. Decoding multiplies a handful of rows
//! (one per sequence in the batch) by every weight matrix; candle's CPU matmul packs the whole
//! matrix on each such call, so a step of batch 2 cost several times batch 1 although both must
//! read the same weights. For f32 inputs of at most [`SKINNY_ROWS`] rows we instead stream
//! each weight row once and dot it with every input row, split across threads: the cost is
//! reading the weights, whatever the batch. Larger inputs (prefill, the vision encoder) use
//! candle's matmul.
//!
//! Quantisation (q8_0, q4k) happens as each weight is loaded, inside a [`QuantizeScope`], so the
//! f32 copy of a quantised model never exists in full: the loader builds the vision encoder and
//! the language model in such a scope and everything else (Q-Former, projection, norms,
//! embeddings) stays in the load dtype.

use std::cell::Cell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::q8::Q8Matrix;
use rayon::prelude::*;

/// Row counts up to this take the weight-streaming path.
pub const SKINNY_ROWS: usize = 16;

/// Weight formats a `--quantize` run may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    Q8_0,
    Q4K,
}

impl Quantization {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }
}

thread_local! {
    static QUANTIZE: Cell<Option<Quantization>> = const { Cell::new(None) };
}

/// While alive, [`Linear::new`] on this thread quantises its weight.
pub struct QuantizeScope {
    previous: Option<Quantization>,
}

impl QuantizeScope {
    pub fn new(q: Option<Quantization>) -> Self {
        Self {
            previous: QUANTIZE.with(|c| c.replace(q)),
        }
    }
}

impl Drop for QuantizeScope {
    fn drop(&mut self) {
        QUANTIZE.with(|c| c.set(self.previous));
    }
}

#[derive(Debug, Clone)]
enum Weight {
    /// [out, in], contiguous.
    Dense(Tensor),
    /// q8_0 with our own kernels (no repacked copy: see [`super::q8`]).
    Q8(Arc<Q8Matrix>),
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
    /// From a weight in the checkpoint's [out, in] layout; quantised inside a [`QuantizeScope`]
    /// (q4k where the input width is a multiple of 256, else q8_0 where it is a multiple of 32,
    /// else kept as it is).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = match QUANTIZE.with(Cell::get) {
            Some(q) if weight.device().is_cpu() => quantize(&weight, q)?,
            _ => None,
        }
        .unwrap_or(Weight::Dense(weight.contiguous()?));
        Ok(Self { weight, bias })
    }

    /// The quantised format of the weight, if any.
    pub fn quantized(&self) -> Option<GgmlDType> {
        match &self.weight {
            Weight::Dense(_) => None,
            Weight::Q8(_) => Some(GgmlDType::Q8_0),
            Weight::Quantized { qtensor, .. } => Some(qtensor.dtype()),
        }
    }
}

fn quantize(weight: &Tensor, q: Quantization) -> Result<Option<Weight>> {
    let (out, k) = weight.dims2()?;
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

impl Linear {
    /// Flattens `xs` to f32 rows [rows, k], multiplies with `matmul`, restores the shape and
    /// dtype and adds the bias.
    fn quantized_forward(
        &self,
        xs: &Tensor,
        out: usize,
        matmul: impl FnOnce(&Tensor, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let k = *dims
            .last()
            .expect("Linear input has at least one dimension");
        let rows = xs.elem_count() / k.max(1);
        let x2 = xs.to_dtype(DType::F32)?.contiguous()?.reshape((rows, k))?;
        let mut shape = dims;
        *shape.last_mut().expect("non-empty") = out;
        let y = matmul(&x2, rows)?.to_dtype(xs.dtype())?.reshape(shape)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let weight = match &self.weight {
            Weight::Dense(w) => w,
            Weight::Q8(q) => {
                return self.quantized_forward(xs, q.out_features(), |x2, rows| {
                    if rows <= SKINNY_ROWS && xs.device().is_cpu() {
                        let x = x2.flatten_all()?.to_vec1::<f32>()?;
                        Tensor::from_vec(q.skinny(&x, rows), (rows, q.out_features()), xs.device())
                    } else {
                        x2.matmul(&q.dequantize(xs.device())?.t()?)
                    }
                })
            }
            Weight::Quantized {
                matmul,
                qtensor,
                out,
            } => {
                return self.quantized_forward(xs, *out, |x2, rows| {
                    if rows <= SKINNY_ROWS {
                        matmul.forward(x2)
                    } else {
                        x2.matmul(&qtensor.dequantize(xs.device())?.t()?)
                    }
                })
            }
        };
        let dims = xs.dims().to_vec();
        let k = *dims
            .last()
            .expect("Linear input has at least one dimension");
        let rows = xs.elem_count() / k.max(1);
        let n = weight.dim(0)?;
        let x2 = xs.contiguous()?.reshape((rows, k))?;
        let out = if rows <= SKINNY_ROWS
            && xs.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && matches!(xs.device(), Device::Cpu)
            && matches!(weight.device(), Device::Cpu)
        {
            let x = x2.flatten_all()?.to_vec1::<f32>()?;
            // Borrow the weight's storage: copying it would cost what we are saving.
            let (storage, layout) = weight.storage_and_layout();
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
            x2.matmul(&weight.t()?)?
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

/// Weight rows per parallel task of [`skinny_matmul`].
const BLOCK_ROWS: usize = 32;

/// `x [m, k] @ w[n, k]^T -> [m, n]`, reading `w` once.
fn skinny_matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    // Output blocks transposed ([n, m]) so each thread writes one contiguous chunk.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(BLOCK_ROWS * m)
        .zip(w.par_chunks(BLOCK_ROWS * k))
        .for_each(|(out_block, w_block)| block(x, m, k, w_block, out_block));
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

/// Fills `out_block` ([rows of w_block, m]) with the dot products of `x`'s rows and `w_block`'s.
fn block(x: &[f32], m: usize, k: usize, w_block: &[f32], out_block: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the features were detected at run time.
                unsafe { avx512vl::block(x, m, k, w_block, out_block) };
            } else {
                // SAFETY: the features were detected at run time.
                unsafe { avx2::block(x, m, k, w_block, out_block) };
            }
            return;
        }
    }
    for (o, w_row) in out_block.chunks_mut(m).zip(w_block.chunks(k)) {
        for (i, slot) in o.iter_mut().enumerate() {
            *slot = x[i * k..(i + 1) * k]
                .iter()
                .zip(w_row)
                .map(|(a, b)| a * b)
                .sum();
        }
    }
}

/// The decode kernel, compiled once per instruction set (`$features`) with register tiles of up
/// to `$tile` input rows x 2 weight rows: each 8-wide step loads `$tile + 2` vectors for
/// `2 * $tile` FMAs, where one dot product at a time loads 2 per FMA. AVX2 has 16 vector
/// registers, room for tiles of 4 rows (8 accumulators); AVX-512VL's 32 hold tiles of 8 (16
/// accumulators, so the FMA latency is hidden twice over), still on 8-lane vectors.
///
/// With more than one tile of input rows, each weight pair is read in chunks of `pass_columns`
/// columns, and every tile takes a chunk in turn: the chunk is then read from L1 after the first
/// tile, the input rows' slice of it stays within L1, and the weights still stream pair after
/// pair, in order. (Chunking all the block's rows at once instead, chunk after chunk, made 32
/// interleaved streams: 16 rows cost 490-660 ms a pass of 16 opt-2.7b layers, against 360 ms.)
/// The vector accumulators are carried from chunk to chunk, so each lane still sums its columns
/// in order: the result is bit-identical whatever the tile, the chunk width or the number of
/// rows beside it (the two instantiations agree bit for bit).
#[cfg(target_arch = "x86_64")]
macro_rules! decode_kernel {
    ($name:ident, $features:literal, $tile:literal) => {
        pub(crate) mod $name {
            use std::arch::x86_64::*;

            /// Input rows per register tile.
            const TILE_ROWS: usize = $tile;

            /// The sum of a vector's 8 lanes.
            #[target_feature(enable = $features)]
            #[allow(dead_code)]
            pub(crate) unsafe fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                _mm_cvtss_f32(s)
            }

            /// Adds to `a0`/`a1` the lane-wise products over columns `k0..k1` (multiples of 8) of
            /// `R` rows of `x` (from row `i0`) with weight rows `w0` and `w1`.
            #[target_feature(enable = $features)]
            unsafe fn tile<const R: usize, const PREFETCH: bool>(
                pair: &Pair,
                i0: usize,
                a0: &mut [__m256],
                a1: &mut [__m256],
            ) {
                let Pair {
                    x,
                    k,
                    w0,
                    w1,
                    k0,
                    k1,
                    ahead,
                } = *pair;
                let mut r0 = [_mm256_setzero_ps(); R];
                let mut r1 = [_mm256_setzero_ps(); R];
                r0.copy_from_slice(&a0[..R]);
                r1.copy_from_slice(&a1[..R]);
                let xp = x.as_ptr().add(i0 * k);
                let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
                let mut kk = k0;
                // Columns before `ahead.switch` ask for `ahead.near` columns ahead in their own
                // rows; later ones for `ahead.far` (the same point of the rows read next).
                // Prefetches do not fault, so the end of the matrix needs no care.
                for (end, dist) in [(ahead.switch.clamp(k0, k1), ahead.near), (k1, ahead.far)] {
                    while kk < end {
                        if PREFETCH {
                            _mm_prefetch::<_MM_HINT_T1>(p0.wrapping_add(kk + dist) as *const i8);
                            _mm_prefetch::<_MM_HINT_T1>(p1.wrapping_add(kk + dist) as *const i8);
                        }
                        let v0 = _mm256_loadu_ps(p0.add(kk));
                        let v1 = _mm256_loadu_ps(p1.add(kk));
                        for r in 0..R {
                            let xv = _mm256_loadu_ps(xp.add(r * k + kk));
                            r0[r] = _mm256_fmadd_ps(xv, v0, r0[r]);
                            r1[r] = _mm256_fmadd_ps(xv, v1, r1[r]);
                        }
                        kk += 8;
                    }
                }
                a0[..R].copy_from_slice(&r0);
                a1[..R].copy_from_slice(&r1);
            }

            /// How far ahead (in columns) the first tile of a weight pair asks for the weights:
            /// about 4 KiB per stream, into L2. Without it, a step of 8 rows cost the weight read
            /// plus the arithmetic (the two did not overlap); with it, about 1.5x one row (measured
            /// on opt-2.7b-sized layers: 21 -> 14 ms a layer at 8 rows, 9.5 -> 9.1 ms at 1).
            /// Over rows of at least this many columns, the last 4 KiB of a pair ask for the
            /// start of the next pair: before, they asked for rows already read, and the next
            /// pair's second row started with demand misses (2560 x 2560 weights at 8 rows:
            /// 66 -> 52 ms a pass against 40 at 1).
            const PREFETCH_AHEAD: usize = 1024;

            /// What the first tile of a weight pair prefetches (see `tile`).
            #[derive(Clone, Copy)]
            struct Ahead {
                near: usize,
                switch: usize,
                far: usize,
            }

            /// Two weight rows and the columns of this chunk, dotted with tiles of input rows.
            #[derive(Clone, Copy)]
            struct Pair<'a> {
                x: &'a [f32],
                k: usize,
                w0: &'a [f32],
                w1: &'a [f32],
                k0: usize,
                k1: usize,
                ahead: Ahead,
            }

            /// Columns per chunk for `m` input rows: the whole row when a single tile holds them
            /// all, else enough to keep the rows' slice within 16 KiB of L1.
            fn pass_columns(m: usize, k: usize) -> usize {
                if m <= TILE_ROWS {
                    k
                } else {
                    ((16 * 1024 / 4 / m) / 8 * 8).max(64)
                }
            }

            /// Fills `out_block` ([rows of `w_block`, m]) with the dot products of `x`'s `m`
            /// rows (`[m, k]`) and `w_block`'s rows (at most `BLOCK_ROWS` of `k`).
            ///
            /// # Safety
            /// The CPU must have `$features` (the caller detects them).
            #[target_feature(enable = $features)]
            pub unsafe fn block(
                x: &[f32],
                m: usize,
                k: usize,
                w_block: &[f32],
                out_block: &mut [f32],
            ) {
                let rows = w_block.len() / k;
                assert!(rows <= super::BLOCK_ROWS && m <= super::SKINNY_ROWS);
                // The tiles read x without bounds checks.
                assert!(x.len() >= m * k && out_block.len() >= rows * m);
                // acc[j * m + i]: weight row j with input row i, one lane per column residue mod 8.
                // Only the `rows * m` in use are zeroed: this runs for every block of every decode
                // step.
                let mut store = [std::mem::MaybeUninit::<__m256>::uninit();
                    super::BLOCK_ROWS * super::SKINNY_ROWS];
                for a in &mut store[..rows * m] {
                    a.write(_mm256_setzero_ps());
                }
                // SAFETY: the first `rows * m` entries were just initialised.
                let acc =
                    std::slice::from_raw_parts_mut(store.as_mut_ptr().cast::<__m256>(), rows * m);
                // Where an odd last row's second sums go (they are dropped).
                let mut scratch = [_mm256_setzero_ps(); super::SKINNY_ROWS];
                let end8 = k / 8 * 8;
                let pass = pass_columns(m, k);
                let mut j = 0;
                while j < rows {
                    let mut k0 = 0;
                    while k0 < end8 {
                        let k1 = (k0 + pass).min(end8);
                        let w0 = &w_block[j * k..(j + 1) * k];
                        // An odd last row pairs with itself; its second sums go to the scratch.
                        let j1 = if j + 1 < rows { j + 1 } else { j };
                        let w1 = &w_block[j1 * k..(j1 + 1) * k];
                        let (lo, hi) = acc.split_at_mut((j + 1) * m);
                        let a0 = &mut lo[j * m..];
                        let a1 = if j1 != j {
                            &mut hi[..m]
                        } else {
                            &mut scratch[..m]
                        };
                        let ahead = if k >= PREFETCH_AHEAD {
                            // The pair is read whole, then the next pair (rows j + 2 and j + 3):
                            // near the end of the rows, ask for the start of those.
                            Ahead {
                                near: PREFETCH_AHEAD,
                                switch: k.saturating_sub(PREFETCH_AHEAD),
                                far: PREFETCH_AHEAD + k,
                            }
                        } else {
                            Ahead {
                                near: PREFETCH_AHEAD,
                                switch: k,
                                far: PREFETCH_AHEAD,
                            }
                        };
                        let pair = Pair {
                            x,
                            k,
                            w0,
                            w1,
                            k0,
                            k1,
                            ahead,
                        };
                        let mut i = 0;
                        while i < m {
                            let take = (m - i).min(TILE_ROWS);
                            let (t0, t1) = (&mut a0[i..], &mut a1[i..]);
                            // The first tile reads the weights from memory: it asks ahead for what
                            // comes next (later tiles find this pair in L1).
                            match (take, i == 0) {
                                (8, true) => tile::<8, true>(&pair, i, t0, t1),
                                (8, false) => tile::<8, false>(&pair, i, t0, t1),
                                (7, true) => tile::<7, true>(&pair, i, t0, t1),
                                (7, false) => tile::<7, false>(&pair, i, t0, t1),
                                (6, true) => tile::<6, true>(&pair, i, t0, t1),
                                (6, false) => tile::<6, false>(&pair, i, t0, t1),
                                (5, true) => tile::<5, true>(&pair, i, t0, t1),
                                (5, false) => tile::<5, false>(&pair, i, t0, t1),
                                (4, true) => tile::<4, true>(&pair, i, t0, t1),
                                (4, false) => tile::<4, false>(&pair, i, t0, t1),
                                (3, true) => tile::<3, true>(&pair, i, t0, t1),
                                (3, false) => tile::<3, false>(&pair, i, t0, t1),
                                (2, true) => tile::<2, true>(&pair, i, t0, t1),
                                (2, false) => tile::<2, false>(&pair, i, t0, t1),
                                (_, true) => tile::<1, true>(&pair, i, t0, t1),
                                (_, false) => tile::<1, false>(&pair, i, t0, t1),
                            }
                            i += take;
                        }
                        k0 = k1;
                    }
                    j += 2;
                }
                for j in 0..rows {
                    let w = &w_block[j * k..(j + 1) * k];
                    for i in 0..m {
                        let xr = &x[i * k..(i + 1) * k];
                        let mut tail = 0f32;
                        for c in end8..k {
                            tail += xr[c] * w[c];
                        }
                        out_block[j * m + i] = hsum(acc[j * m + i]) + tail;
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
decode_kernel!(avx2, "avx2,fma", 4);
// Measured on opt-2.7b-sized layers (examples/linear_bench, 8 rows): 127 -> 105 ms a pass of
// eight layers against 77-80 ms for one row; the extra registers let a tile take all 8 rows,
// so the weights stream once, in order, and the accumulators hide the FMA latency.
#[cfg(target_arch = "x86_64")]
decode_kernel!(avx512vl, "avx2,fma,avx512f,avx512vl", 8);

/// Asks the kernel to back `len` bytes at `ptr` (a fresh, untouched allocation) with 2 MiB
/// pages where it can: decode streams gigabytes of weights per step, and with 4 KiB pages the
/// hardware prefetchers stop at every page boundary. Advice only: failure changes nothing.
pub fn advise_huge_pages(ptr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (ptr as usize).div_ceil(PAGE) * PAGE;
        let end = (ptr as usize + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE changes no
            // contents and no mapping we rely on.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
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

    #[test]
    fn a_skinny_row_is_bit_identical_whatever_rows_are_beside_it() {
        let dev = Device::Cpu;
        // 2600 columns: several chunks of the multi-tile path, and a tail past the last 8.
        let w = Tensor::randn(0f32, 1.0, (37, 2601), &dev).unwrap();
        let lin = Linear::new(w, None).unwrap();
        let x = Tensor::randn(0f32, 1.0, (SKINNY_ROWS, 2601), &dev).unwrap();
        let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        let all = rows(&lin.forward(&x).unwrap());
        for m in [1, 3, 5, 8] {
            let part = rows(&lin.forward(&x.narrow(0, 2, m).unwrap()).unwrap());
            assert_eq!(part, all[2..2 + m].to_vec(), "{m} rows");
        }
    }

    /// The AVX-512VL build of the kernel (tiles of 8 rows) and the AVX2 one (tiles of 4) sum
    /// each lane in the same order: servers on either kind of CPU give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_kernel_builds_agree_bit_for_bit() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma") && has!("avx512f") && has!("avx512vl")) {
            eprintln!("skipped: this CPU lacks AVX-512VL, so only the AVX2 build can run");
            return;
        }
        let dev = Device::Cpu;
        let n = BLOCK_ROWS - 1;
        // Widths with and without a tail past the last 8, below and above the prefetch distance.
        for k in [7, 8, 1000, 1024, 2601] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let x = Tensor::randn(0f32, 1.0, (SKINNY_ROWS * k,), &dev).unwrap();
            let x = x.to_vec1::<f32>().unwrap();
            for m in 1..=SKINNY_ROWS {
                let x = &x[..m * k];
                let (mut narrow, mut wide) = (vec![0f32; n * m], vec![0f32; n * m]);
                // SAFETY: the features were checked above.
                unsafe {
                    avx2::block(x, m, k, &w, &mut narrow);
                    avx512vl::block(x, m, k, &w, &mut wide);
                }
                assert_eq!(narrow, wide, "{m} rows of {k}");
            }
        }
    }

    #[test]
    fn quantized_weights_stay_close_and_fall_back_by_width() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 512), &dev).unwrap();
        // Both paths: decode-sized inputs (quantised matmul) and larger ones (dequantised).
        for rows in [5, SKINNY_ROWS + 3] {
            let x = Tensor::randn(0f32, 1.0, (rows, 512), &dev).unwrap();
            let dense = Linear::new(w.clone(), None).unwrap().forward(&x).unwrap();
            for (q, expected, tol) in [
                (Quantization::Q8_0, GgmlDType::Q8_0, 0.01),
                (Quantization::Q4K, GgmlDType::Q4K, 0.12),
            ] {
                let lin = {
                    let _scope = QuantizeScope::new(Some(q));
                    Linear::new(w.clone(), None).unwrap()
                };
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
        // The scope ends with its value; widths that q4k cannot take fall back to q8_0, and
        // widths no format takes stay dense.
        assert_eq!(Linear::new(w.clone(), None).unwrap().quantized(), None);
        let _scope = QuantizeScope::new(Some(Quantization::Q4K));
        let narrow = Tensor::randn(0f32, 1.0, (8, 96), &dev).unwrap();
        assert_eq!(
            Linear::new(narrow, None).unwrap().quantized(),
            Some(GgmlDType::Q8_0)
        );
        let odd = Tensor::randn(0f32, 1.0, (8, 50), &dev).unwrap();
        assert_eq!(Linear::new(odd, None).unwrap().quantized(), None);
    }
}
