//! The executor's one error type. Load-time variants name the model, the
//! path or tensor involved and what was expected, so a `Fatal` message sent
//! to the gateway is enough to fix the configuration.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot load the {library} library {}: {message}", path.display())]
    RuntimeLibrary {
        library: &'static str,
        path: PathBuf,
        message: String,
    },

    #[error("cannot start {library}: {message}")]
    Runtime {
        library: &'static str,
        message: String,
    },

    #[error("model {model}: {message}")]
    Precision { model: String, message: String },

    #[error(
        "model {model}: {precision} is off by {error:.4} in log-odds on the calibration images (worst: {image}); precision.max_logodds_error is {limit}, and precision.on_error is \"refuse\""
    )]
    PrecisionCheck {
        model: String,
        precision: &'static str,
        error: f64,
        limit: f64,
        image: String,
    },

    #[error("model {model}: calibration: {message}")]
    Calibration { model: String, message: String },

    #[error("model {model}: model file {} does not exist", path.display())]
    ModelFileMissing { model: String, path: PathBuf },

    #[error("model {model}: cannot load {}: {message}", path.display())]
    ModelLoad {
        model: String,
        path: PathBuf,
        message: String,
    },

    #[error(
        "model {model}: input.name {name:?} is not an input of the model; it has {available:?}"
    )]
    NoSuchInput {
        model: String,
        name: String,
        available: Vec<String>,
    },

    #[error(
        "model {model}: output.name {name:?} is not an output of the model; it has {available:?}"
    )]
    NoSuchOutput {
        model: String,
        name: String,
        available: Vec<String>,
    },

    #[error("model {model}: the model has no outputs")]
    NoOutputs { model: String },

    #[error("model {model}: tensor {name:?} is {actual}; the executor needs {expected}")]
    TensorType {
        model: String,
        name: String,
        actual: String,
        expected: String,
    },

    #[error(
        "model {model}: input {name:?} has shape {actual:?}, but the spec's input is {expected:?} (batch first; -1 = any)"
    )]
    InputShape {
        model: String,
        name: String,
        actual: Vec<i64>,
        expected: Vec<i64>,
    },

    #[error(
        "model {model}: output {name:?} gives {actual} values per sample, but output.labels has {expected}"
    )]
    OutputWidth {
        model: String,
        name: String,
        actual: usize,
        expected: usize,
    },

    #[error("model {model}: a batch of {batch} needs {expected} input values, got {actual}")]
    InputSize {
        model: String,
        batch: usize,
        expected: usize,
        actual: usize,
    },

    #[error("model {model}: batch of {batch} is over max_batch {max_batch}")]
    BatchTooLarge {
        model: String,
        batch: usize,
        max_batch: usize,
    },

    #[error("model {model}: inference failed: {message}")]
    Inference { model: String, message: String },

    #[error("model {model}: backend {backend} is not built into this executor")]
    BackendUnavailable { model: String, backend: String },

    #[error(
        "model {model}: backend {backend} cannot run: {reason}; gpu.fallback is \"fail\", so the executor does not start"
    )]
    GpuUnavailable {
        model: String,
        backend: &'static str,
        reason: String,
    },

    #[error("model {model}: instance thread: {message}")]
    Instance { model: String, message: String },

    #[error(transparent)]
    Shm(#[from] shm::ShmError),

    #[error("executor IPC: {0}")]
    Io(#[from] std::io::Error),

    #[error("executor protocol: {0}")]
    Protocol(String),
}
