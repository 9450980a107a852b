//! Decoding modes against the reference's `generate()` (tools/make_generation_goldens.py):
//! beam search (3 and 5 beams, length_penalty 1 and -1, num_return_sequences > 1),
//! repetition_penalty, no_repeat_ngram_size and min_new_tokens, single and batched, on OPT and
//! T5. Tokens and texts exact; beam scores within 1e-3 relative (the reference's own batch vs
//! single scores differ by up to 4e-4 with length_penalty -1).

mod common;

use blip2_server::generation::GenerationParams;
use blip2_server::model::ModelFiles;
use blip2_server::{Blip2Pipeline, LoadOptions};
use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Goldens {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    images: Vec<String>,
    prompts: Option<Vec<String>>,
    params: Params,
    sequences: Vec<Vec<u32>>,
    sequences_scores: Option<Vec<f32>>,
    texts: Vec<String>,
}

#[derive(Deserialize)]
struct Params {
    max_new_tokens: usize,
    min_new_tokens: usize,
    num_beams: usize,
    length_penalty: f64,
    num_return_sequences: usize,
    repetition_penalty: f32,
    no_repeat_ngram_size: usize,
}

fn check(model: &str) {
    let path = fixtures().join("generation").join(format!("{model}.json"));
    let goldens: Goldens = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let files = ModelFiles::from_dir(&model_dir(model)).unwrap();
    let pipeline = Blip2Pipeline::load_files(&files, &LoadOptions::default()).unwrap();
    assert!(goldens.cases.len() >= 10);
    for case in &goldens.cases {
        let p = &case.params;
        let params = GenerationParams {
            max_new_tokens: p.max_new_tokens,
            min_new_tokens: p.min_new_tokens,
            num_beams: p.num_beams,
            length_penalty: p.length_penalty,
            num_return_sequences: p.num_return_sequences,
            repetition_penalty: p.repetition_penalty,
            no_repeat_ngram_size: p.no_repeat_ngram_size,
            ..GenerationParams::default()
        };
        let images: Vec<Vec<u8>> = case
            .images
            .iter()
            .map(|i| std::fs::read(image_path(i)).unwrap())
            .collect();
        // The reference's batches use "" for "no prompt": the same ids as none.
        let prompts: Vec<Option<String>> = (0..images.len())
            .map(|i| case.prompts.as_ref().map(|p| p[i].clone()))
            .collect();
        let out = pipeline
            .generate(&images, &prompts, &vec![params; images.len()])
            .unwrap();
        let sequences: Vec<_> = out.iter().flat_map(|g| g.sequences.iter()).collect();
        assert_eq!(
            sequences.len(),
            case.sequences.len(),
            "{model}/{}: number of sequences",
            case.name
        );
        for (i, (ours, tokens)) in sequences.iter().zip(&case.sequences).enumerate() {
            assert_eq!(
                &ours.token_ids, tokens,
                "{model}/{} sequence {i}: tokens",
                case.name
            );
            assert_eq!(
                ours.text, case.texts[i],
                "{model}/{} sequence {i}: text",
                case.name
            );
            if let Some(scores) = &case.sequences_scores {
                let (a, b) = (ours.score, scores[i]);
                assert!(
                    (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                    "{model}/{} sequence {i}: score {a} vs reference {b}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn opt_decoding_modes_match_reference() {
    check("opt-tiny");
}

#[test]
fn t5_decoding_modes_match_reference() {
    check("t5-tiny");
}

/// Streaming pieces concatenate to the full decode, also where byte-level tokens split
/// characters (the random models produce such tokens).
#[test]
fn incremental_detokenisation_concatenates_to_the_full_text() {
    use blip2_server::generation::IncrementalDecoder;
    for model in ["opt-tiny", "t5-tiny"] {
        let path = fixtures().join("generation").join(format!("{model}.json"));
        let goldens: Goldens =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let files = ModelFiles::from_dir(&model_dir(model)).unwrap();
        let pipeline = Blip2Pipeline::load_files(&files, &LoadOptions::default()).unwrap();
        for case in &goldens.cases {
            for (tokens, text) in case.sequences.iter().zip(&case.texts) {
                let mut dec = IncrementalDecoder::new();
                let mut streamed = String::new();
                for &t in tokens {
                    if let Some(piece) = dec.push(t, &pipeline.prompts).unwrap() {
                        assert!(
                            !piece.ends_with('\u{FFFD}') || piece.chars().all(|c| c == '\u{FFFD}')
                        );
                        streamed.push_str(&piece);
                    }
                }
                if let Some(rest) = dec.flush(&pipeline.prompts).unwrap() {
                    streamed.push_str(&rest);
                }
                assert_eq!(&streamed, text, "{model}/{}", case.name);
            }
        }
    }
}

/// A stop string that starts in one token's text and ends in the next still stops generation
/// and is cut from the text.
#[test]
fn stop_strings_spanning_tokens_are_found_and_cut() {
    use blip2_server::generation::{FinishReason, IncrementalDecoder};
    let files = ModelFiles::from_dir(&model_dir("opt-tiny")).unwrap();
    let pipeline = Blip2Pipeline::load_files(&files, &LoadOptions::default()).unwrap();
    let image = vec![std::fs::read(image_path("wide_1000x150.png")).unwrap()];
    let prompt = vec![Some("a photo of".to_string())];
    let free = GenerationParams {
        max_new_tokens: 12,
        min_new_tokens: 12,
        ..GenerationParams::default()
    };
    let out = pipeline
        .generate(&image, &prompt, std::slice::from_ref(&free))
        .unwrap();
    let seq = &out[0].sequences[0];
    // The streamed pieces, to find a boundary between two tokens' texts.
    let mut dec = IncrementalDecoder::new();
    let pieces: Vec<String> = seq
        .token_ids
        .iter()
        .map(|&t| dec.push(t, &pipeline.prompts).unwrap().unwrap_or_default())
        .collect();
    let k = (0..pieces.len() - 1)
        .find(|&k| {
            !pieces[k].trim().is_empty()
                && !pieces[k + 1].trim().is_empty()
                && !pieces[k].ends_with('\u{FFFD}')
        })
        .expect("two neighbouring tokens with text");
    let stop: String = pieces[k]
        .chars()
        .last()
        .into_iter()
        .chain(pieces[k + 1].chars().next())
        .collect();
    let text = &seq.text;
    let cut_at = text.find(&stop).unwrap();
    let params = GenerationParams {
        stop: vec![stop.clone()],
        ..free
    };
    let stopped = &pipeline.generate(&image, &prompt, &[params]).unwrap()[0].sequences[0];
    assert_eq!(
        stopped.finish_reason,
        FinishReason::StopSequence,
        "stop {stop:?}"
    );
    assert_eq!(&stopped.text, &text[..cut_at]);
    assert!(stopped.token_ids.len() <= k + 2 && seq.token_ids.starts_with(&stopped.token_ids));
}
