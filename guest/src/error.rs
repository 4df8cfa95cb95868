//! The crate's one error type.

use std::io;
use std::path::PathBuf;

use crate::content::{SECTOR_SIZE, SectorFault};

/// Everything that can go wrong in this crate.
///
/// Write failures of the guest's disks are not errors here: the guest counts them in
/// [`GuestStats`](crate::GuestStats) and keeps running.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A workload spec could not be parsed or is inconsistent. `key` names the offending
    /// key (or `spec` for a malformed item) and `reason` says what is allowed.
    #[error("workload key '{key}': {reason}")]
    Workload {
        /// The key (`iops`, `size`, ...) or `spec` when the item has no key.
        key: String,
        /// What is wrong and what is accepted instead.
        reason: String,
    },
    /// A buffer handed to the content functions is empty or not a whole number of sectors.
    #[error("buffer of {len} bytes is not a non-empty whole number of {SECTOR_SIZE}-byte sectors")]
    NotSectorAligned {
        /// Length of the buffer.
        len: usize,
    },
    /// A sector of a block is neither all zero nor a valid guest sector.
    #[error("sector {sector} of the block is corrupt ({fault})")]
    CorruptSector {
        /// Index of the sector within the buffer.
        sector: usize,
        /// What is wrong with it.
        fault: SectorFault,
    },
    /// The sectors of a block do not all come from the same write: a torn write, or the
    /// buffer does not start at a write's first sector.
    #[error("block is torn: sector {sector} does not belong to the same write as sector 0")]
    TornBlock {
        /// Index of the first sector that disagrees with sector 0.
        sector: usize,
    },
    /// The guest cannot run with the given disks and workload (no disks, a disk smaller
    /// than one write, ...).
    #[error("guest cannot start: {0}")]
    Config(String),
    /// The write log could not be read, written or synced.
    #[error("write log {path}: {source}")]
    LogIo {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The write log is not a guest write log, or it is damaged somewhere other than a
    /// torn last record (which is tolerated). The log cannot be trusted; keep it for
    /// inspection and start a new one only together with blank disks.
    #[error("write log {path} is corrupt at byte {offset}: {reason}")]
    LogCorrupt {
        /// The log file.
        path: PathBuf,
        /// Byte offset of the damaged header or record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The write log belongs to another VM.
    #[error("write log {path} belongs to VM {found}, not VM {expected}")]
    LogVmMismatch {
        /// The log file.
        path: PathBuf,
        /// VM id the caller asked for.
        expected: u64,
        /// VM id recorded in the log header.
        found: u64,
    },
    /// The checker could not read the copy under test.
    #[error("cannot read disk {disk_index} of the copy at offset {offset}: {source}")]
    CopyRead {
        /// Disk index within the VM.
        disk_index: u32,
        /// Byte offset of the failed read.
        offset: u64,
        /// The reader's error.
        source: io::Error,
    },
    /// The checker was called with inconsistent input (e.g. the same VM twice).
    #[error("invalid verification request: {0}")]
    InvalidCheck(String),
}
