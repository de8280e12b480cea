//! A lock-free token bucket with continuous refill (Envoy's timer-less bucket): it holds at
//! most `max_tokens`, gains `tokens_per_fill` per `fill_interval`, and starts full.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use nodemesh_config::filters::ratelimit::TokenBucket;

/// The bucket's state is one number: the instant (ns since `origin`) at which it was
/// empty, given refills since. Tokens at `now` = min(max, (now - empty_at) / ns_per_token).
#[derive(Debug)]
pub struct Bucket {
    origin: Instant,
    max_tokens: f64,
    ns_per_token: f64,
    empty_at: AtomicU64,
}

impl Bucket {
    pub fn new(config: &TokenBucket) -> Self {
        let per_fill = f64::from(config.tokens_per_fill.max(1));
        let ns_per_token = config.fill_interval.as_nanos() as f64 / per_fill;
        let max_tokens = f64::from(config.max_tokens);
        // `origin` lies far enough in the past that a full bucket needs no negative time.
        let full_after = (max_tokens * ns_per_token) as u64;
        let origin = Instant::now()
            .checked_sub(std::time::Duration::from_nanos(full_after))
            .unwrap_or_else(Instant::now);
        Self {
            origin,
            max_tokens,
            ns_per_token: ns_per_token.max(1.0),
            empty_at: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn tokens_at(&self, now: u64, empty_at: u64) -> f64 {
        (now.saturating_sub(empty_at) as f64 / self.ns_per_token).min(self.max_tokens)
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        let now = self.now_ns();
        self.empty_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |empty_at| {
                let tokens = self.tokens_at(now, empty_at);
                (tokens >= 1.0).then(|| now - ((tokens - 1.0) * self.ns_per_token) as u64)
            })
            .is_ok()
    }

    /// Whole tokens left now (for `x-ratelimit-remaining`).
    pub fn remaining(&self) -> u64 {
        self.tokens_at(self.now_ns(), self.empty_at.load(Ordering::Acquire)) as u64
    }

    pub fn max_tokens(&self) -> u64 {
        self.max_tokens as u64
    }

    /// Seconds until the bucket is full again (`x-ratelimit-reset`).
    pub fn reset_secs(&self) -> u64 {
        let missing =
            self.max_tokens - self.tokens_at(self.now_ns(), self.empty_at.load(Ordering::Acquire));
        (missing * self.ns_per_token / 1e9).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn starts_full_and_refills_continuously() {
        let b = Bucket::new(&TokenBucket {
            max_tokens: 3,
            tokens_per_fill: 1,
            fill_interval: Duration::from_millis(100),
        });
        assert!(b.try_take() && b.try_take() && b.try_take());
        assert!(!b.try_take(), "the fourth token is not there yet");
        std::thread::sleep(Duration::from_millis(120));
        assert!(b.try_take(), "one token refilled after one interval");
        assert!(!b.try_take());
    }

    #[test]
    fn never_holds_more_than_max() {
        let b = Bucket::new(&TokenBucket {
            max_tokens: 2,
            tokens_per_fill: 10,
            fill_interval: Duration::from_millis(50),
        });
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.remaining(), 2);
        assert!(b.try_take() && b.try_take() && !b.try_take());
    }
}
