//! One video job against the gateway's slot protocol: sampled frames go
//! into the slots the job holds, each announced with `FromWorker::Frame` as
//! soon as it is written; with no slot left the job blocks on its control
//! channel for a `Grant` (or a `Cancel`), never past the job's deadline.

use std::time::{Duration, Instant};

use config::{Limits, ModelSpec};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use shm::{
    FromWorker, JobError, JobErrorKind, SharedTensors, ShmError, SlotRef, VideoDone, VideoFrame,
    VideoJob,
};

use super::decode::{self, FrameSink, RunError, Stop};
use super::frame;
use super::sampler::Sampler;
use super::source::{self, ByteRange};
use crate::PreprocessError;
use crate::error::{internal, job_error};
use crate::pixels::Pixels;

/// Messages from the gateway for a running video job (routed by job id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Grant(SlotRef),
    Cancel,
}

/// What a video job needs from the worker.
pub struct VideoEnv<'a> {
    pub tensors: &'a SharedTensors,
    pub model: &'a ModelSpec,
    pub limits: &'a Limits,
    /// Sends a message to the gateway.
    pub send: &'a (dyn Fn(&FromWorker) + Sync),
    pub control: Receiver<Control>,
}

/// The job's slots and its way of filling them.
struct SlotSink<'a> {
    env: &'a VideoEnv<'a>,
    job_id: u64,
    free: Vec<SlotRef>,
    deadline: Instant,
    cancelled: bool,
}

impl SlotSink<'_> {
    fn apply(&mut self, c: Control) {
        match c {
            Control::Grant(slot) => self.free.push(slot),
            Control::Cancel => self.cancelled = true,
        }
    }

    /// A free slot, waiting for a grant if none is held.
    fn slot(&mut self) -> Result<SlotRef, Stop> {
        while let Ok(c) = self.env.control.try_recv() {
            self.apply(c);
        }
        loop {
            if self.cancelled {
                return Err(Stop::Cancelled);
            }
            if let Some(s) = self.free.pop() {
                return Ok(s);
            }
            let wait = self.deadline.saturating_duration_since(Instant::now());
            match self.env.control.recv_timeout(wait) {
                Ok(c) => self.apply(c),
                Err(RecvTimeoutError::Timeout) => return Err(Stop::Deadline),
                // The worker is shutting down: nobody will grant again.
                Err(RecvTimeoutError::Disconnected) => return Err(Stop::Cancelled),
            }
        }
    }
}

impl FrameSink for SlotSink<'_> {
    fn frame(&mut self, pixels: Pixels, t: f64) -> Result<(), Stop> {
        let slot = self.slot()?;
        let (w, h) = (pixels.width, pixels.height);
        let env = self.env;
        let far = Instant::now() + Duration::from_secs(3600);
        let written = match env.model.slot_dtype {
            config::SlotDtype::Float32 => env.tensors.write_f32(slot, |buf| {
                crate::to_tensor(pixels, w, h, env.model, far, buf.into())
            }),
            config::SlotDtype::Uint8 => env.tensors.write_u8(slot, |buf| {
                crate::to_tensor(pixels, w, h, env.model, far, buf.into())
            }),
        };
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Stop::Fail(job_error(&e))),
            Err(e @ ShmError::StaleSlot { .. }) => {
                return Err(Stop::Fail(JobError {
                    kind: JobErrorKind::Stale,
                    message: e.to_string(),
                }));
            }
            Err(e) => return Err(Stop::Fail(internal(e))),
        }
        (env.send)(&FromWorker::Frame(VideoFrame {
            job_id: self.job_id,
            slot,
            t,
        }));
        Ok(())
    }

    fn cancelled(&mut self) -> bool {
        while let Ok(c) = self.env.control.try_recv() {
            self.apply(c);
        }
        self.cancelled
    }
}

/// Runs a video job whose input is `range`; returns its last message
/// (`VideoDone` or `Failed`), after every `Frame` was sent.
pub fn run(env: &VideoEnv<'_>, job: &VideoJob, range: ByteRange<'_>) -> FromWorker {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(job.sampling.deadline_ms);
    let mut sink = SlotSink {
        env,
        job_id: job.job_id,
        free: job.slots.iter().rev().copied().collect(),
        deadline,
        cancelled: false,
    };
    match sample(env, job, range, deadline, &mut sink) {
        Ok(mut done) => {
            done.decode_us = started.elapsed().as_micros() as u64;
            FromWorker::VideoDone(done)
        }
        Err(error) => FromWorker::Failed {
            job_id: job.job_id,
            error,
        },
    }
}

fn sample(
    env: &VideoEnv<'_>,
    job: &VideoJob,
    range: ByteRange<'_>,
    deadline: Instant,
    sink: &mut SlotSink<'_>,
) -> Result<VideoDone, JobError> {
    let s = &job.sampling;
    let mut src =
        source::open(range, deadline, job.sampling.decode_threads).map_err(|e| job_error(&e))?;
    if let Some(d) = src
        .duration
        .filter(|&d| s.max_duration > 0.0 && d > s.max_duration)
    {
        return Err(job_error(&PreprocessError::VideoTooLong {
            duration: d,
            limit: s.max_duration,
        }));
    }
    // The header's size, before any decoding; each frame's displayed size
    // is checked again before it is converted.
    frame::check_size(src.decoder.width(), src.decoder.height(), env.limits)
        .map_err(|e| job_error(&e))?;
    let end = s.end.or(src.stream_duration);
    if let (shm::SampleMode::Count(n), None) = (s.mode, end) {
        return Err(job_error(&PreprocessError::VideoDurationUnknown {
            frames: n,
        }));
    }
    let span = end.map(|e| e - s.start.max(0.0));
    src.set_skips(decode::skips_for(s, span, src.frame_interval));
    if s.start > 0.0 {
        src.seek_before(s.start);
    }
    let sampler = Sampler::new(s.mode, s.start, end);
    let out = match decode::run(&mut src, sampler, s, env.limits, deadline, sink) {
        Ok(out) => out,
        Err(RunError::Preprocess(e)) => return Err(job_error(&e)),
        Err(RunError::Job(e)) => return Err(e),
    };
    Ok(VideoDone {
        job_id: job.job_id,
        frames_decoded: out.frames_decoded,
        frames_sampled: out.frames_sampled,
        // The stated duration, unless the frames ran longer.
        duration: src.duration.unwrap_or(0.0).max(out.last_t.unwrap_or(0.0)),
        complete: out.complete,
        truncated: out.truncated,
        width: out.width,
        height: out.height,
        codec: src.codec.clone(),
        decode_us: 0,
    })
}
