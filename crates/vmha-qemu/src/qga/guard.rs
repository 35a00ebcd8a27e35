//! What a guest may cost the host: a rate limit on the bytes it sends, and the backoff after it
//! was found hostile. One pair per guest channel, whatever carries it (the QGA socket, or
//! libvirt's agent passthrough).

use std::time::Duration;

use tokio::time::Instant;

use super::{QgaConfig, QgaError};

/// A guest channel's [`Rate`] and [`Backoff`], and the one rule that joins them after each
/// call ([`Limits::settle`]), shared by every driver's channel.
#[derive(Debug)]
pub struct Limits {
    /// The byte rate of the guest's replies.
    pub rate: Rate,
    /// The backoff after the guest was found hostile.
    pub backoff: Backoff,
    /// Sustained bytes per second allowed (named in the rate-limit reason).
    byte_rate: u64,
}

impl Limits {
    /// The limits of one guest channel, from `config`.
    pub fn for_channel(config: &QgaConfig) -> Self {
        Limits {
            rate: Rate::for_channel(config),
            backoff: Backoff::for_channel(config),
            byte_rate: config.byte_rate,
        }
    }

    /// Charges the `used` bytes of a finished call to the rate and applies the call's outcome.
    /// Over the rate (and not already backing off): a valid answer is kept but the guest is
    /// backed off from for the next call; an error becomes [`QgaError::Hostile`]. A
    /// `Hostile` error found by the call itself (`retry_in` zero) starts the backoff and gets
    /// its `retry_in`; a success resets the backoff. Returns the reason and the backoff when
    /// this call marked the guest hostile (the caller drops its connection and says so).
    pub fn settle<R>(
        &mut self,
        used: u64,
        result: &mut Result<R, QgaError>,
    ) -> Option<(String, Duration)> {
        if !self.rate.take(used) && self.backoff.active().is_none() {
            let reason = format!(
                "sent more than {} bytes/s on average (rate limit)",
                self.byte_rate
            );
            if result.is_ok() {
                // The answer itself was valid; the next call finds the guest backed off.
                let retry_in = self.backoff.hostile(reason.clone());
                return Some((reason, retry_in));
            }
            *result = Err(QgaError::Hostile {
                reason,
                retry_in: Duration::ZERO,
            });
        }
        match result {
            Ok(_) => {
                self.backoff.reset();
                None
            }
            Err(QgaError::Hostile { reason, retry_in }) if retry_in.is_zero() => {
                *retry_in = self.backoff.hostile(reason.clone());
                Some((reason.clone(), *retry_in))
            }
            Err(_) => None,
        }
    }
}

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
    async fn settle_joins_rate_and_backoff_as_both_drivers_need() {
        let config = QgaConfig {
            byte_rate: 1000,
            max_line: 100,
            hostile_backoff: Duration::from_secs(1),
            ..QgaConfig::default()
        };
        let mut limits = Limits::for_channel(&config);
        let mut ok: Result<(), QgaError> = Ok(());
        assert!(limits.settle(10, &mut ok).is_none());
        // Over the rate with a valid answer: kept, the next call finds the guest backed off.
        // The burst is twice the line cap plus 1 MiB; this overdraws it by a few hundred bytes.
        let marked = limits.settle((1 << 20) + 500, &mut ok);
        assert!(ok.is_ok());
        assert_eq!(marked.map(|m| m.1), Some(Duration::from_secs(1)));
        assert!(limits.backoff.active().is_some());
        // A hostile guest found by the call itself: the backoff starts (doubled now).
        tokio::time::advance(Duration::from_secs(60)).await;
        let mut hostile: Result<(), QgaError> = Err(QgaError::Hostile {
            reason: "endless".into(),
            retry_in: Duration::ZERO,
        });
        let marked = limits.settle(0, &mut hostile);
        assert_eq!(marked, Some(("endless".to_owned(), Duration::from_secs(2))));
        assert!(
            matches!(hostile, Err(QgaError::Hostile { retry_in, .. }) if retry_in == Duration::from_secs(2))
        );
        // Other errors change nothing; a success resets the backoff.
        let mut other: Result<(), QgaError> = Err(QgaError::Disconnected);
        assert!(limits.settle(0, &mut other).is_none());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(limits.settle(0, &mut ok).is_none());
        let mut again: Result<(), QgaError> = Err(QgaError::Hostile {
            reason: "x".into(),
            retry_in: Duration::ZERO,
        });
        assert_eq!(
            limits.settle(0, &mut again).map(|m| m.1),
            Some(Duration::from_secs(1))
        );
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
