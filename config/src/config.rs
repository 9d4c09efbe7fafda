//! The server configuration file (`configs/default.toml`), with the model
//! specs it points to. Environment and CLI overrides are applied by the
//! gateway before `validate`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ModelSpec, SpecError, invalid};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub http: HttpLimits,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub workers: WorkerPool,
    #[serde(default)]
    pub executor: ExecutorSection,
    #[serde(default)]
    pub video: VideoLimits,
    #[serde(default)]
    pub scheduling: Scheduling,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub grpc: GrpcSection,
    /// API keys and what they may do; no tenants = no authentication.
    #[serde(default)]
    pub tenants: Vec<Tenant>,
    /// Filled by `load`: every `*.toml` under `server.models_dir`.
    #[serde(skip)]
    pub models: Vec<ModelSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: String,
    /// Folder of model specs, relative to the config file.
    pub models_dir: String,
    /// Bounded queue of jobs waiting for a preprocess worker; full = 503.
    pub queue_capacity: usize,
    /// How long a request may wait for a worker or a slot before a 503.
    pub queue_timeout_ms: u64,
    /// Time allowed to finish in-flight requests on SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Folder of the child binaries; empty = next to the `mmgate` binary.
    pub bin_dir: String,
    /// Bytes of request bodies being received and of answers not yet
    /// written that the gateway holds at once (reserved as bytes arrive);
    /// over it = 503.
    pub max_inflight_body_bytes: usize,
    /// The KServe v2 system shared-memory extension (`--allow-client-shm`):
    /// local clients may register `/dev/shm` regions and pass tensors
    /// through them. Off by default.
    pub allow_client_shm: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            models_dir: "models".into(),
            queue_capacity: 256,
            queue_timeout_ms: 10_000,
            shutdown_grace_ms: 30_000,
            bin_dir: String::new(),
            max_inflight_body_bytes: 1 << 30,
            allow_client_shm: false,
        }
    }
}

/// `[http]`: what one client connection may cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// A request head must be complete this long after the connection
    /// started waiting for it (also the idle time of a kept-alive
    /// connection); else the connection is closed.
    pub header_read_timeout_ms: u64,
    /// An upload that sends no byte for this long gets 408 `body_timeout`.
    pub body_idle_timeout_ms: u64,
    /// Once `body_idle_timeout_ms` has passed, an upload must average at
    /// least this many bytes per second (else 408 `body_timeout`), so a
    /// trickle cannot hold a connection and its budget; 0 = no minimum.
    pub min_body_rate_bytes_per_s: u64,
    /// Each write of an answer must make progress within this; a client
    /// that does not read loses the connection.
    pub write_timeout_ms: u64,
    /// Open connections at once; more are answered 503
    /// `too_many_connections` and closed. Lowered at start to fit the
    /// process's open-file limit (raised to its hard limit first).
    pub max_connections: usize,
    /// Header lines in one request head; more = 431.
    pub max_headers: usize,
    /// Bytes of header lines (names and values) in one request head; more
    /// = 431 `headers_too_large`, whatever the head's arrival pattern.
    pub max_header_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            body_idle_timeout_ms: 10_000,
            min_body_rate_bytes_per_s: 16 << 10,
            write_timeout_ms: 10_000,
            max_connections: 4096,
            max_headers: 64,
            max_header_bytes: 32 << 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted request body (one image, or a whole multipart body).
    pub max_body_bytes: usize,
    /// Most images in one multipart request.
    pub max_images_per_request: usize,
    /// Largest decoded image, in pixels (width × height), read from the header.
    pub max_pixels: u64,
    /// Largest width or height.
    pub max_dimension: u32,
    /// Wall-clock budget for decoding and preprocessing one image; a worker
    /// that overruns it is killed and restarted.
    pub decode_deadline_ms: u64,
    /// Bytes one image decode may allocate: its decoded raster, computed
    /// from the header (width × height × channels × bytes per sample; for a
    /// progressive JPEG also libjpeg's whole-image coefficient buffer) and
    /// refused with 413 before allocating, and the decoders' own allocation
    /// limit (the `image` crate's `max_alloc`, which also bounds PNG chunks
    /// such as an inflating iCCP profile).
    pub max_decode_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            max_images_per_request: 16,
            max_pixels: 40_000_000,
            max_dimension: 16_384,
            decode_deadline_ms: 5_000,
            // A 40 MP photo as 8-bit RGBA (160 MB) fits; 16-bit RGBA at
            // 40 MP (320 MB) does not.
            max_decode_bytes: 256 << 20,
        }
    }
}

/// Video sampling defaults and server-wide caps (tenants may lower the caps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VideoLimits {
    /// Largest accepted video body.
    pub max_body_bytes: usize,
    /// Longest accepted duration, in seconds.
    pub max_duration_s: f64,
    /// Sampling when the request names none: frames per second of video.
    pub default_fps: f64,
    /// Most sampled (scored) frames per request.
    pub max_frames: u32,
    /// Most decoded frames per request.
    pub max_decoded_frames: u32,
    /// Most decoded pixels per request (every decoded frame's width ×
    /// height, summed): bounds a video's decode work, which frames alone do
    /// not (a 6320² frame costs 20 of 1080p). Past it the answer is
    /// `truncated`.
    pub max_decoded_pixels: u64,
    /// Wall-clock budget for decoding one video.
    pub decode_deadline_ms: u64,
    /// Share of the preprocess worker threads videos may hold at once; at
    /// least one thread, and one is always left for images.
    pub max_worker_share: f64,
    /// Tensor slots one video may hold at once (bounds its share of the pool).
    pub slots_per_request: u32,
    /// Default `threshold` for the aggregate's flagged frame times.
    pub default_threshold: f32,
    /// FFmpeg decoder threads per video (frame threading when > 1).
    pub decode_threads: u32,
}

impl Default for VideoLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 256 << 20,
            max_duration_s: 4.0 * 3600.0,
            default_fps: 1.0,
            max_frames: 256,
            max_decoded_frames: 20_000,
            // ≈ 9,600 frames of 1080p: 5 min at 30 fps, ~25 s of decoding
            // on one core here.
            max_decoded_pixels: 20_000_000_000,
            decode_deadline_ms: 60_000,
            max_worker_share: 0.5,
            slots_per_request: 4,
            default_threshold: 0.5,
            decode_threads: 2,
        }
    }
}

/// How queued work is ordered, and how the gateway degrades before it
/// rejects. The queue delay is how long the oldest `critical` or
/// `standard` image has waited in the preprocess queue (what those classes
/// feel now); each threshold is in ms, 0 = off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scheduling {
    /// Once the oldest queued `batch` job has waited this long, the batch
    /// queue competes as `standard` (the older of the two goes first), so
    /// `batch` is never starved by `standard`; nothing is promoted into
    /// `critical`. 0 = never.
    pub aging_ms: u64,
    /// Over this queue delay, new `batch` requests are shed (503
    /// `load_shed` with `Retry-After`).
    pub shed_batch_after_ms: u64,
    /// Over this, `standard` videos are sampled at half the rate (and half
    /// the frame cap); the answer says so in `degraded`.
    pub sparse_video_after_ms: u64,
    /// Over this, `standard` videos are sampled from keyframes only.
    pub keyframes_video_after_ms: u64,
    /// Whether one inference batch may hold samples of several tenants or
    /// classes. Off (the default), a batch holds one tenant's samples of
    /// one class, so a sample never waits for another tenant's samples to
    /// run with it; on, batches fill from every tenant (more throughput
    /// where batching pays, as on GPUs, less isolation).
    pub mix_tenants_in_batches: bool,
    /// Engine instances of a model kept free for `critical` samples while
    /// any came in the last second (only while the model has more
    /// instances than this): a critical sample then never waits for
    /// another batch to finish. Costs the other classes that share of the
    /// engine while critical traffic flows; 0 = off.
    pub critical_headroom: u32,
    /// Engine instances of a model kept free, while another tenant's image
    /// is in preprocessing, from a tenant that would otherwise take them
    /// all (only while the model has more instances than this). The
    /// gateway tells the executor when an image enters preprocessing; an
    /// instance is held for it until its sample arrives, at most 50 ms, so
    /// a light tenant's image does not wait behind a flood's inference.
    /// Nearly work-conserving: an instance idles only while another
    /// tenant's image is being decoded. 0 = off; 1 by default.
    pub tenant_headroom: u32,
    /// The CPU priority of the throughput instances' inference threads,
    /// for models with a latency lane (OpenVINO's `latency_lane`). The
    /// lane keeps the process's priority, so while it serves a critical
    /// sample or a light tenant's, the OS gives it the cores first: a
    /// flood's inference already running pauses instead of making that
    /// sample wait. With a lane, the two headrooms above are not applied:
    /// the lane is the headroom.
    pub throughput_priority: ThroughputPriority,
}

/// How the throughput instances yield the CPU to the latency lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThroughputPriority {
    /// `SCHED_IDLE`: they run only while no thread of normal priority
    /// wants the core, and give it up the moment one does (the lane keeps
    /// its unloaded latency). On a machine or container of its own, as
    /// mmgate is meant to run, nothing is lost: the same work runs in the
    /// idle time. Beside other busy processes in the same cgroup, they get
    /// only what those leave.
    #[default]
    Idle,
    /// Nice +10: about a tenth of a core's share against a normal thread;
    /// a milder isolation that a busy neighbour cannot starve.
    Low,
    /// The process's priority: no isolation.
    Normal,
}

impl Default for Scheduling {
    fn default() -> Self {
        Self {
            aging_ms: 2_000,
            shed_batch_after_ms: 500,
            sparse_video_after_ms: 1_000,
            keyframes_video_after_ms: 2_000,
            mix_tenants_in_batches: false,
            critical_headroom: 1,
            tenant_headroom: 1,
            throughput_priority: ThroughputPriority::Idle,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerPool {
    /// Preprocess worker processes at start (the pool's first `desired`).
    pub count: u32,
    /// Fewest workers the pool may be resized to; `/readyz` is 503 below it.
    pub min: u32,
    /// Most workers the pool may be resized to (admin API, autoscaling).
    pub max: u32,
    /// Jobs one worker process runs at once (one thread each).
    pub threads: u32,
    /// Moves the pool between `min` and `max` on load: one worker more
    /// when images wait `scale_up_queue_ms` (critical ones: a quarter of
    /// that), one fewer when nothing waits and the busy share of the worker
    /// threads stayed under `scale_down_busy` for a whole cooldown; at most
    /// one change per `cooldown_ms`.
    pub autoscale: bool,
    pub scale_up_queue_ms: u64,
    pub scale_down_busy: f64,
    pub cooldown_ms: u64,
    /// A worker is replaced (a new one started, the old one retired once
    /// it is ready) after this many jobs; 0 = never.
    pub recycle_after_jobs: u64,
    /// A worker whose resident memory passes this many MiB is replaced the
    /// same way; 0 = never.
    pub recycle_above_rss_mib: u64,
    /// Encoded inputs up to this size travel inside the job message; larger
    /// ones go through the worker's shared-memory input region.
    pub inline_input_max_bytes: usize,
    /// CPUs the worker processes are pinned to, as a Linux CPU list
    /// (`"0-3,8"`), for NUMA hosts; empty = not pinned.
    pub cpus: String,
}

impl Default for WorkerPool {
    fn default() -> Self {
        Self {
            count: 2,
            min: 1,
            max: 8,
            threads: 1,
            autoscale: false,
            scale_up_queue_ms: 100,
            scale_down_busy: 0.3,
            cooldown_ms: 10_000,
            recycle_after_jobs: 0,
            recycle_above_rss_mib: 0,
            inline_input_max_bytes: 64 << 10,
            cpus: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorSection {
    /// Absolute path (or relative to the config file) of the versioned ONNX
    /// Runtime shared library, e.g. `libonnxruntime.so.1.32.0`.
    pub ort_library: String,
    /// The OpenVINO C library (`libopenvino_c.so.*`); the core, the CPU
    /// plugin, the ONNX frontend and TBB must sit in the same folder.
    pub openvino_library: String,
    /// Folder for compiled-model caches (OpenVINO), one subfolder per model
    /// file sha256; empty = no cache.
    pub cache_dir: String,
    /// An inference not answered within this is a hung executor: it is
    /// killed and restarted, and the request gets a 502.
    pub infer_timeout_ms: u64,
    /// The executor says it is alive this often; `/readyz` is 503 once one
    /// heartbeat is missed (2 intervals of silence).
    pub heartbeat_ms: u64,
    /// After this many missed heartbeats the executor is taken for hung:
    /// killed and restarted.
    pub heartbeat_misses: u32,
    /// CPUs the executor and its engine threads are pinned to, as a Linux
    /// CPU list (`"0-3,8"`); empty = not pinned.
    pub cpus: String,
    /// How long an executor may take to load and warm every model before
    /// it is taken for stuck and restarted. Raise it for TensorRT, whose
    /// first engine build can take many minutes (a build cut off here
    /// starts again from nothing).
    pub ready_timeout_ms: u64,
}

impl Default for ExecutorSection {
    fn default() -> Self {
        Self {
            ort_library: "../.deps/onnxruntime/libonnxruntime.so.1.32.0".into(),
            openvino_library: "../.deps/openvino/libopenvino_c.so.2641".into(),
            cache_dir: "../.deps/cache".into(),
            infer_timeout_ms: 30_000,
            heartbeat_ms: 500,
            heartbeat_misses: 6,
            cpus: String::new(),
            ready_timeout_ms: 300_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub name: String,
    /// SHA-256 of each API key of this tenant, as `sha256:<64 hex digits>`
    /// (`mmgate keys new` makes a key and its line). The keys themselves
    /// are sent as `Authorization: Bearer <key>` or `x-api-key: <key>`.
    #[serde(default)]
    pub key_hashes: Vec<String>,
    /// Plaintext keys are refused at start, with the `key_hashes` line to
    /// use instead; never set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// Models it may call; `["*"]` = all.
    #[serde(default = "all_models")]
    pub models: Vec<String>,
    /// Its priority class: queues serve `critical`, then `standard`, then
    /// `batch` (with aging); under load `batch` is shed first.
    #[serde(default)]
    pub class: crate::Class,
    /// Its share within its class, against the other tenants of the class
    /// (weighted fair queuing by cost: an image costs 1, a video its
    /// sampled frames).
    #[serde(default = "one")]
    pub weight: u32,
    /// Largest request body it may send (images or video); 0 = the
    /// server's limits.
    #[serde(default)]
    pub max_body_bytes: usize,
    /// Requests of this tenant in flight at once; 0 = unlimited.
    #[serde(default)]
    pub max_concurrency: u32,
    /// Cap on sampled video frames per request; 0 = the server's cap.
    #[serde(default)]
    pub max_video_frames: u32,
    /// Deadline of this tenant's requests, from arrival, when they send no
    /// `X-Request-Timeout`; 0 = none. Work still queued past it is dropped
    /// and the request answered 504 `deadline_exceeded`.
    #[serde(default)]
    pub deadline_ms: u64,
    /// Requests per second, on average (a token bucket); 0 = unlimited.
    /// Over it = 429 `rate_limited` with `Retry-After`.
    #[serde(default)]
    pub requests_per_s: f64,
    /// Requests that may come at once after a quiet spell; 0 = one
    /// second's worth (at least 1).
    #[serde(default)]
    pub requests_burst: u32,
    /// Samples (images, sampled video frames) per second, on average; 0 =
    /// unlimited. Images are charged once their request is read and they
    /// are known to be images; a video needs one token to start and its
    /// other frames are charged as they are sampled (owed by the next
    /// requests if the bucket runs dry).
    #[serde(default)]
    pub samples_per_s: f64,
    /// Samples that may come at once; 0 = one second's worth (at least 1).
    /// A request with more images than this is refused (413).
    #[serde(default)]
    pub samples_burst: u32,
    /// Bytes of this tenant's uploads being received and answers not yet
    /// written, its share of `server.max_inflight_body_bytes`; 0 = half of
    /// it (at least the largest body limit). Over it = 429.
    #[serde(default)]
    pub max_inflight_body_bytes: usize,
    /// Aliases this tenant may call, each served by one of several models
    /// in proportion to their weights (a canary:
    /// `moderation = [{ model = "open_nsfw", weight = 90 },
    /// { model = "open_nsfw_canary", weight = 10 }]`). An alias is called
    /// like a model, and `models` lists it like one; the answer and the
    /// metrics name the model that served.
    #[serde(default)]
    pub routes: std::collections::BTreeMap<String, Vec<RouteTarget>>,
}

/// One model of a route and its share of the route's requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTarget {
    pub model: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

fn all_models() -> Vec<String> {
    vec!["*".into()]
}

impl Tenant {
    pub fn may_call(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }

    /// `(rate per second, burst)` of the request bucket; `None` = unlimited.
    pub fn request_rate(&self) -> Option<(f64, u32)> {
        bucket(self.requests_per_s, self.requests_burst)
    }

    /// `(rate per second, burst)` of the sample bucket; `None` = unlimited.
    pub fn sample_rate(&self) -> Option<(f64, u32)> {
        bucket(self.samples_per_s, self.samples_burst)
    }
}

fn bucket(rate: f64, burst: u32) -> Option<(f64, u32)> {
    (rate > 0.0).then(|| {
        let burst = if burst == 0 {
            (rate.ceil() as u32).max(1)
        } else {
            burst
        };
        (rate, burst)
    })
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of an API key: what `key_hashes` stores and a presented key
/// is compared by.
pub fn key_digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// The SHA-256 of an API key, as it is written in `key_hashes`.
pub fn key_hash(key: &str) -> String {
    format!("sha256:{}", hex(&key_digest(key)))
}

/// The 32 bytes of a `sha256:<64 hex digits>` line, if it is one.
pub fn parse_key_hash(line: &str) -> Option<[u8; 32]> {
    let hex = line.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl ServerConfig {
    /// The largest body any request may send (image or video).
    pub fn largest_body_bytes(&self) -> usize {
        self.limits.max_body_bytes.max(self.video.max_body_bytes)
    }

    /// `tenant`'s share of the buffer budget, its own or the default: half
    /// of `server.max_inflight_body_bytes`, at least the largest body.
    pub fn tenant_body_budget(&self, tenant: &Tenant) -> usize {
        match tenant.max_inflight_body_bytes {
            0 => (self.server.max_inflight_body_bytes / 2).max(self.largest_body_bytes()),
            n => n,
        }
    }
}

/// Longest request deadline, `X-Request-Timeout` or a tenant's
/// `deadline_ms`: one hour.
pub const MAX_DEADLINE_MS: u64 = 3_600_000;

/// Most preprocess workers a pool may have.
pub const MAX_WORKERS: u32 = 256;
/// Most threads one preprocess worker may run.
pub const MAX_WORKER_THREADS: u32 = 64;

/// The admin API: its own listener and key, never the public ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Address of the admin listener (`--admin-listen`); keep it private.
    pub listen: String,
    /// SHA-256 of the admin key, as `sha256:<64 hex digits>` (from
    /// `mmgate keys new`). `MMGATE_ADMIN_KEY` in the environment may give
    /// the key instead. Without either, the admin API refuses every change.
    pub key_hash: Option<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8081".into(),
            key_hash: None,
        }
    }
}

/// The KServe v2 gRPC service's listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcSection {
    /// Address of the gRPC listener (`--grpc-listen`, e.g.
    /// `127.0.0.1:8001`); empty = no gRPC.
    pub listen: String,
    /// gRPC connections served at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for GrpcSection {
    fn default() -> Self {
        Self {
            listen: String::new(),
            max_connections: 256,
        }
    }
}

/// Largest IPC frame any process accepts (`shm::MAX_FRAME`); inline inputs
/// must fit in one.
pub const MAX_FRAME_BYTES: usize = 8 << 20;

pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| SpecError::Parse {
        path: path.display().to_string(),
        source: Box::new(source),
    })
}

/// `p` as is when absolute, else joined to `dir`.
pub(crate) fn resolve(dir: &Path, p: &str) -> String {
    let path = Path::new(p);
    if path.is_absolute() || p.is_empty() {
        p.to_string()
    } else {
        dir.join(path).display().to_string()
    }
}

impl ServerConfig {
    /// Reads the config file and every model spec in its `models_dir`.
    /// Paths inside are made absolute against the file's folder.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let mut cfg: ServerConfig = read_toml(path)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let e = &mut cfg.executor;
        e.ort_library = resolve(&dir, &e.ort_library);
        e.openvino_library = resolve(&dir, &e.openvino_library);
        e.cache_dir = resolve(&dir, &e.cache_dir);
        cfg.server.bin_dir = resolve(&dir, &cfg.server.bin_dir);
        let models_dir = PathBuf::from(resolve(&dir, &cfg.server.models_dir));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&models_dir)
            .map_err(|source| SpecError::Io {
                path: models_dir.display().to_string(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for f in files {
            cfg.models.push(ModelSpec::load(&f)?);
        }
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.models.is_empty() {
            return Err(invalid("no models configured"));
        }
        let mut names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!("model {:?} is declared twice", w[0])));
        }
        for m in &self.models {
            m.validate()?;
        }
        self.validate_hardening()?;
        let loopback = self
            .admin
            .listen
            .parse::<std::net::SocketAddr>()
            .map_or(self.admin.listen.starts_with("localhost:"), |a| {
                a.ip().is_loopback()
            });
        if !self.admin.listen.is_empty() && !loopback && self.admin.key_hash.is_none() {
            return Err(invalid(format!(
                "admin.listen is {:?}, not a loopback address, and no admin key is set ([admin] key_hash or MMGATE_ADMIN_KEY): set one, or listen on 127.0.0.1",
                self.admin.listen
            )));
        }
        if let Some(h) = &self.admin.key_hash {
            let Some(digest) = parse_key_hash(h) else {
                return Err(invalid(
                    "admin.key_hash is not `sha256:` and 64 hex digits (use the line `mmgate keys new` prints)",
                ));
            };
            let tenant = self.tenants.iter().find(|t| {
                t.key_hashes
                    .iter()
                    .any(|k| parse_key_hash(k) == Some(digest))
            });
            if let Some(t) = tenant {
                return Err(invalid(format!(
                    "the admin key is also a key of tenant {:?}; the admin key must be its own",
                    t.name
                )));
            }
        }
        let w = &self.workers;
        if w.count == 0 || w.count > MAX_WORKERS || w.threads == 0 || w.threads > MAX_WORKER_THREADS
        {
            return Err(invalid(format!(
                "workers.count is {} and workers.threads {}; they must be 1..={MAX_WORKERS} and 1..={MAX_WORKER_THREADS}",
                w.count, w.threads
            )));
        }
        if !(0.0..1.0).contains(&w.scale_down_busy)
            || w.scale_up_queue_ms == 0
            || w.cooldown_ms < 100
        {
            return Err(invalid(format!(
                "workers.scale_down_busy ({}) must be in [0, 1), scale_up_queue_ms ({}) > 0 and cooldown_ms ({}) >= 100",
                w.scale_down_busy, w.scale_up_queue_ms, w.cooldown_ms
            )));
        }
        if w.recycle_above_rss_mib > 1 << 20 {
            return Err(invalid(format!(
                "workers.recycle_above_rss_mib is {}; at most {} (1 TiB)",
                w.recycle_above_rss_mib,
                1u64 << 20
            )));
        }
        if w.min == 0 || w.min > w.count || w.count > w.max || w.max > MAX_WORKERS {
            return Err(invalid(format!(
                "workers.min ({}), count ({}) and max ({}) must satisfy 1 <= min <= count <= max <= {MAX_WORKERS}",
                w.min, w.count, w.max
            )));
        }
        if w.inline_input_max_bytes + 4096 > MAX_FRAME_BYTES {
            return Err(invalid(format!(
                "workers.inline_input_max_bytes is {}; it must be at most {} (the IPC frame limit)",
                w.inline_input_max_bytes,
                MAX_FRAME_BYTES - 4096
            )));
        }
        for (name, list) in [
            ("workers.cpus", &w.cpus),
            ("executor.cpus", &self.executor.cpus),
        ] {
            parse_cpu_list(list).map_err(|e| invalid(format!("{name} = {list:?}: {e}")))?;
        }
        let e = &self.executor;
        if !(50..=60_000).contains(&e.heartbeat_ms) || !(2..=1000).contains(&e.heartbeat_misses) {
            return Err(invalid(format!(
                "executor.heartbeat_ms ({}) must be 50..=60000 and heartbeat_misses ({}) 2..=1000",
                e.heartbeat_ms, e.heartbeat_misses
            )));
        }
        let l = &self.limits;
        if l.max_body_bytes == 0 || l.max_images_per_request == 0 || l.max_pixels == 0 {
            return Err(invalid("limits must be > 0"));
        }
        let v = &self.video;
        if v.max_frames == 0
            || v.default_fps <= 0.0
            || v.slots_per_request == 0
            || !(1..=16).contains(&v.decode_threads)
        {
            return Err(invalid(
                "video.max_frames, video.default_fps and video.slots_per_request must be > 0, video.decode_threads 1..=16",
            ));
        }
        if let Some(m) = self
            .models
            .iter()
            .find(|m| self.slots_for(m) <= v.slots_per_request)
        {
            return Err(invalid(format!(
                "model {:?} has {} slots; video.slots_per_request ({}) must be smaller",
                m.name,
                self.slots_for(m),
                v.slots_per_request
            )));
        }
        let largest = self.largest_body_bytes();
        if self.server.max_inflight_body_bytes < largest {
            return Err(invalid(format!(
                "server.max_inflight_body_bytes ({}) must be at least the largest body limit ({largest})",
                self.server.max_inflight_body_bytes
            )));
        }
        if self.server.queue_capacity == 0 {
            return Err(invalid("server.queue_capacity must be > 0"));
        }
        let sc = &self.scheduling;
        let on = [sc.sparse_video_after_ms, sc.keyframes_video_after_ms];
        if on.iter().all(|&ms| ms > 0) && on[0] > on[1] {
            return Err(invalid(format!(
                "scheduling.sparse_video_after_ms ({}) must not be over keyframes_video_after_ms ({}): videos get sparser before keyframes only",
                on[0], on[1]
            )));
        }
        for t in &self.tenants {
            if t.weight == 0 {
                return Err(invalid(format!("tenant {:?}: weight must be >= 1", t.name)));
            }
            for (name, rate) in [
                ("requests_per_s", t.requests_per_s),
                ("samples_per_s", t.samples_per_s),
            ] {
                if !rate.is_finite() || rate < 0.0 {
                    return Err(invalid(format!(
                        "tenant {:?}: {name} is {rate}; it must be a number >= 0 (0 = unlimited)",
                        t.name
                    )));
                }
            }
            for (alias, targets) in &t.routes {
                if self.models.iter().any(|m| &m.name == alias) {
                    return Err(invalid(format!(
                        "tenant {:?}: route {alias:?} has the name of a model",
                        t.name
                    )));
                }
                if targets.is_empty() || targets.iter().any(|r| r.weight == 0) {
                    return Err(invalid(format!(
                        "tenant {:?}: route {alias:?} needs at least one model, each with a weight >= 1",
                        t.name
                    )));
                }
                if let Some(r) = targets
                    .iter()
                    .find(|r| !self.models.iter().any(|m| m.name == r.model))
                {
                    return Err(invalid(format!(
                        "tenant {:?}: route {alias:?} names model {:?}, which is not configured",
                        t.name, r.model
                    )));
                }
            }
            if t.deadline_ms > MAX_DEADLINE_MS {
                return Err(invalid(format!(
                    "tenant {:?}: deadline_ms is {}; at most {MAX_DEADLINE_MS} (0 = none)",
                    t.name, t.deadline_ms
                )));
            }
            let share = self.tenant_body_budget(t);
            if share < largest || share > self.server.max_inflight_body_bytes {
                return Err(invalid(format!(
                    "tenant {:?}: max_inflight_body_bytes ({share}) must be between the largest body limit ({largest}) and server.max_inflight_body_bytes ({})",
                    t.name, self.server.max_inflight_body_bytes
                )));
            }
        }
        if let Some(t) = self.tenants.iter().find(|t| !t.keys.is_empty()) {
            let lines: Vec<String> = t
                .keys
                .iter()
                .map(|k| format!("{:?}", key_hash(k)))
                .collect();
            return Err(invalid(format!(
                "tenant {:?}: plaintext `keys` are not accepted; store their SHA-256 instead:\n  key_hashes = [{}]",
                t.name,
                lines.join(", ")
            )));
        }
        let mut hashes = Vec::new();
        for t in &self.tenants {
            if t.key_hashes.is_empty() {
                return Err(invalid(format!(
                    "tenant {:?} has no key_hashes (make a key with `mmgate keys new`)",
                    t.name
                )));
            }
            for (i, h) in t.key_hashes.iter().enumerate() {
                // The value is not echoed: it may be a key pasted by mistake.
                let parsed = parse_key_hash(h).ok_or_else(|| {
                    invalid(format!(
                        "tenant {:?}: key_hashes[{i}] is not `sha256:` and 64 hex digits (a key pasted here by mistake should be replaced by its line from `mmgate keys new`; rotate it)",
                        t.name
                    ))
                })?;
                if parsed == key_digest("") {
                    return Err(invalid(format!(
                        "tenant {:?}: key_hashes[{i}] is the hash of an empty key",
                        t.name
                    )));
                }
                hashes.push(parsed);
            }
        }
        hashes.sort_unstable();
        if hashes.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("tenant key_hashes must be unique"));
        }
        Ok(())
    }

    /// Tensor slots for `model`: its own `slots`, or enough for every worker
    /// thread plus two full batches per instance.
    pub fn slots_for(&self, model: &ModelSpec) -> u32 {
        if model.slots > 0 {
            return model.slots;
        }
        let workers = self.workers.count * self.workers.threads;
        let batches = model.instances.count * model.batching.max_batch * 2;
        // One per worker thread filling a slot, the batches the executor
        // runs and queues, and the critical reserve.
        (workers + self.critical_reserve() + batches).max(8)
    }

    /// Tensor slots of each model kept for critical work (one per worker
    /// thread at start), so it never waits behind other classes' samples.
    pub fn critical_reserve(&self) -> u32 {
        self.workers.count * self.workers.threads
    }

    /// Size of each worker's shared-memory input region slot (one per thread).
    pub fn input_slot_bytes(&self) -> usize {
        self.largest_body_bytes()
    }
}

impl ServerConfig {
    /// The limits that defend against hostile clients must be usable: a 0
    /// would refuse every connection, cut every upload or every video.
    fn validate_hardening(&self) -> Result<(), SpecError> {
        let h = &self.http;
        for (name, ms) in [
            ("http.header_read_timeout_ms", h.header_read_timeout_ms),
            ("http.body_idle_timeout_ms", h.body_idle_timeout_ms),
            ("http.write_timeout_ms", h.write_timeout_ms),
        ] {
            if ms < 100 {
                return Err(invalid(format!("{name} is {ms}; it must be at least 100")));
            }
        }
        if h.max_connections == 0 || h.max_headers == 0 || h.max_header_bytes == 0 {
            return Err(invalid(
                "http.max_connections, http.max_headers and http.max_header_bytes must be at least 1",
            ));
        }
        let v = &self.video;
        if v.max_decoded_pixels == 0 {
            return Err(invalid("video.max_decoded_pixels must be at least 1"));
        }
        if !(v.max_worker_share > 0.0 && v.max_worker_share <= 1.0) {
            return Err(invalid(format!(
                "video.max_worker_share is {}; it must be in (0, 1]",
                v.max_worker_share
            )));
        }
        if self.limits.max_decode_bytes == 0 {
            return Err(invalid("limits.max_decode_bytes must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(extra: &str) -> Tenant {
        toml::from_str(&format!(
            "name = \"t\"\nkey_hashes = [{:?}]\n{extra}",
            key_hash("k")
        ))
        .unwrap()
    }

    fn validate(t: Tenant) -> Result<(), SpecError> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml");
        let mut cfg = ServerConfig::load(&path).unwrap();
        cfg.tenants = vec![t];
        cfg.validate()
    }

    #[test]
    fn tenant_rates_default_their_burst_and_must_be_numbers_at_least_zero() {
        assert_eq!(tenant("").request_rate(), None);
        assert_eq!(
            tenant("requests_per_s = 0.5").request_rate(),
            Some((0.5, 1))
        );
        assert_eq!(
            tenant("requests_per_s = 2.5").request_rate(),
            Some((2.5, 3))
        );
        assert_eq!(
            tenant("samples_per_s = 10\nsamples_burst = 40").sample_rate(),
            Some((10.0, 40))
        );
        assert!(validate(tenant("samples_per_s = 10")).is_ok());
        let route = |targets: &str| tenant(&format!("routes = {{ moderation = [{targets}] }}"));
        assert!(validate(route("{ model = \"open_nsfw\", weight = 9 }")).is_ok());
        for (bad, why) in [
            ("{ model = \"nope\" }", "not configured"),
            ("{ model = \"open_nsfw\", weight = 0 }", "weight >= 1"),
            ("", "at least one model"),
        ] {
            let e = validate(route(bad)).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = validate(tenant(
            "routes = { open_nsfw = [{ model = \"open_nsfw\" }] }",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("has the name of a model"), "{e}");
        let e = validate(tenant("deadline_ms = 3600001"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 3600000"), "{e}");
        for bad in [
            "requests_per_s = -1",
            "samples_per_s = nan",
            "samples_per_s = inf",
        ] {
            let e = validate(tenant(bad)).unwrap_err().to_string();
            assert!(e.contains("must be a number >= 0"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_tenants_class_and_weight_default_and_are_checked() {
        let t = tenant("");
        assert_eq!(
            (t.class, t.weight, t.max_body_bytes),
            (crate::Class::Standard, 1, 0)
        );
        let t = tenant("class = \"batch\"\nweight = 3");
        assert_eq!((t.class, t.weight), (crate::Class::Batch, 3));
        assert!(validate(t).is_ok());
        let e = validate(tenant("weight = 0")).unwrap_err().to_string();
        assert!(e.contains("weight must be >= 1"), "{e}");
        let bad = "name = \"t\"\nkey_hashes = []\nclass = \"gold\"";
        assert!(toml::from_str::<Tenant>(bad).is_err());

        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml");
        let mut cfg = ServerConfig::load(&path).unwrap();
        cfg.scheduling.sparse_video_after_ms = 3_000;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("videos get sparser before keyframes only"),
            "{e}"
        );
        cfg.scheduling.keyframes_video_after_ms = 0;
        assert!(
            cfg.validate().is_ok(),
            "keyframes off: any sparse threshold"
        );
    }

    #[test]
    fn the_admin_section_and_the_pool_bounds_are_checked() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml");
        let base = ServerConfig::load(&path).unwrap();
        let check = |f: &dyn Fn(&mut ServerConfig)| {
            let mut c = base.clone();
            f(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        assert!(check(&|_| {}).is_ok());
        let e = check(&|c| c.admin.listen = "0.0.0.0:8081".into()).unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        assert!(
            check(&|c| {
                c.admin.listen = "0.0.0.0:8081".into();
                c.admin.key_hash = Some(key_hash("admin"));
            })
            .is_ok()
        );
        assert!(check(&|c| c.admin.listen = String::new()).is_ok(), "off");
        let e = check(&|c| c.admin.key_hash = Some("admin".into())).unwrap_err();
        assert!(e.contains("admin.key_hash is not"), "{e}");
        let e = check(&|c| {
            c.admin.key_hash = Some(key_hash("k"));
            c.tenants = vec![tenant("")];
        })
        .unwrap_err();
        assert!(e.contains("also a key of tenant"), "{e}");
        for (f, why) in [
            (
                &(|c: &mut ServerConfig| c.workers.max = 1) as &dyn Fn(&mut ServerConfig),
                "min <= count <= max",
            ),
            (
                &|c: &mut ServerConfig| c.workers.min = 0,
                "min <= count <= max",
            ),
            (&|c: &mut ServerConfig| c.workers.max = 257, "max <= 256"),
            (
                &|c: &mut ServerConfig| c.workers.scale_down_busy = 1.0,
                "scale_down_busy",
            ),
            (
                &|c: &mut ServerConfig| c.workers.cooldown_ms = 10,
                "cooldown_ms",
            ),
            (
                &|c: &mut ServerConfig| c.workers.recycle_above_rss_mib = u64::MAX,
                "1 TiB",
            ),
        ] {
            let e = check(f).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    /// `throughput_priority` is idle unless set, takes its three names
    /// and refuses anything else, naming them.
    #[test]
    fn the_throughput_priority_defaults_to_idle_and_takes_three_names() {
        let parse = |v: &str| {
            toml::from_str::<Scheduling>(&format!("throughput_priority = {v:?}"))
                .map(|s| s.throughput_priority)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            Scheduling::default().throughput_priority,
            ThroughputPriority::Idle
        );
        assert_eq!(parse("idle"), Ok(ThroughputPriority::Idle));
        assert_eq!(parse("low"), Ok(ThroughputPriority::Low));
        assert_eq!(parse("normal"), Ok(ThroughputPriority::Normal));
        let e = parse("realtime").unwrap_err();
        assert!(e.contains("idle") && e.contains("normal"), "{e}");
    }

    /// The multi-tenant example loads, has one tenant per class, and each
    /// demo key written in its comments is its tenant's key.
    #[test]
    fn the_multi_tenant_example_is_valid_and_its_demo_keys_work() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/examples/multi-tenant.toml");
        let cfg = ServerConfig::load(&path).unwrap();
        cfg.validate().unwrap();
        let mut classes: Vec<_> = cfg.tenants.iter().map(|t| t.class).collect();
        classes.sort_unstable();
        assert_eq!(classes, crate::Class::ALL);
        let text = std::fs::read_to_string(&path).unwrap();
        for t in &cfg.tenants {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("#   {} ", t.name)))
                .unwrap_or_else(|| panic!("no demo key for {}", t.name));
            let key = line.split_whitespace().last().unwrap();
            assert!(line.contains(&format!("({})", t.class)), "{line}");
            assert_eq!(t.key_hashes, [key_hash(key)], "{}", t.name);
        }
    }
}

/// The CPUs of a Linux CPU list (`"0-3,8,10-11"`), sorted and without
/// repeats; empty for `""` (not pinned).
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    const MAX_CPU: usize = 4095;
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |n: &str| {
            n.trim()
                .parse::<usize>()
                .ok()
                .filter(|&c| c <= MAX_CPU)
                .ok_or_else(|| format!("{n:?} is not a CPU number (0..={MAX_CPU})"))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi {
            return Err(format!("the range {part:?} runs backwards"));
        }
        cpus.extend(lo..=hi);
    }
    if cpus.is_empty() && !list.trim().is_empty() {
        return Err("names no CPU".into());
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

#[cfg(test)]
mod cpu_list_tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists_parse_like_linux_writes_them() {
        assert_eq!(parse_cpu_list(""), Ok(vec![]));
        assert_eq!(parse_cpu_list("0-3"), Ok(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("8, 0-1,1"), Ok(vec![0, 1, 8]));
        for bad in ["3-1", "a", "0-", "-1", "5000", ",", "1-2-3"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} accepted");
        }
    }
}
