//! The checker: verifies a copy of VMs' disks against the guests' acknowledged-write logs.
//!
//! Pure logic over two inputs: the log records and a [`CopyReader`]. It reads the copy in
//! large chunks (only the chunks that logged writes touch, plus a sample of the others)
//! and decides every sector from its self-describing content (see [`crate::content`]).
//!
//! # What a sector may show
//!
//! For a sector `s` let `w1, w2, ...` be the logged writes covering it, by `cg_seq`.
//! The copy's sector shows one of:
//!
//! * zeros: the state before `w1`;
//! * logged write `wj` (tag matches the record): the state between `wj` and `wj+1`;
//! * a valid tag of this VM, disk and position whose `write_id` is **not** in the log: a
//!   write whose outcome the guest never learnt (it failed, e.g. the host went away after
//!   storing it) or one acknowledged in the log's crash window (see [`crate::log`]).
//!   Such a write was issued after every logged write on `s` with a smaller `write_id`
//!   and before every one with a larger id, so it stands for the state after the last
//!   logged `wj` with a smaller id. It is counted as *unacknowledged* and is not an error;
//!   a run with no failed writes and no crash should report 0;
//! * anything else is **wrong**: a corrupt or torn sector, data that is not guest data, a
//!   tag of another VM, disk or position, a tag whose write id is logged with a different
//!   extent, or a sector beyond the end of the copy.
//!
//! # Modes
//!
//! * [`VerifyMode::Latest`]: every sector must show its last acknowledged write (or
//!   something newer and unacknowledged). A sector showing an older state is **missing**
//!   that write.
//! * [`VerifyMode::Prefix`]: the copy must equal the state after all logged writes with
//!   `cg_seq <= K`, for one `K` shared by all VMs given (one consistency group). Each
//!   sector admits an interval of `K`; the checker picks the `K` that the most sectors
//!   admit (the largest on ties) and reports it as `prefix_upto`. Sectors older than `K`
//!   are **missing** writes `<= K`; sectors newer than `K` show writes **ahead** of the
//!   cut. A copy is a prefix iff there are neither (nor wrong sectors). When the copy is a
//!   prefix, `K` is exactly the `cg_seq` of the last logged write it contains.
//!
//! # Never-written sectors
//!
//! A sector no logged write covers must be zero or show an unacknowledged write of this
//! VM at its own position (counted as unacknowledged); anything else is wrong. All such
//! sectors inside chunks read for logged writes are checked, plus
//! [`VerifyOptions::sample_chunks`] random other chunks per disk
//! ([`VerifyOptions::sample_bytes`] each), so a full scan is not needed.
//!
//! # Checking a live copy
//!
//! Read the log before the copy. Writes acknowledged after the log was read then show as
//! unacknowledged (newer) data, which is allowed, so a copy whose guest is still running
//! can be checked; a sector read while it is being rewritten may still show as torn, so
//! a definitive check stops the guest (or pauses replication) first.
//!
//! # Log anomalies
//!
//! The checker also checks its premises: write ids unique per VM, `cg_seq` unique per
//! group, sector-aligned extents, and, for every sector, `cg_seq` order equal to
//! `write_id` order (the guest never overlaps writes in flight, so any other order means
//! the agent sequenced writes against their issue order). Anomalies make the report fail.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::content::{SECTOR_SIZE, SectorFault, decode_sector_slice};
use crate::error::GuestError;
use crate::log::LogRecord;

const SECTOR: u64 = SECTOR_SIZE as u64;
const NONE: u32 = u32::MAX;

/// Read access to a copy of one VM's disks (an image on some host, a replica, a
/// snapshot). The checker calls it from the calling thread; callers in async code should
/// run the checker on a blocking thread.
pub trait CopyReader {
    /// Sizes in bytes of the copy's disks, by disk index. A logged write on a disk
    /// missing here (or beyond its size) is reported as wrong ([`Found::BeyondEnd`]).
    fn disk_sizes(&self) -> io::Result<Vec<u64>>;
    /// Reads exactly `len` bytes of disk `disk_index` at `offset`. The checker only asks
    /// for ranges inside [`CopyReader::disk_sizes`]; `offset` and `len` are multiples of
    /// 512.
    fn read(&self, disk_index: u32, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

/// One VM's log and its copy under test.
#[derive(Clone, Copy)]
pub struct VmCopy<'a> {
    /// The VM (as written in its sectors' tags).
    pub vm_id: u64,
    /// Its acknowledged writes, in any order.
    pub records: &'a [LogRecord],
    /// The copy of its disks.
    pub reader: &'a dyn CopyReader,
}

/// What the copy is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// Every acknowledged write is present (a primary, a sync replica, a copy after
    /// catch-up).
    Latest,
    /// The copy is a crash-consistent prefix of the group's write order (an async
    /// replica, a fail-back copy).
    Prefix,
}

/// Tuning of a verification run.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Offending writes and sectors listed in the report (counts are always complete).
    pub max_listed: usize,
    /// Bytes per read; rounded down to a multiple of 512 (at least 512).
    pub chunk_bytes: usize,
    /// Chunks per disk that no logged write touches to sample.
    pub sample_chunks: usize,
    /// Bytes read from each sampled chunk.
    pub sample_bytes: usize,
    /// Seed for choosing samples.
    pub seed: u64,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            max_listed: 20,
            chunk_bytes: 4 << 20,
            sample_chunks: 16,
            sample_bytes: 64 << 10,
            seed: 0,
        }
    }
}

/// What a sector of the copy holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Found {
    /// All zero: never written.
    Zero,
    /// A guest write of this VM at this position.
    Write {
        /// Its id.
        write_id: u64,
        /// Whether the log holds it.
        acknowledged: bool,
    },
    /// Not a valid guest sector.
    Corrupt {
        /// Why.
        fault: SectorFault,
    },
    /// A valid guest sector that belongs to another VM, disk or position.
    Foreign {
        /// VM in the tag.
        vm_id: u64,
        /// Disk in the tag.
        disk_index: u32,
        /// Write offset in the tag.
        offset: u64,
        /// Sector index in the tag.
        index: u32,
        /// Write id in the tag.
        write_id: u64,
    },
    /// A tag naming a logged write id whose logged extent does not contain this sector
    /// the way the tag says.
    Mismatch {
        /// Write id in the tag.
        write_id: u64,
    },
    /// The sector lies beyond the end of the copy's disk.
    BeyondEnd,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Zero => f.write_str("zeros"),
            Found::Write {
                write_id,
                acknowledged: true,
            } => write!(f, "write {write_id}"),
            Found::Write {
                write_id,
                acknowledged: false,
            } => write!(f, "unacknowledged write {write_id}"),
            Found::Corrupt { fault } => write!(f, "corrupt ({fault})"),
            Found::Foreign {
                vm_id,
                disk_index,
                offset,
                index,
                write_id,
            } => write!(
                f,
                "foreign sector (vm {vm_id} disk {disk_index} write {write_id} at {offset} sector {index})"
            ),
            Found::Mismatch { write_id } => {
                write!(
                    f,
                    "write {write_id} with an extent that disagrees with the log"
                )
            }
            Found::BeyondEnd => f.write_str("beyond the end of the copy"),
        }
    }
}

/// A logged write some of whose sectors are missing from, or ahead in, the copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteProblem {
    /// VM of the write.
    pub vm_id: u64,
    /// The write.
    pub write_id: u64,
    /// Its sequence number.
    pub cg_seq: u64,
    /// Disk.
    pub disk_index: u32,
    /// Byte offset of the write.
    pub offset: u64,
    /// Length of the write.
    pub len: u32,
    /// How many of its sectors are affected.
    pub sectors: u64,
    /// Byte offset of the first affected sector.
    pub first_offset: u64,
    /// What that sector holds.
    pub found: Found,
}

/// A sector holding something no acknowledged write explains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrongSector {
    /// VM whose disk it is.
    pub vm_id: u64,
    /// Disk.
    pub disk_index: u32,
    /// Byte offset of the sector.
    pub offset: u64,
    /// What it holds.
    pub found: Found,
    /// The logged write it should show (at the chosen cut), if any.
    pub expected_write_id: Option<u64>,
}

/// Result of [`verify`]. Counts are complete; lists hold the first
/// [`VerifyOptions::max_listed`] entries (writes by `cg_seq`, sectors by position).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// What was checked.
    pub mode: VerifyMode,
    /// VMs checked.
    pub vm_ids: Vec<u64>,
    /// Valid log records considered.
    pub writes_logged: u64,
    /// Prefix mode: the cut `K` (the copy should equal the state after all logged writes
    /// with `cg_seq <= K`); `None` = before the first logged write (or latest mode).
    pub prefix_upto: Option<u64>,
    /// Logged writes at or below the cut (latest mode: all).
    pub writes_expected: u64,
    /// Sectors covered by at least one logged write, all checked.
    pub sectors_checked: u64,
    /// Sectors no logged write covers that were checked.
    pub sectors_sampled: u64,
    /// Sectors showing a write the log does not hold, newer than the state expected there
    /// (allowed; see the module docs).
    pub unacknowledged_sectors: u64,
    /// Sectors showing an older state than expected.
    pub missing_sectors: u64,
    /// Distinct acknowledged writes with a missing sector.
    pub missing_write_count: u64,
    /// The first missing writes.
    pub missing: Vec<WriteProblem>,
    /// Prefix mode: sectors showing a write after the cut.
    pub ahead_sectors: u64,
    /// Distinct writes after the cut that show.
    pub ahead_write_count: u64,
    /// The first writes after the cut that show.
    pub ahead: Vec<WriteProblem>,
    /// Sectors holding something no acknowledged write explains.
    pub wrong_sectors: u64,
    /// The first wrong sectors.
    pub wrong: Vec<WrongSector>,
    /// Log anomalies found (the checker's premises do not hold).
    pub anomaly_count: u64,
    /// The first anomalies, described.
    pub anomalies: Vec<String>,
}

impl VerifyReport {
    /// True iff nothing is missing, ahead or wrong and the logs are sound: in latest mode
    /// every acknowledged write is on the copy; in prefix mode the copy is a prefix.
    pub fn ok(&self) -> bool {
        self.missing_sectors == 0
            && self.ahead_sectors == 0
            && self.wrong_sectors == 0
            && self.anomaly_count == 0
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            VerifyMode::Latest => "latest",
            VerifyMode::Prefix => "prefix",
        };
        let verdict = if self.ok() { "OK" } else { "FAILED" };
        writeln!(
            f,
            "{mode} check: {verdict}: {} logged writes, {} sectors checked, {} never-written sectors sampled, {} unacknowledged",
            self.writes_logged,
            self.sectors_checked,
            self.sectors_sampled,
            self.unacknowledged_sectors
        )?;
        if self.mode == VerifyMode::Prefix {
            match self.prefix_upto {
                Some(k) => writeln!(
                    f,
                    "prefix up to cg_seq {k} ({} writes)",
                    self.writes_expected
                )?,
                None => writeln!(f, "prefix before the first logged write")?,
            }
        }
        let list = |f: &mut fmt::Formatter<'_>, what: &str, n: u64, w: u64, l: &[WriteProblem]| {
            if n == 0 {
                return Ok(());
            }
            writeln!(f, "{what}: {n} sectors of {w} writes")?;
            for p in l {
                writeln!(
                    f,
                    "  vm {} write {} (cg_seq {}, disk {}, {}+{}): {} sectors, first at {} shows {}",
                    p.vm_id,
                    p.write_id,
                    p.cg_seq,
                    p.disk_index,
                    p.offset,
                    p.len,
                    p.sectors,
                    p.first_offset,
                    p.found
                )?;
            }
            Ok(())
        };
        list(
            f,
            "missing",
            self.missing_sectors,
            self.missing_write_count,
            &self.missing,
        )?;
        list(
            f,
            "ahead of the cut",
            self.ahead_sectors,
            self.ahead_write_count,
            &self.ahead,
        )?;
        if self.wrong_sectors > 0 {
            writeln!(f, "wrong: {} sectors", self.wrong_sectors)?;
            for w in &self.wrong {
                write!(
                    f,
                    "  vm {} disk {} offset {}: {}",
                    w.vm_id, w.disk_index, w.offset, w.found
                )?;
                match w.expected_write_id {
                    Some(id) => writeln!(f, ", expected write {id}")?,
                    None => writeln!(f, ", expected zeros")?,
                }
            }
        }
        if self.anomaly_count > 0 {
            writeln!(f, "log anomalies: {}", self.anomaly_count)?;
            for a in &self.anomalies {
                writeln!(f, "  {a}")?;
            }
        }
        Ok(())
    }
}

/// Checks one VM's copy: every acknowledged write must be there.
pub fn verify_latest(
    vm_id: u64,
    records: &[LogRecord],
    reader: &dyn CopyReader,
    opts: &VerifyOptions,
) -> Result<VerifyReport, GuestError> {
    verify(
        VerifyMode::Latest,
        &[VmCopy {
            vm_id,
            records,
            reader,
        }],
        opts,
    )
}

/// Checks that one VM's copy is a prefix of its write order.
pub fn verify_prefix(
    vm_id: u64,
    records: &[LogRecord],
    reader: &dyn CopyReader,
    opts: &VerifyOptions,
) -> Result<VerifyReport, GuestError> {
    verify(
        VerifyMode::Prefix,
        &[VmCopy {
            vm_id,
            records,
            reader,
        }],
        opts,
    )
}

/// Checks copies of the VMs of one consistency group (their `cg_seq`s share one order)
/// in `mode`; see the module docs for the semantics.
///
/// Fails only if a copy cannot be read or the same VM is given twice; everything found
/// on the copies is in the report.
pub fn verify(
    mode: VerifyMode,
    copies: &[VmCopy<'_>],
    opts: &VerifyOptions,
) -> Result<VerifyReport, GuestError> {
    let mut vm_ids = HashSet::new();
    for c in copies {
        if !vm_ids.insert(c.vm_id) {
            return Err(GuestError::InvalidCheck(format!(
                "VM {} is given more than once",
                c.vm_id
            )));
        }
    }
    let max_listed = opts.max_listed;
    let mut anomalies = Anomalies::new(max_listed);
    let index = Index::build(copies, &mut anomalies);
    let mut scan = Scan {
        idx: &index,
        copies,
        runs: Vec::new(),
        wrong: Vec::new(),
        wrong_count: 0,
        touched: 0,
        sampled: 0,
        unacked_untouched: 0,
        anomalies,
        max_listed,
        entries: Vec::new(),
    };
    let chunk = (opts.chunk_bytes / SECTOR_SIZE).max(1) as u64 * SECTOR;
    let sample = (opts.sample_bytes / SECTOR_SIZE) as u64 * SECTOR;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    for (ci, copy) in copies.iter().enumerate() {
        let ci = ci as u32;
        let sizes = copy
            .reader
            .disk_sizes()
            .map_err(|source| GuestError::CopyRead {
                disk_index: 0,
                offset: 0,
                source,
            })?;
        let mut disks: BTreeSet<u32> = (0..sizes.len() as u32).collect();
        disks.extend(index.disks.keys().filter(|k| k.0 == ci).map(|k| k.1));
        for disk in disks {
            let size = sizes.get(disk as usize).copied().unwrap_or(0) / SECTOR * SECTOR;
            let touched = index.touched_chunks(ci, disk, chunk);
            for &w in &touched {
                let start = w * chunk;
                let data = read_exact(
                    copy.reader,
                    disk,
                    start,
                    chunk.min(size.saturating_sub(start)),
                )?;
                scan.region(ci, disk, start / SECTOR, chunk / SECTOR, &data);
            }
            if size == 0 || sample == 0 {
                continue;
            }
            for w in pick_samples(&mut rng, size.div_ceil(chunk), &touched, opts.sample_chunks) {
                let start = w * chunk;
                let avail = chunk.min(size - start);
                let len = sample.min(avail);
                if len == 0 {
                    continue;
                }
                let at = start + rng.gen_range(0..=(avail - len) / SECTOR) * SECTOR;
                let data = read_exact(copy.reader, disk, at, len)?;
                scan.region(ci, disk, at / SECTOR, len / SECTOR, &data);
            }
        }
    }
    Ok(scan.finish(mode))
}

fn read_exact(
    reader: &dyn CopyReader,
    disk: u32,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, GuestError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let err = |source| GuestError::CopyRead {
        disk_index: disk,
        offset,
        source,
    };
    let want = usize::try_from(len).map_err(|_| {
        err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "read too large",
        ))
    })?;
    let data = reader.read(disk, offset, want).map_err(err)?;
    if data.len() != want {
        return Err(err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read returned {} of {want} bytes", data.len()),
        )));
    }
    Ok(data)
}

/// Up to `n` chunk indices below `chunks` that are not in `touched`.
fn pick_samples(rng: &mut StdRng, chunks: u64, touched: &BTreeSet<u64>, n: usize) -> Vec<u64> {
    let touched_here = touched.range(..chunks).count() as u64;
    let untouched = chunks - touched_here;
    if untouched == 0 || n == 0 {
        return Vec::new();
    }
    if untouched <= n as u64 {
        return (0..chunks).filter(|w| !touched.contains(w)).collect();
    }
    let mut picked = BTreeSet::new();
    // Rejection sampling; untouched chunks are more than `n`, so this ends quickly.
    for _ in 0..n * 16 {
        if picked.len() == n {
            break;
        }
        let w = rng.gen_range(0..chunks);
        if !touched.contains(&w) {
            picked.insert(w);
        }
    }
    picked.into_iter().collect()
}

struct Anomalies {
    count: u64,
    list: Vec<String>,
    max: usize,
    pairs: HashSet<(u32, u32)>,
}

impl Anomalies {
    fn new(max: usize) -> Anomalies {
        Anomalies {
            count: 0,
            list: Vec::new(),
            max,
            pairs: HashSet::new(),
        }
    }

    fn add(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.list.len() < self.max {
            self.list.push(what());
        }
    }
}

struct Rec {
    copy: u32,
    r: LogRecord,
    /// Index of the record's cut: 1 + position of its `cg_seq` among the distinct ones.
    cand: u32,
}

struct DiskIndex {
    by_offset: Vec<u32>,
    max_len: u64,
}

struct Index {
    recs: Vec<Rec>,
    by_id: HashMap<(u32, u64), u32>,
    /// Distinct `cg_seq`s, ascending. Cut `k` (1-based) means "all writes with
    /// `cg_seq <= cuts[k-1]`"; cut 0 means "none".
    cuts: Vec<u64>,
    disks: HashMap<(u32, u32), DiskIndex>,
}

impl Index {
    fn build(copies: &[VmCopy<'_>], anomalies: &mut Anomalies) -> Index {
        let mut recs = Vec::new();
        let mut by_id = HashMap::new();
        for (ci, copy) in copies.iter().enumerate() {
            let ci = ci as u32;
            for r in copy.records {
                let aligned = r.len > 0
                    && r.offset % SECTOR == 0
                    && u64::from(r.len) % SECTOR == 0
                    && r.offset.checked_add(u64::from(r.len)).is_some();
                if !aligned {
                    anomalies.add(|| {
                        format!(
                            "vm {} write {}: extent {}+{} is not whole sectors; ignored",
                            copy.vm_id, r.write_id, r.offset, r.len
                        )
                    });
                    continue;
                }
                if by_id.contains_key(&(ci, r.write_id)) {
                    anomalies.add(|| {
                        format!(
                            "vm {} write {} is logged more than once; later records ignored",
                            copy.vm_id, r.write_id
                        )
                    });
                    continue;
                }
                by_id.insert((ci, r.write_id), recs.len() as u32);
                recs.push(Rec {
                    copy: ci,
                    r: *r,
                    cand: 0,
                });
            }
        }
        let mut seqs: Vec<(u64, u32)> = recs
            .iter()
            .enumerate()
            .map(|(i, r)| (r.r.cg_seq, i as u32))
            .collect();
        seqs.sort_unstable();
        for pair in seqs.windows(2) {
            if pair[0].0 == pair[1].0 {
                let (a, b) = (&recs[pair[0].1 as usize], &recs[pair[1].1 as usize]);
                anomalies.add(|| {
                    format!(
                        "cg_seq {} was given to two writes (vm {} write {}, vm {} write {})",
                        a.r.cg_seq,
                        copies[a.copy as usize].vm_id,
                        a.r.write_id,
                        copies[b.copy as usize].vm_id,
                        b.r.write_id
                    )
                });
            }
        }
        let mut cuts: Vec<u64> = seqs.iter().map(|s| s.0).collect();
        cuts.dedup();
        for r in &mut recs {
            // Every record's seq is in `cuts`.
            r.cand = cuts.partition_point(|&s| s < r.r.cg_seq) as u32 + 1;
        }
        let mut disks: HashMap<(u32, u32), DiskIndex> = HashMap::new();
        for (i, r) in recs.iter().enumerate() {
            let d = disks
                .entry((r.copy, r.r.disk_index))
                .or_insert_with(|| DiskIndex {
                    by_offset: Vec::new(),
                    max_len: 0,
                });
            d.by_offset.push(i as u32);
            d.max_len = d.max_len.max(u64::from(r.r.len));
        }
        for d in disks.values_mut() {
            d.by_offset
                .sort_unstable_by_key(|&i| recs[i as usize].r.offset);
        }
        Index {
            recs,
            by_id,
            cuts,
            disks,
        }
    }

    fn rec(&self, i: u32) -> &Rec {
        &self.recs[i as usize]
    }

    /// Records of `(copy, disk)` overlapping bytes `start..end`.
    fn overlapping(&self, copy: u32, disk: u32, start: u64, end: u64) -> Vec<u32> {
        let Some(d) = self.disks.get(&(copy, disk)) else {
            return Vec::new();
        };
        let first = d
            .by_offset
            .partition_point(|&i| self.rec(i).r.offset.saturating_add(d.max_len) <= start);
        d.by_offset[first..]
            .iter()
            .copied()
            .take_while(|&i| self.rec(i).r.offset < end)
            .filter(|&i| self.rec(i).r.end() > start)
            .collect()
    }

    /// Logged writes covering the sector at byte `offset`, by (cg_seq, write_id).
    fn chain_at(&self, copy: u32, disk: u32, offset: u64) -> Vec<u32> {
        let mut chain = self.overlapping(copy, disk, offset, offset + SECTOR);
        chain.sort_unstable_by_key(|&i| (self.rec(i).cand, self.rec(i).r.write_id));
        chain
    }

    /// Chunk indices (of `chunk` bytes) that logged writes of `(copy, disk)` touch.
    fn touched_chunks(&self, copy: u32, disk: u32, chunk: u64) -> BTreeSet<u64> {
        let mut set = BTreeSet::new();
        if let Some(d) = self.disks.get(&(copy, disk)) {
            for &i in &d.by_offset {
                let r = &self.rec(i).r;
                set.extend(r.offset / chunk..=(r.end() - 1) / chunk);
            }
        }
        set
    }
}

/// Consecutive sectors with the same observation and the same admissible cuts.
struct Run {
    copy: u32,
    disk: u32,
    start: u64,
    count: u64,
    /// Cuts `lo..=hi` are consistent with what the sectors show.
    lo: u32,
    hi: u32,
    /// The logged write the sectors stand for (`NONE`: the state before any).
    rec: u32,
    /// Write id actually on the sectors (`None`: zeros).
    seen: Option<u64>,
    unacked: bool,
}

enum Obs {
    Wrong(Found),
    /// The sectors stand for the state after `chain[pos]` (`None`: before the chain).
    Shown {
        pos: Option<usize>,
        seen: Option<u64>,
        unacked: bool,
    },
}

struct Scan<'a> {
    idx: &'a Index,
    copies: &'a [VmCopy<'a>],
    runs: Vec<Run>,
    wrong: Vec<(u32, u32, u64, Found)>,
    wrong_count: u64,
    touched: u64,
    sampled: u64,
    unacked_untouched: u64,
    anomalies: Anomalies,
    max_listed: usize,
    /// Scratch: (sector within region, record) pairs.
    entries: Vec<(u32, u32)>,
}

#[derive(Default)]
struct Agg {
    sectors: u64,
    first: u64,
    found: Option<Found>,
}

impl Scan<'_> {
    /// Checks `sectors` sectors from `start_sector`; `data` holds the readable part
    /// (shorter when the region runs past the end of the disk).
    fn region(&mut self, copy: u32, disk: u32, start_sector: u64, sectors: u64, data: &[u8]) {
        let idx = self.idx;
        let start = start_sector * SECTOR;
        let end = start + sectors * SECTOR;
        let mut entries = std::mem::take(&mut self.entries);
        entries.clear();
        for i in idx.overlapping(copy, disk, start, end) {
            let r = &idx.rec(i).r;
            let first = r.offset.max(start) / SECTOR - start_sector;
            let last = r.end().min(end) / SECTOR - start_sector;
            entries.extend((first..last).map(|s| (s as u32, i)));
        }
        entries.sort_unstable_by_key(|&(s, i)| (s, idx.rec(i).cand, idx.rec(i).r.write_id));
        let mut e = 0;
        let mut chain: Vec<u32> = Vec::new();
        for rel in 0..sectors {
            chain.clear();
            while e < entries.len() && u64::from(entries[e].0) == rel {
                chain.push(entries[e].1);
                e += 1;
            }
            self.check_order(&chain);
            let at = rel as usize * SECTOR_SIZE;
            let bytes = data.get(at..at + SECTOR_SIZE);
            if bytes.is_none() && chain.is_empty() {
                continue;
            }
            let sector = start_sector + rel;
            let obs = self.observe(copy, disk, sector, bytes, &chain);
            if chain.is_empty() {
                self.sampled += 1;
                match obs {
                    Obs::Wrong(found) => self.add_wrong(copy, disk, sector, found),
                    Obs::Shown { unacked, .. } => {
                        self.unacked_untouched += u64::from(unacked);
                    }
                }
                continue;
            }
            self.touched += 1;
            match obs {
                Obs::Wrong(found) => self.add_wrong(copy, disk, sector, found),
                Obs::Shown { pos, seen, unacked } => {
                    let cand = |j: usize| idx.rec(chain[j]).cand;
                    let (lo, rec) = match pos {
                        Some(j) => (cand(j), chain[j]),
                        None => (0, NONE),
                    };
                    let next = pos.map_or(0, |j| j + 1);
                    let hi = if next < chain.len() {
                        cand(next).saturating_sub(1)
                    } else {
                        u32::MAX
                    };
                    self.push_run(Run {
                        copy,
                        disk,
                        start: sector,
                        count: 1,
                        lo,
                        hi,
                        rec,
                        seen,
                        unacked,
                    });
                }
            }
        }
        self.entries = entries;
    }

    /// Flags writes on one sector whose `cg_seq` order differs from their issue order.
    fn check_order(&mut self, chain: &[u32]) {
        for pair in chain.windows(2) {
            let (a, b) = (self.idx.rec(pair[0]), self.idx.rec(pair[1]));
            if a.r.write_id > b.r.write_id && self.anomalies.pairs.insert((pair[0], pair[1])) {
                let vm = self.copies[a.copy as usize].vm_id;
                self.anomalies.add(|| {
                    format!(
                        "vm {vm} disk {}: write {} got cg_seq {} but the earlier-issued overlapping write {} got the later cg_seq {}",
                        a.r.disk_index, b.r.write_id, b.r.cg_seq, a.r.write_id, a.r.cg_seq
                    )
                });
            }
        }
    }

    fn observe(
        &self,
        copy: u32,
        disk: u32,
        sector: u64,
        bytes: Option<&[u8]>,
        chain: &[u32],
    ) -> Obs {
        let Some(bytes) = bytes else {
            return Obs::Wrong(Found::BeyondEnd);
        };
        let st = match decode_sector_slice(bytes) {
            Err(fault) => return Obs::Wrong(Found::Corrupt { fault }),
            Ok(None) => {
                return Obs::Shown {
                    pos: None,
                    seen: None,
                    unacked: false,
                };
            }
            Ok(Some(st)) => st,
        };
        let vm_id = self.copies[copy as usize].vm_id;
        let t = st.tag;
        if t.vm_id != vm_id || t.disk_index != disk || st.position() != Some(sector * SECTOR) {
            return Obs::Wrong(Found::Foreign {
                vm_id: t.vm_id,
                disk_index: t.disk_index,
                offset: t.offset,
                index: st.index,
                write_id: t.write_id,
            });
        }
        match self.idx.by_id.get(&(copy, t.write_id)) {
            Some(&i) => {
                let r = &self.idx.rec(i).r;
                let same = r.disk_index == disk
                    && r.offset == t.offset
                    && u64::from(r.len) == u64::from(st.count) * SECTOR;
                match chain.iter().position(|&c| c == i) {
                    Some(j) if same => Obs::Shown {
                        pos: Some(j),
                        seen: Some(t.write_id),
                        unacked: false,
                    },
                    _ => Obs::Wrong(Found::Mismatch {
                        write_id: t.write_id,
                    }),
                }
            }
            None => Obs::Shown {
                pos: chain
                    .iter()
                    .rposition(|&c| self.idx.rec(c).r.write_id < t.write_id),
                seen: Some(t.write_id),
                unacked: true,
            },
        }
    }

    fn push_run(&mut self, run: Run) {
        if let Some(last) = self.runs.last_mut()
            && last.copy == run.copy
            && last.disk == run.disk
            && last.start + last.count == run.start
            && last.lo == run.lo
            && last.hi == run.hi
            && last.rec == run.rec
            && last.seen == run.seen
            && last.unacked == run.unacked
        {
            last.count += 1;
            return;
        }
        self.runs.push(run);
    }

    fn add_wrong(&mut self, copy: u32, disk: u32, sector: u64, found: Found) {
        self.wrong_count += 1;
        if self.wrong.len() < self.max_listed {
            self.wrong.push((copy, disk, sector, found));
        }
    }

    /// The cut most sectors admit; the largest on ties.
    fn best_cut(&self) -> u32 {
        let c = self.idx.cuts.len();
        let mut diff = vec![0i64; c + 2];
        for run in &self.runs {
            let hi = (run.hi as usize).min(c);
            let lo = run.lo as usize;
            if lo <= hi {
                diff[lo] += run.count as i64;
                diff[hi + 1] -= run.count as i64;
            }
        }
        let (mut best, mut best_n, mut cur) = (0, i64::MIN, 0i64);
        for (k, d) in diff.iter().take(c + 1).enumerate() {
            cur += d;
            if cur >= best_n {
                best_n = cur;
                best = k;
            }
        }
        best as u32
    }

    fn finish(self, mode: VerifyMode) -> VerifyReport {
        let idx = self.idx;
        let c = idx.cuts.len() as u32;
        let k = match mode {
            VerifyMode::Latest => c,
            VerifyMode::Prefix => self.best_cut(),
        };
        let mut unacked = self.unacked_untouched;
        let mut missing: HashMap<u32, Agg> = HashMap::new();
        let mut ahead: HashMap<u32, Agg> = HashMap::new();
        let (mut missing_sectors, mut ahead_sectors) = (0u64, 0u64);
        let note = |agg: &mut Agg, offset: u64, run: &Run| {
            if agg.sectors == 0 || offset < agg.first {
                agg.first = offset;
                agg.found = Some(match run.seen {
                    None => Found::Zero,
                    Some(write_id) => Found::Write {
                        write_id,
                        acknowledged: !run.unacked,
                    },
                });
            }
            agg.sectors += 1;
        };
        for run in &self.runs {
            let hi = run.hi.min(c);
            if run.lo <= k && k <= hi {
                if run.unacked {
                    unacked += run.count;
                }
                continue;
            }
            for sector in run.start..run.start + run.count {
                let offset = sector * SECTOR;
                if hi < k {
                    missing_sectors += 1;
                    let chain = idx.chain_at(run.copy, run.disk, offset);
                    // hi < k means the write after the shown one is at or below the cut.
                    if let Some(&e) = chain.iter().rev().find(|&&i| idx.rec(i).cand <= k) {
                        note(missing.entry(e).or_default(), offset, run);
                    }
                } else {
                    ahead_sectors += 1;
                    if run.rec != NONE {
                        note(ahead.entry(run.rec).or_default(), offset, run);
                    }
                }
            }
        }
        let problems = |map: HashMap<u32, Agg>| -> Vec<WriteProblem> {
            let mut v: Vec<(u32, Agg)> = map.into_iter().collect();
            v.sort_unstable_by_key(|(i, _)| (idx.rec(*i).r.cg_seq, idx.rec(*i).r.write_id));
            v.into_iter()
                .take(self.max_listed)
                .map(|(i, agg)| {
                    let rec = idx.rec(i);
                    WriteProblem {
                        vm_id: self.copies[rec.copy as usize].vm_id,
                        write_id: rec.r.write_id,
                        cg_seq: rec.r.cg_seq,
                        disk_index: rec.r.disk_index,
                        offset: rec.r.offset,
                        len: rec.r.len,
                        sectors: agg.sectors,
                        first_offset: agg.first,
                        found: agg.found.unwrap_or(Found::Zero),
                    }
                })
                .collect()
        };
        let missing_write_count = missing.len() as u64;
        let ahead_write_count = ahead.len() as u64;
        let wrong = self
            .wrong
            .iter()
            .map(|(copy, disk, sector, found)| {
                let expected = idx
                    .chain_at(*copy, *disk, sector * SECTOR)
                    .into_iter()
                    .rev()
                    .find(|&i| idx.rec(i).cand <= k);
                WrongSector {
                    vm_id: self.copies[*copy as usize].vm_id,
                    disk_index: *disk,
                    offset: sector * SECTOR,
                    found: found.clone(),
                    expected_write_id: expected.map(|i| idx.rec(i).r.write_id),
                }
            })
            .collect();
        VerifyReport {
            mode,
            vm_ids: self.copies.iter().map(|c| c.vm_id).collect(),
            writes_logged: idx.recs.len() as u64,
            prefix_upto: match mode {
                VerifyMode::Prefix if k > 0 => Some(idx.cuts[k as usize - 1]),
                _ => None,
            },
            writes_expected: idx.recs.iter().filter(|r| r.cand <= k).count() as u64,
            sectors_checked: self.touched,
            sectors_sampled: self.sampled,
            unacknowledged_sectors: unacked,
            missing_sectors,
            missing_write_count,
            missing: problems(missing),
            ahead_sectors,
            ahead_write_count,
            ahead: problems(ahead),
            wrong_sectors: self.wrong_count,
            wrong,
            anomaly_count: self.anomalies.count,
            anomalies: self.anomalies.list,
        }
    }
}
