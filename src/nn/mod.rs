//! Reusable layers between the model architectures and the kernels: [`Linear`] (with explicit
//! quantisation and the one matmul dispatch), attention (head split/merge, [`attention::attend`]
//! with the one attention dispatch), KV buffers, activations, torch's bicubic grid resize, and
//! [`dispatch`], the switch between the CPU kernels and candle's own ops (the GPU's path).
//! Nothing here knows a model family or a checkpoint layout; nothing here touches a tensor's
//! storage (that is `kernels/`).

pub mod activation;
pub mod attention;
pub mod dispatch;
pub mod interpolate;
pub mod kv;
pub mod linear;

pub use activation::Activation;
pub use dispatch::{kernels, set_kernels, Kernels};
pub use linear::{
    linear, linear_b, linear_no_bias, linear_with, Linear, LinearLoad, MappedSource, Quantization,
};
