//! EXIF orientation: read from a JPEG's APP1 segment (other formats report it
//! through their image-crate decoder) and applied to the pixels before the
//! resize, exactly like PIL's `ImageOps.exif_transpose`.

use image::metadata::Orientation;

use crate::pixels::Pixels;

/// The orientation tag of a JPEG's EXIF block; missing or unreadable EXIF
/// means "as stored", as in PIL.
pub(crate) fn jpeg_orientation(data: &[u8]) -> Orientation {
    let exif = match exif::Reader::new().read_from_container(&mut std::io::Cursor::new(data)) {
        Ok(e) => e,
        Err(_) => return Orientation::NoTransforms,
    };
    exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
        .and_then(|f| f.value.get_uint(0))
        .and_then(|v| u8::try_from(v).ok())
        .and_then(Orientation::from_exif)
        .unwrap_or(Orientation::NoTransforms)
}

/// Whether the orientation swaps width and height.
pub(crate) fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// `(width, height)` as displayed.
pub(crate) fn oriented_size(width: u32, height: u32, o: Orientation) -> (u32, u32) {
    if swaps_axes(o) {
        (height, width)
    } else {
        (width, height)
    }
}

/// The pixels as displayed. Orientation 1 costs nothing; the others copy once.
pub(crate) fn apply(src: Pixels, o: Orientation) -> Pixels {
    if o == Orientation::NoTransforms {
        return src;
    }
    let (w, h) = (src.width as usize, src.height as usize);
    let (ow, oh) = oriented_size(src.width, src.height, o);
    let ch = src.channels;
    let mut data = vec![0u8; src.data.len()];
    for y in 0..oh as usize {
        for x in 0..ow as usize {
            let (sx, sy) = source_of(o, x, y, w, h);
            let s = (sy * w + sx) * ch;
            let d = (y * ow as usize + x) * ch;
            data[d..d + ch].copy_from_slice(&src.data[s..s + ch]);
        }
    }
    Pixels::new(ow, oh, ch, data)
}

/// Stored pixel shown at displayed `(x, y)`, for a `w`×`h` stored image
/// (PIL's transpose methods for EXIF values 2–8).
fn source_of(o: Orientation, x: usize, y: usize, w: usize, h: usize) -> (usize, usize) {
    match o {
        Orientation::NoTransforms => (x, y),
        Orientation::FlipHorizontal => (w - 1 - x, y),
        Orientation::Rotate180 => (w - 1 - x, h - 1 - y),
        Orientation::FlipVertical => (x, h - 1 - y),
        // 5: transpose
        Orientation::Rotate90FlipH => (y, x),
        // 6: rotate 90° clockwise
        Orientation::Rotate90 => (y, h - 1 - x),
        // 7: transverse
        Orientation::Rotate270FlipH => (w - 1 - y, h - 1 - x),
        // 8: rotate 90° counter-clockwise
        Orientation::Rotate270 => (w - 1 - y, x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3×2 grey image:  1 2 3 / 4 5 6
    fn sample() -> Pixels {
        Pixels::new(3, 2, 1, vec![1, 2, 3, 4, 5, 6])
    }

    fn oriented(exif: u8) -> (u32, u32, Vec<u8>) {
        let p = apply(sample(), Orientation::from_exif(exif).unwrap());
        (p.width, p.height, p.data)
    }

    #[test]
    fn all_eight_orientations_match_pil() {
        assert_eq!(oriented(1), (3, 2, vec![1, 2, 3, 4, 5, 6]));
        assert_eq!(oriented(2), (3, 2, vec![3, 2, 1, 6, 5, 4]));
        assert_eq!(oriented(3), (3, 2, vec![6, 5, 4, 3, 2, 1]));
        assert_eq!(oriented(4), (3, 2, vec![4, 5, 6, 1, 2, 3]));
        assert_eq!(oriented(5), (2, 3, vec![1, 4, 2, 5, 3, 6]));
        assert_eq!(oriented(6), (2, 3, vec![4, 1, 5, 2, 6, 3]));
        assert_eq!(oriented(7), (2, 3, vec![6, 3, 5, 2, 4, 1]));
        assert_eq!(oriented(8), (2, 3, vec![3, 6, 2, 5, 1, 4]));
    }

    #[test]
    fn rgb_pixels_move_as_a_whole() {
        let p = Pixels::new(2, 1, 3, vec![1, 2, 3, 4, 5, 6]);
        let r = apply(p, Orientation::Rotate90);
        assert_eq!((r.width, r.height, r.data), (1, 2, vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn missing_exif_means_as_stored() {
        assert_eq!(
            jpeg_orientation(b"\xff\xd8\xff\xd9"),
            Orientation::NoTransforms
        );
        assert_eq!(jpeg_orientation(b""), Orientation::NoTransforms);
    }
}
