//! Blocking operations on the local disk image. Callers run them on tokio's blocking
//! pool; everything here is synchronous and short of policy.

use std::io::IoSlice;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use convoy_store::{Backend, ChunkHash, DiskImage, StoreError, ZERO_CHUNK_HASH, is_zero};
use tokio::sync::mpsc;

use crate::error::DeltaError;
use crate::proto::{Run, TreeShape, WriteOp, run_bytes};
use crate::walk::{Batch, Batcher, Item, push_run, read_runs};

/// The interior of a disk's hash tree as of the session start, without its leaves (a
/// 64th of their size): leaves are looked up per chunk when asked for.
#[derive(Debug)]
pub(crate) struct LocalTree {
    /// The root, or `None` if concurrent writes kept the tree from being completed.
    pub(crate) root: Option<ChunkHash>,
    /// Levels `1..height` (index `level - 1`); `None` when the root is `None`.
    interior: Option<Vec<Vec<ChunkHash>>>,
}

impl LocalTree {
    /// Our hashes of `ranges` at `level` >= 1, concatenated; `None` if unknown.
    pub(crate) fn interior(&self, level: usize, ranges: &[Range<u64>]) -> Option<Vec<ChunkHash>> {
        let l = self.interior.as_ref()?.get(level.checked_sub(1)?)?;
        let mut out = Vec::new();
        for r in ranges {
            out.extend_from_slice(l.get(r.start as usize..r.end as usize)?);
        }
        Some(out)
    }
}

/// Takes the interior levels of the image's tree, computing missing chunk hashes first.
/// Under writes that keep invalidating hashes ([`StoreError::Busy`]) it gives up on the
/// interior: the session then compares every leaf, hashing chunk by chunk.
pub(crate) fn snapshot<B: Backend>(
    image: &DiskImage<B>,
    shape: &TreeShape,
) -> Result<LocalTree, StoreError> {
    if shape.height() == 1 {
        return Ok(LocalTree {
            root: Some(leaf_hash(image, 0)?),
            interior: Some(Vec::new()),
        });
    }
    let mut levels = Vec::with_capacity(shape.height() - 1);
    for level in 1..shape.height() {
        let len = shape.level_len(level);
        match image.tree_level(level, 0..len as usize) {
            Ok(v) if v.len() as u64 == len => levels.push(v),
            Ok(v) => {
                return Err(StoreError::Corrupt {
                    what: "hash tree".into(),
                    reason: format!(
                        "level {level} has {} nodes, expected {len}; the store and the delta protocol disagree on the tree shape",
                        v.len()
                    ),
                });
            }
            Err(StoreError::Busy) => {
                tracing::info!("hash tree busy under concurrent writes; comparing chunk by chunk");
                return Ok(LocalTree {
                    root: None,
                    interior: None,
                });
            }
            Err(e) => return Err(e),
        }
    }
    let root = levels.last().and_then(|l| l.first().copied());
    Ok(LocalTree {
        root,
        interior: Some(levels),
    })
}

/// The hash of one chunk: cached if known, else computed from the image. It describes the
/// chunk's content at some moment during the call.
pub(crate) fn leaf_hash<B: Backend>(
    image: &DiskImage<B>,
    chunk: u64,
) -> Result<ChunkHash, StoreError> {
    match image.cached_hash(chunk) {
        Some(h) => Ok(h),
        None => image.chunk_hash(chunk),
    }
}

/// Leaf hashes of `ranges`, concatenated.
pub(crate) fn leaves<B: Backend>(
    image: &DiskImage<B>,
    ranges: &[Range<u64>],
) -> Result<Vec<ChunkHash>, StoreError> {
    let mut out = Vec::with_capacity(ranges.iter().map(|r| (r.end - r.start) as usize).sum());
    for r in ranges {
        for c in r.clone() {
            out.push(leaf_hash(image, c)?);
        }
    }
    Ok(out)
}

/// Declares the whole of an empty, fully sparse destination as being written, so the
/// store logs all its extents in one activity-log append instead of one fsync per 4 MiB
/// extent during the copy (each of which, on ext4, also flushes the data written so far).
/// Punching holes into a fully sparse file changes nothing; a file system without
/// `SEEK_DATA` is left alone (its hole punching may fall back to writing zeros).
/// A crash during the copy then makes the store distrust the whole destination, which a
/// restarted full copy rewrites anyway.
pub(crate) fn preadmit_empty<B: Backend>(image: &DiskImage<B>) -> Result<(), StoreError> {
    let backend = image.backend();
    let sparse = backend.next_data(0).map_err(|e| StoreError::Io {
        what: format!("seek data in {}", backend.describe()),
        source: e,
    })?;
    if sparse.is_none() {
        image.write_zeroes(0, image.size())?;
    }
    Ok(())
}

/// Whether the image reads as zeros everywhere: no data region at all (a fresh sparse
/// image), or every chunk hashing to [`ZERO_CHUNK_HASH`].
pub(crate) fn is_empty<B: Backend>(image: &DiskImage<B>) -> Result<bool, StoreError> {
    let backend = image.backend();
    match backend.next_data(0) {
        Ok(None) => return Ok(true),
        Ok(Some(_)) => {}
        Err(e) => {
            return Err(StoreError::Io {
                what: format!("seek data in {}", backend.describe()),
                source: e,
            });
        }
    }
    for c in 0..image.chunk_count() {
        if leaf_hash(image, c)? != ZERO_CHUNK_HASH {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Read buffers of one sending session, reused once the transport has let go of the bytes
/// sent from them: allocating and zeroing a fresh 2 MiB buffer per frame (page faults and
/// memset) took about a tenth of the sending agent's CPU in a full copy.
#[derive(Default)]
pub(crate) struct BufferPool {
    sent: std::sync::Mutex<Vec<Bytes>>,
}

/// Buffers kept for reuse per session (each up to one frame).
const POOLED_BUFFERS: usize = 16;

impl BufferPool {
    /// A buffer of `len` initialised bytes, reused if one is free.
    fn take(&self, len: usize) -> BytesMut {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let mut reused = None;
        let mut still_busy = Vec::with_capacity(sent.len());
        for b in sent.drain(..) {
            if reused.is_some() {
                still_busy.push(b);
                continue;
            }
            match b.try_into_mut() {
                Ok(m) if m.capacity() >= len => reused = Some(m),
                Ok(_) => {}
                Err(b) => still_busy.push(b),
            }
        }
        *sent = still_busy;
        drop(sent);
        let mut buf = reused.unwrap_or_else(|| BytesMut::zeroed(len));
        // Zero-fills only growth past what the buffer already held.
        buf.resize(len, 0);
        buf
    }

    /// Remembers a buffer handed to the transport, to reuse once it is released.
    fn give(&self, sent: &Bytes) {
        let mut pool = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOLED_BUFFERS {
            pool.push(sent.clone());
        }
    }
}

/// Reads the chunks of `batch` that are not known zero, and finds which read as zero.
/// Returns the frame's runs and its payload (data runs' bytes, in run order). With
/// `omit_zero` (full copy to an empty disk) zero chunks are left out entirely.
pub(crate) fn read_batch<B: Backend>(
    image: &DiskImage<B>,
    batch: &[Item],
    omit_zero: bool,
    buffers: &BufferPool,
) -> Result<(Vec<Run>, Bytes), StoreError> {
    let g = image.geometry();
    let reads = read_runs(batch);
    let total: u64 = reads.iter().map(|&(f, c)| run_bytes(g, f, c)).sum();
    let mut buf = buffers.take(total as usize);
    let mut pos = 0usize;
    for (first, count) in reads {
        let len = run_bytes(g, first, count) as usize;
        image.read_at(&mut buf[pos..pos + len], g.chunk_offset(first))?;
        pos += len;
    }
    // Drop chunks that turned out to be zero from the payload, compacting in place
    // (rare: a zero chunk normally has the zero hash and is never read).
    let mut runs = Vec::new();
    let (mut read, mut write) = (0usize, 0usize);
    for item in batch {
        let zero = if item.known_zero {
            true
        } else {
            let len = g.chunk_len(item.chunk);
            let z = is_zero(&buf[read..read + len]);
            if !z {
                if write != read {
                    buf.copy_within(read..read + len, write);
                }
                write += len;
            }
            read += len;
            z
        };
        if !(zero && omit_zero) {
            push_run(&mut runs, item.chunk, zero);
        }
    }
    buf.truncate(write);
    let payload = buf.freeze();
    buffers.give(&payload);
    Ok((runs, payload))
}

/// Applies a checked data frame whose payload arrived as `parts` (in order).
pub(crate) fn apply<B: Backend>(
    image: &DiskImage<B>,
    ops: &[WriteOp],
    parts: &[Bytes],
) -> Result<(), StoreError> {
    for op in ops {
        match &op.data {
            Some(r) => {
                image.write_vectored_at(&slices_of(parts, r.clone()), op.offset)?;
                // The session ends with a flush; writing back as frames land overlaps
                // that disk work with the transfer instead of leaving it all to the end.
                image.start_writeback(op.offset, r.len() as u64);
            }
            None => image.write_zeroes(op.offset, op.len)?,
        }
    }
    Ok(())
}

/// The bytes `range` of the concatenation of `parts`, as slices of the parts.
fn slices_of(parts: &[Bytes], range: Range<usize>) -> Vec<IoSlice<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    for p in parts {
        let end = start + p.len();
        let from = range.start.max(start);
        let to = range.end.min(end);
        if from < to {
            out.push(IoSlice::new(&p[from - start..to - start]));
        }
        if end >= range.end {
            break;
        }
        start = end;
    }
    out
}

/// Full copy: walks the image's data regions (skipping holes without reading them, and
/// chunks whose cached hash is the zero hash) and queues every other chunk in batches.
/// Stops early, without error, if the receiving side has gone away.
pub(crate) fn enumerate_full<B: Backend>(
    image: Arc<DiskImage<B>>,
    mut batcher: Batcher,
    tx: mpsc::Sender<Batch>,
) -> Result<(), DeltaError> {
    let g = *image.geometry();
    let cs = u64::from(g.chunk_size());
    let n = g.chunk_count();
    let backend = image.backend();
    let mut next = 0u64;
    while next < n {
        let region = backend.next_data(g.chunk_offset(next)).map_err(|e| {
            DeltaError::Store(StoreError::Io {
                what: format!("seek data in {}", backend.describe()),
                source: e,
            })
        })?;
        let Some(region) = region else { break };
        let first = (region.start / cs).max(next);
        if first >= n {
            break;
        }
        let end = region.end.div_ceil(cs).min(n).max(first + 1);
        for chunk in first..end {
            if image.cached_hash(chunk) == Some(ZERO_CHUNK_HASH) {
                continue;
            }
            let item = Item {
                chunk,
                known_zero: false,
            };
            if let Some(b) = batcher.push(item) {
                if tx.blocking_send(b).is_err() {
                    return Ok(());
                }
            }
        }
        next = end;
    }
    if let Some(b) = batcher.take() {
        let _ = tx.blocking_send(b);
    }
    Ok(())
}

#[cfg(test)]
mod slice_tests {
    use super::*;

    #[test]
    fn slices_of_cover_exactly_the_range_across_pieces() {
        let parts: Vec<Bytes> = [3usize, 1, 5, 0, 4]
            .iter()
            .scan(0u8, |next, &n| {
                let v: Vec<u8> = (0..n)
                    .map(|_| {
                        *next += 1;
                        *next
                    })
                    .collect();
                Some(Bytes::from(v))
            })
            .collect();
        let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        for start in 0..=whole.len() {
            for end in start..=whole.len() {
                let got: Vec<u8> = slices_of(&parts, start..end)
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect();
                assert_eq!(got, whole[start..end], "range {start}..{end}");
            }
        }
    }

    #[test]
    fn pooled_buffers_come_back_only_once_released() {
        let pool = BufferPool::default();
        let mut a = pool.take(1000);
        assert_eq!(a.len(), 1000);
        a.fill(7);
        let sent = a.freeze();
        pool.give(&sent);
        // Still held by the "transport": a fresh, zeroed buffer.
        let b = pool.take(1000);
        assert!(b.iter().all(|&x| x == 0));
        assert_ne!(b.as_ptr(), sent.as_ptr());
        let ptr = sent.as_ptr();
        drop(sent);
        // Released: the same memory again, sized as asked.
        let mut c = pool.take(1000);
        assert_eq!(c.as_ptr(), ptr);
        assert_eq!(c.len(), 1000);
        // A payload shortened (zero chunks dropped) comes back grown with zeros, not with
        // stale bytes.
        c.truncate(500);
        let shorter = c.freeze();
        pool.give(&shorter);
        drop(shorter);
        let d = pool.take(1000);
        assert_eq!(d.as_ptr(), ptr);
        assert!(d[..500].iter().all(|&x| x == 7));
        assert!(d[500..].iter().all(|&x| x == 0));
        // Too small for the request: not reused.
        let small = d.freeze();
        pool.give(&small);
        drop(small);
        assert_eq!(pool.take(1 << 20).len(), 1 << 20);
    }
}
