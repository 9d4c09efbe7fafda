//! Degradation before rejection. The queue delay is how long the oldest
//! queued `critical` or `standard` image has waited for a preprocess worker:
//! what those classes feel now. Over `scheduling`'s thresholds, in order:
//! new `batch` requests are shed (503 `load_shed`); `standard` videos are
//! sampled at half the rate, then from keyframes only, and their answer
//! says so in `degraded`. `critical` is never degraded.

use std::time::Duration;

use config::{Class, Scheduling};
use serde::Serialize;
use shm::{SampleMode, Sampling};

use crate::error::{ApiError, Code};

/// The queue delay that degrades work: that of `critical` and `standard`.
pub const WATCHED: [Class; 2] = [Class::Critical, Class::Standard];

fn over(threshold_ms: u64, delay: Duration) -> bool {
    threshold_ms > 0 && delay > Duration::from_millis(threshold_ms)
}

/// 503 `load_shed` for a `batch` request while the queue delay is over
/// `shed_batch_after_ms`.
pub fn shed(s: &Scheduling, class: Class, delay: Duration) -> Result<(), ApiError> {
    if class == Class::Batch && over(s.shed_batch_after_ms, delay) {
        return Err(ApiError::new(
            Code::LoadShed,
            format!(
                "batch work is shed while the queue delay ({} ms) is over scheduling.shed_batch_after_ms = {} ms; retry later",
                delay.as_millis(),
                s.shed_batch_after_ms
            ),
        ));
    }
    Ok(())
}

/// What a degraded answer reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Degraded {
    /// Always `queue_delay` for now.
    pub reason: &'static str,
    pub queue_delay_ms: u64,
    pub sampling: Reduced,
    pub requested: SamplingSummary,
    pub used: SamplingSummary,
}

/// How a video's sampling was reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reduced {
    /// Half the rate and half the frame cap.
    Sparse,
    /// Sparse, and from keyframes only.
    KeyframesOnly,
}

impl Reduced {
    /// The `action` label of `mmgate_degraded_total`.
    pub fn action(self) -> &'static str {
        match self {
            Reduced::Sparse => "sparse_video",
            Reduced::KeyframesOnly => "keyframes_video",
        }
    }
}

/// The parts of a video's sampling that degradation changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplingSummary {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<u32>,
    pub max_frames: u32,
    pub keyframes_only: bool,
}

impl SamplingSummary {
    fn of(s: &Sampling) -> Self {
        let (fps, frames) = match s.mode {
            SampleMode::Fps(f) => (Some(f), None),
            SampleMode::Count(n) => (None, Some(n)),
            SampleMode::All => (None, None),
        };
        Self {
            fps,
            frames,
            max_frames: s.max_frames,
            keyframes_only: s.keyframes_only,
        }
    }
}

/// Samples a `standard` video more sparsely while the queue delay is over
/// the thresholds: half the rate and half the frame cap, then keyframes
/// only as well. Returns what was reduced, if anything.
pub fn video(
    s: &Scheduling,
    class: Class,
    delay: Duration,
    sampling: &mut Sampling,
) -> Option<Degraded> {
    let keyframes = over(s.keyframes_video_after_ms, delay);
    if class != Class::Standard || !(keyframes || over(s.sparse_video_after_ms, delay)) {
        return None;
    }
    let requested = SamplingSummary::of(sampling);
    sampling.mode = match sampling.mode {
        SampleMode::Fps(f) => SampleMode::Fps(f / 2.0),
        SampleMode::Count(n) => SampleMode::Count(n.div_ceil(2)),
        SampleMode::All => SampleMode::All,
    };
    sampling.max_frames = sampling.max_frames.div_ceil(2);
    sampling.keyframes_only |= keyframes;
    Some(Degraded {
        reason: "queue_delay",
        queue_delay_ms: delay.as_millis() as u64,
        sampling: if keyframes {
            Reduced::KeyframesOnly
        } else {
            Reduced::Sparse
        },
        requested,
        used: SamplingSummary::of(sampling),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(mode: SampleMode) -> Sampling {
        let v = config::VideoLimits::default();
        let (mut s, _) = crate::video::sampling_from_query(&Default::default(), &v, 0).unwrap();
        s.mode = mode;
        s
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn batch_is_shed_over_its_threshold_only() {
        let s = Scheduling::default();
        assert!(shed(&s, Class::Batch, MS(s.shed_batch_after_ms)).is_ok());
        let e = shed(&s, Class::Batch, MS(s.shed_batch_after_ms + 1)).unwrap_err();
        assert_eq!(e.code, Code::LoadShed);
        for class in [Class::Critical, Class::Standard] {
            assert!(shed(&s, class, MS(60_000)).is_ok());
        }
        let off = Scheduling {
            shed_batch_after_ms: 0,
            ..s
        };
        assert!(shed(&off, Class::Batch, MS(60_000)).is_ok());
    }

    #[test]
    fn standard_videos_get_sparser_then_keyframes_only() {
        let s = Scheduling::default();
        let mut calm = sampling(SampleMode::Fps(2.0));
        assert_eq!(video(&s, Class::Standard, MS(10), &mut calm), None);
        assert_eq!(calm, sampling(SampleMode::Fps(2.0)));

        let mut sparse = sampling(SampleMode::Fps(2.0));
        let d = video(
            &s,
            Class::Standard,
            MS(s.sparse_video_after_ms + 1),
            &mut sparse,
        )
        .unwrap();
        assert_eq!(
            (d.sampling, d.used.fps, d.requested.fps),
            (Reduced::Sparse, Some(1.0), Some(2.0))
        );
        assert_eq!(sparse.max_frames, calm.max_frames / 2);
        assert!(!sparse.keyframes_only);

        let mut key = sampling(SampleMode::Count(9));
        let late = MS(s.keyframes_video_after_ms + 1);
        let d = video(&s, Class::Standard, late, &mut key).unwrap();
        assert_eq!(
            (d.sampling, d.used.frames),
            (Reduced::KeyframesOnly, Some(5))
        );
        assert!(key.keyframes_only && d.used.keyframes_only && !d.requested.keyframes_only);

        for class in [Class::Critical, Class::Batch] {
            let mut s2 = sampling(SampleMode::Fps(2.0));
            assert_eq!(video(&s, class, late, &mut s2), None, "{class}");
        }
    }
}
