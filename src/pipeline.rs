//! One loaded checkpoint with its processor: image bytes + prompts in, generated text out.
//! This is the seam the CLI (and, later, the server's model thread) drives.

use candle_core::{DType, Device};

use crate::generation::{DecodeBatch, FinishReason, GenerationParams};
use crate::model::{Blip2Model, ModelError, ModelFiles, ModelSource};
use crate::preprocess::{ImageLimits, ImageProcessor, PreprocessError};
use crate::prompt::{PromptBuilder, PromptError};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    /// An image of a batch failed to decode or preprocess; `index` says which.
    #[error("image {index}: {source}")]
    Image {
        index: usize,
        source: PreprocessError,
    },
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("{0}")]
    Input(String),
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    pub limits: ImageLimits,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            limits: ImageLimits::default(),
        }
    }
}

/// One generated answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
}

pub struct Blip2Pipeline {
    pub model: Blip2Model,
    pub images: ImageProcessor,
    pub prompts: PromptBuilder,
}

impl Blip2Pipeline {
    pub fn load(source: &ModelSource, options: &LoadOptions) -> Result<Self, PipelineError> {
        let files = ModelFiles::resolve(source)?;
        Self::load_files(&files, options)
    }

    pub fn load_files(files: &ModelFiles, options: &LoadOptions) -> Result<Self, PipelineError> {
        let model = Blip2Model::load(files, options.dtype, &options.device)?;
        let images = ImageProcessor::from_file(&files.preprocessor_config, options.limits)?;
        let prompts = PromptBuilder::new(
            &files.tokenizer,
            files.tokenizer_config.as_deref(),
            &model.config,
        )?;
        Ok(Self {
            model,
            images,
            prompts,
        })
    }

    /// Generates for every image in one batch; `prompts` and `params` have one entry per image.
    pub fn generate(
        &self,
        images: &[Vec<u8>],
        prompts: &[Option<String>],
        params: &[GenerationParams],
    ) -> Result<Vec<Generation>, PipelineError> {
        if images.is_empty() {
            return Err(PipelineError::Input("no images".into()));
        }
        if prompts.len() != images.len() || params.len() != images.len() {
            return Err(PipelineError::Input(format!(
                "{} images need as many prompts and parameter sets (got {} and {})",
                images.len(),
                prompts.len(),
                params.len()
            )));
        }
        let pixels = images
            .iter()
            .enumerate()
            .map(|(index, bytes)| {
                self.images
                    .pixel_values(bytes)
                    .map_err(|source| PipelineError::Image { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prompts = prompts
            .iter()
            .map(|p| self.prompts.build(p.as_deref()))
            .collect::<Result<Vec<_>, _>>()?;
        let pixel_values = self
            .images
            .batch_tensor(&pixels, self.model.device())
            .map_err(ModelError::from)?;
        let features = self.model.image_features(&pixel_values)?;
        let sequences =
            DecodeBatch::prefill(&self.model, &features.query_embeds, &prompts, params)?.run()?;
        sequences
            .into_iter()
            .zip(&prompts)
            .map(|(seq, prompt)| {
                Ok(Generation {
                    text: self.prompts.decode(&seq.token_ids)?,
                    token_ids: seq.token_ids,
                    finish_reason: seq.finish_reason,
                    prompt_tokens: prompt.text_ids.len(),
                })
            })
            .collect()
    }
}
