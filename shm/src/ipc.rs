//! Typed messages between the gateway and its children. Every job message
//! carries the job id; the first message each side sends is a hello with the
//! protocol version.

use config::{Backend, ExecutorSection, Limits, ModelSpec, Precision};
use serde::{Deserialize, Serialize};

use crate::{PoolLayout, SlotRef};

/// Bumped on any incompatible change of the messages below.
pub const PROTO_VERSION: u32 = 8;

/// What every process knows of the request a job belongs to: created once
/// by the gateway and carried in every job message, so one id follows a
/// request through every process's log lines and every stage can drop work
/// nobody waits for any more.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestContext {
    /// The HTTP request's id (`x-request-id`, or one the gateway made).
    pub request_id: String,
    /// The tenant's name (`anonymous` without tenants).
    pub tenant: String,
    /// The tenant's priority class and its weight within it.
    pub class: config::Class,
    pub weight: u32,
    /// Samples the job runs: 1 for an image, the frame cap for a video.
    pub cost: u32,
    /// `CLOCK_MONOTONIC` nanoseconds (shared by every process on the host)
    /// past which the answer is useless; 0 = no deadline.
    pub deadline_ns: u64,
}

impl RequestContext {
    /// The deadline has passed.
    pub fn expired(&self) -> bool {
        deadline_passed(self.deadline_ns)
    }

    /// How a queue schedules this request's work.
    pub fn ticket(&self) -> fair_queue::Ticket {
        fair_queue::Ticket {
            class: self.class,
            tenant: self.tenant.clone(),
            weight: self.weight,
            cost: self.cost,
        }
    }

    /// The same request, for a job that runs `cost` samples.
    pub fn costing(&self, cost: u32) -> Self {
        Self {
            cost,
            ..self.clone()
        }
    }
}

/// A `RequestContext::deadline_ns` has passed (0 = no deadline).
pub fn deadline_passed(deadline_ns: u64) -> bool {
    deadline_ns != 0 && monotonic_ns() >= deadline_ns
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds: the clock `std::time::Instant`
/// reads on Linux, and the same in every process of the host.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// First message from any child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub proto_version: u32,
    pub pid: u32,
}

/// Gateway → preprocess worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    Init(WorkerInit),
    Job(Job),
    /// Decode and sample a video, streaming frames into granted slots.
    Video(VideoJob),
    /// One more slot for a running video job (sent after one of its frames
    /// was scored and its slot freed).
    Grant {
        job_id: u64,
        slot: SlotRef,
    },
    /// The caller went away: stop the video job as soon as possible (the
    /// worker still ends it with `VideoDone` or `Failed`).
    Cancel {
        job_id: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInit {
    pub worker_id: u32,
    pub threads: u32,
    pub layout: PoolLayout,
    pub input_slot_bytes: usize,
    pub models: Vec<ModelSpec>,
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: u64,
    pub ctx: RequestContext,
    pub slot: SlotRef,
    pub input: Input,
}

/// A video to sample. The worker writes each sampled frame into one of the
/// slots it holds for the job, reports it with [`FromWorker::Frame`], and
/// waits for a [`ToWorker::Grant`] when it holds none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoJob {
    pub job_id: u64,
    pub ctx: RequestContext,
    /// Model (index into `WorkerInit::models`) whose preprocessing applies.
    pub model: u16,
    pub input: Input,
    pub sampling: Sampling,
    /// The slots the worker may fill before it needs a grant.
    pub slots: Vec<SlotRef>,
}

/// Which frames to sample, with the caps already resolved by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub mode: SampleMode,
    /// Only keyframes are decoded (the decoder skips the rest).
    pub keyframes_only: bool,
    /// Seconds of presentation time.
    pub start: f64,
    pub end: Option<f64>,
    /// Cap on sampled frames: sampling stops there with `truncated = true`.
    pub max_frames: u32,
    /// Cap on decoded frames.
    pub max_decoded: u32,
    /// Cap on decoded pixels (the sum of every decoded frame's width ×
    /// height): what a video's decode really costs.
    pub max_decoded_pixels: u64,
    /// Longest accepted duration in seconds (from the container header).
    pub max_duration: f64,
    /// Wall-clock budget for the whole video.
    pub deadline_ms: u64,
    /// FFmpeg decoder threads (frame threading when > 1).
    pub decode_threads: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum SampleMode {
    /// `fps` frames per second of video time: the first frame at or after
    /// each `start + k / fps`.
    Fps(f64),
    /// `n` frames spread uniformly over `[start, end or duration)`.
    Count(u32),
    /// Every decoded frame (with `keyframes_only`: every keyframe).
    All,
}

/// Where the encoded input is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Input {
    /// Small inputs travel in the message.
    Inline(Vec<u8>),
    /// Larger ones are in the worker's input region, slot `index`.
    Shared { index: u32, len: usize },
}

/// Preprocess worker → gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    Hello(Hello),
    Ready,
    /// Initialisation failed; the worker exits after sending it.
    Fatal(String),
    Done(JobDone),
    Failed {
        job_id: u64,
        error: JobError,
    },
    /// A sampled video frame is in `slot`.
    Frame(VideoFrame),
    /// The video job ended (after its last `Frame`).
    VideoDone(VideoDone),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoFrame {
    pub job_id: u64,
    pub slot: SlotRef,
    /// Presentation time in seconds.
    pub t: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoDone {
    pub job_id: u64,
    pub frames_decoded: u32,
    pub frames_sampled: u32,
    /// Seconds, from the container (or the last frame when unknown).
    pub duration: f64,
    /// False when the stream broke after some good frames.
    pub complete: bool,
    /// True when a cap (frames, decoded frames, deadline) stopped sampling.
    pub truncated: bool,
    pub width: u32,
    pub height: u32,
    pub codec: String,
    pub decode_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDone {
    pub job_id: u64,
    /// Size of the decoded image (after EXIF orientation).
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub decode_us: u64,
}

/// Why a job failed; maps one-to-one to an HTTP error code at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobErrorKind {
    /// Not a format the worker decodes.
    Unsupported,
    /// Dimensions or pixel count over a limit (read from the header).
    TooLarge,
    /// Corrupt or truncated data.
    Undecodable,
    /// The decode deadline passed.
    Deadline,
    /// The slot handle was stale (the gateway gave the slot to someone else).
    Stale,
    /// A bug or resource failure in the worker.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub kind: JobErrorKind,
    pub message: String,
}

/// Gateway → executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToExecutor {
    Init(ExecutorInit),
    Infer(InferJob),
    /// A sample of this tenant entered preprocessing: its `Infer` follows
    /// unless decoding fails (`scheduling.tenant_headroom`).
    Expect(Expect),
}

/// See [`ToExecutor::Expect`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expect {
    pub model: u16,
    pub tenant: String,
    pub class: config::Class,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutorInit {
    pub layout: PoolLayout,
    pub models: Vec<ModelSpec>,
    /// Engine libraries and caches (absolute paths).
    pub executor: ExecutorSection,
    /// How batchers order queued samples (`aging_ms`).
    pub scheduling: config::Scheduling,
    /// Models of `models` not to load (unloaded by the admin API): their
    /// jobs are refused. Their pool regions stay, so indices do not move.
    pub unloaded: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferJob {
    pub job_id: u64,
    pub ctx: RequestContext,
    pub slot: SlotRef,
    /// Samples of the same model still being preprocessed when this one was
    /// sent: 0 tells the batcher not to wait for more.
    pub pending: u32,
}

/// Executor → gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromExecutor {
    Hello(Hello),
    /// Every model is loaded and has run a warm-up batch; one entry per
    /// loaded model of `Init`, in order, saying what actually runs it.
    Ready(Vec<ModelRuntime>),
    /// Sent every `executor.heartbeat_ms` by a task of its own while the
    /// executor serves: silence means a hung or stopped process.
    Heartbeat,
    Fatal(String),
    Scores(Scores),
    Failed {
        job_id: u64,
        message: String,
    },
    /// The job's deadline passed before it could run: it was not run.
    Expired {
        job_id: u64,
    },
    /// The job's model is not loaded in this executor (unloaded by the
    /// admin API): it was not run.
    NotLoaded {
        job_id: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub job_id: u64,
    /// Postprocessed outputs, one per label.
    pub values: Vec<f32>,
    /// Time in the batcher queue.
    pub queue_us: u64,
    /// Time of the batch's engine run.
    pub infer_us: u64,
    /// Samples in the batch this one ran in.
    pub batch: u32,
}

/// What actually runs a model, as the executor loaded it: the answer to
/// "which backend and precision serve this?", which may differ from the
/// spec's request after a fallback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRuntime {
    pub model: String,
    pub backend: Backend,
    pub precision: Precision,
    /// The device, as the engine names it (e.g. the CPU's model name).
    pub device: String,
    /// How instances map onto the engine (streams, threads, lanes).
    pub layout: String,
    /// Why the runtime differs from what the spec asked, one line each.
    pub fallbacks: Vec<String>,
    /// The start-up precision check, when the spec has `[precision]` and a
    /// reduced precision was tried.
    pub calibration: Option<Calibration>,
    /// The GPU's state, when a GPU backend runs the model.
    #[serde(default)]
    pub gpu: Option<GpuState>,
}

/// What a GPU backend reports at load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuState {
    /// CUDA device ordinal.
    pub ordinal: u32,
    /// Device memory in use after the model loaded (the whole device).
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// TensorRT engine cache: `off`, `built` (empty before this start) or
    /// `loaded` (engines found); `none` for the CUDA provider.
    pub engine_cache: String,
    /// The cache folder, when there is one.
    pub engine_cache_dir: Option<String>,
    /// The tensor pool is registered with the driver (page-locked), so
    /// copies from the slots are asynchronous DMA.
    pub pinned_slots: bool,
    /// Batches are copied from the slots straight to the device (and
    /// uint8 slots normalised there); false: through host memory.
    pub slots_to_device: bool,
}

/// Result of checking a reduced precision against f32 on calibration images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub precision: Precision,
    pub images: u32,
    /// Largest |Δ log-odds| of any label on any image.
    pub max_logodds_error: f64,
    /// The spec's `max_logodds_error`.
    pub limit: f64,
    pub passed: bool,
}
