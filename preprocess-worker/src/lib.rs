//! mmgate's preprocess worker: turns an encoded image into a model-ready
//! tensor. [`preprocess`] is the whole pipeline, one module per stage:
//! sniff → header limits → decode (`jpeg`, `raster`) → EXIF orientation
//! (`orient`) → 8-bit grey/RGB (`pixels`) → resize and crop (`geometry`,
//! `resize`) → normalise into the output (`normalize`). The binary wraps it
//! in the IPC loop of `serve`. Videos (`video`) are demuxed and decoded with
//! FFmpeg, sampled by presentation time, and each sampled frame goes through
//! the same resize/crop/normalise stages via [`preprocess_rgb`].

mod decode;
mod error;
mod geometry;
mod jpeg;
mod limits;
mod normalize;
mod orient;
mod pixels;
mod raster;
mod resize;
pub mod serve;
pub mod video;

use std::time::Instant;

use config::{Limits, ModelSpec};

pub use error::PreprocessError;
pub use normalize::normalize_rgb8;

/// Where a sample goes: the model-ready input (`elements()` f32s), or the
/// kept window's RGB bytes (`elements()` u8s) for a model whose slots hold
/// uint8 pixels, which the executor normalises with [`normalize_rgb8`].
#[derive(Debug)]
pub enum SampleOut<'a> {
    F32(&'a mut [f32]),
    Rgb8(&'a mut [u8]),
}

impl SampleOut<'_> {
    /// Holds exactly one sample of `model`'s input.
    fn check(&self, model: &ModelSpec) -> Result<(), PreprocessError> {
        let got = match self {
            SampleOut::F32(b) => b.len(),
            SampleOut::Rgb8(b) => b.len(),
        };
        let expected = model.input.elements();
        if got != expected {
            return Err(PreprocessError::OutputSize { expected, got });
        }
        Ok(())
    }
}

impl<'a> From<&'a mut [f32]> for SampleOut<'a> {
    fn from(b: &'a mut [f32]) -> Self {
        SampleOut::F32(b)
    }
}

impl<'a> From<&'a mut Vec<f32>> for SampleOut<'a> {
    fn from(b: &'a mut Vec<f32>) -> Self {
        SampleOut::F32(b)
    }
}

impl<'a> From<&'a mut [u8]> for SampleOut<'a> {
    fn from(b: &'a mut [u8]) -> Self {
        SampleOut::Rgb8(b)
    }
}

impl<'a> From<&'a mut Vec<u8>> for SampleOut<'a> {
    fn from(b: &'a mut Vec<u8>) -> Self {
        SampleOut::Rgb8(b)
    }
}

/// What was decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Full-resolution size as displayed (after EXIF orientation).
    pub width: u32,
    pub height: u32,
    /// `jpeg`, `png`, `webp`, `gif` or `bmp`.
    pub format: &'static str,
}

/// Decodes `data` and writes `model`'s input tensor for it into `out`
/// (`model.input.elements()` floats, in the model's layout and channel
/// order, or as many RGB bytes; see [`SampleOut`]). Size limits are checked
/// from the header before decoding; the deadline is checked between stages.
pub fn preprocess<'a>(
    data: &[u8],
    model: &ModelSpec,
    limits: &Limits,
    deadline: Instant,
    out: impl Into<SampleOut<'a>>,
) -> Result<ImageInfo, PreprocessError> {
    let out = out.into();
    out.check(model)?;
    limits::check_bytes(data.len(), limits)?;
    let kind = config::sniff(data).ok_or_else(|| PreprocessError::unsupported(data))?;
    let p = &model.preprocess;
    let decoded = decode::decode(kind, data, p, limits)?;
    check_deadline(deadline, "decode")?;
    let (width, height) = orient::oriented_size(decoded.width, decoded.height, decoded.orientation);
    let pixels = orient::apply(decoded.pixels, decoded.orientation);
    check_deadline(deadline, "orientation")?;
    to_tensor(pixels, width, height, model, deadline, out)?;
    Ok(ImageInfo {
        width,
        height,
        format: kind.name(),
    })
}

/// Writes `model`'s input tensor for an RGB24 raster (`width`×`height`,
/// tightly packed, as displayed) into `out`: the resize, crop and normalise
/// stages of [`preprocess`], shared with the video path.
pub fn preprocess_rgb<'a>(
    rgb: Vec<u8>,
    width: u32,
    height: u32,
    model: &ModelSpec,
    out: impl Into<SampleOut<'a>>,
) -> Result<(), PreprocessError> {
    let out = out.into();
    out.check(model)?;
    if rgb.len() != width as usize * height as usize * 3 || width == 0 || height == 0 {
        return Err(PreprocessError::Internal(format!(
            "{} bytes is not a {width}×{height} RGB24 raster",
            rgb.len()
        )));
    }
    let pixels = pixels::Pixels::new(width, height, 3, rgb);
    to_tensor(pixels, width, height, model, far_deadline(), out)
}

/// Resize and crop (`geometry`, `resize`) then normalise into `out`.
/// `width`×`height` is the full displayed size, which `pixels` may be a
/// DCT-downscaled version of.
pub(crate) fn to_tensor(
    pixels: pixels::Pixels,
    width: u32,
    height: u32,
    model: &ModelSpec,
    deadline: Instant,
    out: SampleOut<'_>,
) -> Result<(), PreprocessError> {
    let p = &model.preprocess;
    let plan = geometry::plan(p, width, height);
    let resized = resize::resize(pixels, &plan, p.filter)?;
    check_deadline(deadline, "resize")?;
    match out {
        SampleOut::F32(out) => normalize::write(&resized, &plan, &model.input, p, out),
        SampleOut::Rgb8(out) => normalize::window_rgb8(&resized, &plan, p.pad_value, out),
    }
    Ok(())
}

fn far_deadline() -> Instant {
    Instant::now() + std::time::Duration::from_secs(3600)
}

fn check_deadline(deadline: Instant, stage: &'static str) -> Result<(), PreprocessError> {
    if Instant::now() > deadline {
        return Err(PreprocessError::Deadline { stage });
    }
    Ok(())
}
