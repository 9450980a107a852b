//! f32 matrix products of many rows (prefill, the vision encoder) for weights candle does not
//! own: a checkpoint mapped from its files (`memory::MappedF32`). It calls the `gemm` crate the
//! way candle's CPU matmul does for `x.matmul(&w.t())`, with the same arguments and threads, so
//! the results are candle's bit for bit (the unit test holds it to that).

/// `x` [m, k] (row-major) times the transpose of `w` [n, k] (the checkpoint's [out, in]
/// layout): [m, n], row-major. Panics when a slice is shorter than its shape says (the caller
/// builds both from checked shapes).
pub fn matmul_transposed(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert!(
        x.len() >= m * k && w.len() >= n * k,
        "matmul_transposed: slices shorter than shapes"
    );
    let mut dst = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return dst;
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: dst holds m x n values with strides (n, 1); x holds m x k with strides (k, 1);
    // w's transpose is k x n with strides (1, k) over w's n x k values. All three outlive the
    // call and dst is written by nothing else.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0f32,
            1f32,
            false,
            false,
            false,
            parallelism,
        )
    };
    dst
}

/// Per batch item `i` of `batch`: `a_i` [m, k] times `b_i` ([n, k] when `b_transposed`, the
/// keys of `q k^T`; else [k, n], the values of `p v`), all row-major and contiguous: [batch, m,
/// n]. The items run on rayon's threads, one gemm each on one thread: attention's products
/// (16 heads of 257 x 257 x 88 in ViT-g) are too small to share out one at a time, which is
/// what candle's batched matmul does (each one's threads start and join, 16 times).
pub fn batched_matmul(
    a: &[f32],
    b: &[f32],
    batch: usize,
    (m, k, n): (usize, usize, usize),
    b_transposed: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(
        a.len() >= batch * m * k && b.len() >= batch * n * k,
        "batched_matmul: slices shorter than shapes"
    );
    let mut dst = vec![0f32; batch * m * n];
    if m == 0 || n == 0 {
        return dst;
    }
    // b's (column, row) strides as gemm reads it: [k, n].
    let (b_col, b_row) = if b_transposed {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    dst.par_chunks_mut(m * n).enumerate().for_each(|(i, d)| {
        let (ai, bi) = (&a[i * m * k..][..m * k], &b[i * n * k..][..n * k]);
        // SAFETY: d holds m x n values with strides (n, 1); ai holds m x k with strides (k, 1);
        // bi holds k x n with the strides above. All outlive the call; d is this task's alone.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                d.as_mut_ptr(),
                1,
                n as isize,
                false,
                ai.as_ptr(),
                1,
                k as isize,
                bi.as_ptr(),
                b_col,
                b_row,
                0f32,
                1f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
    });
    dst
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn equals_candles_matmul_bit_for_bit() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 7, 5), (17, 64, 33), (257, 96, 130), (36, 301, 8)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let expected = x.matmul(&w.t().unwrap()).unwrap();
            let ours = matmul_transposed(
                &x.flatten_all().unwrap().to_vec1().unwrap(),
                m,
                k,
                &w.flatten_all().unwrap().to_vec1().unwrap(),
                n,
            );
            assert_eq!(
                ours,
                expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{m}x{k} by {n}x{k}"
            );
        }
    }

    #[test]
    fn batched_products_agree_with_candles_batched_matmul() {
        let dev = Device::Cpu;
        let (batch, m, k, n) = (3, 37, 88, 29);
        let a = Tensor::randn(0f32, 1.0, (batch, m, k), &dev).unwrap();
        let bt = Tensor::randn(0f32, 1.0, (batch, n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (batch, k, n), &dev).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (rhs, transposed, want) in [
            (&bt, true, a.matmul(&bt.t().unwrap()).unwrap()),
            (&b, false, a.matmul(&b).unwrap()),
        ] {
            let ours = batched_matmul(&flat(&a), &flat(rhs), batch, (m, k, n), transposed);
            for (x, y) in ours.iter().zip(flat(&want)) {
                assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{x} vs {y}");
            }
        }
    }
}
