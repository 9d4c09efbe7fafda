//! Token buckets for a tenant's `requests_per_s` and `samples_per_s`.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` per second. A
//! request takes its tokens up front when it knows how many it needs; a
//! video, whose sampled frames are known only as it is decoded, needs one
//! token to start and is charged each further frame as it comes, which may
//! leave the bucket owing (below zero) until it has refilled. Tokens taken
//! for work the gateway refused under its own load are given back.
//! Hand-written rather than `governor`: GCRA cannot carry such a debt.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// May be negative: tokens owed by a video charged after the fact.
    tokens: f64,
    at: Instant,
}

/// Why tokens were not taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refused {
    /// Enough tokens will be there after this long.
    RetryAfter(Duration),
    /// More tokens than the bucket ever holds.
    OverBurst,
}

impl TokenBucket {
    /// `(rate per second, burst)`, as `config::Tenant::request_rate` gives.
    pub fn new((rate, burst): (f64, u32)) -> Self {
        Self::starting_at((rate, burst), Instant::now())
    }

    fn starting_at((rate, burst): (f64, u32), now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                at: now,
            }),
        }
    }

    /// Takes `n` tokens if the bucket holds them.
    pub fn take(&self, n: u32) -> Result<(), Refused> {
        self.take_at(n, Instant::now())
    }

    /// Charges `n` tokens, whether or not the bucket holds them.
    pub fn charge(&self, n: u32) {
        self.charge_at(n, Instant::now());
    }

    fn charge_at(&self, n: u32, now: Instant) {
        self.refilled(now).tokens -= f64::from(n);
    }

    /// Gives back `n` tokens taken for work that was not done (never past
    /// the burst).
    pub fn refund(&self, n: u32) {
        let mut s = self.refilled(Instant::now());
        s.tokens = (s.tokens + f64::from(n)).min(self.burst);
    }

    fn take_at(&self, n: u32, now: Instant) -> Result<(), Refused> {
        let n = f64::from(n);
        if n > self.burst {
            return Err(Refused::OverBurst);
        }
        let mut s = self.refilled(now);
        if s.tokens >= n {
            s.tokens -= n;
            return Ok(());
        }
        // Saturates: a vanishing rate must not panic the handler.
        let wait = Duration::try_from_secs_f64((n - s.tokens) / self.rate).unwrap_or(Duration::MAX);
        Err(Refused::RetryAfter(wait))
    }

    fn refilled(&self, now: Instant) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.rate).min(self.burst);
        s.at = s.at.max(now);
        s
    }
}

/// Whole seconds for `Retry-After`, rounded up (at least 1).
pub fn retry_after_secs(d: Duration) -> u32 {
    (d.as_secs_f64().ceil().min(f64::from(u32::MAX)) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let b = TokenBucket::starting_at((2.0, 3), t0);
        for _ in 0..3 {
            assert_eq!(b.take_at(1, t0), Ok(()));
        }
        // Empty: the next token is half a second away.
        assert_eq!(
            b.take_at(1, t0),
            Err(Refused::RetryAfter(Duration::from_millis(500)))
        );
        assert_eq!(b.take_at(1, t0 + Duration::from_millis(500)), Ok(()));
        // Refills to the burst, no further.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take_at(3, later), Ok(()));
        assert!(b.take_at(1, later).is_err());
        assert_eq!(b.take_at(4, later), Err(Refused::OverBurst));
    }

    #[test]
    fn a_charge_past_the_tokens_is_owed() {
        let t0 = Instant::now();
        let b = TokenBucket::starting_at((1.0, 2), t0);
        assert_eq!(b.take_at(1, t0), Ok(()));
        // A video sampled 9 more frames: the bucket owes 8.
        b.charge_at(9, t0);
        assert_eq!(
            b.take_at(1, t0),
            Err(Refused::RetryAfter(Duration::from_secs(9)))
        );
        assert_eq!(b.take_at(1, t0 + Duration::from_secs(9)), Ok(()));
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::MAX), u32::MAX);
        // A vanishing rate saturates instead of panicking.
        let slow = TokenBucket::starting_at((1e-30, 1), t0);
        assert_eq!(slow.take_at(1, t0), Ok(()));
        assert_eq!(slow.take_at(1, t0), Err(Refused::RetryAfter(Duration::MAX)));
        // A refund never fills past the burst.
        slow.refund(5);
        assert_eq!(slow.take_at(1, t0), Ok(()));
        assert!(slow.take_at(1, t0).is_err());
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
