//! `softmax(xs * factor)` over the last axis for contiguous f32 CPU tensors: the attention
//! probabilities of the vision encoder (16 heads x 257 x 257 scores a layer and image). candle's
//! op calls libm's scalar `expf` per score, about a tenth of a quantised vision layer; here exp
//! is a polynomial ([`exp_poly`]) that the compiler vectorises, and the scaling is done in the
//! same pass. The reference it is held to is libm's `expf` and candle's softmax (tests below).

use std::mem::MaybeUninit;

use candle_core::Tensor;

/// `softmax(xs * factor)` along the last axis when `xs` is a contiguous f32 CPU tensor; `None`
/// for any other (the caller then uses candle's ops).
pub fn softmax_scaled(xs: &Tensor, factor: f32) -> candle_core::Result<Option<Tensor>> {
    use rayon::prelude::*;
    if xs.dtype() != candle_core::DType::F32 || !xs.device().is_cpu() || xs.rank() == 0 {
        return Ok(None);
    }
    let width = xs.dim(candle_core::D::Minus1)?;
    if width == 0 {
        return Ok(None);
    }
    let Some(out) = super::with_f32_slice(xs, |src| {
        // Not zeroed first: each row's first pass writes every element.
        let mut out: Vec<MaybeUninit<f32>> = Vec::with_capacity(src.len());
        out.resize_with(src.len(), MaybeUninit::uninit);
        out.par_chunks_mut(width)
            .zip(src.par_chunks(width))
            .for_each(|(o, s)| softmax_row(s, factor, o));
        let mut out = std::mem::ManuallyDrop::new(out);
        // SAFETY: `softmax_row` wrote every element; MaybeUninit<f32> has f32's layout, and the
        // pointer, length and capacity come from a Vec of that layout.
        unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), out.len(), out.capacity()) }
    })?
    else {
        return Ok(None);
    };
    Tensor::from_vec(out, xs.shape(), xs.device()).map(Some)
}

/// One row, with AVX-512 (else AVX2 + FMA) where the CPU has it.
fn softmax_row(src: &[f32], factor: f32, out: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn wide512(src: &[f32], factor: f32, out: &mut [MaybeUninit<f32>]) {
            softmax_row_generic(src, factor, out)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide256(src: &[f32], factor: f32, out: &mut [MaybeUninit<f32>]) {
            softmax_row_generic(src, factor, out)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            unsafe { wide512(src, factor, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time.
            unsafe { wide256(src, factor, out) };
            return;
        }
    }
    softmax_row_generic(src, factor, out)
}

/// Scaled as candle's `xs * factor` does (one f32 multiply), the maximum subtracted, exp, and
/// each value divided by the sum, as candle's softmax does. The sums run in 16 partial sums,
/// in the same order whatever the instruction set.
#[inline(always)]
fn softmax_row_generic(src: &[f32], factor: f32, out: &mut [MaybeUninit<f32>]) {
    const L: usize = 16;
    assert_eq!(src.len(), out.len());
    for (o, s) in out.iter_mut().zip(src) {
        o.write(s * factor);
    }
    // SAFETY: every element was written just above; MaybeUninit<f32> has f32's layout.
    let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
    let mut max = [f32::NEG_INFINITY; L];
    let mut chunks = out.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            max[i] = max[i].max(c[i]);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&max)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for o in out.iter_mut() {
        *o = exp_poly(*o - max);
    }
    let mut sum = [0f32; L];
    let mut chunks = out.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            sum[i] += c[i];
        }
    }
    let sum = chunks.remainder().iter().sum::<f32>() + sum.iter().sum::<f32>();
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// e^x in f32: x = n ln 2 + r with |r| <= ln 2 / 2, e^r as Cephes' `expf` polynomial, times
/// 2^n built in the exponent bits. Branch-free (loops over it vectorise); below -87.3 (where
/// e^x is under f32's smallest normal) it is exactly 0, so masked scores get no weight. Within
/// 2 ulp of libm's `expf` on [-87, 88] (tested below).
#[inline(always)]
pub fn exp_poly(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * std::f32::consts::LOG2_E).round_ties_even();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from n + 127 in the low mantissa bits of 2^23 + n + 127, shifted into the exponent
    // (an `as i32` cast would keep the loop scalar: it saturates and maps NaN to 0).
    let two_n = f32::from_bits((n + (8_388_608.0 + 127.0)).to_bits() << 23);
    if x < -87.3 {
        0.0
    } else {
        e * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_stays_within_two_ulp_of_libm_and_is_zero_far_below() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(ulps(exp_poly(x), x.exp()));
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp_poly(0.0), 1.0);
        assert_eq!(exp_poly(f32::MIN), 0.0);
        assert_eq!(exp_poly(-1e30), 0.0);
        assert_eq!(exp_poly(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn softmax_agrees_with_candle_scaled_softmax() {
        let dev = Device::Cpu;
        // Widths around the 16-lane blocks, and a masked column.
        for width in [1usize, 15, 16, 17, 257] {
            let mut xs = Tensor::randn(0f32, 3.0, (2, 3, width), &dev).unwrap();
            if width > 1 {
                let mut v = xs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v[0] = f32::MIN;
                xs = Tensor::from_vec(v, (2, 3, width), &dev).unwrap();
            }
            let factor = 0.125f32;
            let ours = softmax_scaled(&xs, factor).unwrap().unwrap();
            let want =
                candle_nn::ops::softmax_last_dim(&(&xs * f64::from(factor)).unwrap()).unwrap();
            let (ours, want) = (
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for (a, b) in ours.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
            }
            if width > 1 {
                assert_eq!(ours[0], 0.0);
            }
            // Rows sum to one.
            for row in ours.chunks(width) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }
}
