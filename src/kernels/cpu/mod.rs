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
/// expression's values. Where the CPU has AVX2 it runs compiled for AVX2, where `f32::round`
/// becomes vector instructions; on baseline x86-64 it is a libm call per value, which keeps the
/// quantisation loops from vectorising (a sixth of a quantised load's time, and a share of
/// every quantised product's input quantisation).
pub(crate) fn scale_round(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { scale_round_avx2(x, inv, q) };
    }
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
        *o = (v * inv).round() as i8;
        sum += i32::from(*o);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::scale_round;

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
