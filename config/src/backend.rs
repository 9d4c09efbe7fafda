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
    /// Intel OpenVINO on the CPU: BF16 on CPUs with AMX or AVX-512 BF16.
    Openvino,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::OnnxruntimeCpu => "onnxruntime-cpu",
            Backend::Openvino => "openvino",
        }
    }
}

/// The numeric precision inference runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
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
    /// A batch that runs while no other batch of the model does may take
    /// every inference thread (a second, one-stream compiled model), so a
    /// lone request is not held to one stream's share of the cores.
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
