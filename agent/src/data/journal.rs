//! The group's in-memory journal: writes in sequence order, kept until every streaming
//! replica has them durably, bounded in bytes. Pure data structure; the sequencer decides
//! what to do when it overflows (drop the lagging replica into a dirty-chunk resync).

use std::collections::VecDeque;

use super::wire::WireWrite;

/// Writes `[first_seq, next_seq)` in order, at most `limit` bytes of journal cost (data,
/// or a descriptor for zeroes; one write may exceed the limit on its own).
#[derive(Debug)]
pub struct Journal {
    entries: VecDeque<WireWrite>,
    /// Per entry, the journal cost pushed before it since the journal began: with
    /// `pushed`, what a replica lacks from any held sequence on is one subtraction.
    cost_before: VecDeque<u64>,
    /// Journal cost of every write pushed since the journal began.
    pushed: u64,
    first_seq: u64,
    next_seq: u64,
    bytes: u64,
    limit: u64,
}

/// A push that did not follow the previous write.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("journal expected sequence {expected}, got {got}")]
pub struct OutOfOrder {
    /// The sequence the journal expected.
    pub expected: u64,
    /// What was pushed.
    pub got: u64,
}

impl Journal {
    /// An empty journal whose next write will be `next_seq`.
    pub fn new(next_seq: u64, limit: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            cost_before: VecDeque::new(),
            pushed: 0,
            first_seq: next_seq,
            next_seq,
            bytes: 0,
            limit,
        }
    }

    /// Oldest sequence still held (equals `next_seq` when empty).
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Sequence the next push must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Journal cost held (see [`super::wire::Payload::journal_cost`]).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the byte limit is exceeded.
    pub fn over_limit(&self) -> bool {
        self.bytes > self.limit
    }

    /// Appends the next write.
    pub fn push(&mut self, w: WireWrite) -> Result<(), OutOfOrder> {
        if w.seq != self.next_seq {
            return Err(OutOfOrder {
                expected: self.next_seq,
                got: w.seq,
            });
        }
        self.next_seq += 1;
        let cost = w.payload.journal_cost();
        self.bytes += cost;
        self.cost_before.push_back(self.pushed);
        self.pushed += cost;
        self.entries.push_back(w);
        Ok(())
    }

    /// Journal cost of the writes from `seq` on (what a replica that holds everything
    /// before `seq` lacks, in the bytes that would be sent); `None` if `seq` was trimmed.
    pub fn cost_from(&self, seq: u64) -> Option<u64> {
        if seq < self.first_seq {
            return None;
        }
        let index = (seq - self.first_seq) as usize;
        Some(
            self.cost_before
                .get(index)
                .map_or(0, |before| self.pushed - before),
        )
    }

    /// Skips sequence numbers that need not be retained (nobody streams them): the journal
    /// becomes empty and continues at `next_seq`.
    pub fn reset(&mut self, next_seq: u64) {
        self.entries.clear();
        self.cost_before.clear();
        self.bytes = 0;
        self.first_seq = next_seq;
        self.next_seq = next_seq;
    }

    /// Drops every write with `seq <= upto`.
    pub fn trim_through(&mut self, upto: u64) {
        while let Some(front) = self.entries.front() {
            if front.seq > upto {
                break;
            }
            self.bytes -= front.payload.journal_cost();
            self.entries.pop_front();
            self.cost_before.pop_front();
        }
        self.first_seq = self
            .first_seq
            .max(upto.saturating_add(1))
            .min(self.next_seq);
    }

    /// Writes from `seq` on, up to about `max_bytes` (at least one if any). `None` if `seq`
    /// was already trimmed: the caller needs a resync.
    pub fn read_from(&self, seq: u64, max_bytes: u64) -> Option<Vec<WireWrite>> {
        if seq < self.first_seq {
            return None;
        }
        let skip = (seq - self.first_seq) as usize;
        let mut out = Vec::new();
        let mut bytes = 0;
        for w in self.entries.iter().skip(skip) {
            if !out.is_empty() && bytes + w.payload.journal_cost() > max_bytes {
                break;
            }
            bytes += w.payload.journal_cost();
            out.push(w.clone());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::Payload;
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn w(seq: u64, len: usize) -> WireWrite {
        WireWrite {
            seq,
            disk: 1,
            offset: 0,
            payload: Payload::Data(Bytes::from(vec![0u8; len])),
        }
    }

    #[test]
    fn push_read_trim() {
        let mut j = Journal::new(10, 100);
        for s in 10..15 {
            j.push(w(s, 10)).unwrap();
        }
        assert_eq!(
            j.push(w(20, 1)),
            Err(OutOfOrder {
                expected: 15,
                got: 20
            })
        );
        assert_eq!(
            j.read_from(12, 1000)
                .unwrap()
                .iter()
                .map(|w| w.seq)
                .collect::<Vec<_>>(),
            vec![12, 13, 14]
        );
        assert_eq!(j.read_from(12, 15).unwrap().len(), 1);
        assert_eq!(j.read_from(15, 1000).unwrap().len(), 0);
        j.trim_through(12);
        assert_eq!(j.first_seq(), 13);
        assert!(j.read_from(12, 1000).is_none());
        assert_eq!(j.bytes(), 2 * (10 + 48));
        j.reset(30);
        assert_eq!((j.first_seq(), j.next_seq(), j.bytes()), (30, 30, 0));
    }

    proptest! {
        /// Whatever is read back is consecutive and starts where asked; bytes add up, and so
        /// does the cost from any held sequence on.
        #[test]
        fn reads_are_consecutive(lens in prop::collection::vec(1usize..50, 1..40), trim in 0u64..45, from in 0u64..45) {
            let mut j = Journal::new(0, 10_000);
            for (i, l) in lens.iter().enumerate() {
                j.push(w(i as u64, *l)).unwrap();
            }
            j.trim_through(trim);
            let held: u64 = lens.iter().enumerate().filter(|(i, _)| *i as u64 > trim).map(|(_, l)| *l as u64 + 48).sum();
            prop_assert_eq!(j.bytes(), held);
            // What a replica holding everything before `from` lacks: exactly the writes
            // from `from` on, by their cost.
            let lacking: u64 = lens.iter().enumerate().filter(|(i, _)| *i as u64 >= from).map(|(_, l)| *l as u64 + 48).sum();
            match j.cost_from(from) {
                None => prop_assert!(from < j.first_seq()),
                Some(c) => prop_assert_eq!(c, lacking),
            }
            match j.read_from(from, 200) {
                None => prop_assert!(from < j.first_seq()),
                Some(ws) => {
                    for (k, w) in ws.iter().enumerate() {
                        prop_assert_eq!(w.seq, from + k as u64);
                    }
                }
            }
        }
    }
}
