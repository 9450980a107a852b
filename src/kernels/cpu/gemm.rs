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
}
