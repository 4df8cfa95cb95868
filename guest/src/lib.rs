//! Convoy's simulated guest and the checker that verifies copies of its disks.
//!
//! * [`Workload`]: the `iops=200,size=4k,pattern=random` spec.
//! * [`content`]: self-describing sectors, so any copy can be checked without the data.
//! * [`Guest`]: a tokio task writing through a [`GuestDisk`] (the agent's NBD write
//!   path) and logging every acknowledged write to a [`WriteLog`].
//! * [`check`]: pure verification of a copy against the logs, in
//!   [`VerifyMode::Latest`] (nothing acknowledged is lost) or [`VerifyMode::Prefix`]
//!   (the copy is a crash-consistent prefix of the group's write order).
//! * [`sim`]: in-memory disks with latency and failure injection, for tests.
//!
//! Layering: `workload`, `content`, `plan` and `check` are pure; `log` does file I/O;
//! `runner` is the async shell that wires them together.

#![warn(missing_docs, unreachable_pub)]

pub mod check;
pub mod content;
mod error;
pub mod log;
mod plan;
mod runner;
pub mod sim;
pub mod workload;

pub use check::{
    CopyReader, Found, VerifyMode, VerifyOptions, VerifyReport, VmCopy, WriteProblem, WrongSector,
    verify, verify_latest, verify_prefix,
};
pub use content::{BlockTag, SECTOR_SIZE, fill_block, read_tag};
pub use error::GuestError;
pub use log::{LogContents, LogRecord, WriteLog};
pub use runner::{Guest, GuestDisk, GuestHandle, GuestStats, LOG_SYNC_INTERVAL};
pub use workload::{Pattern, Workload};
