//! What a guest may cost the host: a rate limit on the bytes it sends, and the backoff after it
//! was found hostile. One pair per guest channel, whatever carries it (the QGA socket, or
//! libvirt's agent passthrough).

use std::time::Duration;

use tokio::time::Instant;

use super::QgaConfig;

/// Token bucket over the bytes read from one guest channel (it survives reconnects).
#[derive(Debug)]
pub struct Rate {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl Rate {
    /// A bucket of `burst` bytes refilled at `per_sec` bytes per second, full.
    pub fn new(burst: u64, per_sec: u64) -> Self {
        Self {
            capacity: burst as f64,
            per_sec: per_sec as f64,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    /// The bucket of one guest channel with `config`: `config.byte_rate` sustained, bursts up
    /// to twice `config.max_line` plus 1 MiB.
    pub fn for_channel(config: &QgaConfig) -> Self {
        let burst = (config.max_line as u64).saturating_mul(2) + (1 << 20);
        Self::new(burst, config.byte_rate)
    }

    /// Takes `bytes` from the bucket; `false` if that overdraws it (the guest sends more than
    /// it may). An overdrawn bucket stays overdrawn until it refills.
    pub fn take(&mut self, bytes: u64) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_sec;
        self.last = now;
        self.tokens = (self.tokens + refill).min(self.capacity) - bytes as f64;
        self.tokens >= 0.0
    }
}

/// Exponential backoff after a guest was found hostile: no reconnect until it expires.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    /// Until when, and why.
    until: Option<(Instant, String)>,
}

impl Backoff {
    /// Starts at `initial`, doubling up to `max` while the guest stays hostile.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
            until: None,
        }
    }

    /// The backoff of one guest channel with `config`: from `config.hostile_backoff`,
    /// doubling up to 64 times that.
    pub fn for_channel(config: &QgaConfig) -> Self {
        Self::new(config.hostile_backoff, config.hostile_backoff * 64)
    }

    /// Records a hostile episode with its (safe) reason; returns how long reconnecting waits.
    pub fn hostile(&mut self, reason: String) -> Duration {
        let wait = self.next;
        self.until = Some((Instant::now() + wait, reason));
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// The reason and remaining wait while backing off, else `None`.
    pub fn active(&self) -> Option<(&str, Duration)> {
        let (until, reason) = self.until.as_ref()?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some((reason.as_str(), left))
    }

    /// A call succeeded: the next hostile episode starts again at the initial backoff.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_refills_over_time() {
        let mut r = Rate::new(1000, 100);
        assert!(r.take(900));
        assert!(!r.take(200));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(r.take(50));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_and_expires() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(3));
        assert_eq!(b.hostile("x".into()), Duration::from_secs(1));
        assert_eq!(b.active().map(|a| a.0), Some("x"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.active().is_none());
        assert_eq!(b.hostile("y".into()), Duration::from_secs(2));
        assert_eq!(b.hostile("y".into()), Duration::from_secs(3));
        b.reset();
        assert_eq!(b.hostile("z".into()), Duration::from_secs(1));
    }
}
