//! Log filtering for the agent: openraft logs every failed replication RPC (four lines per
//! heartbeat to a dead peer, about 850 KB in 25 s), so its replication call sites are
//! rate-limited; the Raft network says once per interval and peer what fails
//! (`node::raft_net`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::Metadata;
use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing_subscriber::layer::{Context, Filter};

/// Targets whose events are rate-limited.
const QUIETED: [&str; 2] = [
    "openraft::replication",
    "openraft::engine::handler::replication_handler",
];

/// How often each rate-limited call site may log.
pub const RAFT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Lets each call site of openraft's replication log at most once per interval.
pub struct RateLimit {
    every: Duration,
    last: Mutex<HashMap<Identifier, Instant>>,
}

impl RateLimit {
    /// A filter letting each quieted call site log once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(HashMap::new()),
        }
    }

    fn limits(meta: &Metadata<'_>) -> bool {
        meta.is_event() && QUIETED.iter().any(|t| meta.target().starts_with(t))
    }

    /// Whether an event of `meta` may be logged now (and notes it if so).
    pub fn allows(&self, meta: &Metadata<'_>) -> bool {
        if !Self::limits(meta) {
            return true;
        }
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get(&meta.callsite()) {
            Some(t) if now.duration_since(*t) < self.every => false,
            _ => {
                last.insert(meta.callsite(), now);
                true
            }
        }
    }
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        self.allows(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::limits(meta) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

/// Whether to log a failure of a call that keeps failing: the first one, then one per
/// `every` (with how many were not logged in between). Reset by a success.
#[derive(Debug, Default)]
pub struct FailureLog {
    last: Option<Instant>,
    /// Failures not logged since the last one that was.
    pub suppressed: u64,
    /// Whether the last call failed.
    pub failing: bool,
}

impl FailureLog {
    /// A failure: `Some(suppressed since the last logged one)` if this one is to be logged.
    pub fn failed(&mut self, every: Duration) -> Option<u64> {
        self.failing = true;
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// A success: whether it ends a run of failures (worth saying once).
    pub fn succeeded(&mut self) -> bool {
        let was = self.failing;
        *self = Self::default();
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_logged_once_per_interval_with_the_count_between() {
        let mut f = FailureLog::default();
        let every = Duration::from_millis(200);
        assert_eq!(f.failed(every), Some(0));
        assert_eq!(f.failed(every), None);
        assert_eq!(f.failed(every), None);
        std::thread::sleep(every);
        assert_eq!(f.failed(every), Some(2));
        assert!(f.succeeded());
        assert!(!f.succeeded());
        assert_eq!(f.failed(every), Some(0));
    }
}
