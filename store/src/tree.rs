//! A Merkle tree over chunk hashes, for comparing two copies of a disk top-down.
//!
//! Level 0 holds the leaves (one chunk hash each); node `i` of level `l + 1` hashes the
//! children `i * fanout .. (i + 1) * fanout` of level `l` (the last node of a level may have
//! fewer). The top level has exactly one node, the root. Two copies with the same
//! [`Geometry`](crate::Geometry) have trees of the same shape, so nodes are compared by
//! (level, index).
//!
//! The compare-delta exchange walks down from the root: the receiver of a remote's hashes
//! for nodes `first..first + n` of a level calls [`HashTree::differing_nodes`], then asks for
//! the [`HashTree::children`] of each differing node, down to level 0, whose differing
//! indices are the chunks to send. [`diff_leaves`] runs that walk between two local trees.

use std::ops::Range;

use crate::bitmap::Bitmap;
use crate::hash::{ChunkHash, hash_node};

/// A hash tree whose reading methods describe the leaves as of the last
/// [`HashTree::from_leaves`] or [`HashTree::recompute`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashTree {
    fanout: usize,
    levels: Vec<Vec<ChunkHash>>,
    /// Leaves changed by `set_leaf` since the interior was last recomputed.
    pending: Bitmap,
}

impl HashTree {
    /// Builds the tree over `leaves` (at least one) with `fanout` (at least 2; smaller
    /// values are raised to 2).
    pub fn from_leaves(leaves: Vec<ChunkHash>, fanout: u32) -> Self {
        let fanout = (fanout as usize).max(2);
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = &levels[levels.len() - 1];
            let next = below.chunks(fanout).map(hash_node).collect();
            levels.push(next);
        }
        let n = levels[0].len() as u64;
        Self {
            fanout,
            levels,
            pending: Bitmap::new(n),
        }
    }

    /// Fan-out of interior nodes.
    pub fn fanout(&self) -> u32 {
        self.fanout as u32
    }

    /// Number of levels, leaves included; the root is at level `height() - 1`.
    pub fn height(&self) -> usize {
        self.levels.len()
    }

    /// Number of leaves (chunks).
    pub fn leaf_count(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// Number of nodes at `level` (0 past the top).
    pub fn level_len(&self, level: usize) -> usize {
        self.levels.get(level).map_or(0, Vec::len)
    }

    /// The root hash.
    pub fn root(&self) -> ChunkHash {
        // The top level has one node, except for a tree over zero leaves.
        self.levels
            .last()
            .and_then(|l| l.first().copied())
            .unwrap_or_else(|| hash_node(&[]))
    }

    /// Node hashes of `level` for the indices in `range`, clamped to the level.
    pub fn level(&self, level: usize, range: Range<usize>) -> &[ChunkHash] {
        let Some(l) = self.levels.get(level) else {
            return &[];
        };
        let end = range.end.min(l.len());
        &l[range.start.min(end)..end]
    }

    /// Indices at `level - 1` of the children of node `node` at `level` (empty for leaves).
    pub fn children(&self, level: usize, node: usize) -> Range<usize> {
        if level == 0 || level >= self.levels.len() {
            return 0..0;
        }
        let below = self.levels[level - 1].len();
        (node * self.fanout).min(below)..((node + 1) * self.fanout).min(below)
    }

    /// Leaves (chunk indices) covered by node `node` at `level`.
    pub fn leaf_range(&self, level: usize, node: usize) -> Range<u64> {
        let span = (self.fanout as u64).saturating_pow(level as u32);
        let n = self.leaf_count();
        (node as u64).saturating_mul(span).min(n)..(node as u64 + 1).saturating_mul(span).min(n)
    }

    /// Compares `remote`, the remote's hashes of nodes `first..first + remote.len()` at
    /// `level`, with ours and returns the absolute indices that differ, ascending. A remote
    /// node we do not have counts as differing.
    pub fn differing_nodes(&self, level: usize, first: usize, remote: &[ChunkHash]) -> Vec<usize> {
        let local = self.level(level, first..first + remote.len());
        remote
            .iter()
            .enumerate()
            .filter(|&(i, r)| local.get(i) != Some(r))
            .map(|(i, _)| first + i)
            .collect()
    }

    /// Changes leaf `index`; the interior is brought up to date by [`HashTree::recompute`].
    /// Out-of-range indices are ignored.
    pub fn set_leaf(&mut self, index: u64, hash: ChunkHash) {
        if let Some(slot) = self.levels[0].get_mut(index as usize) {
            if *slot != hash {
                *slot = hash;
                self.pending.set(index);
            }
        }
    }

    /// Whether every interior node reflects the current leaves.
    pub fn is_current(&self) -> bool {
        self.pending.none()
    }

    /// Recomputes the interior nodes above leaves changed since the last recompute.
    pub fn recompute(&mut self) {
        if self.pending.none() {
            return;
        }
        let mut dirty: Vec<usize> = self.pending.iter_ones().map(|i| i as usize).collect();
        self.pending = Bitmap::new(self.leaf_count());
        for level in 1..self.levels.len() {
            dirty = dirty.into_iter().map(|i| i / self.fanout).collect();
            dirty.dedup(); // ascending input, so duplicates are adjacent
            let (below, here) = self.levels.split_at_mut(level);
            let below = &below[level - 1];
            for &node in &dirty {
                let kids = (node * self.fanout)..((node + 1) * self.fanout).min(below.len());
                here[0][node] = hash_node(&below[kids]);
            }
        }
    }
}

/// The interior of an image's hash tree (levels 1 and up), for disks of any size: a node
/// whose subtree covers only zero chunks is not stored (its value is a per-level
/// constant), so a sparse disk's tree costs what is written, and a fully written disk's
/// about 32 bytes per `fanout` chunks. The leaves live elsewhere (the chunk-hash pages);
/// level-1 nodes are recomputed from them on demand, which is why stale level-1 nodes are
/// tracked apart from stale upper ones.
#[derive(Clone, Debug)]
pub(crate) struct SparseTree {
    fanout: u64,
    /// Nodes per level, level 0 being the leaves.
    lens: Vec<u64>,
    /// Value of a node over all-zero leaves, per level: any node but the last, and the last.
    zero: Vec<ChunkHash>,
    zero_last: Vec<ChunkHash>,
    /// Per level (index 0 unused): nodes whose value differs from the all-zero one.
    nodes: Vec<std::collections::HashMap<u64, ChunkHash>>,
    /// Level-1 nodes whose leaves may have changed since they were computed.
    stale1: crate::sparse::SparseBitmap,
    /// Nodes of levels 2 and up to recompute from their children, by (level, node).
    upper: std::collections::BTreeSet<(usize, u64)>,
}

impl SparseTree {
    /// The tree over `leaf_count` leaves; if `known_zero`, all leaves are zero hashes and
    /// the tree is current, else every level-1 node is stale.
    pub(crate) fn new(leaf_count: u64, fanout: u32, known_zero: bool) -> Self {
        let fanout = u64::from(fanout.max(2));
        let mut lens = vec![leaf_count.max(1)];
        while lens.last().is_some_and(|&n| n > 1) {
            let below = lens[lens.len() - 1];
            lens.push(below.div_ceil(fanout));
        }
        let mut zero = vec![crate::hash::ZERO_CHUNK_HASH];
        let mut zero_last = vec![crate::hash::ZERO_CHUNK_HASH];
        for l in 1..lens.len() {
            let kids = vec![zero[l - 1]; fanout as usize];
            zero.push(hash_node(&kids));
            let last_kids = lens[l - 1] - (lens[l] - 1) * fanout;
            let mut k = vec![zero[l - 1]; last_kids as usize];
            if let Some(last) = k.last_mut() {
                *last = zero_last[l - 1];
            }
            zero_last.push(hash_node(&k));
        }
        let level1 = lens.get(1).copied().unwrap_or(0);
        let mut stale1 = crate::sparse::SparseBitmap::new(level1);
        if !known_zero {
            stale1.set_range(0..level1);
        }
        Self {
            fanout,
            nodes: vec![std::collections::HashMap::new(); lens.len()],
            lens,
            zero,
            zero_last,
            stale1,
            upper: std::collections::BTreeSet::new(),
        }
    }

    /// Number of levels, leaves included.
    pub(crate) fn height(&self) -> usize {
        self.lens.len()
    }

    /// Nodes at `level` (0 past the top).
    pub(crate) fn level_len(&self, level: usize) -> u64 {
        self.lens.get(level).copied().unwrap_or(0)
    }

    /// Value of node `i` of `level` when its leaves are all zero.
    pub(crate) fn zero_node(&self, level: usize, i: u64) -> ChunkHash {
        if i + 1 == self.level_len(level) {
            self.zero_last[level]
        } else {
            self.zero[level]
        }
    }

    /// Node `i` of `level` >= 1 (meaningful when [`SparseTree::is_current`]).
    pub(crate) fn node(&self, level: usize, i: u64) -> ChunkHash {
        self.nodes
            .get(level)
            .and_then(|m| m.get(&i))
            .copied()
            .unwrap_or_else(|| self.zero_node(level, i))
    }

    fn set_node(&mut self, level: usize, i: u64, h: ChunkHash) {
        if h == self.zero_node(level, i) {
            self.nodes[level].remove(&i);
        } else {
            self.nodes[level].insert(i, h);
        }
    }

    /// Leaf `c` changed value.
    pub(crate) fn leaf_changed(&mut self, c: u64) {
        self.stale1.set(c / self.fanout);
    }

    /// Whether every interior node reflects the leaves.
    pub(crate) fn is_current(&self) -> bool {
        self.stale1.none() && self.upper.is_empty()
    }

    /// Whether some level-1 node is stale.
    pub(crate) fn has_stale_level1(&self) -> bool {
        !self.stale1.none()
    }

    /// Up to `max` stale level-1 nodes, ascending.
    pub(crate) fn stale_level1(&self, max: usize) -> Vec<u64> {
        self.stale1.iter_ones_from(0).take(max).collect()
    }

    /// The caller now holds the leaves of `nodes` as they are: they stop being stale
    /// (a later leaf change makes them stale again).
    pub(crate) fn begin_level1(&mut self, nodes: &[u64]) {
        for &n in nodes {
            self.stale1.unset(n);
        }
    }

    /// Installs a level-1 value computed from leaves taken at
    /// [`SparseTree::begin_level1`], unless a leaf changed since.
    pub(crate) fn install_level1(&mut self, node: u64, h: ChunkHash) {
        if self.stale1.get(node) {
            return;
        }
        if self.node(1, node) != h {
            self.set_node(1, node, h);
            if self.height() > 2 {
                self.upper.insert((2, node / self.fanout));
            }
        }
    }

    /// Leaves covered by level-1 node `n`.
    #[cfg(test)]
    pub(crate) fn leaves_of(&self, n: u64) -> Range<u64> {
        let leaves = self.level_len(0);
        (n * self.fanout).min(leaves)..((n + 1) * self.fanout).min(leaves)
    }

    /// Recomputes up to `max` stale nodes of levels 2 and up from their children (which
    /// must be current below). Returns whether none is left.
    pub(crate) fn recompute_upper(&mut self, max: usize) -> bool {
        for _ in 0..max {
            let Some((level, i)) = self.upper.pop_first() else {
                return true;
            };
            let below = self.level_len(level - 1);
            let kids: Vec<ChunkHash> = (i * self.fanout..((i + 1) * self.fanout).min(below))
                .map(|k| self.node(level - 1, k))
                .collect();
            let h = hash_node(&kids);
            if self.node(level, i) != h {
                self.set_node(level, i, h);
                if level + 1 < self.height() {
                    self.upper.insert((level + 1, i / self.fanout));
                }
            }
        }
        self.upper.is_empty()
    }
}

/// The chunk indices at which `local` and `remote` differ, found by the same top-down walk
/// the compare-delta exchange performs (so equal subtrees are skipped at their root).
/// Trees of different shape (leaf count or fan-out) share nothing: every chunk is returned.
pub fn diff_leaves(local: &HashTree, remote: &HashTree) -> Vec<u64> {
    if local.leaf_count() != remote.leaf_count() || local.fanout != remote.fanout {
        return (0..local.leaf_count().max(remote.leaf_count())).collect();
    }
    let top = local.height() - 1;
    let mut frontier = local.differing_nodes(top, 0, remote.level(top, 0..1));
    for level in (0..top).rev() {
        let mut next = Vec::new();
        for parent in frontier {
            let kids = local.children(level + 1, parent);
            next.extend(local.differing_nodes(level, kids.start, remote.level(level, kids)));
        }
        frontier = next;
    }
    frontier.into_iter().map(|i| i as u64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn leaf(i: u64, salt: u8) -> ChunkHash {
        let mut h = [salt; 32];
        h[..8].copy_from_slice(&i.to_le_bytes());
        h
    }

    #[test]
    fn shape_of_small_trees() {
        let t = HashTree::from_leaves(vec![leaf(0, 0)], 64);
        assert_eq!(t.height(), 1);
        assert_eq!(t.root(), leaf(0, 0));
        let t = HashTree::from_leaves((0..65).map(|i| leaf(i, 0)).collect(), 64);
        assert_eq!(t.height(), 3);
        assert_eq!(t.level_len(1), 2);
        assert_eq!(t.children(1, 1), 64..65);
        assert_eq!(t.children(2, 0), 0..2);
        assert_eq!(t.leaf_range(1, 1), 64..65);
        assert_eq!(t.leaf_range(2, 0), 0..65);
    }

    #[test]
    fn equal_trees_compare_at_the_root() {
        let a = HashTree::from_leaves((0..5000).map(|i| leaf(i, 0)).collect(), 16);
        let b = a.clone();
        assert_eq!(a.root(), b.root());
        assert!(diff_leaves(&a, &b).is_empty());
    }

    #[test]
    fn different_shapes_share_nothing() {
        let a = HashTree::from_leaves((0..10).map(|i| leaf(i, 0)).collect(), 4);
        let b = HashTree::from_leaves((0..11).map(|i| leaf(i, 0)).collect(), 4);
        assert_eq!(diff_leaves(&a, &b).len(), 11);
    }

    /// Brings a sparse tree up to date from `leaves` the way the image does.
    fn settle(t: &mut SparseTree, leaves: &[ChunkHash]) {
        while t.has_stale_level1() {
            let nodes = t.stale_level1(7);
            t.begin_level1(&nodes);
            for n in nodes {
                let r = t.leaves_of(n);
                t.install_level1(n, hash_node(&leaves[r.start as usize..r.end as usize]));
            }
        }
        while !t.recompute_upper(3) {}
    }

    proptest! {
        #[test]
        fn sparse_tree_equals_the_dense_one(
            n in 1u64..3000,
            fanout in 2u32..70,
            changes in proptest::collection::vec((any::<u64>(), any::<bool>()), 0..40),
        ) {
            let mut leaves = vec![crate::hash::ZERO_CHUNK_HASH; n as usize];
            let mut fresh = SparseTree::new(n, fanout, true);
            let dense = HashTree::from_leaves(leaves.clone(), fanout);
            prop_assert!(fresh.is_current());
            prop_assert_eq!(fresh.height(), dense.height());
            prop_assert_eq!(
                if fresh.height() == 1 { leaves[0] } else { fresh.node(fresh.height() - 1, 0) },
                dense.root()
            );
            for (c, zero) in changes {
                let c = c % n;
                leaves[c as usize] = if zero { crate::hash::ZERO_CHUNK_HASH } else { leaf(c, 1) };
                fresh.leaf_changed(c);
            }
            settle(&mut fresh, &leaves);
            let mut opened = SparseTree::new(n, fanout, false);
            settle(&mut opened, &leaves);
            let dense = HashTree::from_leaves(leaves.clone(), fanout);
            for t in [&fresh, &opened] {
                prop_assert!(t.is_current());
                for level in 1..dense.height() {
                    for i in 0..dense.level_len(level) {
                        prop_assert_eq!(t.node(level, i as u64), dense.level(level, i..i + 1)[0]);
                    }
                }
            }
        }

        #[test]
        fn diff_finds_exactly_the_changed_leaves(
            n in 1u64..3000,
            fanout in 2u32..70,
            changes in proptest::collection::vec(any::<u64>(), 0..40),
        ) {
            let base: Vec<_> = (0..n).map(|i| leaf(i, 0)).collect();
            let a = HashTree::from_leaves(base.clone(), fanout);
            let changed: BTreeSet<u64> = changes.iter().map(|c| c % n).collect();
            let mut leaves = base;
            for &c in &changed {
                leaves[c as usize] = leaf(c, 1);
            }
            let b = HashTree::from_leaves(leaves, fanout);
            prop_assert_eq!(diff_leaves(&a, &b), changed.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(a.root() == b.root(), changed.is_empty());

            // Incremental updates reach the same tree as a rebuild.
            let mut inc = a.clone();
            for &c in &changed {
                inc.set_leaf(c, leaf(c, 1));
            }
            prop_assert_eq!(inc.is_current(), changed.is_empty());
            inc.recompute();
            prop_assert_eq!(inc, b);
        }
    }
}
