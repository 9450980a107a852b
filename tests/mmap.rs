//! `mmap` (the default): an unquantised f32 load borrows its linear weights from a mapping of
//! the checkpoint's files. It must give exactly what the copied load gives (the same bits at
//! every stage and the same generations) on every tiny checkpoint, OPT and Flan-T5, sharded
//! and single-file, and it must really map: the files stay mapped while the model lives. A
//! quantised load quantises from the mapping: the same bits as quantising what was read, and
//! nothing stays mapped.

mod common;

use blip2_server::generation::GenerationParams;
use blip2_server::kernels::cpu::q8_panels::PanelMatrix;
use blip2_server::model::ModelFiles;
use blip2_server::nn::Quantization;
use blip2_server::{Blip2Pipeline, LoadOptions};
use common::*;

fn load(model: &str, mmap: bool) -> (Blip2Pipeline, ModelFiles) {
    load_quantized(model, mmap, None)
}

fn load_quantized(
    model: &str,
    mmap: bool,
    quantize: Option<Quantization>,
) -> (Blip2Pipeline, ModelFiles) {
    let files = ModelFiles::from_dir(&model_dir(model)).unwrap();
    let options = LoadOptions {
        mmap,
        quantize,
        ..LoadOptions::default()
    };
    (Blip2Pipeline::load_files(&files, &options).unwrap(), files)
}

/// Every value the image path and one greedy generation produce, in order.
fn outputs(p: &Blip2Pipeline) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let images: Vec<Vec<u8>> = ["photo_320x240.jpg", "rgba_100x37.png"]
        .iter()
        .map(|name| std::fs::read(image_path(name)).unwrap())
        .collect();
    let pixels: Vec<_> = images
        .iter()
        .map(|b| p.images.pixel_values(b).unwrap())
        .collect();
    let pv = p.images.batch_tensor(&pixels, p.model.device()).unwrap();
    let f = p.model.image_features(&pv).unwrap();
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let stages = vec![
        flat(&f.vision_states),
        flat(&f.query_states),
        flat(&f.query_embeds),
    ];
    let params = GenerationParams {
        max_new_tokens: 6,
        min_new_tokens: 6,
        ..p.default_params()
    };
    let generations = p
        .generate(
            &images,
            &[None, Some("a photo of".into())],
            &[params.clone(), params],
        )
        .unwrap();
    let tokens = generations
        .iter()
        .flat_map(|g| g.sequences.iter().map(|s| s.token_ids.clone()))
        .collect();
    (stages, tokens)
}

/// The lines of this process's memory map that name one of `files`' weight files.
fn mapped_weight_files(files: &ModelFiles) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    files
        .weights
        .iter()
        .filter(|w| {
            let path = std::fs::canonicalize(w).unwrap();
            maps.lines().any(|l| l.ends_with(path.to_str().unwrap()))
        })
        .count()
}

// One test, in sequence: the memory-map check must not see another test's mapping.
#[test]
fn mapped_weights_equal_copied_weights_bit_for_bit() {
    for model in ["opt-tiny", "opt-tiny-legacy", "t5-tiny", "t5-tiny-legacy"] {
        let (copied, files) = load(model, false);
        assert_eq!(
            mapped_weight_files(&files),
            0,
            "{model}: --mmap false maps nothing"
        );
        let expected = outputs(&copied);
        drop(copied);

        let (mapped, files) = load(model, true);
        assert_eq!(
            mapped_weight_files(&files),
            files.weights.len(),
            "{model}: every weight file is mapped while the model lives"
        );
        assert_eq!(
            outputs(&mapped),
            expected,
            "{model}: mapped and copied differ"
        );
        drop(mapped);
        assert_eq!(
            mapped_weight_files(&files),
            0,
            "{model}: the mapping goes with the model"
        );
    }
    let mut formats = vec![Quantization::Q8_0];
    if PanelMatrix::available() {
        formats.push(Quantization::Int8);
    }
    for model in ["opt-tiny", "t5-tiny-legacy"] {
        for &q in &formats {
            let (read, _) = load_quantized(model, false, Some(q));
            let expected = outputs(&read);
            drop(read);
            let (mapped, files) = load_quantized(model, true, Some(q));
            assert_eq!(
                mapped_weight_files(&files),
                0,
                "{model} {q:?}: nothing stays mapped"
            );
            assert_eq!(
                outputs(&mapped),
                expected,
                "{model} {q:?}: from the mapping and read differ"
            );
        }
    }
}
