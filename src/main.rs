//! Command line: `blip2-server generate` runs one batch through a checkpoint and prints the
//! result, one line per image.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use blip2_server::config::{
    DTypeName, KernelsName, LogFormat, QuantizeName, ServeArgs, ServerConfig,
};
use blip2_server::device::DeviceSpec;
use blip2_server::generation::GenerationOverrides;
use blip2_server::model::{ModelFiles, ModelSource};
use blip2_server::preprocess::{ImageLimits, ImageSize};
use blip2_server::server::ServeOptions;
use blip2_server::startup::Startup;
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

#[derive(Subcommand)]
enum Command {
    /// Serve the model over HTTP: POST /v1/caption, /v1/vqa (JSON or multipart, optional SSE
    /// streaming), /v1/features, OpenAI's POST /v1/chat/completions and GET /v1/models, GET /health, /ready,
    /// /info, /metrics, /openapi.json, /docs.
    ///
    /// Settings come in layers: config/default.toml (compiled in) < --config FILE < BLIP2_<KEY>
    /// environment variables < flags. Every flag is a key of config/default.toml (dashes become
    /// underscores) and the file documents each one. SIGTERM/SIGINT turn /ready to 503 while
    /// still serving for shutdown_delay_s, then stop accepting, give in-flight requests
    /// shutdown_grace_s to finish, and exit 0.
    // Boxed: the flag structs differ in size, and the enum is built once.
    Serve(Box<ServeArgs>),
    /// Caption images or answer a prompt about them (greedy decoding), as one batch.
    Generate(Box<GenerateArgs>),
    /// Ask a server on this host whether it is ready (GET /ready): exit 0 on 200, else 1 with
    /// the reason. For a container HEALTHCHECK, which then needs no curl in the image.
    Health(HealthArgs),
}

#[derive(clap::Args)]
struct HealthArgs {
    /// The server's port (the same variable `serve` reads).
    #[arg(long, env = "BLIP2_PORT", default_value_t = 8080)]
    port: u16,
    /// The path to ask; /health answers 200 while the process runs, /ready only once the model
    /// is loaded and the server not draining.
    #[arg(long, default_value = "/ready")]
    path: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    timeout_s: u64,
}

#[derive(clap::Args)]
struct GenerateArgs {
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
    generation: GenerationArgs,
    /// Print one JSON object per image per line: token_ids, text, finish_reason, ...
    #[arg(long)]
    json: bool,
    /// Weight dtype (f32 is the exact reference; f16 is refused for Flan-T5, bf16 on the CPU,
    /// where it is about 10x slower than f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeName,
    /// Quantise the vision encoder's, Q-Former's and language model's linear weights at load
    /// (faster, smaller, not exact to the reference).
    #[arg(long, value_enum, default_value = "none")]
    quantize: QuantizeName,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu", value_parser = DeviceSpec::parse)]
    device: DeviceSpec,
    /// auto: the CPU kernels where they apply; generic: candle's ops only (the GPU's path).
    #[arg(long, value_enum, default_value = "auto")]
    kernels: KernelsName,
    /// Resize images to N or HxW pixels (multiples of the patch size) instead of the
    /// checkpoint's size; the position embeddings are interpolated as transformers'
    /// interpolate_pos_encoding=True does.
    #[arg(long, value_parser = ImageSize::parse)]
    image_size: Option<ImageSize>,
    /// Largest accepted image file, in bytes.
    #[arg(long, default_value_t = ImageLimits::default().max_bytes)]
    max_image_bytes: usize,
    /// Largest accepted image, in pixels (width x height), checked before decoding.
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    max_image_pixels: u64,
}

/// `generate`'s decoding flags: [`GenerationOverrides`] as the command line spells them; each
/// one left out takes the checkpoint's text-config value, else transformers' default
/// (greedy, 20 new tokens, top_k 50 when sampling).
#[derive(Debug, Default, Clone, clap::Args)]
struct GenerationArgs {
    /// Maximum number of new tokens [default: 20].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// EOS is suppressed until this many new tokens exist [default: 0].
    #[arg(long)]
    min_new_tokens: Option<usize>,
    /// Beam search with this many beams [default: 1 = greedy or sampling].
    #[arg(long)]
    num_beams: Option<usize>,
    /// Sample instead of taking the most likely token (`--do-sample false` turns a checkpoint's
    /// default off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    do_sample: Option<bool>,
    /// Sampling temperature [default: 1.0].
    #[arg(long)]
    temperature: Option<f32>,
    /// Sampling: keep the k most likely tokens (0 disables) [default: 50].
    #[arg(long)]
    top_k: Option<usize>,
    /// Sampling: keep the smallest set of tokens whose probability reaches p [default: 1.0].
    #[arg(long)]
    top_p: Option<f32>,
    /// Penalise tokens already present (prompt included, as transformers does) [default: 1.0].
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Beam search: scores are divided by length ** this [default: 1.0].
    #[arg(long, allow_hyphen_values = true)]
    length_penalty: Option<f64>,
    /// Sequences returned per image (<= num_beams for beam search; needs sampling otherwise).
    #[arg(long)]
    num_return_sequences: Option<usize>,
    /// Forbid repeating any n-gram of this size [default: 0 = off].
    #[arg(long)]
    no_repeat_ngram_size: Option<usize>,
    /// Seed of the sampler, for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this string (cut from the output); repeatable.
    #[arg(long = "stop")]
    stop: Option<Vec<String>>,
}

impl From<GenerationArgs> for GenerationOverrides {
    fn from(a: GenerationArgs) -> Self {
        Self {
            max_new_tokens: a.max_new_tokens,
            min_new_tokens: a.min_new_tokens,
            num_beams: a.num_beams,
            do_sample: a.do_sample,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            length_penalty: a.length_penalty,
            num_return_sequences: a.num_return_sequences,
            no_repeat_ngram_size: a.no_repeat_ngram_size,
            seed: a.seed,
            stop: a.stop,
        }
    }
}

/// Logs on stderr, filtered by RUST_LOG, else at `default_level` (`serve`: info, as TGI and
/// vLLM do; `generate`: warn, so that its stderr holds only what went wrong).
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    blip2_server::tuning::init_process();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Generate(args) => generate(*args),
        Command::Health(args) => health(&args),
    }
}

/// `serve`: settings in layers; the listener, serving the loading routes while the model loads;
/// then the server until SIGTERM/SIGINT.
fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = ServerConfig::load(args)?;
    init_logging(config.log_format, "info");
    let runtime = tokio::runtime::Runtime::new()?;
    let served = runtime.block_on(serve_until_signal(config));
    // A signal during the load leaves the loading thread behind: do not wait for it.
    runtime.shutdown_background();
    served
}

async fn serve_until_signal(config: ServerConfig) -> anyhow::Result<()> {
    let options = serve_load_options(&config)?;
    let (host, port) = (config.host.as_str(), config.port);
    let socket = std::net::TcpListener::bind((host, port))
        .with_context(|| format!("binding {host}:{port}"))?;
    socket.set_nonblocking(true)?;
    let address = socket.local_addr()?;
    // Installed before the load, so that a SIGTERM during it stops the process cleanly.
    let mut shutdown = Box::pin(shutdown_signal()?);
    let source = ModelSource::parse(&config.model, Some(&config.revision))?;
    let model_id = source.describe();
    tracing::info!(%address, model = %model_id, "listening; /ready answers 503 until the model is loaded");
    let startup = Startup::new("resolving checkpoint", config.log_format == LogFormat::Text);
    let (stop_loading, loading_stopped) = tokio::sync::oneshot::channel::<()>();
    let loading = tokio::spawn(blip2_server::server::serve_loading(
        tokio::net::TcpListener::from_std(socket.try_clone()?)?,
        startup.clone(),
        model_id.clone(),
        async {
            let _ = loading_stopped.await;
        },
    ));
    let load = {
        let startup = startup.clone();
        tokio::task::spawn_blocking(move || load(&source, &options, Some(&startup)))
    };
    let pipeline = tokio::select! {
        loaded = load => loaded??,
        _ = &mut shutdown => {
            tracing::info!("stopped while loading");
            return Ok(());
        }
    };
    let _ = stop_loading.send(());
    // Open connections to the loading routes are closed after their answer; a client that
    // holds one open idle does not hold up the start.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), loading).await;
    startup.phase("ready");
    let mut serve = ServeOptions::from_config(&config);
    serve.model_id = model_id;
    serve.startup = Some(startup);
    let listener = tokio::net::TcpListener::from_std(socket)?;
    tracing::info!(%address, model = %serve.model_id, "serving");
    blip2_server::server::run(pipeline, serve, listener, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Finds the checkpoint's files and loads it on the options' device; with `startup`, each phase and
/// download is reported to it.
fn load(
    source: &ModelSource,
    options: &LoadOptions,
    startup: Option<&Arc<Startup>>,
) -> anyhow::Result<Blip2Pipeline> {
    let context = || format!("loading model {}", source.describe());
    if options.device.is_cpu() && options.dtype == candle_core::DType::BF16 {
        // candle's CPU bf16 matrix products widen the weights on every call: about 10x slower
        // than f32, and no smaller in use. Refused rather than served slowly.
        bail!(
            "--dtype bf16 is refused on the CPU: it runs about 10x slower than f32 here; use \
             --dtype f32 (exact to the reference) or --quantize q8_0 (faster and 3x smaller)"
        );
    }
    let files = ModelFiles::resolve_reporting(source, startup.cloned()).with_context(context)?;
    if let Some(startup) = startup {
        startup.phase("loading weights");
        // Tests of the loading routes (and of balancers' handling of a loading replica) need
        // a load that lasts: this stretches it. Not a setting: nothing else should use it.
        if let Some(ms) = std::env::var("BLIP2_DEBUG_LOAD_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    let pipeline = Blip2Pipeline::load_files(&files, options).with_context(context)?;
    // The weights are in place: from here on, freed working memory stays in the process.
    blip2_server::tuning::keep_freed_memory();
    Ok(pipeline)
}

/// What `serve`'s settings ask of the loader, with the device opened (a missing GPU or a
/// build without CUDA fails here, before anything is read).
fn serve_load_options(config: &ServerConfig) -> anyhow::Result<LoadOptions> {
    let device = config
        .device_spec()
        .and_then(DeviceSpec::open)
        .map_err(|e| anyhow::anyhow!("device: {e}"))?;
    let options = LoadOptions {
        dtype: config.dtype.dtype(),
        device,
        limits: ImageLimits {
            max_bytes: config.max_image_bytes,
            max_pixels: config.max_image_pixels,
        },
        quantize: config.quantize.quantization(),
        kernels: config.kernels.kernels(),
        mmap: config.mmap,
    };
    options.check().map_err(|e| anyhow::anyhow!(e))?;
    Ok(options)
}

/// `generate`: one batch through the checkpoint, printed one line per sequence.
fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let GenerateArgs {
        model,
        revision,
        images,
        prompts,
        generation,
        json,
        dtype,
        quantize,
        device,
        kernels,
        image_size,
        max_image_bytes,
        max_image_pixels,
    } = args;
    init_logging(LogFormat::Text, "warn");
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
    let source = ModelSource::parse(&model, Some(&revision))?;
    let options = LoadOptions {
        dtype: dtype.dtype(),
        device: device
            .open()
            .map_err(|e| anyhow::anyhow!("--device: {e}"))?,
        limits: ImageLimits {
            max_bytes: max_image_bytes,
            max_pixels: max_image_pixels,
        },
        quantize: quantize.quantization(),
        kernels: kernels.kernels(),
        mmap: true,
    };
    options.check().map_err(|e| anyhow::anyhow!(e))?;
    let mut pipeline = load(&source, &options, None)?;
    tracing::info!(model = %source.describe(), seconds = started.elapsed().as_secs_f64(), "model loaded");
    if let Some(size) = image_size {
        // A local run is trusted with any size; the server bounds it (max_image_side).
        pipeline
            .resize_images_to(size, usize::MAX)
            .context("--image-size")?;
    }
    let params = GenerationOverrides::from(generation).apply(pipeline.default_params());
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
    for (index, ((path, prompt), out)) in images.iter().zip(&prompts).zip(outputs).enumerate() {
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

/// `health`: one HTTP/1.1 GET on loopback; the status line decides.
fn health(args: &HealthArgs) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(args.timeout_s.max(1));
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], args.port));
    let mut conn = std::net::TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("connecting to {address}"))?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let path = &args.path;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    conn.take(64 * 1024)
        .read_to_end(&mut answer)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        return Ok(());
    }
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
    bail!("GET {path}: {status} {body}")
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
