//! The source's side of the hash exchange as a pure state machine ([`Walk`]), and the
//! grouping of chunks to send into data frames ([`Batcher`]).
//!
//! The walk starts at the roots. A node whose hash differs from the destination's is
//! expanded: the hashes of its children are requested, compared, and so on down to level
//! 0, whose differing indices are the chunks to send. Requests are batched (many nodes per
//! [`Want`], bounded by a hash budget) and pipelined (several in flight; answers arrive in
//! request order), and the deepest pending level is always requested first so chunks
//! start flowing before the whole tree has been walked.

use std::collections::VecDeque;
use std::ops::Range;

use convoy_store::{ChunkHash, Geometry, ZERO_CHUNK_HASH};

use crate::proto::{NodeRange, Run, TreeShape};

/// Stands for a local hash that is not known; never equal to [`ZERO_CHUNK_HASH`], so the
/// chunk is read rather than assumed zero.
const UNKNOWN_HASH: ChunkHash = [0xff; 32];

/// One request of the walk: the children of `nodes` at `level`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Want {
    pub(crate) level: u32,
    pub(crate) nodes: Vec<NodeRange>,
}

/// A request in flight, with the child ranges its answer must cover.
#[derive(Clone, Debug)]
pub(crate) struct Outstanding {
    /// Level of the children (the answer's level).
    pub(crate) child_level: usize,
    /// Child ranges, in answer order.
    pub(crate) children: Vec<Range<u64>>,
}

impl Outstanding {
    fn hashes(&self) -> u64 {
        self.children.iter().map(|r| r.end - r.start).sum()
    }
}

/// A chunk found to differ, with the source's hash it was compared with (so a chunk
/// known to be zero can be sent as a zero marker without reading it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Differing {
    pub(crate) chunk: u64,
    pub(crate) local: ChunkHash,
}

/// The source's walk down the two hash trees.
#[derive(Debug)]
pub(crate) struct Walk {
    shape: TreeShape,
    /// Per level: nodes found differing whose children have not been requested yet.
    pending: Vec<VecDeque<u64>>,
    outstanding: VecDeque<Outstanding>,
    /// Node hashes received.
    received: u64,
}

impl Walk {
    pub(crate) fn new(shape: TreeShape) -> Self {
        let pending = vec![VecDeque::new(); shape.height()];
        Self {
            shape,
            pending,
            outstanding: VecDeque::new(),
            received: 0,
        }
    }

    /// Starts the walk from the two roots; `None` means that side's interior nodes are
    /// unknown (the source's tree was busy, or the destination offered leaves only), so
    /// every leaf is compared. Returns the chunks already known to differ (only for a
    /// one-chunk disk, whose root is its only leaf).
    pub(crate) fn start(
        &mut self,
        local_root: Option<ChunkHash>,
        remote_root: Option<ChunkHash>,
    ) -> Vec<Differing> {
        let top = self.shape.height() - 1;
        match (local_root, remote_root) {
            (Some(l), Some(r)) if l == r => Vec::new(),
            (Some(l), Some(_)) if top == 0 => vec![Differing { chunk: 0, local: l }],
            (Some(_), Some(_)) => {
                self.pending[top].push_back(0);
                Vec::new()
            }
            // A one-chunk disk's root is its leaf, which the session always knows; if it
            // does not, sending the chunk is the safe answer.
            (l, _) if top == 0 => vec![Differing {
                chunk: 0,
                local: l.unwrap_or(UNKNOWN_HASH),
            }],
            // Without interior nodes on one side, ask for every leaf, grouped by their
            // level-1 parents.
            _ => {
                self.pending[1].extend(0..self.shape.level_len(1));
                Vec::new()
            }
        }
    }

    /// The next request to send, covering at most `max_hashes` child hashes (at least
    /// one node), or `None` if nothing is pending.
    pub(crate) fn next_want(&mut self, max_hashes: u64) -> Option<Want> {
        let level = (1..self.shape.height()).find(|&l| !self.pending[l].is_empty())?;
        let mut nodes: Vec<NodeRange> = Vec::new();
        let mut children: Vec<Range<u64>> = Vec::new();
        let mut budget = 0u64;
        while let Some(&node) = self.pending[level].front() {
            let kids = self.shape.children(level, node..node + 1);
            let n = kids.end - kids.start;
            if !nodes.is_empty() && budget + n > max_hashes {
                break;
            }
            self.pending[level].pop_front();
            budget += n;
            match (nodes.last_mut(), children.last_mut()) {
                (Some(last), Some(last_kids)) if last.first + last.count == node => {
                    last.count += 1;
                    *last_kids = last_kids.start..kids.end;
                }
                _ => {
                    nodes.push(NodeRange {
                        first: node,
                        count: 1,
                    });
                    children.push(kids);
                }
            }
        }
        self.outstanding.push_back(Outstanding {
            child_level: level - 1,
            children,
        });
        Some(Want {
            level: level as u32,
            nodes,
        })
    }

    /// The request the next answer must match.
    pub(crate) fn expected(&self) -> Option<&Outstanding> {
        self.outstanding.front()
    }

    /// Requests in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.outstanding.len()
    }

    /// Whether the walk has nothing left to request or receive.
    pub(crate) fn is_done(&self) -> bool {
        self.outstanding.is_empty() && self.pending.iter().all(VecDeque::is_empty)
    }

    /// Node hashes received so far.
    #[cfg(test)]
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// Takes the answer to the oldest request: the destination's hashes of the children
    /// at `level`, and ours for the same nodes (`local`, same order, `None` if our interior
    /// hashes are unknown so every node counts as differing). Returns the differing
    /// chunks; differing interior nodes are queued for expansion.
    pub(crate) fn on_nodes(
        &mut self,
        level: u32,
        remote: &[ChunkHash],
        local: Option<&[ChunkHash]>,
    ) -> Result<Vec<Differing>, String> {
        let Some(req) = self.outstanding.front() else {
            return Err("node hashes arrived that were not requested".into());
        };
        let expected = req.hashes();
        if level as usize != req.child_level || remote.len() as u64 != expected {
            return Err(format!(
                "answer has {} hashes of level {level}; {expected} of level {} were requested",
                remote.len(),
                req.child_level
            ));
        }
        if local.is_some_and(|l| l.len() != remote.len()) {
            return Err("local hash lookup returned the wrong number of hashes".into());
        }
        let Some(req) = self.outstanding.pop_front() else {
            return Err("node hashes arrived that were not requested".into());
        };
        self.received += remote.len() as u64;
        let mut out = Vec::new();
        let mut i = 0usize;
        for range in req.children {
            for node in range {
                let mine = local.map(|l| l[i]);
                if mine != Some(remote[i]) {
                    if req.child_level == 0 {
                        // Leaf hashes are always known locally (computed per chunk).
                        out.push(Differing {
                            chunk: node,
                            local: mine.unwrap_or(UNKNOWN_HASH),
                        });
                    } else {
                        self.pending[req.child_level].push_back(node);
                    }
                }
                i += 1;
            }
        }
        Ok(out)
    }
}

/// One chunk to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Item {
    pub(crate) chunk: u64,
    /// The source's hash says the chunk is all zeros: send a zero marker, read nothing.
    pub(crate) known_zero: bool,
}

/// Chunks for one data frame, ascending.
pub(crate) type Batch = Vec<Item>;

/// Groups chunks into frames of at most `max_bytes` of data (zero markers cost nothing)
/// and at most `max_items` chunks.
#[derive(Debug)]
pub(crate) struct Batcher {
    geometry: Geometry,
    max_bytes: u64,
    max_items: usize,
    current: Batch,
    bytes: u64,
}

impl Batcher {
    pub(crate) fn new(geometry: Geometry, max_bytes: u64, max_items: usize) -> Self {
        Self {
            geometry,
            max_bytes: max_bytes.max(u64::from(geometry.chunk_size())),
            max_items: max_items.max(1),
            current: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds a differing chunk; returns a full batch when one is ready.
    pub(crate) fn push_differing(&mut self, d: Differing) -> Option<Batch> {
        self.push(Item {
            chunk: d.chunk,
            known_zero: d.local == ZERO_CHUNK_HASH,
        })
    }

    /// Adds a chunk; returns a full batch when one is ready. Chunks must come in
    /// ascending order within a batch; a chunk lower than the last starts a new one.
    pub(crate) fn push(&mut self, item: Item) -> Option<Batch> {
        let len = if item.known_zero {
            0
        } else {
            self.geometry.chunk_len(item.chunk) as u64
        };
        let out_of_order = self.current.last().is_some_and(|l| l.chunk >= item.chunk);
        let full = self.bytes + len > self.max_bytes || self.current.len() >= self.max_items;
        let ready = if !self.current.is_empty() && (out_of_order || full) {
            self.take()
        } else {
            None
        };
        self.current.push(item);
        self.bytes += len;
        ready
    }

    /// The partial batch, if any.
    pub(crate) fn take(&mut self) -> Option<Batch> {
        self.bytes = 0;
        (!self.current.is_empty()).then(|| std::mem::take(&mut self.current))
    }
}

/// Appends `chunk` to `runs`, extending the last run when it is adjacent and of the same
/// kind.
pub(crate) fn push_run(runs: &mut Vec<Run>, chunk: u64, zero: bool) {
    match runs.last_mut() {
        Some(r)
            if r.zero == zero && r.first + u64::from(r.count) == chunk && r.count < u32::MAX =>
        {
            r.count += 1
        }
        _ => runs.push(Run {
            first: chunk,
            count: 1,
            zero,
        }),
    }
}

/// Splits a batch into runs of consecutive chunks that must be read (not known zero):
/// `(first chunk, count)`.
pub(crate) fn read_runs(batch: &[Item]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for it in batch.iter().filter(|i| !i.known_zero) {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == it.chunk => *count += 1,
            _ => runs.push((it.chunk, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use convoy_store::HashTree;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn leaf(i: u64, salt: u8) -> ChunkHash {
        let mut h = [salt; 32];
        h[..8].copy_from_slice(&i.to_le_bytes());
        h
    }

    /// Runs the walk against two in-memory trees exactly as the session does.
    fn run(
        src: &HashTree,
        dst: &HashTree,
        busy_source: bool,
        leaves_only_dest: bool,
        max_hashes: u64,
        window: usize,
    ) -> (Vec<u64>, u64, usize) {
        let shape = TreeShape::new(src.leaf_count(), src.fanout());
        let top = shape.height() - 1;
        let mut walk = Walk::new(shape);
        let local_root = (!busy_source || top == 0).then(|| src.root());
        let remote_root = (!leaves_only_dest || top == 0).then(|| dst.root());
        let mut found: Vec<u64> = walk
            .start(local_root, remote_root)
            .into_iter()
            .map(|d| d.chunk)
            .collect();
        let mut round_trips = 0;
        let mut queue = VecDeque::new();
        loop {
            while walk.in_flight() < window {
                match walk.next_want(max_hashes) {
                    Some(w) => queue.push_back(w),
                    None => break,
                }
            }
            let Some(want) = queue.pop_front() else { break };
            round_trips += 1;
            let kids: Vec<ChunkHash> = want
                .nodes
                .iter()
                .flat_map(|r| {
                    let l = want.level as usize;
                    let a = dst.children(l, r.first as usize).start;
                    let b = dst.children(l, (r.first + r.count - 1) as usize).end;
                    dst.level(l - 1, a..b).to_vec()
                })
                .collect();
            let exp = walk.expected().unwrap().clone();
            let local: Vec<ChunkHash> = exp
                .children
                .iter()
                .flat_map(|r| {
                    src.level(exp.child_level, r.start as usize..r.end as usize)
                        .to_vec()
                })
                .collect();
            let use_local = !(busy_source && exp.child_level > 0);
            let diff = walk
                .on_nodes(
                    exp.child_level as u32,
                    &kids,
                    use_local.then_some(local.as_slice()),
                )
                .unwrap();
            found.extend(diff.iter().map(|d| d.chunk));
        }
        assert!(walk.is_done());
        found.sort_unstable();
        (found, walk.received(), round_trips)
    }

    #[test]
    fn equal_trees_exchange_only_the_root() {
        let t = HashTree::from_leaves((0..5000).map(|i| leaf(i, 0)).collect(), 64);
        assert_eq!(run(&t, &t, false, false, 8192, 8), (vec![], 0, 0));
    }

    #[test]
    fn one_chunk_disks_compare_their_only_leaf() {
        let a = HashTree::from_leaves(vec![leaf(0, 0)], 64);
        let b = HashTree::from_leaves(vec![leaf(0, 1)], 64);
        assert_eq!(run(&a, &b, false, false, 10, 1).0, vec![0]);
        assert_eq!(run(&a, &b, true, true, 10, 1).0, vec![0]);
        assert_eq!(run(&a, &a, true, false, 10, 1).0, Vec::<u64>::new());
    }

    #[test]
    fn one_differing_chunk_costs_one_request_per_level() {
        let n = 16384; // 1 GiB of 64 KiB chunks: 4 levels
        let a = HashTree::from_leaves((0..n).map(|i| leaf(i, 0)).collect(), 64);
        let mut leaves: Vec<_> = (0..n).map(|i| leaf(i, 0)).collect();
        leaves[12345] = leaf(12345, 1);
        let b = HashTree::from_leaves(leaves, 64);
        let (found, received, trips) = run(&a, &b, false, false, 8192, 8);
        assert_eq!(found, vec![12345]);
        assert_eq!(trips, 3);
        assert_eq!(received, 4 + 64 + 64);
    }

    #[test]
    fn requests_respect_the_hash_budget() {
        let shape = TreeShape::new(16384, 64);
        let mut walk = Walk::new(shape);
        walk.start(None, Some([1; 32]));
        let mut total = 0;
        while let Some(w) = walk.next_want(1000) {
            let e = walk.outstanding.back().unwrap();
            assert!(e.hashes() <= 1000);
            assert_eq!(w.level, 1);
            total += e.hashes();
        }
        assert_eq!(total, 16384);
    }

    #[test]
    fn wrong_answers_are_refused() {
        let mut walk = Walk::new(TreeShape::new(100, 10));
        assert!(walk.on_nodes(0, &[[0; 32]], None).is_err());
        walk.start(Some([1; 32]), Some([2; 32]));
        walk.next_want(1000).unwrap();
        assert!(walk.on_nodes(0, &[[0; 32]; 10], None).is_err()); // wrong level
        assert!(walk.on_nodes(1, &[[0; 32]; 9], None).is_err()); // wrong count
        assert!(
            walk.on_nodes(1, &[[0; 32]; 10], Some(&[[0; 32]; 9]))
                .is_err()
        );
        assert!(walk.on_nodes(1, &[[0; 32]; 10], None).is_ok());
    }

    #[test]
    fn batches_are_bounded_ascending_and_zero_chunks_are_free() {
        let g = Geometry::with_params(10 * 1024, 1024, 4, 2).unwrap();
        let mut b = Batcher::new(g, 2048, 100);
        let d = |chunk, zero: bool| Differing {
            chunk,
            local: if zero { ZERO_CHUNK_HASH } else { [1; 32] },
        };
        assert_eq!(b.push_differing(d(0, false)), None);
        assert_eq!(b.push_differing(d(1, true)), None);
        assert_eq!(b.push_differing(d(2, false)), None);
        let full = b.push_differing(d(3, false)).unwrap();
        assert_eq!(
            full.iter().map(|i| i.chunk).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(read_runs(&full), vec![(0, 1), (2, 1)]);
        // Out of order starts a new batch.
        assert_eq!(b.push_differing(d(1, false)).unwrap().len(), 1);
        assert_eq!(b.take().unwrap().len(), 1);
        assert_eq!(b.take(), None);
    }

    #[test]
    fn runs_merge_adjacent_chunks_of_one_kind() {
        let mut runs = Vec::new();
        for (c, z) in [
            (0, false),
            (1, false),
            (2, true),
            (3, true),
            (5, true),
            (6, false),
        ] {
            push_run(&mut runs, c, z);
        }
        let r = |first, count, zero| Run { first, count, zero };
        assert_eq!(
            runs,
            vec![r(0, 2, false), r(2, 2, true), r(5, 1, true), r(6, 1, false)]
        );
    }

    proptest! {
        #[test]
        fn walk_finds_exactly_the_changed_chunks(
            n in 1u64..3000,
            fanout in 2u32..70,
            changes in proptest::collection::vec(any::<u64>(), 0..60),
            busy_source in any::<bool>(),
            leaves_only in any::<bool>(),
            max_hashes in 1u64..300,
            window in 1usize..6,
        ) {
            let base: Vec<_> = (0..n).map(|i| leaf(i, 0)).collect();
            let a = HashTree::from_leaves(base.clone(), fanout);
            let changed: BTreeSet<u64> = changes.iter().map(|c| c % n).collect();
            let mut leaves = base;
            for &c in &changed {
                leaves[c as usize] = leaf(c, 1);
            }
            let b = HashTree::from_leaves(leaves, fanout);
            let (found, _, _) = run(&a, &b, busy_source, leaves_only, max_hashes, window);
            prop_assert_eq!(found, changed.into_iter().collect::<Vec<_>>());
        }
    }
}
