//! The activity log: which extents may hold writes that the metadata checkpoint does not
//! reflect. Pure decision logic ([`ActivityLog`]) plus the on-disk encoding of the log file.
//!
//! On disk the log is a header frame (checkpoint generation, clean flag) followed by
//! appended frames, each adding a batch of extents to the active set. A frame is
//! `[len: u32 LE][xxh3-64 of payload: u64 LE][payload]`, the payload a codec-encoded
//! [`LogEntry`]. A crash during an append leaves at most one torn frame at the tail; the
//! checksum detects it, and no write waited on a torn frame, so it is ignored.
//!
//! A bad frame with valid frames after it is not a torn tail: something appended behind a
//! torn frame, or the file was damaged. Frames after the bad one may name extents with
//! writes the metadata does not reflect, and frames after it cannot be trusted to be all
//! there, so recovery then distrusts the whole image. (`DiskImage` never appends behind a
//! failed append: the image is failed and the append handle dropped.)

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::chunkmap::Trust;
use crate::sparse::SparseBitmap;

/// In-memory state of the activity log of one image, and the rules for admitting writes
/// and checkpointing. Pure: the caller performs the appends and file replacements it asks
/// for, in the order documented on each method.
///
/// Invariant kept together with the caller: every extent with a write in flight, or with
/// a finished write not yet reflected in a durable metadata checkpoint, is in the active
/// set of the durable log file. `persisted` is a subset of that durable set.
#[derive(Clone, Debug)]
pub struct ActivityLog {
    /// Extents known to be in the durable log file.
    persisted: SparseBitmap,
    /// Extents requested by waiting writers, not yet appended.
    pending: BTreeSet<u32>,
    /// Writes in flight per extent, for extents that have any.
    inflight: HashMap<u32, u32>,
    inflight_total: u64,
    /// During a checkpoint: extents with writes in flight when it took its snapshot or
    /// admitted since. These must stay active in the log that replaces the current one.
    touched: Option<SparseBitmap>,
}

impl ActivityLog {
    /// A log for `extent_count` extents whose durable active set is `active`.
    pub fn new(extent_count: u32, active: impl IntoIterator<Item = u32>) -> Self {
        let mut persisted = SparseBitmap::new(u64::from(extent_count));
        for e in active {
            persisted.set(u64::from(e));
        }
        Self {
            persisted,
            pending: BTreeSet::new(),
            inflight: HashMap::new(),
            inflight_total: 0,
            touched: None,
        }
    }

    /// Tries to admit a write touching `extents`. On `true` the write is counted in flight
    /// and may be issued; the caller must call [`ActivityLog::finish`] when it returns. On
    /// `false` the missing extents are queued; the caller must get them appended (see
    /// [`ActivityLog::take_batch`]) and try again.
    pub fn admit(&mut self, extents: Range<u32>) -> bool {
        let missing: Vec<u32> = extents
            .clone()
            .filter(|&e| !self.persisted.get(u64::from(e)))
            .collect();
        if !missing.is_empty() {
            self.pending.extend(missing);
            return false;
        }
        for e in extents {
            *self.inflight.entry(e).or_insert(0) += 1;
            self.inflight_total += 1;
            if let Some(t) = &mut self.touched {
                t.set(u64::from(e));
            }
        }
        true
    }

    /// Whether every one of `extents` is in the durable log (a write there would be
    /// admitted without an append).
    pub fn is_active(&self, extents: Range<u32>) -> bool {
        extents
            .into_iter()
            .all(|e| self.persisted.get(u64::from(e)))
    }

    /// Like [`ActivityLog::admit`] for a caller that only wants `extents` active ahead of
    /// its write: `true` if they are; otherwise they are queued for the next batch (so
    /// that one append covers every caller waiting meanwhile) and it must get them
    /// appended and ask again. Counts nothing in flight.
    pub fn request(&mut self, extents: Range<u32>) -> bool {
        let missing: Vec<u32> = extents
            .filter(|&e| !self.persisted.get(u64::from(e)))
            .collect();
        let active = missing.is_empty();
        self.pending.extend(missing);
        active
    }

    /// The extents the caller (holding the right to append to the log) must append now:
    /// everything queued plus whatever of `extents` is not durable. Empty means another
    /// writer's batch already covered `extents`: retry [`ActivityLog::admit`].
    pub fn take_batch(&mut self, extents: Range<u32>) -> Vec<u32> {
        for e in extents {
            if !self.persisted.get(u64::from(e)) {
                self.pending.insert(e);
            }
        }
        std::mem::take(&mut self.pending).into_iter().collect()
    }

    /// The appended `batch` is durable.
    pub fn batch_durable(&mut self, batch: &[u32]) {
        for &e in batch {
            self.persisted.set(u64::from(e));
        }
    }

    /// A write admitted on `extents` returned.
    pub fn finish(&mut self, extents: Range<u32>) {
        for e in extents {
            if let Some(n) = self.inflight.get_mut(&e) {
                *n -= 1;
                self.inflight_total -= 1;
                if *n == 0 {
                    self.inflight.remove(&e);
                }
            }
        }
    }

    /// Writes in flight.
    pub fn inflight(&self) -> u64 {
        self.inflight_total
    }

    /// Number of extents in the durable active set (as far as this state knows).
    pub fn active_count(&self) -> u64 {
        self.persisted.count_ones()
    }

    /// Call under the same lock as the metadata snapshot a checkpoint is about to write.
    pub fn begin_checkpoint(&mut self) {
        let mut t = SparseBitmap::new(self.persisted.len());
        for &e in self.inflight.keys() {
            t.set(u64::from(e));
        }
        self.touched = Some(t);
    }

    /// The checkpoint failed before [`ActivityLog::cut_over`]; the current log stays.
    pub fn abort_checkpoint(&mut self) {
        self.touched = None;
    }

    /// The checkpoint's metadata is durable. Returns the active set the replacement log
    /// must hold. The caller must hold the right to append (no append may run until the
    /// replacement is in place) and must write the replacement before releasing it.
    ///
    /// Why this is safe whichever log file survives a crash: the returned set holds only
    /// extents admitted since the snapshot or in flight at it, all of which were admitted
    /// against the current log, so the current file is a superset of the new one.
    pub fn cut_over(&mut self) -> Vec<u32> {
        let keep = self
            .touched
            .take()
            .unwrap_or_else(|| self.persisted.clone());
        let set: Vec<u32> = keep.iter_ones_from(0).map(|e| e as u32).collect();
        self.persisted = keep;
        set
    }
}

/// One frame of the log file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum LogEntry {
    /// First frame: which checkpoint this log belongs to and whether the image was closed
    /// cleanly at that checkpoint.
    Header { generation: u64, clean: bool },
    /// Extents added to the active set.
    Active { extents: Vec<u32> },
}

/// The decoded content of a log file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LogState {
    pub(crate) generation: u64,
    pub(crate) clean: bool,
    pub(crate) active: BTreeSet<u32>,
    /// A bad frame is followed by valid ones: not a torn tail, so not to be trusted.
    pub(crate) damaged: bool,
}

pub(crate) fn encode_frame(entry: &LogEntry) -> Vec<u8> {
    // Encoding a plain enum of integers cannot fail; an empty payload would be refused by
    // the parser, which only makes recovery more conservative.
    let payload = convoy_codec::encode(entry).unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + 12);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// A whole log file: header plus, if non-empty, one frame with `active`.
pub(crate) fn encode_log(generation: u64, clean: bool, active: &[u32]) -> Vec<u8> {
    let mut out = encode_frame(&LogEntry::Header { generation, clean });
    if !active.is_empty() {
        out.extend(encode_frame(&LogEntry::Active {
            extents: active.to_vec(),
        }));
    }
    out
}

/// Parses a log file. `None` when the header is missing or unreadable. A bad frame ends
/// the log; if a valid frame can be found anywhere after it, the log is `damaged`.
pub(crate) fn parse_log(bytes: &[u8]) -> Option<LogState> {
    let mut rest = bytes;
    let mut state: Option<LogState> = None;
    while let Some((entry, tail)) = next_frame(rest) {
        rest = tail;
        match (entry, &mut state) {
            (LogEntry::Header { generation, clean }, None) => {
                state = Some(LogState {
                    generation,
                    clean,
                    active: BTreeSet::new(),
                    damaged: false,
                });
            }
            (LogEntry::Active { extents }, Some(s)) => {
                s.active.extend(extents);
                // Anything appended means the image was open for writing.
                s.clean = false;
            }
            // A second header, or extents before any header: not a log we wrote.
            (_, Some(s)) => {
                s.damaged = true;
                return state;
            }
            (_, None) => return None,
        }
    }
    if let Some(s) = &mut state {
        // Only a torn tail may follow the last good frame: look for any valid frame in it.
        s.damaged = (1..rest.len()).any(|i| next_frame(&rest[i..]).is_some());
        if s.damaged {
            s.clean = false;
        }
    }
    state
}

fn next_frame(bytes: &[u8]) -> Option<(LogEntry, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(bytes.get(4..12)?.try_into().ok()?);
    let payload = bytes.get(12..12usize.checked_add(len)?)?;
    if xxhash_rust::xxh3::xxh3_64(payload) != sum {
        return None;
    }
    let entry = convoy_codec::decode(payload).ok()?;
    Some((entry, &bytes[12 + len..]))
}

/// Decides what an opened image may trust, from its metadata generation and its log.
///
/// The log is replaced after the metadata at every checkpoint, so a log one generation
/// behind is the previous checkpoint's log: a superset of what is needed, still usable.
pub(crate) fn decide_trust(meta_generation: u64, log: Option<&LogState>) -> Trust {
    match log {
        Some(l) if l.damaged => Trust::Nothing,
        Some(l) if l.generation == meta_generation && l.clean => Trust::Clean,
        // A clean log one generation behind cannot occur (opening replaces a clean log
        // before anything else happens), so it is not trusted either.
        Some(l)
            if l.generation == meta_generation
                || (l.generation + 1 == meta_generation && !l.clean) =>
        {
            Trust::Extents(l.active.iter().copied().collect())
        }
        _ => Trust::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn admit_waits_for_durable_extents() {
        let mut al = ActivityLog::new(8, [1]);
        assert!(al.admit(1..2));
        assert!(!al.admit(1..3));
        assert!(!al.admit(5..6));
        assert_eq!(al.take_batch(1..3), vec![2, 5]);
        // Another writer wanting 5 finds the batch already taken: nothing to append.
        al.batch_durable(&[2, 5]);
        assert!(al.take_batch(5..6).is_empty());
        assert!(al.admit(1..3));
        assert_eq!(al.inflight(), 3);
        al.finish(1..2);
        al.finish(1..3);
        assert_eq!(al.inflight(), 0);
    }

    #[test]
    fn checkpoint_keeps_extents_in_flight_or_admitted_since_snapshot() {
        let mut al = ActivityLog::new(8, [0, 1, 2, 3]);
        assert!(al.admit(0..1)); // in flight across the snapshot
        assert!(al.admit(1..2));
        al.finish(1..2); // finished before the snapshot: reflected in it
        al.begin_checkpoint();
        assert!(al.admit(2..3)); // admitted after the snapshot
        al.finish(2..3);
        al.finish(0..1);
        assert_eq!(al.cut_over(), vec![0, 2]);
        assert_eq!(al.active_count(), 2);
        assert!(!al.admit(3..4));
    }

    #[test]
    fn log_round_trip_and_torn_tail() {
        let mut bytes = encode_log(7, false, &[3]);
        bytes.extend(encode_frame(&LogEntry::Active {
            extents: vec![9, 4],
        }));
        let full = parse_log(&bytes).unwrap();
        assert_eq!(full.active, BTreeSet::from([3, 4, 9]));
        assert_eq!(full.generation, 7);
        let second = encode_frame(&LogEntry::Active { extents: vec![11] });
        for cut in 0..second.len() {
            let mut torn = bytes.clone();
            torn.extend_from_slice(&second[..cut]);
            let l = parse_log(&torn).unwrap();
            assert_eq!(l.active, full.active);
            assert!(!l.damaged, "a torn tail alone is not damage (cut {cut})");
        }
        assert!(parse_log(&[]).is_none());
        assert!(parse_log(&bytes[..5]).is_none());
        let clean = parse_log(&encode_log(2, true, &[])).unwrap();
        assert!(clean.clean);
    }

    #[test]
    fn trust_rules() {
        let log = |generation, clean| LogState {
            generation,
            clean,
            active: BTreeSet::from([4]),
            damaged: false,
        };
        assert_eq!(decide_trust(5, Some(&log(5, true))), Trust::Clean);
        assert_eq!(
            decide_trust(5, Some(&log(5, false))),
            Trust::Extents(vec![4])
        );
        assert_eq!(
            decide_trust(5, Some(&log(4, false))),
            Trust::Extents(vec![4])
        );
        assert_eq!(decide_trust(5, Some(&log(4, true))), Trust::Nothing);
        assert_eq!(decide_trust(5, Some(&log(3, false))), Trust::Nothing);
        assert_eq!(decide_trust(5, Some(&log(6, true))), Trust::Nothing);
        assert_eq!(decide_trust(5, None), Trust::Nothing);
        let mut damaged = log(5, false);
        damaged.damaged = true;
        assert_eq!(decide_trust(5, Some(&damaged)), Trust::Nothing);
    }

    #[test]
    fn regression_torn_append_followed_by_valid_frames_distrusts_everything() {
        // Today's failure: the append handle was kept after a partial append, so later
        // frames landed behind the torn one, and recovery stopped at the torn frame and
        // never saw the extents they named.
        let mut bytes = encode_log(3, false, &[1]);
        let torn = encode_frame(&LogEntry::Active { extents: vec![7] });
        for cut in 1..torn.len() {
            let mut b = bytes.clone();
            b.extend_from_slice(&torn[..cut]);
            b.extend(encode_frame(&LogEntry::Active { extents: vec![9] }));
            let l = parse_log(&b).unwrap();
            assert!(
                l.damaged,
                "cut {cut}: frames behind a torn one must be noticed"
            );
            assert!(!l.clean);
            assert_eq!(decide_trust(3, Some(&l)), Trust::Nothing);
        }
        // A damaged frame in the middle (bit rot) is noticed too.
        bytes.extend(encode_frame(&LogEntry::Active { extents: vec![8] }));
        let good_len = bytes.len();
        bytes.extend(encode_frame(&LogEntry::Active { extents: vec![5] }));
        bytes[good_len - 1] ^= 0xff;
        assert!(parse_log(&bytes).unwrap().damaged);
        // A second header is not ours either.
        let mut two = encode_log(3, false, &[1]);
        two.extend(encode_log(4, false, &[]));
        assert!(parse_log(&two).unwrap().damaged);
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_log(&data);
        }
    }
}
