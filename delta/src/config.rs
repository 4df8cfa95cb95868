//! Tuning knobs of a delta session.

use std::sync::Arc;
use std::time::Duration;

use crate::error::DeltaError;
use crate::proto::{MAX_DATA_STREAMS, MAX_HASHES_PER_MESSAGE};
use crate::stats::DeltaProgress;

/// Largest data payload a destination accepts in one frame (the transport's default
/// frame limit is 64 MiB; this stays well below it).
pub const MAX_FRAME_PAYLOAD: usize = 32 * 1024 * 1024;

/// Settings of a session. Start from [`DeltaConfig::default`] and change fields; new knobs
/// may be added. Only the initiator's `data_streams`, `frame_bytes`, `hashes_per_request`
/// and `requests_in_flight` matter for a session; `attach_timeout` is the responder's.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeltaConfig {
    /// QUIC streams carrying chunk data in parallel, 1..=16. Default 2: one connection's
    /// packets are built and encrypted on one thread anyway, so more streams add only
    /// multiplexing (1 GiB full copy, 3 runs each: 1 stream 624 MB/s, 2: 610, 4: 585).
    pub data_streams: u16,
    /// Most chunk bytes in one data frame (rounded up to one chunk), at most
    /// [`MAX_FRAME_PAYLOAD`]. Default 2 MiB (32 chunks of 64 KiB).
    pub frame_bytes: usize,
    /// Most node hashes asked for in one request (and so carried by one answer),
    /// 1..=65536. Default 8192 (256 KiB of hashes).
    pub hashes_per_request: u64,
    /// Hash requests the source keeps in flight. Default 8.
    pub requests_in_flight: usize,
    /// How long a responder waits for a session's first frame and for all its data
    /// streams to arrive. Default 10 s.
    pub attach_timeout: Duration,
    /// Where a source counts what it sent as it goes, if anywhere. Default none.
    pub progress: Option<Arc<DeltaProgress>>,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        Self {
            data_streams: 2,
            frame_bytes: 2 * 1024 * 1024,
            hashes_per_request: 8192,
            requests_in_flight: 8,
            attach_timeout: Duration::from_secs(10),
            progress: None,
        }
    }
}

impl DeltaConfig {
    /// Checks the values; every session start calls this.
    pub fn validate(&self) -> Result<(), DeltaError> {
        let bad = |s: &str| Err(DeltaError::Config(s.to_string()));
        if self.data_streams == 0 || self.data_streams > MAX_DATA_STREAMS {
            return bad("data_streams must be between 1 and 16");
        }
        if self.frame_bytes == 0 || self.frame_bytes > MAX_FRAME_PAYLOAD {
            return bad("frame_bytes must be between 1 and 32 MiB");
        }
        if self.hashes_per_request == 0 || self.hashes_per_request > MAX_HASHES_PER_MESSAGE {
            return bad("hashes_per_request must be between 1 and 65536");
        }
        if self.requests_in_flight == 0 {
            return bad("requests_in_flight must be at least 1");
        }
        if self.attach_timeout.is_zero() {
            return bad("attach_timeout must be non-zero");
        }
        Ok(())
    }
}
