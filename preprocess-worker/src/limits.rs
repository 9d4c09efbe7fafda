//! Size limits applied from the encoded bytes and the header, before any
//! pixel is decoded, so a decompression bomb costs milliseconds and no memory.

use config::Limits;

use crate::PreprocessError;

/// Headroom on top of the largest legal decoded image for the image crate's
/// own allocation guard (decoder buffers, palette expansion).
const ALLOC_HEADROOM: u64 = 64 << 20;

/// Refuses an encoded input larger than the body limit.
pub(crate) fn check_bytes(len: usize, limits: &Limits) -> Result<(), PreprocessError> {
    if len > limits.max_body_bytes {
        return Err(PreprocessError::TooManyBytes {
            len,
            limit: limits.max_body_bytes,
        });
    }
    Ok(())
}

/// Refuses header dimensions over `max_pixels` or `max_dimension`.
pub(crate) fn check_dimensions(
    width: u32,
    height: u32,
    limits: &Limits,
) -> Result<(), PreprocessError> {
    if width == 0 || height == 0 {
        return Err(PreprocessError::EmptyImage { width, height });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    if width > limits.max_dimension || height > limits.max_dimension {
        return Err(PreprocessError::DimensionTooLarge {
            width,
            height,
            limit: limits.max_dimension,
        });
    }
    Ok(())
}

/// The image crate's limits: the same dimension cap, and an allocation cap
/// large enough for the biggest legal image at 16-bit RGBA, as a second guard.
pub(crate) fn image_limits(limits: &Limits) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_dimension);
    l.max_image_height = Some(limits.max_dimension);
    l.max_alloc = Some(
        limits
            .max_pixels
            .saturating_mul(8)
            .saturating_add(ALLOC_HEADROOM),
    );
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_each_limit_with_its_own_error() {
        let l = Limits::default();
        assert!(check_dimensions(4000, 3000, &l).is_ok());
        assert!(matches!(
            check_dimensions(65000, 10, &l),
            Err(PreprocessError::DimensionTooLarge { limit: 16384, .. })
        ));
        assert!(matches!(
            check_dimensions(10000, 10000, &l),
            Err(PreprocessError::TooManyPixels { .. })
        ));
        assert!(matches!(
            check_dimensions(0, 10, &l),
            Err(PreprocessError::EmptyImage { .. })
        ));
        assert!(check_bytes(l.max_body_bytes, &l).is_ok());
        assert!(check_bytes(l.max_body_bytes + 1, &l).is_err());
    }
}
