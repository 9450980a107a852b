//! What each fuzz target checks, one function per target, on arbitrary bytes: the decoders and
//! parsers that read what a client or a checkpoint sends (image bytes, request bodies, token ids,
//! safetensors headers and shard indexes). A check panics only when a promise is broken; an
//! input that is refused with an error is a pass.
//!
//! The targets in `fuzz_targets/` call these under libFuzzer (cargo fuzz); the main crate's
//! `tests/fuzz_corpus.rs` includes this file and replays the committed seeds and every crash
//! found (`fuzz/regressions/<target>/`) on stable Rust, so a fixed crash stays fixed. Nothing
//! here is part of the server.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use blip2_server::model::loader::{Mapping, ModelFiles, ModelSource, SafetensorsWeights};
use blip2_server::nn::MappedSource;
use blip2_server::pipeline::{Blip2Pipeline, LoadOptions};
use blip2_server::preprocess::ImageProcessor;
use blip2_server::prompt::PromptBuilder;
use blip2_server::server::{self, ServeOptions};
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use tower::ServiceExt;

/// The fixtures of the main crate (this file is compiled from `fuzz/` and from `tests/`).
fn fixtures() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let here = root.join("tests/fixtures");
    if here.is_dir() {
        here
    } else {
        root.join("../tests/fixtures")
    }
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn pipeline(name: &str) -> Blip2Pipeline {
    Blip2Pipeline::load(
        &ModelSource::Local(model_dir(name)),
        &LoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("loading the fixture {name}: {e}"))
}

/// The two tokenizer families: OPT's byte-level BPE and T5's SentencePiece (Metaspace).
fn prompt_builders() -> &'static [PromptBuilder; 2] {
    static BUILDERS: OnceLock<[PromptBuilder; 2]> = OnceLock::new();
    BUILDERS.get_or_init(|| [pipeline("opt-tiny").prompts, pipeline("t5-tiny").prompts])
}

fn image_processor() -> &'static ImageProcessor {
    static PROCESSOR: OnceLock<ImageProcessor> = OnceLock::new();
    PROCESSOR.get_or_init(|| pipeline("opt-tiny").images)
}

/// Image bytes -> decode (with the server's default limits) -> resize -> normalise, at the
/// processor's size or one of a few others (the first byte picks). An image that decodes
/// yields exactly 3 x height x width finite values.
pub fn image(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let base = image_processor();
    let sizes = [None, Some((1, 1)), Some((7, 3)), Some((49, 49))];
    let processor = match sizes[pick as usize % sizes.len()] {
        None => base.clone(),
        Some((h, w)) => base.at_size(blip2_server::preprocess::ImageSize::new(h, w)),
    };
    let size = processor.size();
    if let Ok(values) = processor.pixel_values(bytes) {
        assert_eq!(values.len(), 3 * size.height * size.width);
        assert!(
            values.iter().all(|v| v.is_finite()),
            "a pixel value is not finite"
        );
    }
}

/// Arbitrary token ids (two bytes each; ids past the vocabulary included) through the
/// streaming detokeniser of either tokenizer (the first byte picks): never a panic, and what it
/// streams adds up to the text decoded at once, as a client of a stream and of a plain answer
/// must both see the same text.
pub fn detok(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let builder = &prompt_builders()[pick as usize % 2];
    let vocab = builder.tokenizer().get_vocab_size(true) as u32;
    let ids: Vec<u32> = rest
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) % (vocab + 16))
        .collect();
    let mut decoder = blip2_server::generation::IncrementalDecoder::new();
    let mut streamed = String::new();
    for &id in &ids {
        match decoder.push(id, builder) {
            Ok(piece) => streamed.extend(piece),
            Err(_) => return,
        }
    }
    match decoder.flush(builder) {
        Ok(piece) => streamed.extend(piece),
        Err(_) => return,
    }
    let whole = builder
        .decode(&ids)
        .expect("decoded piecewise but not whole");
    assert_eq!(
        streamed, whole,
        "streamed text differs from the whole decode of {ids:?}"
    );
}

/// The tiny OPT model behind the real router, in process: what a client's body becomes.
struct App {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let options = ServeOptions {
            // Bodies that ask for long generations are still valid; they need not be slow.
            max_new_tokens: 32,
            ..ServeOptions::default()
        };
        let (state, _worker) = runtime
            .block_on(async { server::start(pipeline("opt-tiny"), &options) })
            .expect("starting the engine");
        App {
            runtime,
            router: blip2_server::api::app(state),
        }
    })
}

const ROUTES: [&str; 4] = [
    "/v1/caption",
    "/v1/vqa",
    "/v1/chat/completions",
    "/v1/features",
];
pub const MULTIPART_BOUNDARY: &str = "fuzzboundary";

/// Sends `body` to `path` and checks the answer: never a 5xx (no request the server reads can
/// be its own fault), an error is JSON with an `error` member, and a success's body (a stream
/// included) arrives whole.
fn send(path: &str, content_type: &str, body: Vec<u8>) -> (StatusCode, String) {
    let app = app();
    let request = Request::post(path)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .expect("a request");
    app.runtime.block_on(async {
        let response = app
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the body arrives");
        assert!(
            !status.is_server_error(),
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        if status != StatusCode::OK {
            let value: serde_json::Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{path} {status}: the error body is not JSON ({e})"));
            assert!(value.get("error").is_some(), "{path} {status}: {value}");
        }
        (status, String::from_utf8_lossy(&bytes).into_owned())
    })
}

/// A JSON body to caption, VQA, chat or features (the first byte picks the route).
pub fn json_body(data: &[u8]) {
    json_body_status(data);
}

/// [`json_body`], and the answer's status and body (`None`: no input).
pub fn json_body_status(data: &[u8]) -> Option<(StatusCode, String)> {
    let (&pick, body) = data.split_first()?;
    Some(send(
        ROUTES[pick as usize % ROUTES.len()],
        "application/json",
        body.to_vec(),
    ))
}

/// A multipart/form-data body (boundary [`MULTIPART_BOUNDARY`]) to caption, VQA or features.
pub fn multipart_body(data: &[u8]) {
    multipart_body_status(data);
}

/// [`multipart_body`], and the answer's status and body (`None`: no input).
pub fn multipart_body_status(data: &[u8]) -> Option<(StatusCode, String)> {
    let (&pick, body) = data.split_first()?;
    let routes = [ROUTES[0], ROUTES[1], ROUTES[3]];
    Some(send(
        routes[pick as usize % routes.len()],
        &format!("multipart/form-data; boundary={MULTIPART_BOUNDARY}"),
        body.to_vec(),
    ))
}

/// A directory of this process's own in the temporary directory, one per check.
pub fn scratch(check: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("blip2-fuzz-{}", std::process::id()))
        .join(check);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// Reads every tensor of an opened checkpoint: what `open` accepted must read whole, at the
/// shape its header states, and be refused at any other shape.
fn read_all(weights: &SafetensorsWeights) {
    let cpu = Device::Cpu;
    for (name, shape) in weights.tensors() {
        // Headers may state shapes whose element count is 0 but whose dimensions are huge; what
        // a model asks for is never that, so only reasonable ones are read.
        if shape.iter().any(|&d| d > 1 << 20) {
            continue;
        }
        let tensor = weights
            .get(
                shape.into(),
                name,
                candle_nn::Init::Const(0.),
                DType::F32,
                &cpu,
            )
            .unwrap_or_else(|e| panic!("{name}: accepted by open, but not read: {e}"));
        assert_eq!(tensor.dims(), shape);
        let mut wrong = shape.to_vec();
        wrong.push(1);
        assert!(weights
            .get(
                wrong.as_slice().into(),
                name,
                candle_nn::Init::Const(0.),
                DType::F32,
                &cpu
            )
            .is_err());
    }
}

/// The bytes as one safetensors file: its header may lie about offsets, sizes, dtypes and
/// shapes; it is refused with an error, or every tensor in it reads. Mapped (`mmap`), it is
/// refused or accepted alike, and every f32 tensor the mapping lends holds exactly the values
/// a read gives.
pub fn safetensors(data: &[u8]) {
    let path = scratch("safetensors").join("fuzz.safetensors");
    std::fs::write(&path, data).expect("writing the scratch file");
    let opened = SafetensorsWeights::open(std::slice::from_ref(&path));
    let mapped = SafetensorsWeights::open_with(std::slice::from_ref(&path), Mapping::Populated);
    assert_eq!(
        opened.is_ok(),
        mapped.is_ok(),
        "mapping changed whether the file opens"
    );
    if let Ok(weights) = opened {
        read_all(&weights);
    }
    if let Ok(weights) = mapped {
        for (name, shape) in weights.tensors() {
            if shape.iter().any(|&d| d > 1 << 20) {
                continue;
            }
            let Some(view) = weights.f32_tensor(name, shape) else {
                continue;
            };
            let read = weights
                .get(
                    shape.into(),
                    name,
                    candle_nn::Init::Const(0.),
                    DType::F32,
                    &Device::Cpu,
                )
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .unwrap_or_else(|e| panic!("{name}: lent by the mapping, but not read: {e}"));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(view.as_slice()),
                bits(&read),
                "{name}: mapping and read differ"
            );
        }
    }
}

/// The bytes as `model.safetensors.index.json` of a checkpoint directory that holds the tiny
/// model's config, tokenizer and one shard (`model-00001-of-00001.safetensors`): refused with
/// an error, or every shard it names is a file inside the directory and opens.
pub fn shard_index(data: &[u8]) {
    let dir = scratch("shard_index");
    let index = dir.join("model.safetensors.index.json");
    let shard = dir.join("model-00001-of-00001.safetensors");
    if !shard.exists() {
        let source = model_dir("opt-tiny");
        for name in ["config.json", "preprocessor_config.json", "tokenizer.json"] {
            std::fs::copy(source.join(name), dir.join(name)).expect("copying the fixture");
        }
        std::fs::copy(source.join("model.safetensors"), &shard).expect("copying the fixture");
    }
    std::fs::write(&index, data).expect("writing the index");
    let Ok(files) = ModelFiles::from_dir(&dir) else {
        return;
    };
    for path in &files.weights {
        assert!(
            path.starts_with(&dir) && path.is_file(),
            "the index names {} outside the checkpoint",
            path.display()
        );
    }
    if let Ok(weights) = SafetensorsWeights::open(&files.weights) {
        read_all(&weights);
    }
}
