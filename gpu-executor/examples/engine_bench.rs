//! Latency and throughput of a model's engines on this machine, per
//! instances × intra-op threads and batch size.
//!
//! cargo run --release -p gpu-executor --example engine_bench -- \
//!     [--config configs/models/open_nsfw.toml] [--seconds 5]
//!
//! Latency: one instance, one batch at a time (other instances idle).
//! Throughput: every instance runs batches back to back on its own thread.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use config::ModelSpec;
use gpu_executor::{Backends, Engine, load};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "configs/models/open_nsfw.toml")]
    config: PathBuf,
    #[arg(long, default_value = ".deps/onnxruntime/libonnxruntime.so.1.32.0")]
    ort_library: PathBuf,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// instances x threads to measure.
    #[arg(long, value_delimiter = ',', default_value = "1x1,1x2,2x1")]
    shapes: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Also measure the first batch-1 run after a warm-up of 1 vs max_batch.
    #[arg(long)]
    first_run: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = ModelSpec::load(&args.config)?;
    let backends = Backends::new(std::path::absolute(&args.ort_library)?);
    if args.first_run {
        first_run(&base, &backends)?;
    }
    println!("| instances x threads | batch | latency p50 ms | p90 ms | throughput img/s |");
    println!("|---|---|---|---|---|");
    for shape in &args.shapes {
        let (n, t) = shape.split_once('x').expect("shape is NxT");
        let (n, t): (usize, u32) = (n.parse()?, t.parse()?);
        let mut spec = base.clone();
        spec.instances.intra_threads = t;
        spec.batching.max_batch = spec
            .batching
            .max_batch
            .max(*args.batches.iter().max().unwrap() as u32);
        for &b in &args.batches {
            let mut engines: Vec<Box<dyn Engine>> = (0..n)
                .map(|_| load(&spec, &backends))
                .collect::<Result<_, _>>()?;
            let input = sample(&spec, b);
            for e in engines.iter_mut() {
                e.run(&input, b)?;
            }
            let (p50, p90) = latency(engines[0].as_mut(), &input, b, 20);
            let tput = throughput(
                &mut engines,
                &input,
                b,
                Duration::from_secs_f64(args.seconds),
            );
            println!("| {n}x{t} | {b} | {p50:.1} | {p90:.1} | {tput:.1} |");
        }
    }
    Ok(())
}

fn sample(spec: &ModelSpec, batch: usize) -> Vec<f32> {
    (0..batch * spec.input.elements())
        .map(|i| ((i as f32) * 0.013).sin() * 100.0)
        .collect()
}

fn latency(e: &mut dyn Engine, input: &[f32], b: usize, runs: usize) -> (f64, f64) {
    let mut ms: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            e.run(input, b).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[runs / 2], ms[runs * 9 / 10])
}

fn throughput(engines: &mut [Box<dyn Engine>], input: &[f32], b: usize, dur: Duration) -> f64 {
    let start = Instant::now();
    let images: usize = std::thread::scope(|s| {
        let handles: Vec<_> = engines
            .iter_mut()
            .map(|e| {
                s.spawn(move || {
                    let mut n = 0;
                    while start.elapsed() < dur {
                        e.run(input, b).unwrap();
                        n += b;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    images as f64 / start.elapsed().as_secs_f64()
}

/// First batch-1 latency after warming up with 1 vs with max_batch.
fn first_run(base: &ModelSpec, backends: &Backends) -> anyhow::Result<()> {
    let one = sample(base, 1);
    for warm in [1, base.batching.max_batch as usize] {
        let mut firsts = Vec::new();
        let mut firsts_big = Vec::new();
        for _ in 0..3 {
            let mut e = load(base, backends)?;
            e.run(&sample(base, warm), warm)?;
            let t = Instant::now();
            e.run(&one, 1)?;
            firsts.push(t.elapsed().as_secs_f64() * 1e3);
            let max = base.batching.max_batch as usize;
            let big = sample(base, max);
            let t = Instant::now();
            e.run(&big, max)?;
            firsts_big.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "warm-up batch {warm}: first batch-1 run {:.1?} ms, then first batch-{} run {:.1?} ms",
            firsts, base.batching.max_batch, firsts_big
        );
    }
    Ok(())
}
