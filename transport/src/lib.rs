//! Convoy's agent-to-agent transport: one QUIC endpoint per agent, mutual TLS against a
//! cluster CA, and length-prefixed framed streams multiplexed on one connection per peer.
//!
//! Layers, bottom up:
//! - [`pki`]: the cluster CA, node and client certificates, identities read from
//!   certificates, and the rustls configurations every TLS user in Convoy shares
//!   (QUIC here, the admin HTTPS API and CLI elsewhere).
//! - [`StreamKind`], [`FramedSend`], [`FramedRecv`]: the wire format of one stream.
//! - [`Endpoint`] and [`Inbound`]: dialing, connection caching with backoff, accepting.
//!
//! Security properties callers may rely on: every byte is encrypted and authenticated
//! (TLS 1.3 inside QUIC, no plaintext fallback, 0-RTT off, no session resumption); every
//! [`InboundStream::peer`] is the node id proven by the peer's certificate; a dialed
//! connection is used only after the server proved it is the node that was dialed; a node
//! the caller marked retired ([`Endpoint::set_retired_peers`]) gets no connection and no
//! stream in either direction.
#![warn(missing_docs, unreachable_pub)]

mod backoff;
mod config;
mod endpoint;
mod error;
pub mod pki;
mod stream;

pub use config::TransportConfig;
pub use endpoint::{Endpoint, Inbound, InboundStream, PeerState, RefusalCounts};
pub use error::TransportError;
pub use stream::{DEFAULT_MAX_FRAME_SIZE, FramedRecv, FramedSend, StreamKind};

/// ALPN protocol id of Convoy's node-to-node QUIC transport. A connection that does not
/// negotiate exactly this protocol fails its handshake.
pub const ALPN: &[u8] = b"convoy/1";

/// QUIC application error codes Convoy puts on closed connections and reset streams, so a
/// peer (or a packet capture) can tell why it was refused.
pub mod codes {
    /// Normal shutdown of an endpoint or connection.
    pub const SHUTDOWN: u32 = 0;
    /// The peer authenticated with a certificate that is not a node's (admin or NBD
    /// client); only nodes may use this transport.
    pub const NOT_A_NODE: u32 = 1;
    /// The first byte of a stream was not a known [`StreamKind`](crate::StreamKind).
    pub const UNKNOWN_STREAM_KIND: u32 = 2;
    /// A frame header announced more bytes than the receiver's maximum frame size.
    pub const FRAME_TOO_LARGE: u32 = 3;
    /// The dialer found the server's certificate names a different node than it dialed.
    pub const WRONG_PEER: u32 = 4;
    /// The sender dropped its stream without finishing it; what arrived is incomplete.
    pub const CANCELLED: u32 = 5;
    /// The receiving agent is not accepting streams (it is shutting down).
    pub const NOT_ACCEPTING: u32 = 6;
    /// The stream broke the framing rules (for example it did not send its kind in time).
    pub const PROTOCOL: u32 = 7;
    /// The peer is a retired node (removed from the cluster); its certificate opens nothing.
    pub const RETIRED: u32 = 8;
}
