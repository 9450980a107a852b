//! `--quantize`: the vision encoder's and language model's linear weights quantised at load
//! give logits close to f32's (not equal: quantisation is not exact to the reference), on OPT
//! and Flan-T5, and generation runs.

mod common;

use blip2_server::generation::{DecodeBatch, GenerationParams, SequenceRequest};
use blip2_server::model::ModelFiles;
use blip2_server::nn::Quantization;
use blip2_server::{Blip2Pipeline, LoadOptions};
use common::*;

fn load(model: &str, quantize: Option<Quantization>) -> Blip2Pipeline {
    let files = ModelFiles::from_dir(&model_dir(model)).unwrap();
    let options = LoadOptions {
        quantize,
        ..LoadOptions::default()
    };
    Blip2Pipeline::load_files(&files, &options).unwrap()
}

fn first_logits(p: &Blip2Pipeline, image: &str, prompt: Option<&str>) -> Vec<f32> {
    let bytes = std::fs::read(image_path(image)).unwrap();
    let pv = p
        .images
        .batch_tensor(&[p.images.pixel_values(&bytes).unwrap()], p.model.device())
        .unwrap();
    let features = p.model.image_features(&pv).unwrap();
    let request = SequenceRequest::new(
        p.prompts.build(prompt).unwrap(),
        GenerationParams::default(),
    );
    let batch =
        DecodeBatch::prefill(&p.model, &p.prompts, &features.query_embeds, &[request]).unwrap();
    batch.logits().flatten_all().unwrap().to_vec1().unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn quantised_logits_stay_close_to_f32() {
    for model in ["opt-tiny", "t5-tiny"] {
        let exact = load(model, None);
        for q in [Quantization::Q8_0, Quantization::Q4K] {
            let quantized = load(model, Some(q));
            for (image, prompt) in [
                ("rgb_640x480.png", None),
                ("photo_320x240.jpg", Some("a photo of")),
            ] {
                let a = first_logits(&exact, image, prompt);
                let b = first_logits(&quantized, image, prompt);
                let max_abs = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                let cos = cosine(&a, &b);
                assert!(
                    max_abs > 0.0,
                    "{model} {q:?}: the weights were not quantised"
                );
                assert!(cos >= 0.999, "{model} {q:?} {image}: cosine {cos}");
            }
            let out = quantized
                .generate(
                    &[std::fs::read(image_path("rgb_640x480.png")).unwrap()],
                    &[None],
                    &[GenerationParams {
                        max_new_tokens: 6,
                        min_new_tokens: 6,
                        ..GenerationParams::default()
                    }],
                )
                .unwrap();
            assert_eq!(out[0].sequences[0].token_ids.len(), 6);
        }
    }
}

/// Per-channel int8 (where the CPU has AVX-512 VNNI; refused elsewhere): first-step logits
/// close to f32, and generation runs.
#[test]
fn int8_logits_stay_close_to_f32() {
    use blip2_server::kernels::cpu::q8_panels::PanelMatrix;
    if !PanelMatrix::available() {
        let files = ModelFiles::from_dir(&model_dir("opt-tiny")).unwrap();
        let options = LoadOptions {
            quantize: Some(Quantization::Int8),
            ..LoadOptions::default()
        };
        let err = Blip2Pipeline::load_files(&files, &options).err().unwrap();
        assert!(err.to_string().contains("AVX-512 VNNI"), "{err}");
        return;
    }
    for model in ["opt-tiny", "t5-tiny"] {
        let exact = load(model, None);
        let int8 = load(model, Some(Quantization::Int8));
        for (image, prompt) in [
            ("rgb_640x480.png", None),
            ("photo_320x240.jpg", Some("a photo of")),
        ] {
            let a = first_logits(&exact, image, prompt);
            let b = first_logits(&int8, image, prompt);
            assert!(a != b, "{model}: the weights were not quantised");
            let cos = cosine(&a, &b);
            eprintln!("{model} int8 {image}: logits cosine {cos}");
            assert!(cos >= 0.999, "{model} int8 {image}: cosine {cos}");
        }
    }
}
