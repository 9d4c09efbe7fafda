//! The demux → decode → sample loop. It reads packets of the video stream
//! only, feeds the decoder, offers every decoded frame to the `Sampler`, and
//! hands sampled frames (displayed RGB24) to a `FrameSink`. It stops as soon
//! as nothing more can be sampled or a cap (frames, decoded frames, the
//! deadline) is hit, so a 3-hour video with a 256-frame cap costs 256
//! samples' worth of decoding, not 3 hours'.

use std::time::Instant;

use config::Limits;
use ffmpeg::Packet;
use ffmpeg::util::error::EAGAIN;
use ffmpeg::util::frame::Video as VideoFrame;
use ffmpeg_next as ffmpeg;
use shm::Sampling;

use super::frame::{Converter, check_size};
use super::sampler::{DURATION_SLACK, Sampler};
use super::source::{Opened, Skips};
use crate::PreprocessError;
use crate::pixels::Pixels;

/// Consecutive unreadable packets after which the demuxer is given up on.
const MAX_BAD_PACKETS: u32 = 64;
/// Consecutive decode errors (with no frame in between) before giving up.
const MAX_DECODE_ERRORS: u32 = 256;
/// Minimum spacing of samples, in frame intervals, for which the decoder may
/// skip the loop filter (see the module header of `video`).
const SPARSE_INTERVALS: f64 = 4.0;

/// Where sampled frames go. `Err` stops decoding: `Stop::Deadline` and
/// `Stop::Cancelled` end the job with what was sent so far, `Stop::Fail`
/// fails it.
pub(crate) trait FrameSink {
    fn frame(&mut self, pixels: Pixels, t: f64) -> Result<(), Stop>;
    /// Polled between packets: true stops decoding at once.
    fn cancelled(&mut self) -> bool;
}

#[derive(Debug)]
pub(crate) enum Stop {
    Deadline,
    Cancelled,
    Fail(shm::JobError),
}

/// What the loop saw.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    pub frames_decoded: u32,
    pub frames_sampled: u32,
    /// The whole range was read without a demux or decode error.
    pub complete: bool,
    /// A cap or the deadline stopped sampling early.
    pub truncated: bool,
    /// Displayed size of the last decoded frame.
    pub width: u32,
    pub height: u32,
    /// Why the last packet or frame failed, if one did.
    pub last_error: Option<String>,
    pub deadline_hit: bool,
    pub cancelled: bool,
    /// Presentation time of the last decoded frame.
    pub last_t: Option<f64>,
}

/// Decoder skips for a job: keyframes only when asked; the loop filter off
/// when samples are sparse (≥ 4 frame intervals apart). `skip_frame=NonRef`
/// is never used: it drops the frames some targets land on, which would
/// move sampled timestamps.
pub(crate) fn skips_for(s: &Sampling, span: Option<f64>, frame_interval: Option<f64>) -> Skips {
    let spacing = match s.mode {
        shm::SampleMode::Fps(f) if f > 0.0 => Some(1.0 / f),
        shm::SampleMode::Count(n) if n > 0 => span.map(|d| d / f64::from(n)),
        _ => None,
    };
    let sparse =
        matches!((spacing, frame_interval), (Some(g), Some(fi)) if g >= SPARSE_INTERVALS * fi);
    Skips {
        keyframes_only: s.keyframes_only,
        loop_filter: sparse && !s.keyframes_only && LOOP_FILTER_SKIP,
    }
}

/// Off. Measured (60 s 1080p H.264 at 6 Mbit/s, fps=1, one thread): 9.2 s →
/// 7.7–8.4 s, but sampled tensors move by 0.5–0.9 mean absolute difference
/// (0–255 scale), since the unfiltered pixels feed every later reference of
/// the GOP. Timestamps are unchanged. Kept as a switch for that trade-off.
pub(crate) const LOOP_FILTER_SKIP: bool = false;

struct Loop<'a> {
    src: &'a mut Opened,
    sampler: Sampler,
    conv: Converter,
    sink: &'a mut dyn FrameSink,
    s: &'a Sampling,
    limits: &'a Limits,
    deadline: Instant,
    out: Outcome,
    decode_errors: u32,
    damaged: bool,
    /// Width × height of every frame decoded so far.
    decoded_pixels: u64,
}

/// Why the loop ended early (`None` from `step` = keep going).
enum End {
    /// Nothing left to sample in the requested range.
    Done,
    /// The stream ended (or could not be read further).
    Eof,
    /// A cap or the deadline: truncated when more could have been sampled.
    Cap,
    Fail(PreprocessError),
    Sink(shm::JobError),
}

/// Runs the loop over an opened video.
pub(crate) fn run(
    src: &mut Opened,
    sampler: Sampler,
    s: &Sampling,
    limits: &Limits,
    deadline: Instant,
    sink: &mut dyn FrameSink,
) -> Result<Outcome, RunError> {
    let conv = Converter::new(src.rotation);
    let mut l = Loop {
        src,
        sampler,
        conv,
        sink,
        s,
        limits,
        deadline,
        out: Outcome::default(),
        decode_errors: 0,
        damaged: false,
        decoded_pixels: 0,
    };
    let end = l.demux();
    l.finish(end)
}

/// A failure of the whole job, after `frames_sent` frames went out.
#[derive(Debug)]
pub(crate) enum RunError {
    Preprocess(PreprocessError),
    Job(shm::JobError),
}

impl Loop<'_> {
    fn demux(&mut self) -> End {
        let mut bad_packets = 0;
        let video = self.src.stream;
        loop {
            if Instant::now() > self.deadline {
                self.out.deadline_hit = true;
                return End::Cap;
            }
            if self.sink.cancelled() {
                self.out.cancelled = true;
                return End::Cap;
            }
            let mut packet = Packet::empty();
            match packet.read(&mut self.src.input) {
                Ok(()) => bad_packets = 0,
                Err(ffmpeg::Error::Eof) => break,
                Err(ffmpeg::Error::Exit) => {
                    self.out.deadline_hit = true;
                    return End::Cap;
                }
                Err(e @ ffmpeg::Error::InvalidData) => {
                    self.note(e);
                    bad_packets += 1;
                    if bad_packets >= MAX_BAD_PACKETS {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    self.note(e);
                    break;
                }
            }
            if packet.stream() != video {
                continue;
            }
            if packet.is_corrupt() {
                self.damaged = true;
            }
            if let Err(e) = self.src.decoder.send_packet(&packet) {
                self.decode_error(e);
                if self.decode_errors >= MAX_DECODE_ERRORS {
                    break;
                }
            }
            if let Some(end) = self.drain() {
                return end;
            }
        }
        let _ = self.src.decoder.send_eof();
        self.drain().unwrap_or(End::Eof)
    }

    fn note(&mut self, e: ffmpeg::Error) {
        self.damaged = true;
        self.out.last_error = Some(e.to_string());
    }

    fn decode_error(&mut self, e: ffmpeg::Error) {
        self.note(e);
        self.decode_errors += 1;
    }

    /// Takes every frame the decoder has ready.
    fn drain(&mut self) -> Option<End> {
        let mut frame = VideoFrame::empty();
        loop {
            match self.src.decoder.receive_frame(&mut frame) {
                Ok(()) => {
                    self.decode_errors = 0;
                    if let Some(end) = self.on_frame(&frame) {
                        return Some(end);
                    }
                }
                Err(ffmpeg::Error::Eof) => return None,
                Err(ffmpeg::Error::Other { errno }) if errno == EAGAIN => return None,
                Err(e) => {
                    self.decode_error(e);
                    return (self.decode_errors >= MAX_DECODE_ERRORS).then_some(End::Eof);
                }
            }
        }
    }

    fn on_frame(&mut self, frame: &VideoFrame) -> Option<End> {
        self.out.frames_decoded += 1;
        self.decoded_pixels = self
            .decoded_pixels
            .saturating_add(u64::from(frame.width()) * u64::from(frame.height()));
        if frame.is_corrupt() {
            self.damaged = true;
        }
        let t = match frame
            .timestamp()
            .or(frame.pts())
            .and_then(|p| self.src.seconds(p))
        {
            Some(t) => t,
            // No timestamp: one frame interval after the previous frame.
            None => self
                .out
                .last_t
                .map_or(0.0, |t| t + self.src.frame_interval.unwrap_or(0.04)),
        };
        self.out.last_t = Some(t);
        let sar = frame.aspect_ratio();
        let (w, h) = self.conv.display_size(
            frame.width(),
            frame.height(),
            (sar.numerator(), sar.denominator()),
        );
        (self.out.width, self.out.height) = (w, h);
        if self.s.max_duration > 0.0 && t > self.s.max_duration {
            // Only a file whose stated duration was untrue gets here.
            return Some(End::Cap);
        }
        if self.sampler.offer(t)
            && let Some(end) = self.sample(frame, t, (w, h))
        {
            return Some(end);
        }
        if self.sampler.finished_after(t) || !self.sampler.more_before(self.src.stream_duration) {
            return self.at_stated_end(t);
        }
        if self.out.frames_decoded >= self.s.max_decoded
            || self.decoded_pixels >= self.s.max_decoded_pixels
        {
            return Some(End::Cap);
        }
        None
    }

    /// Sampling reached the end of its range at a frame shown at `t`. When
    /// that end is the stream's stated duration rather than the request's
    /// end, the packets after it are read to check it: a file that says
    /// 1 s and holds 10 would otherwise have 9 s scored by nobody. If the
    /// stream runs on, sampling goes on from the last frame to the
    /// request's end (the decoder seeks back to its keyframe; frames
    /// already offered are not sampled again), with the real duration held
    /// to `max_duration`; `Count` targets spread over the stated duration
    /// cannot follow, so that answer ends truncated.
    fn at_stated_end(&mut self, t: f64) -> Option<End> {
        let request_end = self.s.end.unwrap_or(f64::INFINITY);
        let stated = self
            .src
            .stream_duration
            .filter(|&d| d + DURATION_SLACK < request_end);
        // The request's own range is done: its end, or every target of a
        // `Count` spread over it.
        let request_done = t >= request_end || (self.s.end.is_some() && self.sampler.done());
        let Some(stated) = stated.filter(|_| !request_done) else {
            return Some(End::Done);
        };
        match self.src.runs_past(stated + DURATION_SLACK, self.deadline) {
            None => {
                self.out.deadline_hit = true;
                Some(End::Cap)
            }
            Some(false) => Some(End::Done),
            Some(true) => {
                tracing::debug!(stated, "the video runs past its stated duration");
                self.src.stream_duration = None;
                if self.s.end.is_none() && self.sampler.spread() {
                    self.out.truncated = true;
                    return Some(End::Done);
                }
                self.sampler.extend_end(request_end);
                self.src.seek_before(self.out.last_t.unwrap_or(0.0));
                None
            }
        }
    }

    /// Converts a frame `w`×`h` as displayed and hands it to the sink.
    fn sample(&mut self, frame: &VideoFrame, t: f64, (w, h): (u32, u32)) -> Option<End> {
        // The header was checked, but the size may change mid-stream and the
        // sample aspect ratio stretches the width up to 16×.
        if let Err(e) = check_size(w, h, self.limits) {
            return Some(End::Fail(e));
        }
        let pixels = match self.conv.convert(frame) {
            Ok(p) => p,
            Err(e) => return Some(End::Fail(e)),
        };
        match self.sink.frame(pixels, t) {
            Ok(()) => self.out.frames_sampled += 1,
            Err(Stop::Deadline) => {
                self.out.deadline_hit = true;
                return Some(End::Cap);
            }
            Err(Stop::Cancelled) => {
                self.out.cancelled = true;
                return Some(End::Cap);
            }
            Err(Stop::Fail(e)) => return Some(End::Sink(e)),
        }
        (self.out.frames_sampled >= self.s.max_frames).then_some(End::Cap)
    }

    fn finish(mut self, end: End) -> Result<Outcome, RunError> {
        let stream_end = self.src.stream_duration;
        match end {
            End::Fail(e) => return Err(RunError::Preprocess(e)),
            End::Sink(e) => return Err(RunError::Job(e)),
            End::Cap => {
                self.out.truncated = self.out.deadline_hit
                    || self.out.cancelled
                    || self.sampler.more_after(stream_end);
                self.out.complete = !self.damaged;
            }
            End::Done => self.out.complete = !self.damaged,
            End::Eof => {
                self.out.complete = !self.damaged && !self.ended_early(stream_end);
            }
        }
        if self.out.frames_sampled == 0 && !self.out.cancelled {
            if self.out.deadline_hit {
                return Err(RunError::Preprocess(PreprocessError::Deadline {
                    stage: "video decode",
                }));
            }
            if self.out.frames_decoded == 0 {
                let reason = self
                    .out
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no frame could be decoded".into());
                return Err(RunError::Preprocess(PreprocessError::VideoUndecodable {
                    reason,
                }));
            }
        }
        Ok(self.out)
    }

    /// Whether the stream stopped well before its stated duration (a cut
    /// file whose index promises more): more than a second or three frame
    /// intervals short. Only meaningful when the loop ran to the end.
    fn ended_early(&self, stream_end: Option<f64>) -> bool {
        let (Some(end), Some(last)) = (stream_end, self.out.last_t) else {
            return self.out.last_t.is_none();
        };
        if self.s.keyframes_only {
            return false;
        }
        let interval = self.src.frame_interval.unwrap_or(0.04);
        let slack = (3.0 * interval).max(1.0);
        let wanted_end = self.s.end.map_or(end, |e| e.min(end));
        last + interval + slack < wanted_end
    }
}
