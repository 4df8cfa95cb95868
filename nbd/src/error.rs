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
    /// The client chose, with `NBD_OPT_EXPORT_NAME`, an export that already has
    /// [`ExportLimits::max_connections`](crate::ExportLimits::max_connections) connections;
    /// that option has no error reply, so the connection was closed.
    #[error(
        "NBD export {name:?} already has {max} connections, its limit; closing the new one (close another client or raise the limit)"
    )]
    ExportBusy {
        /// The export asked for.
        name: String,
        /// Its connection limit.
        max: usize,
    },
    /// The server requires TLS and the client tried to go without it (`NBD_OPT_EXPORT_NAME`
    /// before `NBD_OPT_STARTTLS`, or no fixed-newstyle negotiation), so the connection
    /// was closed. Options it sent before that were refused with `NBD_REP_ERR_TLS_REQD`.
    #[error(
        "NBD client tried to proceed without TLS, which this server requires; closing the connection (use nbds:// or QEMU's tls-creds-x509 with a client certificate from the cluster CA)"
    )]
    TlsRequired,
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed: the client presented no
    /// certificate, one the server's configuration does not accept (another CA, the wrong
    /// kind of identity, expired), or broke TLS. The connection was closed.
    #[error(
        "TLS handshake with the NBD client failed: {0}; the client needs a client certificate issued by the cluster CA (`convoy cert issue-nbd-client`)"
    )]
    TlsHandshake(String),
    /// [`bind_unix`](crate::bind_unix) could not create, restrict or publish the socket.
    #[error("cannot create NBD socket {path}: {step}: {source}")]
    Socket {
        /// The socket path asked for.
        path: std::path::PathBuf,
        /// Which step failed (bind, chmod, chown to a group, rename into place).
        step: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// [`resolve_group`](crate::resolve_group) found no group of that name or number.
    #[error("unknown group {0:?}: give an existing group name (e.g. \"kvm\") or a numeric gid")]
    UnknownGroup(String),
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
