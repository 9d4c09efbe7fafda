//! A decoded frame as it is displayed, in RGB24: swscale converts any pixel
//! format (8- or 10-bit YUV, RGB, palette) and stretches the width by the
//! sample aspect ratio in the same pass; then the stream's display-matrix
//! rotation is applied, exactly as the ffmpeg CLI auto-rotates.

use config::Limits;
use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg::util::frame::Video as VideoFrame;
use ffmpeg_next as ffmpeg;
use image::metadata::Orientation;

use crate::PreprocessError;
use crate::orient;
use crate::pixels::Pixels;

/// Sample aspect ratios outside this range are treated as broken (square).
const SAR_RANGE: std::ops::RangeInclusive<f64> = 0.0625..=16.0;

/// Clockwise rotation (0, 90, 180, 270) a display matrix asks for, as the
/// ffmpeg CLI computes it (`-round(av_display_rotation_get(m))`, folded
/// into [0, 360)); `None` for a malformed matrix or an angle off the
/// quarter turns.
pub(crate) fn rotation_of(matrix: &[u8]) -> Option<u32> {
    if matrix.len() < 36 {
        return None;
    }
    let m: Vec<f64> = matrix
        .chunks_exact(4)
        .take(9)
        .map(|b| f64::from(i32::from_ne_bytes([b[0], b[1], b[2], b[3]])) / 65536.0)
        .collect();
    let (s0, s1) = (m[0].hypot(m[3]), m[1].hypot(m[4]));
    if s0 == 0.0 || s1 == 0.0 {
        return None;
    }
    let ccw = -(m[1] / s1).atan2(m[0] / s0).to_degrees();
    let theta = -ccw.round();
    let theta = theta - 360.0 * (theta / 360.0 + 0.9 / 360.0).floor();
    [0u32, 90, 180, 270, 360]
        .into_iter()
        .find(|&q| (theta - f64::from(q)).abs() < 1.0)
        .map(|q| q % 360)
}

fn orientation(rotation: u32) -> Orientation {
    match rotation {
        90 => Orientation::Rotate90,
        180 => Orientation::Rotate180,
        270 => Orientation::Rotate270,
        _ => Orientation::NoTransforms,
    }
}

/// Displayed width for a stored width and sample aspect ratio.
pub(crate) fn display_width(width: u32, sar: (i32, i32)) -> u32 {
    let (n, d) = sar;
    if n <= 0 || d <= 0 {
        return width;
    }
    let r = f64::from(n) / f64::from(d);
    if !SAR_RANGE.contains(&r) {
        return width;
    }
    ((f64::from(width) * r).round() as u32).max(1)
}

/// Refuses a frame (as stored in the header, or as displayed: stretched by
/// its sample aspect ratio) over the image limits, so no conversion buffer
/// is sized from an unchecked mid-stream resolution or aspect ratio.
pub(crate) fn check_size(w: u32, h: u32, limits: &Limits) -> Result<(), PreprocessError> {
    let too_big = w > limits.max_dimension
        || h > limits.max_dimension
        || u64::from(w) * u64::from(h) > limits.max_pixels;
    if too_big {
        return Err(PreprocessError::VideoFrameTooLarge {
            width: w,
            height: h,
            max_side: limits.max_dimension,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

/// Converts frames to displayed RGB24, keeping one swscale context while the
/// input format and size stay the same.
pub(crate) struct Converter {
    rotation: u32,
    scaler: Option<((Pixel, u32, u32, u32), scaling::Context)>,
    out: VideoFrame,
}

impl Converter {
    pub fn new(rotation: u32) -> Self {
        Self {
            rotation,
            scaler: None,
            out: VideoFrame::empty(),
        }
    }

    /// Displayed size of a `w`×`h` frame with sample aspect ratio `sar`.
    pub fn display_size(&self, w: u32, h: u32, sar: (i32, i32)) -> (u32, u32) {
        let dw = display_width(w, sar);
        if self.rotation % 180 == 90 {
            (h, dw)
        } else {
            (dw, h)
        }
    }

    /// The frame as displayed, tightly packed RGB24.
    pub fn convert(&mut self, frame: &VideoFrame) -> Result<Pixels, PreprocessError> {
        let (w, h, fmt) = (frame.width(), frame.height(), frame.format());
        let sar = frame.aspect_ratio();
        let dw = display_width(w, (sar.numerator(), sar.denominator()));
        let key = (fmt, w, h, dw);
        let err = |e: ffmpeg::Error| PreprocessError::VideoUndecodable {
            reason: format!("converting a {w}×{h} {fmt:?} frame to RGB: {e}"),
        };
        if self.scaler.as_ref().is_none_or(|(k, _)| *k != key) {
            let ctx =
                scaling::Context::get(fmt, w, h, Pixel::RGB24, dw, h, scaling::Flags::BICUBIC)
                    .map_err(err)?;
            self.scaler = Some((key, ctx));
            self.out = VideoFrame::empty();
        }
        let Some((_, scaler)) = self.scaler.as_mut() else {
            unreachable!("set above")
        };
        scaler.run(frame, &mut self.out).map_err(err)?;
        let stride = self.out.stride(0);
        let row = dw as usize * 3;
        let src = self.out.data(0);
        let mut data = Vec::with_capacity(row * h as usize);
        for y in 0..h as usize {
            let line = src
                .get(y * stride..y * stride + row)
                .ok_or_else(|| PreprocessError::Internal("swscale wrote a short frame".into()))?;
            data.extend_from_slice(line);
        }
        Ok(orient::apply(
            Pixels::new(dw, h, 3, data),
            orientation(self.rotation),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(m: [i32; 9]) -> Vec<u8> {
        m.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    const ONE: i32 = 1 << 16;
    const W: i32 = 1 << 30;

    #[test]
    fn display_matrices_give_the_cli_rotation() {
        // As ffprobe prints them for the clips of make_videos.sh, with the
        // clockwise turn the ffmpeg CLI applies (checked against its output
        // in tests/video.rs).
        let rotate_tag_90 = matrix([0, -ONE, 0, ONE, 0, 0, 0, 0, W]);
        let rotate_tag_180 = matrix([-ONE, 0, 0, 0, -ONE, 0, 0, 0, W]);
        let rotate_tag_minus_90 = matrix([0, ONE, 0, -ONE, 0, 0, 0, 0, W]);
        assert_eq!(rotation_of(&rotate_tag_90), Some(270));
        assert_eq!(rotation_of(&rotate_tag_180), Some(180));
        assert_eq!(rotation_of(&rotate_tag_minus_90), Some(90));
        assert_eq!(
            rotation_of(&matrix([ONE, 0, 0, 0, ONE, 0, 0, 0, W])),
            Some(0)
        );
        // 45°, all zeros, too short: no rotation.
        assert_eq!(
            rotation_of(&matrix([46341, -46341, 0, 46341, 46341, 0, 0, 0, W])),
            None
        );
        assert_eq!(rotation_of(&[0u8; 36]), None);
        assert_eq!(rotation_of(&[1u8; 8]), None);
    }

    #[test]
    fn sample_aspect_ratio_stretches_the_width() {
        assert_eq!(display_width(320, (2, 1)), 640);
        assert_eq!(display_width(720, (8, 9)), 640);
        assert_eq!(display_width(320, (0, 1)), 320);
        assert_eq!(display_width(320, (1000, 1)), 320);
        let c = Converter::new(90);
        assert_eq!(c.display_size(320, 240, (2, 1)), (240, 640));
    }

    #[test]
    fn the_displayed_size_is_checked_against_the_image_limits() {
        let limits = Limits {
            max_pixels: 1_000_000,
            max_dimension: 2000,
            ..Limits::default()
        };
        let c = Converter::new(0);
        assert!(check_size(1000, 1000, &limits).is_ok());
        // A 16:1 sample aspect ratio: 320×240 stored, 5120×240 shown.
        let (w, h) = c.display_size(320, 240, (16, 1));
        let e = check_size(w, h, &limits).unwrap_err();
        assert_eq!(e.kind(), shm::JobErrorKind::TooLarge);
        let message = e.to_string();
        assert!(
            message.contains("5120×240") && message.contains("2000 pixels per side"),
            "{message}"
        );
        // Too many pixels with both sides in bounds; rotation swaps sides.
        assert!(check_size(1001, 1000, &limits).is_err());
        assert!(check_size(240, 2001, &limits).is_err());
    }
}
