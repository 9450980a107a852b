//! `Blip2ForConditionalGeneration`: pixels -> vision encoder -> Q-Former -> `language_projection`
//! -> query embeddings that take the place of the image tokens in the language model's input.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::nn::{linear, Kernels, Linear, LinearLoad, MappedSource, Quantization};

use super::config::{Blip2Config, TextConfig};
use super::lm::LanguageModel;
use super::loader::{Mapping, ModelFiles, SafetensorsWeights};
use super::opt::OptDecoder;
use super::qformer::QFormer;
use super::t5::T5Model;
use super::vision::VisionEncoder;
use super::{ModelError, Result};

/// Intermediate results of the image path, kept for parity tests and caching.
pub struct ImageFeatures {
    /// Vision encoder `last_hidden_state` [B, N+1, Dv].
    pub vision_states: Tensor,
    /// Q-Former output [B, Q, Dq].
    pub query_states: Tensor,
    /// `language_projection(query_states)` [B, Q, D_lm]: what replaces the image tokens.
    pub query_embeds: Tensor,
}

pub struct Blip2Model {
    pub config: Blip2Config,
    pub vision: VisionEncoder,
    pub qformer: QFormer,
    language_projection: Linear,
    /// The family behind the seam (`lm.rs`); chosen once, below, from `text_config`.
    pub language_model: Box<dyn LanguageModel>,
    dtype: DType,
    device: Device,
}

impl Blip2Model {
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(files, dtype, device, None, true)
    }

    /// As [`Self::load`], with the vision encoder's, the Q-Former's and the language model's
    /// linear weights quantised as they are read. With `map_files`, an unquantised f32 CPU load
    /// borrows its linear weights from a mapping of the files instead of copying them
    /// (`loader`).
    pub fn load_quantized(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
        map_files: bool,
    ) -> Result<Self> {
        let config = read_config(&files.config)?;
        if dtype == DType::F16 && matches!(config.text, TextConfig::T5(_)) {
            return Err(ModelError::Config(
                "Flan-T5 overflows in f16 (as in the reference); use --dtype f32 or bf16".into(),
            ));
        }
        if quantize.is_some() && matches!(config.text, TextConfig::T5(_)) {
            tracing::warn!(
                "quantised Flan-T5 drifts far from f32 on a random-weight flan-t5-xl, whose attention \
                 is nearly one-hot (BENCHMARKS.md); unmeasured on the real checkpoint: compare its \
                 outputs with f32 on yours before relying on them"
            );
        }
        // Mapped for an f32 load on the CPU kernels. Unquantised, the mapping is what runs, and
        // it is populated now; quantised, each matrix is quantised straight from the mapping
        // and its pages released, so it is not populated (that would make the whole f32
        // checkpoint resident at once).
        let map = map_files
            && device.is_cpu()
            && dtype == DType::F32
            && crate::nn::kernels() == Kernels::Auto;
        let mapping = match (map, quantize) {
            (false, _) => Mapping::Read,
            (true, None) => Mapping::Populated,
            (true, Some(_)) => Mapping::OnDemand,
        };
        let weights = Arc::new(SafetensorsWeights::open_with(&files.weights, mapping)?);
        let mapped = map.then(|| weights.clone() as Arc<dyn MappedSource>);
        let vb = SafetensorsWeights::shared_var_builder(weights, dtype, device);
        let load = LinearLoad::new(quantize, mapped, mapping == Mapping::Populated);
        Self::build(config, vb, &load)
    }

    pub fn from_var_builder(config: Blip2Config, vb: VarBuilder) -> Result<Self> {
        Self::build(config, vb, &LinearLoad::default())
    }

    fn build(config: Blip2Config, vb: VarBuilder, load: &LinearLoad) -> Result<Self> {
        let wrap = |e: ModelError| match e {
            ModelError::Tensor(e) => ModelError::Weights(e.to_string()),
            other => other,
        };
        let vision =
            VisionEncoder::new(&config.vision, vb.pp("vision_model"), load).map_err(wrap)?;
        // transformers keeps `query_tokens` and the Q-Former in f32 when loading in f16
        // (`_keep_in_fp32_modules`); bf16 makes everything bf16.
        let qformer_vb = if vb.dtype() == DType::F16 {
            vb.clone().set_dtype(DType::F32)
        } else {
            vb.clone()
        };
        // Quantised as the vision encoder is (as the int8 peer quantises every nn.Linear): its
        // cross-attention keys and values read all the vision tokens.
        let qformer = QFormer::new(&config.qformer, config.num_query_tokens, qformer_vb, load)
            .map_err(wrap)?;
        let language_projection = linear(
            config.qformer.hidden_size,
            config.text.hidden_size(),
            vb.pp("language_projection"),
            &load.unquantized(),
        )
        .map_err(|e| wrap(e.into()))?;
        let lm_vb = vb.pp("language_model");
        // The one place a family is chosen: a new family is a file and an arm here.
        let language_model: Box<dyn LanguageModel> = match &config.text {
            TextConfig::Opt(c) => Box::new(OptDecoder::new(c, lm_vb, load).map_err(wrap)?),
            TextConfig::T5(c) => Box::new(T5Model::new(c, lm_vb, load).map_err(wrap)?),
        };
        Ok(Self {
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
            vision,
            qformer,
            language_projection,
            language_model,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Pixels [B, 3, H, W] (f32, normalised) -> every intermediate of the image path.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<ImageFeatures> {
        let pixel_values = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let vision_states = self.vision.forward(&pixel_values)?;
        let query_states = self.qformer.forward(&vision_states)?;
        let query_embeds = self.project(&query_states)?;
        Ok(ImageFeatures {
            vision_states,
            query_states,
            query_embeds,
        })
    }

    /// The reference casts the Q-Former output back to the vision dtype before projecting.
    fn project(&self, query_states: &Tensor) -> Result<Tensor> {
        Ok(self
            .language_projection
            .forward(&query_states.to_dtype(self.dtype)?)?)
    }

    /// The vision model's `pooler_output` [B, Dv] from its `last_hidden_state`.
    pub fn pooled_vision(&self, vision_states: &Tensor) -> Result<Tensor> {
        self.vision.pool(vision_states)
    }

    /// Vision states [B, N, D] -> Q-Former -> projected queries [B, Q, D_lm].
    pub fn project_queries(&self, vision_states: &Tensor) -> Result<Tensor> {
        self.project(&self.qformer.forward(vision_states)?)
    }
}

pub fn read_config(path: &Path) -> Result<Blip2Config> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Files(format!("{}: {e}", path.display())))?;
    Blip2Config::from_json_str(&text)
}
