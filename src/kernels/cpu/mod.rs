//! CPU kernels: the hand-written SIMD paths that make decode run at the memory-bandwidth floor.
//! Each works on plain slices (or, at its entry, reads candle's CPU storage without copying) and
//! keeps its scalar reference and its tests beside it. This is the only place in the crate that
//! uses `std::arch` or touches `Storage::Cpu` (tests/structure.rs checks it); `nn/` chooses
//! between these kernels and candle's ops. Kernels know nothing of models, layers or requests.

pub mod attention;
pub mod decode;
pub mod gelu;
pub mod gemm;
pub mod memory;
pub mod q8;
pub mod q8_panels;
pub mod softmax;

use candle_core::{DType, Result, Tensor};

/// Runs `f` on the values of `t` when it is a contiguous f32 CPU tensor, borrowing its storage
/// (copying a weight matrix would cost what the decode kernel saves); `None` otherwise.
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    Ok(Some(f(&cpu.as_slice::<f32>()?[start..end])))
}

/// `q[i] = (x[i] * inv).round() as i8` over a block, and the sum of the q: exactly that
/// expression's values, in a form that vectorises. Written as that expression, the loop stays
/// scalar (`as i8` saturates and maps NaN to 0, which LLVM does one value at a time on x86, and
/// on baseline x86-64 `f32::round` is a libm call): it was a sixth of a quantised load's time
/// and 5% of a quantised vision encoder's, in every product's input quantisation.
pub(crate) fn scale_round(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has the features (checked just above).
            return unsafe { scale_round_avx512(x, inv, q) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { scale_round_avx2(x, inv, q) };
        }
    }
    scale_round_any(x, inv, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn scale_round_avx512(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    scale_round_any(x, inv, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scale_round_avx2(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    scale_round_any(x, inv, q)
}

#[inline(always)]
fn scale_round_any(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    let mut sum = 0i32;
    for (o, v) in q.iter_mut().zip(x) {
        *o = round_to_i8(v * inv);
        sum += i32::from(*o);
    }
    sum
}

/// `x.iter().fold(0.0, |a, v| a.max(v.abs()))`, the same value (max ignores NaN and is
/// associative and commutative on the rest), in 16 partial maxima so that it vectorises: the
/// fold is a chain of dependent `max`es, one value per few cycles.
pub(crate) fn abs_max(x: &[f32]) -> f32 {
    const L: usize = 16;
    let mut m = [0f32; L];
    let chunks = x.chunks_exact(L);
    let tail = chunks.remainder().iter().fold(0f32, |a, v| a.max(v.abs()));
    for c in chunks {
        for i in 0..L {
            m[i] = m[i].max(c[i].abs());
        }
    }
    m.iter().fold(tail, |a, &v| a.max(v))
}

/// `y.round() as i8` without a branch or a call. Rounding half away from zero: the fraction
/// `y - trunc(y)` is exact, so comparing it with 0.5 decides the ties as `round` does. Then
/// `as i8`'s saturation (the clamp; infinities included), its NaN -> 0 (the select), and the
/// conversion: adding 1.5 x 2^23 puts the integer in the low mantissa bits, whose low byte is
/// its two's complement.
#[inline(always)]
fn round_to_i8(y: f32) -> i8 {
    let t = y.trunc();
    let r = if (y - t).abs() >= 0.5 {
        t + 1f32.copysign(y)
    } else {
        t
    };
    let byte = (r.clamp(-128.0, 127.0) + 12_582_912.0).to_bits() as u8 as i8;
    if y.is_nan() {
        0
    } else {
        byte
    }
}

#[cfg(test)]
mod tests {
    use super::{abs_max, scale_round};

    #[test]
    fn abs_max_is_the_fold() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut x: Vec<f32> = (0..1000)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        x[500] = f32::NAN;
        x[7] = -3.5;
        for len in [0usize, 1, 15, 16, 17, 33, 1000] {
            let want = x[..len].iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(abs_max(&x[..len]).to_bits(), want.to_bits(), "len {len}");
        }
        assert_eq!(abs_max(&[f32::NAN, f32::NAN]), 0.0);
        assert_eq!(abs_max(&[f32::NEG_INFINITY]), f32::INFINITY);
    }

    #[test]
    fn scale_round_is_the_scalar_expression() {
        // Halves and their neighbours (the ties), then pseudo-random values, as blocks.
        let mut x = Vec::new();
        for i in 0..512 {
            let h = i as f32 * 0.5 - 128.0;
            x.extend([h, h.next_up(), h.next_down()]);
        }
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x.push(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0);
        }
        x.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0]);
        for inv in [1.0f32, 127.0, 0.0, 3.7] {
            for block in x.chunks(32) {
                let mut q = vec![0i8; block.len()];
                let sum = scale_round(block, inv, &mut q);
                let want: Vec<i8> = block.iter().map(|v| (v * inv).round() as i8).collect();
                assert_eq!(q, want, "inv {inv}");
                assert_eq!(sum, want.iter().map(|&v| i32::from(v)).sum::<i32>());
            }
        }
    }
}
