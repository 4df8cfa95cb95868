//! Compare-delta and full-copy synchronisation of one disk image between two Convoy nodes,
//! over the QUIC transport: makes a destination [`DiskImage`](convoy_store::DiskImage)
//! equal to a source image, moving only the chunks that differ.
//!
//! # Use
//!
//! - The **initiator** calls [`push`] (it is the source) or [`pull`] (it is the
//!   destination) with a [`Session`] binding `(cg, disk, epoch)` and a [`Mode`].
//! - The **responder** runs a [`DeltaServer`], whose [`Resolver`] says what it expects for
//!   each disk ([`Offer`]: an [`Expect`] of `cg`, `disk`, `min_epoch`, a [`Role`] and the
//!   image). Its accept loop hands every delta stream to [`DeltaServer::serve`].
//!
//! # Protocol
//!
//! A session is one control stream plus `data_streams` data streams (default 4), all
//! [`StreamKind::Delta`](convoy_transport::StreamKind::Delta) streams opened by the
//! initiator on its cached connection. Every message is one frame encoded with
//! `convoy_codec` and carries the session binding `(cg, disk, epoch, session nonce)`; the
//! receiver refuses a message bound to anything else.
//!
//! 1. Handshake (1 round trip): `Hello {binding, direction, mode, geometry, streams}` on
//!    the control stream and `Attach {binding, index}` on each data stream; the responder
//!    checks the binding against its [`Offer`] (wrong group or disk, stale epoch, wrong
//!    role, other geometry, busy disk, non-empty full-copy target) and answers `Accepted`
//!    or `Refused` with a message. A refused session reads and writes nothing.
//! 2. The destination announces `Ready`: the root of its Merkle tree (compare-delta), or
//!    that it checked it is empty (full copy). Both sides hash their disks in parallel
//!    from the moment the session starts.
//! 3. Compare-delta: the source compares roots; equal roots end the exchange (only the
//!    root was sent). Otherwise it walks down: `Want {level, node ranges}` asks for the
//!    children of differing nodes, `Nodes {hashes}` answers with their 256-bit hashes,
//!    batched (up to 8192 hashes per request) and pipelined (8 requests in flight), one
//!    round trip per tree level (4 levels for 1 GiB of 64 KiB chunks). Differing leaves
//!    are the chunks to send; they go out while the walk continues.
//!    Full copy skips this: the source walks its data regions (`SEEK_DATA`), skipping holes
//!    and chunks whose cached hash is the zero hash without reading them.
//! 4. Data: chunks are grouped into frames of up to 2 MiB (`Chunks {runs}` header, then the
//!    raw bytes in one frame, never copied through the codec) and spread over the data
//!    streams by whichever worker is free; a chunk that reads as zeros is sent as a zero
//!    run (no bytes; applied with `write_zeroes`), or left out in a full copy. Each data
//!    stream ends with `StreamEnd {totals}` and a clean QUIC finish.
//! 5. `Finish {totals}` (source) → the destination waits for every data stream, checks
//!    the totals, fdatasyncs, and answers `Complete`. Either side sends `Abort {message}`
//!    on failure.
//!
//! # Durability and the snapshot point
//!
//! When [`push`] or [`pull`] returns `Ok`, or [`DeltaServer::serve`] returns
//! [`Served::Completed`], the destination equals the source as of the session's snapshot
//! point and is durable (fdatasynced before `Complete` was sent). If the source is written
//! during the session, the snapshot point is per chunk: every destination chunk equals the
//! source's content of that chunk at some moment during the session. Callers resend the
//! chunks written since the session started using a dirty tracker started before it. If
//! the source's hash tree stays [`Busy`](convoy_store::StoreError::Busy) under writes, the
//! session compares every leaf, hashing chunk by chunk, with the same guarantee.
//!
//! A full copy first declares the whole (verified empty, sparse) destination as being
//! written in the store's activity log, in one append instead of one fsync per extent; a
//! crash during the copy then makes the store distrust (rehash) the whole destination.
//!
//! On any error the destination may hold a mix of its old chunks and the source's (none
//! guaranteed durable); a later session finishes the job, sending only what still
//! differs. Nobody but the session may write the destination meanwhile (epoch fencing
//! ensures that in Convoy).

#![warn(missing_docs, unreachable_pub)]

mod client;
mod config;
mod error;
mod local;
mod proto;
mod roles;
mod server;
mod stats;
mod walk;
mod wire;

pub use client::{Session, pull, push};
pub use config::{DeltaConfig, MAX_FRAME_PAYLOAD};
pub use error::DeltaError;
pub use proto::{
    Binding, Expect, MAX_DATA_STREAMS, MAX_HASHES_PER_MESSAGE, Mode, Refusal, RefusalCode, Role,
};
pub use server::{DeltaServer, Offer, Resolver, Served, SessionReport};
pub use stats::{DeltaProgress, DeltaStats, ServerStats};
