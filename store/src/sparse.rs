//! A bitmap over up to billions of chunks whose cost follows its content, not its length:
//! all-zero pages are absent, all-one pages are a tag, pages with few bits are a sorted
//! list of them (2 bytes a bit: scattered writes cost what they touch), and other pages
//! are words. Pages are shared copy-on-write, so a snapshot (for a checkpoint) copies
//! pointers, not bits.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Bits per page: 4 KiB of bits, 2 GiB of disk at 64 KiB chunks.
pub(crate) const PAGE_BITS: u64 = 1 << 15;
const PAGE_WORDS: usize = (PAGE_BITS / 64) as usize;

type Words = [u64; PAGE_WORDS];

/// Bits a list page holds before it becomes words (at 2 bytes a bit, half a words page).
const FEW_MAX: usize = 1024;

#[derive(Clone, Debug)]
enum Page {
    /// Every bit of the page (within the bitmap's length) is set.
    Full,
    /// Up to `FEW_MAX` set bits, ascending, never none (an emptied page is removed).
    Few(Arc<Vec<u16>>),
    /// Some bits set, never none.
    Bits(Arc<Words>),
}

impl Page {
    /// This page as words (`bits` is the page's length in bits, for `Full`).
    fn to_words(&self, bits: u64) -> Arc<Words> {
        let mut w = [0u64; PAGE_WORDS];
        match self {
            Page::Full => fill(&mut w, 0..bits),
            Page::Few(v) => {
                for &b in v.iter() {
                    w[usize::from(b / 64)] |= 1 << (b % 64);
                }
            }
            Page::Bits(words) => return Arc::clone(words),
        }
        Arc::new(w)
    }
}

/// A fixed-length set of bit indices `0..len`, stored by 32,768-bit pages.
#[derive(Clone, Debug)]
pub(crate) struct SparseBitmap {
    len: u64,
    pages: BTreeMap<u64, Page>,
}

impl PartialEq for SparseBitmap {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter_ones_from(0).eq(other.iter_ones_from(0))
    }
}

impl Eq for SparseBitmap {}

impl From<Arc<Words>> for Page {
    fn from(w: Arc<Words>) -> Self {
        Page::Bits(w)
    }
}

impl SparseBitmap {
    /// An empty bitmap of `len` bits.
    pub(crate) fn new(len: u64) -> Self {
        Self {
            len,
            pages: BTreeMap::new(),
        }
    }

    /// Number of bits (not of set bits).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Bits of page `p` that lie within the bitmap.
    fn page_bits(&self, p: u64) -> u64 {
        (self.len - (p * PAGE_BITS).min(self.len)).min(PAGE_BITS)
    }

    /// Whether bit `i` is set; bits out of range read as unset.
    pub(crate) fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let b = i % PAGE_BITS;
        match self.pages.get(&(i / PAGE_BITS)) {
            None => false,
            Some(Page::Full) => true,
            Some(Page::Few(v)) => v.binary_search(&(b as u16)).is_ok(),
            Some(Page::Bits(w)) => w[(b / 64) as usize] & (1 << (b % 64)) != 0,
        }
    }

    /// Sets bit `i`; out-of-range indices are ignored.
    pub(crate) fn set(&mut self, i: u64) {
        if i >= self.len {
            return;
        }
        let p = i / PAGE_BITS;
        let b = i % PAGE_BITS;
        let bits = self.page_bits(p);
        let page = self
            .pages
            .entry(p)
            .or_insert_with(|| Page::Few(Arc::new(Vec::new())));
        match page {
            Page::Full => {}
            Page::Few(v) => {
                if let Err(at) = v.binary_search(&(b as u16)) {
                    if v.len() < FEW_MAX {
                        Arc::make_mut(v).insert(at, b as u16);
                    } else {
                        let mut w = page.to_words(bits);
                        Arc::make_mut(&mut w)[(b / 64) as usize] |= 1 << (b % 64);
                        *page = Page::Bits(w);
                    }
                }
            }
            Page::Bits(w) => Arc::make_mut(w)[(b / 64) as usize] |= 1 << (b % 64),
        }
    }

    /// Clears bit `i`; out-of-range indices are ignored.
    pub(crate) fn unset(&mut self, i: u64) {
        if i >= self.len {
            return;
        }
        let p = i / PAGE_BITS;
        let b = i % PAGE_BITS;
        let bits = self.page_bits(p);
        let Some(page) = self.pages.get_mut(&p) else {
            return;
        };
        let empty = match page {
            Page::Few(v) => {
                if let Ok(at) = v.binary_search(&(b as u16)) {
                    Arc::make_mut(v).remove(at);
                }
                v.is_empty()
            }
            Page::Full | Page::Bits(_) => {
                let mut w = page.to_words(bits);
                let words = Arc::make_mut(&mut w);
                let wi = (b / 64) as usize;
                words[wi] &= !(1 << (b % 64));
                let empty = words[wi] == 0 && words.iter().all(|&x| x == 0);
                *page = Page::Bits(w);
                empty
            }
        };
        // Keep "present means non-empty": none() and iteration rely on it.
        if empty {
            self.pages.remove(&p);
        }
    }

    /// Sets every bit in `range` (clamped to the bitmap).
    pub(crate) fn set_range(&mut self, range: Range<u64>) {
        let end = range.end.min(self.len);
        let mut i = range.start;
        while i < end {
            let p = i / PAGE_BITS;
            let page_start = p * PAGE_BITS;
            let page_end = page_start + self.page_bits(p);
            let to = end.min(page_end);
            if i == page_start && to == page_end {
                self.pages.insert(p, Page::Full);
            } else if to - i <= 64 {
                for b in i..to {
                    self.set(b);
                }
            } else {
                let bits = self.page_bits(p);
                let page = self
                    .pages
                    .entry(p)
                    .or_insert_with(|| Page::Few(Arc::new(Vec::new())));
                if !matches!(page, Page::Full) {
                    let mut w = page.to_words(bits);
                    fill(Arc::make_mut(&mut w), i - page_start..to - page_start);
                    *page = Page::Bits(w);
                }
            }
            i = to;
        }
    }

    /// Number of set bits.
    pub(crate) fn count_ones(&self) -> u64 {
        self.pages
            .iter()
            .map(|(&p, page)| match page {
                Page::Full => self.page_bits(p),
                Page::Few(v) => v.len() as u64,
                Page::Bits(w) => w.iter().map(|x| u64::from(x.count_ones())).sum(),
            })
            .sum()
    }

    /// Whether no bit is set.
    pub(crate) fn none(&self) -> bool {
        self.pages.is_empty()
    }

    /// Set bits at or after `start`, ascending.
    pub(crate) fn iter_ones_from(&self, start: u64) -> impl Iterator<Item = u64> + '_ {
        let len = self.len;
        self.pages
            .range(start / PAGE_BITS..)
            .flat_map(move |(&p, page)| {
                let base = p * PAGE_BITS;
                let bits = (len - base.min(len)).min(PAGE_BITS);
                let from = start.saturating_sub(base).min(bits);
                let it: Box<dyn Iterator<Item = u64> + '_> = match page {
                    Page::Full => Box::new((base + from)..(base + bits)),
                    Page::Few(v) => Box::new(
                        v.iter()
                            .map(|&b| u64::from(b))
                            .filter(move |&b| b >= from)
                            .map(move |b| base + b),
                    ),
                    Page::Bits(w) => Box::new(ones_of(w, from).map(move |b| base + b)),
                };
                it
            })
    }

    /// The persistent form: pages with few bits as bit lists, others as words.
    pub(crate) fn to_repr(&self) -> SparseRepr {
        let pages = self
            .pages
            .iter()
            .map(|(&p, page)| {
                let r = match page {
                    Page::Full => PageRepr::Full,
                    Page::Few(v) => PageRepr::Ones(v.to_vec()),
                    Page::Bits(w) => {
                        let ones: Vec<u16> = ones_of(w, 0).take(1024).map(|b| b as u16).collect();
                        if ones.len() < 1024 {
                            PageRepr::Ones(ones)
                        } else {
                            PageRepr::Words(w.iter().flat_map(|x| x.to_le_bytes()).collect())
                        }
                    }
                };
                (p, r)
            })
            .collect();
        SparseRepr {
            len: self.len,
            pages,
        }
    }

    /// Rebuilds a bitmap from its persistent form; errors when the form is not one
    /// [`SparseBitmap::to_repr`] could have produced for a bitmap of `len` bits.
    pub(crate) fn from_repr(repr: SparseRepr, len: u64) -> Result<Self, String> {
        if repr.len != len {
            return Err(format!("bitmap of {} bits, expected {len}", repr.len));
        }
        let mut out = Self::new(len);
        let page_count = len.div_ceil(PAGE_BITS);
        let mut last = None;
        for (p, r) in repr.pages {
            if p >= page_count || last.is_some_and(|l| l >= p) {
                return Err(format!("bitmap page {p} out of order or past the end"));
            }
            last = Some(p);
            let bits = out.page_bits(p);
            let page = match r {
                PageRepr::Full => Page::Full,
                PageRepr::Ones(ones) => {
                    if ones.iter().any(|&b| u64::from(b) >= bits)
                        || ones.windows(2).any(|w| w[0] >= w[1])
                    {
                        return Err(format!("bit list of page {p} unsorted or past its end"));
                    }
                    if ones.len() <= FEW_MAX {
                        Page::Few(Arc::new(ones))
                    } else {
                        Page::Few(Arc::new(ones)).to_words(bits).into()
                    }
                }
                PageRepr::Words(bytes) => {
                    if bytes.len() != PAGE_WORDS * 8 {
                        return Err(format!("page {p} has {} bytes", bytes.len()));
                    }
                    let mut w = [0u64; PAGE_WORDS];
                    for (slot, b) in w.iter_mut().zip(bytes.chunks_exact(8)) {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        *slot = u64::from_le_bytes(a);
                    }
                    if ones_of(&w, bits).next().is_some() {
                        return Err(format!("bits past the end of page {p}"));
                    }
                    Page::Bits(Arc::new(w))
                }
            };
            let empty = match &page {
                Page::Bits(w) => w.iter().all(|&x| x == 0),
                Page::Few(v) => v.is_empty(),
                Page::Full => false,
            };
            if !empty {
                out.pages.insert(p, page);
            }
        }
        Ok(out)
    }
}

/// Sets bits `range` of one page.
fn fill(w: &mut Words, range: Range<u64>) {
    let mut i = range.start;
    while i < range.end {
        if i % 64 == 0 && range.end - i >= 64 {
            w[(i / 64) as usize] = u64::MAX;
            i += 64;
        } else {
            w[(i / 64) as usize] |= 1 << (i % 64);
            i += 1;
        }
    }
}

/// Set bits of one page at or after bit `from`, ascending.
fn ones_of(w: &Words, from: u64) -> impl Iterator<Item = u64> + '_ {
    let first = (from / 64) as usize;
    w.iter()
        .enumerate()
        .skip(first)
        .flat_map(move |(wi, &word)| {
            let mut x = if wi == first && from % 64 != 0 {
                word & !((1u64 << (from % 64)) - 1)
            } else {
                word
            };
            std::iter::from_fn(move || {
                if x == 0 {
                    return None;
                }
                let bit = u64::from(x.trailing_zeros());
                x &= x - 1;
                Some(wi as u64 * 64 + bit)
            })
        })
}

/// The stored form of a [`SparseBitmap`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SparseRepr {
    len: u64,
    /// Non-empty pages, ascending.
    pages: Vec<(u64, PageRepr)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum PageRepr {
    Full,
    /// Indices of the set bits, ascending (pages with few bits).
    Ones(Vec<u16>),
    /// The page's 512 words, little-endian.
    Words(Vec<u8>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn full_pages_cost_a_tag_and_split_on_unset() {
        let len = 3 * PAGE_BITS + 100;
        let mut b = SparseBitmap::new(len);
        b.set_range(0..len);
        assert_eq!(b.count_ones(), len);
        assert!(b.pages.values().all(|p| matches!(p, Page::Full)));
        // Scattered bits cost two bytes each, until a page holds many.
        let mut few = SparseBitmap::new(len);
        for i in (0..len).step_by(16) {
            few.set(i);
        }
        assert!(matches!(few.pages.get(&0), Some(Page::Bits(_))));
        assert_eq!(few.count_ones(), len.div_ceil(16));
        assert_eq!(few.iter_ones_from(17).next(), Some(32));
        for i in (0..PAGE_BITS).step_by(16) {
            few.unset(i);
        }
        assert!(
            !few.pages.contains_key(&0),
            "an emptied words page is removed"
        );
        let back = SparseBitmap::from_repr(few.to_repr(), len).unwrap();
        assert_eq!(back, few);
        let mut sparse = SparseBitmap::new(len);
        sparse.set(5);
        sparse.set(PAGE_BITS * 2 + 1);
        assert!(
            sparse
                .pages
                .values()
                .all(|p| matches!(p, Page::Few(v) if v.len() == 1))
        );
        b.unset(PAGE_BITS + 5);
        assert!(!b.get(PAGE_BITS + 5) && b.get(PAGE_BITS + 6) && b.get(len - 1));
        assert_eq!(b.count_ones(), len - 1);
        assert!(!b.get(len));
        // Emptying a page removes it.
        let mut c = SparseBitmap::new(len);
        c.set(7);
        c.unset(7);
        assert!(c.none());
        assert_eq!(
            b.iter_ones_from(PAGE_BITS + 4).take(2).collect::<Vec<_>>(),
            vec![PAGE_BITS + 4, PAGE_BITS + 6]
        );
    }

    #[test]
    fn snapshot_is_not_changed_by_later_writes() {
        let mut b = SparseBitmap::new(1 << 20);
        b.set(3);
        let snap = b.clone();
        b.set(4);
        b.unset(3);
        assert_eq!(snap.iter_ones_from(0).collect::<Vec<_>>(), vec![3]);
        assert_eq!(b.iter_ones_from(0).collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn repr_is_checked() {
        let mut b = SparseBitmap::new(PAGE_BITS + 10);
        b.set(PAGE_BITS + 9);
        let r = b.to_repr();
        assert_eq!(
            SparseBitmap::from_repr(r.clone(), PAGE_BITS + 10).unwrap(),
            b
        );
        assert!(SparseBitmap::from_repr(r, PAGE_BITS + 9).is_err());
        let bad = SparseRepr {
            len: PAGE_BITS + 10,
            pages: vec![(1, PageRepr::Ones(vec![10]))],
        };
        assert!(SparseBitmap::from_repr(bad, PAGE_BITS + 10).is_err());
        let bad = SparseRepr {
            len: 10,
            pages: vec![(1, PageRepr::Full)],
        };
        assert!(SparseBitmap::from_repr(bad, 10).is_err());
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(
            len in 1u64..(3 * PAGE_BITS),
            ops in proptest::collection::vec((0u8..3, 0u64..(3 * PAGE_BITS), 0u64..(PAGE_BITS + 500)), 0..40),
            from in 0u64..(3 * PAGE_BITS),
        ) {
            let mut b = SparseBitmap::new(len);
            let mut model = BTreeSet::new();
            for (op, i, n) in ops {
                match op {
                    0 => {
                        b.set_range(i..i + n);
                        model.extend((i..(i + n).min(len)).take(PAGE_BITS as usize * 3));
                    }
                    1 => {
                        b.set(i);
                        if i < len { model.insert(i); }
                    }
                    _ => {
                        b.unset(i);
                        model.remove(&i);
                    }
                }
            }
            prop_assert_eq!(b.iter_ones_from(0).collect::<BTreeSet<_>>(), model.clone());
            prop_assert_eq!(
                b.iter_ones_from(from).collect::<Vec<_>>(),
                model.range(from..).copied().collect::<Vec<_>>()
            );
            prop_assert_eq!(b.count_ones(), model.len() as u64);
            prop_assert_eq!(b.none(), model.is_empty());
            let back = SparseBitmap::from_repr(b.to_repr(), len).unwrap();
            prop_assert_eq!(back, b);
        }
    }
}
