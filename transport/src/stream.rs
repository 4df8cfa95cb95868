//! The wire format of one Convoy stream.
//!
//! A stream opened by a dialer starts with one [`StreamKind`] byte. After it, each
//! direction carries frames: a `u32` big-endian length followed by that many bytes. A
//! direction ends cleanly only when its sender calls [`FramedSend::finish`]; a sender that
//! is dropped unfinished resets the stream, so a receiver never mistakes a cut-off transfer
//! for a complete one.

use std::fmt;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use quinn::{ConnectionError, ReadError, ReadExactError, VarInt, WriteError};

use crate::codes;
use crate::error::TransportError;

/// Default largest frame: 64 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 64 * 1024 * 1024;

/// What a stream carries; the dialer sends it as the stream's first byte, and the
/// acceptor routes the stream by it. Several kinds share one connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// openraft AppendEntries (including heartbeats).
    RaftAppend = 1,
    /// openraft Vote.
    RaftVote = 2,
    /// openraft InstallSnapshot / full snapshot transfer.
    RaftSnapshot = 3,
    /// An admin or client request forwarded to another node (usually the leader).
    Forward = 4,
    /// Bulk data: the replication stream of a consistency group.
    Data = 5,
    /// Compare-delta and full-copy sessions (`convoy-delta`).
    Delta = 6,
    /// Mirrored writes: a VM's writes sent to its group's sequencer on another host.
    Mirror = 7,
    /// A QEMU guest's live-migration stream (memory and device state), piped between the
    /// source's and the destination's QEMU.
    QemuMigration = 8,
    /// A QEMU guest's live-migration stream whose receiver acknowledges the bytes it has
    /// handed to the arriving QEMU, so that the sender keeps only a bounded amount in
    /// flight (what is in flight when the guest pauses lengthens the pause).
    QemuMigrationAcked = 9,
}

impl StreamKind {
    /// Every kind, in wire-value order.
    pub const ALL: [StreamKind; 9] = [
        StreamKind::RaftAppend,
        StreamKind::RaftVote,
        StreamKind::RaftSnapshot,
        StreamKind::Forward,
        StreamKind::Data,
        StreamKind::Delta,
        StreamKind::Mirror,
        StreamKind::QemuMigration,
        StreamKind::QemuMigrationAcked,
    ];

    /// The wire value of this kind.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The kind with wire value `byte`, or `None` for an unknown value.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_u8() == byte)
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamKind::RaftAppend => "raft-append",
            StreamKind::RaftVote => "raft-vote",
            StreamKind::RaftSnapshot => "raft-snapshot",
            StreamKind::Forward => "forward",
            StreamKind::Data => "data",
            StreamKind::Delta => "delta",
            StreamKind::Mirror => "mirror",
            StreamKind::QemuMigration => "qemu-migration",
            StreamKind::QemuMigrationAcked => "qemu-migration-acked",
        })
    }
}

/// Maps a connection-level quinn error to ours. A crypto-range close means a TLS failure
/// (typically the peer refused our certificate right after the handshake).
pub(crate) fn connection_error(peer: u64, addr: SocketAddr, e: &ConnectionError) -> TransportError {
    if let ConnectionError::ApplicationClosed(close) = e {
        if close.error_code == VarInt::from_u32(codes::RETIRED) {
            return TransportError::Refused {
                peer,
                reason: format!(
                    "node {peer} says this node is retired (removed from the cluster); stop this agent"
                ),
            };
        }
    }
    let code = match e {
        ConnectionError::TransportError(t) => Some(u64::from(t.code)),
        ConnectionError::ConnectionClosed(c) => Some(u64::from(c.error_code)),
        _ => None,
    };
    if let Some(code) = code.filter(|&c| is_crypto(c)) {
        let mut reason = e.to_string();
        // A verifier that knows the certificate's CA but refuses its holder answers with
        // access_denied; on the node transport that means this node is retired.
        if code == CRYPTO_ERROR_BASE + ALERT_ACCESS_DENIED {
            reason.push_str(
                " (access denied: the peer refuses this node's identity; a node removed from the cluster is refused everywhere)",
            );
        }
        TransportError::Tls { peer, addr, reason }
    } else {
        TransportError::ConnectionLost {
            peer,
            reason: e.to_string(),
        }
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100..=0x1ff.
const CRYPTO_ERROR_BASE: u64 = 0x100;
/// The TLS alert `access_denied` (RFC 8446, 6.2).
const ALERT_ACCESS_DENIED: u64 = 49;

fn is_crypto(code: u64) -> bool {
    (CRYPTO_ERROR_BASE..CRYPTO_ERROR_BASE + 0x100).contains(&code)
}

/// The sending half of a framed stream.
///
/// Dropping it without [`finish`](Self::finish) resets the stream with
/// [`codes::CANCELLED`], so the receiver sees an error rather than a clean end.
pub struct FramedSend {
    stream: quinn::SendStream,
    peer: u64,
    addr: SocketAddr,
    max_frame: usize,
    finished: bool,
}

impl fmt::Debug for FramedSend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FramedSend")
            .field("peer", &self.peer)
            .field("stream", &self.stream.id())
            .finish_non_exhaustive()
    }
}

impl FramedSend {
    pub(crate) fn new(
        stream: quinn::SendStream,
        peer: u64,
        addr: SocketAddr,
        max_frame: usize,
    ) -> Self {
        Self {
            stream,
            peer,
            addr,
            max_frame,
            finished: false,
        }
    }

    /// The node on the other end of this stream (proven by its certificate).
    pub fn peer(&self) -> u64 {
        self.peer
    }

    /// Sends one frame. Returns once the frame is in quinn's send buffer (flow control may
    /// make it wait for the peer to read); not a delivery acknowledgement. Frames arrive in
    /// the order sent. A frame longer than the maximum frame size is refused with
    /// [`TransportError::FrameTooLarge`] before anything is sent.
    pub async fn send_frame(&mut self, payload: &[u8]) -> Result<(), TransportError> {
        let header = self.header(payload.len())?;
        self.write(&header).await?;
        self.write(payload).await
    }

    /// Like [`send_frame`](Self::send_frame) but hands `payload` to quinn without copying.
    pub async fn send_frame_bytes(&mut self, payload: Bytes) -> Result<(), TransportError> {
        let header = self.header(payload.len())?;
        let mut chunks = [Bytes::copy_from_slice(&header), payload];
        self.stream
            .write_all_chunks(&mut chunks)
            .await
            .map_err(|e| self.write_error(e))
    }

    /// Ends this direction cleanly: the receiver's [`FramedRecv::recv_frame`] returns
    /// `None` after the last frame. Buffered frames are still delivered after this returns
    /// as long as the connection lives; it does not wait for acknowledgement.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.stream.finish().map_err(|_| TransportError::Protocol {
            peer: self.peer,
            detail: "stream was already finished or reset".into(),
        })?;
        self.finished = true;
        Ok(())
    }

    /// Writes raw bytes (the stream kind) outside the framing.
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| self.write_error(e))
    }

    /// Resets the stream with `code`; the peer's reads fail with it.
    pub(crate) fn reset(&mut self, code: u32) {
        // Already finished or reset is fine: either way the peer is told.
        let _ = self.stream.reset(VarInt::from_u32(code));
        self.finished = true;
    }

    fn header(&self, len: usize) -> Result<[u8; 4], TransportError> {
        match u32::try_from(len) {
            Ok(n) if len <= self.max_frame => Ok(n.to_be_bytes()),
            _ => Err(TransportError::FrameTooLarge {
                peer: self.peer,
                len: len as u64,
                max: self.max_frame,
            }),
        }
    }

    fn write_error(&self, e: WriteError) -> TransportError {
        match e {
            WriteError::Stopped(code) => TransportError::StreamReset {
                peer: self.peer,
                code: code.into_inner(),
            },
            WriteError::ConnectionLost(e) => connection_error(self.peer, self.addr, &e),
            WriteError::ClosedStream => TransportError::Protocol {
                peer: self.peer,
                detail: "write on a finished or reset stream".into(),
            },
            WriteError::ZeroRttRejected => TransportError::Protocol {
                peer: self.peer,
                detail: "0-RTT rejected (Convoy never sends 0-RTT)".into(),
            },
        }
    }
}

impl Drop for FramedSend {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.stream.reset(VarInt::from_u32(codes::CANCELLED));
        }
    }
}

/// One buffer from a frame's pieces; no copy when there is a single piece.
fn join(mut parts: Vec<Bytes>) -> Bytes {
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut buf = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
            for p in &parts {
                buf.extend_from_slice(p);
            }
            buf.freeze()
        }
    }
}

/// The receiving half of a framed stream.
pub struct FramedRecv {
    stream: quinn::RecvStream,
    peer: u64,
    addr: SocketAddr,
    max_frame: usize,
    /// Set after an error: the stream position is no longer at a frame boundary.
    broken: bool,
    /// The frame being received, kept here so that [`FramedRecv::recv_frame`] is
    /// cancel-safe: a dropped call loses nothing, the next one continues.
    partial: Partial,
}

/// Progress of the frame being received.
#[derive(Default)]
struct Partial {
    header: [u8; 4],
    header_len: usize,
    /// Once the header is complete: the body length, and the pieces of it received so
    /// far as QUIC delivered them (kept apart: joining them is the caller's choice).
    body: Option<Body>,
}

#[derive(Default)]
struct Body {
    len: usize,
    have: usize,
    parts: Vec<Bytes>,
}

impl fmt::Debug for FramedRecv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FramedRecv")
            .field("peer", &self.peer)
            .field("stream", &self.stream.id())
            .finish_non_exhaustive()
    }
}

impl FramedRecv {
    pub(crate) fn new(
        stream: quinn::RecvStream,
        peer: u64,
        addr: SocketAddr,
        max_frame: usize,
    ) -> Self {
        Self {
            stream,
            peer,
            addr,
            max_frame,
            broken: false,
            partial: Partial::default(),
        }
    }

    /// The node on the other end of this stream (proven by its certificate).
    pub fn peer(&self) -> u64 {
        self.peer
    }

    /// Receives the next frame, or `None` once the sender has finished the stream cleanly
    /// after a complete frame.
    ///
    /// A header announcing more than the maximum frame size fails with
    /// [`TransportError::FrameTooLarge`] and stops the stream (the sender sees
    /// [`codes::FRAME_TOO_LARGE`]) without allocating for it. A stream that ends inside a
    /// frame is a [`TransportError::Protocol`] error. After any error, further calls fail.
    ///
    /// Cancel-safe: dropping the future before it completes loses no data, so it can sit in
    /// a `select!` or be polled once with `now_or_never` to take a frame already buffered.
    pub async fn recv_frame(&mut self) -> Result<Option<Bytes>, TransportError> {
        Ok(self.recv_frame_parts().await?.map(join))
    }

    /// Like [`recv_frame`](Self::recv_frame), but returns the frame as the pieces QUIC
    /// delivered, without copying them into one buffer (for large payloads written out
    /// piecewise). The pieces are in order and their lengths add up to the frame's.
    pub async fn recv_frame_parts(&mut self) -> Result<Option<Vec<Bytes>>, TransportError> {
        if self.broken {
            return Err(self.protocol("stream already failed"));
        }
        let result = self.read_frame().await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    async fn read_frame(&mut self) -> Result<Option<Vec<Bytes>>, TransportError> {
        // Every await below is a `read_chunk`, which consumes nothing unless it completes;
        // what it returns is stored in `self.partial` before the next await.
        while self.partial.body.is_none() {
            let got = self.partial.header_len;
            let chunk = match self.stream.read_chunk(4 - got, true).await {
                Ok(Some(chunk)) => chunk.bytes,
                Ok(None) if got == 0 => return Ok(None),
                Ok(None) => return Err(self.protocol("stream ended inside a frame header")),
                Err(e) => return Err(self.read_error(e)),
            };
            self.partial.header[got..got + chunk.len()].copy_from_slice(&chunk);
            self.partial.header_len += chunk.len();
            if self.partial.header_len == 4 {
                let len = u32::from_be_bytes(self.partial.header) as usize;
                if len > self.max_frame {
                    let _ = self.stream.stop(VarInt::from_u32(codes::FRAME_TOO_LARGE));
                    return Err(TransportError::FrameTooLarge {
                        peer: self.peer,
                        len: len as u64,
                        max: self.max_frame,
                    });
                }
                self.partial.body = Some(Body {
                    len,
                    ..Body::default()
                });
            }
        }
        loop {
            let Some((len, have)) = self.partial.body.as_ref().map(|b| (b.len, b.have)) else {
                return Err(self.protocol("frame state lost"));
            };
            if have == len {
                let partial = std::mem::take(&mut self.partial);
                return Ok(Some(partial.body.map(|b| b.parts).unwrap_or_default()));
            }
            let chunk = match self.stream.read_chunk(len - have, true).await {
                Ok(Some(chunk)) => chunk.bytes,
                Ok(None) => {
                    return Err(self.protocol(&format!(
                        "stream ended inside a frame ({have} of {len} bytes received)"
                    )));
                }
                Err(e) => return Err(self.read_error(e)),
            };
            if let Some(body) = &mut self.partial.body {
                body.have += chunk.len();
                body.parts.push(chunk);
            }
        }
    }

    /// Reads the single kind byte at the start of an accepted stream; `None` if the stream
    /// ended before it.
    pub(crate) async fn read_kind(&mut self) -> Result<Option<u8>, TransportError> {
        let mut byte = [0u8; 1];
        match self.stream.read_exact(&mut byte).await {
            Ok(()) => Ok(Some(byte[0])),
            Err(ReadExactError::FinishedEarly(_)) => Ok(None),
            Err(ReadExactError::ReadError(e)) => Err(self.read_error(e)),
        }
    }

    /// Asks the peer to stop sending, with `code`.
    pub(crate) fn stop(&mut self, code: u32) {
        let _ = self.stream.stop(VarInt::from_u32(code));
        self.broken = true;
    }

    fn protocol(&self, detail: &str) -> TransportError {
        TransportError::Protocol {
            peer: self.peer,
            detail: detail.to_string(),
        }
    }

    fn read_error(&self, e: ReadError) -> TransportError {
        match e {
            ReadError::Reset(code) => TransportError::StreamReset {
                peer: self.peer,
                code: code.into_inner(),
            },
            ReadError::ConnectionLost(e) => connection_error(self.peer, self.addr, &e),
            ReadError::ClosedStream => self.protocol("read on a stopped stream"),
            ReadError::ZeroRttRejected => {
                self.protocol("0-RTT rejected (Convoy never sends 0-RTT)")
            }
            ReadError::IllegalOrderedRead => self.protocol("ordered read after an unordered one"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_is_none() {
        for kind in StreamKind::ALL {
            assert_eq!(StreamKind::from_u8(kind.as_u8()), Some(kind));
        }
        assert_eq!(StreamKind::RaftAppend.as_u8(), 1);
        assert_eq!(StreamKind::Data.as_u8(), 5);
        assert_eq!(StreamKind::Delta.as_u8(), 6);
        assert_eq!(StreamKind::Mirror.as_u8(), 7);
        assert_eq!(StreamKind::QemuMigration.as_u8(), 8);
        assert_eq!(StreamKind::QemuMigrationAcked.as_u8(), 9);
        for b in [0u8, 10, 99, 255] {
            assert_eq!(StreamKind::from_u8(b), None);
        }
    }
}
