//! Shared helpers for the integration tests: fixture paths, golden files, tensor comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

/// tests/fixtures of this checkout, or of `BLIP2_TEST_ROOT` (a test binary run elsewhere than
/// where it was built, as tools/device_check.sh does on the GPU machine).
pub fn fixtures() -> PathBuf {
    let root = std::env::var_os("BLIP2_TEST_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf());
    root.join("tests").join("fixtures")
}

/// The load options of the parity and batching tests: the CPU with its kernels unless
/// `BLIP2_TEST_KERNELS=generic` (candle's ops only: the operations the GPU path runs; `.ci/run`
/// runs both) or `BLIP2_TEST_DEVICE=cuda:N` (a CUDA build on a GPU: tools/device_check.sh).
pub fn load_options() -> blip2_server::LoadOptions {
    use blip2_server::device::DeviceSpec;
    use blip2_server::nn::Kernels;
    let device = std::env::var("BLIP2_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = DeviceSpec::parse(&device)
        .and_then(DeviceSpec::open)
        .unwrap_or_else(|e| panic!("BLIP2_TEST_DEVICE: {e}"));
    let kernels = match std::env::var("BLIP2_TEST_KERNELS").as_deref() {
        Ok("generic") => Kernels::Generic,
        Ok("auto") | Err(_) => Kernels::Auto,
        Ok(other) => panic!("BLIP2_TEST_KERNELS={other}: expected auto or generic"),
    };
    blip2_server::LoadOptions {
        device,
        kernels,
        ..Default::default()
    }
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn image_path(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub model: String,
    pub layout: String,
    pub language_model: String,
    pub cases: Vec<GoldenCase>,
}

#[derive(Debug, Deserialize)]
pub struct GoldenCase {
    pub name: String,
    pub kind: String,
    pub images: Vec<String>,
    pub prompts: Option<Vec<String>>,
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u8>>,
    pub runs: Vec<GoldenRun>,
    /// Stage name -> key in golden.safetensors (image-only stages are shared between the cases
    /// of one image). Absent for batch cases.
    #[serde(default)]
    pub tensor_keys: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
pub struct GoldenRun {
    pub name: String,
    pub max_new_tokens: usize,
    pub min_new_tokens: Option<usize>,
    pub new_tokens_trimmed: Vec<Vec<u32>>,
    pub text: Vec<String>,
}

impl GoldenCase {
    /// The prompt of row `i` (None: no prompt).
    pub fn prompt(&self, i: usize) -> Option<String> {
        self.prompts.as_ref().map(|p| p[i].clone())
    }
}

pub fn load_golden(model: &str) -> (Golden, HashMap<String, Tensor>) {
    let dir = model_dir(model).join("golden");
    let json = std::fs::read_to_string(dir.join("golden.json")).expect("golden.json");
    let golden: Golden = serde_json::from_str(&json).expect("golden.json parses");
    let tensors = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu)
        .expect("golden.safetensors");
    (golden, tensors)
}

/// Largest absolute difference; panics on a shape mismatch.
pub fn max_abs_diff(ours: &Tensor, theirs: &Tensor) -> f32 {
    assert_eq!(ours.dims(), theirs.dims(), "shapes differ");
    // On the host: a test may run the model on a GPU (BLIP2_TEST_DEVICE), the goldens are read
    // on the CPU.
    let ours = ours
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    let theirs = theirs
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    (ours - theirs)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `max |ours - theirs| <= tol` and returns that difference.
pub fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor, tol: f32) -> f32 {
    let diff = max_abs_diff(ours, theirs);
    assert!(
        diff <= tol,
        "{what}: max |ours - reference| = {diff:e} > {tol:e}"
    );
    diff
}
