//! The language-model seam: what decoding needs from a family (OPT, Flan-T5, a third one), so
//! that `generation/`, `engine/`, `api/` and `server.rs` never name a family. A family is one
//! file implementing [`LanguageModel`] and one match arm where the checkpoint is read
//! (`blip2.rs`). Its per-batch state is a [`DecodeState`]: opaque above this layer, owned by
//! the caller, so one model serves many batches at once.

use std::any::Any;

use candle_core::Tensor;

use super::{ModelError, Result};

/// Per-batch decoding state of one family (KV caches, masks, positions). Rows are the model
/// rows of the batch, in order.
pub trait DecodeState: Send {
    /// Keeps only the given rows, in that order (rows may repeat: beams that fork).
    fn select_rows(&mut self, rows: &[usize]) -> Result<()>;
    /// Appends `other`'s rows after these (two batches prefilled apart, maybe at other steps);
    /// each row keeps decoding exactly as it would alone.
    fn merge(&mut self, other: Box<dyn DecodeState>) -> Result<()>;
    /// For the family's own downcast in [`LanguageModel::step`] and `merge`.
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// What a prefill hands back.
pub struct Prefilled {
    pub state: Box<dyn DecodeState>,
    /// Next-token logits of every row [B, V], f32.
    pub logits: Tensor,
    /// Encoder-decoders: the encoder's `last_hidden_state` [B, L, d] (for parity checks).
    pub encoder_output: Option<Tensor>,
}

/// A language model conditioned on BLIP-2's projected queries.
pub trait LanguageModel: Send + Sync {
    /// `text_config.model_type` ("opt", "t5"): for `/info` and the per-family settings.
    fn model_type(&self) -> &'static str;
    /// Runs the queries [B, Q, D] followed by each row's prompt ids (rows may differ in length;
    /// `pad` fills the gaps, masked out) and returns the state and the first logits.
    fn prefill(&self, query_embeds: &Tensor, prompts: &[&[u32]], pad: u32) -> Result<Prefilled>;
    /// Feeds one token per row and returns the next logits [rows, V] (f32).
    fn step(&self, state: &mut dyn DecodeState, tokens: &[u32]) -> Result<Tensor>;
    /// Learned positions bound query + prompt + new tokens (OPT); `None` when unbounded.
    fn position_limit(&self) -> Option<usize>;
    /// Encoder-decoders start decoding from this id (the processors' context); `None` for
    /// decoder-only models, whose context is the prompt.
    fn decoder_start(&self) -> Option<u32>;
    /// The VQA prompt the BLIP-2 paper used for this family ("{}" is the question).
    fn default_vqa_template(&self) -> &'static str;
}

/// `state` as the family's own type (a state handed to the wrong family is a bug).
pub fn downcast<T: 'static>(state: &mut dyn DecodeState) -> Result<&mut T> {
    state
        .as_any_mut()
        .downcast_mut::<T>()
        .ok_or_else(|| ModelError::Input("decoding state of another model".into()))
}

/// `other` as the family's own type, by value.
pub fn downcast_box<T: 'static>(other: Box<dyn DecodeState>) -> Result<Box<T>> {
    other
        .into_any()
        .downcast::<T>()
        .map_err(|_| ModelError::Input("cannot merge decoding states of two models".into()))
}
