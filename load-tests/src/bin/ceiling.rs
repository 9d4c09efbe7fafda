//! The ceiling mmgate is measured against: the same decode + preprocess +
//! engine work, in one process, with no HTTP, IPC or shared memory.
//! `threads` threads each own one engine instance (ONNX Runtime: with
//! `intra` intra-op threads; OpenVINO: one infer request each, on the
//! model's stream layout) and loop preprocess → infer on one image; the
//! single-image latency is one thread doing the same, one image at a time
//! (on OpenVINO a lone batch takes the latency lane: every core).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "configs/models/open_nsfw.toml")]
    model: std::path::PathBuf,
    #[arg(long, default_value = ".deps/onnxruntime/libonnxruntime.so.1.32.0")]
    ort_library: std::path::PathBuf,
    #[arg(long, default_value = ".deps/openvino/libopenvino_c.so.2641")]
    openvino_library: std::path::PathBuf,
    /// Backend (default: the model spec's): openvino or onnxruntime-cpu.
    #[arg(long)]
    backend: Option<String>,
    /// Image to decode, preprocess and score.
    #[arg(long, required_unless_present = "model_only")]
    file: Option<std::path::PathBuf>,
    /// Instead: only run this many samples through the engines (split over
    /// `threads` instances) and report the wall time.
    #[arg(long)]
    model_only: Option<usize>,
    /// Pipeline threads (each owns an engine instance).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Intra-op threads per engine instance.
    #[arg(long, default_value_t = 1)]
    intra: u32,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Instead: compare single-image latency with mmgate's at this base
    /// URL, in alternating blocks (see `paired`).
    #[arg(long)]
    paired_url: Option<String>,
    /// Blocks of each side in paired mode.
    #[arg(long, default_value_t = 20)]
    blocks: usize,
    /// Requests per block in paired mode (the first 3 are warm-up).
    #[arg(long, default_value_t = 40)]
    per_block: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut spec = config::ModelSpec::load(&a.model)?;
    spec.instances.intra_threads = a.intra;
    spec.instances.count = a.threads as u32;
    if let Some(b) = &a.backend {
        spec.backend = serde_json::from_value(serde_json::Value::String(b.clone()))?;
    }
    let backends = gpu_executor::Backends::new(std::fs::canonicalize(&a.ort_library)?)
        .with_openvino(std::path::absolute(&a.openvino_library)?);
    if let Some(n) = a.model_only {
        return model_only(&spec, &backends, a.threads, n);
    }
    let file = a.file.clone().expect("required unless --model-only");
    let data = std::fs::read(&file)?;
    let limits = config::Limits::default();
    let pipeline = |engine: &mut dyn gpu_executor::Engine, buf: &mut Vec<f32>| {
        let deadline = Instant::now() + Duration::from_secs(5);
        preprocess_worker::preprocess(&data, &spec, &limits, deadline, &mut **buf)
            .expect("preprocess");
        let mut out = engine.run(buf, 1).expect("inference");
        gpu_executor::postprocess::apply(spec.output.postprocess, &mut out);
        out
    };
    let loaded = gpu_executor::load_model(&spec, &backends, 1)?;
    let runtime = loaded.runtime.clone();
    // A lone image takes the latency lane (every core) where the model has
    // one; the throughput run keeps to the other instances, as the
    // batcher does under load.
    let (mut lane, mut engines): (Vec<_>, Vec<_>) =
        loaded.engines.into_iter().partition(|e| e.latency_lane());
    let elements = spec.input.elements();
    let solo = match lane.first_mut() {
        Some(e) => e,
        None => &mut engines[0],
    };

    if let Some(url) = &a.paired_url {
        let mut buf = vec![0f32; elements];
        let engine = solo.as_mut();
        let local = || {
            let s = Instant::now();
            pipeline(&mut *engine, &mut buf);
            s.elapsed()
        };
        return paired(&file, &data, url, a.blocks, a.per_block, local);
    }

    // Single-image latency: one thread, one image at a time.
    let mut buf = vec![0f32; elements];
    let mut lat = Vec::new();
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < a.seconds / 2.0 || lat.len() < 20 {
        let s = Instant::now();
        pipeline(solo.as_mut(), &mut buf);
        lat.push(s.elapsed());
    }
    let (p50, p99, _) = load_tests::summary(&mut lat[3..].to_vec());

    // Throughput: every thread busy.
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    std::thread::scope(|s| {
        for engine in engines.iter_mut() {
            let (done, stop, pipeline) = (&done, &stop, &pipeline);
            s.spawn(move || {
                let mut buf = vec![0f32; elements];
                while !stop.load(Ordering::Relaxed) {
                    pipeline(engine.as_mut(), &mut buf);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(a.seconds));
        stop.store(true, Ordering::Relaxed);
    });
    let wall = t.elapsed().as_secs_f64();
    let line = serde_json::json!({
        "file": file.file_name().map(|f| f.to_string_lossy().to_string()),
        "threads": a.threads,
        "intra": a.intra,
        "backend": runtime.backend.as_str(),
        "precision": runtime.precision.as_str(),
        "throughput_per_s": done.load(Ordering::Relaxed) as f64 / wall,
        "single_p50_ms": p50,
        "single_p99_ms": p99,
    });
    println!("{line}");
    Ok(())
}

/// Lone-request latency, in-process against mmgate, measured side by side:
/// `blocks` times, `per_block` single images through `local` (the ceiling,
/// in this process) then `per_block` sequential requests to mmgate on one
/// kept-alive connection. Each pair of adjacent blocks gives a difference
/// of p50s, so drift on a noisy machine cancels within the pair; prints
/// the median of those differences with the medians of each side.
fn paired(
    file: &std::path::Path,
    data: &[u8],
    url: &str,
    blocks: usize,
    per_block: usize,
    mut local: impl FnMut() -> Duration,
) -> anyhow::Result<()> {
    const WARMUP: usize = 3;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let url = format!("{url}/v1/models/open_nsfw/score");
    // Shared, not copied per request: the copy would count against mmgate.
    let body = bytes::Bytes::copy_from_slice(data);
    let remote = || -> anyhow::Result<Duration> {
        rt.block_on(async {
            let s = Instant::now();
            let r = client.post(&url).body(body.clone()).send().await?;
            anyhow::ensure!(r.status().is_success(), "mmgate answered {}", r.status());
            r.bytes().await?;
            Ok(s.elapsed())
        })
    };
    let p50 = |mut v: Vec<Duration>| load_tests::summary(&mut v[WARMUP..]).0;
    let (mut diffs, mut ceiling, mut mmgate) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..blocks {
        let c = p50((0..per_block).map(|_| local()).collect());
        let m = p50((0..per_block)
            .map(|_| remote())
            .collect::<anyhow::Result<_>>()?);
        diffs.push(m - c);
        ceiling.push(c);
        mmgate.push(m);
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let line = serde_json::json!({
        "file": file.file_name().map(|f| f.to_string_lossy().to_string()),
        "paired_blocks": blocks,
        "per_block": per_block,
        "ceiling_single_p50_ms": med(&ceiling),
        "mmgate_single_p50_ms": med(&mmgate),
        "diff_p50_ms": med(&diffs),
        "diff_p50_ms_by_block": diffs,
    });
    println!("{line}");
    Ok(())
}

/// Wall time of `n` samples through `threads` engine instances in parallel.
fn model_only(
    spec: &config::ModelSpec,
    backends: &gpu_executor::Backends,
    threads: usize,
    n: usize,
) -> anyhow::Result<()> {
    let mut spec = spec.clone();
    spec.instances.count = threads as u32;
    let mut engines = gpu_executor::load_model(&spec, backends, 1)?.engines;
    engines.retain(|e| !e.latency_lane());
    let buf = vec![0.5f32; spec.input.elements()];
    for e in engines.iter_mut() {
        e.run(&buf, 1)?;
    }
    let t = Instant::now();
    std::thread::scope(|s| {
        for (i, e) in engines.iter_mut().enumerate() {
            let buf = &buf;
            s.spawn(move || {
                for _ in (i..n).step_by(threads) {
                    e.run(buf, 1).expect("inference");
                }
            });
        }
    });
    let line = serde_json::json!({"model_only_samples": n, "threads": threads, "backend": spec.backend.as_str(), "seconds": t.elapsed().as_secs_f64()});
    println!("{line}");
    Ok(())
}
