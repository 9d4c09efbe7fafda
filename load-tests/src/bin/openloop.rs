//! Open-loop HTTP load for one tenant: sends one image to
//! `/v1/models/{model}/score` every `1 / rate` seconds for `seconds`,
//! whether or not earlier requests were answered (a client that does not
//! slow down when the service does), and prints one JSON line: requests
//! sent, answers by status, latency of the 200s (p50, p99, max) and of the
//! refusals (p99, max), requests that got no answer within `timeout`, and
//! where the slowest tenth of the 200s spent their time (the mean of each
//! `Server-Timing` stage over them).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    target: load_tests::Target,
    /// Requests per second.
    #[arg(long)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// A request not answered within this counts as timed out.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(a.rate > 0.0, "--rate must be > 0");
    let body = bytes::Bytes::from(std::fs::read(&a.target.file)?);
    let client = a
        .target
        .client()?
        .timeout(Duration::from_secs_f64(a.timeout))
        .build()?;
    let url = a.target.score_url();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate));
    // Late ticks are sent at once: the schedule, not the service, sets the pace.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs_f64(a.seconds);
    let mut tasks = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let req = client.post(&url).body(body.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let (status, stages) = match req.send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    let stages = server_timing(r.headers());
                    let _ = r.bytes().await;
                    (Some(s), stages)
                }
                Err(_) => (None, Vec::new()),
            };
            (status, t.elapsed(), stages)
        }));
    }
    let sent = tasks.len();
    let mut statuses = BTreeMap::<String, usize>::new();
    let (mut ok, mut refused, mut timed_out) = (Vec::new(), Vec::new(), 0);
    let mut staged = Vec::new();
    for t in tasks {
        let (status, took, stages) = t.await?;
        match status {
            Some(200) => {
                ok.push(took);
                staged.push((took, stages));
            }
            Some(_) => refused.push(took),
            None => timed_out += 1,
        }
        let key = status.map_or("none".to_string(), |s| s.to_string());
        *statuses.entry(key).or_default() += 1;
    }
    let max = |v: &[Duration]| v.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let (ok_max, refused_max) = (max(&ok), max(&refused));
    let (p50, p99, _) = load_tests::summary(&mut ok);
    let (_, refused_p99, _) = load_tests::summary(&mut refused);
    // The slowest tenth: where did their time go?
    staged.sort_by_key(|(took, _)| std::cmp::Reverse(*took));
    let slow = &staged[..staged.len().div_ceil(10)];
    let mut slowest = serde_json::Map::new();
    for (_, stages) in slow {
        for (name, ms) in stages {
            let v = slowest.entry(name.clone()).or_insert(0.0.into());
            *v = (v.as_f64().unwrap_or(0.0) + ms / slow.len() as f64).into();
        }
    }
    let line = serde_json::json!({
        "rate_per_s": a.rate,
        "seconds": a.seconds,
        "sent": sent,
        "statuses": statuses,
        "ok_p50_ms": p50,
        "ok_p99_ms": p99,
        "ok_max_ms": ok_max,
        "refused_p99_ms": refused_p99,
        "refused_max_ms": refused_max,
        "timed_out": timed_out,
        "slowest_tenth_mean_ms": slowest,
    });
    println!("{line}");
    Ok(())
}

/// `(stage, ms)` pairs of a `Server-Timing` header (`name;dur=1.2, …`).
fn server_timing(h: &reqwest::header::HeaderMap) -> Vec<(String, f64)> {
    let Some(v) = h.get("server-timing").and_then(|v| v.to_str().ok()) else {
        return Vec::new();
    };
    v.split(',')
        .filter_map(|part| {
            let (name, dur) = part.trim().split_once(";dur=")?;
            Some((name.to_string(), dur.parse().ok()?))
        })
        .collect()
}
