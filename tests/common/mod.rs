//! Shared helpers for the integration tests: fixture paths, golden files, tensor comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
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
    let ours = ours
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
