//! The chunk hashes (leaves of the hash tree) of one image, kept in a file of 32 bytes per
//! chunk and cached here by 4 KiB pages in bounded memory. Pure: the caller reads and
//! writes the file when this asks it to.
//!
//! Why pages may be written to the file at any time, not only at checkpoints: the file's
//! slot for a chunk the durable metadata calls *known* only ever changes after that chunk
//! was written (its hash became unknown, then was computed anew), and a written chunk is
//! in the activity log until the next checkpoint, so recovery distrusts it anyway. What
//! must hold is the other direction: every page dirty when a checkpoint takes its
//! snapshot is in the file, synced, before that checkpoint's metadata.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::hash::{ChunkHash, ZERO_CHUNK_HASH};

/// Hashes per page.
pub(crate) const LEAVES_PER_PAGE: u64 = 128;
/// Bytes per page of the chunk-hash file.
pub(crate) const PAGE_BYTES: usize = 4096;

/// One page of chunk hashes.
pub(crate) type LeafPage = [ChunkHash; LEAVES_PER_PAGE as usize];

/// Length of the chunk-hash file of a disk of `chunks` chunks: whole pages.
pub(crate) fn hash_file_len(chunks: u64) -> u64 {
    chunks.div_ceil(LEAVES_PER_PAGE) * PAGE_BYTES as u64
}

/// The page holding chunk `c`'s hash.
pub(crate) fn page_of(c: u64) -> u64 {
    c / LEAVES_PER_PAGE
}

/// A page's bytes as stored in the file.
pub(crate) fn page_bytes(p: &LeafPage) -> &[u8] {
    p.as_flattened()
}

/// A page from its stored bytes (`PAGE_BYTES` of them).
pub(crate) fn page_from_bytes(bytes: &[u8]) -> LeafPage {
    let mut p = [ZERO_CHUNK_HASH; LEAVES_PER_PAGE as usize];
    for (slot, h) in p.iter_mut().zip(bytes.chunks_exact(32)) {
        slot.copy_from_slice(h);
    }
    p
}

/// Default number of pages kept cached per image (4 MiB: the hashes of 8 GiB of disk).
pub(crate) const DEFAULT_CACHED_PAGES: usize = 1024;

/// The smallest cache allowed.
pub(crate) const MIN_CACHED_PAGES: usize = 4;

/// Evictions remembered, to tell whether a page read from the file may be stale.
const EVICTIONS_REMEMBERED: usize = 1 << 14;

/// Permission to install a page read from the file after this was issued (see
/// [`LeafCache::install`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageMiss {
    pub(crate) page: u64,
    evictions: u64,
}

#[derive(Clone, Debug)]
struct Cached {
    leaves: Arc<LeafPage>,
    /// Differs from the file.
    dirty: bool,
    /// Being written to the file: must stay cached until that returns, so nobody reads the
    /// file's older content meanwhile.
    pinned: bool,
    used: u64,
}

/// Cached pages of chunk hashes, with their dirty state.
#[derive(Clone, Debug)]
pub(crate) struct LeafCache {
    pages: HashMap<u64, Cached>,
    capacity: usize,
    tick: u64,
    /// Evictions so far, and the pages of the most recent ones (newest last).
    evictions: u64,
    evicted: VecDeque<u64>,
    dirty: usize,
}

impl LeafCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            pages: HashMap::new(),
            capacity: capacity.max(MIN_CACHED_PAGES),
            tick: 0,
            evictions: 0,
            evicted: VecDeque::new(),
            dirty: 0,
        }
    }

    /// Pages that differ from the file.
    pub(crate) fn dirty_pages(&self) -> usize {
        self.dirty
    }

    /// Pages cached.
    #[cfg(test)]
    pub(crate) fn cached_pages(&self) -> usize {
        self.pages.len()
    }

    /// The pages-kept bound.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the pages-kept bound (at least `MIN_CACHED_PAGES`).
    pub(crate) fn set_capacity(&mut self, pages: usize) {
        self.capacity = pages.max(MIN_CACHED_PAGES);
        self.evict(None);
    }

    /// Chunk `c`'s stored hash if its page is cached (whether the hash is valid is the
    /// caller's business).
    pub(crate) fn get(&mut self, c: u64) -> Option<ChunkHash> {
        self.tick += 1;
        let tick = self.tick;
        let page = self.pages.get_mut(&page_of(c))?;
        page.used = tick;
        Some(page.leaves[(c % LEAVES_PER_PAGE) as usize])
    }

    /// Page `p` if cached, without counting a use.
    pub(crate) fn peek(&self, p: u64) -> Option<Arc<LeafPage>> {
        self.pages.get(&p).map(|c| Arc::clone(&c.leaves))
    }

    /// Whether page `p` is cached.
    pub(crate) fn contains(&self, p: u64) -> bool {
        self.pages.contains_key(&p)
    }

    /// A ticket to read page `p` from the file and [`LeafCache::install`] it.
    pub(crate) fn miss(&self, p: u64) -> PageMiss {
        PageMiss {
            page: p,
            evictions: self.evictions,
        }
    }

    /// Whether the file content of `p`, read after `miss` was issued, is still what the
    /// map holds for it: true unless `p` was evicted since (then it may have been loaded,
    /// changed, written back and evicted again, and the read may predate that write).
    pub(crate) fn file_read_valid(&self, miss: PageMiss) -> bool {
        let since = self.evictions - miss.evictions;
        match usize::try_from(since) {
            Ok(n) if n <= self.evicted.len() => {
                !self.evicted.iter().rev().take(n).any(|&e| e == miss.page)
            }
            _ => false,
        }
    }

    /// Caches page `miss.page` with `leaves` read from the file after `miss` was issued.
    /// Returns false (nothing cached) if the read may be stale: read again.
    pub(crate) fn install(&mut self, miss: PageMiss, leaves: LeafPage) -> bool {
        if self.pages.contains_key(&miss.page) {
            return true;
        }
        if !self.file_read_valid(miss) {
            return false;
        }
        self.tick += 1;
        self.pages.insert(
            miss.page,
            Cached {
                leaves: Arc::new(leaves),
                dirty: false,
                pinned: false,
                used: self.tick,
            },
        );
        // Not the page just read: when every other page is dirty, it would be the only
        // candidate, and the caller would read it again forever.
        self.evict(Some(miss.page));
        true
    }

    /// Sets chunk `c`'s hash. `None` if its page is not cached; else whether the value
    /// changed.
    pub(crate) fn set(&mut self, c: u64, h: ChunkHash) -> Option<bool> {
        self.tick += 1;
        let tick = self.tick;
        let page = self.pages.get_mut(&page_of(c))?;
        page.used = tick;
        let slot = (c % LEAVES_PER_PAGE) as usize;
        if page.leaves[slot] == h {
            return Some(false);
        }
        Arc::make_mut(&mut page.leaves)[slot] = h;
        if !page.dirty {
            page.dirty = true;
            self.dirty += 1;
        }
        Some(true)
    }

    /// Takes up to `max` dirty pages (ascending) to write to the file: they count as clean
    /// and stay cached (pinned) until [`LeafCache::written`].
    pub(crate) fn take_dirty(&mut self, max: usize) -> Vec<(u64, Arc<LeafPage>)> {
        let mut keys: Vec<u64> = self
            .pages
            .iter()
            .filter(|(_, c)| c.dirty && !c.pinned)
            .map(|(&p, _)| p)
            .collect();
        keys.sort_unstable();
        keys.truncate(max);
        let mut out = Vec::with_capacity(keys.len());
        for p in keys {
            if let Some(c) = self.pages.get_mut(&p) {
                c.dirty = false;
                c.pinned = true;
                self.dirty -= 1;
                out.push((p, Arc::clone(&c.leaves)));
            }
        }
        out
    }

    /// The pages taken by [`LeafCache::take_dirty`] were written (`ok`) or not: unpins
    /// them, and marks them dirty again on failure.
    pub(crate) fn written(&mut self, pages: &[u64], ok: bool) {
        for p in pages {
            if let Some(c) = self.pages.get_mut(p) {
                c.pinned = false;
                if !ok && !c.dirty {
                    c.dirty = true;
                    self.dirty += 1;
                }
            }
        }
        self.evict(None);
    }

    /// Drops least recently used clean pages (but `keep`) while over capacity (to 7/8 of
    /// it, so evictions come in batches). Dirty and pinned pages stay, even past it.
    fn evict(&mut self, keep: Option<u64>) {
        if self.pages.len() <= self.capacity {
            return;
        }
        let mut clean: Vec<(u64, u64)> = self
            .pages
            .iter()
            .filter(|&(&p, c)| !c.dirty && !c.pinned && Some(p) != keep)
            .map(|(&p, c)| (c.used, p))
            .collect();
        let excess = self.pages.len() - self.capacity * 7 / 8;
        if clean.len() > excess {
            clean.select_nth_unstable(excess);
            clean.truncate(excess);
        }
        for (_, p) in clean {
            self.pages.remove(&p);
            self.evictions += 1;
            self.evicted.push_back(p);
            if self.evicted.len() > EVICTIONS_REMEMBERED {
                self.evicted.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> LeafPage {
        [[v; 32]; LEAVES_PER_PAGE as usize]
    }

    #[test]
    fn a_read_that_raced_with_an_eviction_of_its_page_is_refused() {
        let mut c = LeafCache::new(64);
        let m = c.miss(5);
        // Page 5 gets loaded, changed, written back and evicted meanwhile.
        assert!(c.install(c.miss(5), page(1)));
        assert_eq!(c.set(5 * LEAVES_PER_PAGE, [2; 32]), Some(true));
        let taken = c.take_dirty(10);
        assert_eq!(taken.len(), 1);
        c.written(&[5], true);
        for p in 100..200 {
            assert!(c.install(c.miss(p), page(0)));
        }
        assert!(!c.contains(5), "page 5 should have been evicted");
        assert!(!c.install(m, page(1)), "a stale read must be refused");
        assert!(c.install(c.miss(5), page(2)));
        // Reads of other pages are not disturbed by unrelated evictions.
        let m7 = c.miss(7);
        for p in 200..300 {
            assert!(c.install(c.miss(p), page(0)));
        }
        assert!(c.install(m7, page(0)));
    }

    #[test]
    fn dirty_and_pinned_pages_are_never_evicted() {
        let mut c = LeafCache::new(64);
        assert!(c.install(c.miss(1), page(0)));
        c.set(LEAVES_PER_PAGE, [9; 32]);
        assert!(c.install(c.miss(2), page(0)));
        c.set(2 * LEAVES_PER_PAGE, [9; 32]);
        let taken = c.take_dirty(1);
        assert_eq!(taken[0].0, 1);
        for p in 10..500 {
            assert!(c.install(c.miss(p), page(0)));
        }
        assert!(c.contains(1) && c.contains(2));
        assert!(c.cached_pages() <= 64 + 2);
        // With every page dirty, a page just read stays (or a lookup would loop).
        let mut full = LeafCache::new(4);
        for p in 0..6 {
            assert!(full.install(full.miss(p), page(0)));
            full.set(p * LEAVES_PER_PAGE, [1; 32]);
        }
        assert!(full.install(full.miss(9), page(0)));
        assert!(full.get(9 * LEAVES_PER_PAGE).is_some());
        c.written(&[1], false);
        assert_eq!(
            c.dirty_pages(),
            2,
            "a failed write-back leaves the page dirty"
        );
        assert_eq!(hash_file_len(129), 2 * PAGE_BYTES as u64);
        assert_eq!(page_from_bytes(page_bytes(&page(3))), page(3));
    }
}
