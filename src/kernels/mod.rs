//! Compute kernels below the layers: `cpu/` has the SIMD paths. A device's kernels go in a
//! folder of their own (e.g. `cuda/` behind a cargo feature); `nn/` is the one place that picks
//! a kernel from the device, dtype and shape.

pub mod cpu;
