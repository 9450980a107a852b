//! q8_0 weights with our own kernels. ggml's q8_0 stores each run of 32 weights as an f16 scale
//! and 32 signed bytes (34 bytes, 1.0625 per weight). candle's quantised matmul is fast only
//! through a repacked copy of the weights that it builds on first use and keeps beside them,
//! which doubles their memory; instead, where the CPU has AVX-512 VNNI the weights are kept only
//! packed in column panels (`q8_panels.rs`) and every input size is multiplied in integers.
//! Elsewhere they keep their row layout: decode-shaped inputs (up to 16 rows) stream the blocks
//! once, widening each to f32 in registers, and larger inputs (prefill, the vision encoder, which
//! are compute-bound) multiply by the weights dequantised for the call.

use candle_core::{DType, Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;

const QK: usize = 32;
/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;

use super::q8_panels::PanelMatrix;

#[derive(Debug)]
pub struct Q8Matrix {
    /// [n, k] signed bytes (empty when packed).
    qs: Vec<i8>,
    /// [n, k / 32]: each block's scale, widened from ggml's f16 once at load (the kernels
    /// would otherwise convert it on every use). Empty when packed.
    scales: Vec<f32>,
    /// The same weights in column panels, the only copy, where the CPU runs that kernel.
    panels: Option<PanelMatrix>,
    n: usize,
    k: usize,
}

impl Q8Matrix {
    /// Quantises an [n, k] weight (k a multiple of 32) as ggml does (candle's quantiser), packed
    /// in panels where this CPU has AVX-512 VNNI.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        Ok(Self::packed(Self::quantize_rows_layout(weight)?))
    }

    /// [`Self::quantize`] of the [n, k] values `w` (a weight mapped from the checkpoint);
    /// `None` when k is not a multiple of 32 or `w` is not n x k.
    pub fn quantize_slice(w: &[f32], n: usize, k: usize) -> Option<Self> {
        (k.is_multiple_of(QK) && w.len() == n * k).then(|| Self::packed(Self::rows_of(w, n, k)))
    }

    fn packed(rows: Self) -> Self {
        if !PanelMatrix::available() {
            return rows;
        }
        let panels = PanelMatrix::pack(&rows.qs, &rows.scales, rows.n, rows.k);
        Self {
            qs: Vec::new(),
            scales: Vec::new(),
            panels: Some(panels),
            n: rows.n,
            k: rows.k,
        }
    }

    /// The weights in column panels, where this CPU runs that kernel.
    pub fn panels(&self) -> Option<&PanelMatrix> {
        self.panels.as_ref()
    }

    /// Quantised, in the row layout whatever the CPU: ggml's `quantize_row_q8_0` (d = max|x| /
    /// 127 kept as f16, q = round(x / d) computed with the f32 d), across threads, on the weight's
    /// own storage. The same bytes and scales as candle's quantiser (unit test).
    pub fn quantize_rows_layout(weight: &Tensor) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        if k % QK != 0 {
            candle_core::bail!("q8_0 needs an input width that is a multiple of 32, got {k}");
        }
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let quantize = |w: &[f32]| Self::rows_of(w, n, k);
        match super::with_f32_slice(&weight, quantize)? {
            Some(q) => Ok(q),
            None => Ok(quantize(&weight.flatten_all()?.to_vec1::<f32>()?)),
        }
    }

    /// The row layout of `w` [n, k], k a multiple of 32.
    fn rows_of(w: &[f32], n: usize, k: usize) -> Self {
        let mut qs = vec![0i8; n * k];
        super::memory::advise_huge_pages(qs.as_ptr() as *const u8, n * k);
        let mut scales = vec![0f32; n * k / QK];
        qs.par_chunks_mut(k)
            .zip(scales.par_chunks_mut(k / QK))
            .zip(w.par_chunks(k))
            .for_each(|((q, d), w)| {
                for ((qb, db), wb) in q.chunks_mut(QK).zip(d.iter_mut()).zip(w.chunks(QK)) {
                    let amax = super::abs_max(wb);
                    let scale = amax / 127.0;
                    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                    super::scale_round(wb, inv, qb);
                    *db = f16::from_f32(scale).to_f32();
                }
            });
        Self {
            qs,
            scales,
            panels: None,
            n,
            k,
        }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// The f32 weights [n, k], dequantised across threads.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        if let Some(p) = &self.panels {
            return Tensor::from_vec(p.dequantize(), (self.n, self.k), device);
        }
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(QK * 1024)
            .zip(self.qs.par_chunks(QK * 1024))
            .zip(self.scales.par_chunks(1024))
            .for_each(|((dst, qs), scales)| {
                for ((d, q), &scale) in dst.chunks_mut(QK).zip(qs.chunks(QK)).zip(scales) {
                    for (o, &q) in d.iter_mut().zip(q) {
                        *o = scale * f32::from(q);
                    }
                }
            });
        Tensor::from_vec(out, (self.n, self.k), device)
    }

    /// `x [m, k] @ W^T -> [m, n]` for small m, reading the quantised weights once. With
    /// AVX-512 VNNI the inputs are quantised to q8_0 as well (as ggml does) and blocks are
    /// multiplied in integers; otherwise the weights are widened to f32.
    pub fn skinny(&self, x: &[f32], m: usize) -> Vec<f32> {
        if let Some(p) = &self.panels {
            return p.matmul(x, m);
        }
        #[cfg(target_arch = "x86_64")]
        {
            if vnni::available() {
                return self.skinny_vnni(x, m);
            }
        }
        self.skinny_f32(x, m)
    }

    #[cfg(target_arch = "x86_64")]
    fn skinny_vnni(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let (xq, xd) = quantize_rows(x, m, k);
        let mut out_t = vec![0f32; n * m];
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .zip(self.qs.par_chunks(ROWS_PER_TASK * k))
            .zip(self.scales.par_chunks(ROWS_PER_TASK * k / QK))
            .for_each(|((out_block, qs), scales)| {
                // SAFETY: `available()` checked the features.
                unsafe { vnni::block(&xq, &xd, m, k, qs, scales, out_block) }
            });
        transpose(&out_t, n, m)
    }

    fn skinny_f32(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut out_t = vec![0f32; n * m];
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .zip(self.qs.par_chunks(ROWS_PER_TASK * k))
            .zip(self.scales.par_chunks(ROWS_PER_TASK * k / QK))
            .for_each(|((out_block, qs), scales)| block(x, m, k, qs, scales, out_block));
        transpose(&out_t, n, m)
    }
}

/// [n, m] -> [m, n].
fn transpose(out_t: &[f32], n: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

/// Each row of `x` [m, k] as q8_0 blocks: bytes and one f32 scale per 32 values (ggml's
/// `quantize_row_q8_0`: d = max|x| / 127, q = round(x / d)).
#[cfg(target_arch = "x86_64")]
fn quantize_rows(x: &[f32], m: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * k / QK];
    for ((qb, xb), db) in q.chunks_mut(QK).zip(x.chunks(QK)).zip(d.iter_mut()) {
        let amax = super::abs_max(xb);
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        super::scale_round(xb, inv, qb);
        *db = scale;
    }
    (q, d)
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    //! Blocks of 32 multiplied in integers: |w| (u8) times x·sign(w) (i8) summed by
    //! `vpdpbusd` into 8 lanes, then scaled by both blocks' scales in f32.
    use super::QK;
    use crate::kernels::cpu::decode::avx2::hsum;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    /// Weight rows processed together. One: each task's rows then form a single sequential
    /// stream, which the prefetchers follow (4 interleaved rows measured 40% slower).
    const W: usize = 1;

    #[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const R: usize>(
        xq: &[i8],
        xd: &[f32],
        k: usize,
        i0: usize,
        w: [&[i8]; W],
        s: [&[f32]; W],
    ) -> [[f32; R]; W] {
        let nb = k / QK;
        let mut acc = [[_mm256_setzero_ps(); R]; W];
        let zero = _mm256_setzero_si256();
        for b in 0..nb {
            let mut v = [zero; W];
            let mut u = [zero; W];
            for t in 0..W {
                v[t] = _mm256_loadu_si256(w[t].as_ptr().add(b * QK) as *const __m256i);
                u[t] = _mm256_abs_epi8(v[t]);
            }
            for r in 0..R {
                let row = i0 + r;
                let xv = _mm256_loadu_si256(xq.as_ptr().add(row * k + b * QK) as *const __m256i);
                let dx = xd[row * nb + b];
                for t in 0..W {
                    let p = _mm256_dpbusd_epi32(zero, u[t], _mm256_sign_epi8(xv, v[t]));
                    acc[t][r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(p),
                        _mm256_set1_ps(dx * s[t][b]),
                        acc[t][r],
                    );
                }
            }
        }
        let mut out = [[0f32; R]; W];
        for t in 0..W {
            for r in 0..R {
                out[t][r] = hsum(acc[t][r]);
            }
        }
        out
    }

    /// Input rows per tile: AVX-512VL's 32 vector registers hold 8 accumulators and what each
    /// needs, and 8 independent FMA chains hide the FMA latency (tiles of 2 waited on it).
    const TILE_ROWS: usize = 8;

    /// A tile's sums in `TILE_ROWS` slots per weight row (the first `R` filled).
    fn pad<const R: usize>(o: [[f32; R]; W]) -> [[f32; TILE_ROWS]; W] {
        std::array::from_fn(|t| std::array::from_fn(|r| if r < R { o[t][r] } else { 0.0 }))
    }

    #[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
    pub unsafe fn block(
        xq: &[i8],
        xd: &[f32],
        m: usize,
        k: usize,
        qs: &[i8],
        scales: &[f32],
        out_block: &mut [f32],
    ) {
        let rows = qs.len() / k;
        let nb = k / QK;
        let mut j = 0;
        while j < rows {
            // Rows past the end repeat the last one; their results are dropped.
            let js: [usize; W] = std::array::from_fn(|t| (j + t).min(rows - 1));
            let w: [&[i8]; W] = std::array::from_fn(|t| &qs[js[t] * k..(js[t] + 1) * k]);
            let s: [&[f32]; W] = std::array::from_fn(|t| &scales[js[t] * nb..(js[t] + 1) * nb]);
            let mut i = 0;
            while i < m {
                let take = (m - i).min(TILE_ROWS);
                let mut put = |o: &[[f32; TILE_ROWS]; W]| {
                    for t in 0..W {
                        if j + t < rows {
                            for r in 0..take {
                                out_block[(j + t) * m + i + r] = o[t][r];
                            }
                        }
                    }
                };
                match take {
                    8 => put(&tile::<8>(xq, xd, k, i, w, s)),
                    7 => put(&pad(tile::<7>(xq, xd, k, i, w, s))),
                    6 => put(&pad(tile::<6>(xq, xd, k, i, w, s))),
                    5 => put(&pad(tile::<5>(xq, xd, k, i, w, s))),
                    4 => put(&pad(tile::<4>(xq, xd, k, i, w, s))),
                    3 => put(&pad(tile::<3>(xq, xd, k, i, w, s))),
                    2 => put(&pad(tile::<2>(xq, xd, k, i, w, s))),
                    _ => put(&pad(tile::<1>(xq, xd, k, i, w, s))),
                }
                i += take;
            }
            j += W;
        }
    }
}

/// Fills `out_block` ([rows of qs, m]) with the dot products of `x`'s rows and the weights'.
fn block(x: &[f32], m: usize, k: usize, qs: &[i8], scales: &[f32], out_block: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time.
            unsafe { avx2::block(x, m, k, qs, scales, out_block) };
            return;
        }
    }
    for (j, o) in out_block.chunks_mut(m).enumerate() {
        for (i, slot) in o.iter_mut().enumerate() {
            let xr = &x[i * k..(i + 1) * k];
            let mut sum = 0f32;
            for t in 0..k {
                sum += xr[t] * (scales[(j * k + t) / QK] * f32::from(qs[j * k + t]));
            }
            *slot = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Tiles of up to 4 input rows x 2 weight rows: each 8 weights are widened to f32 and
    //! scaled once, then serve every input row of the tile.
    use super::QK;
    use crate::kernels::cpu::decode::avx2::hsum;
    use std::arch::x86_64::*;

    /// 8 signed bytes at `p`, as f32, times `scale`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn widen(p: *const i8, scale: __m256) -> __m256 {
        let bytes = _mm_loadl_epi64(p as *const __m128i);
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize>(
        x: &[f32],
        k: usize,
        i0: usize,
        w0: &[i8],
        w1: &[i8],
        s0: &[f32],
        s1: &[f32],
    ) -> ([f32; R], [f32; R]) {
        let mut a0 = [_mm256_setzero_ps(); R];
        let mut a1 = [_mm256_setzero_ps(); R];
        let xp = x.as_ptr().add(i0 * k);
        for b in 0..k / QK {
            let (b0, b1) = (w0.as_ptr().add(b * QK), w1.as_ptr().add(b * QK));
            let (sv0, sv1) = (_mm256_set1_ps(s0[b]), _mm256_set1_ps(s1[b]));
            for part in 0..QK / 8 {
                let v0 = widen(b0.add(part * 8), sv0);
                let v1 = widen(b1.add(part * 8), sv1);
                let kk = b * QK + part * 8;
                for r in 0..R {
                    let xv = _mm256_loadu_ps(xp.add(r * k + kk));
                    a0[r] = _mm256_fmadd_ps(xv, v0, a0[r]);
                    a1[r] = _mm256_fmadd_ps(xv, v1, a1[r]);
                }
            }
        }
        let mut o0 = [0f32; R];
        let mut o1 = [0f32; R];
        for r in 0..R {
            o0[r] = hsum(a0[r]);
            o1[r] = hsum(a1[r]);
        }
        (o0, o1)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block(
        x: &[f32],
        m: usize,
        k: usize,
        qs: &[i8],
        scales: &[f32],
        out_block: &mut [f32],
    ) {
        let rows = qs.len() / k;
        let nb = k / QK;
        let mut j = 0;
        while j < rows {
            let j1 = if j + 1 < rows { j + 1 } else { j };
            let (w0, w1) = (&qs[j * k..(j + 1) * k], &qs[j1 * k..(j1 + 1) * k]);
            let (s0, s1) = (
                &scales[j * nb..(j + 1) * nb],
                &scales[j1 * nb..(j1 + 1) * nb],
            );
            let mut i = 0;
            while i < m {
                let take = (m - i).min(4);
                let mut put = |o0: &[f32], o1: &[f32]| {
                    for r in 0..take {
                        out_block[j * m + i + r] = o0[r];
                        if j1 != j {
                            out_block[j1 * m + i + r] = o1[r];
                        }
                    }
                };
                match take {
                    4 => {
                        let (a, b) = tile::<4>(x, k, i, w0, w1, s0, s1);
                        put(&a, &b)
                    }
                    3 => {
                        let (a, b) = tile::<3>(x, k, i, w0, w1, s0, s1);
                        put(&a, &b)
                    }
                    2 => {
                        let (a, b) = tile::<2>(x, k, i, w0, w1, s0, s1);
                        put(&a, &b)
                    }
                    _ => {
                        let (a, b) = tile::<1>(x, k, i, w0, w1, s0, s1);
                        put(&a, &b)
                    }
                }
                i += take;
            }
            j += 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    #[test]
    fn kernels_agree_with_candles_dequantised_weights() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (45, 96), &dev).unwrap();
        let q = Q8Matrix::quantize_rows_layout(&w).unwrap();
        let candle = QTensor::quantize(&w, GgmlDType::Q8_0)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        let ours = q.dequantize(&dev).unwrap();
        let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = candle.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        // 13 rows: a tile of 8 and one of 5 in the integer kernel.
        for m in [1usize, 3, 4, 7, 13] {
            let x = Tensor::randn(0f32, 1.0, (m, 96), &dev).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let got = q.skinny_f32(&xs, m);
            let want: Vec<f32> = x
                .matmul(&candle.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-3, "m {m}: {g} vs {w}");
            }
            // A row's result does not depend on the rows beside it.
            let alone = q.skinny_f32(&xs[..96], 1);
            assert_eq!(&got[..45], &alone[..]);
            // The integer kernel (inputs quantised too) stays close, row-independent as well.
            let int = q.skinny(&xs, m);
            let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
            let err = int
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            assert!(err / norm < 0.02, "m {m}: relative error {}", err / norm);
            for r in 0..m {
                let alone = q.skinny(&xs[r * 96..(r + 1) * 96], 1);
                assert_eq!(&int[r * 45..(r + 1) * 45], &alone[..], "m {m}, row {r}");
            }
        }
    }

    #[test]
    fn the_packed_layout_holds_the_same_weights() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (45, 96), &dev).unwrap();
        let rows = Q8Matrix::quantize_rows_layout(&w).unwrap();
        let packed = Q8Matrix::quantize(&w).unwrap();
        let values = |q: &Q8Matrix| -> Vec<f32> {
            let t = q.dequantize(&dev).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        assert_eq!(values(&rows), values(&packed));
        assert_eq!(packed.panels().is_some(), PanelMatrix::available());
    }
}
