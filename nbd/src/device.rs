//! The backend interface: what an exported disk must provide.

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;

/// The future returned by every [`BlockDevice`] operation.
///
/// Implementers usually write `Box::pin(async move { ... })`.
pub type DeviceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DeviceError>> + Send + 'a>>;

/// A disk that the NBD server exports.
///
/// The server calls these methods concurrently, from many tasks and many client
/// connections at once, and never orders overlapping requests: NBD leaves the outcome of
/// concurrent overlapping writes (or a read racing a write) undefined, and so may the
/// implementation.
///
/// What the server guarantees to the implementer:
/// - every range it passes is inside `0..size()` (checked with overflow-safe arithmetic),
///   is aligned to [`min_block_size`](Self::min_block_size), and is never empty;
/// - `read` and `write` lengths are at most [`MAX_PAYLOAD`](crate::MAX_PAYLOAD);
///   `trim` and `write_zeroes` lengths may be up to `u32::MAX`;
/// - when [`read_only`](Self::read_only) is true, `write`, `trim` and `write_zeroes` are
///   never called (the client gets `EPERM` instead).
///
/// What the implementer must guarantee, because the server relies on it for the
/// client's durability promises:
/// - the server sends a WRITE, TRIM or WRITE_ZEROES reply only after the method returned
///   `Ok`, so a client treats the data as written from that moment on;
/// - `flush` must make durable every write, trim and write-zeroes that returned `Ok`
///   before `flush` was called, **whichever connection it came from** (the server
///   advertises `NBD_FLAG_CAN_MULTI_CONN`, which promises clients that a flush on one
///   connection covers writes acknowledged on any other connection to the same export);
///   the FLUSH reply is sent only after `flush` returns `Ok`;
/// - `write` and `write_zeroes` called with `fua == true` must have made their data
///   durable by the time they return `Ok`.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes. Read once when a client opens the export; it must not shrink while
    /// the device is exported (remove the export first).
    fn size(&self) -> u64;

    /// Whether clients may only read. Read once when a client opens the export.
    fn read_only(&self) -> bool {
        false
    }

    /// Smallest addressable unit in bytes: a power of two, at most 65,536. Requests not
    /// aligned to it are refused with `EINVAL` before reaching the device. The default, 1,
    /// means any byte range is accepted.
    fn min_block_size(&self) -> u32 {
        1
    }

    /// Reads `len` bytes at `offset`. Must return exactly `len` bytes; a shorter or longer
    /// buffer is reported to the client as `EIO`.
    fn read(&self, offset: u64, len: u32) -> DeviceFuture<'_, Bytes>;

    /// Writes `data` at `offset`. With `fua`, the data must be durable when this returns.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceFuture<'_, ()>;

    /// Makes every write that has returned `Ok` so far durable (see the trait docs).
    fn flush(&self) -> DeviceFuture<'_, ()>;

    /// Hints that `len` bytes at `offset` are no longer needed. The contents of the range
    /// are unspecified afterwards until rewritten. The default does nothing, which the
    /// protocol allows. When the client asked for FUA, the server calls
    /// [`flush`](Self::flush) after a successful trim.
    fn trim(&self, offset: u64, len: u32) -> DeviceFuture<'_, ()> {
        let _ = (offset, len);
        Box::pin(async { Ok(()) })
    }

    /// Makes `len` bytes at `offset` read back as zeroes. `may_trim` is false when the
    /// client asked that the range stay allocated (`NBD_CMD_FLAG_NO_HOLE`). With `fua`,
    /// the zeroes must be durable when this returns.
    ///
    /// The default writes zero-filled buffers of at most 1 MiB through
    /// [`write`](Self::write), then calls [`flush`](Self::flush) when `fua` is set.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> DeviceFuture<'_, ()> {
        let _ = may_trim;
        Box::pin(async move {
            const CHUNK: u32 = 1 << 20;
            let zeroes = Bytes::from(vec![0u8; CHUNK.min(len) as usize]);
            let mut done = 0u32;
            while done < len {
                let n = CHUNK.min(len - done);
                self.write(offset + u64::from(done), zeroes.slice(..n as usize), false)
                    .await?;
                done += n;
            }
            // One flush instead of FUA on every chunk: it covers all of them.
            if fua {
                self.flush().await?;
            }
            Ok(())
        })
    }
}

/// Why a [`BlockDevice`] operation failed. The server turns it into the NBD error value
/// given by [`DeviceError::errno`] and keeps the connection open.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An operating-system I/O error; its kind picks the NBD error (see
    /// [`DeviceError::errno`]), `EIO` by default.
    #[error("device I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The device refuses to change (read-only, or this host lost the right to write,
    /// e.g. a stale epoch). Sent as `EPERM`.
    #[error("write refused: {0}")]
    PermissionDenied(String),
    /// The device has no room left for the data. Sent as `ENOSPC`.
    #[error("no space left on the device")]
    NoSpace,
    /// The request is valid NBD but this device cannot serve it as asked (e.g. an
    /// alignment the backend cannot handle). Sent as `EINVAL`.
    #[error("invalid request for this device: {0}")]
    InvalidArgument(String),
    /// The request is too large for this device to handle at once. Sent as `EOVERFLOW`.
    #[error("request too large for this device")]
    TooLarge,
    /// The device is going away (being removed, migrated, or the agent is stopping). Sent as
    /// `ESHUTDOWN`, which tells the client to disconnect.
    #[error("device is shutting down")]
    ShuttingDown,
}

impl DeviceError {
    /// The NBD error value the client receives for this error.
    pub fn errno(&self) -> Errno {
        match self {
            DeviceError::Io(e) => errno_of_io(e),
            DeviceError::PermissionDenied(_) => Errno::Perm,
            DeviceError::NoSpace => Errno::NoSpace,
            DeviceError::InvalidArgument(_) => Errno::Invalid,
            DeviceError::TooLarge => Errno::Overflow,
            DeviceError::ShuttingDown => Errno::Shutdown,
        }
    }
}

/// Maps an OS error to NBD's short list: the spec asks for `EDQUOT` and `EFBIG` to be
/// reported as `ENOSPC`, and a read-only file system as `EPERM`.
fn errno_of_io(e: &io::Error) -> Errno {
    use io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => Errno::Perm,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => Errno::NoSpace,
        K::InvalidInput => Errno::Invalid,
        K::OutOfMemory => Errno::NoMemory,
        K::Unsupported => Errno::NotSupported,
        _ => Errno::Io,
    }
}

/// The error values NBD allows in a reply (they match Linux `errno` numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    /// `EPERM` (1): operation not permitted, e.g. a write to a read-only export.
    Perm = 1,
    /// `EIO` (5): input/output error.
    Io = 5,
    /// `ENOMEM` (12): out of memory.
    NoMemory = 12,
    /// `EINVAL` (22): invalid request (bad flags, unknown command, out-of-range read).
    Invalid = 22,
    /// `ENOSPC` (28): no space, or a write beyond the end of the export.
    NoSpace = 28,
    /// `EOVERFLOW` (75): value too large.
    Overflow = 75,
    /// `ENOTSUP` (95): operation not supported.
    NotSupported = 95,
    /// `ESHUTDOWN` (108): the server is shutting down; the client should disconnect.
    Shutdown = 108,
}

impl Errno {
    /// The value carried in the reply's error field.
    pub fn code(self) -> u32 {
        self as u32
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMemory => "ENOMEM",
            Errno::Invalid => "EINVAL",
            Errno::NoSpace => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSupported => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_nbd_errno() {
        let of = |k: io::ErrorKind| DeviceError::from(io::Error::from(k)).errno();
        assert_eq!(of(io::ErrorKind::PermissionDenied), Errno::Perm);
        assert_eq!(of(io::ErrorKind::ReadOnlyFilesystem), Errno::Perm);
        assert_eq!(of(io::ErrorKind::StorageFull), Errno::NoSpace);
        assert_eq!(of(io::ErrorKind::QuotaExceeded), Errno::NoSpace);
        assert_eq!(of(io::ErrorKind::FileTooLarge), Errno::NoSpace);
        assert_eq!(of(io::ErrorKind::InvalidInput), Errno::Invalid);
        assert_eq!(of(io::ErrorKind::UnexpectedEof), Errno::Io);
        assert_eq!(
            DeviceError::from(io::Error::from_raw_os_error(28)).errno(),
            Errno::NoSpace,
            "raw ENOSPC from the OS"
        );
        assert_eq!(DeviceError::ShuttingDown.errno().code(), 108);
        assert_eq!(DeviceError::TooLarge.errno().code(), 75);
    }
}
