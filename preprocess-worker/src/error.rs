//! The one error type of the worker's preprocessing, with a mapping to the
//! wire-level [`JobErrorKind`] so the gateway can answer with the right code.

use shm::JobErrorKind;

/// Why an input could not be turned into a tensor.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("input is empty; expected a JPEG, PNG, WebP, GIF or BMP image")]
    Empty,
    #[error(
        "input is not a supported image (JPEG, PNG, WebP, GIF or BMP); its first bytes are {head}"
    )]
    Unsupported { head: String },
    #[error("input is {len} bytes; the limit is {limit} bytes")]
    TooManyBytes { len: usize, limit: usize },
    #[error("image is {width}×{height} pixels; the limit is {limit} pixels per side")]
    DimensionTooLarge { width: u32, height: u32, limit: u32 },
    #[error(
        "image is {width}×{height} pixels ({:.1} megapixels); the limit is {} megapixels",
        *width as f64 * *height as f64 / 1e6,
        *limit as f64 / 1e6
    )]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("image has a zero width or height ({width}×{height})")]
    EmptyImage { width: u32, height: u32 },
    #[error("{format} image is corrupt or truncated: {reason}")]
    Undecodable {
        format: &'static str,
        reason: String,
    },
    #[error("decoding would need more memory than the limit allows: {0}")]
    MemoryLimit(String),
    #[error(
        "decoding this {width}×{height} image needs {:.0} MiB; limits.max_decode_bytes is {:.0} MiB",
        *bytes as f64 / 1048576.0,
        *limit as f64 / 1048576.0
    )]
    DecodeTooLarge {
        width: u32,
        height: u32,
        bytes: u64,
        limit: u64,
    },
    #[error("the decode deadline passed after the {stage} stage")]
    Deadline { stage: &'static str },
    #[error("output tensor has {got} elements; the model input needs {expected}")]
    OutputSize { expected: usize, got: usize },
    #[error("input is a video ({kind}), not an image; it must be sent as a video job")]
    VideoAsImage { kind: &'static str },
    #[error("input is not a supported video (MP4, MOV, WebM or Matroska): {reason}")]
    VideoContainer { reason: String },
    #[error("video codec {codec} is not supported")]
    VideoCodec { codec: String },
    #[error("no video stream in the input (streams: {streams})")]
    NoVideoStream { streams: String },
    #[error("video is {duration:.1} s long; the limit (max_duration) is {limit} s")]
    VideoTooLong { duration: f64, limit: f64 },
    #[error(
        "video frame is {width}×{height} pixels; the limits are {max_side} pixels per side and {} megapixels",
        *max_pixels as f64 / 1e6
    )]
    VideoFrameTooLarge {
        width: u32,
        height: u32,
        max_side: u32,
        max_pixels: u64,
    },
    #[error("video could not be decoded: {reason}")]
    VideoUndecodable { reason: String },
    #[error(
        "frames={frames} needs the video's duration, which its container does not state; use fps= or give an end time"
    )]
    VideoDurationUnknown { frames: u32 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl PreprocessError {
    /// The failure class reported to the gateway.
    pub fn kind(&self) -> JobErrorKind {
        match self {
            Self::Empty
            | Self::Unsupported { .. }
            | Self::VideoAsImage { .. }
            | Self::VideoContainer { .. }
            | Self::VideoCodec { .. }
            | Self::VideoDurationUnknown { .. } => JobErrorKind::Unsupported,
            Self::TooManyBytes { .. }
            | Self::DimensionTooLarge { .. }
            | Self::TooManyPixels { .. }
            | Self::MemoryLimit(_)
            | Self::DecodeTooLarge { .. }
            | Self::VideoTooLong { .. }
            | Self::VideoFrameTooLarge { .. } => JobErrorKind::TooLarge,
            Self::EmptyImage { .. }
            | Self::Undecodable { .. }
            | Self::NoVideoStream { .. }
            | Self::VideoUndecodable { .. } => JobErrorKind::Undecodable,
            Self::Deadline { .. } => JobErrorKind::Deadline,
            Self::OutputSize { .. } | Self::Internal(_) => JobErrorKind::Internal,
        }
    }

    pub(crate) fn undecodable(format: &'static str, reason: impl ToString) -> Self {
        Self::Undecodable {
            format,
            reason: reason.to_string(),
        }
    }

    /// `Unsupported` naming the first bytes of `data` (up to 8, in hex).
    pub(crate) fn unsupported(data: &[u8]) -> Self {
        if data.is_empty() {
            return Self::Empty;
        }
        let head: Vec<String> = data.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Self::Unsupported {
            head: head.join(" "),
        }
    }
}

/// The IPC form of a preprocessing failure.
pub(crate) fn job_error(e: &PreprocessError) -> shm::JobError {
    shm::JobError {
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// A failure that is a bug or a resource problem, not the input's fault.
pub(crate) fn internal(e: impl ToString) -> shm::JobError {
    shm::JobError {
        kind: JobErrorKind::Internal,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_value_and_the_limit() {
        let e = PreprocessError::TooManyPixels {
            width: 30000,
            height: 30000,
            limit: 40_000_000,
        };
        assert_eq!(
            e.to_string(),
            "image is 30000×30000 pixels (900.0 megapixels); the limit is 40 megapixels"
        );
        assert_eq!(e.kind(), JobErrorKind::TooLarge);
        let e = PreprocessError::unsupported(b"hello");
        assert!(e.to_string().contains("68 65 6c 6c 6f"), "{e}");
        assert_eq!(e.kind(), JobErrorKind::Unsupported);
        assert_eq!(
            PreprocessError::unsupported(b"").kind(),
            JobErrorKind::Unsupported
        );
    }
}
