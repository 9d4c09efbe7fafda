//! PNG, WebP, GIF (first frame) and BMP through the `image` crate, and JPEG
//! when libjpeg-turbo cannot read it. The header is checked against the
//! limits before any pixel is decoded; the crate's allocation limit is a
//! second guard.

use std::io::Cursor;

use config::{Limits, MediaKind};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};

use crate::PreprocessError;
use crate::decode::Decoded;
use crate::limits::{check_decode_bytes, check_dimensions, image_limits};
use crate::pixels::Pixels;

fn format(kind: MediaKind) -> Result<ImageFormat, PreprocessError> {
    Ok(match kind {
        MediaKind::Jpeg => ImageFormat::Jpeg,
        MediaKind::Png => ImageFormat::Png,
        MediaKind::WebP => ImageFormat::WebP,
        MediaKind::Gif => ImageFormat::Gif,
        MediaKind::Bmp => ImageFormat::Bmp,
        MediaKind::IsoMedia | MediaKind::Matroska => {
            return Err(PreprocessError::VideoAsImage { kind: kind.name() });
        }
    })
}

fn map_err(kind: MediaKind, e: ImageError) -> PreprocessError {
    match e {
        ImageError::Limits(l) => PreprocessError::MemoryLimit(l.to_string()),
        other => PreprocessError::undecodable(kind.name(), other),
    }
}

/// A decoder refused to start because of its allocation limit: name the
/// header's dimensions if they are what is over a limit.
fn over_limit(kind: MediaKind, data: &[u8], limits: &Limits, e: ImageError) -> PreprocessError {
    let Ok(f) = format(kind) else {
        return map_err(kind, e);
    };
    let mut reader = ImageReader::with_format(Cursor::new(data), f);
    reader.no_limits();
    match reader.into_dimensions() {
        Ok((w, h)) => check_dimensions(w, h, limits)
            .err()
            .unwrap_or_else(|| map_err(kind, e)),
        Err(_) => map_err(kind, e),
    }
}

/// Decodes `data` (already sniffed as `kind`) with the image crate.
pub(crate) fn decode(
    kind: MediaKind,
    data: &[u8],
    limits: &Limits,
) -> Result<Decoded, PreprocessError> {
    let mut reader = ImageReader::with_format(Cursor::new(data), format(kind)?);
    reader.limits(image_limits(limits));
    let mut decoder = match reader.into_decoder() {
        Ok(d) => d,
        Err(e @ ImageError::Limits(_)) => return Err(over_limit(kind, data, limits, e)),
        Err(e) => return Err(map_err(kind, e)),
    };
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    check_decode_bytes(width, height, decoder.total_bytes(), limits)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let image = DynamicImage::from_decoder(decoder).map_err(|e| map_err(kind, e))?;
    if (image.width(), image.height()) != (width, height) {
        return Err(PreprocessError::undecodable(
            kind.name(),
            format!(
                "decoded {}×{} pixels, the header said {width}×{height}",
                image.width(),
                image.height()
            ),
        ));
    }
    Ok(Decoded {
        pixels: Pixels::from_dynamic(image),
        orientation,
        width,
        height,
    })
}
