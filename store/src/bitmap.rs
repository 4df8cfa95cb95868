//! A fixed-length bitmap, the in-memory and on-disk form of dirty maps and "hash known" sets.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// A fixed-length set of bit indices `0..len`.
///
/// Bits past `len` are always zero; [`Bitmap::is_well_formed`] checks that for values
/// decoded from disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    len: u64,
    words: Vec<u64>,
}

impl Bitmap {
    /// An all-zero bitmap of `len` bits.
    pub fn new(len: u64) -> Self {
        Self {
            len,
            words: vec![0; words_for(len)],
        }
    }

    /// An all-one bitmap of `len` bits.
    pub fn full(len: u64) -> Self {
        let mut b = Self::new(len);
        b.set_range(0..len);
        b
    }

    /// Number of bits (not the number of set bits).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set; bits out of range read as unset.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; out-of-range indices are ignored.
    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clears bit `i`; out-of-range indices are ignored.
    pub fn unset(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// Sets every bit in `range` (clamped to the bitmap).
    pub fn set_range(&mut self, range: Range<u64>) {
        let end = range.end.min(self.len);
        let mut i = range.start;
        while i < end {
            // Whole words at a time where possible: ranges are often whole extents.
            if i % 64 == 0 && end - i >= 64 {
                self.words[(i / 64) as usize] = u64::MAX;
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no bit is set.
    pub fn none(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Set bits in ascending order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(wi as u64 * 64 + bit)
            })
        })
    }

    /// True when the word vector matches `len` and no bit past `len` is set, i.e. the
    /// value is one this type could have produced.
    pub fn is_well_formed(&self) -> bool {
        if self.words.len() != words_for(self.len) {
            return false;
        }
        match (self.len % 64, self.words.last()) {
            (0, _) | (_, None) => true,
            (rem, Some(&last)) => last >> rem == 0,
        }
    }
}

fn words_for(len: u64) -> usize {
    len.div_ceil(64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn ranges_and_edges() {
        let mut b = Bitmap::new(130);
        b.set_range(3..129);
        assert_eq!(b.count_ones(), 126);
        assert!(!b.get(2) && b.get(3) && b.get(128) && !b.get(129));
        b.set(500);
        assert!(!b.get(500));
        assert!(b.is_well_formed());
        assert_eq!(Bitmap::full(65).count_ones(), 65);
        assert!(Bitmap::full(65).is_well_formed());
        let bad = Bitmap {
            len: 3,
            words: vec![0b1000],
        };
        assert!(!bad.is_well_formed());
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(len in 1u64..300, ops in proptest::collection::vec((any::<bool>(), 0u64..300, 0u64..80), 0..40)) {
            let mut b = Bitmap::new(len);
            let mut model = BTreeSet::new();
            for (set, i, n) in ops {
                if set {
                    b.set_range(i..i + n);
                    model.extend((i..i + n).filter(|&x| x < len));
                } else {
                    b.unset(i);
                    model.remove(&i);
                }
            }
            prop_assert_eq!(b.iter_ones().collect::<BTreeSet<_>>(), model.clone());
            prop_assert_eq!(b.count_ones(), model.len() as u64);
            prop_assert!(b.is_well_formed());
        }
    }
}
