//! Typed messages between the gateway and its children. Every job message
//! carries the job id; the first message each side sends is a hello with the
//! protocol version.

use serde::{Deserialize, Serialize};
use spec::{Limits, ModelSpec};

use crate::{PoolLayout, SlotRef};

/// Bumped on any incompatible change of the messages below.
pub const PROTO_VERSION: u32 = 1;

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
    /// For logs: the HTTP request this job belongs to.
    pub request_id: String,
    pub slot: SlotRef,
    pub input: Input,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutorInit {
    pub layout: PoolLayout,
    pub models: Vec<ModelSpec>,
    /// Absolute path of the ONNX Runtime shared library.
    pub ort_library: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferJob {
    pub job_id: u64,
    pub slot: SlotRef,
    /// Samples of the same model still being preprocessed when this one was
    /// sent: 0 tells the batcher not to wait for more.
    pub pending: u32,
}

/// Executor → gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromExecutor {
    Hello(Hello),
    /// Every model is loaded and has run a warm-up batch.
    Ready,
    Fatal(String),
    Scores(Scores),
    Failed {
        job_id: u64,
        message: String,
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
