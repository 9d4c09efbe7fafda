//! Which decoded frames are sampled, decided from presentation timestamps
//! alone (so variable frame rate needs nothing special). Pure arithmetic:
//! the semantics are spelled out in the `video` module header and pinned by
//! the tests below.

use shm::SampleMode;

/// Slack for comparing a timestamp with a target, in units of the target
/// spacing: absorbs the rounding of time bases like 1/90000 or 1001/30000.
const EPS: f64 = 1e-6;

/// Seconds a stream may run past its stated duration and still be sampled.
pub(crate) const DURATION_SLACK: f64 = 1.0;

/// Decides, frame by frame in presentation order, which ones to sample.
#[derive(Debug, Clone)]
pub(crate) struct Sampler {
    start: f64,
    /// Exclusive; `f64::INFINITY` when open.
    end: f64,
    /// Targets per second (`Fps`, `Count`); `None` = every frame (`All`).
    rate: Option<f64>,
    /// Number of targets (`Count`); `None` = unbounded.
    targets: Option<u64>,
    /// Index of the next target.
    next: u64,
    /// The latest time offered within the range: a frame at or before it
    /// is never sampled (again), e.g. when the decoder seeks back.
    seen: f64,
}

impl Sampler {
    /// `end` is the request's end, else the stream duration (`None` when
    /// unknown). `Count` needs one of them; the caller checks that first.
    pub fn new(mode: SampleMode, start: f64, end: Option<f64>) -> Self {
        let start = start.max(0.0);
        let end_f = end.unwrap_or(f64::INFINITY);
        let (rate, targets) = match mode {
            SampleMode::Fps(f) if f > 0.0 && f.is_finite() => (Some(f), None),
            // A rate of 0 (or NaN) samples nothing; the gateway rejects it.
            SampleMode::Fps(_) => (Some(f64::MIN_POSITIVE), Some(0)),
            SampleMode::Count(n) => {
                let span = end_f - start;
                if n == 0 || span.is_nan() || span <= 0.0 || !span.is_finite() {
                    (Some(1.0), Some(0))
                } else {
                    (Some(f64::from(n) / span), Some(u64::from(n)))
                }
            }
            SampleMode::All => (None, None),
        };
        Self {
            start,
            end: end_f,
            rate,
            targets,
            next: 0,
            seen: f64::NEG_INFINITY,
        }
    }

    /// Whether the frame shown at `t` seconds is sampled. Call it for every
    /// decoded frame, in presentation order.
    pub fn offer(&mut self, t: f64) -> bool {
        if self.done() || t < self.start || t >= self.end || !t.is_finite() {
            return false;
        }
        if t <= self.seen {
            return false;
        }
        self.seen = t;
        let Some(rate) = self.rate else {
            return true;
        };
        let x = (t - self.start) * rate;
        if x + EPS < self.next as f64 {
            return false;
        }
        // The first target strictly after t: a frame is never sampled twice
        // and the targets it covered are not carried over to later frames.
        self.next = (x + EPS).floor() as u64 + 1;
        true
    }

    /// True when no frame at or after `t` can be sampled any more: past the
    /// end, or every `Count` target passed. Decoding can stop there.
    pub fn finished_after(&self, t: f64) -> bool {
        self.done() || t >= self.end
    }

    /// Whether another frame could still be sampled after the last one
    /// offered, given that the stream lasts until `stream_end` seconds:
    /// a cap that stops sampling here truncates the answer only then.
    pub fn more_after(&self, stream_end: Option<f64>) -> bool {
        if self.done() {
            return false;
        }
        let limit = self.end.min(stream_end.unwrap_or(f64::INFINITY));
        match self.rate {
            Some(rate) => self.start + self.next as f64 / rate < limit,
            None => true,
        }
    }

    /// Whether a further frame could be sampled in a stream that says it
    /// ends at `stream_end` (trusted to within [`DURATION_SLACK`]): when not,
    /// decoding stops, instead of running to the end (or a cap) for nothing,
    /// as `fps=0.001` once did.
    pub fn more_before(&self, stream_end: Option<f64>) -> bool {
        self.more_after(stream_end.map(|e| e + DURATION_SLACK))
    }

    /// Whether the targets are spread over the range (`Count`): they cannot
    /// follow a range that turns out longer than stated.
    pub fn spread(&self) -> bool {
        self.targets.is_some() && self.rate.is_some()
    }

    /// Sampling goes on to `end` (exclusive; infinite = open): the stream
    /// runs past the end it stated. Not for targets spread over the stated
    /// range.
    pub fn extend_end(&mut self, end: f64) {
        self.end = self.end.max(end);
    }

    /// Every `Count` target was served.
    pub fn done(&self) -> bool {
        self.targets.is_some_and(|n| self.next >= n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(mut s: Sampler, times: impl Iterator<Item = f64>) -> Vec<f64> {
        times.filter(|&t| s.offer(t)).collect()
    }

    fn frames(fps: f64, secs: f64) -> impl Iterator<Item = f64> {
        (0..(fps * secs).round() as u32).map(move |i| f64::from(i) / fps)
    }

    #[test]
    fn fps_one_on_25fps_gives_whole_seconds() {
        let got = sampled(
            Sampler::new(SampleMode::Fps(1.0), 0.0, Some(10.0)),
            frames(25.0, 10.0),
        );
        let want: Vec<f64> = (0..10).map(f64::from).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn fps_above_the_frame_rate_never_samples_a_frame_twice() {
        let got = sampled(
            Sampler::new(SampleMode::Fps(100.0), 0.0, None),
            frames(25.0, 1.0),
        );
        assert_eq!(got.len(), 25);
    }

    #[test]
    fn sparse_frames_take_the_first_frame_at_or_after_each_target() {
        // Frames at 0, 0.7, 1.9, 2.05, 4.5 with fps=1: targets 0,1,2,3,4,…
        let t = [0.0, 0.7, 1.9, 2.05, 4.5];
        let got = sampled(Sampler::new(SampleMode::Fps(1.0), 0.0, None), t.into_iter());
        // 1.9 covers target 1; next target is 2 → 2.05; then 3 → 4.5.
        assert_eq!(got, vec![0.0, 1.9, 2.05, 4.5]);
    }

    #[test]
    fn count_spreads_over_start_to_end() {
        let s = Sampler::new(SampleMode::Count(4), 2.0, Some(10.0));
        let got = sampled(s, frames(25.0, 10.0));
        assert_eq!(got, vec![2.0, 4.0, 6.0, 8.0]);
        let s = Sampler::new(SampleMode::Count(3), 0.0, Some(10.0));
        let got = sampled(s, frames(25.0, 10.0));
        assert_eq!(got, vec![0.0, 3.36, 6.68]);
    }

    #[test]
    fn all_keeps_the_range_only() {
        let s = Sampler::new(SampleMode::All, 1.0, Some(2.0));
        let got = sampled(s, frames(10.0, 3.0));
        assert_eq!(got.len(), 10);
        assert_eq!(got[0], 1.0);
    }

    #[test]
    fn rounding_of_time_bases_does_not_skip_a_target() {
        // 29.97 fps in a 1/90000 time base: frame 30 at 90090/90000 s.
        let t = (0..100).map(|i| f64::from(i * 3003) / 90000.0);
        let got = sampled(
            Sampler::new(SampleMode::Fps(30000.0 / 1001.0), 0.0, None),
            t,
        );
        assert_eq!(got.len(), 100);
    }

    #[test]
    fn no_more_samples_past_the_stated_duration_plus_slack() {
        let mut s = Sampler::new(SampleMode::Fps(0.001), 0.0, None);
        assert!(s.more_before(Some(10.0)));
        assert!(s.offer(0.0));
        assert!(!s.more_before(Some(10.0)), "next target is at 1000 s");
        assert!(s.more_before(None), "an unknown duration never stops it");
        let mut s = Sampler::new(SampleMode::Fps(1.0), 0.0, None);
        assert!(s.offer(9.0));
        assert!(s.more_before(Some(10.0)), "10 s is within the slack");
        assert!(!s.more_before(Some(8.5)));
    }

    #[test]
    fn finish_and_truncation() {
        let mut s = Sampler::new(SampleMode::Count(2), 0.0, Some(4.0));
        assert!(s.offer(0.0) && !s.offer(1.0) && s.offer(2.0));
        assert!(s.finished_after(2.0) && !s.more_after(Some(4.0)));
        let mut s = Sampler::new(SampleMode::Fps(1.0), 0.0, None);
        assert!(s.offer(8.0));
        assert!(!s.more_after(Some(9.0)) && s.more_after(Some(9.5)));
        assert!(!s.finished_after(100.0));
    }
}
