//! The model worker: jobs submitted together are batched (continuous batching) and each gets the
//! sequences it would get alone; streamed tokens add up to the final ones; a job whose caller
//! hangs up is cancelled and the others are unaffected.

mod common;

use std::sync::Arc;

use blip2_server::engine::{self, EngineConfig, Job, JobEvent};
use blip2_server::generation::GenerationParams;
use blip2_server::metrics::Metrics;
use blip2_server::model::ModelFiles;
use blip2_server::{Blip2Pipeline, LoadOptions};
use common::*;
use tokio::sync::mpsc;

fn load() -> Blip2Pipeline {
    let files = ModelFiles::from_dir(&model_dir("opt-tiny")).unwrap();
    Blip2Pipeline::load_files(&files, &LoadOptions::default()).unwrap()
}

struct Case {
    image: &'static str,
    prompt: Option<&'static str>,
    params: GenerationParams,
}

fn cases() -> Vec<Case> {
    let greedy = |max| GenerationParams {
        max_new_tokens: max,
        min_new_tokens: max,
        ..GenerationParams::default()
    };
    vec![
        Case {
            image: "rgb_640x480.png",
            prompt: None,
            params: greedy(12),
        },
        Case {
            image: "rgba_100x37.png",
            prompt: Some("a photo of"),
            params: greedy(5),
        },
        Case {
            image: "gray_13x200.png",
            prompt: Some("Question: what is in the picture? Answer:"),
            params: GenerationParams {
                num_beams: 3,
                num_return_sequences: 2,
                max_new_tokens: 8,
                ..GenerationParams::default()
            },
        },
        Case {
            image: "photo_320x240.jpg",
            prompt: None,
            params: GenerationParams {
                do_sample: true,
                seed: Some(3),
                max_new_tokens: 9,
                ..GenerationParams::default()
            },
        },
        Case {
            image: "tall_300x1000.png",
            prompt: Some("a photo of"),
            params: greedy(20),
        },
    ]
}

fn job(p: &Blip2Pipeline, c: &Case) -> (Job, mpsc::UnboundedReceiver<JobEvent>) {
    let bytes = std::fs::read(image_path(c.image)).unwrap();
    Job::new(
        p.images.pixel_values(&bytes).unwrap(),
        p.prompts.build(c.prompt).unwrap(),
        c.params.clone(),
    )
}

#[test]
fn batched_jobs_get_what_they_get_alone_and_stream_their_tokens() {
    let reference = load();
    let expected: Vec<Vec<Vec<u32>>> = cases()
        .iter()
        .map(|c| {
            let bytes = std::fs::read(image_path(c.image)).unwrap();
            let out = reference
                .generate(
                    &[bytes],
                    &[c.prompt.map(str::to_string)],
                    std::slice::from_ref(&c.params),
                )
                .unwrap();
            out[0]
                .sequences
                .iter()
                .map(|s| s.token_ids.clone())
                .collect()
        })
        .collect();
    let (handle, thread) = engine::start(
        load(),
        EngineConfig {
            max_batch_size: 4,
            ..EngineConfig::default()
        },
        Arc::new(Metrics::new().unwrap()),
    );
    let receivers: Vec<_> = cases()
        .iter()
        .map(|c| {
            let (job, rx) = job(&reference, c);
            handle.try_submit(job).unwrap();
            rx
        })
        .collect();
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let mut streamed = Vec::new();
        let done = loop {
            match rx.blocking_recv().expect("job answered") {
                JobEvent::Token { id, .. } => streamed.push(id),
                JobEvent::Done(seqs) => break seqs,
                JobEvent::Error(e) => panic!("job {i} failed: {e}"),
                JobEvent::Features { .. } => panic!("job {i}: features for a generation job"),
            }
        };
        let tokens: Vec<Vec<u32>> = done.iter().map(|s| s.token_ids.clone()).collect();
        assert_eq!(tokens, expected[i], "job {i}");
        if cases()[i].params.num_beams == 1 {
            assert_eq!(streamed, tokens[0], "job {i}: streamed tokens");
        }
    }
    drop(handle);
    thread.join().unwrap();
}

#[test]
fn a_job_whose_caller_hangs_up_is_cancelled_and_others_finish() {
    let reference = load();
    let (handle, thread) = engine::start(
        load(),
        EngineConfig::default(),
        Arc::new(Metrics::new().unwrap()),
    );
    let all = cases();
    let (long, long_rx) = job(&reference, &all[4]);
    let long_cancel = long.cancel.clone();
    let (short, mut short_rx) = job(&reference, &all[0]);
    handle.try_submit(long).unwrap();
    handle.try_submit(short).unwrap();
    drop(long_rx);
    let done = loop {
        match short_rx.blocking_recv().expect("job answered") {
            JobEvent::Done(seqs) => break seqs,
            JobEvent::Error(e) => panic!("{e}"),
            JobEvent::Token { .. } => {}
            JobEvent::Features { .. } => panic!("features for a generation job"),
        }
    };
    assert_eq!(done[0].token_ids.len(), 12);
    drop(handle);
    thread.join().unwrap();
    // The worker saw the closed receiver and cancelled the job.
    assert!(long_cancel.load(std::sync::atomic::Ordering::Relaxed));
}

#[test]
fn the_token_budget_serialises_jobs_and_the_image_cache_runs_vision_once() {
    let reference = load();
    let all = cases();
    // Three jobs on one image with different prompts; the budget fits exactly one at a time.
    let prompts = [
        None,
        Some("a photo of"),
        Some("Question: what is it? Answer:"),
    ];
    let params = all[0].params.clone();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let bytes = std::fs::read(image_path(all[0].image)).unwrap();
            reference
                .generate(
                    &[bytes],
                    &[p.map(str::to_string)],
                    std::slice::from_ref(&params),
                )
                .unwrap()[0]
                .sequences[0]
                .token_ids
                .clone()
        })
        .collect();
    let jobs: Vec<_> = prompts
        .iter()
        .map(|p| {
            job(
                &reference,
                &Case {
                    image: all[0].image,
                    prompt: *p,
                    params: params.clone(),
                },
            )
        })
        .collect();
    let largest = jobs
        .iter()
        .map(|(j, _)| {
            engine::job_tokens(
                reference.model.config.num_query_tokens,
                &j.prompt,
                &j.params,
            )
        })
        .max()
        .unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let (handle, thread) = engine::start(
        load(),
        EngineConfig {
            max_batch_tokens: largest,
            image_cache_size: 4,
            ..EngineConfig::default()
        },
        metrics.clone(),
    );
    let receivers: Vec<_> = jobs
        .into_iter()
        .map(|(j, rx)| {
            handle.try_submit(j).unwrap();
            rx
        })
        .collect();
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let done = loop {
            match rx.blocking_recv().expect("job answered") {
                JobEvent::Done(seqs) => break seqs,
                JobEvent::Error(e) => panic!("{e}"),
                JobEvent::Token { .. } => {}
                JobEvent::Features { .. } => panic!("features for a generation job"),
            }
        };
        assert_eq!(done[0].token_ids, expected[i], "job {i}");
    }
    drop(handle);
    thread.join().unwrap();
    // Never more than one request in a step: the budget held.
    let steps = metrics.batch_size.get_sample_count();
    assert!(steps > 0);
    assert_eq!(metrics.batch_size.get_sample_sum(), steps as f64);
    // The image went through the vision encoder once.
    assert_eq!(metrics.image_cache.with_label_values(&["miss"]).get(), 1);
    assert_eq!(metrics.image_cache.with_label_values(&["hit"]).get(), 2);
    assert_eq!(metrics.queue_depth.get(), 0);
    assert_eq!(metrics.running_requests.get(), 0);
}

/// A job's last event (its tokens skipped).
/// An engine on the fixture model whose idle worker waits up to `max_wait` for incoming requests.
fn start_waiting(
    max_wait: std::time::Duration,
    metrics: Arc<Metrics>,
) -> (engine::EngineHandle, std::thread::JoinHandle<()>) {
    engine::start(
        load(),
        EngineConfig {
            max_wait,
            ..EngineConfig::default()
        },
        metrics,
    )
}

fn outcome(rx: &mut mpsc::UnboundedReceiver<JobEvent>) -> JobEvent {
    loop {
        match rx.blocking_recv().expect("job answered") {
            JobEvent::Token { .. } => {}
            other => return other,
        }
    }
}

#[test]
fn a_request_the_model_refuses_fails_alone_and_the_worker_goes_on() {
    let reference = load();
    let all = cases();
    let (handle, thread) = start_waiting(
        std::time::Duration::from_secs(5),
        Arc::new(Metrics::new().unwrap()),
    );
    // More new tokens than the tiny OPT has positions: its prefill fails.
    let bad = Case {
        image: all[0].image,
        prompt: None,
        params: GenerationParams {
            max_new_tokens: 500,
            ..GenerationParams::default()
        },
    };
    let (bad_job, mut bad_rx) = job(&reference, &bad);
    let (good_job, mut good_rx) = job(&reference, &all[0]);
    // Both on their way before either is queued: the worker waits for the second and admits
    // them as one group.
    let incoming = (handle.incoming(), handle.incoming());
    handle.try_submit(bad_job).unwrap();
    drop(incoming.0);
    std::thread::sleep(std::time::Duration::from_millis(100));
    handle.try_submit(good_job).unwrap();
    drop(incoming.1);
    match outcome(&mut bad_rx) {
        JobEvent::Error(e) => assert!(e.contains("positions"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // Admitted with it, the good request is unaffected, and later ones are served.
    assert!(matches!(outcome(&mut good_rx), JobEvent::Done(s) if s[0].token_ids.len() == 12));
    let (again, mut again_rx) = job(&reference, &all[1]);
    handle.try_submit(again).unwrap();
    assert!(matches!(outcome(&mut again_rx), JobEvent::Done(_)));
    drop(handle);
    thread.join().unwrap();
}

#[test]
fn an_idle_worker_waits_for_requests_on_their_way_and_no_longer_than_max_wait() {
    let reference = load();
    let all = cases();
    let metrics = Arc::new(Metrics::new().unwrap());
    let (handle, thread) = start_waiting(std::time::Duration::from_secs(5), metrics.clone());
    // The second request is still being preprocessed when the first is queued: the worker
    // waits for it, and the two run every step together.
    let second_on_its_way = handle.incoming();
    let (first, mut first_rx) = job(&reference, &all[0]);
    handle.try_submit(first).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (second, mut second_rx) = job(&reference, &all[0]);
    handle.try_submit(second).unwrap();
    drop(second_on_its_way);
    assert!(matches!(outcome(&mut first_rx), JobEvent::Done(_)));
    assert!(matches!(outcome(&mut second_rx), JobEvent::Done(_)));
    let steps = metrics.batch_size.get_sample_count();
    assert!(steps > 0);
    assert_eq!(metrics.batch_size.get_sample_sum(), 2.0 * steps as f64);
    drop(handle);
    thread.join().unwrap();

    // A request that never arrives holds a first one back for max_wait at most.
    let (handle, thread) = start_waiting(
        std::time::Duration::from_millis(100),
        Arc::new(Metrics::new().unwrap()),
    );
    let _never = handle.incoming();
    let (lone, mut lone_rx) = job(&reference, &all[0]);
    handle.try_submit(lone).unwrap();
    assert!(matches!(outcome(&mut lone_rx), JobEvent::Done(_)));
    drop(handle);
    thread.join().unwrap();
}
