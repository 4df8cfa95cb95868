//! Convoy's per-host block store: one sparse raw image file per virtual disk, with chunk
//! metadata (chunk hashes, a hash tree, dirty trackers) that survives SIGKILL and power
//! loss and is never trusted when it could be stale.
//!
//! # Layers
//!
//! - Pure, I/O-free core: [`Geometry`] (bytes → chunks → extents), [`ChunkMap`] (cached
//!   hashes, hash tree, dirty trackers, and the rules that keep them right under concurrent
//!   writes), [`ActivityLog`] (which extents a crash must distrust, write admission,
//!   checkpoint cut-over), [`HashTree`] and [`diff_leaves`] (compare-delta).
//! - A narrow I/O trait, [`Backend`], with the real [`FileBackend`] and the crash-simulating
//!   [`sim::SimBackend`] for deterministic tests.
//! - [`DiskImage`], the thread-safe shell that runs the core's decisions against a backend.
//!
//! # Files
//!
//! `<dir>/disk-<id>.img` (sparse raw data), `<dir>/disk-<id>.meta` (metadata checkpoint:
//! which chunk hashes are known, the trackers; format 2, with a version marker, replaced
//! atomically with `convoy_codec::file::durable_write`; format 1 is upgraded on open),
//! `<dir>/disk-<id>.hashes` (chunk hashes, 32 bytes per chunk, sparse, paged through a
//! bounded cache) and `<dir>/disk-<id>.al` (activity log: a header, then appended,
//! checksummed frames, each fsynced, in space reserved ahead).
//!
//! Memory follows what was written, not the disk size: an untouched image of any size
//! (up to 16 TiB) holds a few hundred KiB.
//!
//! # Crash safety
//!
//! The image is divided into extents (default 64 chunks = 4 MiB). Before the first write to
//! an extent that is not in the durable *active set*, the extent is appended to the
//! activity log and fsynced; writers arriving meanwhile share that fsync. A checkpoint
//! (explicit, on `close`, on tracker changes, or from `flush` when the log passes a limit)
//! snapshots the metadata (copy-on-write, under the lock only for pointer copies), writes
//! the changed chunk-hash pages, fdatasyncs the image and the hash file, writes the
//! metadata durably, then replaces the log with only the extents written since the
//! snapshot.
//!
//! **Invariant**: a chunk that may differ from what the durable metadata says is always
//! either in an extent of the durable active set or already reflected in the durable
//! metadata (hash unknown and dirty in every tracker).
//!
//! Opening an image that was not closed cleanly (log not marked clean for the metadata's
//! generation) therefore distrusts every chunk of every active extent: its hash is
//! dropped and recomputed on demand from the image, and it is marked dirty in every
//! tracker. A tracker never misses a chunk written before a crash; it may hold extra
//! ones. A missing or unreadable log, or one with valid frames after a bad one, distrusts
//! the whole image.
//!
//! # I/O errors
//!
//! Fail-stop: a failed fsync/fdatasync (data, chunk hashes, metadata) or activity-log
//! append fails the image for good ([`StoreError::Failed`], [`DiskImage::failure`]); a
//! failed data write or a full file system fails only that call
//! ([`StoreError::is_no_space`]). See [`DiskImage`].

#![warn(missing_docs, unreachable_pub)]

mod activity;
mod backend;
mod bitmap;
mod chunkmap;
mod clock;
mod error;
mod geometry;
mod hash;
mod image;
mod leaves;
mod meta;
pub mod sim;
mod sparse;
mod tree;

pub use activity::ActivityLog;
pub use backend::{
    Backend, FileBackend, image_files, image_paths, set_test_sync_delay,
    set_test_sync_failure_while,
};
pub use bitmap::Bitmap;
pub use chunkmap::{ChunkMap, DirtySet, HashTicket, RecoveryReport, Trust, WriteSeq};
pub use error::{Result, StoreError};
pub use geometry::{DEFAULT_CHUNK_SIZE, DEFAULT_EXTENT_CHUNKS, DEFAULT_FANOUT, Geometry};
pub use hash::{ChunkHash, HashAlgo, ZERO_CHUNK_HASH, hash_chunk, is_zero};
pub use image::{DEFAULT_ACTIVITY_LIMIT, DataChunks, DiskImage, HashPass};
pub use tree::{HashTree, diff_leaves};

#[cfg(test)]
mod model_tests;
