//! The last stage: the kept window of the resized image, in the model's
//! layout and channel order, as `(pixel * scale - mean[c]) / std[c]`, written
//! straight into the output slot. Padding uses `pad_value`.

use config::{ColorOrder, InputSpec, Layout, PreprocessSpec};

use crate::geometry::Plan;
use crate::pixels::Pixels;

/// Value of every 8-bit level for each output channel (output order).
struct Lut([[f32; 256]; 3]);

impl Lut {
    fn new(p: &PreprocessSpec) -> Self {
        let mut t = [[0f32; 256]; 3];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = (v as f32 * p.scale - p.mean[c]) / p.std[c];
            }
        }
        Self(t)
    }
}

/// Writes the model input into `out` (`out.len()` = `input.elements()`).
pub(crate) fn write(
    img: &Pixels,
    plan: &Plan,
    input: &InputSpec,
    p: &PreprocessSpec,
    out: &mut [f32],
) {
    let lut = Lut::new(p);
    // Which source channel feeds output channel c.
    let pick: [usize; 3] = match (img.channels, p.color_order) {
        (1, _) => [0, 0, 0],
        (_, ColorOrder::Rgb) => [0, 1, 2],
        (_, ColorOrder::Bgr) => [2, 1, 0],
    };
    let (ow, oh) = (plan.out.0 as usize, plan.out.1 as usize);
    let pad: [f32; 3] = std::array::from_fn(|c| lut.0[c][usize::from(p.pad_value)]);
    let plane = ow * oh;
    for y in 0..oh {
        let row = source_row(img, plan, y);
        for x in 0..ow {
            let px = row.and_then(|r| source_pixel(img, plan, r, x));
            for c in 0..3 {
                let v = match px {
                    Some(s) => lut.0[c][usize::from(img.data[s + pick[c]])],
                    None => pad[c],
                };
                let i = match input.layout {
                    Layout::Nhwc => (y * ow + x) * 3 + c,
                    Layout::Nchw => c * plane + y * ow + x,
                };
                out[i] = v;
            }
        }
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
