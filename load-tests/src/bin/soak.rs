//! Soak: minutes of mixed traffic against a running gateway, with children
//! killed at random. Valid images and videos from several clients, hostile
//! inputs (corrupt, bombs, silent and slow connections) from another, and a
//! SIGKILL for a random worker or the executor every 20–40 s. Every valid
//! request must be answered correctly or with a documented 5xx of a killed
//! child; at the end the leased slots are back to 0, and the gateway's RSS
//! and open fds are flat from minute 2 on. Prints one JSON line; exits 1 if
//! a check failed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    url: String,
    /// The gateway's pid (to sample memory and fds, and to find children).
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Clients sending valid images.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: std::path::PathBuf,
    #[arg(long, default_value = ".deps/videos/h264.mp4")]
    video: std::path::PathBuf,
}

/// Outcome tallies, by kind of traffic and answer.
#[derive(Debug, Default)]
struct Tally(std::sync::Mutex<HashMap<String, u64>>);

impl Tally {
    fn add(&self, key: String) {
        *self.0.lock().unwrap().entry(key).or_default() += 1;
    }
}

/// 5xx codes a request may get while a child is killed or restarting.
const KILL_CODES: &[&str] = &[
    "worker_crashed",
    "executor_crashed",
    "not_ready",
    "queue_timeout",
];

async fn post(
    c: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
) -> Result<(u16, serde_json::Value), String> {
    let r = c
        .post(url)
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let json = r.json().await.map_err(|e| e.to_string())?;
    Ok((status, json))
}

/// The tally key of one answer: `judge` says whether an answer is right
/// (`Some(Ok)`), wrong (`Some(Err(why))`) or not its to judge (`None`); a
/// 5xx of a killed or restarting child is counted apart, anything else is
/// unexpected.
fn outcome(
    kind: &str,
    r: Result<(u16, serde_json::Value), String>,
    judge: impl Fn(u16, &serde_json::Value) -> Option<Result<(), String>>,
) -> String {
    match r {
        Err(e) => format!("{kind} TRANSPORT {e}"),
        Ok((s, j)) => match judge(s, &j) {
            Some(Ok(())) if (400..500).contains(&s) => format!("{kind} 4xx"),
            Some(Ok(())) => format!("{kind} ok"),
            Some(Err(why)) => format!("{kind} WRONG {why}"),
            None if s >= 500 && KILL_CODES.contains(&code(&j).as_str()) => {
                format!("{kind} {s} {}", code(&j))
            }
            None => format!("{kind} UNEXPECTED {s} {}", code(&j)),
        },
    }
}

fn code(j: &serde_json::Value) -> String {
    j["error"]["code"].as_str().unwrap_or("?").to_string()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()?;
    let score = format!("{}/v1/models/open_nsfw/score", a.url);
    let images: Vec<(String, Vec<u8>)> = [
        "coffee.jpg",
        "coffee_640.jpg",
        "astronaut_1536.jpg",
        "chelsea.png",
    ]
    .iter()
    .map(|n| {
        Ok((
            n.to_string(),
            std::fs::read(a.fixtures.join("images").join(n))?,
        ))
    })
    .collect::<std::io::Result<_>>()?;
    // The answer each image must get, measured before any kill.
    let mut want = HashMap::new();
    for (n, d) in &images {
        let (s, j) = post(&c, &score, d.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(s == 200, "baseline {n}: {s} {j}");
        want.insert(
            n.clone(),
            j["results"][0]["scores"]["nsfw"].as_f64().unwrap(),
        );
    }
    let hostile: Vec<(&str, Vec<u8>)> = [
        "truncated.jpg",
        "random.bin",
        "bomb_30000.png",
        "claims_65000.jpg",
    ]
    .iter()
    .map(|n| Ok((*n, std::fs::read(a.fixtures.join("bad").join(n))?)))
    .collect::<std::io::Result<_>>()?;
    let video = std::fs::read(&a.video)?;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + Duration::from_secs_f64(a.minutes * 60.0);
    let mut tasks = tokio::task::JoinSet::new();

    for k in 0..a.clients {
        let (c, url, images, want, tally, stop) = (
            c.clone(),
            score.clone(),
            images.clone(),
            want.clone(),
            tally.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            let mut i = k;
            while !stop.load(Ordering::Relaxed) {
                let (name, data) = &images[i % images.len()];
                i += 1;
                let key = outcome("image", post(&c, &url, data.clone()).await, |s, j| {
                    let got = j["results"][0]["scores"]["nsfw"].as_f64().unwrap_or(-1.0);
                    // Lane or stream, batch 1 or 4: bf16 kernels differ slightly.
                    match s {
                        200 if (got - want[name]).abs() <= 2e-3 => Some(Ok(())),
                        200 => Some(Err(format!("{name} {got} vs {}", want[name]))),
                        _ => None,
                    }
                });
                tally.add(key);
            }
        });
    }
    {
        let (c, url, tally, stop) = (c.clone(), score.clone(), tally.clone(), stop.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = post(&c, &format!("{url}?fps=1"), video.clone()).await;
                let key = outcome("video", r, |s, j| match s {
                    200 if j["frames_sampled"] == 10 => Some(Ok(())),
                    200 => Some(Err(j["frames_sampled"].to_string())),
                    _ => None,
                });
                tally.add(key);
            }
        });
    }
    {
        let (c, url, tally, stop) = (c.clone(), score.clone(), tally.clone(), stop.clone());
        let addr = a.url.trim_start_matches("http://").to_string();
        tasks.spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if i.is_multiple_of(5) {
                    // A silent upload: it must be cut off (408) on its own.
                    let key = silent(&addr).await;
                    tally.add(key);
                    continue;
                }
                let (name, data) = &hostile[i % hostile.len()];
                let key = outcome("hostile", post(&c, &url, data.clone()).await, |s, _| {
                    (400..500).contains(&s).then_some(Ok(()))
                });
                let key = if key.contains("UNEXPECTED") {
                    format!("{key} ({name})")
                } else {
                    key
                };
                tally.add(key);
            }
        });
    }
    let killer = {
        let (stop, tally, pid) = (stop.clone(), tally.clone(), a.pid);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let wait = 20 + (n * 7919 % 21);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let kids: Vec<u32> = load_tests::tree(pid).into_iter().skip(1).collect();
                if kids.is_empty() {
                    continue;
                }
                let victim = kids[(n as usize * 31) % kids.len()];
                let comm =
                    std::fs::read_to_string(format!("/proc/{victim}/comm")).unwrap_or_default();
                let _ = std::process::Command::new("kill")
                    .args(["-9", &victim.to_string()])
                    .status();
                tally.add(format!("killed {}", comm.trim()));
            }
        })
    };
    // Samples: (seconds, gateway RSS KiB, gateway fds, children RSS KiB).
    let mut samples: Vec<(f64, u64, usize, u64)> = Vec::new();
    let t0 = Instant::now();
    while Instant::now() < until {
        let kids: u64 = load_tests::tree(a.pid)
            .iter()
            .skip(1)
            .map(|&p| rss_kib(p))
            .sum();
        samples.push((t0.elapsed().as_secs_f64(), rss_kib(a.pid), fds(a.pid), kids));
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    killer.abort();
    while tasks.join_next().await.is_some() {}
    // Let restarts finish and slots come back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let metrics = c
        .get(format!("{}/metrics", a.url))
        .send()
        .await?
        .text()
        .await?;
    let leased: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("mmgate_shm_slots") && l.contains("state=\"leased\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let end = (rss_kib(a.pid), fds(a.pid));
    let at = |min: f64| {
        samples
            .iter()
            .find(|s| s.0 >= min * 60.0)
            .copied()
            .unwrap_or(samples[0])
    };
    let from = at(2.0f64.min(a.minutes / 5.0));
    let rss_growth = end.0 as f64 / from.1 as f64 - 1.0;
    let counts = tally.0.lock().unwrap().clone();
    let bad: u64 = counts
        .iter()
        .filter(|(k, _)| k.contains("WRONG") || k.contains("UNEXPECTED") || k.contains("TRANSPORT"))
        .map(|(_, v)| v)
        .sum();
    let pass = bad == 0 && leased == 0.0 && rss_growth < 0.05 && end.1 <= from.2 + 4;
    println!(
        "{}",
        serde_json::json!({
            "minutes": a.minutes,
            "counts": counts,
            "leased_slots_at_end": leased,
            "gateway_rss_kib": {"from": from.1, "end": end.0, "growth": rss_growth},
            "gateway_fds": {"from": from.2, "end": end.1},
            "children_rss_kib": {"from": from.3, "max": samples.iter().map(|s| s.3).max()},
            "samples": samples,
            "pass": pass,
        })
    );
    if !pass {
        std::process::exit(1);
    }
    Ok(())
}

/// Opens an upload that declares a body and sends none; the gateway must
/// answer 408 and close within its body idle timeout.
async fn silent(addr: &str) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return "silent TRANSPORT connect".into();
    };
    let head =
        "POST /v1/models/open_nsfw/score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n";
    if s.write_all(head.as_bytes()).await.is_err() {
        return "silent TRANSPORT write".into();
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await {
        Ok(_) if buf.starts_with(b"HTTP/1.1 408") => "silent 408".into(),
        Ok(_) if buf.is_empty() => "silent closed".into(),
        Ok(_) => format!(
            "silent UNEXPECTED {}",
            String::from_utf8_lossy(&buf[..buf.len().min(12)])
        ),
        Err(_) => "silent UNEXPECTED held open 30 s".into(),
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
