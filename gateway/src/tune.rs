//! `mmgate tune`: measures this machine to pick pool sizes. Each trial
//! starts the whole gateway in this process (real workers, real executor)
//! with one setting, drives it with `--concurrency` keep-alive connections
//! sending the sample inputs round robin, and measures throughput and
//! latency. The search is coordinate descent from the config's own values
//! over worker processes, threads per worker, engine instances, intra-op
//! threads and max batch, within `--budget`. The pick is then measured
//! against the config's values, alternating, and kept only if its median
//! throughput is at least theirs (else the config's values are the pick).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::settings::ServeArgs;
use crate::{AppState, reload};

#[derive(Debug, clap::Args)]
pub struct TuneArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Sample inputs (image files, or folders of them) sent round robin.
    #[arg(long, required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Stop within this time, verification included (`90s`, `5m`).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub budget: Duration,
    /// Requests in flight at once (keep-alive connections).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// A setting whose p99 latency passes this many milliseconds is not
    /// picked; 0 = no bound.
    #[arg(long, default_value_t = 0.0)]
    pub p99_ms: f64,
    /// The model to tune (default: the first).
    #[arg(long)]
    pub model: Option<String>,
    /// Seconds each trial measures, after one second of warm-up.
    #[arg(long, default_value_t = 4.0)]
    pub trial_seconds: f64,
    /// Where to write the picked settings as TOML.
    #[arg(long, default_value = "tuned.toml")]
    pub out: PathBuf,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s or 5m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: use s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// One point of the search space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Setting {
    pub workers: u32,
    pub threads: u32,
    pub instances: u32,
    pub intra_threads: u32,
    pub max_batch: u32,
}

impl Setting {
    fn of(cfg: &config::ServerConfig, model: usize) -> Self {
        let m = &cfg.models[model];
        Self {
            workers: cfg.workers.count,
            threads: cfg.workers.threads,
            instances: m.instances.count,
            intra_threads: m.instances.intra_threads,
            max_batch: m.batching.max_batch,
        }
    }

    /// `base` with this setting, or why it is not a valid config.
    fn apply(
        &self,
        base: &config::ServerConfig,
        model: usize,
    ) -> anyhow::Result<config::ServerConfig> {
        let mut cfg = base.clone();
        let w = &mut cfg.workers;
        (w.count, w.threads) = (self.workers, self.threads);
        w.min = w.min.min(self.workers);
        w.max = w.max.max(self.workers);
        w.autoscale = false;
        let m = &mut cfg.models[model];
        m.instances.count = self.instances;
        m.instances.intra_threads = self.intra_threads;
        m.batching.max_batch = self.max_batch;
        m.batching.preferred_sizes.retain(|&s| s <= self.max_batch);
        cfg.validate()?;
        Ok(cfg)
    }

    fn with(mut self, dim: Dim, v: u32) -> Self {
        match dim {
            Dim::Workers => self.workers = v,
            Dim::Threads => self.threads = v,
            Dim::Instances => self.instances = v,
            Dim::IntraThreads => self.intra_threads = v,
            Dim::MaxBatch => self.max_batch = v,
        }
        self
    }
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "workers={} threads={} instances={} intra_threads={} max_batch={}",
            self.workers, self.threads, self.instances, self.intra_threads, self.max_batch
        )
    }
}

#[derive(Debug, Clone, Copy)]
enum Dim {
    Workers,
    Threads,
    Instances,
    IntraThreads,
    MaxBatch,
}

/// What one trial measured.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub requests: u64,
    pub rss_mib: f64,
}

/// A sample input: its bytes and content type.
#[derive(Debug, Clone)]
struct Input {
    body: Bytes,
    ctype: &'static str,
}

fn read_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<Input>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<_> = std::fs::read_dir(p)
                .with_context(|| p.display().to_string())?
                .filter_map(|e| Some(e.ok()?.path()))
                .filter(|f| f.is_file())
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(p.clone());
        }
    }
    let mut inputs = Vec::new();
    for f in files {
        let body = std::fs::read(&f).with_context(|| f.display().to_string())?;
        let Some(kind) = config::sniff(&body) else {
            continue;
        };
        if kind.is_video() {
            continue;
        }
        inputs.push(Input {
            body: body.into(),
            ctype: "application/octet-stream",
        });
    }
    anyhow::ensure!(!inputs.is_empty(), "no image among --inputs");
    Ok(inputs)
}

/// Runs the tuner; prints progress on stderr, the table and the pick on
/// stdout, and writes the pick to `--out`.
pub async fn run(args: TuneArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut base = args.serve.config()?;
    // Trials serve on a free loopback port, without tenants or admin API.
    base.server.listen = "127.0.0.1:0".into();
    base.admin.listen = String::new();
    base.admin.key_hash = None;
    base.tenants.clear();
    let model = match &args.model {
        None => 0,
        Some(name) => base
            .models
            .iter()
            .position(|m| &m.name == name)
            .with_context(|| format!("no model {name:?} in the config"))?,
    };
    let bin_dir = crate::settings::bin_dir(&base)?;
    crate::settings::check_cpus(&base)?;
    let inputs = Arc::new(read_inputs(&args.inputs)?);
    let tuner = Tuner {
        base,
        model,
        bin_dir,
        inputs,
        concurrency: args.concurrency.max(1),
        measure: Duration::from_secs_f64(args.trial_seconds.max(0.5)),
        p99_ms: args.p99_ms,
    };
    let defaults = Setting::of(&tuner.base, model);
    let deadline = started + args.budget;
    let mut seen: HashMap<Setting, Outcome> = HashMap::new();
    let mut order: Vec<Setting> = Vec::new();
    let mut n = 0;
    let progress = |s: &Setting, o: &anyhow::Result<Outcome>, n: usize| {
        let at = started.elapsed().as_secs();
        match o {
            Ok(o) => eprintln!(
                "tune [{n:>2}, {at:>3} s] {s}: {:.1}/s p50 {:.1} ms p99 {:.1} ms{}",
                o.per_s,
                o.p50_ms,
                o.p99_ms,
                if o.errors > 0 {
                    format!(" ({} errors)", o.errors)
                } else {
                    String::new()
                }
            ),
            Err(e) => eprintln!("tune [{n:>2}, {at:>3} s] {s}: skipped ({e:#})"),
        }
    };
    // Keep room to verify the pick against the defaults (4 trials).
    let verify_room = |cost: Duration| cost * 4;
    let t = Instant::now();
    let first = tuner.trial(defaults, deadline).await;
    // The longest trial so far, to stay within the budget.
    let mut trial_cost = t.elapsed();
    n += 1;
    progress(&defaults, &first, n);
    let first = first.context("the config's own settings do not run")?;
    seen.insert(defaults, first);
    order.push(defaults);
    let mut best = defaults;
    let space: [(Dim, &[u32]); 5] = [
        (Dim::Workers, &[1, 2, 3, 4]),
        (Dim::Instances, &[1, 2, 3]),
        (Dim::IntraThreads, &[1, 2]),
        (Dim::MaxBatch, &[1, 2, 4, 8]),
        (Dim::Threads, &[1, 2]),
    ];
    'search: for _pass in 0..2 {
        let before = best;
        for (dim, values) in space {
            for &v in values {
                let cand = best.with(dim, v);
                if seen.contains_key(&cand) {
                    continue;
                }
                if Instant::now() + trial_cost + verify_room(trial_cost) > deadline {
                    eprintln!("tune: budget reached; stopping the search");
                    break 'search;
                }
                let t = Instant::now();
                let o = tuner.trial(cand, deadline).await;
                n += 1;
                progress(&cand, &o, n);
                trial_cost = trial_cost.max(t.elapsed());
                let Ok(o) = o else { continue };
                seen.insert(cand, o);
                order.push(cand);
                if tuner.better(&o, &seen[&best]) {
                    best = cand;
                }
            }
        }
        if best == before {
            break;
        }
    }

    // The pick against the defaults, alternating, as budget allows.
    // Only fresh trials: the search's own sample of `best` was picked for
    // being high.
    let mut rounds: (Vec<Outcome>, Vec<Outcome>) = (Vec::new(), Vec::new());
    if best != defaults {
        let mut tries = 0;
        while rounds.0.len() < 3 && tries < 6 && Instant::now() + 2 * trial_cost <= deadline {
            tries += 1;
            let d = tuner.trial(defaults, deadline).await;
            n += 1;
            progress(&defaults, &d, n);
            let b = tuner.trial(best, deadline).await;
            n += 1;
            progress(&best, &b, n);
            if let (Ok(d), Ok(b)) = (d, b) {
                rounds.0.push(d);
                rounds.1.push(b);
            }
        }
    }
    let verified = !rounds.0.is_empty();
    if !verified {
        rounds = (vec![seen[&defaults]], vec![seen[&best]]);
    }
    // The lower middle for an even count of throughputs (no optimism), the
    // upper one for latencies.
    let median = |v: &[Outcome]| {
        let mut r: Vec<f64> = v.iter().map(|o| o.per_s).collect();
        r.sort_by(f64::total_cmp);
        r[(r.len() - 1) / 2]
    };
    let p99 = |v: &[Outcome]| {
        let mut r: Vec<f64> = v.iter().map(|o| o.p99_ms).collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    let (d, b) = (median(&rounds.0), median(&rounds.1));
    // Picked only when verified against the defaults in the same run.
    let pick = if verified && b >= d && tuner.within_p99(p99(&rounds.1)) {
        best
    } else {
        defaults
    };
    let report = Report {
        args: &args,
        model: &tuner.base.models[model].name,
        seen: &seen,
        order: &order,
        defaults,
        pick,
        searched_best: best,
        verify: (&rounds.0, &rounds.1),
        verified,
        medians: (d, b),
        p99s: (p99(&rounds.0), p99(&rounds.1)),
        elapsed: started.elapsed(),
    };
    print!("{}", report.table());
    let toml = report.toml();
    std::fs::write(&args.out, &toml).with_context(|| args.out.display().to_string())?;
    println!("\nwritten to {}:\n\n{toml}", args.out.display());
    Ok(())
}

struct Tuner {
    base: config::ServerConfig,
    model: usize,
    bin_dir: PathBuf,
    inputs: Arc<Vec<Input>>,
    concurrency: usize,
    measure: Duration,
    p99_ms: f64,
}

impl Tuner {
    fn within_p99(&self, p99: f64) -> bool {
        self.p99_ms <= 0.0 || p99 <= self.p99_ms
    }

    /// `a` beats `b`: within the p99 bound, no more than 1% errors, and
    /// over 2% more throughput (less is noise).
    fn better(&self, a: &Outcome, b: &Outcome) -> bool {
        let clean = |o: &Outcome| o.errors * 100 <= o.requests;
        self.within_p99(a.p99_ms) && clean(a) && (a.per_s > b.per_s * 1.02 || !clean(b))
    }

    /// Starts the gateway with `s`, loads it, stops it.
    async fn trial(&self, s: Setting, deadline: Instant) -> anyhow::Result<Outcome> {
        let cfg = s.apply(&self.base, self.model)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let source = reload::ConfigSource::new(cfg.clone(), None);
        let (state, tasks) = AppState::start(cfg, self.bin_dir.clone(), source)?;
        let core = state.core.clone();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let cap = core.cfg.http.max_connections;
        let server = tokio::spawn(crate::http::serve(
            listener,
            crate::app(state.clone()),
            core.clone(),
            cap,
            async move {
                let mut rx = stop_rx;
                let _ = rx.wait_for(|s| *s).await;
            },
        ));
        let outcome = async {
            wait_ready(&state, deadline).await?;
            let model = &core.cfg.models[self.model].name;
            load(
                addr,
                model,
                &self.inputs,
                self.concurrency,
                Duration::from_secs(1),
                self.measure,
                || rss_mib(&state),
            )
            .await
        }
        .await;
        let _ = stop_tx.send(true);
        core.start_draining();
        core.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = server.await;
            futures::future::join_all(tasks).await;
        })
        .await;
        outcome
    }
}

/// Waits until the trial's gateway is ready: 180 s at most, and not past
/// the budget's end.
async fn wait_ready(state: &AppState, deadline: Instant) -> anyhow::Result<()> {
    let until = (Instant::now() + Duration::from_secs(180)).min(deadline);
    while !(state.executor.is_ready()
        && state.workers.ready_count() >= state.workers.desired() as usize)
    {
        anyhow::ensure!(
            Instant::now() < until,
            "not ready before the budget's end (or within 180 s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Resident memory of the gateway's processes (this one included).
fn rss_mib(state: &AppState) -> f64 {
    let mut pids = vec![std::process::id()];
    pids.extend(state.workers.pids());
    pids.extend(state.executor.pids());
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .sum::<f64>()
        / 1024.0
}

/// `concurrency` connections send `inputs` round robin for `warm` +
/// `measure`; requests that finish inside the measured window count.
async fn load(
    addr: std::net::SocketAddr,
    model: &str,
    inputs: &Arc<Vec<Input>>,
    concurrency: usize,
    warm: Duration,
    measure: Duration,
    rss: impl Fn() -> f64,
) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let (from, to) = (start + warm, start + warm + measure);
    let uri: hyper::Uri = format!("http://{addr}/v1/models/{model}/score").parse()?;
    let mut conns = Vec::new();
    for c in 0..concurrency {
        let (uri, inputs) = (uri.clone(), inputs.clone());
        conns.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = c;
            let mut sender = None;
            while Instant::now() < to {
                if sender.is_none() {
                    match connect(addr).await {
                        Ok(s) => sender = Some(s),
                        Err(_) => {
                            if Instant::now() >= from {
                                errors += 1;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                let input = &inputs[i % inputs.len()];
                i += concurrency;
                let req = hyper::Request::post(uri.clone())
                    .header(hyper::header::HOST, addr.to_string())
                    .header(hyper::header::CONTENT_TYPE, input.ctype)
                    .body(Full::new(input.body.clone()))?;
                let t = Instant::now();
                let sent = tokio::time::timeout(
                    Duration::from_secs(30),
                    sender.as_mut().expect("connected").send_request(req),
                )
                .await;
                let ok = match sent {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let keep = resp
                            .headers()
                            .get(hyper::header::CONNECTION)
                            .is_none_or(|v| v != "close");
                        let read = resp.into_body().collect().await.is_ok();
                        if !keep || !read {
                            sender = None;
                        }
                        status.is_success() && read
                    }
                    Ok(Err(_)) | Err(_) => {
                        sender = None;
                        false
                    }
                };
                let done = Instant::now();
                if done >= from && done < to {
                    if ok {
                        lat.push(done - t);
                    } else {
                        errors += 1;
                    }
                }
            }
            anyhow::Ok((lat, errors))
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut peak = 0f64;
    // Memory is read while the load runs.
    let watch = async {
        while Instant::now() < to {
            peak = peak.max(rss());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let (results, ()) = tokio::join!(futures::future::join_all(conns), watch);
    for r in results {
        let (l, e) = r??;
        lat.extend(l);
        errors += e;
    }
    let requests = lat.len() as u64 + errors;
    lat.sort_unstable();
    let at = |q: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(Outcome {
        per_s: lat.len() as f64 / measure.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        errors,
        requests,
        rss_mib: peak,
    })
}

/// A keep-alive HTTP/1 connection to the trial's gateway.
async fn connect(
    addr: std::net::SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

struct Report<'a> {
    args: &'a TuneArgs,
    model: &'a str,
    seen: &'a HashMap<Setting, Outcome>,
    order: &'a [Setting],
    defaults: Setting,
    pick: Setting,
    searched_best: Setting,
    verify: (&'a [Outcome], &'a [Outcome]),
    verified: bool,
    medians: (f64, f64),
    p99s: (f64, f64),
    elapsed: Duration,
}

impl Report<'_> {
    fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nmmgate tune: model {}, concurrency {}, {} trials in {:.0} s (budget {:.0} s)\n",
            self.model,
            self.args.concurrency,
            self.order.len(),
            self.elapsed.as_secs_f64(),
            self.args.budget.as_secs_f64()
        );
        let _ = writeln!(
            t,
            "| workers | threads | instances | intra | max_batch | img/s | p50 ms | p99 ms | errors | RSS MiB | |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|");
        let mut rows: Vec<_> = self.order.iter().map(|s| (s, self.seen[s])).collect();
        rows.sort_by(|a, b| b.1.per_s.total_cmp(&a.1.per_s));
        for (s, o) in rows {
            let mut mark = Vec::new();
            if *s == self.defaults {
                mark.push("defaults");
            }
            if *s == self.pick {
                mark.push("pick");
            }
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {:.0} | {} |",
                s.workers,
                s.threads,
                s.instances,
                s.intra_threads,
                s.max_batch,
                o.per_s,
                o.p50_ms,
                o.p99_ms,
                o.errors,
                o.rss_mib,
                mark.join(", ")
            );
        }
        let fmt = |v: &[Outcome]| {
            v.iter()
                .map(|o| format!("{:.1}", o.per_s))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.searched_best != self.defaults && !self.verified {
            let _ = writeln!(
                t,
                "\nthe best setting found ({}) could not be measured against the defaults within the budget: the defaults stay the pick",
                self.searched_best
            );
        }
        if self.verified {
            let _ = writeln!(
                t,
                "\nverification, alternating (img/s): defaults [{}] median {:.1}, p99 {:.1} ms; best found [{}] median {:.1}, p99 {:.1} ms: {:.2}x",
                fmt(self.verify.0),
                self.medians.0,
                self.p99s.0,
                fmt(self.verify.1),
                self.medians.1,
                self.p99s.1,
                self.medians.1 / self.medians.0
            );
        }
        let _ = writeln!(
            t,
            "pick: {}{}",
            self.pick,
            if self.pick != self.defaults {
                ""
            } else if self.searched_best == self.defaults {
                " (the config's own settings: nothing measured better)"
            } else {
                " (the config's own settings)"
            }
        );
        t
    }

    /// The pick as config lines, and the resources a pod needs for it.
    fn toml(&self) -> String {
        let p = self.pick;
        let o = self.seen[&p];
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!(
            "# mmgate tune: model {model}, concurrency {c}, on {cpus} CPUs: {per_s:.1} img/s, p99 {p99:.1} ms, peak RSS {rss:.0} MiB.\n\
             # In the server config:\n\
             [workers]\ncount = {w}\nthreads = {t}\n\n\
             # In the model's spec ({model}):\n\
             # [instances]\n# count = {i}\n# intra_threads = {intra}\n# [batching]\n# max_batch = {b}\n\n\
             # Or on the command line: mmgate serve --workers {w} --worker-threads {t} --instances {i} --intra-threads {intra}\n\n\
             # Kubernetes: requests for one pod running these settings\n\
             # (deploy/kubernetes/deployment.yaml): cpu \"{cpus}\", memory \"{mem}Mi\".\n",
            model = self.model,
            c = self.args.concurrency,
            per_s = o.per_s,
            p99 = o.p99_ms,
            rss = o.rss_mib,
            w = p.workers,
            t = p.threads,
            i = p.instances,
            intra = p.intra_threads,
            b = p.max_batch,
            // Peak plus a quarter for bursts, rounded up to 64 MiB.
            mem = ((o.rss_mib * 1.25 / 64.0).ceil() as u64) * 64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
    }
}
