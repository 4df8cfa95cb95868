//! The transport's error type.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::pki::{PeerIdentity, PkiError};

/// Errors of the QUIC transport. Every variant about a peer names it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No connection to the peer could be established: the dial failed, timed out, or the
    /// peer is in redial backoff after a recent failure (then the call failed fast without
    /// sending anything). Nothing was delivered. The Raft layer maps this to openraft's
    /// `Unreachable`.
    #[error(
        "node {peer} at {addr} is unreachable: {reason}; check that its agent is running, listens on that address, and that UDP is not blocked"
    )]
    Unreachable {
        /// The node that was dialed.
        peer: u64,
        /// The address that was dialed.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The request did not complete within its timeout. It may or may not have been
    /// delivered and processed. The cached connection was dropped, so the next call redials.
    #[error(
        "request to node {peer} timed out after {after:?}; the node may be overloaded, partitioned or dead"
    )]
    Timeout {
        /// The node the request was sent to.
        peer: u64,
        /// The timeout that expired.
        after: Duration,
    },
    /// The server's certificate proves a different identity than the node that was dialed;
    /// the connection was closed before any stream was opened.
    #[error(
        "dialed node {expected} at {addr} but its certificate says {found}; check the cluster membership addresses"
    )]
    WrongPeer {
        /// The node that was dialed.
        expected: u64,
        /// The address that was dialed.
        addr: SocketAddr,
        /// The identity the server's certificate proves.
        found: PeerIdentity,
    },
    /// A frame is longer than the maximum frame size. When received, the stream was reset
    /// and nothing was allocated for it; when sending, nothing was sent.
    #[error("frame of {len} bytes on a stream with node {peer} exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The peer on the other end of the stream.
        peer: u64,
        /// The frame length announced or attempted.
        len: u64,
        /// The configured maximum.
        max: usize,
    },
    /// The connection to the peer broke (closed by the peer, timed out idle, reset).
    /// The cached connection was dropped, so the next call redials.
    #[error("connection to node {peer} lost: {reason}")]
    ConnectionLost {
        /// The peer of the lost connection.
        peer: u64,
        /// What quinn reported.
        reason: String,
    },
    /// The peer reset or stopped the stream with an application error code (see
    /// [`crate::codes`]).
    #[error("node {peer} reset the stream with code {code}")]
    StreamReset {
        /// The peer that reset the stream.
        peer: u64,
        /// The application error code it gave.
        code: u64,
    },
    /// The peer broke the stream protocol (for example a stream ended inside a frame, or
    /// without the expected response).
    #[error("protocol error on a stream with node {peer}: {detail}")]
    Protocol {
        /// The peer on the other end of the stream.
        peer: u64,
        /// What was wrong.
        detail: String,
    },
    /// The TLS handshake with the peer failed or the peer refused our certificate.
    #[error(
        "TLS with node {peer} at {addr} failed: {reason}; check that both nodes' certificates come from the same cluster CA and are not expired, and that this address belongs to node {peer}"
    )]
    Tls {
        /// The node that was dialed.
        peer: u64,
        /// The address that was dialed.
        addr: SocketAddr,
        /// What rustls or the peer reported.
        reason: String,
    },
    /// The connection was refused by policy: we do not talk to the peer because it is a
    /// retired node (nothing was sent), or the peer closed the connection saying this node
    /// is retired. Retrying does not help; the dialed side backs off.
    #[error("connection with node {peer} refused: {reason}")]
    Refused {
        /// The peer.
        peer: u64,
        /// Why, for people.
        reason: String,
    },
    /// This endpoint has been closed; no further calls can succeed.
    #[error("the local endpoint is closed")]
    Closed,
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}; is another agent using that port?")]
    Bind {
        /// The address that was to be bound.
        addr: SocketAddr,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// The identity given to `Endpoint::bind` is not the local node's.
    #[error(
        "this agent is node {local_node} but its certificate says {found}; point it at its own certificate"
    )]
    IdentityMismatch {
        /// The node id the endpoint was bound as.
        local_node: u64,
        /// The identity the certificate proves.
        found: PeerIdentity,
    },
    /// A [`TransportConfig`](crate::TransportConfig) value is invalid.
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// Building the TLS configuration failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
}
