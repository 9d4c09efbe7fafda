//! Size limits applied from the encoded bytes and the header, before any
//! pixel is decoded, so a decompression bomb costs milliseconds and no memory.

use config::Limits;

use crate::PreprocessError;

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

/// Refuses a decode whose raster alone (from the header) would exceed
/// `max_decode_bytes`, before anything is allocated.
pub(crate) fn check_decode_bytes(
    width: u32,
    height: u32,
    bytes: u64,
    limits: &Limits,
) -> Result<(), PreprocessError> {
    if bytes > limits.max_decode_bytes {
        return Err(PreprocessError::DecodeTooLarge {
            width,
            height,
            bytes,
            limit: limits.max_decode_bytes,
        });
    }
    Ok(())
}

/// The image crate's limits: the same dimension cap, and `max_decode_bytes`
/// as its allocation cap (every buffer it and its decoders allocate, PNG
/// chunks included).
pub(crate) fn image_limits(limits: &Limits) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_dimension);
    l.max_image_height = Some(limits.max_dimension);
    l.max_alloc = Some(limits.max_decode_bytes);
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
