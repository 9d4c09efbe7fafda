//! The resize, with `fast_image_resize` straight from the decoded buffer
//! (its convolution filters reproduce PIL's antialiased resampling).

use std::cell::RefCell;

use config::Filter;
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::PreprocessError;
use crate::geometry::Plan;
use crate::pixels::Pixels;

thread_local! {
    /// One resizer per thread keeps its scratch buffers between images.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

fn algorithm(filter: Filter) -> ResizeAlg {
    match filter {
        Filter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
        Filter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
        Filter::Lanczos3 => ResizeAlg::Convolution(FilterType::Lanczos3),
        Filter::Nearest => ResizeAlg::Nearest,
    }
}

/// Resizes `src` (the whole displayed image, possibly DCT-downscaled) to
/// `plan.resized`, taking only `plan.src_box` of it when set.
pub(crate) fn resize(src: Pixels, plan: &Plan, filter: Filter) -> Result<Pixels, PreprocessError> {
    let (dw, dh) = plan.resized;
    if plan.src_box.is_none() && (src.width, src.height) == (dw, dh) {
        return Ok(src);
    }
    let pixel_type = match src.channels {
        1 => PixelType::U8,
        3 => PixelType::U8x3,
        n => return Err(PreprocessError::Internal(format!("{n}-channel raster"))),
    };
    let internal = |e: &dyn std::fmt::Display| PreprocessError::Internal(format!("resize: {e}"));
    let src_view =
        ImageRef::new(src.width, src.height, &src.data, pixel_type).map_err(|e| internal(&e))?;
    let mut dst = Image::new(dw, dh, pixel_type);
    let mut options = ResizeOptions::new()
        .resize_alg(algorithm(filter))
        .use_alpha(false);
    if let Some((l, t, w, h)) = plan.src_box {
        let (sw, sh) = (f64::from(src.width), f64::from(src.height));
        options = options.crop(l * sw, t * sh, w * sw, h * sh);
    }
    RESIZER
        .with(|r| r.borrow_mut().resize(&src_view, &mut dst, &options))
        .map_err(|e| internal(&e))?;
    Ok(Pixels::new(dw, dh, src.channels, dst.into_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(resized: (u32, u32)) -> Plan {
        Plan {
            full: resized,
            src_box: None,
            resized,
            origin: (0, 0),
            out: resized,
        }
    }

    #[test]
    fn flat_images_stay_flat_and_same_size_is_a_no_op() {
        let src = Pixels::new(40, 30, 3, [10u8, 20, 30].repeat(40 * 30));
        let out = resize(src.clone(), &plan((7, 5)), Filter::Bilinear).unwrap();
        assert_eq!((out.width, out.height, out.channels), (7, 5, 3));
        assert!(out.data.chunks(3).all(|p| p == [10, 20, 30]));
        let same = resize(src.clone(), &plan((40, 30)), Filter::Bicubic).unwrap();
        assert_eq!(same, src);
    }

    #[test]
    fn grey_resizes_as_one_channel() {
        let src = Pixels::new(4, 4, 1, (0..16).map(|v| v * 16).collect());
        let out = resize(src, &plan((2, 2)), Filter::Nearest).unwrap();
        assert_eq!((out.channels, out.data.len()), (1, 4));
    }
}
