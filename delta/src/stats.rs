//! Session statistics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// What one side of a session did. Both sides count the same transfer, so after a
/// successful session the two sides' figures agree except `elapsed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Chunks of the disk.
    pub chunks_total: u64,
    /// Hash tree nodes exchanged (the destination's root and every node hash sent in
    /// answers); 0 for a full copy.
    pub chunks_compared: u64,
    /// Bytes of the hash exchange (requests and answers, with frame headers).
    pub hash_bytes: u64,
    /// Chunks transferred, zero markers included.
    pub chunks_sent: u64,
    /// Chunks transferred as zero markers (no data; applied with `write_zeroes`).
    pub zero_chunks_sent: u64,
    /// Chunk data bytes transferred.
    pub data_bytes_sent: u64,
    /// Every application byte of the session in both directions: frames, frame headers
    /// and stream-kind bytes (not QUIC, UDP or IP headers).
    pub wire_bytes: u64,
    /// From the start of the session to its end on this side.
    pub elapsed: Duration,
}

/// Live counters of one session, shared by its tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    hash_nodes: AtomicU64,
    hash_bytes: AtomicU64,
    wire_bytes: AtomicU64,
}

impl Counters {
    /// Counts one frame of `len` bytes; `hash_nodes` is `Some` for hash-exchange messages.
    pub(crate) fn frame(&self, len: usize, hash_nodes: Option<u64>) {
        let bytes = 4 + len as u64;
        self.wire_bytes.fetch_add(bytes, Relaxed);
        if let Some(n) = hash_nodes {
            self.hash_bytes.fetch_add(bytes, Relaxed);
            self.hash_nodes.fetch_add(n, Relaxed);
        }
    }

    /// Counts the kind byte of `n` streams.
    pub(crate) fn streams(&self, n: u64) {
        self.wire_bytes.fetch_add(n, Relaxed);
    }

    pub(crate) fn wire_bytes(&self) -> u64 {
        self.wire_bytes.load(Relaxed)
    }

    pub(crate) fn hash_nodes(&self) -> u64 {
        self.hash_nodes.load(Relaxed)
    }

    pub(crate) fn hash_bytes(&self) -> u64 {
        self.hash_bytes.load(Relaxed)
    }
}

/// Totals of a responder across sessions, for status output and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Sessions that completed.
    pub sessions_completed: u64,
    /// Sessions that failed after being accepted.
    pub sessions_failed: u64,
    /// Sessions refused at the handshake.
    pub sessions_refused: u64,
    /// Chunks written to destination disks (zero markers included).
    pub chunks_written: u64,
    /// Chunk data bytes written to destination disks.
    pub bytes_written: u64,
}

#[derive(Debug, Default)]
pub(crate) struct ServerCounters {
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) chunks_written: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
}

impl ServerCounters {
    pub(crate) fn snapshot(&self) -> ServerStats {
        ServerStats {
            sessions_completed: self.completed.load(Relaxed),
            sessions_failed: self.failed.load(Relaxed),
            sessions_refused: self.refused.load(Relaxed),
            chunks_written: self.chunks_written.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
        }
    }
}

/// Live progress of a source's sessions, shared with the caller through
/// [`crate::DeltaConfig::progress`] (for progress bars); several sessions may add to one.
#[derive(Debug, Default)]
pub struct DeltaProgress {
    chunks_sent: AtomicU64,
    data_bytes_sent: AtomicU64,
}

impl DeltaProgress {
    pub(crate) fn sent(&self, chunks: u64, data_bytes: u64) {
        self.chunks_sent.fetch_add(chunks, Relaxed);
        self.data_bytes_sent.fetch_add(data_bytes, Relaxed);
    }

    /// Chunks sent so far, zero markers included.
    pub fn chunks_sent(&self) -> u64 {
        self.chunks_sent.load(Relaxed)
    }

    /// Chunk data bytes sent so far.
    pub fn data_bytes_sent(&self) -> u64 {
        self.data_bytes_sent.load(Relaxed)
    }
}
