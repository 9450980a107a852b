//! `serve` settings, in layers: `config/default.toml` (compiled in) < a `--config` file <
//! `BLIP2_<KEY>` environment variables < `--<key>` flags. Each layer is a partial TOML table;
//! the merged table must name only known keys and is checked by [`ServerConfig::validate`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::generation::MAX_NEW_TOKENS;

/// The defaults, and the documentation of every key.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DTypeName {
    F32,
    F16,
    Bf16,
}

impl DTypeName {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// `--quantize`: the vision encoder's, Q-Former's and language model's linear weights, at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum QuantizeName {
    #[serde(rename = "none")]
    #[value(name = "none")]
    None,
    #[serde(rename = "q8_0")]
    #[value(name = "q8_0")]
    Q8_0,
    #[serde(rename = "q4k")]
    #[value(name = "q4k")]
    Q4K,
    #[serde(rename = "int8")]
    #[value(name = "int8")]
    Int8,
}

impl QuantizeName {
    /// The name as configured ("none", "q8_0", "q4k", "int8").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4k",
            Self::Int8 => "int8",
        }
    }

    pub fn quantization(self) -> Option<crate::nn::Quantization> {
        use crate::nn::Quantization;
        match self {
            Self::None => None,
            Self::Q8_0 => Some(Quantization::Q8_0),
            Self::Q4K => Some(Quantization::Q4K),
            Self::Int8 => Some(Quantization::Int8),
        }
    }
}

/// `--kernels`: the CPU kernels where they apply, or candle's ops only (what a GPU runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KernelsName {
    Auto,
    Generic,
}

impl KernelsName {
    pub fn kernels(self) -> crate::nn::Kernels {
        match self {
            Self::Auto => crate::nn::Kernels::Auto,
            Self::Generic => crate::nn::Kernels::Generic,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting of `serve`; see `config/default.toml` for what each one does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub model: String,
    pub revision: String,
    pub dtype: DTypeName,
    pub quantize: QuantizeName,
    pub device: String,
    pub kernels: KernelsName,
    pub mmap: bool,
    pub host: String,
    pub port: u16,
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_queue: usize,
    pub max_wait_ms: u64,
    pub max_concurrent_requests: usize,
    pub max_connections: usize,
    pub header_timeout_s: u64,
    pub body_timeout_s: u64,
    pub request_timeout_s: u64,
    pub max_body_bytes: usize,
    pub max_buffered_bytes: usize,
    pub max_buffered_wait_ms: u64,
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub max_images_per_request: usize,
    pub image_size: String,
    pub max_image_side: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub preprocess_workers: usize,
    pub image_cache_size: usize,
    pub vqa_template_opt: String,
    pub vqa_template_t5: String,
    pub api_key: String,
    pub cors_allow_origins: Vec<String>,
    pub image_url_allowed_hosts: Vec<String>,
    pub image_url_allow_private: bool,
    pub image_url_max_redirects: u32,
    pub image_url_timeout_s: u64,
    pub log_format: LogFormat,
    pub shutdown_delay_s: u64,
    pub shutdown_grace_s: u64,
}

/// The flags of `serve`. Each is optional: one left out keeps the value of a lower layer.
#[derive(Debug, Default, Clone, Serialize, clap::Args)]
pub struct ServeArgs {
    /// A TOML file of settings (keys as in config/default.toml); environment and flags override it.
    #[arg(long, env = "BLIP2_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// A checkpoint directory or a Hugging Face Hub id, e.g. Salesforce/blip2-opt-2.7b (required).
    #[arg(long, env = "BLIP2_MODEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) when --model is a Hub id [default: main].
    #[arg(long, env = "BLIP2_REVISION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Weight dtype; f32 is exact to the reference, f16 is refused for Flan-T5, bf16 on the CPU
    /// (10x slower than f32 there) [default: f32].
    #[arg(long, value_enum, env = "BLIP2_DTYPE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DTypeName>,
    /// Quantise the vision encoder's, Q-Former's and language model's linear weights at load
    /// (not exact to the reference; see BENCHMARKS.md for the drift) [default: none].
    #[arg(long, value_enum, env = "BLIP2_QUANTIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize: Option<QuantizeName>,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature
    /// and a GPU) [default: cpu].
    #[arg(long, env = "BLIP2_DEVICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// auto: the CPU kernels where they apply; generic: candle's ops only, the operations the
    /// GPU path runs (a check, slower) [default: auto].
    #[arg(long, value_enum, env = "BLIP2_KERNELS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernels: Option<KernelsName>,
    /// Map the checkpoint's files and use their pages as the f32 weights: no copy, and a start
    /// at the page cache's speed when the files are cached; false reads them into memory (for
    /// files that may change under the server, or filesystems that map poorly) [default: true].
    #[arg(long, env = "BLIP2_MMAP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmap: Option<bool>,
    /// Address to listen on [default: 0.0.0.0].
    #[arg(long, env = "BLIP2_HOST")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port to listen on (0 = any free port) [default: 8080].
    #[arg(long, env = "BLIP2_PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Most requests decoding together [default: 8].
    #[arg(long, env = "BLIP2_MAX_BATCH_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<usize>,
    /// Token budget of the running batch: sum of (query + prompt tokens + max_new_tokens) x rows
    /// [default: 32768].
    #[arg(long, env = "BLIP2_MAX_BATCH_TOKENS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<usize>,
    /// Most requests waiting for admission; more are answered 429 [default: 64].
    #[arg(long, env = "BLIP2_MAX_QUEUE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    /// How long an idle worker holding a first request waits for requests still being received
    /// or preprocessed, to start them as one batch, in ms [default: 50].
    #[arg(long, env = "BLIP2_MAX_WAIT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
    /// Requests in flight at once; more are answered 429 [default: 256].
    #[arg(long, env = "BLIP2_MAX_CONCURRENT_REQUESTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<usize>,
    /// Connections open at once; more wait in the listen backlog [default: 2048].
    #[arg(long, env = "BLIP2_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Seconds a request head has to arrive, counted from when the connection waits for it
    /// (so it also closes connections idle this long, HTTP/1 and HTTP/2: keep it above the
    /// balancer's idle timeout) [default: 75].
    #[arg(long, env = "BLIP2_HEADER_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout_s: Option<u64>,
    /// Seconds the whole request body has to arrive after its head (408 after it) [default: 60].
    #[arg(long, env = "BLIP2_BODY_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_timeout_s: Option<u64>,
    /// Seconds before an unfinished request is cancelled and answered 504; 0 = none [default: 300].
    #[arg(long, env = "BLIP2_REQUEST_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout_s: Option<u64>,
    /// Largest request body, in bytes [default: 33554432].
    #[arg(long, env = "BLIP2_MAX_BODY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Memory budget of request bodies being read and decoded at once, in bytes; a body
    /// reserves 4x its length until its images are preprocessed (503 + Retry-After when the
    /// budget stays full for max_buffered_wait_ms) [default: 268435456].
    #[arg(long, env = "BLIP2_MAX_BUFFERED_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_buffered_bytes: Option<usize>,
    /// How long a request waits for room in max_buffered_bytes before its 503 [default: 2000].
    #[arg(long, env = "BLIP2_MAX_BUFFERED_WAIT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_buffered_wait_ms: Option<u64>,
    /// Largest image file, in bytes [default: 20971520].
    #[arg(long, env = "BLIP2_MAX_IMAGE_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_image_bytes: Option<usize>,
    /// Largest image, in pixels, checked before decoding [default: 40000000].
    #[arg(long, env = "BLIP2_MAX_IMAGE_PIXELS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_image_pixels: Option<u64>,
    /// Most images in one request [default: 16].
    #[arg(long, env = "BLIP2_MAX_IMAGES_PER_REQUEST")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_images_per_request: Option<usize>,
    /// Size images are resized to, N or HxW (multiples of the patch size; the position
    /// embeddings are interpolated); empty = the checkpoint's [default: empty].
    #[arg(long, env = "BLIP2_IMAGE_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<String>,
    /// Largest image side, in pixels, that image_size (this setting or a request's field) may
    /// ask for [default: 448].
    #[arg(long, env = "BLIP2_MAX_IMAGE_SIDE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_image_side: Option<usize>,
    /// Longest prompt, in tokens [default: 512].
    #[arg(long, env = "BLIP2_MAX_PROMPT_TOKENS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prompt_tokens: Option<usize>,
    /// Largest max_new_tokens a request may ask for [default: 512].
    #[arg(long, env = "BLIP2_MAX_NEW_TOKENS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// Images decoded and preprocessed at once, off the async runtime [default: 2].
    #[arg(long, env = "BLIP2_PREPROCESS_WORKERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preprocess_workers: Option<usize>,
    /// Recent images whose vision + Q-Former output is kept, by content; 0 = off [default: 64].
    #[arg(long, env = "BLIP2_IMAGE_CACHE_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_cache_size: Option<usize>,
    /// VQA prompt for OPT models; {} is the question [default: "Question: {} Answer:"].
    #[arg(long, env = "BLIP2_VQA_TEMPLATE_OPT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vqa_template_opt: Option<String>,
    /// VQA prompt for Flan-T5 models [default: "Question: {} Short answer:"].
    #[arg(long, env = "BLIP2_VQA_TEMPLATE_T5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vqa_template_t5: Option<String>,
    /// Bearer key required on /v1/*; empty = open [default: empty].
    #[arg(long, env = "BLIP2_API_KEY", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// CORS origins, comma-separated, or * [default: empty].
    #[arg(long, env = "BLIP2_CORS_ALLOW_ORIGINS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors_allow_origins: Option<Vec<String>>,
    /// Hosts image URLs may be fetched from: names, *.suffix, or *; comma-separated; empty =
    /// URLs refused [default: empty].
    #[arg(long, env = "BLIP2_IMAGE_URL_ALLOWED_HOSTS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_url_allowed_hosts: Option<Vec<String>>,
    /// Fetch image URLs from loopback, private, link-local and other non-public addresses
    /// [default: false].
    #[arg(long, env = "BLIP2_IMAGE_URL_ALLOW_PRIVATE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_url_allow_private: Option<bool>,
    /// Redirects an image URL may take, each hop checked again [default: 0].
    #[arg(long, env = "BLIP2_IMAGE_URL_MAX_REDIRECTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_url_max_redirects: Option<u32>,
    /// Seconds a whole image-URL fetch may take [default: 10].
    #[arg(long, env = "BLIP2_IMAGE_URL_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_url_timeout_s: Option<u64>,
    /// Log format on stderr (RUST_LOG filters) [default: text].
    #[arg(long, value_enum, env = "BLIP2_LOG_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Seconds after SIGTERM/SIGINT during which /ready answers 503 while requests are still
    /// served, so a load balancer stops sending first [default: 5].
    #[arg(long, env = "BLIP2_SHUTDOWN_DELAY_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_delay_s: Option<u64>,
    /// Seconds in-flight requests get to finish once the listener is closed [default: 30].
    #[arg(long, env = "BLIP2_SHUTDOWN_GRACE_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_s: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn parse_table(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    })
}

/// Later tables override earlier ones key by key.
fn merge(layers: Vec<toml::Table>) -> toml::Table {
    let mut merged = toml::Table::new();
    for layer in layers {
        merged.extend(layer);
    }
    merged
}

impl ServerConfig {
    /// The defaults alone (what config/default.toml says).
    pub fn defaults() -> Self {
        Self::from_layers(Vec::new()).expect("config/default.toml is valid")
    }

    /// Defaults, then each TOML text in order (`origin` names it in errors).
    pub fn from_tomls(texts: &[(&str, &str)]) -> Result<Self, ConfigError> {
        let layers = texts
            .iter()
            .map(|(text, origin)| parse_table(text, origin))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_layers(layers)
    }

    fn from_layers(layers: Vec<toml::Table>) -> Result<Self, ConfigError> {
        let mut all = vec![parse_table(DEFAULT_TOML, "config/default.toml")?];
        all.extend(layers);
        let merged = merge(all);
        ServerConfig::deserialize(merged).map_err(|e| ConfigError::Parse {
            origin: "configuration".into(),
            message: e.message().to_string(),
        })
    }

    /// The full layering for `serve`: defaults < `--config` < environment < flags (clap has
    /// already put environment values where no flag was given).
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut layers = Vec::new();
        if let Some(path) = &args.config {
            layers.push(read_file(path)?);
        }
        let given = toml::Table::try_from(args).map_err(|e| ConfigError::Parse {
            origin: "flags and environment".into(),
            message: e.to_string(),
        })?;
        layers.push(given);
        let config = Self::from_layers(layers)?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses values the server cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        if self.model.trim().is_empty() {
            return Err(invalid(
                "model",
                "no model given: pass --model <dir|hub-id>, BLIP2_MODEL, or `model` in a --config file",
            ));
        }
        let at_least_one: [(&'static str, usize); 12] = [
            ("max_image_side", self.max_image_side),
            ("max_batch_size", self.max_batch_size),
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_queue", self.max_queue),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("max_images_per_request", self.max_images_per_request),
            ("max_prompt_tokens", self.max_prompt_tokens),
            ("max_buffered_bytes", self.max_buffered_bytes),
            ("max_connections", self.max_connections),
            ("header_timeout_s", self.header_timeout_s as usize),
            ("body_timeout_s", self.body_timeout_s as usize),
            ("preprocess_workers", self.preprocess_workers),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let device = self.device_spec().map_err(|e| invalid("device", e))?;
        if !device.compiled_in() {
            return Err(invalid("device", device.open().err().unwrap_or_default()));
        }
        if let Some(size) = self.default_image_size() {
            let size = size.map_err(|e| invalid("image_size", e))?;
            if size.height.max(size.width) > self.max_image_side {
                return Err(invalid(
                    "image_size",
                    format!(
                        "{size} has a side over max_image_side ({})",
                        self.max_image_side
                    ),
                ));
            }
        }
        if self.image_url_timeout_s == 0 {
            return Err(invalid("image_url_timeout_s", "must be at least 1"));
        }
        if self
            .image_url_allowed_hosts
            .iter()
            .any(|h| h.trim().is_empty())
        {
            return Err(invalid("image_url_allowed_hosts", "empty host name"));
        }
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS {
            return Err(invalid(
                "max_new_tokens",
                format!("must be between 1 and {MAX_NEW_TOKENS}"),
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid("max_body_bytes", "must be at least 1024"));
        }
        if self.max_image_bytes == 0 || self.max_image_pixels == 0 {
            return Err(invalid(
                "max_image_bytes",
                "max_image_bytes and max_image_pixels must be at least 1",
            ));
        }
        for (key, template) in [
            ("vqa_template_opt", &self.vqa_template_opt),
            ("vqa_template_t5", &self.vqa_template_t5),
        ] {
            if template.matches("{}").count() != 1 {
                return Err(invalid(
                    key,
                    format!("{template:?} must contain \"{{}}\" exactly once"),
                ));
            }
        }
        for origin in &self.cors_allow_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(invalid(
                    "cors_allow_origins",
                    format!("{origin:?} is not a valid origin"),
                ));
            }
        }
        if self.cors_allow_origins.len() > 1 && self.cors_allow_origins.iter().any(|o| o == "*") {
            return Err(invalid(
                "cors_allow_origins",
                "\"*\" cannot be combined with other origins",
            ));
        }
        if !self.api_key.is_empty()
            && axum::http::HeaderValue::from_str(&format!("Bearer {}", self.api_key)).is_err()
        {
            return Err(invalid(
                "api_key",
                "must be printable ASCII (it is sent in a header)",
            ));
        }
        Ok(())
    }
}

impl ServerConfig {
    /// `device`, parsed.
    pub fn device_spec(&self) -> Result<crate::device::DeviceSpec, String> {
        crate::device::DeviceSpec::parse(&self.device)
    }

    /// `image_size` when set (empty: the checkpoint's), parsed.
    pub fn default_image_size(&self) -> Option<Result<crate::preprocess::ImageSize, String>> {
        let text = self.image_size.trim();
        (!text.is_empty()).then(|| crate::preprocess::ImageSize::parse(text))
    }

    /// The `vqa_template_<model_type>` keys, by model type.
    pub fn vqa_templates(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("opt", &self.vqa_template_opt),
            ("t5", &self.vqa_template_t5),
        ]
        .into_iter()
        .map(|(family, template)| (family.to_string(), template.clone()))
        .collect()
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_table(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ServeArgs {
        ServeArgs {
            model: Some("some/model".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_parse_and_match_the_documented_limits() {
        let c = ServerConfig::defaults();
        let limits = crate::preprocess::ImageLimits::default();
        assert_eq!(c.max_image_bytes, limits.max_bytes);
        assert_eq!(c.max_image_pixels, limits.max_pixels);
        assert_eq!(c.model, "");
        // Every key of the struct is in the file (deny_unknown_fields + no serde defaults means
        // a key missing from the file fails `defaults()`), and every key has a flag.
        let table: toml::Table = DEFAULT_TOML.parse().unwrap();
        let flags = toml::Table::try_from(ServeArgs {
            config: None,
            model: Some(String::new()),
            revision: Some(String::new()),
            dtype: Some(DTypeName::F32),
            quantize: Some(QuantizeName::None),
            device: Some(String::new()),
            kernels: Some(KernelsName::Auto),
            mmap: Some(true),
            host: Some(String::new()),
            port: Some(0),
            max_batch_size: Some(0),
            max_batch_tokens: Some(0),
            max_queue: Some(0),
            max_wait_ms: Some(0),
            max_concurrent_requests: Some(0),
            max_connections: Some(0),
            header_timeout_s: Some(0),
            body_timeout_s: Some(0),
            request_timeout_s: Some(0),
            max_body_bytes: Some(0),
            max_buffered_bytes: Some(0),
            max_buffered_wait_ms: Some(0),
            max_image_bytes: Some(0),
            max_image_pixels: Some(0),
            max_images_per_request: Some(0),
            image_size: Some(String::new()),
            max_image_side: Some(0),
            max_prompt_tokens: Some(0),
            max_new_tokens: Some(0),
            preprocess_workers: Some(0),
            image_cache_size: Some(0),
            vqa_template_opt: Some(String::new()),
            vqa_template_t5: Some(String::new()),
            api_key: Some(String::new()),
            cors_allow_origins: Some(Vec::new()),
            image_url_allowed_hosts: Some(Vec::new()),
            image_url_allow_private: Some(false),
            image_url_max_redirects: Some(0),
            image_url_timeout_s: Some(0),
            log_format: Some(LogFormat::Text),
            shutdown_delay_s: Some(0),
            shutdown_grace_s: Some(0),
        })
        .unwrap();
        let mut file_keys: Vec<_> = table.keys().collect();
        let mut flag_keys: Vec<_> = flags.keys().collect();
        file_keys.sort();
        flag_keys.sort();
        assert_eq!(file_keys, flag_keys);
    }

    /// How `--help` and README.md spell a default: strings bare (quoted when they hold a
    /// space), empty strings and lists as "empty".
    fn spelled(value: &toml::Value) -> String {
        match value {
            toml::Value::String(s) if s.is_empty() => "empty".into(),
            toml::Value::String(s) if s.contains(' ') => format!("{s:?}"),
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(a) if a.is_empty() => "empty".into(),
            other => other.to_string(),
        }
    }

    /// docker/compose.yaml hands every setting in the calling shell to the replicas; a key
    /// added to config/default.toml must be added there too (the file sets model, host, port
    /// and log_format itself).
    #[test]
    fn compose_passes_every_setting_through() {
        let compose = include_str!("../docker/compose.yaml");
        let table: toml::Table = DEFAULT_TOML.parse().unwrap();
        let missing: Vec<String> = table
            .keys()
            .map(|k| format!("BLIP2_{}", k.to_uppercase()))
            .filter(|var| {
                !compose.contains(&format!("- {var}")) && !compose.contains(&format!("- {var}="))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "docker/compose.yaml does not pass {missing:?}"
        );
    }

    /// config/default.toml is the one source of the defaults: every flag's `--help` states the
    /// file's value, and so does README.md's table.
    #[test]
    fn help_and_readme_state_the_defaults_of_config_default_toml() {
        use clap::Args;
        let table: toml::Table = DEFAULT_TOML.parse().unwrap();
        let command = ServeArgs::augment_args(clap::Command::new("serve"));
        let mut checked = 0;
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let key = long.replace('-', "_");
            if key == "config" || key == "model" {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let want = spelled(&table[&key]);
            assert!(
                help.ends_with(&format!("[default: {want}]")),
                "--{long}: help {help:?} does not end with [default: {want}]"
            );
            checked += 1;
        }
        assert_eq!(checked, table.len() - 1, "every key but `model` has a flag");
        let readme = include_str!("../README.md");
        let mut rows = 0;
        for line in readme.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split(" | ").collect();
            let keys: Vec<&str> = cells[0]
                .trim_start_matches("| ")
                .split(", ")
                .map(|k| k.trim_matches('`'))
                .collect();
            if !keys.iter().all(|k| table.contains_key(*k)) || keys == ["model"] {
                continue;
            }
            let values: Vec<String> = if cells[1].contains('`') {
                cells[1]
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect()
            } else {
                cells[1]
                    .split(", ")
                    .map(|v| v.split(' ').next().unwrap_or("").to_string())
                    .collect()
            };
            assert_eq!(keys.len(), values.len(), "README row {line:?}");
            for (key, value) in keys.iter().zip(&values) {
                let want = spelled(&table[*key]);
                assert_eq!(value, want.trim_matches('"'), "README default of `{key}`");
                rows += 1;
            }
        }
        assert_eq!(
            rows,
            table.len() - 1,
            "README's table lists every key but `model`"
        );
    }

    #[test]
    fn layers_override_in_order() {
        let dir = std::env::temp_dir().join(format!("blip2-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "max_batch_size = 3\nport = 9000\nlog_format = \"json\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            port: Some(9001),
            ..base()
        };
        let c = ServerConfig::load(&args).unwrap();
        assert_eq!(c.max_batch_size, 3); // file over default
        assert_eq!(c.port, 9001); // flag over file
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.max_queue, ServerConfig::defaults().max_queue);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_settings_are_refused_with_the_key() {
        let unknown = ServerConfig::from_tomls(&[("max_batch_sise = 3", "f.toml")]).unwrap_err();
        assert!(unknown.to_string().contains("max_batch_sise"), "{unknown}");
        let wrong_type = ServerConfig::from_tomls(&[("port = \"x\"", "f.toml")]).unwrap_err();
        assert!(wrong_type.to_string().contains("port") || wrong_type.to_string().contains("u16"));
        let zero = ServerConfig::load(&ServeArgs {
            max_batch_size: Some(0),
            ..base()
        })
        .unwrap_err();
        assert!(zero.to_string().contains("max_batch_size"), "{zero}");
        let no_model = ServerConfig::load(&ServeArgs::default()).unwrap_err();
        assert!(no_model.to_string().contains("--model"), "{no_model}");
        for bad in ["0", "12x", "500x14"] {
            let size = ServerConfig::load(&ServeArgs {
                image_size: Some(bad.into()),
                ..base()
            })
            .unwrap_err();
            assert!(size.to_string().contains("image_size"), "{bad}: {size}");
        }
        let ok = ServerConfig::load(&ServeArgs {
            image_size: Some("224x448".into()),
            ..base()
        })
        .unwrap();
        assert_eq!(
            ok.default_image_size(),
            Some(Ok(crate::preprocess::ImageSize::new(224, 448)))
        );
        let template = ServerConfig::load(&ServeArgs {
            vqa_template_t5: Some("no placeholder".into()),
            ..base()
        })
        .unwrap_err();
        assert!(
            template.to_string().contains("vqa_template_t5"),
            "{template}"
        );
    }
}
