//! When each chunk was last written, in bounded memory.
//!
//! Hash tickets and tracker clears ask "was chunk `c` written after sequence `s`?". An
//! exact answer needs a number per chunk (8 bytes: 128 MiB per TiB). This keeps exact
//! numbers only for recently written chunks and, past a bound, folds older ones into one
//! number per region of chunks (and of regions), which can only make a chunk look
//! written *later* than it was. So the answers stay safe: a hash may be refused and
//! recomputed, a dirty chunk may stay dirty and be sent again, but a write is never missed.

use std::collections::HashMap;
use std::ops::Range;

/// Chunks per region (64 MiB of disk at 64 KiB chunks).
const REGION: u64 = 1 << 10;
/// Chunks per zone (64 GiB of disk at 64 KiB chunks).
const ZONE: u64 = REGION * REGION;

/// Exact per-chunk entries kept before older ones are folded into regions (~5 MiB).
const CHUNKS_KEPT: usize = 1 << 18;
/// Region entries kept before older ones are folded into zones.
const REGIONS_KEPT: usize = 1 << 16;

/// Last write sequence per chunk, exact for recent writes, an upper bound for older ones.
#[derive(Clone, Debug, Default)]
pub(crate) struct WriteClock {
    chunks: HashMap<u64, u64>,
    regions: HashMap<u64, u64>,
    zones: HashMap<u64, u64>,
    chunks_kept: usize,
    regions_kept: usize,
}

impl WriteClock {
    pub(crate) fn new() -> Self {
        Self::with_bounds(CHUNKS_KEPT, REGIONS_KEPT)
    }

    fn with_bounds(chunks_kept: usize, regions_kept: usize) -> Self {
        Self {
            chunks_kept,
            regions_kept,
            ..Self::default()
        }
    }

    /// The sequence of the last write start or end on `c`, or a later one (0 if never).
    pub(crate) fn last(&self, c: u64) -> u64 {
        let exact = self.chunks.get(&c).copied().unwrap_or(0);
        let region = self.regions.get(&(c / REGION)).copied().unwrap_or(0);
        let zone = self.zones.get(&(c / ZONE)).copied().unwrap_or(0);
        exact.max(region).max(zone)
    }

    /// Records that `chunks` were written at `seq`, which must exceed every sequence
    /// recorded before. Whole zones and regions of a large range are recorded as such,
    /// so a whole-disk discard costs a few entries, not one per chunk.
    pub(crate) fn touch(&mut self, chunks: Range<u64>, seq: u64) {
        let mut c = chunks.start;
        while c < chunks.end {
            if c % ZONE == 0 && chunks.end - c >= ZONE {
                self.zones.insert(c / ZONE, seq);
                c += ZONE;
            } else if c % REGION == 0 && chunks.end - c >= REGION {
                self.regions.insert(c / REGION, seq);
                c += REGION;
            } else {
                self.chunks.insert(c, seq);
                c += 1;
            }
        }
        if self.chunks.len() > self.chunks_kept {
            fold(&mut self.chunks, &mut self.regions, REGION);
        }
        if self.regions.len() > self.regions_kept {
            fold(&mut self.regions, &mut self.zones, REGION);
        }
    }

    /// Entries held (for tests and memory estimates).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.chunks.len() + self.regions.len() + self.zones.len()
    }
}

/// Moves the older half of `fine` into `coarse` (keyed by `key / per`), keeping the
/// maximum: the coarse entry then bounds every folded one from above.
fn fold(fine: &mut HashMap<u64, u64>, coarse: &mut HashMap<u64, u64>, per: u64) {
    let mut seqs: Vec<u64> = fine.values().copied().collect();
    let mid = seqs.len() / 2;
    let (_, &mut median, _) = seqs.select_nth_unstable(mid);
    fine.retain(|&k, &mut s| {
        if s <= median {
            let slot = coarse.entry(k / per).or_insert(0);
            *slot = (*slot).max(s);
            false
        } else {
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn whole_disk_range_costs_a_few_entries() {
        let mut c = WriteClock::new();
        c.touch(0..16 * ZONE + 5, 1);
        assert_eq!(c.entries(), 16 + 5);
        assert_eq!(c.last(3 * ZONE + 17), 1);
        c.touch(7..8, 2);
        assert_eq!(c.last(7), 2);
        assert_eq!(c.last(8), 1);
    }

    proptest! {
        /// Never earlier than the truth (safety), and exact for the most recent writes.
        #[test]
        fn bounds_the_true_last_write_from_above(
            writes in proptest::collection::vec((0u64..5000, 1u64..40), 1..300),
        ) {
            let mut c = WriteClock::with_bounds(16, 4);
            let mut truth: HashMap<u64, u64> = HashMap::new();
            for (seq, &(start, len)) in writes.iter().enumerate() {
                let seq = seq as u64 + 1;
                c.touch(start..start + len, seq);
                for x in start..start + len {
                    truth.insert(x, seq);
                }
                // Folding keeps the entry count near the bounds, whatever was written.
                prop_assert!(c.entries() <= 16 + 40 + 4 + 40 + 1);
            }
            for x in 0..5100 {
                let t = truth.get(&x).copied().unwrap_or(0);
                prop_assert!(c.last(x) >= t, "chunk {} last {} < true {}", x, c.last(x), t);
            }
            let (start, len) = writes[writes.len() - 1];
            for x in start..start + len {
                prop_assert_eq!(c.last(x), writes.len() as u64);
            }
        }
    }
}
