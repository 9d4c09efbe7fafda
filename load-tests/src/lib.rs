//! Shared helpers of the benchmark binaries: latency statistics and the
//! memory of a process tree.

use std::time::Duration;

/// Where a load generator sends its requests, and as whom.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    #[arg(long, default_value = "open_nsfw")]
    pub model: String,
    /// Image file to send.
    #[arg(long)]
    pub file: std::path::PathBuf,
    /// Sent as `x-api-key` (a tenant's key).
    #[arg(long)]
    pub api_key: Option<String>,
}

impl Target {
    /// The scoring URL.
    pub fn score_url(&self) -> String {
        format!("{}/v1/models/{}/score", self.url, self.model)
    }

    /// A client that sends the API key, if any, with every request.
    pub fn client(&self) -> anyhow::Result<reqwest::ClientBuilder> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(k) = &self.api_key {
            headers.insert("x-api-key", k.parse()?);
        }
        Ok(reqwest::Client::builder().default_headers(headers))
    }
}

/// A closed-loop load's shape: clients, measured seconds, warm-up.
#[derive(Debug, clap::Args)]
pub struct Closed {
    /// Clients, each with one request in flight.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Measured seconds (after warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
}

/// Median, p99 and mean of latencies, in milliseconds.
pub fn summary(lat: &mut [Duration]) -> (f64, f64, f64) {
    if lat.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    lat.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |q: f64| ms(lat[((lat.len() - 1) as f64 * q).round() as usize]);
    let mean = lat.iter().map(|d| ms(*d)).sum::<f64>() / lat.len() as f64;
    (at(0.5), at(0.99), mean)
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
                if ppid == Some(parent) {
                    all.push(p);
                }
            }
        }
        i += 1;
    }
    all
}

/// Proportional set size of the tree in MiB (shared pages counted once).
pub fn tree_pss_mib(pid: u32) -> f64 {
    tree(pid)
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum::<f64>()
        / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_series() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let (p50, p99, mean) = summary(&mut v);
        assert_eq!((p50.round(), p99.round(), mean), (51.0, 99.0, 50.5));
    }

    #[test]
    fn this_process_has_memory() {
        assert!(tree_pss_mib(std::process::id()) > 0.1);
    }
}
