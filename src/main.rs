//! Command line: `blip2-server generate` runs one batch through a checkpoint and prints the
//! result, one line per image.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};

use blip2_server::generation::GenerationOverrides;
use blip2_server::model::ModelSource;
use blip2_server::preprocess::ImageLimits;
use blip2_server::{Blip2Pipeline, LoadOptions, PipelineError};

#[derive(Parser)]
#[command(
    name = "blip2-server",
    version,
    about = "BLIP-2 inference, exact to transformers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over HTTP: POST /v1/caption, /v1/vqa (JSON, optional SSE streaming),
    /// GET /health, /ready, /info, /metrics. SIGTERM/SIGINT drain in-flight requests, then exit.
    Serve {
        /// A checkpoint directory or a Hugging Face Hub id (see `generate --help`).
        #[arg(long, env = "BLIP2_MODEL")]
        model: String,
        /// Hub revision when --model is a Hub id.
        #[arg(long, default_value = "main", env = "BLIP2_REVISION")]
        revision: String,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0", env = "BLIP2_HOST")]
        host: String,
        #[arg(long, default_value_t = 8080, env = "BLIP2_PORT")]
        port: u16,
        /// Weight dtype.
        #[arg(long, value_enum, default_value = "f32", env = "BLIP2_DTYPE")]
        dtype: DTypeArg,
        /// Most requests decoding together.
        #[arg(long, default_value_t = 8, env = "BLIP2_MAX_BATCH_SIZE")]
        max_batch_size: usize,
        /// Most requests waiting; more are answered 429.
        #[arg(long, default_value_t = 64, env = "BLIP2_MAX_QUEUE")]
        max_queue: usize,
        /// How long an idle worker waits to gather a batch, in milliseconds.
        #[arg(long, default_value_t = 5, env = "BLIP2_MAX_WAIT_MS")]
        max_wait_ms: u64,
        /// Largest request body, in bytes.
        #[arg(long, default_value_t = 32 * 1024 * 1024, env = "BLIP2_MAX_BODY_BYTES")]
        max_body_bytes: usize,
        /// Largest accepted image file, in bytes.
        #[arg(long, default_value_t = ImageLimits::default().max_bytes, env = "BLIP2_MAX_IMAGE_BYTES")]
        max_image_bytes: usize,
        /// Largest accepted image, in pixels, checked before decoding.
        #[arg(long, default_value_t = ImageLimits::default().max_pixels, env = "BLIP2_MAX_IMAGE_PIXELS")]
        max_image_pixels: u64,
    },
    /// Caption images or answer a prompt about them (greedy decoding), as one batch.
    Generate {
        /// A checkpoint directory, or a Hugging Face Hub id such as Salesforce/blip2-opt-2.7b
        /// (downloaded to the HF cache; HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and
        /// HF_HUB_OFFLINE=1 are honoured).
        #[arg(long, env = "BLIP2_MODEL")]
        model: String,
        /// Hub revision (branch, tag or commit) when --model is a Hub id.
        #[arg(long, default_value = "main")]
        revision: String,
        /// Image file (PNG, JPEG, WebP, GIF, BMP); repeat for a batch.
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        /// Prompt text: once for all images, or once per image. Without it the model captions
        /// from BOS alone.
        #[arg(long = "prompt")]
        prompts: Vec<String>,
        #[command(flatten)]
        generation: GenerationOverrides,
        /// Print one JSON object per image per line: token_ids, text, finish_reason, ...
        #[arg(long)]
        json: bool,
        /// Weight dtype (f32 is the exact reference; f16 is refused for Flan-T5).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
        /// Largest accepted image file, in bytes.
        #[arg(long, default_value_t = ImageLimits::default().max_bytes)]
        max_image_bytes: usize,
        /// Largest accepted image, in pixels (width x height), checked before decoding.
        #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
        max_image_pixels: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn dtype_of(arg: DTypeArg) -> DType {
    match arg {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    }
}

/// Resolves `--model` and loads it on the CPU with the given dtype and image limits.
fn load(
    model: &str,
    revision: &str,
    dtype: DTypeArg,
    max_bytes: usize,
    max_pixels: u64,
) -> anyhow::Result<(ModelSource, Blip2Pipeline)> {
    let options = LoadOptions {
        dtype: dtype_of(dtype),
        device: Device::Cpu,
        limits: ImageLimits {
            max_bytes,
            max_pixels,
        },
    };
    let source = ModelSource::parse(model, Some(revision))?;
    let pipeline = Blip2Pipeline::load(&source, &options)
        .with_context(|| format!("loading model {}", source.describe()))?;
    Ok((source, pipeline))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            model,
            revision,
            host,
            port,
            dtype,
            max_batch_size,
            max_queue,
            max_wait_ms,
            max_body_bytes,
            max_image_bytes,
            max_image_pixels,
        } => {
            if max_batch_size == 0 || max_queue == 0 {
                bail!("--max-batch-size and --max-queue must be >= 1");
            }
            let (source, pipeline) =
                load(&model, &revision, dtype, max_image_bytes, max_image_pixels)?;
            let serve = blip2_server::server::ServeOptions {
                engine: blip2_server::engine::EngineConfig {
                    max_batch_size,
                    max_queue,
                    max_wait: std::time::Duration::from_millis(max_wait_ms),
                },
                max_body_bytes,
                decode_concurrency: 2,
                model_id: source.describe(),
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind((host.as_str(), port))
                    .await
                    .with_context(|| format!("binding {host}:{port}"))?;
                tracing::warn!(address = %listener.local_addr()?, "serving");
                let shutdown = shutdown_signal()?;
                blip2_server::server::run(pipeline, serve, listener, shutdown).await?;
                Ok(())
            })
        }
        Command::Generate {
            model,
            revision,
            images,
            prompts,
            generation,
            json,
            dtype,
            max_image_bytes,
            max_image_pixels,
        } => {
            let prompts: Vec<Option<String>> = match prompts.len() {
                0 => vec![None; images.len()],
                1 => vec![Some(prompts[0].clone()); images.len()],
                n if n == images.len() => prompts.into_iter().map(Some).collect(),
                n => bail!(
                    "--prompt given {n} times for {} images: give it once or once per image",
                    images.len()
                ),
            };
            let bytes = images
                .iter()
                .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let started = std::time::Instant::now();
            let (source, pipeline) =
                load(&model, &revision, dtype, max_image_bytes, max_image_pixels)?;
            tracing::info!(model = %source.describe(), seconds = started.elapsed().as_secs_f64(), "model loaded");
            let params = generation.apply(pipeline.default_params());
            params.validate()?;
            let started = std::time::Instant::now();
            let outputs = pipeline
                .generate(&bytes, &prompts, &vec![params; images.len()])
                .map_err(|e| match e {
                    PipelineError::Image { index, source } => {
                        anyhow::anyhow!("{}: {source}", images[index].display())
                    }
                    other => other.into(),
                })?;
            tracing::info!(
                images = images.len(),
                seconds = started.elapsed().as_secs_f64(),
                "generated"
            );
            for (index, ((path, prompt), out)) in
                images.iter().zip(&prompts).zip(outputs).enumerate()
            {
                for (sequence, seq) in out.sequences.iter().enumerate() {
                    if json {
                        let line = serde_json::json!({
                            "index": index,
                            "sequence": sequence,
                            "image": path.display().to_string(),
                            "prompt": prompt,
                            "token_ids": seq.token_ids,
                            "text": seq.text,
                            "finish_reason": seq.finish_reason,
                            "score": seq.score,
                            "prompt_tokens": out.prompt_tokens,
                            "generated_tokens": seq.token_ids.len(),
                        });
                        println!("{line}");
                    } else {
                        println!("{}", seq.text.trim());
                    }
                }
            }
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (not when the
/// future is first polled), so a signal that arrives early still drains instead of killing.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(unix)]
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}
