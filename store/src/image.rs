//! [`DiskImage`]: the I/O shell around the pure [`ChunkMap`] and [`ActivityLog`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use crate::activity::{ActivityLog, LogEntry, decide_trust, encode_frame, encode_log, parse_log};
use crate::backend::{Backend, FileBackend, image_files};
use crate::chunkmap::{ChunkMap, DirtySet, Leaf, RecoveryReport, Trust, WriteSeq};
use crate::error::{Result, StoreError, is_no_space};
use crate::geometry::Geometry;
use crate::hash::{ChunkHash, ZERO_CHUNK_HASH, hash_chunk, hash_node};
use crate::leaves::{
    LEAVES_PER_PAGE, LeafPage, PAGE_BYTES, PageMiss, hash_file_len, page_bytes, page_from_bytes,
    page_of,
};
use crate::meta::{self, Decoded, Meta, MetaRecordV1};
use crate::sparse::SparseBitmap;
use crate::tree::HashTree;

/// Default number of active extents above which [`DiskImage::flush`] also checkpoints
/// (256 × 4 MiB: at most 1 GiB to rehash after a crash).
pub const DEFAULT_ACTIVITY_LIMIT: u64 = 256;

/// Chunks hashed per batch of tickets (bounds memory on large disks).
const HASH_WINDOW: usize = 4096;
/// Chunks per batch of a background pass (4 MiB): it looks for writes between batches, so
/// a guest that starts writing waits out at most this much hashing, not a whole disk's.
const IDLE_HASH_WINDOW: usize = 64;

/// How often tree-returning calls retry when concurrent writes keep invalidating hashes.
const TREE_ATTEMPTS: usize = 8;
/// Level-1 tree nodes computed per batch (their leaves are read outside the lock).
const TREE_BATCH: usize = 2048;
/// Upper tree nodes recomputed per hold of the image's lock.
const UPPER_BATCH: usize = 256;
/// Chunk-hash pages written per batch by a hasher that dirtied too many.
const WRITE_BACK_BATCH: usize = 256;

/// Counts from a hashing pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashPass {
    /// Chunks read and hashed.
    pub read: u64,
    /// Chunks found in holes and given [`ZERO_CHUNK_HASH`] without reading.
    pub holes: u64,
}

/// Pages read from the chunk-hash file by page index: the ticket they were read under, and
/// their content (`None` for a page in a hole: all zero hashes).
type PagesRead = HashMap<u64, (PageMiss, Option<Arc<LeafPage>>)>;

struct State {
    map: ChunkMap,
    log: ActivityLog,
    generation: u64,
    closed: bool,
    /// Why the image is failed (the first sticky error), if it is.
    failed: Option<String>,
}

/// One virtual disk: a sparse raw image plus chunk metadata that survives SIGKILL and
/// power loss and is never trusted when it could be stale.
///
/// All methods take `&self` and are safe to call from many threads at once; reads and
/// writes to different ranges proceed in parallel. Methods **block** on disk I/O: from
/// async code use the `*_async` wrappers or `tokio::task::spawn_blocking`.
///
/// Ordering: concurrent writes to overlapping ranges land in an unspecified order (as with
/// `pwrite`); callers that need an order must serialise them. A write that returned is
/// visible to every later read, durable once a later [`DiskImage::flush`] returns, and
/// reflected in every dirty tracker the moment it returns.
///
/// Crash-safety invariant: *a chunk that may differ from what the durable metadata says
/// is always either in an extent of the durable activity log or already reflected in the
/// durable metadata (hash unknown, dirty in every tracker).* Opening after a crash
/// distrusts every chunk of every active extent: its hash is dropped (recomputed on
/// demand) and it is marked dirty in every tracker.
///
/// Fail-stop: when an fsync/fdatasync of the data, the chunk hashes or the metadata, or
/// an append to the activity log fails, the image is *failed* for good
/// ([`DiskImage::failure`]): acknowledged data may not be on disk, so writes, flushes and
/// checkpoints fail with [`StoreError::Failed`] from then on, and no checkpoint ever
/// records hashes of data that may be lost. Reopening recovers it as after a crash. A
/// failed data write, or a full file system, is not sticky: the call fails with
/// [`StoreError::Io`] ([`StoreError::is_no_space`] for `ENOSPC`), its chunks stay dirty in
/// every tracker with unknown hashes, and writes succeed again once space is freed.
///
/// Memory follows what was written, not the disk size (see [`ChunkMap`]): an untouched
/// image of any size holds a few KiB, and chunk hashes are paged from the chunk-hash file
/// through a bounded cache.
pub struct DiskImage<B: Backend = FileBackend> {
    backend: B,
    geometry: Geometry,
    state: Mutex<State>,
    /// Signalled when the last in-flight write returns (for `close`).
    idle: Condvar,
    /// Held by the one thread appending to or replacing the activity log. Writers queue
    /// here, so one append + fsync admits every writer that queued meanwhile.
    log_leader: Mutex<()>,
    /// Serialises checkpoints. Lock order: live_copy, checkpointing, leaf_io, log_leader,
    /// state.
    checkpointing: Mutex<()>,
    /// Held while chunk-hash pages are written to the chunk-hash file, so that a
    /// checkpoint's sync waits for a write-back another thread began before it.
    leaf_io: Mutex<()>,
    recovery: RecoveryReport,
    activity_limit: AtomicU64,
    /// A point-in-time copy being made while writes go on (copy-before-write). Lock order:
    /// live_copy before the others.
    live_copy: Mutex<Option<LiveCopy>>,
}

/// A snapshot copied in the background: every chunk is copied once, either by the copier
/// or, first, by a writer about to change it, so the copy holds each chunk as it was when
/// the snapshot began.
struct LiveCopy {
    dir: std::path::PathBuf,
    id: String,
    dest: FileBackend,
    /// Chunks already in `dest` (or known to be zero).
    done: SparseBitmap,
    /// Where the background copier goes on.
    next: u64,
    holes: HoleCursor,
    buf: Vec<u8>,
    /// Why the copy failed while a writer was saving a chunk: the write goes on (a
    /// snapshot must never fail a guest write), the snapshot does not.
    failed: Option<String>,
}

impl LiveCopy {
    /// Stores chunk `c`'s snapshot content `data` (hash `h`) and its hash in the copy's
    /// chunk-hash file; all-zero chunks stay holes in both.
    fn put_chunk(&mut self, g: &Geometry, c: u64, data: &[u8], h: ChunkHash) -> Result<()> {
        if h != ZERO_CHUNK_HASH {
            let off = g.chunk_offset(c);
            self.dest.write_at(data, off).map_err(|e| {
                StoreError::io(format!("write {off} of {}", self.dest.describe()), e)
            })?;
            self.dest.write_hashes(&h, c * 32).map_err(|e| {
                StoreError::io(format!("write chunk hashes of {}", self.dest.describe()), e)
            })?;
        }
        self.done.set(c);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Code under these locks is pure bookkeeping; a panic there leaves the state as
    // consistent as any other interleaving would.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DiskImage<FileBackend> {
    /// Creates `<dir>/disk-<id>.img`, a sparse all-zero image of `size` bytes with default
    /// geometry, and its metadata. When this returns the image, its metadata and the
    /// directory entries are durable. Fails if the image exists. A create interrupted by a
    /// crash leaves files that `open` refuses as [`StoreError::Corrupt`]: `destroy` them and
    /// create again.
    pub fn create(dir: &Path, id: &str, size: u64) -> Result<Self> {
        Self::create_with_geometry(dir, id, Geometry::new(size)?)
    }

    /// [`DiskImage::create`] with an explicit geometry.
    pub fn create_with_geometry(dir: &Path, id: &str, geometry: Geometry) -> Result<Self> {
        geometry.validate()?;
        let backend = FileBackend::create(dir, id, geometry.size()).map_err(|e| match e {
            // ext4 with 4 KiB blocks holds files up to 16 TiB - 4 KiB: say so, since the
            // model allows 16 TiB disks.
            StoreError::Io { what, source }
                if source.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error()) =>
            {
                StoreError::Io {
                    what: format!(
                        "{what} (the file system refuses a file of {} bytes: ext4 with 4 KiB blocks holds at most 16 TiB - 4 KiB; use XFS for larger disks)",
                        geometry.size()
                    ),
                    source,
                }
            }
            e => e,
        })?;
        Self::init(backend, geometry, true)
    }

    /// Opens `<dir>/disk-<id>.img`, recovering its metadata if it was not closed cleanly
    /// (see [`DiskImage::recovery`]), and upgrading metadata of an older format. The
    /// recovery is durable when this returns.
    pub fn open(dir: &Path, id: &str) -> Result<Self> {
        Self::open_on(FileBackend::open(dir, id)?)
    }

    /// Deletes the image and all its files. The caller must make sure nobody has it open.
    pub fn destroy(dir: &Path, id: &str) -> Result<()> {
        for p in image_files(dir, id)? {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(format!("remove {}", p.display()), e)),
            }
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io(format!("fsync {}", dir.display()), e))
    }

    /// Path of the raw image file (e.g. for an NBD export or `qemu-img`).
    pub fn path(&self) -> &Path {
        self.backend.image_path()
    }
}

impl<B: Backend> DiskImage<B> {
    /// Creates an image on `backend`, whose data must be `geometry.size()` bytes of zeros
    /// and which must hold no metadata yet.
    pub fn create_on(backend: B, geometry: Geometry) -> Result<Self> {
        geometry.validate()?;
        Self::init(backend, geometry, true)
    }

    /// Writes the first metadata and log of an image whose chunk-hash file holds every
    /// chunk's hash (zeros for zero chunks): a new image (`known_zero`: all chunks are
    /// zero) or a snapshot copy.
    fn init(backend: B, geometry: Geometry, known_zero: bool) -> Result<Self> {
        let what = backend.describe();
        let io = |op: &str| {
            let what = what.clone();
            let op = op.to_string();
            move |e| StoreError::io(format!("{op} {what}"), e)
        };
        let len = backend.image_len().map_err(io("stat"))?;
        if len != geometry.size() {
            return Err(StoreError::invalid(
                "image",
                format!("{what} is {len} bytes, expected {}", geometry.size()),
            ));
        }
        let n = geometry.chunk_count();
        backend
            .set_hashes_len(hash_file_len(n))
            .map_err(io("size chunk hashes of"))?;
        backend
            .sync_hashes()
            .map_err(io("fdatasync chunk hashes of"))?;
        let generation = 1;
        let meta = Meta {
            geometry,
            generation,
            unknown: SparseBitmap::new(n),
            trackers: BTreeMap::new(),
        };
        write_meta(&backend, &meta)?;
        backend
            .replace_log(&encode_log(generation, false, &[]))
            .map_err(io("write activity log of"))?;
        let map = if known_zero {
            ChunkMap::new_zeroed(geometry)
        } else {
            ChunkMap::recover(meta, &Trust::Clean)
                .map_err(|reason| StoreError::Corrupt {
                    what: what.clone(),
                    reason,
                })?
                .0
        };
        let report = RecoveryReport {
            clean: true,
            untrusted_chunks: 0,
            generation,
        };
        Ok(Self::assemble(backend, map, generation, report))
    }

    /// Opens the image on `backend`, recovering as [`DiskImage::open`] does.
    pub fn open_on(backend: B) -> Result<Self> {
        let what = backend.describe();
        let corrupt = |reason: String| StoreError::Corrupt {
            what: what.clone(),
            reason,
        };
        let bytes = backend
            .read_meta()
            .map_err(|e| StoreError::io(format!("read metadata of {what}"), e))?
            .ok_or_else(|| corrupt("metadata file missing".into()))?;
        let (meta, upgraded) = match meta::decode(&bytes).map_err(corrupt)? {
            Decoded::Current(m) => (m, false),
            Decoded::V1(r) => (upgrade_v1(&backend, r)?, true),
        };
        drop(bytes);
        let len = backend
            .image_len()
            .map_err(|e| StoreError::io(format!("stat {what}"), e))?;
        if len != meta.geometry.size() {
            return Err(corrupt(format!(
                "image is {len} bytes, metadata says {}",
                meta.geometry.size()
            )));
        }
        let n = meta.geometry.chunk_count();
        // A chunk-hash file of another length (lost, truncated, or not this image's) says
        // nothing: start it afresh and forget every hash (the trackers are unaffected).
        let expected = hash_file_len(n);
        let hashes_len = backend
            .hashes_len()
            .map_err(|e| StoreError::io(format!("stat chunk hashes of {what}"), e))?;
        let hashes_lost = hashes_len != expected;
        if hashes_lost {
            tracing::warn!(image = %what, hashes_len, expected, "chunk-hash file missing or of the wrong size; every chunk will be rehashed");
            backend
                .set_hashes_len(0)
                .and_then(|()| backend.set_hashes_len(expected))
                .map_err(|e| StoreError::io(format!("reset chunk hashes of {what}"), e))?;
        }
        let log = backend
            .read_log()
            .map_err(|e| StoreError::io(format!("read activity log of {what}"), e))?
            .as_deref()
            .and_then(parse_log);
        if log.as_ref().is_some_and(|l| l.damaged) {
            tracing::warn!(image = %what, "activity log has valid frames after a bad one; distrusting the whole image");
        }
        let trust = decide_trust(meta.generation, log.as_ref());
        let (mut map, report) = ChunkMap::recover(meta, &trust).map_err(corrupt)?;
        if hashes_lost {
            map.forget_hashes(0..n);
        }
        let generation = report.generation;
        let img = Self::assemble(backend, map, generation, report);
        if trust == Trust::Clean {
            // From here on the image may be written: the log must say "not clean" first.
            img.backend
                .replace_log(&encode_log(generation, false, &[]))
                .map_err(|e| StoreError::io(format!("write activity log of {what}"), e))?;
        } else {
            tracing::warn!(
                image = %what,
                untrusted_chunks = img.recovery.untrusted_chunks,
                "image was not closed cleanly; distrusted chunks are marked dirty and will be rehashed"
            );
        }
        if trust != Trust::Clean || upgraded || hashes_lost {
            // Make the recovery (or the upgrade) durable so the same work is not redone,
            // and so an upgraded image is never written under its old metadata.
            img.checkpoint()?;
        }
        Ok(img)
    }

    fn assemble(backend: B, map: ChunkMap, generation: u64, recovery: RecoveryReport) -> Self {
        let geometry = *map.geometry();
        Self {
            backend,
            geometry,
            state: Mutex::new(State {
                log: ActivityLog::new(geometry.extent_count(), []),
                map,
                generation,
                closed: false,
                failed: None,
            }),
            idle: Condvar::new(),
            log_leader: Mutex::new(()),
            checkpointing: Mutex::new(()),
            leaf_io: Mutex::new(()),
            recovery,
            activity_limit: AtomicU64::new(DEFAULT_ACTIVITY_LIMIT),
            live_copy: Mutex::new(None),
        }
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.geometry.size()
    }

    /// Number of chunks (leaves of the hash tree).
    pub fn chunk_count(&self) -> u64 {
        self.geometry.chunk_count()
    }

    /// What opening found: clean, or how much was distrusted.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The storage backend (for tests and diagnostics).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Extents currently in the durable activity log (what a crash now would distrust).
    pub fn active_extents(&self) -> u64 {
        lock(&self.state).log.active_count()
    }

    /// Current metadata generation (incremented by every checkpoint).
    pub fn generation(&self) -> u64 {
        lock(&self.state).generation
    }

    /// Sets how many 4 KiB pages of chunk hashes (128 chunks each) the image keeps cached
    /// (default 1024 = 4 MiB, the hashes of 8 GiB of disk at 64 KiB chunks; at least 4).
    /// Pages changed since the last write-back are kept beyond it until written (a hasher
    /// writes them back once they pass half of it).
    pub fn set_hash_cache_pages(&self, pages: usize) {
        lock(&self.state).map.leaves().set_capacity(pages);
    }

    /// Sets how many active extents make [`DiskImage::flush`] also checkpoint.
    pub fn set_activity_limit(&self, extents: u64) {
        self.activity_limit.store(extents, Ordering::Relaxed);
    }

    /// Why the image is failed, if it is: the first fsync/fdatasync or activity-log
    /// append that failed, with the OS error. Once set it stays set for this instance
    /// (see [`StoreError::Failed`]); for the agent to report and fence the disk.
    pub fn failure(&self) -> Option<String> {
        lock(&self.state).failed.clone()
    }

    fn failed_error(&self, first_error: String) -> StoreError {
        StoreError::Failed {
            image: self.backend.describe(),
            first_error,
        }
    }

    /// Fails the image for good because `what` failed with `e`; returns the error to
    /// report. Later failures keep the first error.
    fn fail(&self, what: String, e: std::io::Error) -> StoreError {
        let first = lock(&self.state)
            .failed
            .get_or_insert_with(|| format!("{what}: {e}"))
            .clone();
        tracing::error!(
            image = %self.backend.describe(),
            error = %first,
            "disk image failed: writes, flushes and checkpoints are refused until it is reopened"
        );
        self.failed_error(first)
    }

    /// Errors unless the image is open and not failed.
    fn ensure_usable(&self) -> Result<()> {
        let st = lock(&self.state);
        if st.closed {
            return Err(StoreError::Closed);
        }
        match &st.failed {
            Some(f) => Err(self.failed_error(f.clone())),
            None => Ok(()),
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Sees every write that returned before the call;
    /// a write racing with it may be seen partly.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.geometry.check_range(offset, buf.len() as u64)?;
        self.backend.read_at(buf, offset).map_err(|e| {
            StoreError::io(
                format!(
                    "read {}+{} of {}",
                    offset,
                    buf.len(),
                    self.backend.describe()
                ),
                e,
            )
        })
    }

    /// Writes `buf` at `offset`; any alignment. Durable only after a later
    /// [`DiskImage::flush`]. Before the data is issued, the extents it touches are durably
    /// in the activity log (one fsync shared by all writers arriving meanwhile; none once
    /// the extent is active). When it returns, every tracker has the touched chunks dirty,
    /// even if it failed. A failure of the data write itself (for instance `ENOSPC`) is
    /// [`StoreError::Io`] and leaves the image usable; on a failed image it is
    /// [`StoreError::Failed`] and nothing is written.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.mutate(offset, buf.len() as u64, || {
            self.backend.write_at(buf, offset)
        })
    }

    /// Like [`DiskImage::write_at`] for data in pieces, written back to back from `offset`
    /// (received network frames, without joining them first).
    pub fn write_vectored_at(&self, bufs: &[std::io::IoSlice<'_>], offset: u64) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if len == 0 {
            return Ok(());
        }
        self.mutate(offset, len, || self.backend.write_vectored_at(bufs, offset))
    }

    /// Makes `offset..offset + len` read as zeros, releasing disk space where the file
    /// system can (NBD TRIM / WRITE_ZEROES). Same guarantees as [`DiskImage::write_at`].
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.mutate(offset, len, || self.backend.punch_hole(offset, len))
    }

    fn mutate(
        &self,
        offset: u64,
        len: u64,
        io: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<()> {
        self.geometry.check_range(offset, len)?;
        let chunks = self.geometry.chunks_of(offset, len);
        let extents = self.geometry.extents_of(&chunks);
        self.preserve_for_snapshot(chunks.clone());
        self.admit(extents.clone(), chunks.clone())?;
        let res = io();
        {
            let mut st = lock(&self.state);
            st.map.write_finished(chunks);
            st.log.finish(extents);
            if st.log.inflight() == 0 {
                self.idle.notify_all();
            }
        }
        res.map_err(|e| {
            StoreError::io(
                format!("write {offset}+{len} of {}", self.backend.describe()),
                e,
            )
        })
    }

    /// Whether a write to `offset..offset + len` would be admitted without an
    /// activity-log append (and its fsync): its extents are durably active. Cheap.
    pub fn is_active(&self, offset: u64, len: u64) -> bool {
        if len == 0 || self.geometry.check_range(offset, len).is_err() {
            return true;
        }
        let extents = self
            .geometry
            .extents_of(&self.geometry.chunks_of(offset, len));
        lock(&self.state).log.is_active(extents)
    }

    /// Makes the extents of `offset..offset + len` durably active: the activity-log
    /// append and fsync a first write there would do, done ahead so that a caller holding
    /// a lock around the write (a group's sequencer) does not hold it through an fsync.
    /// An extent activated and then not written is harmless (a recovery looks at it for
    /// nothing); a checkpoint in between may retire it again, and the write then appends
    /// itself. Blocking.
    pub fn activate(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.geometry.check_range(offset, len)?;
        let extents = self
            .geometry
            .extents_of(&self.geometry.chunks_of(offset, len));
        loop {
            {
                let mut st = lock(&self.state);
                if st.closed {
                    return Err(StoreError::Closed);
                }
                if let Some(f) = &st.failed {
                    return Err(self.failed_error(f.clone()));
                }
                if st.log.request(extents.clone()) {
                    return Ok(());
                }
            }
            self.append_activity(extents.clone())?;
        }
    }

    /// Appends the queued extents and whatever of `extents` is not durably active to the
    /// activity log, as one durable frame (nothing when another writer's batch covered
    /// them meanwhile).
    fn append_activity(&self, extents: Range<u32>) -> Result<()> {
        let _leader = lock(&self.log_leader);
        let batch = lock(&self.state).log.take_batch(extents);
        if batch.is_empty() {
            return Ok(());
        }
        let frame = encode_frame(&LogEntry::Active {
            extents: batch.clone(),
        });
        // Space first, so that a full file system fails the write cleanly instead of
        // tearing a frame (and failing the image). Writers whose extents were in this
        // batch find them still missing and try again themselves.
        self.backend.reserve_log(frame.len() as u64).map_err(|e| {
            StoreError::io(
                format!(
                    "reserve space in the activity log of {}",
                    self.backend.describe()
                ),
                e,
            )
        })?;
        if let Err(e) = self.backend.append_log(&frame) {
            // The log may now end in a torn frame; nothing may be appended behind it.
            return Err(self.fail(
                format!("append to the activity log of {}", self.backend.describe()),
                e,
            ));
        }
        lock(&self.state).log.batch_durable(&batch);
        Ok(())
    }

    /// Waits until `extents` are durably active, then counts the write in flight and
    /// invalidates `chunks`.
    fn admit(&self, extents: Range<u32>, chunks: Range<u64>) -> Result<()> {
        loop {
            {
                let mut st = lock(&self.state);
                if st.closed {
                    return Err(StoreError::Closed);
                }
                if let Some(f) = &st.failed {
                    return Err(self.failed_error(f.clone()));
                }
                if st.log.admit(extents.clone()) {
                    st.map.write_started(chunks);
                    return Ok(());
                }
            }
            self.append_activity(extents.clone())?;
        }
    }

    /// Starts writing `offset..offset + len` back to the device without waiting, so a
    /// later [`DiskImage::flush`] of a bulk copy is short. No durability promise; errors
    /// are ignored (it is only a hint).
    pub fn start_writeback(&self, offset: u64, len: u64) {
        if let Err(e) = self.backend.start_writeback(offset, len) {
            tracing::debug!(image = %self.backend.describe(), error = %e, "writeback hint failed");
        }
    }

    /// Makes every write that returned before this call durable (fdatasync). If the
    /// activity log has grown past the limit ([`DiskImage::set_activity_limit`]), also
    /// checkpoints, which bounds the work of a crash recovery; a checkpoint that fails
    /// without failing the image (a full file system) is logged and retried later, since
    /// the data is durable all the same. A failed fdatasync fails the image
    /// ([`StoreError::Failed`]).
    pub fn flush(&self) -> Result<()> {
        self.ensure_usable()?;
        if let Err(e) = self.backend.sync_data() {
            return Err(self.fail(format!("fdatasync {}", self.backend.describe()), e));
        }
        let over =
            lock(&self.state).log.active_count() > self.activity_limit.load(Ordering::Relaxed);
        if !over {
            return Ok(());
        }
        match self.checkpoint() {
            Err(e @ StoreError::Failed { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(image = %self.backend.describe(), error = %e, "checkpoint after flush failed; the data is durable, the checkpoint will be retried");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Writes the metadata (trackers, which hashes are known) durably, with the chunk-hash
    /// pages it relies on, and shrinks the activity log to the extents written since.
    /// Also flushes the data (hashes in the checkpoint must describe durable content).
    /// Safe to call concurrently with writes, which it holds back only while it takes a
    /// copy-on-write snapshot of the bitmaps (pointer copies), never during its I/O. A
    /// failed fsync fails the image ([`StoreError::Failed`]); a full file system fails
    /// only the checkpoint.
    pub fn checkpoint(&self) -> Result<()> {
        self.checkpoint_inner(false)
    }

    fn checkpoint_inner(&self, closing: bool) -> Result<()> {
        let _one = lock(&self.checkpointing);
        let what = self.backend.describe();
        let (snapshot, generation) = {
            let mut st = lock(&self.state);
            if let Some(f) = &st.failed {
                return Err(self.failed_error(f.clone()));
            }
            if st.closed && !closing {
                return Err(StoreError::Closed);
            }
            st.log.begin_checkpoint();
            let g = st.generation + 1;
            (st.map.snapshot(g), g)
        };
        let abort = |e: StoreError| {
            lock(&self.state).log.abort_checkpoint();
            e
        };
        // Every chunk-hash page dirty at the snapshot goes to the file (pages dirtied since
        // may go too: harmless, see `leaves`), and is synced before the metadata that may
        // call its hashes known.
        self.write_back(true).map_err(abort)?;
        // Every hash in the snapshot was computed from data written before the snapshot;
        // flushing now makes that data durable before the metadata claims it.
        if let Err(e) = self.backend.sync_data() {
            return Err(abort(self.fail(format!("fdatasync {what}"), e)));
        }
        if let Err(e) = self.backend.sync_hashes() {
            return Err(abort(
                self.fail(format!("fdatasync chunk hashes of {what}"), e),
            ));
        }
        let bytes = meta::encode(&snapshot).map_err(|e| {
            abort(StoreError::Corrupt {
                what: what.clone(),
                reason: format!("cannot encode metadata: {e}"),
            })
        })?;
        drop(snapshot);
        if let Err(e) = self.backend.replace_meta(&bytes) {
            let op = format!("write metadata of {what}");
            // ENOSPC leaves the old record (Backend contract); anything else may have
            // half-replaced it.
            let err = if is_no_space(&e) {
                StoreError::io(op, e)
            } else {
                self.fail(op, e)
            };
            return Err(abort(err));
        }
        let _leader = lock(&self.log_leader);
        let keep = {
            let mut st = lock(&self.state);
            st.generation = generation;
            st.log.cut_over()
        };
        let clean = closing && keep.is_empty();
        if let Err(e) = self
            .backend
            .replace_log(&encode_log(generation, clean, &keep))
        {
            // The old log (a superset, one generation behind) is still in place after
            // ENOSPC and recovery accepts it; anything else may have left the new one
            // visible but not durable, and appends to it could be lost.
            let op = format!("write activity log of {what}");
            return Err(if is_no_space(&e) {
                StoreError::io(op, e)
            } else {
                self.fail(op, e)
            });
        }
        tracing::debug!(image = %what, generation, active = keep.len(), clean, "checkpoint");
        Ok(())
    }

    /// Closes the image: refuses new writes, waits for writes in flight, checkpoints and
    /// marks the metadata clean, so the next open trusts it completely. Later calls that
    /// change the image fail with [`StoreError::Closed`]. Dropping an image without closing
    /// is safe but makes the next open recover as after a crash; so does closing a failed
    /// image, which returns [`StoreError::Failed`] and writes nothing.
    pub fn close(&self) -> Result<()> {
        {
            let mut st = lock(&self.state);
            if st.closed {
                return Ok(());
            }
            st.closed = true;
            while st.log.inflight() > 0 {
                st = self.idle.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if let Some(f) = &st.failed {
                return Err(self.failed_error(f.clone()));
            }
        }
        self.checkpoint_inner(true)
    }

    // ---- chunk-hash pages ---------------------------------------------------------------

    /// Reads page `miss.page` of the chunk-hash file and caches it (unless a racing
    /// eviction makes the read possibly stale; the caller then asks again).
    fn load_page(&self, miss: PageMiss) -> Result<()> {
        let mut buf = [0u8; PAGE_BYTES];
        self.backend
            .read_hashes(&mut buf, miss.page * PAGE_BYTES as u64)
            .map_err(|e| {
                StoreError::io(
                    format!("read chunk hashes of {}", self.backend.describe()),
                    e,
                )
            })?;
        lock(&self.state).map.install_page(miss, &buf);
        Ok(())
    }

    /// Caches the pages holding `chunks` (ascending), reading those not cached. Best
    /// effort: a page may be evicted again before the caller uses it.
    fn load_pages_of(&self, chunks: impl Iterator<Item = u64>) -> Result<()> {
        let misses: Vec<PageMiss> = {
            let st = lock(&self.state);
            let mut last = None;
            chunks
                .map(page_of)
                .filter(|&p| last.replace(p) != Some(p))
                .filter_map(|p| st.map.page_miss(p))
                .collect()
        };
        for m in misses {
            self.load_page(m)?;
        }
        Ok(())
    }

    /// Reads pages `misses` (ascending) of the chunk-hash file without caching them,
    /// skipping its holes: `None` for a page in a hole (all zero hashes).
    fn read_pages(&self, misses: &[PageMiss]) -> Result<PagesRead> {
        let io = |e| {
            StoreError::io(
                format!("read chunk hashes of {}", self.backend.describe()),
                e,
            )
        };
        let mut out = HashMap::with_capacity(misses.len());
        let mut region: Option<Option<Range<u64>>> = None;
        let mut buf = [0u8; PAGE_BYTES];
        for &m in misses {
            let start = m.page * PAGE_BYTES as u64;
            let end = start + PAGE_BYTES as u64;
            let stale = match &region {
                None => true,
                Some(Some(r)) => r.end <= start,
                Some(None) => false,
            };
            if stale {
                region = Some(self.backend.hashes_next_data(start).map_err(io)?);
            }
            let hole = match &region {
                Some(Some(r)) => r.start >= end,
                _ => true,
            };
            let page = if hole {
                None
            } else {
                self.backend.read_hashes(&mut buf, start).map_err(io)?;
                Some(Arc::new(page_from_bytes(&buf)))
            };
            out.insert(m.page, (m, page));
        }
        Ok(out)
    }

    /// Writes dirty chunk-hash pages to the file (not synced): all of them (`all`), or,
    /// for a hasher that dirtied many, enough to bring them under a quarter of the cache.
    /// A failed write leaves its pages dirty and the image usable.
    fn write_back(&self, all: bool) -> Result<()> {
        let _io = lock(&self.leaf_io);
        loop {
            let batch = {
                let mut st = lock(&self.state);
                let leaves = st.map.leaves();
                let dirty = leaves.dirty_pages();
                let cap = leaves.capacity();
                let want = match (all, dirty) {
                    (_, 0) => 0,
                    (true, d) => d,
                    (false, d) if d > cap / 2 => (d - cap / 4).min(WRITE_BACK_BATCH),
                    _ => 0,
                };
                if want == 0 {
                    return Ok(());
                }
                leaves.take_dirty(want)
            };
            if batch.is_empty() {
                return Ok(());
            }
            let mut res = Ok(());
            for (p, page) in &batch {
                res = self
                    .backend
                    .write_hashes(page_bytes(page), p * PAGE_BYTES as u64);
                if res.is_err() {
                    break;
                }
            }
            let pages: Vec<u64> = batch.iter().map(|(p, _)| *p).collect();
            lock(&self.state).map.leaves().written(&pages, res.is_ok());
            res.map_err(|e| {
                StoreError::io(
                    format!("write chunk hashes of {}", self.backend.describe()),
                    e,
                )
            })?;
            if all {
                // One pass takes every page dirty now, which includes every page dirty at
                // the caller's snapshot; pages dirtied since are not its business.
                return Ok(());
            }
        }
    }

    // ---- hashes -------------------------------------------------------------------------

    /// The cached hash of `chunk`, without computing it. `None` when unknown, past the
    /// end, or when its page of the chunk-hash file cannot be read. A returned hash always
    /// equals the hash of the chunk's current content unless a write to it is in flight.
    pub fn cached_hash(&self, chunk: u64) -> Option<ChunkHash> {
        self.known_hash(chunk).ok().flatten()
    }

    fn known_hash(&self, chunk: u64) -> Result<Option<ChunkHash>> {
        loop {
            let miss = match lock(&self.state).map.leaf(chunk) {
                Leaf::Unknown => return Ok(None),
                Leaf::Known(h) => return Ok(Some(h)),
                Leaf::NotCached(m) => m,
            };
            self.load_page(miss)?;
        }
    }

    /// Changes whenever a write starts or ends: equal across two calls means the image was
    /// not written in between.
    pub fn write_count(&self) -> u64 {
        lock(&self.state).map.write_count()
    }

    /// The hash of `chunk` (see [`hash_chunk`]), computed from the image if not cached. It
    /// describes the chunk's content at some moment during the call.
    pub fn chunk_hash(&self, chunk: u64) -> Result<ChunkHash> {
        self.geometry.check_chunk(chunk)?;
        let ticket = loop {
            let miss = {
                let mut st = lock(&self.state);
                match st.map.leaf(chunk) {
                    Leaf::Known(h) => return Ok(h),
                    Leaf::Unknown => break st.map.hash_ticket(chunk),
                    Leaf::NotCached(m) => m,
                }
            };
            self.load_page(miss)?;
        };
        let mut buf = Vec::new();
        let h = self.read_hash(chunk, &mut buf)?;
        self.load_pages_of(std::iter::once(chunk))?;
        lock(&self.state).map.offer_hash(ticket, h);
        self.write_back(false)?;
        Ok(h)
    }

    fn read_hash(&self, chunk: u64, buf: &mut Vec<u8>) -> Result<ChunkHash> {
        buf.resize(self.geometry.chunk_len(chunk), 0);
        self.read_at(buf, self.geometry.chunk_offset(chunk))?;
        Ok(hash_chunk(buf))
    }

    /// Computes every unknown chunk hash, skipping holes without reading them.
    pub fn hash_all(&self) -> Result<HashPass> {
        self.hash_pass(None)
    }

    /// Like [`DiskImage::hash_all`], but gives up (`Ok(None)`) as soon as the image is
    /// written during the pass or `busy()` turns true: for background warming, which should
    /// neither compete with a busy image's writers (or the host's bulk transfers) nor hash
    /// what they are about to change.
    pub fn hash_all_while_idle(&self, busy: impl Fn() -> bool) -> Result<Option<HashPass>> {
        let start = lock(&self.state).map.write_count();
        let pass = self.hash_pass(Some(&busy))?;
        let unchanged = lock(&self.state).map.write_count() == start && !busy();
        Ok(unchanged.then_some(pass))
    }

    fn hash_pass(&self, busy: Option<&dyn Fn() -> bool>) -> Result<HashPass> {
        let start = lock(&self.state).map.write_count();
        let mut pass = HashPass::default();
        let mut buf = Vec::new();
        let mut next = 0;
        let window = if busy.is_some() {
            IDLE_HASH_WINDOW
        } else {
            HASH_WINDOW
        };
        loop {
            // Tickets first, then hole lookups: hole information gathered after a ticket
            // cannot predate a write the ticket would not notice.
            let tickets: Vec<_> = {
                let st = lock(&self.state);
                if busy.is_some_and(|b| b() || st.map.write_count() != start) {
                    return Ok(pass);
                }
                st.map
                    .unknown_chunks_from(next, window)
                    .into_iter()
                    .map(|c| st.map.hash_ticket(c))
                    .collect()
            };
            let Some(last) = tickets.last() else {
                return Ok(pass);
            };
            next = last.chunk() + 1;
            let mut holes = HoleCursor::default();
            let mut done = Vec::with_capacity(tickets.len());
            for t in tickets {
                let c = t.chunk();
                let h = if holes.is_hole(&self.backend, &self.geometry, c)? {
                    pass.holes += 1;
                    ZERO_CHUNK_HASH
                } else {
                    pass.read += 1;
                    self.read_hash(c, &mut buf)?
                };
                done.push((t, h));
            }
            // Page by page: load the page, then offer its hashes at once, so that even a
            // small cache keeps what was computed.
            for group in done.chunk_by(|a, b| page_of(a.0.chunk()) == page_of(b.0.chunk())) {
                self.load_pages_of(std::iter::once(group[0].0.chunk()))?;
                {
                    let mut st = lock(&self.state);
                    for &(t, h) in group {
                        st.map.offer_hash(t, h);
                    }
                }
                // Scattered chunks dirty a page each: keep them within the cache's bound.
                self.write_back(false)?;
            }
        }
    }

    /// Brings the tree's interior up to date with the chunk hashes; `Ok(false)` if some
    /// chunk hash is unknown (hash first). Level-1 nodes are computed in batches whose
    /// leaves are read (from the cache, or the chunk-hash file, skipping its holes)
    /// without holding writers back; upper levels in small batches under the lock.
    fn settle_tree(&self) -> Result<bool> {
        let fanout = u64::from(self.geometry.fanout());
        let n = self.chunk_count();
        loop {
            let (nodes, pages, misses) = {
                let mut st = lock(&self.state);
                if st.map.unknown_count() > 0 {
                    return Ok(false);
                }
                let tree = st.map.tree();
                if !tree.has_stale_level1() {
                    if tree.recompute_upper(UPPER_BATCH) {
                        return Ok(true);
                    }
                    continue;
                }
                let nodes = tree.stale_level1(TREE_BATCH);
                let mut pages: Vec<u64> = Vec::new();
                for &node in &nodes {
                    let first = node * fanout;
                    let last = ((node + 1) * fanout).min(n) - 1;
                    for p in page_of(first)..=page_of(last) {
                        if pages.last() != Some(&p) {
                            pages.push(p);
                        }
                    }
                }
                let misses: Vec<PageMiss> =
                    pages.iter().filter_map(|&p| st.map.page_miss(p)).collect();
                (nodes, pages, misses)
            };
            let read = self.read_pages(&misses)?;
            // The leaves as they are now, under one hold of the lock: cached pages as
            // cached, the others as read unless an eviction may have made the read stale.
            // `None`: a page in a hole of the file, all zero hashes.
            let leaves: Option<HashMap<u64, Option<Arc<LeafPage>>>> = {
                let mut st = lock(&self.state);
                let mut got = HashMap::with_capacity(pages.len());
                let mut complete = true;
                for &p in &pages {
                    let page = match st.map.leaves().peek(p) {
                        Some(a) => Some(a),
                        None => match read.get(&p) {
                            Some((m, content)) if st.map.leaves().file_read_valid(*m) => {
                                content.clone()
                            }
                            _ => {
                                complete = false;
                                break;
                            }
                        },
                    };
                    got.insert(p, page);
                }
                if complete {
                    st.map.tree().begin_level1(&nodes);
                }
                complete.then_some(got)
            };
            let Some(leaves) = leaves else {
                continue;
            };
            let values: Vec<(u64, Option<ChunkHash>)> = nodes
                .iter()
                .map(|&node| {
                    let r = node * fanout..((node + 1) * fanout).min(n);
                    let pages = page_of(r.start)..=page_of(r.end - 1);
                    // Nodes over holes of the file take the tree's constant, unread.
                    if pages.clone().all(|p| matches!(leaves.get(&p), Some(None))) {
                        return (node, None);
                    }
                    let kids: Vec<ChunkHash> = r
                        .map(|c| match leaves.get(&page_of(c)) {
                            Some(Some(p)) => p[(c % LEAVES_PER_PAGE) as usize],
                            _ => ZERO_CHUNK_HASH,
                        })
                        .collect();
                    let zero = kids.iter().all(|h| *h == ZERO_CHUNK_HASH);
                    (node, (!zero).then(|| hash_node(&kids)))
                })
                .collect();
            let mut st = lock(&self.state);
            let tree = st.map.tree();
            for (node, h) in values {
                let h = h.unwrap_or_else(|| tree.zero_node(1, node));
                tree.install_level1(node, h);
            }
        }
    }

    /// Leaves `range` as they are at one moment when every hash is known and the tree is
    /// current; `None` if that moment could not be caught (writes, or racing evictions).
    fn read_leaves(&self, range: Range<u64>) -> Result<Option<Vec<ChunkHash>>> {
        if range.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let (misses, writes) = {
            let st = lock(&self.state);
            if !st.map.tree_current() {
                return Ok(None);
            }
            let misses: Vec<PageMiss> = (page_of(range.start)..=page_of(range.end - 1))
                .filter_map(|p| st.map.page_miss(p))
                .collect();
            (misses, st.map.write_count())
        };
        let read = self.read_pages(&misses)?;
        let mut st = lock(&self.state);
        // No write since means no hash became unknown, and so none changed.
        if !st.map.tree_current() || st.map.write_count() != writes {
            return Ok(None);
        }
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        let mut page: Option<(u64, Arc<LeafPage>)> = None;
        for c in range {
            let p = page_of(c);
            if page.as_ref().is_none_or(|(q, _)| *q != p) {
                let got = match st.map.leaves().peek(p) {
                    Some(a) => a,
                    None => match read.get(&p) {
                        Some((m, content)) if st.map.leaves().file_read_valid(*m) => {
                            content.clone().unwrap_or_else(|| {
                                Arc::new([ZERO_CHUNK_HASH; LEAVES_PER_PAGE as usize])
                            })
                        }
                        _ => return Ok(None),
                    },
                };
                page = Some((p, got));
            }
            if let Some((_, leaves)) = &page {
                out.push(leaves[(c % LEAVES_PER_PAGE) as usize]);
            }
        }
        Ok(Some(out))
    }

    /// Root of the hash tree over all chunks, computing missing hashes first. Two copies
    /// with equal geometry and equal roots have equal content (up to BLAKE3 collisions).
    pub fn root(&self) -> Result<ChunkHash> {
        let top = self.tree_height() - 1;
        Ok(self
            .tree_level(top, 0..1)?
            .first()
            .copied()
            .unwrap_or(ZERO_CHUNK_HASH))
    }

    /// Node hashes of tree level `level` (0 = chunks, `tree_height() - 1` = root) for the
    /// node indices in `range` (clamped), computing missing hashes first. All values
    /// describe the image at one moment. Fails with [`StoreError::Busy`] when writes keep
    /// invalidating hashes.
    pub fn tree_level(&self, level: usize, range: Range<usize>) -> Result<Vec<ChunkHash>> {
        if level >= self.tree_height() {
            return Err(StoreError::invalid(
                "tree level",
                format!("{level}: the tree has {} levels", self.tree_height()),
            ));
        }
        let len = self.level_len(level);
        let end = (range.end as u64).min(len);
        let range = (range.start as u64).min(end)..end;
        for _ in 0..TREE_ATTEMPTS {
            self.hash_all()?;
            if !self.settle_tree()? {
                continue;
            }
            if level == 0 {
                if let Some(v) = self.read_leaves(range.clone())? {
                    return Ok(v);
                }
            } else {
                let mut st = lock(&self.state);
                if st.map.tree_current() {
                    let tree = st.map.tree();
                    return Ok(range.clone().map(|i| tree.node(level, i)).collect());
                }
            }
        }
        Err(StoreError::Busy)
    }

    /// A copy of the whole hash tree, computing missing hashes first. Holds every leaf in
    /// memory (32 bytes per chunk): for tests and small disks; compare-delta walks the
    /// tree with [`DiskImage::tree_level`] instead.
    pub fn tree(&self) -> Result<HashTree> {
        let leaves = self.tree_level(0, 0..self.chunk_count() as usize)?;
        Ok(HashTree::from_leaves(leaves, self.geometry.fanout()))
    }

    fn level_len(&self, level: usize) -> u64 {
        let fanout = u64::from(self.geometry.fanout());
        let mut n = self.geometry.chunk_count();
        for _ in 0..level {
            n = n.div_ceil(fanout);
        }
        n
    }

    /// Number of tree levels, leaves included.
    pub fn tree_height(&self) -> usize {
        let fanout = u64::from(self.geometry.fanout());
        let mut n = self.geometry.chunk_count();
        let mut h = 1;
        while n > 1 {
            n = n.div_ceil(fanout);
            h += 1;
        }
        h
    }

    /// The chunk ranges that may hold data, ascending, from chunk `from`: chunks that lie
    /// entirely in holes of the image file are skipped without being read or listed (one
    /// `SEEK_DATA`/`SEEK_HOLE` per range), so walking a sparse 16 TiB disk costs what its
    /// data regions cost. Never skips a chunk holding data; may yield chunks that read as
    /// zeros (allocated zeros, or file systems without `SEEK_DATA`, where it yields
    /// everything). For the initial sync of a replica.
    pub fn data_chunks(&self, from: u64) -> DataChunks<'_, B> {
        DataChunks {
            image: self,
            next: from,
        }
    }

    /// Bytes in the chunks that may hold data ([`DiskImage::data_chunks`] from chunk 0,
    /// whole chunks): what a first sync to an empty copy sends, so the total its progress
    /// is measured against. Cheap on sparse images (holes are skipped, never read).
    pub fn data_bytes(&self) -> Result<u64> {
        let chunk_size = u64::from(self.geometry.chunk_size());
        self.data_chunks(0).try_fold(0, |total, range| {
            let range = range?;
            Ok(total + (range.end - range.start) * chunk_size)
        })
    }

    // ---- dirty trackers -----------------------------------------------------------------

    /// Starts tracker `name`: from now on it collects every chunk written. Durable when it
    /// returns (this checkpoints). On error the tracker exists in memory but may not
    /// survive a crash; drop it or retry.
    pub fn start_tracking(&self, name: &str) -> Result<()> {
        self.ensure_usable()?;
        lock(&self.state).map.start_tracking(name)?;
        self.checkpoint()
    }

    /// Removes tracker `name`. Durable when it returns (this checkpoints).
    pub fn drop_tracking(&self, name: &str) -> Result<()> {
        self.ensure_usable()?;
        lock(&self.state).map.drop_tracking(name)?;
        self.checkpoint()
    }

    /// Names of all trackers.
    pub fn trackers(&self) -> Vec<String> {
        lock(&self.state).map.tracker_names()
    }

    /// The chunks tracker `name` holds dirty: a superset of the chunks written since it
    /// started (or since they were cleared). After a crash it may hold more, never fewer.
    /// Lists every one (8 bytes each): for large sets see
    /// [`DiskImage::dirty_chunks_from`].
    pub fn dirty_chunks(&self, name: &str) -> Result<DirtySet> {
        lock(&self.state).map.dirty_chunks(name)
    }

    /// Up to `max` chunks tracker `name` holds dirty, at or after chunk `start`, with the
    /// write position they were taken at: a large set in pieces. Each piece has its own
    /// `as_of`, to be passed back with that piece's chunks.
    pub fn dirty_chunks_from(&self, name: &str, start: u64, max: usize) -> Result<DirtySet> {
        lock(&self.state).map.dirty_chunks_from(name, start, max)
    }

    /// How many chunks tracker `name` holds dirty.
    pub fn dirty_count(&self, name: &str) -> Result<u64> {
        lock(&self.state).map.dirty_count(name)
    }

    /// The chunks dirty in tracker `name` whose last write started or finished after
    /// `as_of` (from an earlier [`DiskImage::dirty_chunks`]), ascending: what a resync's
    /// second pass must send after a first pass that read the chunks dirty at `as_of`.
    /// Never misses a chunk written after `as_of` (a write in flight at this call
    /// included); it may list a chunk written before when more than a quarter of a million
    /// chunks were written since (the write history is then kept per region).
    pub fn dirty_since(&self, name: &str, as_of: WriteSeq) -> Result<Vec<u64>> {
        lock(&self.state).map.dirty_since(name, as_of)
    }

    /// Clears `chunks` in tracker `name` once their content (read *after* `as_of` was
    /// obtained from [`DiskImage::dirty_chunks`]) is safe elsewhere. Chunks written after
    /// `as_of` stay dirty. Clears become durable at the next checkpoint; a crash before
    /// that brings them back (extra work, never a lost write). Returns the number cleared.
    pub fn clear(&self, name: &str, chunks: &[u64], as_of: WriteSeq) -> Result<u64> {
        lock(&self.state).map.clear(name, chunks, as_of)
    }

    // ---- snapshots ----------------------------------------------------------------------

    /// Copies the image to a new image `<dir>/disk-<id>.img` (with metadata, all hashes
    /// known, no trackers), skipping holes and all-zero chunks so the copy stays sparse.
    /// The copy is the image as it was at the call (a live snapshot copied to the end
    /// here), so no write may be in flight when it starts. The copy is durable when this
    /// returns; on error its files are removed.
    pub fn snapshot_to(&self, dir: &Path, id: &str) -> Result<DiskImage<FileBackend>> {
        // The live-snapshot machinery with nobody writing meanwhile: one way to copy.
        self.live_snapshot_begin(dir, id)?;
        let copied = (|| {
            while !self.live_snapshot_step(256)? {}
            self.live_snapshot_finish()
        })();
        if copied.is_err() {
            self.live_snapshot_abort();
        }
        copied
    }

    /// Starts a point-in-time copy to a new image `<dir>/disk-<id>.img` without holding
    /// writes back: from now on a write first copies the chunks it is about to change
    /// (once each), and [`DiskImage::live_snapshot_step`] copies the rest. The copy holds
    /// the image as it is at this call, so the caller must have no write in flight to it
    /// (the write pipeline calls this with writes paused, which takes microseconds).
    pub fn live_snapshot_begin(&self, dir: &Path, id: &str) -> Result<()> {
        self.ensure_usable()?;
        let mut live = lock(&self.live_copy);
        if live.is_some() {
            return Err(StoreError::invalid(
                "snapshot",
                format!(
                    "a snapshot of {} is already being copied",
                    self.backend.describe()
                ),
            ));
        }
        if lock(&self.state).log.inflight() > 0 {
            return Err(StoreError::invalid(
                "snapshot",
                "writes are in flight: hold them back before starting a snapshot".to_string(),
            ));
        }
        let dest = FileBackend::create(dir, id, self.size())?;
        *live = Some(LiveCopy {
            dir: dir.to_path_buf(),
            id: id.to_string(),
            dest,
            done: SparseBitmap::new(self.chunk_count()),
            next: 0,
            holes: HoleCursor::default(),
            buf: Vec::new(),
            failed: None,
        });
        Ok(())
    }

    /// Copies up to `max_chunks` more chunks of the running live snapshot (a run of
    /// chunks in a hole counts as one); `true` once every chunk is copied. Chunks are read
    /// without holding writers back: a chunk still not copied after the read was not
    /// written since the snapshot began (a writer saves it first), so what was read is the
    /// snapshot's content; otherwise the read is dropped.
    pub fn live_snapshot_step(&self, max_chunks: u64) -> Result<bool> {
        let mut buf = Vec::new();
        let n = self.chunk_count();
        for _ in 0..max_chunks {
            self.ensure_open()?;
            let c = {
                let mut live = lock(&self.live_copy);
                let Some(lc) = live.as_mut() else {
                    return Err(StoreError::invalid(
                        "snapshot",
                        "no snapshot is being copied".to_string(),
                    ));
                };
                if let Some(why) = &lc.failed {
                    return Err(StoreError::invalid("snapshot", why.clone()));
                }
                while lc.next < n && lc.done.get(lc.next) {
                    lc.next += 1;
                }
                if lc.next >= n {
                    return Ok(true);
                }
                let c = lc.next;
                if let Some(end) = lc.holes.hole_until(&self.backend, &self.geometry, c)? {
                    // Reads as zeros, as does the fresh copy (a writer into the hole
                    // waits for this lock, then finds its chunks done).
                    lc.done.set_range(c..end);
                    lc.next = end;
                    continue;
                }
                c
            };
            let h = self.read_hash(c, &mut buf)?;
            let mut live = lock(&self.live_copy);
            if let Some(lc) = live.as_mut().filter(|lc| !lc.done.get(c)) {
                lc.put_chunk(&self.geometry, c, &buf, h)?;
            }
        }
        Ok(lock(&self.live_copy)
            .as_ref()
            .is_some_and(|lc| lc.done.count_ones() == n))
    }

    fn ensure_open(&self) -> Result<()> {
        if lock(&self.state).closed {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// Finishes the live snapshot once every chunk is copied: makes the copy durable and
    /// returns it. On error the copy's files are removed.
    pub fn live_snapshot_finish(&self) -> Result<DiskImage<FileBackend>> {
        let mut live = lock(&self.live_copy);
        let complete = live
            .as_ref()
            .is_some_and(|lc| lc.failed.is_none() && lc.done.count_ones() == self.chunk_count());
        if !complete {
            return Err(StoreError::invalid(
                "snapshot",
                "the snapshot copy is not complete".to_string(),
            ));
        }
        let Some(lc) = live.take() else {
            return Err(StoreError::invalid(
                "snapshot",
                "no snapshot is being copied".to_string(),
            ));
        };
        drop(live);
        let LiveCopy { dir, id, dest, .. } = lc;
        let synced = dest
            .sync_data()
            .map_err(|e| StoreError::io(format!("fdatasync {}", dest.describe()), e));
        match synced.and_then(|()| DiskImage::init(dest, self.geometry, false)) {
            Ok(img) => Ok(img),
            Err(e) => {
                let _ = DiskImage::destroy(&dir, &id);
                Err(e)
            }
        }
    }

    /// Abandons a running live snapshot and removes its files.
    pub fn live_snapshot_abort(&self) {
        if let Some(lc) = lock(&self.live_copy).take() {
            let LiveCopy { dir, id, dest, .. } = lc;
            drop(dest);
            let _ = DiskImage::destroy(&dir, &id);
        }
    }

    /// Before a write changes `chunks`: copies the ones a running live snapshot still lacks.
    /// A failure fails the snapshot, never the write.
    fn preserve_for_snapshot(&self, chunks: Range<u64>) {
        let mut live = lock(&self.live_copy);
        let Some(lc) = live.as_mut().filter(|lc| lc.failed.is_none()) else {
            return;
        };
        for c in chunks {
            if !lc.done.get(c) {
                if let Err(e) = self.copy_chunk_to(lc, c) {
                    lc.failed = Some(format!("saving chunk {c} before a write failed: {e}"));
                    break;
                }
            }
        }
    }

    /// Copies chunk `c` as it is now into the live snapshot.
    fn copy_chunk_to(&self, lc: &mut LiveCopy, c: u64) -> Result<()> {
        let mut buf = std::mem::take(&mut lc.buf);
        let h = self.read_hash(c, &mut buf)?;
        let put = lc.put_chunk(&self.geometry, c, &buf, h);
        lc.buf = buf;
        put
    }
}

/// Converts a format-1 image: its chunk hashes go to a fresh chunk-hash file (synced);
/// the caller checkpoints the returned metadata in the current format before anything
/// else changes the image. Interrupted, it is simply done again from the old record.
fn upgrade_v1<B: Backend>(backend: &B, record: MetaRecordV1) -> Result<Meta> {
    let what = backend.describe();
    let generation = record.generation;
    let (meta, pages) = meta::upgrade_v1(record).map_err(|reason| StoreError::Corrupt {
        what: what.clone(),
        reason,
    })?;
    let io = |e| StoreError::io(format!("write chunk hashes of {what}"), e);
    let len = hash_file_len(meta.geometry.chunk_count());
    // From empty: an interrupted earlier upgrade may have left pages behind.
    backend.set_hashes_len(0).map_err(io)?;
    backend.set_hashes_len(len).map_err(io)?;
    for (p, page) in &pages {
        backend
            .write_hashes(page_bytes(page), p * PAGE_BYTES as u64)
            .map_err(io)?;
    }
    backend.sync_hashes().map_err(io)?;
    tracing::info!(image = %what, generation, pages = pages.len(), "metadata upgraded from format 1");
    Ok(meta)
}

fn write_meta<B: Backend>(backend: &B, meta: &Meta) -> Result<()> {
    let what = backend.describe();
    let bytes = meta::encode(meta).map_err(|e| StoreError::Corrupt {
        what: what.clone(),
        reason: format!("cannot encode metadata: {e}"),
    })?;
    backend
        .replace_meta(&bytes)
        .map_err(|e| StoreError::io(format!("write metadata of {what}"), e))
}

/// Chunk ranges of an image that may hold data, ascending; see [`DiskImage::data_chunks`].
pub struct DataChunks<'a, B: Backend> {
    image: &'a DiskImage<B>,
    next: u64,
}

impl<B: Backend> Iterator for DataChunks<'_, B> {
    type Item = Result<Range<u64>>;

    fn next(&mut self) -> Option<Self::Item> {
        let g = &self.image.geometry;
        let n = g.chunk_count();
        if self.next >= n {
            return None;
        }
        let cs = u64::from(g.chunk_size());
        match self.image.backend.next_data(g.chunk_offset(self.next)) {
            Err(e) => {
                self.next = n;
                Some(Err(StoreError::io(
                    format!("seek data in {}", self.image.backend.describe()),
                    e,
                )))
            }
            Ok(None) => {
                self.next = n;
                None
            }
            Ok(Some(r)) => {
                let first = (r.start / cs).max(self.next);
                if first >= n {
                    self.next = n;
                    return None;
                }
                let end = r.end.div_ceil(cs).clamp(first + 1, n);
                self.next = end;
                Some(Ok(first..end))
            }
        }
    }
}

/// Walks data regions forward to answer "is this chunk entirely in a hole?".
#[derive(Default)]
struct HoleCursor {
    /// The current data region, `None` before the first query; `Some(None)` when the rest
    /// of the image is a hole.
    region: Option<Option<Range<u64>>>,
}

impl HoleCursor {
    fn is_hole<B: Backend>(&mut self, backend: &B, g: &Geometry, chunk: u64) -> Result<bool> {
        let start = g.chunk_offset(chunk);
        let end = start + g.chunk_len(chunk) as u64;
        let stale = match &self.region {
            None => true,
            Some(Some(r)) => r.end <= start,
            Some(None) => false,
        };
        if stale {
            let r = backend
                .next_data(start)
                .map_err(|e| StoreError::io(format!("seek data in {}", backend.describe()), e))?;
            self.region = Some(r);
        }
        Ok(match &self.region {
            Some(Some(r)) => r.start >= end,
            _ => true,
        })
    }

    /// If `chunk` lies entirely in a hole: the first chunk after it that may hold data (the
    /// chunk count if none).
    fn hole_until<B: Backend>(
        &mut self,
        backend: &B,
        g: &Geometry,
        chunk: u64,
    ) -> Result<Option<u64>> {
        if !self.is_hole(backend, g, chunk)? {
            return Ok(None);
        }
        let n = g.chunk_count();
        Ok(Some(match &self.region {
            Some(Some(r)) => (r.start / u64::from(g.chunk_size())).clamp(chunk + 1, n),
            _ => n,
        }))
    }
}

// ---- async wrappers ----------------------------------------------------------------------

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

impl<B: Backend + 'static> DiskImage<B> {
    /// [`DiskImage::read_at`] of `len` bytes on tokio's blocking pool.
    pub async fn read_async(self: Arc<Self>, offset: u64, len: usize) -> Result<Bytes> {
        blocking(move || {
            let mut buf = vec![0; len];
            self.read_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    /// [`DiskImage::write_at`] on tokio's blocking pool.
    pub async fn write_async(self: Arc<Self>, offset: u64, data: Bytes) -> Result<()> {
        blocking(move || self.write_at(&data, offset)).await
    }

    /// [`DiskImage::flush`] on tokio's blocking pool.
    pub async fn flush_async(self: Arc<Self>) -> Result<()> {
        blocking(move || self.flush()).await
    }

    /// [`DiskImage::activate`] on tokio's blocking pool.
    pub async fn activate_async(self: Arc<Self>, offset: u64, len: u64) -> Result<()> {
        blocking(move || self.activate(offset, len)).await
    }

    /// [`DiskImage::chunk_hash`] on tokio's blocking pool.
    pub async fn chunk_hash_async(self: Arc<Self>, chunk: u64) -> Result<ChunkHash> {
        blocking(move || self.chunk_hash(chunk)).await
    }
}

#[cfg(test)]
mod idle_hash_tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn idle_hashing_completes_when_idle_and_gives_up_under_writes() {
        let dir = tempfile::tempdir().unwrap();
        let img = Arc::new(DiskImage::create(dir.path(), "t", 64 << 20).unwrap());
        let data = vec![0x5Au8; 1 << 20];
        for i in 0..64u64 {
            img.write_at(&data, i << 20).unwrap();
        }
        // The host is busy (a bulk transfer): no pass at all.
        assert!(img.hash_all_while_idle(|| true).unwrap().is_none());
        assert!((0..img.chunk_count()).all(|c| img.cached_hash(c).is_none()));
        // Idle: one pass leaves every hash known.
        let pass = img
            .hash_all_while_idle(|| false)
            .unwrap()
            .expect("idle image");
        assert_eq!(pass.read, img.chunk_count());
        assert!((0..img.chunk_count()).all(|c| img.cached_hash(c).is_some()));

        // Busy: a writer keeps changing the image, so the pass gives up.
        for i in 0..64u64 {
            img.write_at(&data, i << 20).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (img, stop) = (Arc::clone(&img), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    img.write_at(&[1u8; 4096], (i % 16_000) * 4096).unwrap();
                    i += 1;
                }
            })
        };
        // Let the writer start before the pass does.
        while lock(&img.state).map.write_count() < 64 * 4 + 2 {
            std::thread::yield_now();
        }
        let outcome = img.hash_all_while_idle(|| false).unwrap();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(outcome.is_none(), "a pass over a busy image must give up");
    }

    #[test]
    fn idle_hashing_stops_within_one_window_of_becoming_busy() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = 4 * IDLE_HASH_WINDOW as u64;
        let img = DiskImage::create(dir.path(), "t", chunks * 65536).unwrap();
        img.write_at(&vec![7u8; (chunks * 65536) as usize], 0)
            .unwrap();
        let looks = std::cell::Cell::new(0);
        // The host turns busy once the first window has been hashed. (Writes are looked
        // for at the same points; `busy` runs under the image's lock, so it cannot write.)
        let outcome = img
            .hash_all_while_idle(|| {
                looks.set(looks.get() + 1);
                looks.get() >= 2
            })
            .unwrap();
        assert!(outcome.is_none());
        let known = (0..chunks)
            .filter(|c| img.cached_hash(*c).is_some())
            .count();
        assert_eq!(
            known, IDLE_HASH_WINDOW,
            "hashing went on after the host turned busy"
        );
    }
}

#[cfg(test)]
mod activation_tests {
    use super::*;

    /// An extent activated ahead takes its write without another activity-log append
    /// (the sequencer activates off its lock, then writes under it without an fsync).
    #[test]
    fn a_write_to_an_activated_extent_appends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(dir.path(), "a", 64 << 20).unwrap();
        let [_, _, log, _] = crate::image_files(dir.path(), "a").unwrap();
        let log_len = || std::fs::metadata(&log).map_or(0, |m| m.len());
        assert!(img.is_active(0, 0), "an empty range needs nothing");
        assert!(!img.is_active(8 << 20, 4096));
        let before = log_len();
        img.activate(8 << 20, 4096).unwrap();
        assert!(img.is_active(8 << 20, 4096));
        let activated = log_len();
        assert!(activated > before, "no frame appended");
        img.write_at(&[7; 4096], (8 << 20) + 4096).unwrap();
        assert_eq!(log_len(), activated, "the write appended again");
        assert!(img.activate(64 << 20, 4096).is_err(), "out of range");
    }
}
