//! The last stage, in two steps that images and video frames share:
//! [`window_rgb8`] cuts the kept window of the resized image out as 8-bit
//! RGB (grey expanded, `pad_value` outside the image), and
//! [`normalize_rgb8`] turns such a window into the model's input, in its
//! layout and channel order, as `(pixel * scale - mean[c]) / std[c]`.
//!
//! A model with float slots gets both steps here, straight into its slot.
//! A model with `slot_dtype = "uint8"` gets only the first: the executor
//! runs the second (the same function) while it assembles the batch, so
//! both paths give bit-identical inputs.

use config::{ColorOrder, InputSpec, Layout, PreprocessSpec};

use crate::geometry::Plan;
use crate::pixels::Pixels;

/// Writes the model input into `out` (`out.len()` = `input.elements()`).
pub(crate) fn write(
    img: &Pixels,
    plan: &Plan,
    input: &InputSpec,
    p: &PreprocessSpec,
    out: &mut [f32],
) {
    let mut window = vec![0u8; out.len()];
    window_rgb8(img, plan, p.pad_value, &mut window);
    normalize_rgb8(&window, input, p, out);
}

/// Writes the kept window (`plan.out`, height × width × RGB bytes, in the
/// source's channel order) into `out`; outside the image, `pad`.
pub(crate) fn window_rgb8(img: &Pixels, plan: &Plan, pad: u8, out: &mut [u8]) {
    let (ow, oh) = (plan.out.0 as usize, plan.out.1 as usize);
    debug_assert_eq!(out.len(), ow * oh * 3);
    for (y, row_out) in out.chunks_exact_mut(ow * 3).enumerate().take(oh) {
        let row = source_row(img, plan, y);
        for (x, px_out) in row_out.chunks_exact_mut(3).enumerate() {
            match row.and_then(|r| source_pixel(img, plan, r, x)) {
                Some(s) if img.channels == 1 => px_out.fill(img.data[s]),
                Some(s) => px_out.copy_from_slice(&img.data[s..s + 3]),
                None => px_out.fill(pad),
            }
        }
    }
}

/// The model input for one window of RGB bytes (`src`: height × width × 3,
/// as [`window_rgb8`] writes it) into `out` (`input.elements()` floats):
/// channels picked for `color_order`, each value `(v * scale - mean[c]) /
/// std[c]` in f32, in the model's layout. Row by row: a scalar shuffle into
/// output order, then one straight-line pass per row that the compiler
/// vectorises (byte to float, subtract, divide).
pub fn normalize_rgb8(src: &[u8], input: &InputSpec, p: &PreprocessSpec, out: &mut [f32]) {
    let (w, h) = (input.width as usize, input.height as usize);
    assert_eq!(src.len(), w * h * 3, "window size");
    assert_eq!(out.len(), w * h * 3, "tensor size");
    // Which source channel feeds output channel c.
    let pick: [usize; 3] = match p.color_order {
        ColorOrder::Rgb => [0, 1, 2],
        ColorOrder::Bgr => [2, 1, 0],
    };
    let mut lane = vec![0u8; w * 3];
    match input.layout {
        Layout::Nhwc => {
            // Per element of a row: its channel's mean and std.
            let mean: Vec<f32> = (0..w * 3).map(|i| p.mean[i % 3]).collect();
            let std: Vec<f32> = (0..w * 3).map(|i| p.std[i % 3]).collect();
            for (row, out_row) in src.chunks_exact(w * 3).zip(out.chunks_exact_mut(w * 3)) {
                for (px, l) in row.chunks_exact(3).zip(lane.chunks_exact_mut(3)) {
                    l.copy_from_slice(&[px[pick[0]], px[pick[1]], px[pick[2]]]);
                }
                affine(&lane, p.scale, &mean, &std, out_row);
            }
        }
        Layout::Nchw => {
            let plane = w * h;
            for (y, row) in src.chunks_exact(w * 3).enumerate() {
                for (c, &k) in pick.iter().enumerate() {
                    for (x, l) in lane[..w].iter_mut().enumerate() {
                        *l = row[x * 3 + k];
                    }
                    let at = c * plane + y * w;
                    affine_scalar(
                        &lane[..w],
                        p.scale,
                        p.mean[c],
                        p.std[c],
                        &mut out[at..at + w],
                    );
                }
            }
        }
    }
}

/// `out[i] = (src[i] * scale - mean[i]) / std[i]`, all f32.
#[inline]
fn affine(src: &[u8], scale: f32, mean: &[f32], std: &[f32], out: &mut [f32]) {
    for (((o, &v), &m), &d) in out.iter_mut().zip(src).zip(mean).zip(std) {
        *o = (f32::from(v) * scale - m) / d;
    }
}

/// [`affine`] with one mean and std for the whole slice.
#[inline]
fn affine_scalar(src: &[u8], scale: f32, mean: f32, std: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(src) {
        *o = (f32::from(v) * scale - mean) / std;
    }
}

/// Offset of the first byte of the source row under output row `y`.
fn source_row(img: &Pixels, plan: &Plan, y: usize) -> Option<usize> {
    let sy = plan.origin.1 + y as i64;
    (0..i64::from(img.height))
        .contains(&sy)
        .then(|| sy as usize * img.width as usize * img.channels)
}

/// Offset of the source pixel under output column `x` in row `row`.
fn source_pixel(img: &Pixels, plan: &Plan, row: usize, x: usize) -> Option<usize> {
    let sx = plan.origin.0 + x as i64;
    (0..i64::from(img.width))
        .contains(&sx)
        .then(|| row + sx as usize * img.channels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::{DType, Filter, ResizeMode, Size};

    fn setup(layout: Layout, order: ColorOrder) -> (InputSpec, PreprocessSpec) {
        let input = InputSpec {
            name: "x".into(),
            layout,
            dtype: DType::Float32,
            height: 2,
            width: 2,
            channels: 3,
        };
        let p = PreprocessSpec {
            resize: Size {
                width: 2,
                height: 2,
            },
            resize_mode: ResizeMode::Stretch,
            filter: Filter::Bilinear,
            crop: None,
            color_order: order,
            scale: 2.0,
            mean: [1.0, 2.0, 3.0],
            std: [1.0, 2.0, 4.0],
            pad_value: 7,
            jpeg_dct_scaling: false,
        };
        (input, p)
    }

    fn plan(origin: (i64, i64)) -> Plan {
        Plan {
            full: (2, 2),
            src_box: None,
            resized: (2, 2),
            origin,
            out: (2, 2),
        }
    }

    // pixels (r,g,b): (10,20,30) (40,50,60) / (70,80,90) (100,110,120)
    fn img() -> Pixels {
        Pixels::new(2, 2, 3, (1..=12).map(|v| v * 10).collect())
    }

    #[test]
    fn nhwc_bgr_and_nchw_rgb_hold_the_same_values() {
        let (input, p) = setup(Layout::Nhwc, ColorOrder::Bgr);
        let mut a = vec![0f32; 12];
        write(&img(), &plan((0, 0)), &input, &p, &mut a);
        // first pixel, BGR: b=30 -> (60-1)/1, g=20 -> (40-2)/2, r=10 -> (20-3)/4
        assert_eq!(&a[..3], &[59.0, 19.0, 4.25]);
        let (input, p) = setup(Layout::Nchw, ColorOrder::Rgb);
        let mut b = vec![0f32; 12];
        write(&img(), &plan((0, 0)), &input, &p, &mut b);
        // plane 0 = red of the four pixels
        assert_eq!(&b[..4], &[19.0, 79.0, 139.0, 199.0]);
        assert_eq!(b[4], (40.0 - 2.0) / 2.0);
    }

    /// The vectorised rows equal the plain per-element formula (what the
    /// lookup table computed before), in every layout and channel order.
    #[test]
    fn normalize_rgb8_equals_the_plain_formula() {
        let (w, h) = (7usize, 5usize);
        // Deterministic bytes covering 0..=255.
        let src: Vec<u8> = (0..w * h * 3)
            .map(|i| ((i * 37 + 11) % 256) as u8)
            .collect();
        for layout in [Layout::Nhwc, Layout::Nchw] {
            for order in [ColorOrder::Rgb, ColorOrder::Bgr] {
                let (mut input, mut p) = setup(layout, order);
                input.width = w as u32;
                input.height = h as u32;
                p.scale = 1.0 / 255.0;
                p.mean = [0.485, 0.456, 0.406];
                p.std = [0.229, 0.224, 0.225];
                let mut got = vec![f32::NAN; w * h * 3];
                normalize_rgb8(&src, &input, &p, &mut got);
                let pick = match order {
                    ColorOrder::Rgb => [0, 1, 2],
                    ColorOrder::Bgr => [2, 1, 0],
                };
                for y in 0..h {
                    for x in 0..w {
                        for c in 0..3 {
                            let v = src[(y * w + x) * 3 + pick[c]];
                            let want = (v as f32 * p.scale - p.mean[c]) / p.std[c];
                            let i = match layout {
                                Layout::Nhwc => (y * w + x) * 3 + c,
                                Layout::Nchw => c * w * h + y * w + x,
                            };
                            assert_eq!(
                                got[i].to_bits(),
                                want.to_bits(),
                                "{layout:?} {order:?} y{y} x{x} c{c}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn outside_the_image_is_pad_value() {
        let (input, p) = setup(Layout::Nhwc, ColorOrder::Rgb);
        let mut a = vec![0f32; 12];
        write(&img(), &plan((1, -1)), &input, &p, &mut a);
        let pad = [13.0, 6.0, 2.75];
        assert_eq!(&a[0..3], &pad); // row -1
        assert_eq!(
            &a[6..9],
            &[(80.0 - 1.0), (100.0 - 2.0) / 2.0, (120.0 - 3.0) / 4.0]
        );
        assert_eq!(&a[9..12], &pad); // column 2
    }
}
