//! 8-bit weights packed in column panels for AVX-512 VNNI: one matrix product for every input
//! size (decode rows, prefill, the vision encoder) in integers. Two formats share the kernel:
//! ggml's q8_0 (blocks of 32 weights, one scale each; inputs quantised to q8_0 per row) and
//! per-channel int8 (one scale per output feature over the whole input width; inputs quantised
//! with one scale per row), whose integer sums run over the whole width with no per-block
//! float work in between: about 2x the q8_0 rate, at a coarser quantisation.
//!
//! Layout: 16 output features form a panel; for each 4 consecutive inputs a panel holds 64 bytes
//! (feature 0's 4 weights, feature 1's, ...), so one `vpdpbusd` multiplies 4 inputs of one row by
//! 16 features and adds them into 16 int32 lanes. `vpdpbusd` takes one operand unsigned: the
//! weights are stored plus 128 (the sign bit flipped), and the row's block sum times -128 seeds
//! each block's accumulator, which makes the integer dot product exact. Each block's integer sum
//! is then scaled by (weight scale x input scale) into an f32 accumulator. A row's result does
//! not depend on the other rows or on the tile it was computed in, and the scalar reference
//! below computes the same operations in the same order, so the two agree bit for bit.

use rayon::prelude::*;

const QK: usize = 32;
/// Output features per panel: one zmm of int32 lanes.
const LANES: usize = 16;
/// A tile: `TILE_ROWS` input rows against `TILE_PANELS` panels, 24 int32 accumulators and the
/// 4 panels' weights in the 32 registers.
const TILE_ROWS: usize = 6;
const TILE_PANELS: usize = 4;
/// Work per task: as many input rows as keep their bytes within `BLOCK_BYTES` (they stay in
/// L2 while the task's panels pass over them) against `TILE_PANELS` panels, each panel's
/// weights reused by every tile of those rows. One pass of each panel over all rows instead
/// re-read the whole input from L3 per panel once it outgrew L2 (k = 3072: 1.3x f32 against
/// 2.0-2.2x blocked; BENCHMARKS.md).
const BLOCK_BYTES: usize = 256 * 1024;

fn block_rows(k: usize) -> usize {
    (BLOCK_BYTES / k).clamp(TILE_ROWS, 512) / TILE_ROWS * TILE_ROWS
}

#[derive(Debug)]
pub struct PanelMatrix {
    /// [panels][k / 4][16][4]: weight + 128.
    packed: Vec<u8>,
    /// [panels][k / block][16]: each block's scale (0 for the padding features of the last
    /// panel).
    scales: Vec<f32>,
    /// Inputs per scale: 32 (q8_0) or k (per channel).
    block: usize,
    n: usize,
    k: usize,
}

/// Inputs quantised per row in blocks of the weights' block: bytes [m, k], scales
/// [m, k / block], and -128 x each block's byte sum (the correction for the weights' +128).
struct Inputs {
    q: Vec<i8>,
    d: Vec<f32>,
    seed: Vec<i32>,
}

/// ggml's `quantize_row_q8_0` in blocks of `block`: d = max|x| / 127, q = round(x / d); rows
/// in parallel.
fn quantize_inputs(x: &[f32], k: usize, block: usize) -> Inputs {
    let blocks = x.len() / block;
    let (mut q, mut d, mut seed) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
    debug_assert_eq!(x.len() % k, 0);
    q.par_chunks_mut(k)
        .zip(x.par_chunks(k))
        .zip(d.par_chunks_mut(k / block))
        .zip(seed.par_chunks_mut(k / block))
        .for_each(|(((q, x), d), seed)| quantize_row(x, block, q, d, seed));
    Inputs { q, d, seed }
}

fn quantize_row(x: &[f32], block: usize, q: &mut [i8], d: &mut [f32], seed: &mut [i32]) {
    for (((qb, xb), db), sb) in q
        .chunks_mut(block)
        .zip(x.chunks(block))
        .zip(d.iter_mut())
        .zip(seed.iter_mut())
    {
        let amax = super::abs_max(xb);
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let sum = super::scale_round(xb, inv, qb);
        *db = scale;
        *sb = -128 * sum;
    }
}

impl PanelMatrix {
    /// Whether this CPU runs the packed kernel.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Packs q8_0 weights given as row-major bytes [n, k] and block scales [n, k / 32].
    pub fn pack(qs: &[i8], scales: &[f32], n: usize, k: usize) -> Self {
        Self::pack_blocks(qs, scales, n, k, QK)
    }

    /// Quantises f32 weights [n, k] (k a multiple of 4) per output feature: d = max|w| / 127,
    /// q = round(w / d).
    pub fn quantize_per_channel(w: &[f32], n: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(4) && w.len() == n * k);
        let mut qs = vec![0i8; n * k];
        let mut scales = vec![0f32; n];
        qs.par_chunks_mut(k)
            .zip(w.par_chunks(k))
            .zip(scales.par_iter_mut())
            .for_each(|((q, w), d)| {
                let amax = super::abs_max(w);
                *d = amax / 127.0;
                let inv = if *d != 0.0 { 1.0 / *d } else { 0.0 };
                super::scale_round(w, inv, q);
            });
        Self::pack_blocks(&qs, &scales, n, k, k)
    }

    fn pack_blocks(qs: &[i8], scales: &[f32], n: usize, k: usize, block: usize) -> Self {
        assert!(block.is_multiple_of(4) && k.is_multiple_of(block));
        assert!(qs.len() == n * k && scales.len() == n * k / block);
        let panels = n.div_ceil(LANES);
        let (quads, nb) = (k / 4, k / block);
        let mut packed = vec![128u8; panels * quads * LANES * 4];
        let mut panel_scales = vec![0f32; panels * nb * LANES];
        packed
            .par_chunks_mut(quads * LANES * 4)
            .zip(panel_scales.par_chunks_mut(nb * LANES))
            .enumerate()
            .for_each(|(p, (dst, sdst))| {
                for lane in 0..LANES.min(n - p * LANES) {
                    let c = p * LANES + lane;
                    let row = &qs[c * k..(c + 1) * k];
                    for (t, &w) in row.iter().enumerate() {
                        dst[((t / 4) * LANES + lane) * 4 + t % 4] = (w as u8) ^ 0x80;
                    }
                    for b in 0..nb {
                        sdst[b * LANES + lane] = scales[c * nb + b];
                    }
                }
            });
        Self {
            packed,
            scales: panel_scales,
            block,
            n,
            k,
        }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Weight (as stored, minus 128) and scale of feature `c`, input `t`.
    fn weight(&self, c: usize, t: usize) -> (i32, f32) {
        let (p, lane) = (c / LANES, c % LANES);
        let byte = self.packed[((p * (self.k / 4) + t / 4) * LANES + lane) * 4 + t % 4];
        let scale = self.scales[(p * (self.k / self.block) + t / self.block) * LANES + lane];
        (i32::from(byte) - 128, scale)
    }

    /// The f32 weights [n, k] (each byte times its block's scale), row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k).enumerate().for_each(|(c, row)| {
            for (t, o) in row.iter_mut().enumerate() {
                let (w, s) = self.weight(c, t);
                *o = s * w as f32;
            }
        });
        out
    }

    /// `x [m, k] @ W^T -> [m, n]`, the inputs quantised per row in the weights' blocks.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_then(x, m, &Epilogue::default())
    }

    /// [`Self::matmul`] with `epilogue` applied to each output row as it is stored (a bias, an
    /// activation), while the values are still in cache: the same bits as applying it after.
    pub fn matmul_then(&self, x: &[f32], m: usize, epilogue: &Epilogue) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "input size");
        if let Some(bias) = epilogue.bias {
            assert_eq!(bias.len(), self.n, "bias size");
        }
        let inputs = quantize_inputs(x, self.k, self.block);
        #[cfg(target_arch = "x86_64")]
        {
            if Self::available() {
                return self.matmul_vnni(&inputs, m, epilogue);
            }
        }
        let mut out = self.matmul_reference(&inputs, m);
        for row in out.chunks_mut(self.n) {
            epilogue.apply(row, 0);
        }
        out
    }

    /// The scalar reference: per output, per block, the exact integer sum seeded with the
    /// correction, then `acc = fma(sum, weight scale x input scale, acc)`.
    fn matmul_reference(&self, inputs: &Inputs, m: usize) -> Vec<f32> {
        let (n, k, block) = (self.n, self.k, self.block);
        let nb = k / block;
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut acc = 0f32;
                for b in 0..nb {
                    let mut sum = inputs.seed[r * nb + b];
                    let mut scale = 0f32;
                    for t in b * block..(b + 1) * block {
                        let (w, s) = self.weight(c, t);
                        sum += (w + 128) * i32::from(inputs.q[r * k + t]);
                        scale = s;
                    }
                    acc = (sum as f32).mul_add(scale * inputs.d[r * nb + b], acc);
                }
                out[r * n + c] = acc;
            }
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    fn matmul_vnni(&self, inputs: &Inputs, m: usize, epilogue: &Epilogue) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let panels = n.div_ceil(LANES);
        let panel_bytes = (k / 4) * LANES * 4;
        let panel_scales = (k / self.block) * LANES;
        let rows_per_task = block_rows(k);
        let tasks: Vec<(usize, usize)> = (0..m.div_ceil(rows_per_task))
            .flat_map(|rb| (0..panels.div_ceil(TILE_PANELS)).map(move |pg| (rb, pg)))
            .collect();
        // Not zeroed: the tasks store every element, each task its own rows x columns.
        let mut out: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(m * n);
        out.resize_with(m * n, std::mem::MaybeUninit::uninit);
        let dst = Disjoint(out.as_mut_ptr().cast::<f32>());
        tasks.par_iter().for_each(|&(rb, pg)| {
            let rows = rb * rows_per_task..m.min((rb + 1) * rows_per_task);
            let group = pg * TILE_PANELS..panels.min((pg + 1) * TILE_PANELS);
            let (c0, width) = (
                pg * TILE_PANELS * LANES,
                (n - pg * TILE_PANELS * LANES).min(TILE_PANELS * LANES),
            );
            let w: Vec<&[u8]> = group
                .clone()
                .map(|p| &self.packed[p * panel_bytes..(p + 1) * panel_bytes])
                .collect();
            let s: Vec<&[f32]> = group
                .map(|p| &self.scales[p * panel_scales..(p + 1) * panel_scales])
                .collect();
            let mut store = |row: usize, values: &[f32]| {
                // SAFETY: `row` < m and c0 + width <= n: inside `out`; no other task writes
                // this row's columns c0..c0 + width (tasks split rows x panel groups).
                let seg = unsafe { std::slice::from_raw_parts_mut(dst.at(row * n + c0), width) };
                seg.copy_from_slice(&values[..width]);
                epilogue.apply(seg, c0);
            };
            // SAFETY: `available()` checked the features; the slices hold what the tiles read
            // (k / 4 quads of 64 bytes, k / block blocks of 16 scales, the rows' inputs).
            unsafe { vnni::panels(inputs, rows, k, self.block, &w, &s, &mut store) }
        });
        let mut out = std::mem::ManuallyDrop::new(out);
        // SAFETY: every element was stored above; MaybeUninit<f32> has f32's layout, and the
        // pointer, length and capacity come from a Vec of that layout.
        unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), out.len(), out.capacity()) }
    }
}

/// The output buffer, shared by tasks that each write their own disjoint part of it.
#[derive(Clone, Copy)]
struct Disjoint(*mut f32);
// SAFETY: the tasks write disjoint elements (see `matmul_vnni`), and the buffer outlives them.
unsafe impl Send for Disjoint {}
unsafe impl Sync for Disjoint {}
impl Disjoint {
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer.
        unsafe { self.0.add(i) }
    }
}

/// What is done to a product's output row as it is stored: `+ bias`, then the exact GELU.
/// Each is the same f32 operation as the separate pass it replaces, so the bits are the same.
#[derive(Debug, Default, Clone, Copy)]
pub struct Epilogue<'a> {
    /// [n]: added to every row.
    pub bias: Option<&'a [f32]>,
    pub gelu: bool,
}

impl Epilogue<'_> {
    /// Applies to `seg`, the output columns `c0..c0 + seg.len()` of one row.
    fn apply(&self, seg: &mut [f32], c0: usize) {
        if let Some(bias) = self.bias {
            for (y, b) in seg.iter_mut().zip(&bias[c0..]) {
                *y += b;
            }
        }
        if self.gelu {
            super::gelu::gelu_in_place(seg);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Inputs, LANES, TILE_PANELS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Rows `i0..i0 + R` against `TILE_PANELS` panels: [R][panel][16] outputs. Each quad of
    /// inputs loads the panels' 64 weight bytes once and broadcasts each row's 4 bytes once, so
    /// R x TILE_PANELS `vpdpbusd` share R + TILE_PANELS loads (one panel at a time, 8 rows
    /// issued 9 loads for 8 products and ran at about half the VNNI rate).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize>(
        inputs: &Inputs,
        k: usize,
        block: usize,
        i0: usize,
        w: [&[u8]; TILE_PANELS],
        s: [&[f32]; TILE_PANELS],
    ) -> [[[f32; LANES]; TILE_PANELS]; R] {
        let nb = k / block;
        let mut acc = [[_mm512_setzero_ps(); TILE_PANELS]; R];
        let xq = inputs.q.as_ptr().add(i0 * k);
        for b in 0..nb {
            let mut sum: [[__m512i; TILE_PANELS]; R] = std::array::from_fn(|r| {
                [_mm512_set1_epi32(inputs.seed[(i0 + r) * nb + b]); TILE_PANELS]
            });
            for quad in 0..block / 4 {
                let at = (b * block / 4 + quad) * 64;
                let wv: [__m512i; TILE_PANELS] =
                    std::array::from_fn(|p| _mm512_loadu_si512(w[p].as_ptr().add(at) as *const _));
                for (r, sr) in sum.iter_mut().enumerate() {
                    let x4 = (xq.add(r * k + b * block + quad * 4) as *const i32).read_unaligned();
                    let xv = _mm512_set1_epi32(x4);
                    for p in 0..TILE_PANELS {
                        sr[p] = _mm512_dpbusd_epi32(sr[p], wv[p], xv);
                    }
                }
            }
            for p in 0..TILE_PANELS {
                let sw = _mm512_loadu_ps(s[p].as_ptr().add(b * LANES));
                for r in 0..R {
                    let scale = _mm512_mul_ps(sw, _mm512_set1_ps(inputs.d[(i0 + r) * nb + b]));
                    acc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][p]), scale, acc[r][p]);
                }
            }
        }
        let mut out = [[[0f32; LANES]; TILE_PANELS]; R];
        for r in 0..R {
            for p in 0..TILE_PANELS {
                _mm512_storeu_ps(out[r][p].as_mut_ptr(), acc[r][p]);
            }
        }
        out
    }

    /// Input rows `rows` against the panels `w` / `s` (up to `TILE_PANELS`), in tiles of up to
    /// `TILE_ROWS` rows; `store(row, values)` receives each row's [panel][16] results. A group
    /// of fewer panels repeats its last one in the unused slots, whose results the caller
    /// drops.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn panels(
        inputs: &Inputs,
        rows: std::ops::Range<usize>,
        k: usize,
        block: usize,
        w: &[&[u8]],
        s: &[&[f32]],
        store: &mut impl FnMut(usize, &[f32]),
    ) {
        let used = w.len();
        let w: [&[u8]; TILE_PANELS] = std::array::from_fn(|p| w[p.min(used - 1)]);
        let s: [&[f32]; TILE_PANELS] = std::array::from_fn(|p| s[p.min(used - 1)]);
        let mut i = rows.start;
        while i < rows.end {
            let take = (rows.end - i).min(TILE_ROWS);
            let mut put = |tile: &[[[f32; LANES]; TILE_PANELS]]| {
                for (r, row) in tile.iter().enumerate() {
                    store(i + r, row.as_flattened());
                }
            };
            match take {
                6 => put(&tile::<6>(inputs, k, block, i, w, s)),
                5 => put(&tile::<5>(inputs, k, block, i, w, s)),
                4 => put(&tile::<4>(inputs, k, block, i, w, s)),
                3 => put(&tile::<3>(inputs, k, block, i, w, s)),
                2 => put(&tile::<2>(inputs, k, block, i, w, s)),
                _ => put(&tile::<1>(inputs, k, block, i, w, s)),
            }
            i += take;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights and inputs from a fixed generator (no dependency on candle's RNG).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn quantized(n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
        let w = values(n * k, 7);
        let mut qs = vec![0i8; n * k];
        let mut scales = vec![0f32; n * k / QK];
        for ((q, x), d) in qs.chunks_mut(QK).zip(w.chunks(QK)).zip(scales.iter_mut()) {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            *d = amax / 127.0;
            for (o, v) in q.iter_mut().zip(x) {
                *o = (v / *d).round() as i8;
            }
        }
        // One block of zeros (scale 0), as ggml stores an all-zero block.
        qs[..QK].fill(0);
        scales[0] = 0.0;
        (qs, scales)
    }

    /// |got - x W^T| / |x W^T| over the whole [m, n] output, W [n, k] in f32.
    fn relative_error(got: &[f32], x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize)) -> f32 {
        let (mut err, mut norm) = (0f32, 0f32);
        for r in 0..m {
            for c in 0..n {
                let exact: f32 = (0..k).map(|t| x[r * k + t] * w[c * k + t]).sum();
                err += (got[r * n + c] - exact).powi(2);
                norm += exact * exact;
            }
        }
        (err / norm).sqrt()
    }

    #[test]
    fn packing_keeps_every_weight_and_scale() {
        // 37 features: two full panels and a partial one.
        let (n, k) = (37, 96);
        let (qs, scales) = quantized(n, k);
        let p = PanelMatrix::pack(&qs, &scales, n, k);
        let deq = p.dequantize();
        for c in 0..n {
            for t in 0..k {
                let want = scales[c * (k / QK) + t / QK] * f32::from(qs[c * k + t]);
                assert_eq!(deq[c * k + t], want, "feature {c}, input {t}");
            }
        }
    }

    #[test]
    fn the_kernel_equals_the_scalar_reference_bit_for_bit_and_rows_are_independent() {
        let (n, k) = (37, 128);
        let (qs, scales) = quantized(n, k);
        let p = PanelMatrix::pack(&qs, &scales, n, k);
        let x = values(19 * k, 3);
        for m in [1usize, 2, 7, 8, 9, 19] {
            let x = &x[..m * k];
            let got = p.matmul(x, m);
            let want = p.matmul_reference(&quantize_inputs(x, k, QK), m);
            assert_eq!(got, want, "m {m}");
            for r in 0..m {
                let alone = p.matmul(&x[r * k..(r + 1) * k], 1);
                assert_eq!(&got[r * n..(r + 1) * n], &alone[..], "m {m}, row {r}");
            }
        }
    }

    #[test]
    fn per_channel_int8_equals_its_reference_and_stays_close_to_f32() {
        let (n, k, m) = (37, 256, 11);
        let w = values(n * k, 5);
        let p = PanelMatrix::quantize_per_channel(&w, n, k);
        let x = values(m * k, 9);
        let got = p.matmul(&x, m);
        assert_eq!(got, p.matmul_reference(&quantize_inputs(&x, k, k), m));
        for r in 0..m {
            assert_eq!(
                &got[r * n..(r + 1) * n],
                &p.matmul(&x[r * k..(r + 1) * k], 1)[..]
            );
        }
        let err = relative_error(&got, &x, &w, (m, n, k));
        assert!(err < 0.02, "relative error {err}");
    }

    #[test]
    fn the_epilogue_gives_the_bits_of_the_separate_passes() {
        // 70 features: one full group of 4 panels and a group using 1 of its 4 slots.
        let (n, k, m) = (70, 128, 13);
        let p = PanelMatrix::quantize_per_channel(&values(n * k, 5), n, k);
        let x = values(m * k, 9);
        let bias = values(n, 4);
        let plain = p.matmul(&x, m);
        let biased: Vec<f32> = plain
            .chunks(n)
            .flat_map(|row| row.iter().zip(&bias).map(|(y, b)| y + b))
            .collect();
        let fused = |gelu| {
            let epilogue = Epilogue {
                bias: Some(&bias),
                gelu,
            };
            p.matmul_then(&x, m, &epilogue)
        };
        assert_eq!(fused(false), biased);
        let mut activated = biased.clone();
        crate::kernels::cpu::gelu::gelu_in_place(&mut activated);
        let separate = crate::kernels::cpu::gelu::gelu_erf(
            &candle_core::Tensor::from_vec(biased, (m, n), &candle_core::Device::Cpu).unwrap(),
        )
        .unwrap()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        assert_eq!(activated, separate);
        assert_eq!(fused(true), separate);
    }

    #[test]
    fn the_product_stays_close_to_the_dequantised_weights_in_f32() {
        let (n, k) = (48, 256);
        let (qs, scales) = quantized(n, k);
        let p = PanelMatrix::pack(&qs, &scales, n, k);
        let w = p.dequantize();
        let m = 5;
        let x = values(m * k, 11);
        let got = p.matmul(&x, m);
        // Only the inputs' own q8_0 rounding separates the two.
        let err = relative_error(&got, &x, &w, (m, n, k));
        assert!(err < 0.01, "relative error {err}");
    }
}
