//! One loaded checkpoint with its processor: image bytes + prompts in, generated text out.
//! This is the seam the CLI (and, later, the server's model thread) drives.

use candle_core::{DType, Device};

use crate::generation::{DecodeBatch, GeneratedSequence, GenerationParams, SequenceRequest};
use crate::model::{Blip2Model, ModelError, ModelFiles, ModelSource};
use crate::nn::{Kernels, Quantization};
use crate::preprocess::{ImageLimits, ImageProcessor, ImageSize, PreprocessError};
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
    /// Quantise the vision encoder's, Q-Former's and language model's linear weights at load
    /// (CPU kernels only).
    pub quantize: Option<Quantization>,
    /// The CPU kernels, or candle's ops only (`nn::dispatch`); process-wide, set by the load.
    pub kernels: Kernels,
    /// Borrow unquantised f32 CPU weights from a mapping of the files instead of copying them
    /// (`model::loader`).
    pub mmap: bool,
}

impl LoadOptions {
    /// The combinations that cannot run, refused before any weight is read.
    pub fn check(&self) -> Result<(), String> {
        let Some(q) = self.quantize else {
            return Ok(());
        };
        if !self.device.is_cpu() {
            return Err(format!(
                "--quantize {q:?} runs on the CPU kernels only; on a GPU use --dtype f16 or bf16 \
                 (or f32, exact to the reference)"
            ));
        }
        if self.kernels == Kernels::Generic {
            return Err(format!(
                "--quantize {q:?} needs the CPU kernels: it cannot run with --kernels generic"
            ));
        }
        Ok(())
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            limits: ImageLimits::default(),
            quantize: None,
            kernels: Kernels::Auto,
            mmap: true,
        }
    }
}

/// Whether the vision encoder takes images of `size`: each side a multiple of the patch size
/// (the patch embedding drops no pixels) and at most `max_side` (the encoder's cost grows with
/// the square of the patch count).
pub fn check_image_size(size: ImageSize, patch_size: usize, max_side: usize) -> Result<(), String> {
    let ImageSize { height, width } = size;
    if height == 0 || width == 0 {
        return Err(format!("image size {size}: sides must be positive"));
    }
    if !height.is_multiple_of(patch_size) || !width.is_multiple_of(patch_size) {
        return Err(format!(
            "image size {size}: height and width must be multiples of the patch size {patch_size}"
        ));
    }
    if height.max(width) > max_side {
        return Err(format!(
            "image size {size}: a side is over this server's limit of {max_side} (max_image_side)"
        ));
    }
    Ok(())
}

/// The answer(s) for one image: one sequence, or `num_return_sequences` of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub sequences: Vec<GeneratedSequence>,
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
        options.check().map_err(PipelineError::Input)?;
        crate::nn::set_kernels(options.kernels);
        let model = Blip2Model::load_quantized(
            files,
            options.dtype,
            &options.device,
            options.quantize,
            options.mmap,
        )?;
        Self::with_model(model, files, options.limits)
    }

    /// A checkpoint's processor (image processor and prompt builder, from `files`) around a
    /// model built already, from `files.weights` or otherwise (`examples/bench` builds one from
    /// random values on a GPU).
    pub fn with_model(
        model: Blip2Model,
        files: &ModelFiles,
        limits: ImageLimits,
    ) -> Result<Self, PipelineError> {
        let ignored = model.config.generation.unsupported();
        if !ignored.is_empty() {
            tracing::warn!(
                settings = ?ignored,
                "text_config sets generation options this server ignores; outputs may differ from transformers'"
            );
        }
        let images = ImageProcessor::from_file(&files.preprocessor_config, limits)?;
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

    /// Resize every image to `size` instead of the processor's size; the vision encoder
    /// interpolates its position embeddings (transformers' `interpolate_pos_encoding=True`).
    pub fn resize_images_to(
        &mut self,
        size: ImageSize,
        max_side: usize,
    ) -> Result<(), PipelineError> {
        check_image_size(size, self.model.config.vision.patch_size, max_side)
            .map_err(PipelineError::Input)?;
        self.images = self.images.at_size(size);
        Ok(())
    }

    /// Generation settings when a request gives none: transformers' defaults with the
    /// checkpoint's `text_config` overrides.
    pub fn default_params(&self) -> GenerationParams {
        GenerationParams::from_defaults(&self.model.config.generation)
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
        let requests: Vec<SequenceRequest> = prompts
            .iter()
            .zip(params)
            .map(|(p, params)| SequenceRequest::new(p.clone(), params.clone()))
            .collect();
        let outputs = DecodeBatch::prefill(
            &self.model,
            &self.prompts,
            &features.query_embeds,
            &requests,
        )?
        .run()?;
        Ok(outputs
            .into_iter()
            .zip(&prompts)
            .map(|(sequences, prompt)| Generation {
                sequences,
                prompt_tokens: prompt.text_ids.len(),
            })
            .collect())
    }
}
