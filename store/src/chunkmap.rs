//! The pure, I/O-free chunk state of one image: cached chunk hashes, the hash tree, dirty
//! trackers, and how that state is saved to and recovered from the metadata record.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::bitmap::Bitmap;
use crate::error::{Result, StoreError};
use crate::geometry::Geometry;
use crate::hash::{ChunkHash, HashAlgo, ZERO_CHUNK_HASH};
use crate::tree::HashTree;

/// A point in the image's write history, used to clear dirty bits without losing writes
/// that raced with the caller (see [`ChunkMap::clear`]). Only meaningful for the image
/// instance that issued it.
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

/// Cached hashes, hash tree and dirty trackers of one image, with the decision logic for
/// keeping them right under concurrent writes and hashing. Pure: no I/O, no clock.
///
/// Protocol the caller must follow for every write to chunks `r`:
/// [`ChunkMap::write_started`]`(r)` before the data write is issued, and
/// [`ChunkMap::write_finished`]`(r)` after it returned (successfully or not). For every
/// hash it caches: take a [`HashTicket`] before reading the chunk and
/// [`ChunkMap::offer_hash`] the hash of what it read.
#[derive(Clone, Debug)]
pub struct ChunkMap {
    geometry: Geometry,
    /// Leaves are the cached chunk hashes; valid only where `known` is set.
    tree: HashTree,
    known: Bitmap,
    /// Sequence number of the last write start or end per chunk.
    last_write: Vec<u64>,
    seq: u64,
    trackers: BTreeMap<String, Bitmap>,
}

impl ChunkMap {
    /// State of a freshly created (all-zero) image: every hash known, no trackers.
    pub fn new_zeroed(geometry: Geometry) -> Self {
        let n = geometry.chunk_count();
        Self {
            geometry,
            tree: HashTree::from_leaves(vec![ZERO_CHUNK_HASH; n as usize], geometry.fanout()),
            known: Bitmap::full(n),
            last_write: vec![0; n as usize],
            seq: 0,
            trackers: BTreeMap::new(),
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
        for c in chunks {
            self.known.unset(c);
            if let Some(slot) = self.last_write.get_mut(c as usize) {
                *slot = s;
            }
        }
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

    /// The cached hash of `chunk`, if known.
    pub fn cached_hash(&self, chunk: u64) -> Option<ChunkHash> {
        if self.known.get(chunk) {
            self.tree
                .level(0, chunk as usize..chunk as usize + 1)
                .first()
                .copied()
        } else {
            None
        }
    }

    /// A ticket to offer a hash for `chunk` later; take it before reading the chunk.
    pub fn hash_ticket(&self, chunk: u64) -> HashTicket {
        HashTicket {
            chunk,
            seq: self.last_write.get(chunk as usize).copied().unwrap_or(0),
        }
    }

    /// Caches `hash`, the hash of data read after `ticket` was taken, unless a write to the
    /// chunk started or finished since. Returns whether it was cached.
    pub fn offer_hash(&mut self, ticket: HashTicket, hash: ChunkHash) -> bool {
        let c = ticket.chunk;
        if self.last_write.get(c as usize) != Some(&ticket.seq) {
            return false;
        }
        self.tree.set_leaf(c, hash);
        self.known.set(c);
        true
    }

    /// Chunks whose hash is not known, ascending.
    pub fn unknown_chunks(&self) -> Vec<u64> {
        self.unknown_chunks_from(0, usize::MAX)
    }

    /// Counts write starts and ends: unchanged between two calls means no write happened.
    pub fn write_count(&self) -> u64 {
        self.seq
    }

    /// Up to `max` chunks at or after `start` whose hash is not known, ascending.
    pub fn unknown_chunks_from(&self, start: u64, max: usize) -> Vec<u64> {
        (start..self.geometry.chunk_count())
            .filter(|&c| !self.known.get(c))
            .take(max)
            .collect()
    }

    /// The hash tree, brought up to date, if every chunk hash is known.
    pub fn tree(&mut self) -> Option<&HashTree> {
        if self.known.count_ones() != self.geometry.chunk_count() {
            return None;
        }
        self.tree.recompute();
        Some(&self.tree)
    }

    /// Starts a dirty tracker with no dirty chunks: from now on it collects every chunk
    /// whose write finishes.
    pub fn start_tracking(&mut self, name: &str) -> Result<()> {
        validate_tracker_name(name)?;
        if self.trackers.contains_key(name) {
            return Err(StoreError::TrackerExists(name.to_owned()));
        }
        self.trackers
            .insert(name.to_owned(), Bitmap::new(self.geometry.chunk_count()));
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

    /// The dirty chunks of tracker `name` now.
    pub fn dirty_chunks(&self, name: &str) -> Result<DirtySet> {
        let t = self
            .trackers
            .get(name)
            .ok_or_else(|| StoreError::UnknownTracker(name.to_owned()))?;
        Ok(DirtySet {
            chunks: t.iter_ones().collect(),
            as_of: WriteSeq(self.seq),
        })
    }

    /// The chunks dirty in tracker `name` that a write touched after `as_of`, ascending.
    pub fn dirty_since(&self, name: &str, as_of: WriteSeq) -> Result<Vec<u64>> {
        let t = self
            .trackers
            .get(name)
            .ok_or_else(|| StoreError::UnknownTracker(name.to_owned()))?;
        Ok(t.iter_ones()
            .filter(|&c| {
                self.last_write
                    .get(c as usize)
                    .is_some_and(|&s| s > as_of.0)
            })
            .collect())
    }

    /// Clears `chunks` in tracker `name`, except chunks a write touched after `as_of`
    /// (those stay dirty: the caller's copy of them may predate that write). The caller
    /// must have read the data it sent for these chunks after obtaining `as_of`. Returns
    /// how many bits were cleared. Indices out of range are ignored.
    pub fn clear(&mut self, name: &str, chunks: &[u64], as_of: WriteSeq) -> Result<u64> {
        let t = self
            .trackers
            .get_mut(name)
            .ok_or_else(|| StoreError::UnknownTracker(name.to_owned()))?;
        let mut cleared = 0;
        for &c in chunks {
            let quiet = self
                .last_write
                .get(c as usize)
                .is_some_and(|&s| s <= as_of.0);
            if quiet && t.get(c) {
                t.unset(c);
                cleared += 1;
            }
        }
        Ok(cleared)
    }

    /// Records that `chunk` holds `hash` without the ticket check; for callers that own
    /// the only reference to the data (a snapshot being built).
    pub(crate) fn set_hash(&mut self, chunk: u64, hash: ChunkHash) {
        self.tree.set_leaf(chunk, hash);
        self.known.set(chunk);
    }

    /// The persistent form of this state at metadata generation `generation`.
    pub(crate) fn to_record(&self, generation: u64) -> MetaRecord {
        let leaves = self.tree.level(0, 0..usize::MAX);
        let mut hashes = Vec::with_capacity(leaves.len() * 32);
        for (c, h) in leaves.iter().enumerate() {
            // Unknown leaves hold stale values; store zeros so stale data never leaks.
            if self.known.get(c as u64) {
                hashes.extend_from_slice(h);
            } else {
                hashes.extend_from_slice(&[0; 32]);
            }
        }
        MetaRecord {
            geometry: self.geometry,
            hash_algo: HashAlgo::Blake3,
            generation,
            hashes,
            known: self.known.clone(),
            trackers: self.trackers.clone(),
        }
    }

    /// Rebuilds the state from a decoded record, distrusting what `trust` says: those
    /// chunks lose their hash and become dirty in every tracker. Errors when the record is
    /// inconsistent with itself.
    pub(crate) fn recover(
        record: MetaRecord,
        trust: &Trust,
    ) -> Result<(Self, RecoveryReport), String> {
        record.geometry.validate().map_err(|e| e.to_string())?;
        let n = record.geometry.chunk_count();
        if record.hash_algo != HashAlgo::Blake3 {
            return Err(format!("unknown hash algorithm {:?}", record.hash_algo));
        }
        if record.hashes.len() as u64 != n * 32 {
            return Err(format!("{} hash bytes for {n} chunks", record.hashes.len()));
        }
        if record.known.len() != n || !record.known.is_well_formed() {
            return Err("hash-known bitmap does not match the chunk count".into());
        }
        for (name, t) in &record.trackers {
            if t.len() != n || !t.is_well_formed() {
                return Err(format!("tracker {name:?} does not match the chunk count"));
            }
        }
        let leaves = record
            .hashes
            .chunks_exact(32)
            .map(|h| {
                let mut a = [0; 32];
                a.copy_from_slice(h);
                a
            })
            .collect();
        let mut map = Self {
            geometry: record.geometry,
            tree: HashTree::from_leaves(leaves, record.geometry.fanout()),
            known: record.known,
            last_write: vec![0; n as usize],
            seq: 0,
            trackers: record.trackers,
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
            for c in r.clone() {
                map.known.unset(c);
            }
            for t in map.trackers.values_mut() {
                t.set_range(r.clone());
            }
        }
        let report = RecoveryReport {
            clean: *trust == Trust::Clean,
            untrusted_chunks: count,
            generation: record.generation,
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

/// The metadata checkpoint, stored with the codec in `disk-<id>.meta`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MetaRecord {
    pub(crate) geometry: Geometry,
    pub(crate) hash_algo: HashAlgo,
    /// Incremented by every checkpoint; pairs the record with its activity log.
    pub(crate) generation: u64,
    /// 32 bytes per chunk; meaningful where `known` is set.
    pub(crate) hashes: Vec<u8>,
    pub(crate) known: Bitmap,
    pub(crate) trackers: BTreeMap<String, Bitmap>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry::with_params(16 * 512, 512, 4, 2).unwrap()
    }

    #[test]
    fn writes_invalidate_and_mark_trackers() {
        let mut m = ChunkMap::new_zeroed(geo());
        m.start_tracking("r").unwrap();
        assert_eq!(m.cached_hash(3), Some(ZERO_CHUNK_HASH));
        m.write_started(2..4);
        assert_eq!(m.cached_hash(3), None);
        assert!(m.dirty_chunks("r").unwrap().chunks.is_empty());
        m.write_finished(2..4);
        assert_eq!(m.dirty_chunks("r").unwrap().chunks, vec![2, 3]);
        assert!(m.tree().is_none());
        assert_eq!(m.unknown_chunks(), vec![2, 3]);
    }

    #[test]
    fn hash_offered_across_a_write_is_refused() {
        let mut m = ChunkMap::new_zeroed(geo());
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
        assert_eq!(m.cached_hash(5), None);
        let t = m.hash_ticket(5);
        assert!(m.offer_hash(t, [9; 32]));
        assert_eq!(m.cached_hash(5), Some([9; 32]));
    }

    #[test]
    fn clear_keeps_chunks_written_after_the_snapshot() {
        let mut m = ChunkMap::new_zeroed(geo());
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
    fn dirty_since_names_only_chunks_written_after_the_mark() {
        let mut m = ChunkMap::new_zeroed(geo());
        m.start_tracking("r").unwrap();
        m.write_started(0..4);
        m.write_finished(0..4);
        let pass1 = m.dirty_chunks("r").unwrap();
        assert_eq!(m.dirty_since("r", pass1.as_of).unwrap(), Vec::<u64>::new());
        // Written while pass 1 ran: chunk 2 again and chunk 7 for the first time.
        m.write_started(2..3);
        m.write_finished(2..3);
        m.write_started(7..8);
        m.write_finished(7..8);
        assert_eq!(m.dirty_since("r", pass1.as_of).unwrap(), vec![2, 7]);
        assert_eq!(m.dirty_chunks("r").unwrap().chunks, vec![0, 1, 2, 3, 7]);
        assert!(matches!(
            m.dirty_since("nope", pass1.as_of),
            Err(StoreError::UnknownTracker(_))
        ));
    }

    #[test]
    fn recover_distrusts_exactly_the_named_extents() {
        let mut m = ChunkMap::new_zeroed(geo());
        m.start_tracking("r").unwrap();
        let rec = m.to_record(3);
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
        bad.hashes.pop();
        assert!(ChunkMap::recover(bad, &Trust::Clean).is_err());
    }
}
