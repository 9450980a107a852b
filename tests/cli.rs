//! The `generate` command end to end: JSON lines equal the reference's greedy tokens (single and
//! batched), and bad input is one clear line on stderr with a non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn blip2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blip2-server"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("binary runs")
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blip2-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each stdout line is one JSON object"))
        .collect()
}

fn token_ids(v: &serde_json::Value) -> Vec<u32> {
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// Runs the CLI on every case with a 12/12 run and compares with the golden tokens.
fn cli_matches_golden(model: &str) {
    let (golden, _) = load_golden(model);
    let dir = model_dir(model);
    let mut checked = 0;
    for case in &golden.cases {
        let Some(run) = case
            .runs
            .iter()
            .find(|r| r.max_new_tokens == 12 && r.min_new_tokens == Some(12))
        else {
            continue;
        };
        let images: Vec<String> = case
            .images
            .iter()
            .map(|i| image_path(i).display().to_string())
            .collect();
        let mut args = vec!["generate", "--model", dir.to_str().unwrap()];
        for img in &images {
            args.extend(["--image", img.as_str()]);
        }
        if let Some(prompts) = &case.prompts {
            for p in prompts {
                args.extend(["--prompt", p.as_str()]);
            }
        }
        args.extend(["--max-new-tokens", "12", "--min-new-tokens", "12", "--json"]);
        let lines = json_lines(&blip2(&args));
        assert_eq!(
            lines.len(),
            images.len(),
            "{model}/{}: one line per image",
            case.name
        );
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(
                token_ids(line),
                run.new_tokens_trimmed[i],
                "{model}/{} row {i}",
                case.name
            );
            assert_eq!(line["text"], run.text[i], "{model}/{} row {i}", case.name);
        }
        checked += 1;
    }
    assert!(checked >= 2, "{model}: too few 12/12 cases");
}

#[test]
fn generate_json_matches_reference_opt() {
    cli_matches_golden("opt-tiny");
    cli_matches_golden("opt-tiny-legacy");
}

#[test]
fn generate_json_matches_reference_t5() {
    cli_matches_golden("t5-tiny");
    cli_matches_golden("t5-tiny-legacy");
}

/// `--image-size`: the batch cases of golden/sizes.json (transformers' `generate(...,
/// interpolate_pos_encoding=True)`, tools/make_size_goldens.py) token for token; a size the
/// patch grid cannot take is one clear line.
#[test]
fn generate_image_size_matches_reference() {
    for model in ["opt-tiny", "t5-tiny"] {
        let dir = model_dir(model);
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden/sizes.json")).unwrap())
                .unwrap();
        let max_new = index["max_new_tokens"].to_string();
        let mut checked = 0;
        for case in index["cases"].as_array().unwrap() {
            if case["kind"] != "batch" {
                continue;
            }
            let size = format!("{}x{}", case["size"][0], case["size"][1]);
            let images: Vec<String> = case["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| image_path(i.as_str().unwrap()).display().to_string())
                .collect();
            let mut args = vec!["generate", "--model", dir.to_str().unwrap()];
            for img in &images {
                args.extend(["--image", img.as_str()]);
            }
            args.extend([
                "--image-size",
                &size,
                "--max-new-tokens",
                &max_new,
                "--json",
            ]);
            let lines = json_lines(&blip2(&args));
            let got: Vec<Vec<u32>> = lines.iter().map(token_ids).collect();
            let want: Vec<Vec<u32>> = serde_json::from_value(case["tokens"].clone()).unwrap();
            assert_eq!(got, want, "{model} {size}");
            checked += 1;
        }
        assert_eq!(checked, 2, "{model}: both sizes");
    }
    let model = model_dir("opt-tiny");
    let image = image_path("photo_320x240.jpg");
    let run = |size: &str| {
        blip2(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--image-size",
            size,
        ])
    };
    assert_clean_error(&run("20"), "multiples of the patch size 7");
    // Unparseable: clap's usage error (exit 2), naming the flag.
    let out = run("0");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image-size"));
}

/// Asserts a clean failure: non-zero exit, exactly one line on stderr containing `needle`.
fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{needle:?} not in {stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout on error");
}

fn generate_with_image(image: &Path) -> Output {
    let model = model_dir("opt-tiny");
    blip2(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--max-new-tokens",
        "3",
    ])
}

#[test]
fn bad_images_are_one_line_errors() {
    let dir = temp_dir("bad-images");
    let png = std::fs::read(image_path("rgb_640x480.png")).unwrap();
    let jpeg = std::fs::read(image_path("photo_320x240.jpg")).unwrap();

    let not_image = dir.join("notes.png");
    std::fs::write(&not_image, b"this is plain text, not an image").unwrap();
    assert_clean_error(&generate_with_image(&not_image), "unsupported image format");

    let empty = dir.join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    assert_clean_error(&generate_with_image(&empty), "empty image");

    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    assert_clean_error(&generate_with_image(&truncated), "could not decode image");

    let truncated_jpeg = dir.join("truncated.jpg");
    std::fs::write(&truncated_jpeg, &jpeg[..jpeg.len() / 2]).unwrap();
    assert_clean_error(
        &generate_with_image(&truncated_jpeg),
        "could not decode image",
    );

    // A real PNG whose IHDR claims 20000x20000 (CRC fixed up so only the size is wrong).
    let mut bomb = png.clone();
    bomb[16..20].copy_from_slice(&20000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&20000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let bomb_path = dir.join("bomb.png");
    std::fs::write(&bomb_path, &bomb).unwrap();
    assert_clean_error(&generate_with_image(&bomb_path), "20000x20000");

    assert_clean_error(
        &generate_with_image(&dir.join("missing.png")),
        "missing.png",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_missing_weights_shard_is_named() {
    let src = model_dir("opt-tiny-legacy");
    let dir = temp_dir("missing-shard");
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("model-0") {
                shards.push(name.clone());
            }
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    shards.sort();
    assert!(shards.len() >= 2, "the legacy fixture is sharded");
    std::fs::remove_file(dir.join(&shards[1])).unwrap();
    let image = image_path("rgb_640x480.png");
    let out = blip2(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ]);
    assert_clean_error(&out, &shards[1]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn offline_hub_id_not_in_cache_says_what_is_missing() {
    let cache = temp_dir("hf-cache");
    let image = image_path("rgb_640x480.png");
    let out = Command::new(env!("CARGO_BIN_EXE_blip2-server"))
        .args([
            "generate",
            "--model",
            "Salesforce/blip2-opt-2.7b",
            "--image",
            image.to_str().unwrap(),
        ])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &cache)
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert_clean_error(&out, "--model /path");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config.json")
            || String::from_utf8_lossy(&out.stderr).contains("safetensors")
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn prompt_count_must_match_images() {
    let model = model_dir("opt-tiny");
    let image = image_path("rgb_640x480.png");
    let (m, i) = (model.to_str().unwrap(), image.to_str().unwrap());
    let out = blip2(&[
        "generate", "--model", m, "--image", i, "--image", i, "--image", i, "--prompt", "a",
        "--prompt", "b",
    ]);
    assert_clean_error(&out, "--prompt given 2 times for 3 images");
}

#[test]
fn t5_in_f16_is_refused_with_a_reason() {
    let model = model_dir("t5-tiny");
    let image = image_path("rgb_640x480.png");
    let out = blip2(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--dtype",
        "f16",
    ]);
    assert_clean_error(&out, "f16");
}

/// `generate` on the tiny OPT checkpoint and one fixture image, with `extra` flags.
fn generate_tiny(extra: &[&str]) -> Output {
    let model = model_dir("opt-tiny");
    let image = image_path("rgb_640x480.png");
    let args = [
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ][..],
        extra,
    ]
    .concat();
    blip2(&args)
}

/// bf16 on the CPU is about 10x slower than f32 (candle widens the weights on every product):
/// refused at start with what to use instead.
#[test]
fn bf16_on_the_cpu_is_refused_with_what_to_use_instead() {
    let out = generate_tiny(&["--dtype", "bf16"]);
    assert_clean_error(&out, "--quantize q8_0");
}

/// CUDA asked of a build without it (or of a machine without a GPU) is one line naming what to
/// do, exit status 1, before any weight is read: for serve and for generate.
#[test]
fn cuda_without_a_gpu_or_the_feature_is_one_line_and_exit_1() {
    let model = model_dir("opt-tiny");
    let needle = if cfg!(feature = "cuda") {
        "cannot open cuda:0"
    } else {
        "built without CUDA"
    };
    let serve = blip2(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    for out in [serve, generate_tiny(&["--device", "cuda:0"])] {
        assert_clean_error(&out, needle);
        assert_eq!(out.status.code(), Some(1));
    }
    let out = blip2(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "gpu",
    ]);
    assert_clean_error(&out, "expected \"cpu\", \"cuda\" or \"cuda:N\"");
}

/// Quantised weights run on the CPU kernels only: with --kernels generic they are refused,
/// never silently served as f32.
#[test]
fn quantize_with_generic_kernels_is_refused() {
    let out = generate_tiny(&["--kernels", "generic", "--quantize", "q8_0"]);
    assert_clean_error(&out, "cannot run with --kernels generic");
}

/// The generic kernels (candle's ops only, the GPU's code path) give the CPU kernels' tokens
/// (which the goldens check; CI also runs the parity tests with BLIP2_TEST_KERNELS=generic).
#[test]
fn generate_with_generic_kernels_gives_the_same_tokens() {
    let run = |kernels: &str| {
        let out = generate_tiny(&["--kernels", kernels, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        line["token_ids"].clone()
    };
    assert_eq!(run("generic"), run("auto"));
}

/// Beam search through the CLI: one JSON line per returned sequence, the reference's tokens.
#[test]
fn generate_beam_search_flags_match_reference() {
    let path = fixtures().join("generation").join("opt-tiny.json");
    let goldens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = goldens["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "batch3_beam3_nrs2")
        .expect("golden case batch3_beam3_nrs2");
    let model = model_dir("opt-tiny");
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        model.display().to_string(),
    ];
    for img in case["images"].as_array().unwrap() {
        args.extend([
            "--image".into(),
            image_path(img.as_str().unwrap()).display().to_string(),
        ]);
    }
    for p in case["prompts"].as_array().unwrap() {
        args.extend(["--prompt".into(), p.as_str().unwrap().to_string()]);
    }
    let params = &case["params"];
    for (flag, key) in [
        ("--num-beams", "num_beams"),
        ("--num-return-sequences", "num_return_sequences"),
        ("--max-new-tokens", "max_new_tokens"),
        ("--length-penalty", "length_penalty"),
    ] {
        args.extend([flag.to_string(), params[key].to_string()]);
    }
    args.push("--json".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lines = json_lines(&blip2(&args));
    let expected = case["sequences"].as_array().unwrap();
    assert_eq!(lines.len(), expected.len());
    for (line, tokens) in lines.iter().zip(expected) {
        let tokens: Vec<u32> = tokens
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(token_ids(line), tokens);
    }
}

/// `--stop` cuts the text at the stop string and says so.
#[test]
fn generate_stop_string_cuts_the_text() {
    let model = model_dir("opt-tiny");
    let image = image_path("tall_300x1000.png");
    let base = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--json",
    ];
    let free = json_lines(&blip2(
        &[
            &base[..],
            &["--max-new-tokens", "12", "--min-new-tokens", "12"],
        ]
        .concat(),
    ));
    let text = free[0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "need some text to cut: {text:?}");
    let stop: String = chars[3..5].iter().collect();
    let cut_at = text.find(&stop).unwrap();
    let stopped = json_lines(&blip2(
        &[
            &base[..],
            &[
                "--max-new-tokens",
                "12",
                "--min-new-tokens",
                "12",
                "--stop",
                &stop,
            ],
        ]
        .concat(),
    ));
    assert_eq!(stopped[0]["text"].as_str().unwrap(), &text[..cut_at]);
    assert_eq!(stopped[0]["finish_reason"], "stop_sequence");
    assert!(token_ids(&stopped[0]).len() < 12);
}

#[test]
fn invalid_generation_flags_are_one_line_errors() {
    let model = model_dir("opt-tiny");
    let image = image_path("tall_300x1000.png");
    let base = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ];
    assert_clean_error(
        &blip2(&[&base[..], &["--top-p", "1.5", "--do-sample"]].concat()),
        "top_p",
    );
    assert_clean_error(
        &blip2(
            &[
                &base[..],
                &["--num-beams", "2", "--num-return-sequences", "3"],
            ]
            .concat(),
        ),
        "num_return_sequences",
    );
    assert_clean_error(
        &blip2(&[&base[..], &["--temperature", "0", "--do-sample"]].concat()),
        "temperature",
    );
}

fn status_and_body(response: &str) -> (u16, serde_json::Value) {
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn get(addr: &str, path: &str) -> (u16, serde_json::Value) {
    status_and_body(&http_raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    ))
}

/// While the model loads the server already listens: alive, not ready, the phase on /info,
/// inference refused with 503 and Retry-After; `health` says not ready. Then it serves.
#[test]
fn serve_reports_the_load_phase_and_refuses_work_until_loaded() {
    let (mut child, addr) = spawn_listening(&[], &[("BLIP2_DEBUG_LOAD_DELAY_MS", "3000")]);
    let port = addr.rsplit(':').next().unwrap().to_string();
    assert_eq!(get(&addr, "/health").0, 200);
    let (status, body) = get(&addr, "/ready");
    assert_eq!(
        (status, body["error_type"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    // Finding the files takes a moment, then the (stretched) weight load begins.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let info = loop {
        let (status, info) = get(&addr, "/info");
        assert_eq!(status, 200);
        assert_eq!(info["ready"], false, "{info}");
        if info["startup"]["phase"] != "resolving checkpoint"
            || std::time::Instant::now() > deadline
        {
            break info;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert_eq!(info["startup"]["phase"], "loading weights", "{info}");
    assert_eq!(
        info["startup"]["phases"][0]["phase"], "resolving checkpoint",
        "{info}"
    );
    let caption = http_raw(
        &addr,
        "POST /v1/caption HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert!(caption.starts_with("HTTP/1.1 503"), "{caption}");
    assert!(
        caption.to_ascii_lowercase().contains("retry-after: 5"),
        "{caption}"
    );
    let health = blip2(&["health", "--port", &port]);
    assert_eq!(health.status.code(), Some(1), "{health:?}");
    assert!(
        String::from_utf8_lossy(&health.stderr).contains("503"),
        "{health:?}"
    );

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while get(&addr, "/ready").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let health = blip2(&["health", "--port", &port]);
    assert!(health.status.success(), "{health:?}");
    let (_, info) = get(&addr, "/info");
    assert_eq!(info["ready"], true);
    assert_eq!(info["startup"]["phase"], "ready", "{info}");
    let loading = info["startup"]["phases"][1]["seconds"].as_f64().unwrap();
    assert!(loading >= 3.0, "the load phase lasted {loading} s: {info}");
    child.kill().unwrap();
    child.wait().unwrap();
    // Nothing listens any more.
    let gone = blip2(&["health", "--port", &port, "--timeout-s", "1"]);
    assert_eq!(gone.status.code(), Some(1));
}

/// SIGTERM first turns /ready to 503 while requests are still served (shutdown_delay_s), then
/// the listener closes and the process exits 0; a SIGTERM while loading exits at once.
#[test]
fn sigterm_keeps_serving_with_ready_503_for_the_shutdown_delay() {
    let (mut child, addr) = spawn_server(&["--shutdown-delay-s", "5"], &[]);
    let image = std::fs::read(image_path("rgb_640x480.png")).unwrap();
    let body =
        serde_json::json!({"image": base64_encode(&image), "parameters": {"max_new_tokens": 2}})
            .to_string();
    let caption = format!(
        "POST /v1/caption HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let signalled = std::time::Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = signalled + std::time::Duration::from_secs(2);
    while get(&addr, "/ready").0 != 503 {
        assert!(std::time::Instant::now() < deadline, "/ready still 200");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let answered = http_raw(&addr, &caption);
    assert!(
        signalled.elapsed() < std::time::Duration::from_secs(5),
        "the check ran past the delay; the machine is too slow for this test"
    );
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let took = signalled.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(5),
        "exited after {took:?}"
    );
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "still listening"
    );

    let (mut child, _) = spawn_listening(&[], &[("BLIP2_DEBUG_LOAD_DELAY_MS", "60000")]);
    let signalled = std::time::Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(signalled.elapsed() < std::time::Duration::from_secs(10));
}

/// `serve` answers; SIGTERM lets an in-flight request finish, then the process exits 0.
#[test]
fn serve_drains_in_flight_requests_and_exits_zero_on_sigterm() {
    let (mut child, addr) = spawn_server(&[], &[]);
    let ready = http_raw(
        &addr,
        "GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    // A request that is still generating when the signal comes.
    let image = std::fs::read(image_path("rgb_640x480.png")).unwrap();
    let body = serde_json::json!({
        "image": base64_encode(&image),
        "parameters": {"max_new_tokens": 100, "min_new_tokens": 100, "num_beams": 16},
    })
    .to_string();
    let request = format!(
        "POST /v1/caption HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let in_flight = {
        let addr = addr.clone();
        std::thread::spawn(move || http_raw(&addr, &request))
    };
    // Wait until the model worker runs it.
    for _ in 0..400 {
        let info = http_raw(
            &addr,
            "GET /info HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        if info.contains("\"running_requests\":1") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let response = in_flight.join().unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"generated_tokens\":100"), "{response}");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// config/default.toml < --config < BLIP2_ env < flags, as /info reports them; bad settings
/// stop the start with the key named.
#[test]
fn serve_settings_layer_and_bad_ones_are_refused() {
    let dir = temp_dir("serve-config");
    let file = dir.join("server.toml");
    std::fs::write(
        &file,
        "max_batch_size = 3\nmax_queue = 7\nmax_new_tokens = 99\n",
    )
    .unwrap();
    let (mut child, addr) = spawn_server(
        &["--config", file.to_str().unwrap(), "--max-new-tokens", "42"],
        &[("BLIP2_MAX_QUEUE", "11"), ("BLIP2_MAX_NEW_TOKENS", "77")],
    );
    let info = http_raw(
        &addr,
        "GET /info HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let body: serde_json::Value =
        serde_json::from_str(info.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["max_batch_size"], 3, "file over default");
    assert_eq!(body["max_queue"], 11, "env over file");
    assert_eq!(body["max_new_tokens"], 42, "flag over env");
    assert_eq!(body["max_concurrent_requests"], 256, "default");
    child.kill().unwrap();
    child.wait().unwrap();

    std::fs::write(&file, "max_batch_sise = 3\n").unwrap();
    let out = blip2(&["serve", "--model", "x", "--config", file.to_str().unwrap()]);
    assert_clean_error(&out, "max_batch_sise");
    let out = blip2(&["serve", "--model", "x", "--max-batch-size", "0"]);
    assert_clean_error(&out, "max_batch_size");
    let out = Command::new(env!("CARGO_BIN_EXE_blip2-server"))
        .args(["serve"])
        .env_remove("BLIP2_MODEL")
        .output()
        .unwrap();
    assert_clean_error(&out, "--model");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of a fixture checkpoint whose weights file(s) `spoil` rewrites.
fn spoiled_checkpoint(tag: &str, from: &str, spoil: impl FnOnce(&std::path::Path)) -> PathBuf {
    let dir = temp_dir(tag);
    for entry in std::fs::read_dir(model_dir(from)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    spoil(&dir);
    dir
}

/// Rewrites a safetensors file's header with `edit` (the data bytes stay as they are).
fn edit_header(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    // Offsets count from the end of the header: one of another length keeps them right.
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// The first tensor of a header (by name) that is not `__metadata__`.
fn some_tensor(header: &serde_json::Value) -> String {
    let mut names: Vec<&String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .collect();
    names.sort();
    names[0].clone()
}

/// Every malformed-checkpoint case is refused in one line naming the file (and the tensor where
/// one is at fault), exit status 1: a truncated shard, offsets past the end, a dtype that does
/// not match the bytes, a shape that does not match the config, an index naming a missing file.
#[test]
fn malformed_checkpoints_are_one_line_errors_naming_file_and_tensor() {
    let image = image_path("rgb_640x480.png");
    let weights = |dir: &std::path::Path| dir.join("model.safetensors");
    let mut cases: Vec<(PathBuf, Vec<String>)> = Vec::new();

    let dir = spoiled_checkpoint("trunc", "opt-tiny", |d| {
        let bytes = std::fs::read(weights(d)).unwrap();
        std::fs::write(weights(d), &bytes[..bytes.len() - 1000]).unwrap();
    });
    cases.push((dir, vec!["model.safetensors".into(), "truncated".into()]));

    // Header edits of the first tensor: (tag, what the error must say, the edit).
    type Edit = fn(&mut serde_json::Value, &str);
    let header_cases: [(&str, &str, Edit); 3] = [
        ("offsets", "past the end", |h, t| {
            let offsets = &mut h[t]["data_offsets"];
            let (a, b) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
            *offsets = serde_json::json!([a + 1_000_000_000, b + 1_000_000_000]);
        }),
        ("dtype", "dtype F16", |h, t| h[t]["dtype"] = "F16".into()),
        ("shape", "config implies", |h, t| {
            // Same element count, other shape: the bytes agree, the config does not.
            let shape = h[t]["shape"].as_array().unwrap().clone();
            let n: u64 = shape.iter().map(|d| d.as_u64().unwrap()).product();
            h[t]["shape"] = if shape.len() == 1 {
                serde_json::json!([n, 1])
            } else {
                serde_json::json!([n])
            };
        }),
    ];
    for (tag, needle, edit) in header_cases {
        let mut tensor = String::new();
        let dir = spoiled_checkpoint(tag, "opt-tiny", |d| {
            edit_header(&weights(d), |h| {
                tensor = some_tensor(h);
                edit(h, &tensor);
            })
        });
        cases.push((dir, vec!["model.safetensors".into(), tensor, needle.into()]));
    }

    let dir = spoiled_checkpoint("index", "opt-tiny-legacy", |d| {
        std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    });
    cases.push((dir, vec!["model-00002-of-00002.safetensors".into()]));
    // An index naming a shard outside the checkpoint (a path that climbs out of it) is refused
    // before anything is opened.
    let dir = spoiled_checkpoint("escape", "opt-tiny-legacy", |d| {
        let path = d.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace(
            "\"model-00002-of-00002.safetensors\"",
            "\"../model-00002-of-00002.safetensors\"",
        );
        std::fs::write(path, text).unwrap();
    });
    cases.push((
        dir,
        vec![
            "model.safetensors.index.json".into(),
            "not a file inside the checkpoint".into(),
        ],
    ));

    for (dir, needles) in cases {
        let out = blip2(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ]);
        println!("{}", String::from_utf8_lossy(&out.stderr).trim_end());
        for needle in &needles {
            assert_clean_error(&out, needle);
        }
        assert_eq!(out.status.code(), Some(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
