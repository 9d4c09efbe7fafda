//! Where the displayed image goes in the model input: the size it is resized
//! to for each `ResizeMode`, the part of it that is kept (centre crop) and
//! where padding goes. Pure arithmetic, computed from the full-resolution
//! size so a DCT-downscaled decode lands on exactly the same geometry.

use config::{PreprocessSpec, ResizeMode};

/// The resize and crop of one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Plan {
    /// The size the whole image would be resized to.
    pub full: (u32, u32),
    /// Part of the source that is resized, as fractions of its width and
    /// height `(left, top, width, height)`; `None` = all of it.
    pub src_box: Option<(f64, f64, f64, f64)>,
    /// Size of the resize output.
    pub resized: (u32, u32),
    /// Position, in the resize output, of the model input's top-left pixel;
    /// input pixels that fall outside the resize output are padding.
    pub origin: (i64, i64),
    /// Model input size.
    pub out: (u32, u32),
}

/// The plan for a displayed image of `w`×`h` pixels (both ≥ 1).
pub(crate) fn plan(p: &PreprocessSpec, w: u32, h: u32) -> Plan {
    let out = p.output_size();
    let out = (out.width, out.height);
    let (rw, rh) = (p.resize.width, p.resize.height);
    match p.resize_mode {
        ResizeMode::Stretch => Plan {
            full: (rw, rh),
            src_box: None,
            resized: (rw, rh),
            origin: (centre(rw, out.0), centre(rh, out.1)),
            out,
        },
        ResizeMode::Letterbox => {
            let scale = f64::min(rw as f64 / w as f64, rh as f64 / h as f64);
            let nw = ((w as f64 * scale).round() as u32).clamp(1, rw);
            let nh = ((h as f64 * scale).round() as u32).clamp(1, rh);
            // Padded canvas rw×rh with the image centred, then the centre crop.
            let place = (centre(rw, nw), centre(rh, nh));
            let crop = (centre(rw, out.0), centre(rh, out.1));
            Plan {
                full: (nw, nh),
                src_box: None,
                resized: (nw, nh),
                origin: (crop.0 - place.0, crop.1 - place.1),
                out,
            }
        }
        ResizeMode::ShorterSide => shorter_side(rw.min(rh), w, h, out),
    }
}

/// Shorter side to `s` (the longer one as torchvision computes it), then the
/// centre `out` window. Only the source part under that window is resized, so
/// a very elongated image never needs a huge intermediate buffer.
fn shorter_side(s: u32, w: u32, h: u32, out: (u32, u32)) -> Plan {
    let long = |l: u32, sh: u32| ((u64::from(s) * u64::from(l) / u64::from(sh)) as u32).max(1);
    let full = if w <= h {
        (s, long(h, w))
    } else {
        (long(w, h), s)
    };
    let (x0, win_w) = window(full.0, out.0);
    let (y0, win_h) = window(full.1, out.1);
    let src_box = (win_w, win_h) != full;
    Plan {
        full,
        src_box: src_box.then(|| {
            (
                x0 as f64 / full.0 as f64,
                y0 as f64 / full.1 as f64,
                win_w as f64 / full.0 as f64,
                win_h as f64 / full.1 as f64,
            )
        }),
        resized: (win_w, win_h),
        origin: (
            centre(full.0, out.0) - i64::from(x0),
            centre(full.1, out.1) - i64::from(y0),
        ),
        out,
    }
}

/// Start and length of the centre `want` span inside `have`, clipped to it.
fn window(have: u32, want: u32) -> (u32, u32) {
    if have >= want {
        ((have - want) / 2, want)
    } else {
        (0, have)
    }
}

/// Offset of a centred `inner` span in `outer` (PIL's `(outer - inner) // 2`
/// when it fits; negative, rounded towards zero, when it does not).
fn centre(outer: u32, inner: u32) -> i64 {
    (i64::from(outer) - i64::from(inner)) / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::{ColorOrder, Filter, Size};

    fn spec(mode: ResizeMode, resize: (u32, u32), crop: Option<(u32, u32)>) -> PreprocessSpec {
        PreprocessSpec {
            resize: Size {
                width: resize.0,
                height: resize.1,
            },
            resize_mode: mode,
            filter: Filter::Bilinear,
            crop: crop.map(|(width, height)| Size { width, height }),
            color_order: ColorOrder::Rgb,
            scale: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
            pad_value: 0,
            jpeg_dct_scaling: true,
        }
    }

    #[test]
    fn stretch_then_centre_crop_like_open_nsfw() {
        let p = plan(
            &spec(ResizeMode::Stretch, (256, 256), Some((224, 224))),
            640,
            480,
        );
        assert_eq!(p.resized, (256, 256));
        assert_eq!(p.origin, (16, 16));
        assert_eq!(p.src_box, None);
    }

    #[test]
    fn letterbox_centres_the_image_in_padding() {
        let p = plan(&spec(ResizeMode::Letterbox, (320, 320), None), 640, 480);
        assert_eq!(p.resized, (320, 240));
        assert_eq!(p.origin, (0, -40));
        let p = plan(
            &spec(ResizeMode::Letterbox, (320, 320), Some((300, 300))),
            480,
            640,
        );
        assert_eq!(p.resized, (240, 320));
        assert_eq!(p.origin, (10 - 40, 10));
    }

    #[test]
    fn shorter_side_resizes_only_the_centre_window() {
        let p = plan(
            &spec(ResizeMode::ShorterSide, (256, 256), Some((224, 224))),
            600,
            400,
        );
        assert_eq!(p.full, (384, 256));
        assert_eq!(p.resized, (224, 224));
        assert_eq!(p.origin, (0, 0));
        let (l, t, w, h) = p.src_box.unwrap();
        assert!((l - 80.0 / 384.0).abs() < 1e-12 && (t - 16.0 / 256.0).abs() < 1e-12);
        assert!((w - 224.0 / 384.0).abs() < 1e-12 && (h - 224.0 / 256.0).abs() < 1e-12);
        // an absurdly thin image stays cheap
        let p = plan(&spec(ResizeMode::ShorterSide, (224, 224), None), 16384, 1);
        assert_eq!(p.full, (224 * 16384, 224));
        assert_eq!(p.resized, (224, 224));
    }
}
