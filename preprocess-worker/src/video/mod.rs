//! Video: demux and decode with FFmpeg, sample frames by presentation time,
//! and write each sampled frame's tensor straight into a tensor slot,
//! streaming `Frame` messages while decoding continues.
//!
//! Stages, one module each: `source` (open the input-region memfd through
//! FFmpeg's `subfile` protocol, probe the container, pick the video stream,
//! open its decoder), `decode` (the demux/decode loop and its caps),
//! `sampler` (which frames), `frame` (displayed RGB24: pixel format,
//! sample aspect ratio, rotation), `job` (slots, grants and messages).
//!
//! # Sampling semantics
//!
//! - A frame's time `t` is its presentation timestamp in seconds (the
//!   decoder's best-effort timestamp, else its pts) in the stream time base,
//!   minus the stream's start time, so the first frame is at t ≈ 0. Frames
//!   are taken in presentation order; the frame rate is never used, so
//!   variable frame rate needs nothing special.
//! - Only frames with `start ≤ t < end` can be sampled (`end` = the request's
//!   end, else the video stream's duration, else open). A stated duration
//!   is not trusted: where it would end sampling, the packets after it are
//!   read (not decoded), and if the stream runs more than 1 s past it,
//!   sampling goes on from the last frame (seeking back to its keyframe) to
//!   the request's end or the stream's, the real duration held to
//!   `max_duration`; `Count` targets spread over the stated duration end
//!   `truncated`.
//! - `Fps(f)`: targets are `start + k/f`, k = 0, 1, …. A frame is sampled when
//!   `t ≥` the next target; the next target is then the first `start + k/f`
//!   strictly greater than `t`. So no frame is sampled twice and a target
//!   that falls between frames is served by the first frame at or after it:
//!   a 25 fps clip at fps=1 over 10 s gives exactly t = 0, 1, …, 9.
//! - `Count(n)`: the same rule with targets `start + k·(end − start)/n`,
//!   k = 0..n−1; `end` must be known (request or container), else the job
//!   fails with `Unsupported`.
//! - `All`: every decoded frame in range.
//! - Comparisons allow 10⁻⁶ of a target interval, so time-base rounding
//!   (1/90000, 1001/30000) never skips a target.
//! - `keyframes_only`: the decoder skips every non-key frame
//!   (`skip_frame = NonKey`); the rules above then apply to keyframes only,
//!   and `frames_decoded` counts only them.
//! - `start > 0`: the demuxer first seeks to the keyframe before `start`.
//!
//! # Caps and outcome
//!
//! - Container duration over `max_duration` → `TooLarge` before decoding;
//!   frame size over the image limits (the header's, then each sampled
//!   frame's as displayed, before it is converted) → `TooLarge`.
//! - Decoding stops at once when `max_frames` frames were sampled, when
//!   `max_decoded` frames were decoded, at the deadline (`deadline_ms` from
//!   the job's start, which also bounds the wait for a grant), or on
//!   `Cancel`. `truncated` is then true when more frames would have been
//!   sampled. It also stops as soon as nothing more can be sampled (past
//!   `end`, all `Count` targets served), with `truncated = false`.
//! - `complete` is false when a packet or frame was corrupt or failed to
//!   decode, or the stream ended more than max(1 s, 3 frames) before its
//!   stated duration (a cut file). Frames already sent stay valid.
//! - No video stream → `Undecodable` ("no video stream"); no decodable
//!   frame → `Undecodable`; not an MP4/MOV/WebM/Matroska → `Unsupported`;
//!   deadline before the first sample → `Deadline`; a stale slot → `Stale`.
//!
//! # Speed tricks, and the ones left out
//!
//! The decoder runs single-threaded (the worker's threads are the unit of
//! parallelism). `skip_frame = NonRef` is not used: non-reference frames are
//! often exactly the frames targets land on (t = 1.0 in a 25 fps H.264 clip
//! with B-frames), so it moves sampled timestamps. `skip_loop_filter = All`
//! keeps timestamps but moved sampled tensors by 0.5–0.9 mean absolute
//! difference for a 10–15% gain, so it is off (`decode::LOOP_FILTER_SKIP`).
//! Seeking per sample is not done (3.6× slower on long GOPs, STACK.md); only
//! a `start > 0` seeks, once.

mod decode;
mod frame;
mod job;
mod sampler;
mod source;

use std::os::fd::AsFd;
use std::sync::Once;

pub use job::{Control, VideoEnv};
use shm::{FromWorker, Input, InputRegion, JobError, JobErrorKind, VideoJob};

/// Quiets FFmpeg's own logging (errors come back as job errors) once.
fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = ffmpeg_next::init();
        ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Fatal);
    });
}

/// Runs `job` to its end and returns its last message (`VideoDone` or
/// `Failed`); its `Frame`s go out through `env.send` on the way.
pub fn run(env: &VideoEnv<'_>, inputs: &InputRegion, job: &VideoJob) -> FromWorker {
    init();
    let failed = |message: String| FromWorker::Failed {
        job_id: job.job_id,
        error: JobError {
            kind: JobErrorKind::Internal,
            message,
        },
    };
    match &job.input {
        Input::Shared { index, len } => {
            // Bounds check of the slot, through the region's own rules.
            if let Err(e) = inputs.read(*index, *len) {
                return failed(e.to_string());
            }
            let range = source::ByteRange {
                fd: inputs.fd(),
                offset: *index as usize * inputs.slot_bytes(),
                len: *len,
            };
            job::run(env, job, range)
        }
        Input::Inline(bytes) => match source::inline_memfd(bytes) {
            Ok(file) => {
                let range = source::ByteRange {
                    fd: file.as_fd(),
                    offset: 0,
                    len: bytes.len(),
                };
                job::run(env, job, range)
            }
            Err(e) => failed(e.to_string()),
        },
    }
}
