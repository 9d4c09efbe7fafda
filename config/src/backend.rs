//! Which engine runs a model, and with what numeric precision: the
//! `backend` field, the `[openvino]` section and the `[precision]` check
//! that a reduced precision must pass before it serves.

use serde::{Deserialize, Serialize};

use crate::{SpecError, invalid};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// ONNX Runtime, CPU execution provider (FP32).
    #[default]
    OnnxruntimeCpu,
    /// ONNX Runtime, CUDA execution provider: one CUDA stream per instance.
    OnnxruntimeCuda,
    /// ONNX Runtime, TensorRT execution provider (CUDA for the nodes
    /// TensorRT does not take), engines cached on disk.
    OnnxruntimeTensorrt,
    /// Intel OpenVINO on the CPU: BF16 on CPUs with AMX or AVX-512 BF16.
    Openvino,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::OnnxruntimeCpu => "onnxruntime-cpu",
            Backend::OnnxruntimeCuda => "onnxruntime-cuda",
            Backend::OnnxruntimeTensorrt => "onnxruntime-tensorrt",
            Backend::Openvino => "openvino",
        }
    }

    /// Runs on an NVIDIA GPU (configured by `[gpu]`).
    pub fn is_gpu(self) -> bool {
        matches!(
            self,
            Backend::OnnxruntimeCuda | Backend::OnnxruntimeTensorrt
        )
    }
}

/// What start-up does when a GPU backend cannot run (no driver, no device,
/// an ONNX Runtime library without the provider, a provider that fails to
/// load): logged once with the reason either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuFallback {
    /// Serve on `onnxruntime-cpu`; `/v1/models` and `/readyz` say so.
    #[default]
    Cpu,
    /// Refuse to start: the executor exits with the reason.
    Fail,
}

/// `[gpu]`: where and how a GPU backend runs a model. The TensorRT batch
/// profile is taken from `[batching]` (min 1, opt and max `max_batch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSpec {
    /// CUDA device ordinal.
    pub device: u32,
    /// TensorRT only (ignored by the other backends, so a backend override
    /// never makes a spec invalid): build FP16 engines, FP32 otherwise.
    /// Not checked by `[precision]`, which proves OpenVINO's BF16 only.
    pub fp16: bool,
    /// TensorRT engine cache (relative to the spec's folder); empty =
    /// `<executor.cache_dir>/onnxruntime-tensorrt`.
    /// Engines are kept per model file sha256 and batch profile, so
    /// retrained weights never reuse a stale engine.
    pub engine_cache_dir: String,
    /// Device memory each instance's arena may take, MiB; 0 = no limit.
    pub memory_limit_mb: u64,
    pub fallback: GpuFallback,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            device: 0,
            fp16: false,
            engine_cache_dir: String::new(),
            memory_limit_mb: 0,
            fallback: GpuFallback::Cpu,
        }
    }
}

/// The numeric precision inference runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    /// TensorRT engines built with `gpu.fp16`.
    F16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// What the spec asks for: a precision, or `auto` (the fastest one the CPU
/// runs natively, falling back as it must).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionRequest {
    /// BF16 where the CPU has AMX or AVX-512 BF16, else f32. If the OpenVINO
    /// library cannot be loaded, the model runs on ONNX Runtime (f32).
    #[default]
    Auto,
    F32,
    Bf16,
}

/// `[openvino]`: how the OpenVINO backend compiles and runs a model.
/// `instances.count` is the number of infer requests run at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenvinoSpec {
    pub precision: PrecisionRequest,
    /// CPU streams of the throughput layout; 0 = one per instance.
    pub num_streams: u32,
    /// Inference threads in all; 0 = every core of the machine.
    pub threads: u32,
    /// One more instance, on a second compiled model with one stream over
    /// every inference thread: a lone batch takes it, so a lone request is
    /// not held to one stream's share of the cores; under load critical
    /// samples and light tenants' do, while the throughput instances run
    /// at `scheduling.throughput_priority`.
    pub latency_lane: bool,
    /// Cache compiled models on disk (`executor.cache_dir`, keyed by the
    /// model file's sha256), so a restart does not compile again.
    pub cache: bool,
}

impl Default for OpenvinoSpec {
    fn default() -> Self {
        Self {
            precision: PrecisionRequest::Auto,
            num_streams: 0,
            threads: 0,
            latency_lane: true,
            cache: true,
        }
    }
}

/// What start-up does when a reduced precision is off by more than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPrecisionError {
    /// Run the model in f32 instead, with one log line.
    #[default]
    F32,
    /// Refuse to serve: the executor fails to start with the measured error.
    Refuse,
}

/// `[precision]`: the check a reduced precision must pass at start-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecisionCheck {
    /// Largest |Δ log-odds| of any label on any calibration image, reduced
    /// precision against f32 on the same backend.
    pub max_logodds_error: f64,
    /// Folder of calibration images (relative to the spec file), scored
    /// through the model's own preprocessing.
    pub calibration_images: String,
    #[serde(default)]
    pub on_error: OnPrecisionError,
}

impl PrecisionCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if !(self.max_logodds_error.is_finite() && self.max_logodds_error > 0.0) {
            return Err(invalid(format!(
                "precision.max_logodds_error is {}; it must be a positive number",
                self.max_logodds_error
            )));
        }
        if self.calibration_images.is_empty() {
            return Err(invalid("precision.calibration_images must name a folder"));
        }
        Ok(())
    }
}
