//! The wire messages of a delta session and the pure rules that check them.
//!
//! Nothing here does I/O. Every message is one transport frame encoded with
//! [`convoy_codec::encode`]; a [`Msg::Chunks`] header whose `payload_len` is non-zero is
//! followed by exactly one raw frame holding the chunk bytes (kept out of the codec so the
//! data is never copied or walked byte by byte).
//!
//! Every message carries the session's [`Binding`]; a message whose binding differs from
//! the session's is refused, so a frame replayed into another session (other disk, epoch
//! or session nonce) is never applied.

use std::ops::Range;

use convoy_store::{ChunkHash, Geometry};
use serde::{Deserialize, Serialize};

/// Most data streams a session may use.
pub const MAX_DATA_STREAMS: u16 = 16;
/// Most node hashes one answer (`Nodes` message) may carry (2 MiB of hashes), whatever the
/// requester's configuration.
pub const MAX_HASHES_PER_MESSAGE: u64 = 65_536;
/// Most runs one chunk frame may describe.
pub(crate) const MAX_RUNS_PER_FRAME: usize = 8192;

/// What a session is bound to. Chosen by the initiator (`cg`, `disk`, `epoch` by its
/// caller, `session` at random per session) and carried by every message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Binding {
    /// Consistency group.
    pub cg: u64,
    /// Disk within the group.
    pub disk: u64,
    /// The disk's fencing epoch the initiator acts under.
    pub epoch: u64,
    /// Random per-session nonce: tells two sessions of the same disk and epoch apart.
    pub session: u64,
}

/// Which way data flows, seen from the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Direction {
    /// The initiator is the source; the responder's disk is overwritten.
    Push,
    /// The initiator is the destination; the responder's disk is read.
    Pull,
}

impl Direction {
    /// The role the responder plays.
    pub(crate) fn responder_role(self) -> Role {
        match self {
            Direction::Push => Role::Destination,
            Direction::Pull => Role::Source,
        }
    }
}

/// A side of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Its disk is read and sent.
    Source,
    /// Its disk is overwritten until it equals the source's.
    Destination,
}

/// How the destination is brought up to date.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Compare Merkle hash trees top-down and send only the chunks whose 256-bit hashes
    /// differ. Correct whatever the destination holds.
    CompareDelta,
    /// Skip the comparison and send every non-zero chunk of the source. Only for a
    /// destination that is entirely zero (a brand-new replica); the destination checks
    /// that and refuses otherwise.
    FullCopy,
}

/// The geometry two copies must share to be compared chunk by chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Shape {
    pub(crate) size: u64,
    pub(crate) chunk_size: u32,
    pub(crate) fanout: u32,
}

impl Shape {
    pub(crate) fn of(g: &Geometry) -> Self {
        Self {
            size: g.size(),
            chunk_size: g.chunk_size(),
            fanout: g.fanout(),
        }
    }

    /// Why `remote` cannot be synchronised with `self` (the local disk), or `None`.
    pub(crate) fn mismatch(&self, remote: &Shape, local_role: Role) -> Option<String> {
        let (here, there) = match local_role {
            Role::Source => ("source", "destination"),
            Role::Destination => ("destination", "source"),
        };
        if self.size != remote.size {
            return Some(format!(
                "the {here} disk is {} bytes but the {there} disk is {} bytes; resize or recreate the destination to the source's size",
                self.size, remote.size
            ));
        }
        if self.chunk_size != remote.chunk_size || self.fanout != remote.fanout {
            return Some(format!(
                "the {here} disk uses {}-byte chunks and fan-out {} but the {there} uses {}-byte chunks and fan-out {}; recreate the destination with the source's geometry",
                self.chunk_size, self.fanout, remote.chunk_size, remote.fanout
            ));
        }
        None
    }
}

/// Why a responder refused a session. Sent to the initiator in its `Refused` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// This node expects no session for that consistency group and disk.
    UnknownDisk,
    /// The session names another consistency group than expected.
    WrongCg,
    /// The session names another disk than expected.
    WrongDisk,
    /// The session's epoch is older than the disk's current epoch (a stale sender).
    StaleEpoch,
    /// The session would read a disk this node only accepts writes for, or the reverse.
    WrongRole,
    /// The two disks differ in size or chunk geometry.
    ShapeMismatch,
    /// A full copy was requested but the destination is not entirely zero.
    NotEmpty,
    /// Another session on the same disk is running on this node.
    SessionActive,
    /// The request is malformed (for example too many data streams).
    BadRequest,
    /// The responder's disk failed while it was being checked.
    DiskError,
}

/// A refusal: its code and a message naming the thing and the next step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub code: RefusalCode,
    /// Human-readable reason and next step.
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What a responder expects of a session on one of its disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// The consistency group the session must name.
    pub cg: u64,
    /// The disk the session must name.
    pub disk: u64,
    /// The lowest epoch accepted; an older one is a stale sender and is refused.
    pub min_epoch: u64,
}

impl Expect {
    /// Checks a session's binding against this expectation. Pure.
    pub fn check(&self, binding: &Binding) -> Result<(), Refusal> {
        if binding.cg != self.cg {
            return Err(Refusal::new(
                RefusalCode::WrongCg,
                format!(
                    "session names consistency group {} but disk {} belongs to group {}; check the migration plan",
                    binding.cg, self.disk, self.cg
                ),
            ));
        }
        if binding.disk != self.disk {
            return Err(Refusal::new(
                RefusalCode::WrongDisk,
                format!(
                    "session names disk {} but this node expects disk {}; check the migration plan",
                    binding.disk, self.disk
                ),
            ));
        }
        if binding.epoch < self.min_epoch {
            return Err(Refusal::new(
                RefusalCode::StaleEpoch,
                format!(
                    "session epoch {} of disk {} is stale (current epoch is at least {}); the sender must fetch the current epoch from the cluster",
                    binding.epoch, self.disk, self.min_epoch
                ),
            ));
        }
        Ok(())
    }
}

/// First frame of a session's control stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) binding: Binding,
    pub(crate) direction: Direction,
    pub(crate) mode: Mode,
    pub(crate) shape: Shape,
    pub(crate) data_streams: u16,
}

/// What the destination announces before the source starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum DestState {
    /// Compare-delta: the root of the destination's tree.
    Tree(ChunkHash),
    /// Compare-delta, but the destination's interior nodes are unavailable: it answers
    /// only requests for leaves (children of level-1 nodes).
    LeavesOnly,
    /// Full copy: the destination checked that it is entirely zero.
    Empty,
}

/// A run of consecutive nodes of one tree level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeRange {
    pub(crate) first: u64,
    pub(crate) count: u64,
}

/// A run of consecutive chunks in a data frame: `zero` runs carry no bytes and are applied
/// with `write_zeroes`; data runs take their bytes, in order, from the payload frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Run {
    pub(crate) first: u64,
    pub(crate) count: u32,
    pub(crate) zero: bool,
}

/// Header of one data frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunkHeader {
    pub(crate) binding: Binding,
    pub(crate) stream: u16,
    pub(crate) seq: u64,
    pub(crate) runs: Vec<Run>,
    pub(crate) payload_len: u64,
}

/// What one side counted for the whole transfer; the source announces its totals in
/// [`Msg::Finish`] and the destination must have received exactly that.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Totals {
    pub(crate) frames: u64,
    pub(crate) chunks: u64,
    pub(crate) zero_chunks: u64,
    pub(crate) data_bytes: u64,
}

impl Totals {
    pub(crate) fn add(&mut self, o: &Totals) {
        self.frames += o.frames;
        self.chunks += o.chunks;
        self.zero_chunks += o.zero_chunks;
        self.data_bytes += o.data_bytes;
    }
}

/// A list of 256-bit hashes encoded as one byte string (one `memcpy` instead of 32 serde
/// calls per hash).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct HashList(pub(crate) Vec<ChunkHash>);

impl Serialize for HashList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.as_flattened())
    }
}

impl<'de> Deserialize<'de> for HashList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HashList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string of 32-byte hashes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<HashList, E> {
                if v.len() % 32 != 0 {
                    return Err(E::custom("hash list length is not a multiple of 32"));
                }
                let mut out = Vec::with_capacity(v.len() / 32);
                for c in v.chunks_exact(32) {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(c);
                    out.push(h);
                }
                Ok(HashList(out))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<HashList, E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Every message of the protocol. See the crate documentation for who sends what when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// Initiator → responder, first frame of the control stream.
    Hello(Hello),
    /// Initiator → responder, first frame of each data stream.
    Attach { binding: Binding, stream: u16 },
    /// Responder → initiator: the session is accepted; the responder's geometry.
    Accepted { binding: Binding, shape: Shape },
    /// Responder → initiator: the session is refused; nothing was read or written.
    Refused { binding: Binding, refusal: Refusal },
    /// Destination → source, once, before any request.
    Ready { binding: Binding, state: DestState },
    /// Source → destination: send the hashes of the children of these nodes of `level`.
    Want {
        binding: Binding,
        level: u32,
        nodes: Vec<NodeRange>,
    },
    /// Destination → source: the children's hashes (at `level`), in request order.
    Nodes {
        binding: Binding,
        level: u32,
        hashes: HashList,
    },
    /// Source → destination on a data stream: chunks (raw bytes in the next frame).
    Chunks(ChunkHeader),
    /// Source → destination, last frame of a data stream.
    StreamEnd {
        binding: Binding,
        stream: u16,
        totals: Totals,
    },
    /// Source → destination: everything is sent (all data streams are finished).
    Finish { binding: Binding, totals: Totals },
    /// Destination → source: everything is written and flushed (durable).
    Complete { binding: Binding },
    /// Either side: the session failed; the message says why.
    Abort { binding: Binding, message: String },
}

impl Msg {
    pub(crate) fn binding(&self) -> &Binding {
        match self {
            Msg::Hello(h) => &h.binding,
            Msg::Chunks(h) => &h.binding,
            Msg::Attach { binding, .. }
            | Msg::Accepted { binding, .. }
            | Msg::Refused { binding, .. }
            | Msg::Ready { binding, .. }
            | Msg::Want { binding, .. }
            | Msg::Nodes { binding, .. }
            | Msg::StreamEnd { binding, .. }
            | Msg::Finish { binding, .. }
            | Msg::Complete { binding }
            | Msg::Abort { binding, .. } => binding,
        }
    }

    /// Short name for error messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Msg::Hello(_) => "Hello",
            Msg::Attach { .. } => "Attach",
            Msg::Accepted { .. } => "Accepted",
            Msg::Refused { .. } => "Refused",
            Msg::Ready { .. } => "Ready",
            Msg::Want { .. } => "Want",
            Msg::Nodes { .. } => "Nodes",
            Msg::Chunks(_) => "Chunks",
            Msg::StreamEnd { .. } => "StreamEnd",
            Msg::Finish { .. } => "Finish",
            Msg::Complete { .. } => "Complete",
            Msg::Abort { .. } => "Abort",
        }
    }

    /// Whether the message belongs to the hash exchange (counted in `hash_bytes`), and
    /// how many node hashes it carries.
    pub(crate) fn hash_nodes(&self) -> Option<u64> {
        match self {
            Msg::Ready {
                state: DestState::Tree(_),
                ..
            } => Some(1),
            Msg::Want { .. } => Some(0),
            Msg::Nodes { hashes, .. } => Some(hashes.0.len() as u64),
            _ => None,
        }
    }
}

/// Checks a session request against what the responder expects (`offer`: the expectation
/// and the role the responder agreed to play, `None` if it expects nothing for that disk)
/// and the responder's own disk shape. Pure.
pub(crate) fn check_hello(
    hello: &Hello,
    offer: Option<(&Expect, Role)>,
    local: &Shape,
) -> Result<(), Refusal> {
    let b = &hello.binding;
    let Some((expect, role)) = offer else {
        return Err(Refusal::new(
            RefusalCode::UnknownDisk,
            format!(
                "this node expects no delta session for consistency group {} disk {}; start the migration step that prepares it first",
                b.cg, b.disk
            ),
        ));
    };
    expect.check(b)?;
    let wanted = hello.direction.responder_role();
    if wanted != role {
        return Err(Refusal::new(
            RefusalCode::WrongRole,
            format!(
                "disk {} is prepared here as the {role:?} of a session, but the request needs it as the {wanted:?}",
                b.disk
            ),
        ));
    }
    if hello.data_streams == 0 || hello.data_streams > MAX_DATA_STREAMS {
        return Err(Refusal::new(
            RefusalCode::BadRequest,
            format!(
                "{} data streams requested; use 1 to {MAX_DATA_STREAMS}",
                hello.data_streams
            ),
        ));
    }
    if let Some(why) = local.mismatch(&hello.shape, role) {
        return Err(Refusal::new(RefusalCode::ShapeMismatch, why));
    }
    Ok(())
}

/// The shape of a store hash tree (see `convoy_store::HashTree`): level 0 holds one leaf
/// per chunk, node `i` of level `l + 1` covers nodes `i * fanout .. (i + 1) * fanout` of
/// level `l`, and the top level has one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TreeShape {
    fanout: u64,
    lens: Vec<u64>,
}

impl TreeShape {
    pub(crate) fn new(chunk_count: u64, fanout: u32) -> Self {
        let fanout = u64::from(fanout.max(2));
        let mut lens = vec![chunk_count.max(1)];
        while let Some(&n) = lens.last().filter(|&&n| n > 1) {
            lens.push(n.div_ceil(fanout));
        }
        Self { fanout, lens }
    }

    pub(crate) fn of(g: &Geometry) -> Self {
        Self::new(g.chunk_count(), g.fanout())
    }

    /// Number of levels, leaves included.
    pub(crate) fn height(&self) -> usize {
        self.lens.len()
    }

    /// Nodes at `level` (0 past the top).
    pub(crate) fn level_len(&self, level: usize) -> u64 {
        self.lens.get(level).copied().unwrap_or(0)
    }

    /// Children (at `level - 1`) of the nodes `nodes` of `level` (which must be >= 1).
    pub(crate) fn children(&self, level: usize, nodes: Range<u64>) -> Range<u64> {
        let below = self.level_len(level.saturating_sub(1));
        let start = nodes.start.saturating_mul(self.fanout).min(below);
        let end = nodes.end.saturating_mul(self.fanout).min(below);
        start..end
    }

    /// Validates a [`Msg::Want`] and returns the child ranges to answer with. Levels must
    /// be in `1..height`, ranges non-empty, ascending, disjoint and inside the level, and
    /// the answer at most `max_hashes` hashes.
    pub(crate) fn want_children(
        &self,
        level: u32,
        nodes: &[NodeRange],
        max_hashes: u64,
    ) -> Result<Vec<Range<u64>>, String> {
        let level = level as usize;
        if level == 0 || level >= self.height() {
            return Err(format!(
                "request for children of level {level}, but the tree has levels 1..{}",
                self.height()
            ));
        }
        if nodes.is_empty() {
            return Err("request for the children of no nodes".into());
        }
        let len = self.level_len(level);
        let mut next = 0u64;
        let mut total = 0u64;
        let mut out = Vec::with_capacity(nodes.len());
        for r in nodes {
            let end = r.first.checked_add(r.count).filter(|&e| e <= len);
            let Some(end) = end.filter(|_| r.count > 0 && r.first >= next) else {
                return Err(format!(
                    "node range {}+{} at level {level} is empty, out of order or outside 0..{len}",
                    r.first, r.count
                ));
            };
            next = end;
            let kids = self.children(level, r.first..end);
            total += kids.end - kids.start;
            out.push(kids);
        }
        if total > max_hashes {
            return Err(format!(
                "request for {total} hashes exceeds the limit of {max_hashes}"
            ));
        }
        Ok(out)
    }
}

/// One write a destination performs for a data frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WriteOp {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// Bytes of the payload frame to write, or `None` to write zeros.
    pub(crate) data: Option<Range<usize>>,
}

/// What a checked data frame asks the destination to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FramePlan {
    pub(crate) ops: Vec<WriteOp>,
    pub(crate) totals: Totals,
}

/// Byte length of `count` chunks from `first` (the last chunk of the disk may be short).
pub(crate) fn run_bytes(g: &Geometry, first: u64, count: u64) -> u64 {
    let start = g.chunk_offset(first).min(g.size());
    let end = g.chunk_offset(first + count).min(g.size());
    end - start
}

/// Checks a data frame header against the geometry and the payload length the receiver
/// will accept, and turns it into writes. Runs must be non-empty, ascending, disjoint and
/// inside the disk; data runs must account for exactly `payload_len` bytes. Pure.
pub(crate) fn plan_frame(
    g: &Geometry,
    header: &ChunkHeader,
    max_payload: u64,
) -> Result<FramePlan, String> {
    if header.runs.is_empty() || header.runs.len() > MAX_RUNS_PER_FRAME {
        return Err(format!(
            "data frame with {} runs (allowed 1..={MAX_RUNS_PER_FRAME})",
            header.runs.len()
        ));
    }
    if header.payload_len > max_payload {
        return Err(format!(
            "data frame announces {} payload bytes, more than the limit of {max_payload}",
            header.payload_len
        ));
    }
    let n = g.chunk_count();
    let mut plan = FramePlan {
        ops: Vec::with_capacity(header.runs.len()),
        totals: Totals {
            frames: 1,
            ..Totals::default()
        },
    };
    let mut next_chunk = 0u64;
    let mut pos = 0u64;
    for r in &header.runs {
        let count = u64::from(r.count);
        let end = r.first.checked_add(count).filter(|&e| e <= n);
        let Some(end) = end.filter(|_| count > 0 && r.first >= next_chunk) else {
            return Err(format!(
                "chunk run {}+{} is empty, out of order or outside the disk's {n} chunks",
                r.first, r.count
            ));
        };
        next_chunk = end;
        let len = run_bytes(g, r.first, count);
        let data = if r.zero {
            plan.totals.zero_chunks += count;
            None
        } else {
            let start = pos;
            pos += len;
            if pos > header.payload_len {
                return Err(format!(
                    "data runs need more than the {} payload bytes announced",
                    header.payload_len
                ));
            }
            plan.totals.data_bytes += len;
            Some(start as usize..pos as usize)
        };
        plan.totals.chunks += count;
        plan.ops.push(WriteOp {
            offset: g.chunk_offset(r.first),
            len,
            data,
        });
    }
    if pos != header.payload_len {
        return Err(format!(
            "data runs account for {pos} bytes but the frame announces {}",
            header.payload_len
        ));
    }
    Ok(plan)
}

/// Encodes a message for the wire.
pub(crate) fn encode(msg: &Msg) -> Result<Vec<u8>, convoy_codec::CodecError> {
    convoy_codec::encode(msg)
}

/// Decodes a message from the wire.
pub(crate) fn decode(frame: &[u8]) -> Result<Msg, convoy_codec::CodecError> {
    convoy_codec::decode(frame)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use convoy_store::HashTree;

    fn binding() -> Binding {
        Binding {
            cg: 1,
            disk: 2,
            epoch: 5,
            session: 99,
        }
    }

    fn hello(direction: Direction, size: u64) -> Hello {
        Hello {
            binding: binding(),
            direction,
            mode: Mode::CompareDelta,
            shape: Shape {
                size,
                chunk_size: 65536,
                fanout: 64,
            },
            data_streams: 4,
        }
    }

    const EXPECT: Expect = Expect {
        cg: 1,
        disk: 2,
        min_epoch: 5,
    };

    #[test]
    fn hello_checks_cover_every_refusal() {
        let local = hello(Direction::Push, 1 << 20).shape;
        let ok = hello(Direction::Push, 1 << 20);
        assert_eq!(
            check_hello(&ok, Some((&EXPECT, Role::Destination)), &local),
            Ok(())
        );
        let code =
            |h: &Hello, e: &Expect, role| check_hello(h, Some((e, role)), &local).unwrap_err().code;
        assert_eq!(
            check_hello(&ok, None, &local).unwrap_err().code,
            RefusalCode::UnknownDisk
        );
        let stale = Expect {
            min_epoch: 6,
            ..EXPECT
        };
        assert_eq!(
            code(&ok, &stale, Role::Destination),
            RefusalCode::StaleEpoch
        );
        let other_disk = Expect { disk: 3, ..EXPECT };
        assert_eq!(
            code(&ok, &other_disk, Role::Destination),
            RefusalCode::WrongDisk
        );
        let other_cg = Expect { cg: 3, ..EXPECT };
        assert_eq!(
            code(&ok, &other_cg, Role::Destination),
            RefusalCode::WrongCg
        );
        assert_eq!(code(&ok, &EXPECT, Role::Source), RefusalCode::WrongRole);
        let pull = hello(Direction::Pull, 1 << 20);
        assert_eq!(
            check_hello(&pull, Some((&EXPECT, Role::Source)), &local),
            Ok(())
        );
        let bigger = hello(Direction::Push, 2 << 20);
        let r = check_hello(&bigger, Some((&EXPECT, Role::Destination)), &local).unwrap_err();
        assert_eq!(r.code, RefusalCode::ShapeMismatch);
        assert!(
            r.message.contains("1048576") && r.message.contains("2097152"),
            "{r:?}"
        );
        let mut streams = ok;
        streams.data_streams = 0;
        assert_eq!(
            code(&streams, &EXPECT, Role::Destination),
            RefusalCode::BadRequest
        );
        streams.data_streams = MAX_DATA_STREAMS + 1;
        assert_eq!(
            code(&streams, &EXPECT, Role::Destination),
            RefusalCode::BadRequest
        );
    }

    #[test]
    fn messages_round_trip_and_hash_lists_are_compact() {
        let hashes: Vec<ChunkHash> = (0..100u8).map(|i| [i; 32]).collect();
        let msg = Msg::Nodes {
            binding: binding(),
            level: 0,
            hashes: HashList(hashes.clone()),
        };
        let bytes = encode(&msg).unwrap();
        assert!(bytes.len() < 100 * 32 + 64, "{}", bytes.len());
        assert_eq!(decode(&bytes).unwrap(), msg);
        let h = Msg::Hello(hello(Direction::Pull, 77));
        assert_eq!(decode(&encode(&h).unwrap()).unwrap(), h);
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn tree_shape_matches_the_store_tree() {
        for (n, f) in [
            (1u64, 64u32),
            (2, 2),
            (64, 64),
            (65, 64),
            (5000, 16),
            (4097, 64),
        ] {
            let leaves: Vec<ChunkHash> = (0..n).map(|i| [(i % 251) as u8; 32]).collect();
            let t = HashTree::from_leaves(leaves, f);
            let s = TreeShape::new(n, f);
            assert_eq!(s.height(), t.height(), "n={n} f={f}");
            for l in 0..s.height() {
                assert_eq!(s.level_len(l), t.level_len(l) as u64);
                if l > 0 {
                    for node in 0..s.level_len(l) {
                        let k = t.children(l, node as usize);
                        assert_eq!(s.children(l, node..node + 1), k.start as u64..k.end as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn wants_are_validated() {
        let s = TreeShape::new(5000, 16); // levels: 5000, 313, 20, 2, 1
        assert_eq!(s.height(), 5);
        let r = |first, count| NodeRange { first, count };
        assert_eq!(s.want_children(4, &[r(0, 1)], 100).unwrap(), vec![0..2]);
        assert_eq!(
            s.want_children(1, &[r(0, 2), r(312, 1)], 100).unwrap(),
            vec![0..32, 4992..5000]
        );
        assert!(s.want_children(0, &[r(0, 1)], 100).is_err());
        assert!(s.want_children(5, &[r(0, 1)], 100).is_err());
        assert!(s.want_children(1, &[], 100).is_err());
        assert!(s.want_children(1, &[r(0, 0)], 100).is_err());
        assert!(s.want_children(1, &[r(5, 1), r(4, 1)], 100).is_err());
        assert!(s.want_children(1, &[r(5, 2), r(6, 1)], 100).is_err());
        assert!(s.want_children(1, &[r(312, 2)], 100).is_err());
        assert!(s.want_children(1, &[r(u64::MAX, 2)], 100).is_err());
        assert!(s.want_children(1, &[r(0, 10)], 100).is_err());
    }

    fn header(runs: Vec<Run>, payload_len: u64) -> ChunkHeader {
        ChunkHeader {
            binding: binding(),
            stream: 0,
            seq: 0,
            runs,
            payload_len,
        }
    }

    #[test]
    fn data_frames_are_validated_and_planned() {
        // 10 chunks of 1 KiB, the last one 100 bytes.
        let g = Geometry::with_params(9 * 1024 + 100, 1024, 4, 2).unwrap();
        let run = |first, count, zero| Run { first, count, zero };
        let h = header(
            vec![run(0, 2, false), run(3, 1, true), run(8, 2, false)],
            3172,
        );
        let plan = plan_frame(&g, &h, 1 << 20).unwrap();
        assert_eq!(
            plan.ops,
            vec![
                WriteOp {
                    offset: 0,
                    len: 2048,
                    data: Some(0..2048)
                },
                WriteOp {
                    offset: 3072,
                    len: 1024,
                    data: None
                },
                WriteOp {
                    offset: 8192,
                    len: 1124,
                    data: Some(2048..3172)
                },
            ]
        );
        assert_eq!(
            plan.totals,
            Totals {
                frames: 1,
                chunks: 5,
                zero_chunks: 1,
                data_bytes: 3172
            }
        );
        let bad = [
            header(vec![], 0),
            header(vec![run(0, 0, false)], 0),
            header(vec![run(9, 2, false)], 1124),
            header(vec![run(3, 1, false), run(2, 1, false)], 2048),
            header(vec![run(0, 2, false), run(1, 1, true)], 2048),
            header(vec![run(0, 1, false)], 1000),
            header(vec![run(0, 1, false)], 2048),
            header(vec![run(u64::MAX, 2, true)], 0),
        ];
        for h in bad {
            assert!(plan_frame(&g, &h, 1 << 20).is_err(), "{h:?}");
        }
        assert!(plan_frame(&g, &header(vec![run(0, 2, false)], 2048), 1000).is_err());
    }
}
