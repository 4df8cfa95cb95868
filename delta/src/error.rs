//! The delta crate's error type.

use convoy_store::StoreError;
use convoy_transport::TransportError;

use crate::proto::Refusal;

/// Errors of a delta session. Whatever the error, the destination disk may hold any mix of
/// its old chunks and chunks of the source (each chunk whole as written, but none
/// guaranteed durable); a later session completes the sync, sending only what still
/// differs.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The transport failed: the peer is unreachable, the connection was lost, or the peer
    /// reset a stream (for example because it was killed mid-transfer).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The local disk image failed (I/O error, closed image).
    #[error("local disk: {0}")]
    Store(#[from] StoreError),
    /// The responder refused the session before anything was read or written.
    #[error("node {peer} refused the delta session ({code:?}): {message}", code = refusal.code, message = refusal.message)]
    Refused {
        /// The refusing node.
        peer: u64,
        /// Why.
        refusal: Refusal,
    },
    /// The peer aborted the session and said why (for example its disk failed).
    #[error("node {peer} aborted the delta session: {message}")]
    Remote {
        /// The node that aborted.
        peer: u64,
        /// Its reason.
        message: String,
    },
    /// The peer broke the protocol (malformed or unexpected message, wrong session
    /// binding, totals that do not add up). The session was abandoned.
    #[error("delta protocol error with node {peer}: {detail}")]
    Protocol {
        /// The peer.
        peer: u64,
        /// What was wrong.
        detail: String,
    },
    /// A full copy was asked for but the local destination disk is not entirely zero.
    #[error("disk {disk} is not empty, so a full copy cannot be applied to it; use compare-delta")]
    NotEmpty {
        /// The disk.
        disk: u64,
    },
    /// The peer did not send what the session needs in time (its first frame or all its
    /// data streams).
    #[error("node {peer} did not {what} within {secs:.1} s; it may be overloaded or gone")]
    Timeout {
        /// The peer.
        peer: u64,
        /// What it failed to do.
        what: &'static str,
        /// The timeout, in seconds.
        secs: f64,
    },
    /// A [`DeltaConfig`](crate::DeltaConfig) value is invalid.
    #[error("invalid delta configuration: {0}")]
    Config(String),
    /// A blocking disk task panicked or was cancelled.
    #[error("blocking disk task failed: {0}")]
    Task(String),
    /// The session was stopped because another part of it failed first.
    #[error("delta session cancelled")]
    Cancelled,
}
