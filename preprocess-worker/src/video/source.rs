//! Opening a video for demuxing without touching disk or copying it: FFmpeg
//! reads the input-region memfd the worker inherited through its `subfile`
//! protocol (`subfile,,start,A,end,B,,:/proc/self/fd/N`), so only the
//! container and codec (found by probing, never by Content-Type) decide how
//! the bytes are read. Demuxers and protocols are whitelisted, which keeps
//! playlist formats (HLS, concat) from opening other files.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Instant;

use ffmpeg::{Dictionary, codec, format, media};
use ffmpeg_next as ffmpeg;

use crate::PreprocessError;

/// Demuxers accepted: the MP4/MOV family and Matroska/WebM.
const FORMATS: &str = "mov,matroska";
const PROTOCOLS: &str = "subfile,file";

/// Where the encoded video is: a byte range of an open file (the input
/// region memfd, or a memfd made for an inline input).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ByteRange<'a> {
    pub fd: BorrowedFd<'a>,
    pub offset: usize,
    pub len: usize,
}

impl ByteRange<'_> {
    fn url(&self) -> String {
        format!(
            "subfile,,start,{},end,{},,:/proc/self/fd/{}",
            self.offset,
            self.offset + self.len,
            self.fd.as_raw_fd()
        )
    }
}

/// A memfd holding a copy of an inline input (inputs normally arrive in the
/// input region; this keeps `Input::Inline` working for small ones).
pub(crate) fn inline_memfd(data: &[u8]) -> Result<File, PreprocessError> {
    let internal = |e: &dyn std::fmt::Display| PreprocessError::Internal(format!("memfd: {e}"));
    let fd = memfd::MemfdOptions::default()
        .close_on_exec(true)
        .create("mmgate-video")
        .map_err(|e| internal(&e))?;
    let mut file = fd.into_file();
    file.write_all(data).map_err(|e| internal(&e))?;
    Ok(file)
}

/// Everything known about the video before the first packet.
pub(crate) struct Opened {
    pub input: format::context::Input,
    pub stream: usize,
    pub decoder: ffmpeg::decoder::Video,
    /// Seconds per time-base unit of the video stream.
    pub time_base: f64,
    /// Stream start in time-base units (subtracted so the first frame is 0).
    pub start_pts: Option<i64>,
    /// Container duration (seconds), the one checked against `max_duration`.
    pub duration: Option<f64>,
    /// The video stream's own duration, else the container's.
    pub stream_duration: Option<f64>,
    /// Average frame interval in seconds, when the container states a rate.
    pub frame_interval: Option<f64>,
    pub codec: String,
    /// Clockwise rotation for display: 0, 90, 180 or 270.
    pub rotation: u32,
}

/// What the decoder should skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skips {
    pub keyframes_only: bool,
    pub loop_filter: bool,
}

/// `pts - start` in seconds. Both come from the file, so the difference may
/// overflow `i64`: that (or a non-finite result) is no timestamp at all.
pub(crate) fn pts_seconds(pts: i64, start: Option<i64>, time_base: f64) -> Option<f64> {
    let t = pts.checked_sub(start.unwrap_or(0))? as f64 * time_base;
    t.is_finite().then_some(t)
}

fn seconds(v: i64, per_unit: f64) -> Option<f64> {
    (v != ffmpeg::ffi::AV_NOPTS_VALUE && v > 0).then_some(v as f64 * per_unit)
}

/// Probes the container, finds the video stream and opens its decoder
/// (single-threaded: the worker's threads are the unit of parallelism).
/// Opening is aborted once `deadline` passes.
pub(crate) fn open(
    range: ByteRange<'_>,
    deadline: Instant,
    threads: u32,
) -> Result<Opened, PreprocessError> {
    let mut options = Dictionary::new();
    options.set("protocol_whitelist", PROTOCOLS);
    options.set("format_whitelist", FORMATS);
    let input = format::input_with_interrupt_and_dictionary(
        &range.url(),
        move || Instant::now() > deadline,
        options,
    )
    .map_err(|e| match e {
        ffmpeg::Error::Exit => PreprocessError::Deadline { stage: "probe" },
        ffmpeg::Error::InvalidData | ffmpeg::Error::Other { .. } => {
            PreprocessError::VideoContainer {
                reason: format!("{e}"),
            }
        }
        other => PreprocessError::VideoUndecodable {
            reason: format!("reading the container: {other}"),
        },
    })?;
    let Some(stream) = input.streams().best(media::Type::Video) else {
        let kinds: Vec<String> = input
            .streams()
            .map(|s| format!("{:?}", s.parameters().medium()).to_lowercase())
            .collect();
        let streams = if kinds.is_empty() {
            "none".into()
        } else {
            kinds.join(", ")
        };
        return Err(PreprocessError::NoVideoStream { streams });
    };
    let index = stream.index();
    let tb = stream.time_base();
    let time_base = f64::from(tb.numerator()) / f64::from(tb.denominator().max(1));
    let start = stream.start_time();
    let start_pts = (start != ffmpeg::ffi::AV_NOPTS_VALUE).then_some(start);
    let duration = seconds(input.duration(), 1.0 / f64::from(ffmpeg::ffi::AV_TIME_BASE));
    let stream_duration = seconds(stream.duration(), time_base).or(duration);
    let rate = stream.avg_frame_rate();
    let frame_interval = (rate.numerator() > 0 && rate.denominator() > 0)
        .then(|| f64::from(rate.denominator()) / f64::from(rate.numerator()));
    let rotation = stream
        .side_data()
        .find(|sd| sd.kind() == codec::packet::side_data::Type::DisplayMatrix)
        .and_then(|sd| super::frame::rotation_of(sd.data()))
        .unwrap_or(0);
    let params = stream.parameters();
    let codec_id = params.id();
    let mut ctx = codec::Context::from_parameters(params)
        .map_err(|e| PreprocessError::Internal(format!("decoder parameters: {e}")))?;
    let kind = match threads {
        0 | 1 => codec::threading::Type::None,
        _ => codec::threading::Type::Frame,
    };
    ctx.set_threading(codec::threading::Config {
        kind,
        count: threads.max(1) as usize,
        ..Default::default()
    });
    let mut dec = ctx.decoder();
    dec.set_packet_time_base(tb);
    let decoder = dec.video().map_err(|e| match e {
        ffmpeg::Error::DecoderNotFound => PreprocessError::VideoCodec {
            codec: codec_id.name().to_string(),
        },
        other => PreprocessError::VideoUndecodable {
            reason: format!("opening the {} decoder: {other}", codec_id.name()),
        },
    })?;
    Ok(Opened {
        input,
        stream: index,
        decoder,
        time_base,
        start_pts,
        duration,
        stream_duration,
        frame_interval,
        codec: codec_id.name().to_string(),
        rotation,
    })
}

impl Opened {
    /// Applies the decoder skips (they act from the next packet on).
    pub fn set_skips(&mut self, skips: Skips) {
        use codec::discard::Discard;
        if skips.keyframes_only {
            self.decoder.skip_frame(Discard::NonKey);
        }
        if skips.loop_filter {
            self.decoder.skip_loop_filter(Discard::All);
        }
    }

    /// Presentation time in seconds of a frame timestamp, from the stream
    /// start; `None` when the file's values do not make a time.
    pub fn seconds(&self, pts: i64) -> Option<f64> {
        pts_seconds(pts, self.start_pts, self.time_base)
    }

    /// Whether the video stream has a packet shown after `t` seconds, read
    /// on from the current position without decoding (cheap: the packets
    /// of a whole file take milliseconds). `None` once `deadline` passes.
    /// Used to check a stated duration before trusting it, so it errs on
    /// the side of "yes": a video packet without a timestamp, or a read
    /// error other than the end of the input, counts as running past (the
    /// decoding loop then deals with whatever follows).
    pub fn runs_past(&mut self, t: f64, deadline: Instant) -> Option<bool> {
        loop {
            if Instant::now() > deadline {
                return None;
            }
            let mut packet = ffmpeg::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => return Some(false),
                Err(ffmpeg::Error::Exit) => return None,
                Err(_) => return Some(true),
            }
            if packet.stream() != self.stream {
                continue;
            }
            match packet.pts().or(packet.dts()).and_then(|p| self.seconds(p)) {
                Some(shown) if shown <= t => continue,
                _ => return Some(true),
            }
        }
    }

    /// Seeks to the keyframe at or before `t` seconds of presentation time.
    /// On failure the position is back at the start (never somewhere else).
    pub fn seek_before(&mut self, t: f64) -> bool {
        let origin = self.start_pts.map_or(0.0, |p| p as f64 * self.time_base);
        let ts = ((origin + t) * f64::from(ffmpeg::ffi::AV_TIME_BASE)) as i64;
        if self.input.seek(ts, ..ts).is_ok() {
            self.decoder.flush();
            return true;
        }
        let _ = self.input.seek(0, ..);
        self.decoder.flush();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_that_overflow_are_no_timestamp() {
        let tb = 1.0 / 90_000.0;
        assert_eq!(pts_seconds(180_000, Some(90_000), tb), Some(1.0));
        assert_eq!(pts_seconds(45, None, 1.0 / 15.0), Some(3.0));
        assert_eq!(pts_seconds(-10, Some(0), 0.5), Some(-5.0));
        assert_eq!(pts_seconds(i64::MAX, Some(-1), tb), None);
        assert_eq!(pts_seconds(i64::MIN, Some(1), tb), None);
        assert_eq!(pts_seconds(i64::MIN, Some(i64::MAX), tb), None);
        assert_eq!(pts_seconds(1, None, f64::INFINITY), None);
        let huge = pts_seconds(i64::MAX, Some(0), 1.0).unwrap();
        assert!(huge.is_finite() && huge > 9e18);
    }
}
