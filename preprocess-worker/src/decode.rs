//! Picks the decoder for a sniffed input and contains its failures: whatever
//! a decoder does with hostile bytes (error or panic) becomes an error of
//! this job, never a crash of the worker.

use std::panic::{AssertUnwindSafe, catch_unwind};

use config::{Limits, MediaKind, PreprocessSpec};
use image::metadata::Orientation;

use crate::pixels::Pixels;
use crate::{PreprocessError, jpeg, raster};

/// A decoded image, as stored (before EXIF orientation).
#[derive(Debug)]
pub(crate) struct Decoded {
    /// Possibly smaller than `width`×`height` (JPEG DCT-domain downscaling).
    pub pixels: Pixels,
    pub orientation: Orientation,
    /// Full-resolution stored size, from the header.
    pub width: u32,
    pub height: u32,
}

/// Decodes `data`; a decoder panic is reported as `Undecodable`.
pub(crate) fn decode(
    kind: MediaKind,
    data: &[u8],
    p: &PreprocessSpec,
    limits: &Limits,
) -> Result<Decoded, PreprocessError> {
    let run = || match kind {
        MediaKind::Jpeg => jpeg::decode(data, p, limits),
        other => raster::decode(other, data, limits),
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(result) => result,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PreprocessError::undecodable(
                kind.name(),
                format!("the decoder failed: {why}"),
            ))
        }
    }
}
