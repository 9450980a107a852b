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
