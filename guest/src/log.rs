//! The guest's append-only log of acknowledged writes.
//!
//! # Contract
//!
//! * **Every write record in the log is an acknowledged write.** A record is appended only
//!   after [`GuestDisk::write`](crate::GuestDisk::write) resolved `Ok(cg_seq)` for it.
//!   Failed writes are never logged.
//! * **Every acknowledged write is in the log, except in one window:** the agent process
//!   died (SIGKILL, abort) after the write's future resolved `Ok` and before the single
//!   `write(2)` of its record returned. The guest appends a record as soon as it observes
//!   the acknowledgement, so at most `depth` writes (those in flight) can be in that
//!   window at once. Records that reached `write(2)` survive a process death (page
//!   cache); after a *host* crash or power loss, records appended since the last sync
//!   (the guest syncs every second and on stop) may also be lost, and a torn last record
//!   is dropped by [`WriteLog::read_all`].
//! * The guest never has two overlapping writes in flight, so for every sector the writes
//!   covering it were issued, acknowledged and sequenced in `write_id` order. A write
//!   missing from the log (in the window above, or failed with an unknown outcome) that
//!   shows on a copy therefore has a `write_id` greater than every logged write it
//!   followed on that sector and smaller than every one that followed it. The checker
//!   relies on exactly this.
//! * Write ids are unique per log across guest restarts: ids are handed out from blocks
//!   reserved by a durably synced reservation record, and a reopened log continues after
//!   the last reservation, so ids of writes that were issued but never logged are not
//!   reused.
//!
//! # Format
//!
//! A 32-byte header (`CVYGLOG1`, version, VM id, xxh3 checksum) followed by fixed 48-byte
//! records (`write_id`, `cg_seq`, `offset`, `len`, `disk_index`, kind, xxh3 checksum of
//! the first 40 bytes). A bad record followed only by bad records is a torn tail and is
//! ignored (and truncated when the log is reopened for writing); a bad record followed by
//! a good one is corruption.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::GuestError;

const MAGIC: [u8; 8] = *b"CVYGLOG1";
const VERSION: u32 = 1;
/// Bytes of the file header.
pub const HEADER_LEN: usize = 32;
/// Bytes of one record.
pub const RECORD_LEN: usize = 48;
/// Write ids reserved by one reservation record.
pub const RESERVE_BLOCK: u64 = 1 << 16;

const KIND_ACK: u32 = 1;
const KIND_RESERVE: u32 = 2;

/// One acknowledged guest write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LogRecord {
    /// The guest's id for the write (also in every sector's tag).
    pub write_id: u64,
    /// Consistency-group sequence number the write got from the agent.
    pub cg_seq: u64,
    /// Disk position within the VM.
    pub disk_index: u32,
    /// Byte offset of the write.
    pub offset: u64,
    /// Length of the write in bytes.
    pub len: u32,
}

impl LogRecord {
    /// Byte offset just past the write (saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// Everything [`WriteLog::read_all`] found in a log file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogContents {
    /// VM the log belongs to; `None` if the file is shorter than its header (the guest
    /// died while creating it, before any write was issued).
    pub vm_id: Option<u64>,
    /// Acknowledged writes in the order they were appended (acknowledgement order).
    pub records: Vec<LogRecord>,
    /// Every write id the guest may have used is below this.
    pub reserved_upto: u64,
    /// Bytes of torn or zeroed tail that were ignored.
    pub torn_tail_bytes: u64,
}

struct Parsed {
    contents: LogContents,
    valid_len: u64,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn encode_header(vm_id: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&vm_id.to_le_bytes());
    let sum = xxh3_64(&h[..24]);
    h[24..32].copy_from_slice(&sum.to_le_bytes());
    h
}

fn encode_record(kind: u32, rec: &LogRecord) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..8].copy_from_slice(&rec.write_id.to_le_bytes());
    r[8..16].copy_from_slice(&rec.cg_seq.to_le_bytes());
    r[16..24].copy_from_slice(&rec.offset.to_le_bytes());
    r[24..28].copy_from_slice(&rec.len.to_le_bytes());
    r[28..32].copy_from_slice(&rec.disk_index.to_le_bytes());
    r[32..36].copy_from_slice(&kind.to_le_bytes());
    let sum = xxh3_64(&r[..40]);
    r[40..48].copy_from_slice(&sum.to_le_bytes());
    r
}

/// Decodes a record slot: `None` if its checksum fails.
fn decode_record(r: &[u8]) -> Option<(u32, LogRecord)> {
    if xxh3_64(&r[..40]) != le_u64(r, 40) {
        return None;
    }
    Some((
        le_u32(r, 32),
        LogRecord {
            write_id: le_u64(r, 0),
            cg_seq: le_u64(r, 8),
            offset: le_u64(r, 16),
            len: le_u32(r, 24),
            disk_index: le_u32(r, 28),
        },
    ))
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> GuestError {
    GuestError::LogCorrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Pure parser of a whole log file.
fn parse(bytes: &[u8], path: &Path) -> Result<Parsed, GuestError> {
    let mut contents = LogContents {
        vm_id: None,
        records: Vec::new(),
        reserved_upto: 1,
        torn_tail_bytes: 0,
    };
    if bytes.len() < HEADER_LEN {
        contents.torn_tail_bytes = bytes.len() as u64;
        return Ok(Parsed {
            contents,
            valid_len: 0,
        });
    }
    let h = &bytes[..HEADER_LEN];
    if h[0..8] != MAGIC {
        return Err(corrupt(path, 0, "not a guest write log (bad magic)"));
    }
    if xxh3_64(&h[..24]) != le_u64(h, 24) {
        return Err(corrupt(path, 0, "header checksum mismatch"));
    }
    let version = le_u32(h, 8);
    if version != VERSION {
        return Err(corrupt(
            path,
            0,
            format!("format version {version}; this build reads {VERSION}"),
        ));
    }
    contents.vm_id = Some(le_u64(h, 16));
    let body = &bytes[HEADER_LEN..];
    let mut slots = body.chunks_exact(RECORD_LEN);
    let mut valid = 0usize;
    let mut max_ack = 0u64;
    while let Some(slot) = slots.next() {
        let at = (HEADER_LEN + valid * RECORD_LEN) as u64;
        let Some((kind, rec)) = decode_record(slot) else {
            // A bad slot is a torn tail only if nothing valid follows it.
            if slots.any(|s| decode_record(s).is_some()) {
                return Err(corrupt(
                    path,
                    at,
                    "record checksum mismatch followed by valid records",
                ));
            }
            break;
        };
        match kind {
            KIND_ACK => {
                max_ack = max_ack.max(rec.write_id);
                contents.records.push(rec);
            }
            KIND_RESERVE => contents.reserved_upto = contents.reserved_upto.max(rec.write_id),
            other => {
                return Err(corrupt(
                    path,
                    at,
                    format!("unknown record kind {other} (written by a newer Convoy?)"),
                ));
            }
        }
        valid += 1;
    }
    // A log written by this build never logs an id it did not reserve; be safe anyway.
    contents.reserved_upto = contents.reserved_upto.max(max_ack.saturating_add(1));
    let valid_len = (HEADER_LEN + valid * RECORD_LEN) as u64;
    contents.torn_tail_bytes = bytes.len() as u64 - valid_len;
    Ok(Parsed {
        contents,
        valid_len,
    })
}

/// The writer side of a guest's write log. See the [module docs](self) for the contract.
#[derive(Debug)]
pub struct WriteLog {
    path: PathBuf,
    file: Arc<File>,
    vm_id: u64,
    next_write_id: u64,
    reserved_upto: u64,
    /// Created by this open: no write was ever issued through it.
    fresh: bool,
}

impl WriteLog {
    /// Opens the log at `path` for appending, creating it (header durably synced, with
    /// its directory) if it does not exist or holds less than a header.
    ///
    /// An existing log must belong to `vm_id`; a torn tail is truncated so new records
    /// follow the last good one. Write ids continue after everything the previous guest
    /// may have used.
    pub fn open(path: impl AsRef<Path>, vm_id: u64) -> Result<WriteLog, GuestError> {
        Self::open_from(path, vm_id, 0)
    }

    /// [`WriteLog::open`], with write ids starting at `first_id` at the least. A VM that
    /// moved keeps one log per stay on each host; each stay's ids start above every id of
    /// the stays before it, so the segments read together are one log in write-id order.
    pub fn open_from(
        path: impl AsRef<Path>,
        vm_id: u64,
        first_id: u64,
    ) -> Result<WriteLog, GuestError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source: io::Error| GuestError::LogIo {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err)?;
        let parsed = parse(&bytes, &path)?;
        let log = WriteLog {
            path: path.clone(),
            file: Arc::new(file),
            vm_id,
            next_write_id: parsed.contents.reserved_upto.max(first_id),
            reserved_upto: parsed.contents.reserved_upto.max(first_id),
            fresh: parsed.contents.vm_id.is_none(),
        };
        match parsed.contents.vm_id {
            None => {
                // New (or torn while being created): nothing was ever issued.
                log.file.set_len(0).map_err(io_err)?;
                (&*log.file)
                    .write_all(&encode_header(vm_id))
                    .map_err(io_err)?;
                log.file.sync_all().map_err(io_err)?;
                sync_parent(&path).map_err(io_err)?;
            }
            Some(found) if found != vm_id => {
                return Err(GuestError::LogVmMismatch {
                    path,
                    expected: vm_id,
                    found,
                });
            }
            Some(_) => {
                if parsed.valid_len < bytes.len() as u64 {
                    log.file.set_len(parsed.valid_len).map_err(io_err)?;
                    log.file.sync_all().map_err(io_err)?;
                }
            }
        }
        Ok(log)
    }

    /// Reads every record of the log at `path`, tolerating a torn tail.
    pub fn read_all(path: impl AsRef<Path>) -> Result<LogContents, GuestError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| GuestError::LogIo {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(parse(&bytes, path)?.contents)
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VM the log belongs to.
    pub fn vm_id(&self) -> u64 {
        self.vm_id
    }

    /// Whether this open created the log: no guest ever wrote through it.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Hands out the next write id. Ids increase by one and are never handed out twice
    /// for this log file, even across reopenings; when a reserved block is used up, a
    /// new reservation is appended and synced first (once per [`RESERVE_BLOCK`] ids).
    pub fn allocate_write_id(&mut self) -> Result<u64, GuestError> {
        if self.next_write_id >= self.reserved_upto {
            let upto = self.next_write_id.saturating_add(RESERVE_BLOCK);
            let marker = LogRecord {
                write_id: upto,
                cg_seq: 0,
                disk_index: 0,
                offset: 0,
                len: 0,
            };
            self.write_record(KIND_RESERVE, &marker)?;
            self.sync()?;
            self.reserved_upto = upto;
        }
        let id = self.next_write_id;
        self.next_write_id += 1;
        Ok(id)
    }

    /// Appends a record with one `write(2)`.
    ///
    /// The caller must call this only for a write that was acknowledged (see the
    /// [module docs](self)); once it returns `Ok`, the record survives a process death.
    /// Durability across a host crash needs [`WriteLog::sync`].
    pub fn append(&mut self, rec: &LogRecord) -> Result<(), GuestError> {
        self.write_record(KIND_ACK, rec)
    }

    fn write_record(&mut self, kind: u32, rec: &LogRecord) -> Result<(), GuestError> {
        (&*self.file)
            .write_all(&encode_record(kind, rec))
            .map_err(|source| GuestError::LogIo {
                path: self.path.clone(),
                source,
            })
    }

    /// Makes every appended record durable (fdatasync).
    pub fn sync(&self) -> Result<(), GuestError> {
        self.file.sync_data().map_err(|source| GuestError::LogIo {
            path: self.path.clone(),
            source,
        })
    }

    /// A handle for syncing from a blocking thread while the owner keeps appending.
    pub(crate) fn sync_handle(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(write_id: u64) -> LogRecord {
        LogRecord {
            write_id,
            cg_seq: write_id * 10,
            disk_index: 1,
            offset: write_id * 4096,
            len: 4096,
        }
    }

    fn write_some(path: &Path, n: u64) -> Vec<LogRecord> {
        let mut log = WriteLog::open(path, 3).unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let id = log.allocate_write_id().unwrap();
            let r = rec(id);
            log.append(&r).unwrap();
            out.push(r);
        }
        log.sync().unwrap();
        out
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        let written = write_some(&path, 5);
        let got = WriteLog::read_all(&path).unwrap();
        assert_eq!(got.vm_id, Some(3));
        assert_eq!(got.records, written);
        assert_eq!(got.torn_tail_bytes, 0);
        assert_eq!(written[0].write_id, 1);
    }

    #[test]
    fn a_later_stays_log_starts_above_the_first_id_and_keeps_going_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.1.log");
        let base = 1u64 << 40;
        let mut log = WriteLog::open_from(&path, 3, base).unwrap();
        let a = log.allocate_write_id().unwrap();
        assert_eq!(a, base);
        drop(log);
        // Reopened (agent restart): ids continue past the reservation, never below it.
        let mut log = WriteLog::open_from(&path, 3, base).unwrap();
        let b = log.allocate_write_id().unwrap();
        assert!(b > a);
    }

    #[test]
    fn torn_tail_is_ignored_and_truncated_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        let written = write_some(&path, 3);
        let mut bytes = std::fs::read(&path).unwrap();
        // Half a record, as if the host died in the middle of an append.
        bytes.extend_from_slice(&encode_record(KIND_ACK, &rec(99))[..20]);
        // And a zero-filled block, as a filesystem may leave after power loss.
        bytes.extend_from_slice(&[0u8; 4 * RECORD_LEN]);
        std::fs::write(&path, &bytes).unwrap();
        let got = WriteLog::read_all(&path).unwrap();
        assert_eq!(got.records, written);
        assert_eq!(got.torn_tail_bytes, 20 + 4 * RECORD_LEN as u64);

        let more = write_some(&path, 2);
        let got = WriteLog::read_all(&path).unwrap();
        assert_eq!(got.torn_tail_bytes, 0);
        assert_eq!(got.records.len(), 5);
        assert_eq!(&got.records[3..], &more[..]);
    }

    #[test]
    fn damage_before_the_tail_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        write_some(&path, 4);
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip a byte in the second record slot (after the reservation record).
        bytes[HEADER_LEN + 2 * RECORD_LEN + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            WriteLog::read_all(&path),
            Err(GuestError::LogCorrupt { offset, .. }) if offset == (HEADER_LEN + 2 * RECORD_LEN) as u64
        ));
        assert!(matches!(
            WriteLog::open(&path, 3),
            Err(GuestError::LogCorrupt { .. })
        ));
    }

    #[test]
    fn write_ids_are_not_reused_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        let mut log = WriteLog::open(&path, 3).unwrap();
        // Ids handed out but never logged (failed writes, or the crash window).
        let a = log.allocate_write_id().unwrap();
        let b = log.allocate_write_id().unwrap();
        assert_eq!((a, b), (1, 2));
        drop(log);
        let mut log = WriteLog::open(&path, 3).unwrap();
        let c = log.allocate_write_id().unwrap();
        assert!(c > b, "reused id {c}");
        let got = WriteLog::read_all(&path).unwrap();
        assert!(got.records.is_empty());
        assert!(got.reserved_upto > c);
    }

    #[test]
    fn another_vms_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        write_some(&path, 1);
        assert!(matches!(
            WriteLog::open(&path, 4),
            Err(GuestError::LogVmMismatch {
                expected: 4,
                found: 3,
                ..
            })
        ));
    }

    #[test]
    fn short_file_is_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        std::fs::write(&path, b"CVYG").unwrap();
        let got = WriteLog::read_all(&path).unwrap();
        assert_eq!(got.vm_id, None);
        assert!(got.records.is_empty());
        let written = write_some(&path, 2);
        assert_eq!(WriteLog::read_all(&path).unwrap().records, written);
    }

    #[test]
    fn foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.log");
        std::fs::write(&path, [7u8; 100]).unwrap();
        assert!(matches!(
            WriteLog::read_all(&path),
            Err(GuestError::LogCorrupt { offset: 0, .. })
        ));
    }
}
