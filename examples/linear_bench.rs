//! Decode-shaped matmuls on opt-2.7b-sized layers (a benchmark, not a test).
//!
//!     cargo run --release --example linear_bench -- [layers] [reps]
//!
//! Builds `layers` decoder layers' worth of random f32 linear weights (q, k, v, o: 2560x2560;
//! fc1: 10240x2560; fc2: 2560x10240; 315 MB a layer, so 8 layers are far beyond the caches) and
//! times one pass over all of them, as one decode step does, for 1, 2, 4, 8 and 16 input rows.
//! Prints the median pass time, the read rate it implies and the arithmetic rate.
//!
//! Environment (each switch acts when the variable is set, whatever its value):
//! - `ROWS=1,8`: only those row counts;
//! - `SHAPE=NxK`: six weights of N x K instead of a layer's shapes;
//! - `HOT`: one 10 MB weight read again and again (it stays in L3), which times the arithmetic
//!   without the memory stream;
//! - `Q8`: the weights quantised to q8_0 first (our q8_0 kernel; 1 byte per weight and an f32
//!   scale per 32).

use std::time::Instant;

use blip2_server::nn::{Linear, Quantization};
use candle_core::{Device, Module, Tensor};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    blip2_server::tuning::init_process();
    let args: Vec<String> = std::env::args().collect();
    let layers: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(8);
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(7);
    let d = 2560;
    let f = 10240;
    // HOT=1: one weight (1024 x 2560, 10 MB, within L3) read again and again, so it stays in cache
    // and the pass measures the arithmetic alone.
    let hot = std::env::var("HOT").is_ok();
    let shapes: Vec<(usize, usize)> = if let Ok(shape) = std::env::var("SHAPE") {
        let (n, k) = shape.split_once('x').expect("SHAPE=NxK");
        vec![(n.parse()?, k.parse()?); 6]
    } else if hot {
        vec![(1024, d); 6]
    } else {
        vec![(d, d), (d, d), (d, d), (d, d), (f, d), (d, f)]
    };
    let q8 = std::env::var("Q8").is_ok();
    let quantize = q8.then_some(Quantization::Q8_0);
    let mut linears = Vec::new();
    let mut bytes = 0usize;
    let mut flops_per_row = 0usize;
    for l in 0..layers {
        for (i, &(out, inp)) in shapes.iter().enumerate() {
            let seed = if hot { 1 } else { (l * 10 + i) as u64 };
            let w = Tensor::from_vec(random(out * inp, seed), (out, inp), &Device::Cpu)?;
            bytes += if q8 {
                out * inp * 36 / 32
            } else {
                out * inp * 4
            };
            flops_per_row += 2 * out * inp;
            let lin = match (hot, linears.first()) {
                (true, Some((first, _))) => Linear::clone(first),
                _ => Linear::new(w, None, quantize)?,
            };
            linears.push((lin, inp));
        }
    }
    println!("| rows | pass (ms, median of {reps}) | GB/s | GFLOP/s |");
    println!("| --- | --- | --- | --- |");
    // ROWS=1,8: only those row counts.
    let rows: Vec<usize> = match std::env::var("ROWS") {
        Ok(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        Err(_) => vec![1, 2, 4, 8, 16],
    };
    for m in rows {
        let ks: Vec<usize> = shapes.iter().map(|s| s.1).collect();
        let inputs: Vec<Tensor> = [ks[0], *ks.last().unwrap()]
            .iter()
            .map(|&k| Tensor::from_vec(random(m * k, k as u64), (m, k), &Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        let mut times = Vec::new();
        for _ in 0..reps + 1 {
            let t = Instant::now();
            for (lin, inp) in &linears {
                let x = if *inp == ks[0] {
                    &inputs[0]
                } else {
                    &inputs[1]
                };
                std::hint::black_box(lin.forward(x)?);
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0);
        times.sort_by(|a, b| a.total_cmp(b));
        let t = times[times.len() / 2];
        println!(
            "| {m} | {:.1} | {:.1} | {:.1} |",
            t * 1e3,
            bytes as f64 / t / 1e9,
            (flops_per_row * m) as f64 / t / 1e9
        );
    }
    Ok(())
}
