//! The store's error type.

use std::io;

/// Errors from the block store. Every variant names the thing that failed and, where
/// there is one, the next step for the caller or operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O call on the image, its metadata or its activity log failed. The operation
    /// may have taken partial effect on the image data (as with any failed `pwrite`), but
    /// the chunk metadata never claims more than what is known: a failed write still marks
    /// its chunks dirty and their hashes unknown.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path or offset.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `create` found an image (or one of its files) already there.
    #[error("disk image {path} already exists; open it, or destroy it first")]
    AlreadyExists {
        /// The image path.
        path: String,
    },
    /// `open` found no image file.
    #[error("disk image {path} does not exist; create it first")]
    NotFound {
        /// The image path.
        path: String,
    },
    /// The metadata is missing, undecodable or does not match the image. The store refuses
    /// to guess: the image data may be fine, but nothing about its chunks can be trusted.
    #[error(
        "metadata of disk image {what} is unusable ({reason}); restore the disk from a replica or recreate it"
    )]
    Corrupt {
        /// The image (or metadata file) concerned.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A byte range or chunk index lies outside the disk.
    #[error("range {offset}+{len} is outside the disk ({size} bytes)")]
    OutOfRange {
        /// Start of the requested range (byte offset, or chunk index for chunk calls).
        offset: u64,
        /// Length of the requested range.
        len: u64,
        /// Size of the disk in the same unit.
        size: u64,
    },
    /// An argument is not acceptable (disk id, size, geometry, tree level, tracker name).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// No dirty tracker of that name exists on this image.
    #[error("no dirty tracker named {0:?} on this disk; start it with start_tracking")]
    UnknownTracker(String),
    /// A dirty tracker of that name already exists.
    #[error("a dirty tracker named {0:?} already exists; drop it first or reuse it")]
    TrackerExists(String),
    /// The image was closed with `close()`; open it again to use it.
    #[error("disk image is closed; open it again to use it")]
    Closed,
    /// Concurrent writes kept invalidating chunk hashes while a hash tree was being
    /// completed. Retry when the write load is lower (compare-delta runs on a quiet copy).
    #[error("chunk hashes kept changing under concurrent writes; retry when writes pause")]
    Busy,
    /// A blocking task run by an async wrapper panicked or was cancelled.
    #[error("blocking store task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// Whether the file system ran out of space: the guest gets `ENOSPC`, and writes
    /// work again once space is freed.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. }
            if source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(28))
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        StoreError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

/// Result alias for the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
