//! BLIP-2 itself: the HF checkpoint format (config, loader), the three towers (vision encoder,
//! Q-Former, language model) and the composite that turns pixels into prompt embeddings.
//!
//! Weights are immutable after load (`&self` everywhere); per-sequence state (the KV cache) lives
//! outside, in the caller's hands, so one model serves many sequences at once.

pub mod blip2;
pub mod config;
pub mod lm;
pub mod loader;
pub mod opt;
pub mod qformer;
pub mod t5;
pub mod vision;

pub use blip2::Blip2Model;
pub use config::{Blip2Config, TextConfig};
pub use lm::{DecodeState, LanguageModel, Prefilled};
pub use loader::{ModelFiles, ModelSource};

/// Errors from loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{0}")]
    Files(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The request's input is unacceptable to the model (bad settings, empty prompt).
    #[error("{0}")]
    Input(String),
    /// Query + prompt + new tokens do not fit the model's positions.
    #[error("{0}")]
    TooLong(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// `n` layers made by `build`, in order. On the CPU they are made on rayon's threads: a layer's
/// weights are read, and quantised for a quantised load, independently of the other layers', so
/// a load uses every core (at most one layer's f32 weights per thread exist at once). On a GPU
/// one after the other, each copy to the device from the loading thread.
pub(crate) fn build_layers<T: Send>(
    n: usize,
    on_cpu: bool,
    build: impl Fn(usize) -> Result<T> + Sync + Send,
) -> Result<Vec<T>> {
    use rayon::prelude::*;
    if on_cpu {
        (0..n).into_par_iter().map(build).collect()
    } else {
        (0..n).map(build).collect()
    }
}
