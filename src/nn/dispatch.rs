//! Which kernels the dispatch points (`Linear::forward`, `attention::attend`, GELU) may use:
//! `Auto` takes the hand-written CPU kernels where they apply; `Generic` runs candle's own ops
//! only, the operations the GPU path runs, so that CPU-only CI exercises exactly the code a CUDA
//! device executes (the parity goldens and the batching property run both ways).
//!
//! Process-wide, like the thread pool: one model per process, set once when it loads
//! (`Blip2Pipeline::load_files`). Nothing here touches storage.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;

/// `--kernels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The CPU kernels where they apply (f32 or quantised weights on the CPU), candle elsewhere.
    #[default]
    Auto,
    /// candle's ops everywhere; quantisation (CPU kernels only) is refused.
    Generic,
}

impl Kernels {
    /// The name as `--kernels` and `/info` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Generic => "generic",
        }
    }
}

static GENERIC: AtomicBool = AtomicBool::new(false);

/// Sets the process's choice; call before building a model.
pub fn set_kernels(kernels: Kernels) {
    GENERIC.store(kernels == Kernels::Generic, Ordering::Relaxed);
}

pub fn kernels() -> Kernels {
    if GENERIC.load(Ordering::Relaxed) {
        Kernels::Generic
    } else {
        Kernels::Auto
    }
}

/// Whether a CPU kernel may take `t`: it is on the CPU and the generic path was not asked for.
/// Each kernel still checks dtype, layout and shape and declines what it does not serve.
pub(crate) fn cpu_kernels_for(t: &Tensor) -> bool {
    t.device().is_cpu() && !GENERIC.load(Ordering::Relaxed)
}
