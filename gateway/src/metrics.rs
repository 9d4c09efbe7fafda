//! Every metric mmgate exports, in one place: prefix `mmgate_`, Prometheus
//! unit suffixes, bounded label sets (model and tenant names come from config).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub stage_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub shm_slots: IntGaugeVec,
    pub worker_restarts: IntCounterVec,
    pub children_ready: IntGaugeVec,
    pub connections: IntCounterVec,
    pub open_connections: IntGauge,
    pub buffered_bytes: IntGauge,
    pub dropped: IntCounterVec,
    pub degraded: IntCounterVec,
    pub pool_desired: IntGaugeVec,
    pub autoscale: IntCounterVec,
    pub batch_fill: HistogramVec,
    pub process_cpu: prometheus::CounterVec,
    pub process_rss: IntGaugeVec,
    /// 1 per model: what actually runs it (after any fallback).
    pub model_runtime: IntGaugeVec,
    /// Device memory in use, per model on a GPU, as the executor measured
    /// it after loading (the whole device's).
    pub gpu_memory: IntGaugeVec,
    /// CPU seconds last read per (pool, pid): the CPU counter grows by the
    /// difference, so it never goes down.
    cpu_seen: std::sync::Arc<std::sync::Mutex<CpuSeen>>,
}

#[derive(Debug, Default)]
struct CpuSeen {
    last: std::collections::HashMap<(&'static str, u32), f64>,
}

/// Where work nobody waits for any more was dropped, and why.
#[derive(Debug, Clone, Copy)]
pub enum DropStage {
    /// Before decode: skipped when a worker thread would have taken it.
    Preprocess,
    /// Before inference: decoded, never run through the model.
    Inference,
}

#[derive(Debug, Clone, Copy)]
pub enum DropReason {
    /// The request's deadline passed.
    Deadline,
    /// The caller went away: the client hung up, or the request already
    /// answered (a queue timeout, a sibling image's failure).
    CallerGone,
}

impl DropReason {
    /// Why work whose caller no longer waits for it is dropped: its
    /// deadline (`deadline_ns`, see `shm::RequestContext`), else the caller
    /// went away.
    pub fn of(deadline_ns: u64) -> Self {
        if shm::deadline_passed(deadline_ns) {
            DropReason::Deadline
        } else {
            DropReason::CallerGone
        }
    }
}

impl Metrics {
    /// Counts a request degraded under load (see `degrade`).
    pub fn degrade(&self, class: config::Class, action: &str) {
        self.degraded
            .with_label_values(&[class.as_str(), action])
            .inc();
    }

    pub fn drop_work(&self, stage: DropStage, reason: DropReason) {
        let stage = match stage {
            DropStage::Preprocess => "preprocess",
            DropStage::Inference => "inference",
        };
        let reason = match reason {
            DropReason::Deadline => "deadline",
            DropReason::CallerGone => "caller_gone",
        };
        self.dropped.with_label_values(&[stage, reason]).inc();
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("mmgate_requests_total", "Scoring requests by outcome code"),
            &["model", "tenant", "code"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "mmgate_request_duration_seconds",
                "Scoring request latency, arrival to answer",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )
        .expect("valid metric");
        let stage_duration = HistogramVec::new(
            HistogramOpts::new(
                "mmgate_stage_duration_seconds",
                "Time per pipeline stage and sample",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid metric");
        let batch_size = HistogramVec::new(
            HistogramOpts::new("mmgate_batch_size", "Size of the batch each sample ran in")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            &["model"],
        )
        .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "mmgate_queue_depth",
                "Samples waiting or in progress per stage",
            ),
            &["stage"],
        )
        .expect("valid metric");
        let shm_slots = IntGaugeVec::new(
            Opts::new("mmgate_shm_slots", "Tensor slots in shared memory by state"),
            &["model", "state"],
        )
        .expect("valid metric");
        let worker_restarts = IntCounterVec::new(
            Opts::new("mmgate_worker_restarts_total", "Child process restarts"),
            &["pool", "reason"],
        )
        .expect("valid metric");
        let children_ready = IntGaugeVec::new(
            Opts::new("mmgate_children_ready", "Child processes that said Ready"),
            &["pool"],
        )
        .expect("valid metric");
        let connections = IntCounterVec::new(
            Opts::new(
                "mmgate_connections_total",
                "HTTP connections by outcome: accepted, refused (over http.max_connections), accept_error",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let open_connections =
            IntGauge::new("mmgate_open_connections", "HTTP connections open now")
                .expect("valid metric");
        let buffered_bytes = IntGauge::new(
            "mmgate_buffered_bytes",
            "Bytes of uploads being received and answers not yet written (server.max_inflight_body_bytes)",
        )
        .expect("valid metric");
        let dropped = IntCounterVec::new(
            Opts::new(
                "mmgate_dropped_total",
                "Samples dropped because nobody waits for them: stage preprocess (before decode) or inference (before the model), reason deadline or caller_gone",
            ),
            &["stage", "reason"],
        )
        .expect("valid metric");
        let degraded = IntCounterVec::new(
            Opts::new(
                "mmgate_degraded_total",
                "Requests degraded under load (scheduling thresholds): action shed (batch refused), sparse_video or keyframes_video (standard videos sampled less)",
            ),
            &["class", "action"],
        )
        .expect("valid metric");
        let pool_desired = IntGaugeVec::new(
            Opts::new(
                "mmgate_pool_desired",
                "Processes a pool is reconciled toward (admin API, autoscaling)",
            ),
            &["pool"],
        )
        .expect("valid metric");
        let autoscale = IntCounterVec::new(
            Opts::new(
                "mmgate_autoscale_changes_total",
                "Pool size changes made by the autoscaler, by direction (up, down)",
            ),
            &["pool", "direction"],
        )
        .expect("valid metric");
        let batch_fill = HistogramVec::new(
            HistogramOpts::new(
                "mmgate_batch_fill_ratio",
                "Batch size over the model's max_batch, per sample",
            )
            .buckets(vec![0.125, 0.25, 0.5, 0.75, 1.0]),
            &["model"],
        )
        .expect("valid metric");
        let process_cpu = prometheus::CounterVec::new(
            Opts::new(
                "mmgate_process_cpu_seconds_total",
                "CPU seconds used by each pool's processes (gateway, preprocess, executor), read at scrape",
            ),
            &["pool"],
        )
        .expect("valid metric");
        let process_rss = IntGaugeVec::new(
            Opts::new(
                "mmgate_process_resident_bytes",
                "Resident memory of each pool's processes, read at scrape",
            ),
            &["pool"],
        )
        .expect("valid metric");
        let model_runtime = IntGaugeVec::new(
            Opts::new(
                "mmgate_model_runtime",
                "1 per model: the backend, precision and device that run it, and the TensorRT engine cache (none, off, built, loaded)",
            ),
            &["model", "backend", "precision", "device", "engine_cache"],
        )
        .expect("valid metric");
        let gpu_memory = IntGaugeVec::new(
            Opts::new(
                "mmgate_gpu_memory_used_bytes",
                "Device memory in use after the model loaded (whole device), per GPU model",
            ),
            &["model", "device"],
        )
        .expect("valid metric");
        for c in [
            Box::new(pool_desired.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(model_runtime.clone()),
            Box::new(gpu_memory.clone()),
            Box::new(autoscale.clone()),
            Box::new(batch_fill.clone()),
            Box::new(process_cpu.clone()),
            Box::new(process_rss.clone()),
            Box::new(dropped.clone()),
            Box::new(degraded.clone()),
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(stage_duration.clone()),
            Box::new(batch_size.clone()),
            Box::new(queue_depth.clone()),
            Box::new(shm_slots.clone()),
            Box::new(worker_restarts.clone()),
            Box::new(children_ready.clone()),
            Box::new(connections.clone()),
            Box::new(open_connections.clone()),
            Box::new(buffered_bytes.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Self {
            registry,
            requests,
            request_duration,
            stage_duration,
            batch_size,
            queue_depth,
            shm_slots,
            worker_restarts,
            children_ready,
            connections,
            open_connections,
            buffered_bytes,
            dropped,
            pool_desired,
            autoscale,
            batch_fill,
            process_cpu,
            process_rss,
            model_runtime,
            gpu_memory,
            cpu_seen: Default::default(),
            degraded,
        }
    }

    /// Text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Shows what runs each model, replacing what an earlier executor said.
    pub fn observe_runtimes(&self, runtimes: &[shm::ModelRuntime]) {
        self.model_runtime.reset();
        self.gpu_memory.reset();
        for r in runtimes {
            let cache = r.gpu.as_ref().map_or("none", |g| g.engine_cache.as_str());
            self.model_runtime
                .with_label_values(&[
                    r.model.as_str(),
                    r.backend.as_str(),
                    r.precision.as_str(),
                    r.device.as_str(),
                    cache,
                ])
                .set(1);
            if let Some(g) = &r.gpu {
                self.gpu_memory
                    .with_label_values(&[r.model.as_str(), r.device.as_str()])
                    .set(i64::try_from(g.memory_used_bytes).unwrap_or(i64::MAX));
            }
        }
    }

    /// Reads CPU time and resident memory of each pool's processes from
    /// `/proc`. A process gone since the last reading keeps its share of
    /// the CPU counter.
    pub fn observe_processes(&self, pools: &[(&'static str, Vec<u32>)]) {
        let mut seen = self.cpu_seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = std::collections::HashMap::new();
        for (pool, pids) in pools {
            let mut rss = 0;
            for &pid in pids {
                let Some((cpu, bytes)) = read_process(pid) else {
                    // Unreadable this time: keep what it had used.
                    if let Some(&before) = seen.last.get(&(*pool, pid)) {
                        now.insert((*pool, pid), before);
                    }
                    continue;
                };
                rss += bytes;
                let before = seen.last.get(&(*pool, pid)).copied().unwrap_or(0.0);
                if cpu > before {
                    self.process_cpu
                        .with_label_values(&[pool])
                        .inc_by(cpu - before);
                }
                now.insert((*pool, pid), cpu.max(before));
            }
            self.process_rss.with_label_values(&[pool]).set(rss as i64);
        }
        seen.last = now;
    }
}

/// CPU seconds (user + system) and resident bytes of `pid`, from `/proc`.
pub fn read_process(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) closed by ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line (11 and 12 here),
    // in USER_HZ ticks (100 per second on Linux); rss is field 24 (21), in
    // pages.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let pages: u64 = f.get(21)?.parse().ok()?;
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let page = *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64
    });
    Some((ticks / 100.0, pages * page))
}
