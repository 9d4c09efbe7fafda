//! Closed-loop HTTP load: `concurrency` clients each send one image after
//! another to `/v1/models/{model}/score` for `seconds`; prints one JSON line
//! with throughput, p50/p99 latency and the gateway tree's peak memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    target: load_tests::Target,
    #[command(flatten)]
    load: load_tests::Closed,
    /// Gateway pid, to sample the tree's memory.
    #[arg(long)]
    pid: Option<u32>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let body = bytes_of(&a.target.file)?;
    let client = a
        .target
        .client()?
        .pool_max_idle_per_host(a.load.concurrency)
        .build()?;
    let url = a.target.score_url();
    run(&client, &url, &body, a.load.concurrency, a.load.warmup).await;
    let peak = Arc::new(std::sync::Mutex::new(0.0f64));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = a.pid.map(|pid| {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let m = load_tests::tree_pss_mib(pid);
                let mut p = peak.lock().unwrap();
                *p = p.max(m);
                drop(p);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    });
    let t = Instant::now();
    let (mut lat, errors) = run(&client, &url, &body, a.load.concurrency, a.load.seconds).await;
    let wall = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = sampler {
        let _ = s.join();
    }
    let ok = lat.len();
    let (p50, p99, mean) = load_tests::summary(&mut lat);
    let line = serde_json::json!({
        "file": a.target.file.file_name().map(|f| f.to_string_lossy().to_string()),
        "concurrency": a.load.concurrency,
        "ok": ok,
        "errors": errors,
        "throughput_per_s": ok as f64 / wall,
        "p50_ms": p50,
        "p99_ms": p99,
        "mean_ms": mean,
        "peak_tree_pss_mib": *peak.lock().unwrap(),
    });
    println!("{line}");
    Ok(())
}

fn bytes_of(p: &std::path::Path) -> anyhow::Result<reqwest::Body> {
    Ok(reqwest::Body::from(std::fs::read(p)?))
}

/// Runs the closed loop; returns latencies of successes and the error count.
async fn run(
    client: &reqwest::Client,
    url: &str,
    body: &reqwest::Body,
    concurrency: usize,
    seconds: f64,
) -> (Vec<Duration>, usize) {
    let bytes = body.as_bytes().expect("in-memory body").to_vec();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, bytes) = (client.clone(), url.to_string(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            while Instant::now() < end {
                let t = Instant::now();
                let r = client.post(&url).body(bytes.clone()).send().await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        all.extend(l);
        errors += e;
    }
    (all, errors)
}
