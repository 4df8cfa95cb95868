//! The pure, I/O-free chunk state of one image: cached chunk hashes, the hash tree, dirty
//! trackers, and how that state is saved to and recovered from the metadata record.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::clock::WriteClock;
use crate::error::{Result, StoreError};
use crate::geometry::Geometry;
use crate::hash::ChunkHash;
use crate::leaves::{DEFAULT_CACHED_PAGES, LeafCache, PageMiss, page_from_bytes, page_of};
use crate::meta::Meta;
use crate::sparse::SparseBitmap;
use crate::tree::SparseTree;

/// A point in the image's write history, used to clear dirty bits without losing writes
/// that raced with the caller (see [`ChunkMap::clear`]) and to ask what was written since
/// (see [`ChunkMap::dirty_since`]). Only meaningful for the image instance that issued it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WriteSeq(u64);

/// The dirty chunks of one tracker at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    /// Dirty chunk indices, ascending.
    pub chunks: Vec<u64>,
    /// The write position the set was taken at; pass it back to `clear`.
    pub as_of: WriteSeq,
}

/// Permission to cache a hash for one chunk, taken before reading the chunk; the hash is
/// accepted only if no write touched the chunk since (see [`ChunkMap::offer_hash`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashTicket {
    chunk: u64,
    seq: u64,
}

impl HashTicket {
    /// The chunk this ticket is for.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }
}

/// Which chunks recovery must distrust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The image was closed cleanly: the record is exact.
    Clean,
    /// The chunks of these extents may differ from the record; the rest are exact.
    Extents(Vec<u32>),
    /// Nothing is known to be exact (activity log missing or unreadable).
    Nothing,
}

/// What opening an image found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The previous user closed the image cleanly; nothing had to be distrusted.
    pub clean: bool,
    /// Chunks whose hash was dropped and which were marked dirty in every tracker.
    pub untrusted_chunks: u64,
    /// The metadata generation the image was opened at.
    pub generation: u64,
}

/// What the map knows of one chunk's hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leaf {
    /// Not known: a write touched the chunk since it was last hashed (or recovery
    /// distrusts it).
    Unknown,
    /// Known.
    Known(ChunkHash),
    /// Known, but its page of the chunk-hash file is not cached: read the page and
    /// [`ChunkMap::install_page`] it.
    NotCached(PageMiss),
}

/// Cached hashes, hash tree and dirty trackers of one image, with the decision logic for
/// keeping them right under concurrent writes and hashing. Pure: no I/O, no clock. The
/// chunk hashes themselves live in the chunk-hash file, of which this caches pages in
/// bounded memory; where a page is needed, it says so and the caller reads it.
///
/// Memory follows what was written, not the disk size: bitmaps are sparse, the write
/// history is bounded (exact for recent writes, per region for older ones), the tree
/// stores only nodes over non-zero chunks, and at most a bounded number of hash pages is
/// cached (plus those not yet written back).
///
/// Protocol the caller must follow for every write to chunks `r`:
/// [`ChunkMap::write_started`]`(r)` before the data write is issued, and
/// [`ChunkMap::write_finished`]`(r)` after it returned (successfully or not). For every
/// hash it caches: take a [`HashTicket`] before reading the chunk and
/// [`ChunkMap::offer_hash`] the hash of what it read.
#[derive(Clone, Debug)]
pub struct ChunkMap {
    geometry: Geometry,
    /// Chunks whose stored hash is not valid.
    unknown: SparseBitmap,
    /// When each chunk was last written (start or end of a write).
    clock: WriteClock,
    seq: u64,
    trackers: BTreeMap<String, SparseBitmap>,
    leaves: LeafCache,
    tree: SparseTree,
}

impl ChunkMap {
    /// State of a freshly created (all-zero) image: every hash known, no trackers.
    pub fn new_zeroed(geometry: Geometry) -> Self {
        let n = geometry.chunk_count();
        Self {
            geometry,
            unknown: SparseBitmap::new(n),
            clock: WriteClock::new(),
            seq: 0,
            trackers: BTreeMap::new(),
            leaves: LeafCache::new(DEFAULT_CACHED_PAGES),
            tree: SparseTree::new(n, geometry.fanout(), true),
        }
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn invalidate(&mut self, chunks: Range<u64>) {
        let s = self.next_seq();
        self.clock.touch(chunks.clone(), s);
        self.unknown.set_range(chunks);
    }

    /// A write to `chunks` is about to be issued: their hashes become unknown and any hash
    /// computation already under way for them will not be cached.
    pub fn write_started(&mut self, chunks: Range<u64>) {
        self.invalidate(chunks);
    }

    /// A write to `chunks` returned (even with an error: the data may be partly written).
    /// Hashes become unknown again (a hash computed during the write may have seen torn
    /// data) and every tracker marks the chunks dirty.
    pub fn write_finished(&mut self, chunks: Range<u64>) {
        self.invalidate(chunks.clone());
        for t in self.trackers.values_mut() {
            t.set_range(chunks.clone());
        }
    }

    /// Chunks whose hashes are forgotten without being written (their slots in the
    /// chunk-hash file are not to be trusted); trackers are untouched.
    pub(crate) fn forget_hashes(&mut self, chunks: Range<u64>) {
        self.invalidate(chunks);
    }

    /// What is known of `chunk`'s hash (past the end: unknown).
    pub(crate) fn leaf(&mut self, chunk: u64) -> Leaf {
        if chunk >= self.geometry.chunk_count() || self.unknown.get(chunk) {
            return Leaf::Unknown;
        }
        match self.leaves.get(chunk) {
            Some(h) => Leaf::Known(h),
            None => Leaf::NotCached(self.leaves.miss(page_of(chunk))),
        }
    }

    /// A ticket to read page `p` of the chunk-hash file, or `None` if it is cached.
    pub(crate) fn page_miss(&self, p: u64) -> Option<PageMiss> {
        (!self.leaves.contains(p)).then(|| self.leaves.miss(p))
    }

    /// Caches a page of the chunk-hash file read after `miss` was issued; false if the
    /// read may be stale (read again).
    pub(crate) fn install_page(&mut self, miss: PageMiss, bytes: &[u8]) -> bool {
        self.leaves.install(miss, page_from_bytes(bytes))
    }

    /// The page cache (write-back and tree building work on it directly).
    pub(crate) fn leaves(&mut self) -> &mut LeafCache {
        &mut self.leaves
    }

    /// A ticket to offer a hash for `chunk` later; take it before reading the chunk.
    pub fn hash_ticket(&self, chunk: u64) -> HashTicket {
        HashTicket {
            chunk,
            seq: self.clock.last(chunk),
        }
    }

    /// Caches `hash`, the hash of data read after `ticket` was taken, unless a write to the
    /// chunk started or finished since, or the chunk's page of the chunk-hash file is not
    /// cached (the caller loads it first; if it was evicted meanwhile, the hash is simply
    /// not kept). Returns whether it was cached.
    pub fn offer_hash(&mut self, ticket: HashTicket, hash: ChunkHash) -> bool {
        let c = ticket.chunk;
        if c >= self.geometry.chunk_count() || self.clock.last(c) != ticket.seq {
            return false;
        }
        match self.leaves.set(c, hash) {
            None => false,
            Some(changed) => {
                if changed {
                    self.tree.leaf_changed(c);
                }
                self.unknown.unset(c);
                true
            }
        }
    }

    /// Chunks whose hash is not known, ascending.
    pub fn unknown_chunks(&self) -> Vec<u64> {
        self.unknown_chunks_from(0, usize::MAX)
    }

    /// Number of chunks whose hash is not known.
    pub fn unknown_count(&self) -> u64 {
        self.unknown.count_ones()
    }

    /// Counts write starts and ends: unchanged between two calls means no write happened.
    pub fn write_count(&self) -> u64 {
        self.seq
    }

    /// The current point of the write history.
    pub fn write_seq(&self) -> WriteSeq {
        WriteSeq(self.seq)
    }

    /// Up to `max` chunks at or after `start` whose hash is not known, ascending.
    pub fn unknown_chunks_from(&self, start: u64, max: usize) -> Vec<u64> {
        self.unknown.iter_ones_from(start).take(max).collect()
    }

    /// The tree's interior, and whether it (with every leaf known) describes the image.
    pub(crate) fn tree(&mut self) -> &mut SparseTree {
        &mut self.tree
    }

    /// Whether every chunk hash is known and the tree's interior is up to date.
    pub(crate) fn tree_current(&self) -> bool {
        self.unknown.none() && self.tree.is_current()
    }

    /// Starts a dirty tracker with no dirty chunks: from now on it collects every chunk
    /// whose write finishes.
    pub fn start_tracking(&mut self, name: &str) -> Result<()> {
        validate_tracker_name(name)?;
        if self.trackers.contains_key(name) {
            return Err(StoreError::TrackerExists(name.to_owned()));
        }
        self.trackers.insert(
            name.to_owned(),
            SparseBitmap::new(self.geometry.chunk_count()),
        );
        Ok(())
    }

    /// Removes a tracker.
    pub fn drop_tracking(&mut self, name: &str) -> Result<()> {
        self.trackers
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| StoreError::UnknownTracker(name.to_owned()))
    }

    /// Names of all trackers, sorted.
    pub fn tracker_names(&self) -> Vec<String> {
        self.trackers.keys().cloned().collect()
    }

    fn tracker(&self, name: &str) -> Result<&SparseBitmap> {
        self.trackers
            .get(name)
            .ok_or_else(|| StoreError::UnknownTracker(name.to_owned()))
    }

    /// The dirty chunks of tracker `name` now.
    pub fn dirty_chunks(&self, name: &str) -> Result<DirtySet> {
        self.dirty_chunks_from(name, 0, usize::MAX)
    }

    /// Up to `max` dirty chunks of tracker `name` at or after `start`, ascending, and the
    /// write position they were taken at: for walking a large set in pieces.
    pub fn dirty_chunks_from(&self, name: &str, start: u64, max: usize) -> Result<DirtySet> {
        let t = self.tracker(name)?;
        Ok(DirtySet {
            chunks: t.iter_ones_from(start).take(max).collect(),
            as_of: WriteSeq(self.seq),
        })
    }

    /// Number of dirty chunks of tracker `name`.
    pub fn dirty_count(&self, name: &str) -> Result<u64> {
        Ok(self.tracker(name)?.count_ones())
    }

    /// The chunks dirty in tracker `name` whose last write started or finished after
    /// `as_of`, ascending. Never misses such a chunk; may include chunks last written
    /// before `as_of` when the image's write history was folded (more than a quarter of a
    /// million chunks written since: older history is kept per region).
    pub fn dirty_since(&self, name: &str, as_of: WriteSeq) -> Result<Vec<u64>> {
        let t = self.tracker(name)?;
        Ok(t.iter_ones_from(0)
            .filter(|&c| self.clock.last(c) > as_of.0)
            .collect())
    }

    /// Clears `chunks` in tracker `name`, except chunks a write touched after `as_of`
    /// (those stay dirty: the caller's copy of them may predate that write). The caller
    /// must have read the data it sent for these chunks after obtaining `as_of`. Returns
    /// how many bits were cleared. Indices out of range are ignored.
    pub fn clear(&mut self, name: &str, chunks: &[u64], as_of: WriteSeq) -> Result<u64> {
        let clock = &self.clock;
        let t = self
            .trackers
            .get_mut(name)
            .ok_or_else(|| StoreError::UnknownTracker(name.to_owned()))?;
        let mut cleared = 0;
        for &c in chunks {
            if clock.last(c) <= as_of.0 && t.get(c) {
                t.unset(c);
                cleared += 1;
            }
        }
        Ok(cleared)
    }

    /// The persistent form of this state at metadata generation `generation`. Costs a
    /// pointer copy per bitmap page (pages are shared copy-on-write), not a copy of the
    /// bits, so it can be taken under the image's lock.
    pub(crate) fn snapshot(&self, generation: u64) -> Meta {
        Meta {
            geometry: self.geometry,
            generation,
            unknown: self.unknown.clone(),
            trackers: self.trackers.clone(),
        }
    }

    /// Rebuilds the state from a decoded record, distrusting what `trust` says: those
    /// chunks lose their hash and become dirty in every tracker. Errors when the record is
    /// inconsistent with itself.
    pub(crate) fn recover(meta: Meta, trust: &Trust) -> Result<(Self, RecoveryReport), String> {
        meta.geometry.validate().map_err(|e| e.to_string())?;
        let n = meta.geometry.chunk_count();
        if meta.unknown.len() != n || meta.trackers.values().any(|t| t.len() != n) {
            return Err("a bitmap does not match the chunk count".into());
        }
        let mut map = Self {
            geometry: meta.geometry,
            unknown: meta.unknown,
            clock: WriteClock::new(),
            seq: 0,
            trackers: meta.trackers,
            leaves: LeafCache::new(DEFAULT_CACHED_PAGES),
            // The interior is not stored: rebuilt from the chunk-hash file when asked for.
            tree: SparseTree::new(n, meta.geometry.fanout(), false),
        };
        let untrusted: Vec<Range<u64>> = match trust {
            Trust::Clean => Vec::new(),
            Trust::Extents(es) => es
                .iter()
                .map(|&e| map.geometry.extent_chunk_range(e))
                .collect(),
            Trust::Nothing => std::iter::once(0..n).collect(),
        };
        let mut count = 0;
        for r in untrusted {
            count += r.end - r.start;
            map.unknown.set_range(r.clone());
            for t in map.trackers.values_mut() {
                t.set_range(r.clone());
            }
        }
        let report = RecoveryReport {
            clean: *trust == Trust::Clean,
            untrusted_chunks: count,
            generation: meta.generation,
        };
        Ok((map, report))
    }
}

fn validate_tracker_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 256 {
        return Err(StoreError::invalid(
            "tracker name",
            "must be 1 to 256 bytes",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ZERO_CHUNK_HASH;
    use crate::leaves::PAGE_BYTES;

    fn geo() -> Geometry {
        Geometry::with_params(16 * 512, 512, 4, 2).unwrap()
    }

    /// A fresh map with its (only) hash page cached, as if read from a fresh file.
    fn loaded() -> ChunkMap {
        let mut m = ChunkMap::new_zeroed(geo());
        let miss = m.page_miss(0).unwrap();
        assert!(m.install_page(miss, &[0; PAGE_BYTES]));
        m
    }

    fn known(m: &mut ChunkMap, c: u64) -> Option<ChunkHash> {
        match m.leaf(c) {
            Leaf::Known(h) => Some(h),
            Leaf::Unknown => None,
            Leaf::NotCached(_) => panic!("page not cached"),
        }
    }

    #[test]
    fn writes_invalidate_and_mark_trackers() {
        let mut m = loaded();
        m.start_tracking("r").unwrap();
        assert_eq!(known(&mut m, 3), Some(ZERO_CHUNK_HASH));
        m.write_started(2..4);
        assert_eq!(known(&mut m, 3), None);
        assert!(m.dirty_chunks("r").unwrap().chunks.is_empty());
        m.write_finished(2..4);
        assert_eq!(m.dirty_chunks("r").unwrap().chunks, vec![2, 3]);
        assert!(!m.tree_current());
        assert_eq!(m.unknown_chunks(), vec![2, 3]);
    }

    #[test]
    fn hash_offered_across_a_write_is_refused() {
        let mut m = loaded();
        // Hash read before a write started, offered after it finished.
        let t = m.hash_ticket(5);
        m.write_started(5..6);
        m.write_finished(5..6);
        assert!(!m.offer_hash(t, [7; 32]));
        // Hash read while the write was in flight, offered before it finished: cached, but
        // the finish drops it again.
        m.write_started(5..6);
        let t = m.hash_ticket(5);
        assert!(m.offer_hash(t, [8; 32]));
        m.write_finished(5..6);
        assert_eq!(known(&mut m, 5), None);
        let t = m.hash_ticket(5);
        assert!(m.offer_hash(t, [9; 32]));
        assert_eq!(known(&mut m, 5), Some([9; 32]));
        // Its tree node is stale now.
        assert!(!m.tree.is_current());
    }

    #[test]
    fn a_hash_for_a_page_not_cached_is_not_kept() {
        let mut m = ChunkMap::new_zeroed(geo());
        m.write_started(1..2);
        m.write_finished(1..2);
        let t = m.hash_ticket(1);
        assert!(!m.offer_hash(t, [1; 32]));
        assert!(matches!(m.leaf(0), Leaf::NotCached(_)));
        assert_eq!(m.leaf(1), Leaf::Unknown);
    }

    #[test]
    fn clear_keeps_chunks_written_after_the_snapshot() {
        let mut m = loaded();
        m.start_tracking("r").unwrap();
        m.write_started(0..3);
        m.write_finished(0..3);
        let d = m.dirty_chunks("r").unwrap();
        m.write_started(1..2);
        m.write_finished(1..2);
        assert_eq!(m.clear("r", &d.chunks, d.as_of).unwrap(), 2);
        assert_eq!(m.dirty_chunks("r").unwrap().chunks, vec![1]);
        assert!(matches!(
            m.clear("nope", &[], d.as_of),
            Err(StoreError::UnknownTracker(_))
        ));
        assert!(matches!(
            m.start_tracking("r"),
            Err(StoreError::TrackerExists(_))
        ));
    }

    #[test]
    fn dirty_since_holds_exactly_the_chunks_written_after_the_point() {
        let mut m = loaded();
        m.start_tracking("r").unwrap();
        m.write_started(0..4);
        m.write_finished(0..4);
        let pass1 = m.dirty_chunks("r").unwrap();
        // During "pass 1": one chunk rewritten, one new, and one write still in flight.
        m.write_started(2..3);
        m.write_finished(2..3);
        m.write_started(9..10);
        m.write_finished(9..10);
        m.write_started(12..13);
        assert_eq!(m.dirty_since("r", pass1.as_of).unwrap(), vec![2, 9]);
        m.write_finished(12..13);
        assert_eq!(m.dirty_since("r", pass1.as_of).unwrap(), vec![2, 9, 12]);
        // Nothing written since now.
        assert!(m.dirty_since("r", m.write_seq()).unwrap().is_empty());
        // Only chunks the tracker holds: a cleared one written before the point is not
        // listed, one written after is.
        m.clear("r", &[0, 2], pass1.as_of).unwrap();
        assert_eq!(m.dirty_chunks("r").unwrap().chunks, vec![1, 2, 3, 9, 12]);
        assert_eq!(m.dirty_since("r", pass1.as_of).unwrap(), vec![2, 9, 12]);
        assert_eq!(m.dirty_chunks_from("r", 3, 2).unwrap().chunks, vec![3, 9]);
        assert!(matches!(
            m.dirty_since("nope", pass1.as_of),
            Err(StoreError::UnknownTracker(_))
        ));
    }

    #[test]
    fn recover_distrusts_exactly_the_named_extents() {
        let mut m = ChunkMap::new_zeroed(geo());
        m.start_tracking("r").unwrap();
        let rec = m.snapshot(3);
        let (r, rep) = ChunkMap::recover(rec.clone(), &Trust::Extents(vec![1])).unwrap();
        assert_eq!(r.unknown_chunks(), vec![4, 5, 6, 7]);
        assert_eq!(r.dirty_chunks("r").unwrap().chunks, vec![4, 5, 6, 7]);
        assert_eq!(rep.untrusted_chunks, 4);
        assert!(!rep.clean);
        let (r, rep) = ChunkMap::recover(rec.clone(), &Trust::Nothing).unwrap();
        assert_eq!(r.unknown_chunks().len(), 16);
        assert_eq!(rep.generation, 3);
        let (r, rep) = ChunkMap::recover(rec.clone(), &Trust::Clean).unwrap();
        assert!(rep.clean && r.unknown_chunks().is_empty());
        let mut bad = rec;
        bad.unknown = SparseBitmap::new(3);
        assert!(ChunkMap::recover(bad, &Trust::Clean).is_err());
    }
}
