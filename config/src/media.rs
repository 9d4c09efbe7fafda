//! Recognises an upload by its magic bytes, never by its Content-Type. Shared
//! by the gateway (to refuse unsupported media before any work) and the
//! worker (to pick a decoder).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MediaKind {
    Jpeg,
    Png,
    WebP,
    Gif,
    Bmp,
    /// ISO base media (MP4, MOV, M4V, 3GP): decoded by FFmpeg in the worker.
    IsoMedia,
    /// Matroska or WebM.
    Matroska,
}

impl MediaKind {
    pub fn name(self) -> &'static str {
        match self {
            MediaKind::Jpeg => "jpeg",
            MediaKind::Png => "png",
            MediaKind::WebP => "webp",
            MediaKind::Gif => "gif",
            MediaKind::Bmp => "bmp",
            MediaKind::IsoMedia => "mp4",
            MediaKind::Matroska => "matroska",
        }
    }

    /// A container the worker demuxes and decodes with FFmpeg.
    pub fn is_video(self) -> bool {
        matches!(self, MediaKind::IsoMedia | MediaKind::Matroska)
    }
}

const QT_ATOMS: [[u8; 4]; 4] = [*b"moov", *b"wide", *b"free", *b"mdat"];

/// ISO-BMFF major brands of still images (HEIF/AVIF): not videos, and not a
/// format mmgate decodes, so they are unsupported rather than sent to FFmpeg
/// and answered in the video schema.
const IMAGE_BRANDS: [[u8; 4]; 7] = [
    *b"avif", *b"avis", *b"heic", *b"heix", *b"mif1", *b"msf1", *b"heim",
];

/// The media kind of `data` from its first bytes, if it is one mmgate decodes.
pub fn sniff(data: &[u8]) -> Option<MediaKind> {
    match data {
        [0xFF, 0xD8, 0xFF, ..] => Some(MediaKind::Jpeg),
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Some(MediaKind::Png),
        [
            b'R',
            b'I',
            b'F',
            b'F',
            _,
            _,
            _,
            _,
            b'W',
            b'E',
            b'B',
            b'P',
            ..,
        ] => Some(MediaKind::WebP),
        [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => Some(MediaKind::Gif),
        [b'B', b'M', _, _, _, _, _, _, _, _, _, _, _, _, ..] => Some(MediaKind::Bmp),
        [0x1A, 0x45, 0xDF, 0xA3, ..] => Some(MediaKind::Matroska),
        [_, _, _, _, b'f', b't', b'y', b'p', a, b, c, d, ..]
            if IMAGE_BRANDS.contains(&[*a, *b, *c, *d]) =>
        {
            None
        }
        [_, _, _, _, b'f', b't', b'y', b'p', ..] => Some(MediaKind::IsoMedia),
        // QuickTime files may start with other top-level atoms.
        [_, _, _, _, a, b, c, d, ..] if QT_ATOMS.contains(&[*a, *b, *c, *d]) => {
            Some(MediaKind::IsoMedia)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_magic_bytes_only() {
        assert_eq!(sniff(b"\xFF\xD8\xFF\xE0rest"), Some(MediaKind::Jpeg));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nxxxx"), Some(MediaKind::Png));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(MediaKind::WebP));
        assert_eq!(sniff(b"GIF89a.."), Some(MediaKind::Gif));
        assert_eq!(
            sniff(b"BM\0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
            Some(MediaKind::Bmp)
        );
        assert_eq!(sniff(b"BM"), None);
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"hello, this is not an image"), None);
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), None);
        assert_eq!(sniff(b"\0\0\0\x20ftypisom"), Some(MediaKind::IsoMedia));
        assert_eq!(sniff(b"\0\0\0\x08wide\0\0"), Some(MediaKind::IsoMedia));
        assert_eq!(sniff(b"\x1a\x45\xdf\xa3\x01"), Some(MediaKind::Matroska));
        // Still images in an ISO-BMFF box are not videos.
        assert_eq!(sniff(b"\0\0\0\x1cftypavif\0\0\0\0"), None);
        assert_eq!(sniff(b"\0\0\0\x18ftypheic\0\0\0\0"), None);
        assert!(MediaKind::Matroska.is_video() && !MediaKind::Png.is_video());
    }
}
