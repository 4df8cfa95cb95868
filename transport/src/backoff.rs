//! Per-peer dial health: exponential redial backoff and the last outcome, free of I/O and
//! of the clock (callers pass `now`), so it is tested without sockets or sleeps.

use std::time::{Duration, Instant};

/// Dial health of one peer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Health {
    /// Dial failures since the last success.
    failures: u32,
    /// The delay applied after the most recent failure.
    delay: Duration,
    /// Dialing is suppressed until this instant.
    retry_at: Option<Instant>,
    /// The last time a dial or request succeeded.
    pub(crate) last_ok: Option<Instant>,
    /// The last error seen (kept after a later success, for status output).
    pub(crate) last_error: Option<String>,
}

impl Health {
    /// If a dial is suppressed at `now`, the instant it becomes allowed again.
    pub(crate) fn blocked_until(&self, now: Instant) -> Option<Instant> {
        self.retry_at.filter(|at| *at > now)
    }

    /// A dial failed at `now`: the first failure waits `initial`, each further one twice
    /// the previous delay, never more than `max`.
    pub(crate) fn dial_failed(
        &mut self,
        now: Instant,
        error: String,
        initial: Duration,
        max: Duration,
    ) {
        self.delay = if self.failures == 0 {
            initial
        } else {
            self.delay.saturating_mul(2).min(max)
        };
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + self.delay);
        self.last_error = Some(error);
    }

    /// A dial or request succeeded at `now`: backoff ends.
    pub(crate) fn succeeded(&mut self, now: Instant) {
        self.failures = 0;
        self.delay = Duration::ZERO;
        self.retry_at = None;
        self.last_ok = Some(now);
    }

    /// A request failed for a reason that says nothing about dialing (the connection
    /// broke, a stream was reset): remember it, without backoff.
    pub(crate) fn failed(&mut self, error: String) {
        self.last_error = Some(error);
    }

    /// The peer's address changed: earlier failures say nothing about the new address.
    pub(crate) fn address_changed(&mut self) {
        self.failures = 0;
        self.delay = Duration::ZERO;
        self.retry_at = None;
    }

    /// Dial failures since the last success.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INITIAL: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(1);

    #[test]
    fn delay_doubles_from_initial_to_cap() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(h.blocked_until(t0), None);
        let mut delays = Vec::new();
        for _ in 0..8 {
            h.dial_failed(t0, "x".into(), INITIAL, MAX);
            delays.push(h.blocked_until(t0).unwrap() - t0);
        }
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(h.failures(), 8);
    }

    #[test]
    fn backoff_expires_and_success_resets_it() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.dial_failed(t0, "refused".into(), INITIAL, MAX);
        h.dial_failed(t0, "refused".into(), INITIAL, MAX);
        assert!(h.blocked_until(t0 + Duration::from_millis(99)).is_some());
        assert!(h.blocked_until(t0 + Duration::from_millis(100)).is_none());
        h.succeeded(t0);
        assert_eq!(h.blocked_until(t0), None);
        assert_eq!(h.last_ok, Some(t0));
        assert_eq!(h.last_error.as_deref(), Some("refused"));
        // After a success the next failure starts again from the initial delay.
        h.dial_failed(t0, "again".into(), INITIAL, MAX);
        assert_eq!(h.blocked_until(t0).unwrap() - t0, INITIAL);
    }

    #[test]
    fn request_failures_do_not_back_off() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.failed("stream reset".into());
        assert_eq!(h.blocked_until(t0), None);
        assert_eq!(h.last_error.as_deref(), Some("stream reset"));
    }

    #[test]
    fn address_change_clears_backoff() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.dial_failed(t0, "x".into(), INITIAL, MAX);
        h.address_changed();
        assert_eq!(h.blocked_until(t0), None);
        assert_eq!(h.failures(), 0);
    }
}
