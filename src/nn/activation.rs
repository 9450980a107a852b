//! Activations as HF configs name them (`hidden_act`, `activation_function`, `dense_act_fn`),
//! with exact GELU dispatched to the vectorised CPU kernel where it applies.

use candle_core::{Result, Tensor};
use serde::Deserialize;

/// An activation as named by `hidden_act` / `activation_function` / `dense_act_fn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// Exact GELU (erf); transformers' "gelu".
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation; transformers' "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast".
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    #[serde(rename = "quick_gelu")]
    QuickGelu,
}

impl Activation {
    pub fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => gelu_erf(xs),
            Activation::GeluTanh => xs.gelu(),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
    }
}

/// Exact (erf) GELU: the CPU kernel for contiguous f32 tensors, candle's op otherwise (and
/// everywhere with `--kernels generic`).
fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if super::dispatch::cpu_kernels_for(xs) {
        if let Some(ys) = crate::kernels::cpu::gelu::gelu_erf(xs)? {
            return Ok(ys);
        }
    }
    xs.gelu_erf()
}
