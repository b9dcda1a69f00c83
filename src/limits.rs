//! Per-store rate limiting: a token bucket shared by every job on one store.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    /// Up to one second of burst, so batching does not starve.
    capacity: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self {
            per_second,
            capacity: per_second,
            state: Mutex::new(Bucket {
                tokens: per_second,
                refilled_at: Instant::now(),
            }),
        }
    }

    pub fn per_second(&self) -> u32 {
        self.per_second as u32
    }

    /// Waits until `n` requests may be sent. Requests larger than the burst are let through
    /// by going into debt, which the following callers pay back.
    pub async fn acquire(&self, n: u32) {
        let wait = {
            let mut bucket = self.state.lock().await;
            let now = Instant::now();
            let elapsed = now.duration_since(bucket.refilled_at).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.capacity);
            bucket.refilled_at = now;
            bucket.tokens -= f64::from(n);
            if bucket.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-bucket.tokens / self.per_second)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_after_the_burst() {
        let limiter = RateLimiter::new(100);
        let start = Instant::now();
        // One second of burst, then 300 more requests at 100/s.
        for _ in 0..40 {
            limiter.acquire(10).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!((2.9..3.2).contains(&elapsed), "took {elapsed}s");
    }

    #[tokio::test(start_paused = true)]
    async fn refills_while_idle_but_not_beyond_the_burst() {
        let limiter = RateLimiter::new(10);
        limiter.acquire(10).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        limiter.acquire(10).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        limiter.acquire(10).await;
        assert!(start.elapsed() >= Duration::from_millis(990));
    }
}
