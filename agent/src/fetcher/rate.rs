//! [`RateLimit`]: a token bucket in bytes per second, shared by the background work that holds
//! it. A limited background request is dispatched only once the bucket holds its (coalesced)
//! bytes; until then a timer re-runs the dispatch when the tokens will be there: no busy loop,
//! no blocked thread. Other requests are never limited and take no tokens.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Bucket capacity, in seconds of the rate. A quarter second lets a few requests go out
/// together after a pause (so timers fire a few times a second, not once per request) while the
/// bytes sent in any second stay within 25% of the limit. A request larger than the bucket (an
/// 8 MiB coalesced request under a 16 MiB/s limit) is let through when the bucket is full and
/// leaves it in debt: the burst is then one such request, and the long-run rate still holds.
const BURST_SECONDS: f64 = 0.25;

/// Shortest wait for tokens: tokio's timer resolution, so a wait that rounds to nothing still
/// sleeps instead of spinning through dispatch.
const MIN_TOKEN_WAIT: Duration = Duration::from_millis(1);

/// A token bucket in bytes per second; see the module docs.
#[derive(Debug)]
pub struct RateLimit {
    rate: u64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now; negative after a request larger than the bucket.
    tokens: f64,
    refilled: Instant,
}

impl RateLimit {
    /// A limit of `bytes_per_sec` (0 is taken as 1). The bucket starts full.
    pub fn new(bytes_per_sec: u64) -> Arc<RateLimit> {
        let rate = bytes_per_sec.max(1);
        Arc::new(RateLimit {
            rate,
            bucket: Mutex::new(Bucket {
                tokens: rate as f64 * BURST_SECONDS,
                refilled: Instant::now(),
            }),
        })
    }

    /// The limit in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `bytes` tokens when the bucket holds them (or is full, for a request larger than
    /// the bucket); otherwise says how long until it will.
    pub(super) fn try_take(&self, bytes: u64) -> Result<(), Duration> {
        let rate = self.rate as f64;
        let capacity = rate * BURST_SECONDS;
        let now = Instant::now();
        let mut bucket = lock(&self.bucket);
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.refilled = now;
        let need = (bytes as f64).min(capacity);
        if bucket.tokens >= need {
            bucket.tokens -= bytes as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - bucket.tokens) / rate).max(MIN_TOKEN_WAIT))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_admits_a_request_larger_than_the_bucket_and_charges_it() {
        let limit = RateLimit::new(1000);
        assert_eq!(limit.rate(), 1000);
        // Full bucket: 250 tokens. A 1000-byte request goes, leaving 750 bytes of debt, so the
        // next request waits about a second.
        limit.try_take(1000).unwrap();
        let wait = limit.try_take(100).unwrap_err();
        assert!(
            wait > Duration::from_millis(800) && wait <= Duration::from_millis(860),
            "{wait:?}"
        );
        assert_eq!(RateLimit::new(0).rate(), 1);
    }
}
