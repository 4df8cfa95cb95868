//! Errors of the server and of the export registry.

use std::io;

/// Why a connection ended abnormally or an export could not be registered.
///
/// Connection errors are per client: the server logs them and keeps serving others.
/// Backend failures are not here: they become NBD error replies (see
/// [`DeviceError`](crate::DeviceError)) and the connection stays open.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading from or writing to the client's socket failed (reset, broken pipe).
    #[error("NBD connection I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The client sent a magic number other than the protocol's at a message boundary; the
    /// stream cannot be resynchronised, so the connection was closed.
    #[error("NBD client sent bad {what} magic {got:#x}; closing the connection")]
    BadMagic {
        /// Which message was expected (`"option"` or `"request"`).
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// The client set handshake flags the server did not offer; the spec requires the
    /// server to drop such a connection.
    #[error("NBD client sent unknown handshake flags {0:#x}; closing the connection")]
    UnknownClientFlags(u32),
    /// The client announced a WRITE payload larger than the server accepts; the payload
    /// cannot be skipped safely, so the connection was closed.
    #[error("NBD client sent a {len}-byte write; the limit is {max} bytes; closing the connection")]
    PayloadTooLarge {
        /// The announced payload length.
        len: u32,
        /// The server's limit, [`MAX_PAYLOAD`](crate::MAX_PAYLOAD).
        max: u32,
    },
    /// The client chose, with `NBD_OPT_EXPORT_NAME`, an export that does not exist (or a
    /// name that is not UTF-8); that option has no error reply, so the connection was closed.
    #[error(
        "NBD client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME; closing the connection"
    )]
    UnknownExport(String),
    /// The client did not finish the handshake within
    /// [`ServerConfig::handshake_timeout`](crate::ServerConfig::handshake_timeout).
    #[error("NBD client did not finish the handshake in time; closing the connection")]
    HandshakeTimeout,
    /// [`ExportRegistry::add`](crate::ExportRegistry::add) was given a name that is
    /// already registered; remove the old export first.
    #[error("NBD export {0:?} already exists; remove it before adding it again")]
    ExportExists(String),
    /// [`ExportRegistry::add`](crate::ExportRegistry::add) was given an export that
    /// cannot be served (name too long or containing NUL, bad block size).
    #[error("NBD export {name:?} cannot be served: {reason}")]
    InvalidExport {
        /// The export name given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}
