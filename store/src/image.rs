//! [`DiskImage`]: the I/O shell around the pure [`ChunkMap`] and [`ActivityLog`].

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use crate::activity::{ActivityLog, LogEntry, decide_trust, encode_frame, encode_log, parse_log};
use crate::backend::{Backend, FileBackend, image_paths};
use crate::bitmap::Bitmap;
use crate::chunkmap::{ChunkMap, DirtySet, MetaRecord, RecoveryReport, Trust, WriteSeq};
use crate::error::{Result, StoreError};
use crate::geometry::Geometry;
use crate::hash::{ChunkHash, ZERO_CHUNK_HASH, hash_chunk};
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

/// Counts from a hashing pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashPass {
    /// Chunks read and hashed.
    pub read: u64,
    /// Chunks found in holes and given [`ZERO_CHUNK_HASH`] without reading.
    pub holes: u64,
}

struct State {
    map: ChunkMap,
    log: ActivityLog,
    generation: u64,
    closed: bool,
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
pub struct DiskImage<B: Backend = FileBackend> {
    backend: B,
    geometry: Geometry,
    state: Mutex<State>,
    /// Signalled when the last in-flight write returns (for `close`).
    idle: Condvar,
    /// Held by the one thread appending to or replacing the activity log. Writers queue
    /// here, so one append + fsync admits every writer that queued meanwhile.
    log_leader: Mutex<()>,
    /// Serialises checkpoints. Lock order: checkpointing, then log_leader, then state.
    checkpointing: Mutex<()>,
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
    /// The copy's chunk hashes, filled as chunks are copied.
    map: ChunkMap,
    /// Chunks already in `dest` (or known to be zero).
    done: Bitmap,
    /// Where the background copier goes on.
    next: u64,
    holes: HoleCursor,
    buf: Vec<u8>,
    /// Why the copy failed while a writer was saving a chunk: the write goes on (a
    /// snapshot must never fail a guest write), the snapshot does not.
    failed: Option<String>,
}

impl LiveCopy {
    /// Stores chunk `c`'s snapshot content `data` (hash `h`); all-zero chunks stay holes.
    fn put_chunk(&mut self, g: &Geometry, c: u64, data: &[u8], h: ChunkHash) -> Result<()> {
        if h != ZERO_CHUNK_HASH {
            let off = g.chunk_offset(c);
            self.dest.write_at(data, off).map_err(|e| {
                StoreError::io(format!("write {off} of {}", self.dest.describe()), e)
            })?;
        }
        self.map.set_hash(c, h);
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
        let backend = FileBackend::create(dir, id, geometry.size())?;
        Self::init(backend, ChunkMap::new_zeroed(geometry))
    }

    /// Opens `<dir>/disk-<id>.img`, recovering its metadata if it was not closed cleanly
    /// (see [`DiskImage::recovery`]). The recovery is durable when this returns.
    pub fn open(dir: &Path, id: &str) -> Result<Self> {
        Self::open_on(FileBackend::open(dir, id)?)
    }

    /// Deletes the image and its metadata. The caller must make sure nobody has it open.
    pub fn destroy(dir: &Path, id: &str) -> Result<()> {
        for p in image_paths(dir, id)? {
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
        Self::init(backend, ChunkMap::new_zeroed(geometry))
    }

    /// Writes the first metadata and log for `map`, which must describe the backend's data.
    fn init(backend: B, map: ChunkMap) -> Result<Self> {
        let what = backend.describe();
        let len = backend
            .image_len()
            .map_err(|e| StoreError::io(format!("stat {what}"), e))?;
        if len != map.geometry().size() {
            return Err(StoreError::invalid(
                "image",
                format!("{what} is {len} bytes, expected {}", map.geometry().size()),
            ));
        }
        let generation = 1;
        write_meta(&backend, &map.to_record(generation))?;
        backend
            .replace_log(&encode_log(generation, false, &[]))
            .map_err(|e| StoreError::io(format!("write activity log of {what}"), e))?;
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
        let record: MetaRecord =
            convoy_codec::decode(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let len = backend
            .image_len()
            .map_err(|e| StoreError::io(format!("stat {what}"), e))?;
        if len != record.geometry.size() {
            return Err(corrupt(format!(
                "image is {len} bytes, metadata says {}",
                record.geometry.size()
            )));
        }
        let log = backend
            .read_log()
            .map_err(|e| StoreError::io(format!("read activity log of {what}"), e))?
            .as_deref()
            .and_then(parse_log);
        let trust = decide_trust(record.generation, log.as_ref());
        let (map, report) = ChunkMap::recover(record, &trust).map_err(corrupt)?;
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
            // Make the recovered state durable so the same work is not redone.
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
            }),
            idle: Condvar::new(),
            log_leader: Mutex::new(()),
            checkpointing: Mutex::new(()),
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

    /// Sets how many active extents make [`DiskImage::flush`] also checkpoint.
    pub fn set_activity_limit(&self, extents: u64) {
        self.activity_limit.store(extents, Ordering::Relaxed);
    }

    fn ensure_open(&self) -> Result<()> {
        if lock(&self.state).closed {
            Err(StoreError::Closed)
        } else {
            Ok(())
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
    /// even if it failed.
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

    /// Waits until `extents` are durably active, then counts the write in flight and
    /// invalidates `chunks`.
    fn admit(&self, extents: Range<u32>, chunks: Range<u64>) -> Result<()> {
        loop {
            {
                let mut st = lock(&self.state);
                if st.closed {
                    return Err(StoreError::Closed);
                }
                if st.log.admit(extents.clone()) {
                    st.map.write_started(chunks);
                    return Ok(());
                }
            }
            let _leader = lock(&self.log_leader);
            let batch = lock(&self.state).log.take_batch(extents.clone());
            if batch.is_empty() {
                continue;
            }
            let frame = encode_frame(&LogEntry::Active {
                extents: batch.clone(),
            });
            self.backend.append_log(&frame).map_err(|e| {
                StoreError::io(
                    format!("append to activity log of {}", self.backend.describe()),
                    e,
                )
            })?;
            lock(&self.state).log.batch_durable(&batch);
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
    /// checkpoints, which bounds the work of a crash recovery.
    pub fn flush(&self) -> Result<()> {
        self.ensure_open()?;
        self.backend
            .sync_data()
            .map_err(|e| StoreError::io(format!("fdatasync {}", self.backend.describe()), e))?;
        let over =
            lock(&self.state).log.active_count() > self.activity_limit.load(Ordering::Relaxed);
        if over { self.checkpoint() } else { Ok(()) }
    }

    /// Writes the metadata (hashes, trackers) durably and shrinks the activity log to the
    /// extents written since. Also flushes the data (hashes in the checkpoint must describe
    /// durable content). Safe to call concurrently with writes.
    pub fn checkpoint(&self) -> Result<()> {
        self.checkpoint_inner(false)
    }

    fn checkpoint_inner(&self, closing: bool) -> Result<()> {
        let _one = lock(&self.checkpointing);
        let what = self.backend.describe();
        let (record, generation) = {
            let mut st = lock(&self.state);
            if st.closed && !closing {
                return Err(StoreError::Closed);
            }
            st.log.begin_checkpoint();
            let g = st.generation + 1;
            (st.map.to_record(g), g)
        };
        let abort = |e: StoreError| {
            lock(&self.state).log.abort_checkpoint();
            e
        };
        // Every hash in the snapshot was computed from data written before the snapshot;
        // flushing now makes that data durable before the metadata claims it.
        self.backend
            .sync_data()
            .map_err(|e| abort(StoreError::io(format!("fdatasync {what}"), e)))?;
        write_meta(&self.backend, &record).map_err(abort)?;
        let _leader = lock(&self.log_leader);
        let keep = {
            let mut st = lock(&self.state);
            st.generation = generation;
            st.log.cut_over()
        };
        let clean = closing && keep.is_empty();
        self.backend
            .replace_log(&encode_log(generation, clean, &keep))
            .map_err(|e| StoreError::io(format!("write activity log of {what}"), e))?;
        tracing::debug!(image = %what, generation, active = keep.len(), clean, "checkpoint");
        Ok(())
    }

    /// Closes the image: refuses new writes, waits for writes in flight, checkpoints and
    /// marks the metadata clean, so the next open trusts it completely. Later calls that
    /// change the image fail with [`StoreError::Closed`]. Dropping an image without closing
    /// is safe but makes the next open recover as after a crash.
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
        }
        self.checkpoint_inner(true)
    }

    // ---- hashes -------------------------------------------------------------------------

    /// The cached hash of `chunk`, without computing it. `None` when unknown or past the
    /// end. A returned hash always equals the hash of the chunk's current content unless a
    /// write to it is in flight.
    pub fn cached_hash(&self, chunk: u64) -> Option<ChunkHash> {
        lock(&self.state).map.cached_hash(chunk)
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
        let ticket = {
            let st = lock(&self.state);
            if let Some(h) = st.map.cached_hash(chunk) {
                return Ok(h);
            }
            st.map.hash_ticket(chunk)
        };
        let mut buf = Vec::new();
        let h = self.read_hash(chunk, &mut buf)?;
        lock(&self.state).map.offer_hash(ticket, h);
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
            let mut st = lock(&self.state);
            for (t, h) in done {
                st.map.offer_hash(t, h);
            }
        }
    }

    fn with_tree<T>(&self, f: impl Fn(&HashTree) -> T) -> Result<T> {
        for _ in 0..TREE_ATTEMPTS {
            self.hash_all()?;
            if let Some(t) = lock(&self.state).map.tree() {
                return Ok(f(t));
            }
        }
        Err(StoreError::Busy)
    }

    /// Root of the hash tree over all chunks, computing missing hashes first. Two copies
    /// with equal geometry and equal roots have equal content (up to BLAKE3 collisions).
    pub fn root(&self) -> Result<ChunkHash> {
        self.with_tree(HashTree::root)
    }

    /// Node hashes of tree level `level` (0 = chunks, `tree_height() - 1` = root) for the
    /// node indices in `range` (clamped), computing missing hashes first.
    pub fn tree_level(&self, level: usize, range: Range<usize>) -> Result<Vec<ChunkHash>> {
        if level >= self.tree_height() {
            return Err(StoreError::invalid(
                "tree level",
                format!("{level}: the tree has {} levels", self.tree_height()),
            ));
        }
        self.with_tree(|t| t.level(level, range.clone()).to_vec())
    }

    /// A copy of the whole hash tree, computing missing hashes first.
    pub fn tree(&self) -> Result<HashTree> {
        self.with_tree(HashTree::clone)
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

    // ---- dirty trackers -----------------------------------------------------------------

    /// Starts tracker `name`: from now on it collects every chunk written. Durable when it
    /// returns (this checkpoints). On error the tracker exists in memory but may not
    /// survive a crash; drop it or retry.
    pub fn start_tracking(&self, name: &str) -> Result<()> {
        {
            let mut st = lock(&self.state);
            if st.closed {
                return Err(StoreError::Closed);
            }
            st.map.start_tracking(name)?;
        }
        self.checkpoint()
    }

    /// Removes tracker `name`. Durable when it returns (this checkpoints).
    pub fn drop_tracking(&self, name: &str) -> Result<()> {
        {
            let mut st = lock(&self.state);
            if st.closed {
                return Err(StoreError::Closed);
            }
            st.map.drop_tracking(name)?;
        }
        self.checkpoint()
    }

    /// Names of all trackers.
    pub fn trackers(&self) -> Vec<String> {
        lock(&self.state).map.tracker_names()
    }

    /// The chunks tracker `name` holds dirty: a superset of the chunks written since it
    /// started (or since they were cleared). After a crash it may hold more, never fewer.
    pub fn dirty_chunks(&self, name: &str) -> Result<DirtySet> {
        lock(&self.state).map.dirty_chunks(name)
    }

    /// The chunks tracker `name` holds dirty that a write started or finished on after
    /// `as_of` (from an earlier [`DiskImage::dirty_chunks`]): what a copy read chunk by
    /// chunk since `as_of` may have missed. A resync's second pass sends only these.
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
        self.ensure_open()?;
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
            map: ChunkMap::new_zeroed(self.geometry),
            done: Bitmap::new(self.chunk_count()),
            next: 0,
            holes: HoleCursor::default(),
            buf: Vec::new(),
            failed: None,
        });
        Ok(())
    }

    /// Copies up to `max_chunks` more chunks of the running live snapshot; `true` once every
    /// chunk is copied. Chunks are read without holding writers back: a chunk still not
    /// copied after the read was not written since the snapshot began (a writer saves it
    /// first), so what was read is the snapshot's content; otherwise the read is dropped.
    pub fn live_snapshot_step(&self, max_chunks: u64) -> Result<bool> {
        let mut buf = Vec::new();
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
                let n = self.chunk_count();
                while lc.next < n && lc.done.get(lc.next) {
                    lc.next += 1;
                }
                if lc.next >= n {
                    return Ok(true);
                }
                let c = lc.next;
                if lc.holes.is_hole(&self.backend, &self.geometry, c)? {
                    // Reads as zeros, as does the fresh copy (a writer into the hole
                    // waits for this lock, then finds the chunk done).
                    lc.done.set(c);
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
            .is_some_and(|lc| lc.done.count_ones() == self.chunk_count()))
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
        let LiveCopy {
            dir, id, dest, map, ..
        } = lc;
        let synced = dest
            .sync_data()
            .map_err(|e| StoreError::io(format!("fdatasync {}", dest.describe()), e));
        match synced.and_then(|()| DiskImage::init(dest, map)) {
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

fn write_meta<B: Backend>(backend: &B, record: &MetaRecord) -> Result<()> {
    let what = backend.describe();
    let bytes = convoy_codec::encode(record).map_err(|e| StoreError::Corrupt {
        what: what.clone(),
        reason: format!("cannot encode metadata: {e}"),
    })?;
    backend
        .replace_meta(&bytes)
        .map_err(|e| StoreError::io(format!("write metadata of {what}"), e))
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
