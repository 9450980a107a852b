//! Decode throughput versus batch size (a benchmark, not a test).
//!
//!     cargo run --release --example decode_throughput -- <checkpoint dir> [steps] [image]
//!
//! For each batch size in 1, 2, 4, 8, 16: one prefill of B identical requests, then `steps`
//! greedy decode steps forced by `min_new_tokens`; prints the median time per step and the
//! tokens per second (`BATCHES=1,8` runs only those batch sizes). Decoding reads every weight
//! once per step whatever B is, so a step of batch 8 should cost well under twice a step of
//! batch 1.

use std::time::Instant;

use blip2_server::generation::{DecodeBatch, GenerationParams, SequenceRequest};
use blip2_server::model::ModelFiles;
use blip2_server::{Blip2Pipeline, LoadOptions};

fn main() -> anyhow::Result<()> {
    blip2_server::tuning::init_process();
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or_else(|| {
        anyhow::anyhow!("usage: decode_throughput <checkpoint dir> [steps] [image]")
    })?;
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let image = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "tests/fixtures/images/rgb_640x480.png".into());
    let started = Instant::now();
    let pipeline = Blip2Pipeline::load_files(
        &ModelFiles::from_dir(dir.as_ref())?,
        &LoadOptions::default(),
    )?;
    blip2_server::tuning::keep_freed_memory();
    eprintln!("loaded {dir} in {:.1} s", started.elapsed().as_secs_f64());
    let bytes = std::fs::read(&image)?;
    let pixels = pipeline.images.pixel_values(&bytes)?;
    let prompt = pipeline.prompts.build(Some("a photo of"))?;
    let params = GenerationParams {
        max_new_tokens: steps + 1,
        min_new_tokens: steps + 1,
        ..GenerationParams::default()
    };
    println!(
        "| batch | prefill (s) | decode step (ms, median) | tokens/s | step cost vs batch 1 |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let mut base = None;
    // BATCHES=1,8: only those batch sizes.
    let batches: Vec<usize> = match std::env::var("BATCHES") {
        Ok(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        Err(_) => vec![1, 2, 4, 8, 16],
    };
    for b in batches {
        let pv = pipeline
            .images
            .batch_tensor(&vec![pixels.clone(); b], pipeline.model.device())?;
        let features = pipeline.model.image_features(&pv)?;
        let requests = vec![SequenceRequest::new(prompt.clone(), params.clone()); b];
        let t = Instant::now();
        let mut batch = DecodeBatch::prefill(
            &pipeline.model,
            &pipeline.prompts,
            &features.query_embeds,
            &requests,
        )?;
        let prefill = t.elapsed().as_secs_f64();
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let t = Instant::now();
            batch.step()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let base_step = *base.get_or_insert(median);
        println!(
            "| {b} | {prefill:.2} | {:.1} | {:.1} | {:.2}x |",
            median * 1e3,
            b as f64 / median,
            median / base_step
        );
    }
    Ok(())
}
