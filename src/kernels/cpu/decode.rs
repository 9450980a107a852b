//! The f32 decode matrix product: `x [m, k] @ w [n, k]^T` for the few input rows of a decode
//! step (one per sequence, at most [`SKINNY_ROWS`]), reading the weights once whatever `m` is.
//! candle's CPU matmul packs the whole weight matrix on each call, so a step of batch 2 cost
//! several times batch 1 although both must read the same weights; here each weight row is
//! streamed once and dotted with every input row, split across threads.
//!
//! Exactness habit: a row's result is bit-identical whatever rows are beside it, and the AVX2
//! and AVX-512VL builds agree bit for bit (tests below); [`reference`] is the scalar definition.

use rayon::prelude::*;

/// Input rows up to this take this kernel (`nn::Linear` dispatches on it).
pub const SKINNY_ROWS: usize = 16;

/// Weight rows per parallel task of [`skinny_matmul`].
const BLOCK_ROWS: usize = 32;

/// `x [m, k] @ w[n, k]^T -> [m, n]`, reading `w` once.
pub fn skinny_matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
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

/// The scalar definition of [`skinny_matmul`]'s result (the same sums, in the kernels' order per
/// lane up to rounding): what the tests compare against.
pub fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = x[i * k..(i + 1) * k]
                .iter()
                .zip(&w[j * k..(j + 1) * k])
                .map(|(a, b)| a * b)
                .sum();
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

            impl Ahead {
                /// The pair is read whole, then the next pair (rows j + 2 and j + 3): over rows
                /// of at least `PREFETCH_AHEAD` columns, near the end of the rows ask for the
                /// start of those.
                fn for_row_len(k: usize) -> Self {
                    if k >= PREFETCH_AHEAD {
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
                    }
                }
            }

            /// Runs the pair over all `m` input rows, `TILE_ROWS` at a time. The first tile reads
            /// the weights from memory: it asks ahead for what comes next (later tiles find this
            /// pair in L1).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn tiles(pair: &Pair, m: usize, a0: &mut [__m256], a1: &mut [__m256]) {
                let mut i = 0;
                while i < m {
                    let take = (m - i).min(TILE_ROWS);
                    let (t0, t1) = (&mut a0[i..], &mut a1[i..]);
                    match (take, i == 0) {
                        (8, true) => tile::<8, true>(pair, i, t0, t1),
                        (8, false) => tile::<8, false>(pair, i, t0, t1),
                        (7, true) => tile::<7, true>(pair, i, t0, t1),
                        (7, false) => tile::<7, false>(pair, i, t0, t1),
                        (6, true) => tile::<6, true>(pair, i, t0, t1),
                        (6, false) => tile::<6, false>(pair, i, t0, t1),
                        (5, true) => tile::<5, true>(pair, i, t0, t1),
                        (5, false) => tile::<5, false>(pair, i, t0, t1),
                        (4, true) => tile::<4, true>(pair, i, t0, t1),
                        (4, false) => tile::<4, false>(pair, i, t0, t1),
                        (3, true) => tile::<3, true>(pair, i, t0, t1),
                        (3, false) => tile::<3, false>(pair, i, t0, t1),
                        (2, true) => tile::<2, true>(pair, i, t0, t1),
                        (2, false) => tile::<2, false>(pair, i, t0, t1),
                        (_, true) => tile::<1, true>(pair, i, t0, t1),
                        (_, false) => tile::<1, false>(pair, i, t0, t1),
                    }
                    i += take;
                }
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
                        let ahead = Ahead::for_row_len(k);
                        let pair = Pair {
                            x,
                            k,
                            w0,
                            w1,
                            k0,
                            k1,
                            ahead,
                        };
                        tiles(&pair, m, a0, a1);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(len: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn agrees_with_the_scalar_reference() {
        let (n, k) = (37, 2601);
        let w = randn(n * k, 1);
        for m in [1, 3, 8, SKINNY_ROWS] {
            let x = randn(m * k, 2);
            let ours = skinny_matmul(&x, &w, m, k, n);
            let want = reference(&x, &w, m, k, n);
            for (a, b) in ours.iter().zip(&want) {
                assert!((a - b).abs() < 1e-3, "{m} rows: {a} vs {b}");
            }
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
        let n = BLOCK_ROWS - 1;
        // Widths with and without a tail past the last 8, below and above the prefetch distance.
        for k in [7, 8, 1000, 1024, 2601] {
            let w = randn(n * k, 3);
            let x = randn(SKINNY_ROWS * k, 4);
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
}
