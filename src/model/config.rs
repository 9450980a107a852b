//! `Blip2Config` as transformers writes it to `config.json`, with transformers' defaults for every
//! field a checkpoint may leave out (transformers 4.57.6: `Blip2VisionConfig`, `Blip2QFormerConfig`,
//! `OPTConfig`, `T5Config`).

use serde::Deserialize;

use super::ModelError;
pub use crate::nn::Activation;

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
        // kernels::cpu::gelu's rational_erf_and_gelu_stay_close_to_libm.
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
