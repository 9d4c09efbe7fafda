//! A model declared as data: its file, backend, input tensor, preprocessing,
//! outputs, batching and instances. Adding a model needs a TOML file under
//! `configs/models/`, not code.

use serde::{Deserialize, Serialize};

use crate::{Backend, GpuSpec, OpenvinoSpec, PrecisionCheck, SpecError, invalid};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Name used in URLs: `/v1/models/{name}/score`.
    pub name: String,
    /// Model file; relative paths are resolved against the spec file's folder.
    pub file: String,
    #[serde(default)]
    pub backend: Backend,
    pub input: InputSpec,
    pub preprocess: PreprocessSpec,
    pub output: OutputSpec,
    #[serde(default)]
    pub batching: BatchingSpec,
    #[serde(default)]
    pub instances: InstanceSpec,
    /// How the `openvino` backend compiles and runs the model.
    #[serde(default)]
    pub openvino: OpenvinoSpec,
    /// Where and how the GPU backends run the model.
    #[serde(default)]
    pub gpu: GpuSpec,
    /// What a tensor slot in shared memory holds: the model-ready `float32`
    /// input, or (`uint8`) the resized, cropped pixels, a quarter of the
    /// bytes, which the executor normalises while it assembles a batch.
    #[serde(default)]
    pub slot_dtype: SlotDtype,
    /// The check a reduced precision (bf16) must pass before it serves.
    #[serde(default)]
    pub precision: Option<PrecisionCheck>,
    /// Tensor slots in shared memory for this model; 0 = derived from the
    /// worker pool and batching (see `ServerConfig::slots_for`).
    #[serde(default)]
    pub slots: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// Batch, height, width, channels.
    #[serde(rename = "NHWC")]
    Nhwc,
    /// Batch, channels, height, width.
    #[serde(rename = "NCHW")]
    Nchw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Float32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::Float32 => 4,
        }
    }
}

/// What one tensor slot holds (see [`ModelSpec::slot_dtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotDtype {
    /// The model input, normalised, in its layout: `elements()` f32s.
    #[default]
    Float32,
    /// The kept window's pixels, height × width × RGB, one byte each
    /// (letterbox padding included); the executor applies `scale`, `mean`,
    /// `std`, `color_order` and the layout.
    Uint8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Input tensor name in the model file, e.g. `input:0`.
    pub name: String,
    pub layout: Layout,
    pub dtype: DType,
    pub height: u32,
    pub width: u32,
    pub channels: u32,
}

impl InputSpec {
    pub fn elements(&self) -> usize {
        self.height as usize * self.width as usize * self.channels as usize
    }
    /// Bytes of one sample (no batch dimension).
    pub fn sample_bytes(&self) -> usize {
        self.elements() * self.dtype.size()
    }
    /// Shape of a batch of `n` samples, in the model's layout.
    pub fn batch_shape(&self, n: usize) -> [usize; 4] {
        let (h, w, c) = (
            self.height as usize,
            self.width as usize,
            self.channels as usize,
        );
        match self.layout {
            Layout::Nhwc => [n, h, w, c],
            Layout::Nchw => [n, c, h, w],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Scale to exactly `width`×`height`, ignoring the aspect ratio.
    Stretch,
    /// Keep the aspect ratio; the shorter side becomes `min(width, height)`.
    ShorterSide,
    /// Keep the aspect ratio and fit inside `width`×`height`, padding with
    /// `pad_value`.
    Letterbox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Antialiased bilinear (triangle) convolution, as PIL's BILINEAR.
    Bilinear,
    /// Antialiased bicubic (Catmull-Rom), as PIL's BICUBIC.
    Bicubic,
    /// Lanczos3.
    Lanczos3,
    /// Nearest neighbour.
    Nearest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ColorOrder {
    #[serde(rename = "RGB")]
    Rgb,
    #[serde(rename = "BGR")]
    Bgr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    pub resize: Size,
    pub resize_mode: ResizeMode,
    pub filter: Filter,
    /// Centre crop applied after the resize; `None` = no crop.
    #[serde(default)]
    pub crop: Option<Size>,
    pub color_order: ColorOrder,
    /// Each value is `(pixel * scale - mean[c]) / std[c]`, with `pixel` in
    /// 0..=255 and `c` in the model's channel order (after `color_order`).
    #[serde(default = "one")]
    pub scale: f32,
    pub mean: [f32; 3],
    #[serde(default = "ones")]
    pub std: [f32; 3],
    /// Pad value (0..=255) for `letterbox`.
    #[serde(default)]
    pub pad_value: u8,
    /// Let JPEG decoders downscale in the DCT domain when the photo is much
    /// larger than the resize target (never below the target size).
    #[serde(default = "yes")]
    pub jpeg_dct_scaling: bool,
}

fn one() -> f32 {
    1.0
}
fn ones() -> [f32; 3] {
    [1.0; 3]
}
fn yes() -> bool {
    true
}

impl PreprocessSpec {
    /// Size of the image after resize and crop: what is written to the tensor.
    pub fn output_size(&self) -> Size {
        self.crop.unwrap_or(self.resize)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Postprocess {
    /// Scores are used as the model gives them.
    #[default]
    None,
    Softmax,
    Sigmoid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Output tensor name; empty = the model's first output.
    #[serde(default)]
    pub name: String,
    /// One label per output value of a sample.
    pub labels: Vec<String>,
    #[serde(default)]
    pub postprocess: Postprocess,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingSpec {
    pub max_batch: u32,
    /// How long the first sample of a batch may wait for more, in µs.
    pub max_queue_delay_us: u64,
    /// Batch sizes the batcher dispatches as soon as it has them.
    #[serde(default)]
    pub preferred_sizes: Vec<u32>,
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_queue_delay_us: 2_000,
            preferred_sizes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Engine instances (one session each; one CUDA stream each on GPU).
    pub count: u32,
    /// Intra-op threads per instance (CPU backend).
    pub intra_threads: u32,
}

impl Default for InstanceSpec {
    fn default() -> Self {
        Self {
            count: 2,
            intra_threads: 1,
        }
    }
}

impl ModelSpec {
    /// Bytes of one tensor slot: the model input (f32) or its pixels (u8).
    pub fn slot_bytes(&self) -> usize {
        match self.slot_dtype {
            SlotDtype::Float32 => self.input.sample_bytes(),
            SlotDtype::Uint8 => self.input.elements(),
        }
    }

    /// Parses and validates one spec file; `file` is resolved against its folder.
    pub fn load(path: &std::path::Path) -> Result<Self, SpecError> {
        let mut spec: ModelSpec = crate::config::read_toml(path)?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        spec.file = crate::config::resolve(dir, &spec.file);
        if !spec.gpu.engine_cache_dir.is_empty() {
            spec.gpu.engine_cache_dir = crate::config::resolve(dir, &spec.gpu.engine_cache_dir);
        }
        if let Some(check) = spec.precision.as_mut() {
            check.calibration_images = crate::config::resolve(dir, &check.calibration_images);
        }
        spec.validate()
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let ok_name = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !ok_name {
            return Err(invalid(format!(
                "model name {:?} must be non-empty ASCII letters, digits, '_', '-' or '.'",
                self.name
            )));
        }
        let i = &self.input;
        if i.channels != 3 {
            return Err(invalid(format!(
                "input.channels is {}; only 3-channel image inputs are supported",
                i.channels
            )));
        }
        let out = self.preprocess.output_size();
        if (out.width, out.height) != (i.width, i.height) {
            return Err(invalid(format!(
                "preprocessing yields {}x{} but input is {}x{}",
                out.width, out.height, i.width, i.height
            )));
        }
        if let Some(c) = self.preprocess.crop {
            let r = self.preprocess.resize;
            if self.preprocess.resize_mode != ResizeMode::ShorterSide
                && (c.width > r.width || c.height > r.height)
            {
                return Err(invalid(format!(
                    "crop {}x{} is larger than resize {}x{}",
                    c.width, c.height, r.width, r.height
                )));
            }
        }
        if self.preprocess.std.contains(&0.0) {
            return Err(invalid("preprocess.std must not contain 0"));
        }
        if self.output.labels.is_empty() {
            return Err(invalid("output.labels must not be empty"));
        }
        let b = &self.batching;
        if b.max_batch == 0 || b.max_batch > 256 {
            return Err(invalid(format!(
                "batching.max_batch is {}; it must be 1..=256",
                b.max_batch
            )));
        }
        if let Some(p) = b
            .preferred_sizes
            .iter()
            .find(|&&p| p == 0 || p > b.max_batch)
        {
            return Err(invalid(format!(
                "batching.preferred_sizes has {p}; each must be 1..=max_batch ({})",
                b.max_batch
            )));
        }
        if self.instances.count == 0 || self.instances.intra_threads == 0 {
            return Err(invalid(
                "instances.count and instances.intra_threads must be >= 1",
            ));
        }
        if let Some(check) = &self.precision {
            check.validate()?;
        }
        Ok(())
    }
}
