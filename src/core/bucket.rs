//! A token bucket, so that topping up a large pool (after a restart, say) spreads its launches
//! out instead of tripping the provider's API throttling. Pure: time comes in.

/// `capacity` launches at once, refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    pub fn new(capacity: u32, per_second: f64, now_ms: u64) -> Self {
        let capacity = f64::from(capacity.max(1));
        Self {
            capacity,
            per_second: per_second.max(0.001),
            tokens: capacity,
            last_ms: now_ms,
        }
    }

    /// Takes a token now, or says how many milliseconds to wait for one.
    pub fn take(&mut self, now_ms: u64) -> Result<(), u64> {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.last_ms = self.last_ms.max(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - self.tokens) / self.per_second) * 1000.0).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = TokenBucket::new(3, 2.0, 0);
        assert_eq!(b.take(0), Ok(()));
        assert_eq!(b.take(0), Ok(()));
        assert_eq!(b.take(0), Ok(()));
        assert_eq!(b.take(0), Err(500));
        assert_eq!(b.take(250), Err(250));
        assert_eq!(b.take(500), Ok(()));
        // Refill never exceeds the capacity.
        assert_eq!(b.take(60_000), Ok(()));
        assert_eq!(b.take(60_000), Ok(()));
        assert_eq!(b.take(60_000), Ok(()));
        assert!(b.take(60_000).is_err());
    }
}
