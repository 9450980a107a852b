//! The batching property: for random mixes of requests and settings (greedy with penalties,
//! beam search, seeded sampling with several returns), every request's sequences in a shared
//! batch equal its sequences when run alone.

mod common;

use blip2_server::generation::GenerationParams;
use blip2_server::model::ModelFiles;
use blip2_server::Blip2Pipeline;
use common::*;
use proptest::prelude::*;

const IMAGES: [&str; 4] = [
    "rgb_640x480.png",
    "rgba_100x37.png",
    "gray_13x200.png",
    "photo_320x240.jpg",
];
const PROMPTS: [Option<&str>; 3] = [
    None,
    Some("a photo of"),
    Some("Question: what is in the picture? Answer:"),
];

#[derive(Debug, Clone)]
struct Spec {
    image: usize,
    prompt: usize,
    params: GenerationParams,
}

fn params() -> impl Strategy<Value = GenerationParams> {
    let greedy = (
        1usize..10,
        0usize..4,
        prop_oneof![Just(1.0f32), Just(1.3), Just(0.8)],
        0usize..3,
    )
        .prop_map(|(max, min, rep, ngram)| GenerationParams {
            max_new_tokens: max,
            min_new_tokens: min.min(max),
            repetition_penalty: rep,
            no_repeat_ngram_size: ngram,
            ..GenerationParams::default()
        });
    let beams = (
        2usize..5,
        prop_oneof![Just(1.0f64), Just(-1.0), Just(0.0), Just(2.0)],
        1usize..5,
        2usize..10,
    )
        .prop_map(|(beams, lp, nrs, max)| GenerationParams {
            num_beams: beams,
            length_penalty: lp,
            num_return_sequences: nrs.min(beams),
            max_new_tokens: max,
            ..GenerationParams::default()
        });
    let sampled = (
        any::<u64>(),
        prop_oneof![Just(1.0f32), Just(0.7), Just(1.5)],
        0usize..20,
        1usize..4,
        2usize..10,
    )
        .prop_map(|(seed, temperature, k, nrs, max)| GenerationParams {
            do_sample: true,
            seed: Some(seed),
            temperature,
            top_k: Some(k),
            top_p: if k % 2 == 0 { 0.9 } else { 1.0 },
            num_return_sequences: nrs,
            max_new_tokens: max,
            ..GenerationParams::default()
        });
    prop_oneof![greedy, beams, sampled]
}

fn specs() -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec(
        (0..IMAGES.len(), 0..PROMPTS.len(), params()).prop_map(|(image, prompt, params)| Spec {
            image,
            prompt,
            params,
        }),
        2..5,
    )
}

fn run(pipeline: &Blip2Pipeline, specs: &[Spec]) -> Vec<Vec<Vec<u32>>> {
    let images: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| std::fs::read(image_path(IMAGES[s.image])).unwrap())
        .collect();
    let prompts: Vec<Option<String>> = specs
        .iter()
        .map(|s| PROMPTS[s.prompt].map(str::to_string))
        .collect();
    let params: Vec<GenerationParams> = specs.iter().map(|s| s.params.clone()).collect();
    pipeline
        .generate(&images, &prompts, &params)
        .unwrap()
        .into_iter()
        .map(|g| g.sequences.into_iter().map(|s| s.token_ids).collect())
        .collect()
}

fn check(model: &str, cases: u32) {
    let files = ModelFiles::from_dir(&model_dir(model)).unwrap();
    let pipeline = Blip2Pipeline::load_files(&files, &load_options()).unwrap();
    // A fixed RNG: CI checks the same mixes every run (a kernel switch between batched and
    // alone prefill could in principle flip a near-tie; a fixed set keeps a failure reproducible).
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(
        ProptestConfig {
            cases,
            ..ProptestConfig::default()
        },
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    runner
        .run(&specs(), |specs| {
            let together = run(&pipeline, &specs);
            for (i, spec) in specs.iter().enumerate() {
                let alone = run(&pipeline, std::slice::from_ref(spec));
                prop_assert_eq!(
                    &together[i],
                    &alone[0],
                    "request {} ({:?}) differs in the batch",
                    i,
                    spec
                );
                prop_assert_eq!(together[i].len(), spec.params.num_return_sequences);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn opt_requests_decode_the_same_in_a_mixed_batch_as_alone() {
    check("opt-tiny", 24);
}

#[test]
fn t5_requests_decode_the_same_in_a_mixed_batch_as_alone() {
    check("t5-tiny", 24);
}

/// Continuous batching: a request prefilled on its own joins a batch that has been decoding for
/// a few steps (so caches of different lengths are re-padded), and every request still gets
/// exactly its tokens when run alone.
fn join_mid_decode(model: &str) {
    use blip2_server::generation::{DecodeBatch, SequenceRequest};
    let files = ModelFiles::from_dir(&model_dir(model)).unwrap();
    let pipeline = Blip2Pipeline::load_files(&files, &load_options()).unwrap();
    let specs = [
        Spec {
            image: 0,
            prompt: 2,
            params: GenerationParams {
                max_new_tokens: 12,
                min_new_tokens: 12,
                ..GenerationParams::default()
            },
        },
        Spec {
            image: 1,
            prompt: 0,
            params: GenerationParams {
                num_beams: 3,
                num_return_sequences: 2,
                max_new_tokens: 9,
                ..GenerationParams::default()
            },
        },
        Spec {
            image: 3,
            prompt: 1,
            params: GenerationParams {
                do_sample: true,
                seed: Some(7),
                max_new_tokens: 8,
                ..GenerationParams::default()
            },
        },
    ];
    let prefill = |spec: &Spec| {
        let bytes = std::fs::read(image_path(IMAGES[spec.image])).unwrap();
        let pv = pipeline
            .images
            .batch_tensor(
                &[pipeline.images.pixel_values(&bytes).unwrap()],
                pipeline.model.device(),
            )
            .unwrap();
        let features = pipeline.model.image_features(&pv).unwrap();
        let prompt = pipeline.prompts.build(PROMPTS[spec.prompt]).unwrap();
        let request = SequenceRequest::new(prompt, spec.params.clone());
        DecodeBatch::prefill(
            &pipeline.model,
            &pipeline.prompts,
            &features.query_embeds,
            &[request],
        )
        .unwrap()
    };
    let mut batch = prefill(&specs[0]);
    for _ in 0..3 {
        batch.step().unwrap();
    }
    batch.join(prefill(&specs[1])).unwrap();
    batch.step().unwrap();
    batch.step().unwrap();
    batch.join(prefill(&specs[2])).unwrap();
    let joined: Vec<Vec<Vec<u32>>> = batch
        .run()
        .unwrap()
        .into_iter()
        .map(|seqs| seqs.into_iter().map(|s| s.token_ids).collect())
        .collect();
    for (i, spec) in specs.iter().enumerate() {
        let alone = run(&pipeline, std::slice::from_ref(spec));
        assert_eq!(joined[i], alone[0], "{model}: request {i} after joining");
    }
}

#[test]
fn opt_requests_joining_a_running_batch_decode_as_alone() {
    join_mid_decode("opt-tiny");
}

#[test]
fn t5_requests_joining_a_running_batch_decode_as_alone() {
    join_mid_decode("t5-tiny");
}

/// Cancelling one request mid-decode ends it with `cancelled` (beams keep their best partial
/// sequences) and leaves the others' tokens untouched.
#[test]
fn cancelled_requests_leave_and_the_rest_continue() {
    use blip2_server::generation::{DecodeBatch, FinishReason, SequenceRequest};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let files = ModelFiles::from_dir(&model_dir("opt-tiny")).unwrap();
    let pipeline = Blip2Pipeline::load_files(&files, &load_options()).unwrap();
    let specs = [
        Spec {
            image: 0,
            prompt: 1,
            params: GenerationParams {
                max_new_tokens: 10,
                min_new_tokens: 10,
                ..GenerationParams::default()
            },
        },
        Spec {
            image: 1,
            prompt: 0,
            params: GenerationParams {
                num_beams: 3,
                num_return_sequences: 2,
                max_new_tokens: 10,
                min_new_tokens: 10,
                ..GenerationParams::default()
            },
        },
        Spec {
            image: 2,
            prompt: 2,
            params: GenerationParams {
                max_new_tokens: 10,
                min_new_tokens: 10,
                ..GenerationParams::default()
            },
        },
    ];
    let images: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| std::fs::read(image_path(IMAGES[s.image])).unwrap())
        .collect();
    let pixels: Vec<Vec<f32>> = images
        .iter()
        .map(|b| pipeline.images.pixel_values(b).unwrap())
        .collect();
    let pv = pipeline
        .images
        .batch_tensor(&pixels, pipeline.model.device())
        .unwrap();
    let features = pipeline.model.image_features(&pv).unwrap();
    let flags: Vec<Arc<AtomicBool>> = specs
        .iter()
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    let requests: Vec<SequenceRequest> = specs
        .iter()
        .zip(&flags)
        .map(|(s, flag)| SequenceRequest {
            prompt: pipeline.prompts.build(PROMPTS[s.prompt]).unwrap(),
            params: s.params.clone(),
            cancel: Some(flag.clone()),
        })
        .collect();
    let mut batch = DecodeBatch::prefill(
        &pipeline.model,
        &pipeline.prompts,
        &features.query_embeds,
        &requests,
    )
    .unwrap();
    for _ in 0..4 {
        batch.step().unwrap();
    }
    flags[0].store(true, Ordering::Relaxed);
    flags[1].store(true, Ordering::Relaxed);
    let out = batch.run().unwrap();
    for seq in out[0].iter().chain(&out[1]) {
        assert_eq!(seq.finish_reason, FinishReason::Cancelled);
        assert!(seq.token_ids.len() < 10);
    }
    assert_eq!(out[1].len(), 2, "beams return their best partial sequences");
    let alone = run(&pipeline, &specs[2..]);
    let continued: Vec<Vec<u32>> = out[2].iter().map(|s| s.token_ids.clone()).collect();
    assert_eq!(continued, alone[0]);
    assert_eq!(out[2][0].finish_reason, FinishReason::Length);
}
