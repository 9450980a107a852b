//! Per-phase timings of one checkpoint, the machine's limits, and logits drift (a benchmark,
//! not a test). `tools/bench_vs_transformers.py` runs it beside transformers.
//!
//!     cargo run --release --example bench -- --model DIR [--quantize q8_0|q4k|int8] [--runs 3]
//!         [--steps 20] [--batch 8 [--batch 32]] [--vision-batch 8] [--device cuda:0]
//!         [--dtype f16] [--random-weights] [--mmap false] [--save-logits F | --compare-logits F]
//!
//! --random-weights builds the model from random values on the device, from the names and
//! shapes in DIR/tensor_shapes.json (`tools/make_large_checkpoint.py --shapes-only`): a
//! real-size model timed on a GPU without its 15 GB of files. On a GPU every timed phase ends
//! with a device synchronisation.
//!
//! Prints one JSON object: load time, peak RSS, the median time of each phase (preprocess,
//! vision encoder, Q-Former + projection, prefill, one decode step at batch 1 and at --batch,
//! one whole caption with --steps new tokens forced), the machine's read bandwidth and f32
//! matmul GFLOP/s, and the decode floor (language-model weight bytes read per step / bandwidth).
//! --save-logits writes, for four image/prompt pairs, the vision encoder's and the Q-Former's
//! outputs, the first-step logits and 20 greedy tokens; --compare-logits reads such a file (from
//! an f32 run) and reports each stage's smallest cosine, the logits' max |diff|, top-1
//! agreement and, per pair, the first position where the greedy tokens differ.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use blip2_server::config::{DTypeName, QuantizeName};
use blip2_server::device::DeviceSpec;
use blip2_server::generation::{DecodeBatch, GenerationParams, SequenceRequest};
use blip2_server::model::{Blip2Model, ModelFiles, TextConfig};
use blip2_server::{Blip2Pipeline, LoadOptions};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use rayon::prelude::*;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "none")]
    quantize: QuantizeName,
    #[arg(long, default_value = "tests/fixtures/images/photo_320x240.jpg")]
    image: PathBuf,
    #[arg(long, default_value = "a photo of")]
    prompt: String,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Batch sizes of the batched prefill and decode step (repeat for several).
    #[arg(long, default_values_t = [8])]
    batch: Vec<usize>,
    /// Also time the vision encoder on this many images at once (1: only the single image).
    #[arg(long, default_value_t = 1)]
    vision_batch: usize,
    #[arg(long, default_value = "cpu", value_parser = DeviceSpec::parse)]
    device: DeviceSpec,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeName,
    /// Random weights on the device, shaped as DIR/tensor_shapes.json says.
    #[arg(long)]
    random_weights: bool,
    #[arg(long)]
    save_logits: Option<PathBuf>,
    #[arg(long)]
    compare_logits: Option<PathBuf>,
    /// Map the f32 weights from the files (the server's `--mmap`), or read them into memory.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    mmap: bool,
    /// Skip the machine measurements.
    #[arg(long)]
    no_hardware: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds `f` takes, the device's queued work included (a GPU runs candle's ops
/// asynchronously: without the synchronisation a phase would time its launches only).
fn time<T>(device: &Device, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(f64, T)> {
    device.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    device.synchronize()?;
    Ok((t.elapsed().as_secs_f64(), out))
}

/// Random weights shaped as a checkpoint's `tensor_shapes.json`: N(0, 0.02), norm weights one
/// (as tools/make_large_checkpoint.py writes them), made on the device they are asked for.
struct RandomWeights(std::collections::HashMap<String, Vec<usize>>);

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.0.get(name) {
            Some(shape) if shape.as_slice() == s.dims() => self.get_unchecked(name, dtype, dev),
            Some(shape) => candle_core::bail!("{name}: shape {shape:?}, asked for {s:?}"),
            None => candle_core::bail!("{name} is not in tensor_shapes.json"),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = self.0.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{name} is not in tensor_shapes.json"))
        })?;
        let t = if name.to_lowercase().contains("norm") && name.ends_with(".weight") {
            Tensor::ones(shape.as_slice(), DType::F32, dev)?
        } else {
            Tensor::randn(0f32, 0.02, shape.as_slice(), dev)?
        };
        t.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// The pipeline of DIR with random weights on `options.device`.
fn random_pipeline(dir: &std::path::Path, options: &LoadOptions) -> anyhow::Result<Blip2Pipeline> {
    let shapes = std::fs::read(dir.join("tensor_shapes.json"))
        .with_context(|| format!("{}/tensor_shapes.json", dir.display()))?;
    let backend = RandomWeights(serde_json::from_slice(&shapes)?);
    blip2_server::nn::set_kernels(options.kernels);
    let tokenizer_config = dir.join("tokenizer_config.json");
    let files = ModelFiles {
        config: dir.join("config.json"),
        preprocessor_config: dir.join("preprocessor_config.json"),
        tokenizer: dir.join("tokenizer.json"),
        tokenizer_config: tokenizer_config.exists().then_some(tokenizer_config),
        weights: Vec::new(),
    };
    let config = blip2_server::model::blip2::read_config(&files.config)?;
    let vb = candle_nn::VarBuilder::from_backend(
        Box::new(backend),
        options.dtype,
        options.device.clone(),
    );
    let model = Blip2Model::from_var_builder(config, vb)?;
    Ok(Blip2Pipeline::with_model(model, &files, options.limits)?)
}

/// A `Vm...:` line of /proc/self/status, in bytes (0 where unreadable).
fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Peak resident set size of this process, in bytes.
fn peak_rss() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// Resident set size now, in bytes.
fn rss() -> u64 {
    proc_status_bytes("VmRSS:")
}

/// Read bandwidth in bytes/s: the median of 7 parallel sums over 1 GiB. The median, not the
/// best: one run of an earlier version read 59 GB/s where every other run, before and after, and
/// a C loop gave 27-36 GB/s, and the best of 5 reported it.
fn bandwidth() -> f64 {
    let data = vec![1.0f32; 256 * 1024 * 1024];
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        // 16 independent accumulators so the sum vectorises and only memory limits it.
        // One long sequential stream per thread, as the decode kernels read weights.
        let per_thread = data.len().div_ceil(rayon::current_num_threads());
        let s: f32 = data
            .par_chunks(per_thread)
            .map(|c| {
                let mut acc = [0.0f32; 16];
                for lane in c.chunks_exact(16) {
                    for (a, x) in acc.iter_mut().zip(lane) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        times.push(t.elapsed().as_secs_f64());
    }
    (data.len() * 4) as f64 / median(times)
}

/// A GPU's memory bandwidth in bytes/s: the median of 7 device copies of 1 GiB (each reads and
/// writes it).
fn device_bandwidth(device: &Device) -> anyhow::Result<f64> {
    let data = Tensor::ones(256 * 1024 * 1024, DType::F32, device)?;
    let mut times = Vec::new();
    for _ in 0..7 {
        let (t, copy) = time(device, || Ok(data.copy()?))?;
        drop(copy);
        times.push(t);
    }
    Ok(2.0 * (data.elem_count() * 4) as f64 / median(times))
}

/// Matmul GFLOP/s (candle) on the device in `dtype`, 512x2560 @ 2560x2560: prefill / vision
/// shaped (on a GPU, 4096 rows: one such product is too small to fill it).
fn gflops(device: &Device, dtype: DType) -> anyhow::Result<f64> {
    let m = if device.is_cpu() { 512 } else { 4096 };
    let (k, n) = (2560, 2560);
    let a = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), device)?.to_dtype(dtype)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let (t, c) = time(device, || Ok(a.matmul(&b)?))?;
        std::hint::black_box(c);
        best = best.min(t);
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// Multiply-adds x 2 of one image through the vision encoder (linear layers and attention).
fn vision_flops(c: &blip2_server::model::config::VisionConfig) -> f64 {
    let tokens = (c.image_size / c.patch_size).pow(2) + 1;
    let d = c.hidden_size;
    let per_layer = tokens * (4 * d * d + 2 * d * c.intermediate_size) + 2 * tokens * tokens * d;
    2.0 * (c.num_hidden_layers * per_layer) as f64
}

/// Bytes of language-model weights one decode step reads (every linear layer of the decoder
/// path and the head; embeddings are looked up, not read whole).
fn lm_step_bytes(text: &TextConfig, bytes_per_weight: f64) -> f64 {
    let weights = match text {
        TextConfig::Opt(c) => {
            let d = c.hidden_size;
            c.num_hidden_layers * (4 * d * d + 2 * d * c.ffn_dim) + c.vocab_size * d
        }
        TextConfig::T5(c) => {
            let inner = c.num_heads * c.d_kv;
            let d = c.d_model;
            let gated = c.feed_forward_proj.contains("gated");
            let ffn = if gated { 3 } else { 2 } * d * c.d_ff;
            // Self-attention q k v o, cross-attention q o (its keys and values are computed
            // once per request), the feed-forward.
            c.num_decoder_layers.unwrap_or(c.num_layers) * (4 * d * inner + 2 * d * inner + ffn)
                + c.vocab_size * d
        }
    };
    weights as f64 * bytes_per_weight
}

/// What --save-logits writes and --compare-logits reads: per image/prompt pair, each stage's
/// output (vision `last_hidden_state`, Q-Former output, first-step logits) and 20 greedy tokens.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stages {
    vision: Vec<Vec<f32>>,
    qformer: Vec<Vec<f32>>,
    logits: Vec<Vec<f32>>,
    tokens: Vec<Vec<u32>>,
}

fn stages(p: &Blip2Pipeline) -> anyhow::Result<Stages> {
    let images = [
        "rgb_640x480.png",
        "photo_320x240.jpg",
        "tall_300x1000.png",
        "rgba_100x37.png",
    ];
    let prompts = [
        None,
        Some("a photo of"),
        Some("Question: what is it? Answer:"),
        None,
    ];
    let flat = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let mut out = Stages {
        vision: Vec::new(),
        qformer: Vec::new(),
        logits: Vec::new(),
        tokens: Vec::new(),
    };
    for (img, prompt) in images.iter().zip(prompts) {
        let bytes = std::fs::read(format!("tests/fixtures/images/{img}"))?;
        let pixels = p.images.pixel_values(&bytes)?;
        let pv = p.images.batch_tensor(&[pixels], p.model.device())?;
        let features = p.model.image_features(&pv)?;
        let request = SequenceRequest::new(p.prompts.build(prompt)?, GenerationParams::default());
        let batch = DecodeBatch::prefill(&p.model, &p.prompts, &features.query_embeds, &[request])?;
        out.vision.push(flat(&features.vision_states)?);
        out.qformer.push(flat(&features.query_states)?);
        out.logits.push(flat(batch.logits())?);
        let params = GenerationParams {
            max_new_tokens: 20,
            min_new_tokens: 20,
            ..GenerationParams::default()
        };
        let generated = p.generate(&[bytes], &[prompt.map(str::to_string)], &[params])?;
        out.tokens.push(generated[0].sequences[0].token_ids.clone());
    }
    Ok(out)
}

/// The smallest cosine between paired vectors.
fn cosine_min(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let dot: f64 = a
                .iter()
                .zip(b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            dot / (na * nb)
        })
        .fold(f64::MAX, f64::min)
}

fn main() -> anyhow::Result<()> {
    blip2_server::tuning::init_process();
    let args = Args::parse();
    let device = args.device.open().map_err(anyhow::Error::msg)?;
    let options = LoadOptions {
        quantize: args.quantize.quantization(),
        dtype: args.dtype.dtype(),
        device: device.clone(),
        mmap: args.mmap,
        ..LoadOptions::default()
    };
    options.check().map_err(anyhow::Error::msg)?;
    let (load_s, p) = time(&device, || {
        if args.random_weights {
            return random_pipeline(&args.model, &options);
        }
        Ok(Blip2Pipeline::load_files(
            &ModelFiles::from_dir(&args.model)?,
            &options,
        )?)
    })?;
    blip2_server::tuning::keep_freed_memory();
    let (rss_after_load, peak_after_load) = (rss(), peak_rss());
    let bytes = std::fs::read(&args.image).with_context(|| args.image.display().to_string())?;
    let prompt = p.prompts.build(Some(&args.prompt))?;
    let forced = |n: usize| GenerationParams {
        max_new_tokens: n,
        min_new_tokens: n,
        ..GenerationParams::default()
    };
    let mut phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for _ in 0..args.runs {
        let (t, pixels) = time(&device, || Ok(p.images.pixel_values(&bytes)?))?;
        phases.entry("preprocess_s".into()).or_default().push(t);
        let pv = p.images.batch_tensor(&[pixels], p.model.device())?;
        let pv = pv.to_dtype(p.model.dtype())?;
        let (t, vision) = time(&device, || Ok(p.model.vision.forward(&pv)?))?;
        phases.entry("vision_s".into()).or_default().push(t);
        let (t, embeds) = time(&device, || Ok(p.model.project_queries(&vision)?))?;
        phases.entry("qformer_s".into()).or_default().push(t);
        if args.vision_batch > 1 {
            let pv_b = Tensor::cat(&vec![pv.clone(); args.vision_batch], 0)?;
            let (t, _) = time(&device, || Ok(p.model.vision.forward(&pv_b)?))?;
            phases.entry("vision_batch_s".into()).or_default().push(t);
        }
        // The first --batch keeps the historical keys (BENCHMARKS.md, the plot); every batch
        // size also has its own.
        let mut sizes = vec![(1, "prefill_s".to_string(), "decode_step_s".to_string())];
        for (i, &b) in args.batch.iter().enumerate() {
            if i == 0 {
                sizes.push((b, "prefill_batch_s".into(), "decode_step_batch_s".into()));
            }
            sizes.push((b, format!("prefill_b{b}_s"), format!("decode_step_b{b}_s")));
        }
        for (b, key, step_key) in sizes {
            let embeds_b = Tensor::cat(&vec![embeds.clone(); b], 0)?;
            let requests = vec![SequenceRequest::new(prompt.clone(), forced(args.steps + 1)); b];
            let (t, mut batch) = time(&device, || {
                Ok(DecodeBatch::prefill(
                    &p.model, &p.prompts, &embeds_b, &requests,
                )?)
            })?;
            phases.entry(key).or_default().push(t);
            let mut steps = Vec::new();
            for _ in 0..args.steps {
                steps.push(time(&device, || Ok(batch.step()?))?.0);
            }
            phases.entry(step_key).or_default().push(median(steps));
        }
        let (t, _) = time(&device, || {
            Ok(p.generate(
                std::slice::from_ref(&bytes),
                &[Some(args.prompt.clone())],
                &[forced(args.steps)],
            )?)
        })?;
        phases.entry("caption_s".into()).or_default().push(t);
    }
    let mut report = serde_json::json!({
        "model": args.model.display().to_string(),
        "quantize": args.quantize.as_str(),
        "device": blip2_server::device::location(&device),
        "device_name": blip2_server::device::hardware_name(&device),
        "dtype": format!("{:?}", p.model.dtype()).to_lowercase(),
        "random_weights": args.random_weights,
        "vision_batch": args.vision_batch,
        "threads": rayon::current_num_threads(),
        "load_s": load_s,
        "rss_after_load": rss_after_load,
        "peak_rss_after_load": peak_after_load,
        "steps": args.steps,
        "batch": args.batch[0],
        "batches": args.batch,
    });
    for (k, v) in phases {
        report[k.as_str()] = median(v).into();
    }
    let bytes_per_weight = match args.quantize {
        QuantizeName::None => match p.model.dtype() {
            DType::F32 => 4.0,
            _ => 2.0,
        },
        QuantizeName::Q8_0 => 34.0 / 32.0,
        QuantizeName::Q4K => 144.0 / 256.0,
        QuantizeName::Int8 => 1.0,
    };
    report["lm_step_bytes"] = lm_step_bytes(&p.model.config.text, bytes_per_weight).into();
    // Before the machine measurements, whose buffers are not the model's.
    report["peak_rss"] = peak_rss().into();
    if !args.no_hardware {
        let bw = if device.is_cpu() {
            bandwidth()
        } else {
            device_bandwidth(&device)?
        };
        // The CPU's rate is f32's (its matrix products run in f32 whatever the weights).
        let rate = gflops(
            &device,
            if device.is_cpu() {
                DType::F32
            } else {
                p.model.dtype()
            },
        )?;
        report["bandwidth_gb_s"] = (bw / 1e9).into();
        report["matmul_gflops"] = rate.into();
        report["decode_floor_s"] =
            (lm_step_bytes(&p.model.config.text, bytes_per_weight) / bw).into();
        let flops = vision_flops(&p.model.config.vision);
        report["vision_flops"] = flops.into();
        report["vision_floor_s"] = (flops / (rate * 1e9)).into();
    }
    if let Some(path) = &args.save_logits {
        std::fs::write(path, serde_json::to_vec(&stages(&p)?)?)?;
    }
    if let Some(path) = &args.compare_logits {
        let reference: Stages = serde_json::from_slice(&std::fs::read(path)?)?;
        let ours = stages(&p)?;
        let mut max_abs = 0f32;
        let mut agree = 0;
        for (a, b) in ours.logits.iter().zip(&reference.logits) {
            for (x, y) in a.iter().zip(b) {
                max_abs = max_abs.max((x - y).abs());
            }
            let argmax = |v: &[f32]| {
                v.iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1))
                    .map(|(i, _)| i)
            };
            agree += usize::from(argmax(a) == argmax(b));
        }
        report["vision_cosine_min"] = cosine_min(&ours.vision, &reference.vision).into();
        report["qformer_cosine_min"] = cosine_min(&ours.qformer, &reference.qformer).into();
        report["logits_cosine_min"] = cosine_min(&ours.logits, &reference.logits).into();
        report["logits_max_abs"] = max_abs.into();
        report["top1_agreement"] = format!("{agree}/{}", ours.logits.len()).into();
        // Per pair: the first position where the 20 greedy tokens differ (null: none differ).
        let first_difference: Vec<Option<usize>> = ours
            .tokens
            .iter()
            .zip(&reference.tokens)
            .map(|(a, b)| (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)))
            .collect();
        report["greedy_first_difference"] = serde_json::to_value(first_difference)?;
    }
    println!("{report}");
    Ok(())
}
