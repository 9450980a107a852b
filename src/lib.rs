//! blip2-server: BLIP-2 (EVA ViT-g + Q-Former + OPT / Flan-T5) inference whose outputs are
//! those of Hugging Face transformers' `Blip2ForConditionalGeneration`.
//!
//! Data flows top to bottom: `preprocess` (bytes -> pixel values) and `prompt` (text -> ids)
//! feed `model` (the three towers), which `generation` drives token by token; `pipeline` ties
//! them to one loaded checkpoint; `engine` runs it on a model thread with continuous batching.

pub mod api;
pub mod config;
pub mod device;
pub mod engine;
pub mod generation;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod server;
pub mod startup;
pub mod tuning;

pub use pipeline::{Blip2Pipeline, Generation, LoadOptions, PipelineError};
