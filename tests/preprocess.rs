//! Image preprocessing against the reference (`BlipImageProcessor` on Pillow 13.0.0): the resized
//! u8 image byte-exact for every source image (PNG RGB/RGBA/L/P, JPEG, BMP, GIF, WebP; large
//! downscales and upscales; both Pillow pass orders) at 224x224 and 28x28, and `pixel_values`
//! exact to the f32 bit.

mod common;

use blip2_server::preprocess::{ImageLimits, ImageProcessor};
use candle_core::{Device, Tensor};
use common::*;

fn processor(size: usize) -> ImageProcessor {
    // The Salesforce checkpoints' preprocessor_config.json, at `size`.
    let json = format!(
        r#"{{"do_resize": true, "size": {{"height": {size}, "width": {size}}}, "resample": 3,
            "do_rescale": true, "rescale_factor": 0.00392156862745098, "do_normalize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": true}}"#
    );
    ImageProcessor::from_json_str(&json, ImageLimits::default()).unwrap()
}

fn source_images() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(fixtures().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 8, "fixture images missing");
    out
}

fn stem(name: &str) -> &str {
    name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name)
}

#[test]
fn resized_pixels_are_byte_exact() {
    let mut failures = Vec::new();
    for size in [224, 28] {
        let proc = processor(size);
        for (name, bytes) in source_images() {
            let ours = proc.resized_rgb(&bytes).unwrap();
            let golden_path = fixtures()
                .join("preprocess")
                .join(format!("{}.{size}.png", stem(&name)));
            let theirs = image::open(&golden_path).unwrap().into_rgb8();
            assert_eq!((ours.width, ours.height), (size, size));
            let differing = ours
                .data
                .iter()
                .zip(theirs.as_raw())
                .filter(|(a, b)| a != b)
                .count();
            if differing != 0 {
                let worst = ours
                    .data
                    .iter()
                    .zip(theirs.as_raw())
                    .map(|(a, b)| (*a as i32 - *b as i32).abs())
                    .max()
                    .unwrap();
                failures.push(format!(
                    "{name} at {size}: {differing} bytes differ (max {worst})"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "resize differs from Pillow:\n{}",
        failures.join("\n")
    );
}

#[test]
fn pixel_values_are_exact() {
    let golden = candle_core::safetensors::load(
        fixtures()
            .join("preprocess")
            .join("pixel_values.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut checked = 0;
    for (size, suffix) in [(224, ""), (28, ".28")] {
        let proc = processor(size);
        for (name, bytes) in source_images() {
            let key = format!("{}{suffix}", stem(&name));
            let Some(theirs) = golden.get(&key) else {
                continue;
            };
            let ours = Tensor::from_vec(
                proc.pixel_values(&bytes).unwrap(),
                (3, size, size),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(
                max_abs_diff(&ours, theirs),
                0.0,
                "{key}: pixel_values differ"
            );
            checked += 1;
        }
    }
    assert!(checked >= 9, "only {checked} golden pixel_values found");
}

/// 16-bit PNGs decode to the RGB Pillow gives (tools/make_png16_fixtures.py).
#[test]
fn sixteen_bit_pngs_convert_as_pillow_does() {
    let dir = fixtures().join("png16");
    let mut checked = 0;
    for name in ["gray16", "rgb16", "graya16", "rgba16"] {
        let bytes = std::fs::read(dir.join(format!("{name}.png"))).unwrap();
        let ours = blip2_server::preprocess::decode_rgb(&bytes, ImageLimits::default()).unwrap();
        let theirs = image::open(dir.join(format!("{name}.pil-rgb.png")))
            .unwrap()
            .into_rgb8();
        assert_eq!(
            (ours.width as u32, ours.height as u32),
            theirs.dimensions(),
            "{name}"
        );
        assert_eq!(&ours.data, theirs.as_raw(), "{name}: differs from Pillow");
        checked += 1;
    }
    assert_eq!(checked, 4);
}

/// A PNG whose palette is not a whole number of RGB entries (found by the `image` fuzz target:
/// png 0.18.1 panics expanding it) is refused as an invalid image, not a panic.
#[test]
fn a_png_palette_of_partial_entries_is_refused() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions/image/png-plte-not-multiple-of-3");
    // The target's first byte picks an output size; the image follows it.
    let bytes = std::fs::read(path).unwrap();
    let err = blip2_server::preprocess::decode_rgb(&bytes[1..], ImageLimits::default())
        .expect_err("a palette of 53 bytes is malformed");
    assert!(err.to_string().contains("PLTE"), "{err}");
}
