//! `Blip2Config` as transformers writes it to `config.json`, with transformers' defaults for every
//! field a checkpoint may leave out (transformers 4.57.6: `Blip2VisionConfig`, `Blip2QFormerConfig`,
//! `OPTConfig`, `T5Config`).

use serde::Deserialize;

use super::ModelError;

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
    pub fn forward(self, xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::Gelu => gelu_erf(xs),
            Activation::GeluTanh => xs.gelu(),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
    }
}

/// Exact (erf) GELU, `x/2 * (1 + erf(x/sqrt 2))`, as torch's "gelu". candle's calls libm's
/// scalar `erff` on one thread; in the vision encoder (8 images: 12.6 M values per layer) that
/// was about 5% of its time. For contiguous f32 CPU tensors this evaluates erf as a rational
/// function ([`erf_rational`]) that the compiler vectorises, across rayon's pool.
fn gelu_erf(xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    if xs.dtype() != candle_core::DType::F32 || !xs.device().is_cpu() {
        return xs.gelu_erf();
    }
    let xs = xs.contiguous()?;
    let (storage, layout) = xs.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return xs.gelu_erf();
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return xs.gelu_erf();
    };
    let src = &cpu.as_slice::<f32>()?[start..end];
    // Not zeroed first: every element is written below.
    let mut out: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(src.len());
    out.resize_with(src.len(), std::mem::MaybeUninit::uninit);
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(o, s)| gelu_slice(s, o));
    drop(storage);
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: `gelu_slice` wrote every element; MaybeUninit<f32> has f32's layout, and the
    // pointer, length and capacity come from a Vec of that layout.
    let out =
        unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), out.len(), out.capacity()) };
    candle_core::Tensor::from_vec(out, xs.shape(), xs.device())
}

/// `out[i] = gelu(src[i])`, with AVX2 + FMA where the CPU has them.
fn gelu_slice(src: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(src: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
            gelu_generic(src, out)
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time.
            unsafe { wide(src, out) };
            return;
        }
    }
    gelu_generic(src, out)
}

#[inline(always)]
fn gelu_generic(src: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
    for (o, &v) in out.iter_mut().zip(src) {
        o.write(0.5 * v * (1.0 + erf_rational(v * std::f32::consts::FRAC_1_SQRT_2)));
    }
}

/// erf(x) in f32 as x * P(x^2) / Q(x^2) on [-4, 4] (beyond, erf is +/-1 in f32): the rational
/// approximation that Eigen and XLA use for f32, with their published coefficients. Branch-free,
/// so loops over it vectorise. Its error against libm's `erff` is at most 1e-6 (a unit test
/// checks a dense grid); torch's own vectorised erf differs from libm's by a few ulp as well.
#[inline(always)]
pub(crate) fn erf_rational(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

fn default_gelu() -> Activation {
    Activation::Gelu
}

/// `Blip2VisionConfig` (EVA ViT-g/14 on the real checkpoints).
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "vision_defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "vision_defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "vision_defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "vision_defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "vision_defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "vision_defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_gelu")]
    pub hidden_act: Activation,
    /// transformers' code default is 1e-6 (older docs say 1e-5; the code wins).
    #[serde(default = "vision_defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
}

mod vision_defaults {
    pub fn hidden_size() -> usize {
        1408
    }
    pub fn intermediate_size() -> usize {
        6144
    }
    pub fn num_hidden_layers() -> usize {
        39
    }
    pub fn num_attention_heads() -> usize {
        16
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        14
    }
    pub fn layer_norm_eps() -> f64 {
        1e-6
    }
}

fn yes() -> bool {
    true
}

/// `Blip2QFormerConfig` (BERT-base sized on the real checkpoints).
#[derive(Debug, Clone, Deserialize)]
pub struct QFormerConfig {
    #[serde(default = "qformer_defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "qformer_defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "qformer_defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "qformer_defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "qformer_defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "qformer_defaults::cross_attention_frequency")]
    pub cross_attention_frequency: usize,
    #[serde(default = "qformer_defaults::encoder_hidden_size")]
    pub encoder_hidden_size: usize,
}

mod qformer_defaults {
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn cross_attention_frequency() -> usize {
        2
    }
    pub fn encoder_hidden_size() -> usize {
        1408
    }
}

/// `OPTConfig`, the fields the decoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    #[serde(default = "opt_defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "opt_defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "opt_defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "opt_defaults::ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "opt_defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "opt_defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "opt_defaults::activation_function")]
    pub activation_function: Activation,
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "yes")]
    pub enable_bias: bool,
    #[serde(default = "yes")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "opt_defaults::pad_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "opt_defaults::bos_token_id")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "opt_defaults::eos_token_id")]
    pub eos_token_id: Option<TokenIds>,
}

mod opt_defaults {
    use super::{Activation, TokenIds};
    pub fn vocab_size() -> usize {
        50272
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn ffn_dim() -> usize {
        3072
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn activation_function() -> Activation {
        Activation::Relu
    }
    pub fn pad_token_id() -> Option<u32> {
        Some(1)
    }
    pub fn bos_token_id() -> Option<u32> {
        Some(2)
    }
    pub fn eos_token_id() -> Option<TokenIds> {
        Some(TokenIds::One(2))
    }
}

/// `T5Config`, the fields the encoder-decoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    #[serde(default = "t5_defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "t5_defaults::d_model")]
    pub d_model: usize,
    #[serde(default = "t5_defaults::d_kv")]
    pub d_kv: usize,
    #[serde(default = "t5_defaults::d_ff")]
    pub d_ff: usize,
    #[serde(default = "t5_defaults::num_layers")]
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    #[serde(default = "t5_defaults::num_heads")]
    pub num_heads: usize,
    #[serde(default = "t5_defaults::relative_attention_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "t5_defaults::relative_attention_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "t5_defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "t5_defaults::feed_forward_proj")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub dense_act_fn: Option<Activation>,
    #[serde(default)]
    pub is_gated_act: Option<bool>,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "t5_defaults::pad_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "t5_defaults::eos_token_id")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
}

mod t5_defaults {
    use super::TokenIds;
    pub fn vocab_size() -> usize {
        32128
    }
    pub fn d_model() -> usize {
        512
    }
    pub fn d_kv() -> usize {
        64
    }
    pub fn d_ff() -> usize {
        2048
    }
    pub fn num_layers() -> usize {
        6
    }
    pub fn num_heads() -> usize {
        8
    }
    pub fn relative_attention_num_buckets() -> usize {
        32
    }
    pub fn relative_attention_max_distance() -> usize {
        128
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-6
    }
    pub fn feed_forward_proj() -> String {
        "relu".to_string()
    }
    pub fn pad_token_id() -> Option<u32> {
        Some(0)
    }
    pub fn eos_token_id() -> Option<TokenIds> {
        Some(TokenIds::One(1))
    }
}

impl T5Config {
    /// transformers' `T5Config.__init__`: "gated-gelu" means gated with `gelu_new`, unless
    /// `dense_act_fn` was saved (the Salesforce configs save "gelu").
    pub fn activation(&self) -> Result<(Activation, bool), ModelError> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, act_name) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => {
                return Err(ModelError::Config(format!(
                    "`feed_forward_proj` {:?} is not `act` or `gated-act`",
                    self.feed_forward_proj
                )))
            }
        };
        let gated = self.is_gated_act.unwrap_or(gated);
        let act = match self.dense_act_fn {
            Some(act) => act,
            // T5Config.__init__ remaps exactly "gated-gelu" to gelu_new; plain "gelu" stays exact.
            None if gated && act_name == "gelu" => Activation::GeluTanh,
            None => serde_json::from_value(serde_json::Value::String(act_name.to_string()))
                .map_err(|_| {
                    ModelError::Config(format!("unsupported T5 activation {act_name:?}"))
                })?,
        };
        Ok((act, gated))
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }
}

/// One id or several: `eos_token_id` may be either in HF configs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The language model half of the checkpoint, chosen by `text_config.model_type`.
#[derive(Debug, Clone)]
pub enum TextConfig {
    Opt(OptConfig),
    T5(T5Config),
}

impl TextConfig {
    pub fn hidden_size(&self) -> usize {
        match self {
            TextConfig::Opt(c) => c.hidden_size,
            TextConfig::T5(c) => c.d_model,
        }
    }
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let ids = match self {
            TextConfig::Opt(c) => &c.eos_token_id,
            TextConfig::T5(c) => &c.eos_token_id,
        };
        ids.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }
    pub fn pad_token_id(&self) -> Option<u32> {
        match self {
            TextConfig::Opt(c) => c.pad_token_id,
            TextConfig::T5(c) => c.pad_token_id,
        }
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            TextConfig::Opt(c) => c.bos_token_id,
            TextConfig::T5(c) => c.bos_token_id,
        }
    }
    pub fn model_type(&self) -> &'static str {
        match self {
            TextConfig::Opt(_) => "opt",
            TextConfig::T5(_) => "t5",
        }
    }
}

/// Generation settings a checkpoint's `text_config` may carry (transformers derives the language
/// model's generation config from it); absent fields take transformers' defaults.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationDefaults {
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub length_penalty: Option<f64>,
    pub num_beams: Option<usize>,
    pub num_return_sequences: Option<usize>,
    pub no_repeat_ngram_size: Option<usize>,
    // Settings the reference would honour that this engine does not (yet); see `unsupported`.
    max_length: Option<usize>,
    min_length: Option<usize>,
    early_stopping: Option<serde_json::Value>,
    forced_eos_token_id: Option<serde_json::Value>,
    forced_bos_token_id: Option<serde_json::Value>,
    bad_words_ids: Option<serde_json::Value>,
    suppress_tokens: Option<serde_json::Value>,
}

impl GenerationDefaults {
    /// Names of text_config generation settings with non-default values that we ignore, so the
    /// caller can warn: outputs may then differ from the reference's.
    pub fn unsupported(&self) -> Vec<&'static str> {
        let set = |v: &Option<serde_json::Value>| {
            v.as_ref()
                .is_some_and(|v| !v.is_null() && *v != serde_json::Value::Bool(false))
        };
        let mut out = Vec::new();
        if self.max_length.is_some_and(|m| m != 20) {
            out.push("max_length");
        }
        if self.min_length.is_some_and(|m| m != 0) {
            out.push("min_length");
        }
        for (name, v) in [
            ("early_stopping", &self.early_stopping),
            ("forced_eos_token_id", &self.forced_eos_token_id),
            ("forced_bos_token_id", &self.forced_bos_token_id),
            ("bad_words_ids", &self.bad_words_ids),
            ("suppress_tokens", &self.suppress_tokens),
        ] {
            if set(v) {
                out.push(name);
            }
        }
        out
    }
}

/// The whole `config.json` of a `Blip2ForConditionalGeneration` checkpoint.
#[derive(Debug, Clone)]
pub struct Blip2Config {
    pub vision: VisionConfig,
    pub qformer: QFormerConfig,
    pub text: TextConfig,
    pub num_query_tokens: usize,
    /// Present in the newer layout (the processor inserts `<image>` ids that the model overwrites);
    /// absent in the legacy layout (query embeddings are concatenated in front of the prompt).
    pub image_token_index: Option<u32>,
    /// Generation defaults carried by `text_config`.
    pub generation: GenerationDefaults,
}

#[derive(Deserialize)]
struct RawBlip2Config {
    #[serde(default)]
    vision_config: Option<VisionConfig>,
    #[serde(default)]
    qformer_config: Option<QFormerConfig>,
    #[serde(default)]
    text_config: Option<serde_json::Value>,
    #[serde(default = "default_num_query_tokens")]
    num_query_tokens: usize,
    #[serde(default)]
    image_token_index: Option<u32>,
    #[serde(default)]
    image_token_id: Option<u32>,
}

fn default_num_query_tokens() -> usize {
    32
}

impl Blip2Config {
    pub fn from_json_str(json: &str) -> Result<Self, ModelError> {
        let raw: RawBlip2Config = serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let vision = match raw.vision_config {
            Some(v) => v,
            None => serde_json::from_str("{}").map_err(|e| ModelError::Config(e.to_string()))?,
        };
        let mut qformer = match raw.qformer_config {
            Some(q) => q,
            None => serde_json::from_str("{}").map_err(|e| ModelError::Config(e.to_string()))?,
        };
        // Blip2Config.__init__ sets the Q-Former's encoder width to the vision width.
        qformer.encoder_hidden_size = vision.hidden_size;
        // transformers' default text config is OPT.
        let text_value = raw
            .text_config
            .unwrap_or_else(|| serde_json::json!({"model_type": "opt"}));
        let model_type = text_value
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("opt")
            .to_string();
        let generation: GenerationDefaults = serde_json::from_value(text_value.clone())
            .map_err(|e| ModelError::Config(format!("text_config generation settings: {e}")))?;
        let text = match model_type.as_str() {
            "opt" => TextConfig::Opt(
                serde_json::from_value(text_value)
                    .map_err(|e| ModelError::Config(format!("text_config (opt): {e}")))?,
            ),
            "t5" => TextConfig::T5(
                serde_json::from_value(text_value)
                    .map_err(|e| ModelError::Config(format!("text_config (t5): {e}")))?,
            ),
            other => {
                return Err(ModelError::Config(format!(
                    "text_config.model_type {other:?} is not supported (expected \"opt\" or \"t5\")"
                )))
            }
        };
        let config = Blip2Config {
            vision,
            qformer,
            text,
            num_query_tokens: raw.num_query_tokens,
            image_token_index: raw.image_token_index.or(raw.image_token_id),
            generation,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let check_heads = |what: &str, hidden: usize, heads: usize| {
            if heads == 0 || !hidden.is_multiple_of(heads) {
                Err(ModelError::Config(format!(
                    "{what}: hidden size {hidden} is not divisible by {heads} attention heads"
                )))
            } else {
                Ok(())
            }
        };
        check_heads(
            "vision_config",
            self.vision.hidden_size,
            self.vision.num_attention_heads,
        )?;
        check_heads(
            "qformer_config",
            self.qformer.hidden_size,
            self.qformer.num_attention_heads,
        )?;
        if self.vision.patch_size == 0
            || !self
                .vision
                .image_size
                .is_multiple_of(self.vision.patch_size)
        {
            return Err(ModelError::Config(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                self.vision.image_size, self.vision.patch_size
            )));
        }
        if self.qformer.cross_attention_frequency == 0 {
            return Err(ModelError::Config(
                "qformer_config.cross_attention_frequency must be >= 1".into(),
            ));
        }
        if self.num_query_tokens == 0 {
            return Err(ModelError::Config("num_query_tokens must be >= 1".into()));
        }
        match &self.text {
            TextConfig::Opt(c) => {
                check_heads("text_config", c.hidden_size, c.num_attention_heads)?;
                if let Some(proj) = c.word_embed_proj_dim {
                    if proj != c.hidden_size {
                        // The reference cannot run this either: the projected queries (hidden_size
                        // wide) overwrite rows of embeddings that are word_embed_proj_dim wide.
                        return Err(ModelError::Config(format!(
                            "text_config.word_embed_proj_dim {proj} != hidden_size {}: BLIP-2 needs them equal",
                            c.hidden_size
                        )));
                    }
                }
            }
            TextConfig::T5(c) => {
                c.activation()?;
                if c.num_heads == 0 {
                    return Err(ModelError::Config(
                        "text_config.num_heads must be >= 1".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Number of vision tokens (patches + CLS) at the configured image size.
    pub fn vision_tokens(&self) -> usize {
        let side = self.vision.image_size / self.vision.patch_size;
        side * side + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rational_erf_and_gelu_stay_close_to_libm() {
        let mut worst = 0f32;
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5;
            let d = (erf_rational(x) - candle_core::cpu::erf::erf_f32(x)).abs();
            worst = worst.max(d);
        }
        assert!(worst < 1e-6, "erf: {worst}");
        assert!((erf_rational(f32::INFINITY) - 1.0).abs() < 1e-6);
        assert!((erf_rational(f32::NEG_INFINITY) + 1.0).abs() < 1e-6);
        let xs = candle_core::Tensor::arange(-40_000f32, 40_000., &candle_core::Device::Cpu)
            .unwrap()
            .affine(2e-4, 0.)
            .unwrap();
        let ours = Activation::Gelu.forward(&xs).unwrap();
        let candle = xs.gelu_erf().unwrap();
        // Relative to max(1, |x|): for large x, gelu(x) ~ x and one ulp of it exceeds 1e-6.
        let scale = xs.abs().unwrap().maximum(1f32).unwrap();
        let d: f32 = ((ours - candle).unwrap().abs().unwrap() / scale)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-6, "gelu: {d}");
    }

    #[test]
    fn empty_config_takes_transformers_defaults() {
        let c = Blip2Config::from_json_str("{}").unwrap();
        assert_eq!(c.vision.hidden_size, 1408);
        assert_eq!(c.vision.num_hidden_layers, 39);
        assert_eq!(c.vision.layer_norm_eps, 1e-6);
        assert_eq!(c.qformer.encoder_hidden_size, 1408);
        assert_eq!(c.qformer.layer_norm_eps, 1e-12);
        assert_eq!(c.num_query_tokens, 32);
        assert_eq!(c.image_token_index, None);
        assert_eq!(c.text.model_type(), "opt");
        assert_eq!(c.text.eos_token_ids(), vec![2]);
        assert_eq!(c.vision_tokens(), 257);
    }

    #[test]
    fn t5_activation_follows_dense_act_fn() {
        let json = r#"{"text_config": {"model_type": "t5", "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"}}"#;
        let c = Blip2Config::from_json_str(json).unwrap();
        let TextConfig::T5(t5) = c.text else {
            panic!("t5 expected")
        };
        assert_eq!(t5.activation().unwrap(), (Activation::Gelu, true));
        // The exact GELU's own closeness to libm is checked in
        // rational_erf_and_gelu_stay_close_to_libm.
        let json = r#"{"text_config": {"model_type": "t5", "feed_forward_proj": "gated-gelu"}}"#;
        let c = Blip2Config::from_json_str(json).unwrap();
        let TextConfig::T5(t5) = c.text else {
            panic!("t5 expected")
        };
        assert_eq!(t5.activation().unwrap(), (Activation::GeluTanh, true));
    }

    #[test]
    fn unknown_text_model_is_refused_by_name() {
        let err = Blip2Config::from_json_str(r#"{"text_config": {"model_type": "llama"}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("llama"), "{err}");
    }
}
