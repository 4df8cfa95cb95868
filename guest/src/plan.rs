//! Pure pieces of the guest runner: where the next write goes, when it may be issued,
//! and latency percentiles. No I/O and no clock of their own: time is passed in.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::GuestError;
use crate::workload::{Pattern, Workload};

/// Chooses `(disk, block)` for each write; blocks are `size`-aligned.
#[derive(Debug)]
pub(crate) struct Planner {
    rng: StdRng,
    pattern: Pattern,
    size: u64,
    /// Blocks in the written region of each disk (all > 0).
    blocks: Vec<u64>,
    cursors: Vec<u64>,
    next_disk: usize,
}

/// How often a random pick is retried when it lands on a block with a write in flight.
const PICK_TRIES: usize = 16;

impl Planner {
    pub(crate) fn new(
        workload: &Workload,
        disk_sizes: &[u64],
        seed: u64,
    ) -> Result<Planner, GuestError> {
        if disk_sizes.is_empty() {
            return Err(GuestError::Config("the VM has no disks".into()));
        }
        let size = u64::from(workload.size);
        let mut blocks = Vec::with_capacity(disk_sizes.len());
        for (i, &disk) in disk_sizes.iter().enumerate() {
            let region = workload.span.map_or(disk, |s| s.min(disk));
            let n = region / size;
            if n == 0 {
                return Err(GuestError::Config(format!(
                    "disk {i} ({disk} bytes) is smaller than one write ({size} bytes); lower size="
                )));
            }
            blocks.push(n);
        }
        Ok(Planner {
            rng: StdRng::seed_from_u64(seed),
            pattern: workload.pattern,
            size,
            cursors: vec![0; blocks.len()],
            blocks,
            next_disk: 0,
        })
    }

    /// Byte offset of `block`.
    pub(crate) fn offset(&self, block: u64) -> u64 {
        block * self.size
    }

    /// The next write's `(disk, block)`, skipping blocks for which `busy` is true (the
    /// guest never has two overlapping writes in flight). `None` means "wait for a write
    /// to complete and ask again".
    pub(crate) fn next(&mut self, busy: impl Fn(usize, u64) -> bool) -> Option<(usize, u64)> {
        match self.pattern {
            Pattern::Sequential => {
                let disk = self.next_disk;
                let block = self.cursors[disk];
                if busy(disk, block) {
                    return None;
                }
                self.next_disk = (disk + 1) % self.blocks.len();
                self.cursors[disk] = (block + 1) % self.blocks[disk];
                Some((disk, block))
            }
            Pattern::Random | Pattern::Hot => {
                for _ in 0..PICK_TRIES {
                    let disk = self.rng.gen_range(0..self.blocks.len());
                    let n = self.blocks[disk];
                    let hot = (n / 10).max(1);
                    let block = if self.pattern == Pattern::Hot && hot < n {
                        if self.rng.gen_bool(0.9) {
                            self.rng.gen_range(0..hot)
                        } else {
                            self.rng.gen_range(hot..n)
                        }
                    } else {
                        self.rng.gen_range(0..n)
                    };
                    if !busy(disk, block) {
                        return Some((disk, block));
                    }
                }
                None
            }
        }
    }
}

/// The fill pass ([`Workload::fill`]): every byte of each disk's written region once, in
/// order, disk after disk, in writes of at most `size` bytes.
#[derive(Debug)]
pub(crate) struct FillPass {
    size: u64,
    /// End of the written region of each disk (sector-aligned).
    ends: Vec<u64>,
    disk: usize,
    offset: u64,
}

impl FillPass {
    pub(crate) fn new(size: u32, span: Option<u64>, disk_sizes: &[u64]) -> FillPass {
        let sector = crate::content::SECTOR_SIZE as u64;
        FillPass {
            size: u64::from(size).max(sector),
            ends: disk_sizes
                .iter()
                .map(|&d| span.map_or(d, |s| s.min(d)) / sector * sector)
                .collect(),
            disk: 0,
            offset: 0,
        }
    }

    /// The next write `(disk, offset, len)`, or `None` once everything was handed out.
    pub(crate) fn next(&mut self) -> Option<(usize, u64, u32)> {
        while let Some(&end) = self.ends.get(self.disk) {
            if self.offset < end {
                let len = self.size.min(end - self.offset);
                let at = self.offset;
                self.offset += len;
                // `len` <= `size`, which came from a u32.
                return Some((self.disk, at, len as u32));
            }
            self.disk += 1;
            self.offset = 0;
        }
        None
    }
}

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Starts with one token, so the first write goes out at once without a burst.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: 1.0,
            last: now,
        }
    }

    /// Takes a token, or says when the next one will be there.
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Instant> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Returns a token that was taken but not used.
    pub(crate) fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }
}

/// Log-linear histogram of microsecond latencies: 8 sub-buckets per power of two, so a
/// quantile is within 1/16 of the true value.
#[derive(Clone, Debug)]
pub(crate) struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
}

const LINEAR: u64 = 16;
const SUB_BITS: u32 = 3;

impl LatencyHistogram {
    pub(crate) fn new() -> LatencyHistogram {
        LatencyHistogram {
            counts: vec![0; Self::index(u64::MAX) + 1],
            total: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < LINEAR {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= 4
        let sub = (v >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
        (LINEAR + u64::from(e - 4) * (1 << SUB_BITS) + sub) as usize
    }

    /// Midpoint of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < LINEAR {
            return i;
        }
        let e = (i - LINEAR) / (1 << SUB_BITS) + 4;
        let sub = (i - LINEAR) % (1 << SUB_BITS);
        let low = ((1 << SUB_BITS) + sub) << (e - u64::from(SUB_BITS));
        let width = 1u64 << (e - u64::from(SUB_BITS));
        low.saturating_add(width / 2)
    }

    pub(crate) fn record(&mut self, micros: u64) {
        self.counts[Self::index(micros)] += 1;
        self.total += 1;
    }

    /// The `q`-quantile (0..=1); 0 when nothing was recorded.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn fill_pass_covers_each_region_once_in_order() {
        let mut f = FillPass::new(4096, Some(10_240), &[16_384, 6_144]);
        let got: Vec<_> = std::iter::from_fn(|| f.next()).collect();
        assert_eq!(
            got,
            vec![
                (0, 0, 4096),
                (0, 4096, 4096),
                (0, 8192, 2048),
                (1, 0, 4096),
                (1, 4096, 2048)
            ]
        );
        assert_eq!(f.next(), None);
    }

    fn workload(spec: &str) -> Workload {
        spec.parse().unwrap()
    }

    #[test]
    fn random_writes_stay_in_the_span_and_aligned() {
        let w = workload("size=8k,span=1MiB");
        let mut p = Planner::new(&w, &[4 << 20, 512 << 10], 1).unwrap();
        let mut disks = HashSet::new();
        for _ in 0..2000 {
            let (d, b) = p.next(|_, _| false).unwrap();
            disks.insert(d);
            let off = p.offset(b);
            assert_eq!(off % 8192, 0);
            assert!(off + 8192 <= if d == 0 { 1 << 20 } else { 512 << 10 });
        }
        assert_eq!(disks.len(), 2);
    }

    #[test]
    fn hot_pattern_concentrates_on_a_tenth() {
        let w = workload("size=4k,pattern=hot");
        let mut p = Planner::new(&w, &[4 << 20], 7).unwrap(); // 1024 blocks, 102 hot
        let hot = (0..10_000)
            .filter(|_| p.next(|_, _| false).unwrap().1 < 102)
            .count();
        assert!((8_500..9_500).contains(&hot), "{hot}");
    }

    #[test]
    fn sequential_takes_disks_in_turn_and_wraps() {
        let w = workload("size=4k,pattern=sequential,span=8k");
        let mut p = Planner::new(&w, &[1 << 20, 1 << 20], 0).unwrap();
        let got: Vec<_> = (0..6).map(|_| p.next(|_, _| false).unwrap()).collect();
        assert_eq!(got, [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 0)]);
        // A busy next block makes the planner wait rather than overlap.
        assert_eq!(p.next(|d, b| d == 0 && b == 1), None);
    }

    #[test]
    fn busy_blocks_are_never_chosen() {
        let w = workload("size=4k,span=16k");
        let mut p = Planner::new(&w, &[1 << 20], 3).unwrap();
        for _ in 0..100 {
            if let Some((_, b)) = p.next(|_, b| b != 2) {
                assert_eq!(b, 2);
            }
        }
    }

    #[test]
    fn too_small_disk_is_a_config_error() {
        let w = workload("size=64k");
        assert!(matches!(
            Planner::new(&w, &[1 << 20, 4096], 0),
            Err(GuestError::Config(_))
        ));
        assert!(matches!(
            Planner::new(&w, &[], 0),
            Err(GuestError::Config(_))
        ));
    }

    #[test]
    fn token_bucket_holds_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 4, t0);
        assert!(b.try_take(t0).is_ok());
        let next = b.try_take(t0).unwrap_err();
        assert_eq!(next - t0, Duration::from_millis(10));
        // Over one simulated second with coarse wake-ups, ~100 tokens, never more.
        let mut taken = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(1) {
            while b.try_take(now).is_ok() {
                taken += 1;
            }
            now += Duration::from_millis(7);
        }
        assert!((98..=105).contains(&taken), "{taken}");
        b.refund();
    }

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=1000u64 {
            h.record(v);
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((470..=530).contains(&p50), "{p50}");
        assert!((930..=1050).contains(&p99), "{p99}");
        h.record(u64::MAX);
        assert!(h.quantile(1.0) > 1 << 62);
    }
}
