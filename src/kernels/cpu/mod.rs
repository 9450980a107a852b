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
