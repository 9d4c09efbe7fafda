//! The 8-bit raster every later stage works on (grey or RGB, tightly packed),
//! and the conversions into it from whatever a decoder produced. They follow
//! PIL's `convert("RGB")`: alpha is dropped without compositing, CMYK uses
//! PIL's formula, and 16-bit samples are scaled by 1/257 with rounding.

use image::DynamicImage;

/// Interleaved 8-bit pixels; `channels` is 1 (grey) or 3 (RGB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pixels {
    pub width: u32,
    pub height: u32,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Pixels {
    pub fn new(width: u32, height: u32, channels: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width as usize * height as usize * channels);
        Self {
            width,
            height,
            channels,
            data,
        }
    }

    /// Grey is kept as one channel: resizing it and repeating it three times
    /// gives exactly what resizing the grey-as-RGB image would.
    pub fn from_dynamic(img: DynamicImage) -> Self {
        let (w, h) = (img.width(), img.height());
        match img {
            DynamicImage::ImageLuma8(b) => Self::new(w, h, 1, b.into_raw()),
            DynamicImage::ImageRgb8(b) => Self::new(w, h, 3, b.into_raw()),
            DynamicImage::ImageLumaA8(b) => Self::new(w, h, 1, drop_alpha(b.as_raw(), 2)),
            DynamicImage::ImageRgba8(b) => Self::new(w, h, 3, drop_alpha(b.as_raw(), 4)),
            DynamicImage::ImageLuma16(b) => Self::new(w, h, 1, narrow16(b.as_raw(), 1, 1)),
            DynamicImage::ImageLumaA16(b) => Self::new(w, h, 1, narrow16(b.as_raw(), 2, 1)),
            DynamicImage::ImageRgb16(b) => Self::new(w, h, 3, narrow16(b.as_raw(), 3, 3)),
            DynamicImage::ImageRgba16(b) => Self::new(w, h, 3, narrow16(b.as_raw(), 4, 3)),
            other => Self::new(w, h, 3, other.into_rgb8().into_raw()),
        }
    }
}

/// Keeps the colour samples of each pixel, drops the trailing alpha sample.
fn drop_alpha(src: &[u8], stride: usize) -> Vec<u8> {
    let keep = stride - 1;
    let mut out = Vec::with_capacity(src.len() / stride * keep);
    for px in src.chunks_exact(stride) {
        out.extend_from_slice(&px[..keep]);
    }
    out
}

/// 16-bit to 8-bit by `round(v / 257)`, keeping the first `keep` of every
/// `stride` samples.
fn narrow16(src: &[u16], stride: usize, keep: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / stride * keep);
    for px in src.chunks_exact(stride) {
        out.extend(px[..keep].iter().map(|&v| to_u8(v)));
    }
    out
}

fn to_u8(v: u16) -> u8 {
    ((u32::from(v) + 128) / 257) as u8
}

/// Adobe-polarity CMYK (as libjpeg hands it out: stored inverted) to RGB,
/// exactly as PIL's `CMYK;I` read followed by `convert("RGB")`.
pub(crate) fn cmyk_to_rgb(width: u32, height: u32, cmyk: &[u8]) -> Pixels {
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        // PIL inverts on read: C = 255 - stored; its cmyk2rgb then computes
        // nk - C*nk/255 with nk = 255 - K = stored K.
        let nk = u32::from(px[3]);
        for &s in &px[..3] {
            let c = 255 - u32::from(s);
            let t = c * nk + 128;
            let m = ((t >> 8) + t) >> 8;
            out.push(nk.saturating_sub(m) as u8);
        }
    }
    Pixels::new(width, height, 3, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

    #[test]
    fn sixteen_bit_is_scaled_and_rounded_not_clipped() {
        assert_eq!(to_u8(0), 0);
        assert_eq!(to_u8(65535), 255);
        assert_eq!(to_u8(200 * 257), 200);
        assert_eq!(to_u8(200 * 257 + 128), 200);
        assert_eq!(to_u8(200 * 257 + 129), 201);
        let img = ImageBuffer::<Rgb<u16>, _>::from_raw(1, 1, vec![65535, 257, 1000]).unwrap();
        let p = Pixels::from_dynamic(DynamicImage::ImageRgb16(img));
        assert_eq!(p.data, vec![255, 1, 4]);
        let img = ImageBuffer::<Luma<u16>, _>::from_raw(2, 1, vec![40000, 300]).unwrap();
        let p = Pixels::from_dynamic(DynamicImage::ImageLuma16(img));
        assert_eq!((p.channels, p.data), (1, vec![156, 1]));
    }

    #[test]
    fn alpha_is_dropped_without_compositing() {
        let img = ImageBuffer::<Rgba<u8>, _>::from_raw(2, 1, vec![10, 20, 30, 0, 40, 50, 60, 255])
            .unwrap();
        let p = Pixels::from_dynamic(DynamicImage::ImageRgba8(img));
        assert_eq!((p.channels, p.data), (3, vec![10, 20, 30, 40, 50, 60]));
        let img = ImageBuffer::<LumaA<u8>, _>::from_raw(1, 1, vec![77, 0]).unwrap();
        let p = Pixels::from_dynamic(DynamicImage::ImageLumaA8(img));
        assert_eq!((p.channels, p.data), (1, vec![77]));
    }

    #[test]
    fn cmyk_follows_pil() {
        // stored (inverted) values: white paper = 255 everywhere
        assert_eq!(
            cmyk_to_rgb(1, 1, &[255, 255, 255, 255]).data,
            vec![255, 255, 255]
        );
        // full black ink: stored K = 0
        assert_eq!(cmyk_to_rgb(1, 1, &[255, 255, 255, 0]).data, vec![0, 0, 0]);
        // full cyan: stored C = 0 -> no red
        assert_eq!(
            cmyk_to_rgb(1, 1, &[0, 255, 255, 255]).data,
            vec![0, 255, 255]
        );
        // PIL: CMYK (100, 50, 0, 30) -> RGB (137, 181, 225)
        assert_eq!(
            cmyk_to_rgb(1, 1, &[155, 205, 255, 225]).data,
            vec![137, 181, 225]
        );
    }
}
