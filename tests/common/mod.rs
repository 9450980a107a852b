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

// --- a server process, for the tests that need one (tests/cli.rs, tests/limits.rs) ---

/// Starts `serve` on the tiny model with extra args/env; returns the child and its address
/// once it is ready.
pub fn spawn_server(args: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String) {
    let (child, addr) = spawn_listening(args, env);
    // The server listens while the model loads: wait until it is ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !http_raw(
        &addr,
        "GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .starts_with("HTTP/1.1 200")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (child, addr)
}

/// Starts `serve` and returns as soon as it listens (before the model is loaded).
pub fn spawn_listening(args: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let model = model_dir("opt-tiny");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_blip2-server"))
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .env("BLIP2_MODEL", model.to_str().unwrap())
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "server exited before serving"
        );
        if let Some(rest) = line.split("address=").nth(1) {
            let token = rest.split_whitespace().next().unwrap();
            break token
                .chars()
                .filter(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect::<String>();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (child, addr)
}

/// One HTTP/1.1 exchange on a fresh connection; returns the raw response.
pub fn http_raw(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
}

pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A spawned server, killed when dropped (also when a test fails half-way: a live child would
/// keep the test's output pipe open).
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident and peak resident memory of a process, in bytes.
pub fn rss_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}
