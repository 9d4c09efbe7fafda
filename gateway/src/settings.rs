//! Command line and environment: `mmgate serve --config FILE [--listen ADDR]`.
//! Precedence: config file < `MMGATE_*` environment < flags; merged here,
//! validated once, logged with secrets redacted.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "mmgate", version, about = "HTTP inference gateway for images")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the gateway, its preprocess workers and its executor.
    Serve(ServeArgs),
    /// Score images on every backend and precision this machine has; print
    /// per-image and worst differences in log-odds, and each one's
    /// throughput (`mmgate check-model --help` for the options).
    #[command(disable_help_flag = true)]
    CheckModel {
        /// `--config FILE --model M [--seconds S] IMAGES…`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Measure this machine and pick pool sizes: sweeps worker processes,
    /// threads, engine instances, intra-op threads and max batch with the
    /// sample inputs, within a time budget; prints a table, writes the pick
    /// as TOML (`mmgate tune --help`).
    Tune(crate::tune::TuneArgs),
    /// API keys: `mmgate keys new` prints a fresh random key and the
    /// `key_hashes` line for a tenant's config.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// A fresh random key (256 bits) and the config line holding its hash.
    New,
}

/// A fresh API key: `mmg_` and 256 random bits in hex.
pub fn new_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(format!("mmg_{}", config::hex(&bytes)))
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Server config (TOML); model specs are read from its `models_dir`.
    #[arg(long, env = "MMGATE_CONFIG", default_value = "configs/default.toml")]
    pub config: PathBuf,
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long, env = "MMGATE_LISTEN")]
    pub listen: Option<String>,
    /// Address of the admin API's own listener, e.g. 127.0.0.1:8081 (port 0
    /// picks a free port; empty turns the admin API off).
    #[arg(long, env = "MMGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Address of the KServe v2 gRPC listener, e.g. 127.0.0.1:8001 (port 0
    /// picks a free port; empty, the default, turns gRPC off).
    #[arg(long, env = "MMGATE_GRPC_LISTEN")]
    pub grpc_listen: Option<String>,
    /// Let local KServe v2 clients pass tensors through registered
    /// `/dev/shm` regions (the system shared-memory extension).
    #[arg(long, env = "MMGATE_ALLOW_CLIENT_SHM")]
    pub allow_client_shm: bool,
    /// Preprocess worker processes at start.
    #[arg(long, env = "MMGATE_WORKERS")]
    pub workers: Option<u32>,
    /// Threads (concurrent jobs) per preprocess worker.
    #[arg(long, env = "MMGATE_WORKER_THREADS")]
    pub worker_threads: Option<u32>,
    /// Engine instances per model (overrides every model spec).
    #[arg(long, env = "MMGATE_INSTANCES")]
    pub instances: Option<u32>,
    /// Intra-op threads per engine instance (overrides every model spec).
    #[arg(long, env = "MMGATE_INTRA_THREADS")]
    pub intra_threads: Option<u32>,
    /// Bounded preprocess queue length.
    #[arg(long, env = "MMGATE_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// ONNX Runtime shared library (the versioned file).
    #[arg(long, env = "MMGATE_ORT_LIBRARY")]
    pub ort_library: Option<String>,
    /// OpenVINO C library (`libopenvino_c.so.*`, the versioned file).
    #[arg(long, env = "MMGATE_OPENVINO_LIBRARY")]
    pub openvino_library: Option<String>,
    /// Backend of every model (overrides every model spec): `openvino`,
    /// `onnxruntime-cpu`, `onnxruntime-cuda` or `onnxruntime-tensorrt`.
    #[arg(long, env = "MMGATE_BACKEND", value_parser = parse_backend)]
    pub backend: Option<config::Backend>,
    /// OpenVINO precision of every model (overrides every model spec):
    /// `auto`, `bf16` or `f32`.
    #[arg(long, env = "MMGATE_PRECISION", value_parser = parse_precision)]
    pub precision: Option<config::PrecisionRequest>,
    /// Folder of the `preprocess-worker` and `gpu-executor` binaries.
    #[arg(long, env = "MMGATE_BIN_DIR")]
    pub bin_dir: Option<String>,
}

impl ServeArgs {
    /// Loads the file, applies environment and flags, validates.
    pub fn config(&self) -> anyhow::Result<config::ServerConfig> {
        let mut cfg = config::ServerConfig::load(&self.config)?;
        let s = &mut cfg.server;
        set(&mut s.listen, self.listen.clone());
        set(&mut s.queue_capacity, self.queue_capacity);
        set(&mut s.bin_dir, self.bin_dir.clone());
        set(&mut cfg.admin.listen, self.admin_listen.clone());
        set(&mut cfg.grpc.listen, self.grpc_listen.clone());
        if self.allow_client_shm {
            cfg.server.allow_client_shm = true;
        }
        // The key itself is only ever held as its hash.
        if let Some(key) = std::env::var("MMGATE_ADMIN_KEY")
            .ok()
            .filter(|k| !k.is_empty())
        {
            cfg.admin.key_hash = Some(config::key_hash(&key));
        }
        if let Some(n) = self.workers {
            // A count given on the command line widens the bounds to fit.
            let w = &mut cfg.workers;
            w.count = n;
            w.min = w.min.min(n.max(1));
            w.max = w.max.max(n);
        }
        set(&mut cfg.workers.threads, self.worker_threads);
        set(&mut cfg.executor.ort_library, self.ort_library.clone());
        set(
            &mut cfg.executor.openvino_library,
            self.openvino_library.clone(),
        );
        for m in &mut cfg.models {
            set(&mut m.instances.count, self.instances);
            set(&mut m.instances.intra_threads, self.intra_threads);
            set(&mut m.backend, self.backend);
            set(&mut m.openvino.precision, self.precision);
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn parse_backend(s: &str) -> Result<config::Backend, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!(
            "{s:?} is not a backend; use openvino, onnxruntime-cpu, onnxruntime-cuda or onnxruntime-tensorrt"
        ))
}

fn parse_precision(s: &str) -> Result<config::PrecisionRequest, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?} is not a precision; use auto, bf16 or f32"))
}

/// `mmgate check-model ARGS…`: runs `gpu-executor check-model ARGS…` (the
/// executor owns the engines; the gateway never loads one) and exits with
/// its status.
pub fn check_model(args: Vec<std::ffi::OsString>) -> anyhow::Result<std::process::ExitCode> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join("gpu-executor"))
        .unwrap_or_default();
    let status = std::process::Command::new(&bin)
        .arg("check-model")
        .args(args)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", bin.display()))?;
    Ok(std::process::ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8,
    ))
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// The config as JSON with API keys replaced, for the start-up log.
pub fn redacted(cfg: &config::ServerConfig) -> String {
    let mut c = cfg.clone();
    for t in &mut c.tenants {
        t.keys = t.keys.iter().map(|_| "***".to_string()).collect();
        t.key_hashes = t.key_hashes.iter().map(|_| "***".to_string()).collect();
    }
    if c.admin.key_hash.is_some() {
        c.admin.key_hash = Some("***".into());
    }
    let models: Vec<&str> = c.models.iter().map(|m| m.name.as_str()).collect();
    format!(
        "server={:?} limits={:?} workers={:?} executor={:?} admin={:?} tenants={:?} models={models:?}",
        c.server, c.limits, c.workers, c.executor, c.admin, c.tenants
    )
}

/// Where the child binaries are: `server.bin_dir`, else next to this binary.
pub fn bin_dir(cfg: &config::ServerConfig) -> anyhow::Result<PathBuf> {
    let dir = if cfg.server.bin_dir.is_empty() {
        let exe = std::env::current_exe()?;
        exe.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        PathBuf::from(&cfg.server.bin_dir)
    };
    for bin in ["preprocess-worker", "gpu-executor"] {
        if !dir.join(bin).is_file() {
            anyhow::bail!(
                "{} not found; build the workspace (`cargo build --release --workspace --bins`) or set server.bin_dir",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir)
}

/// Refuses CPU lists (`workers.cpus`, `executor.cpus`) naming a CPU this
/// process may not run on, so a bad list fails at start rather than in
/// every child.
pub fn check_cpus(cfg: &config::ServerConfig) -> anyhow::Result<()> {
    if cfg.workers.cpus.is_empty() && cfg.executor.cpus.is_empty() {
        return Ok(());
    }
    let allowed = shm::allowed_cpus()?;
    for (name, list) in [
        ("workers.cpus", &cfg.workers.cpus),
        ("executor.cpus", &cfg.executor.cpus),
    ] {
        let cpus = config::parse_cpu_list(list).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
            anyhow::bail!(
                "{name} = {list:?} names CPU {c}, which this process may not use (allowed: {allowed:?})"
            );
        }
    }
    Ok(())
}
