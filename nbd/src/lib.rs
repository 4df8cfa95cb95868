//! An NBD (Network Block Device) server: how Convoy exposes a disk to a hypervisor
//! (`qemu -drive file=nbd:unix:/run/convoy/<disk>.sock`) and to tools such as `qemu-img`,
//! `nbdcopy` and fio.
//!
//! The rest of Convoy implements [`BlockDevice`] (the block store, the replication layer)
//! and registers devices in an [`ExportRegistry`]; a [`Server`] serves the registry on Unix
//! or TCP sockets. [`FileDevice`] is a plain file backend for tests and simple setups.
//!
//! Protocol coverage (see the NBD spec, `doc/proto.md` of the NetworkBlockDevice project):
//! - fixed-newstyle handshake only (no oldstyle), `NBD_FLAG_NO_ZEROES` honoured;
//! - options `EXPORT_NAME`, `INFO`, `GO` (info `EXPORT`, `NAME`, `DESCRIPTION`,
//!   `BLOCK_SIZE`: minimum from the device, preferred 4 KiB, maximum [`MAX_PAYLOAD`]),
//!   `LIST`, `ABORT` and, when the server is given a TLS configuration, `STARTTLS` in the
//!   spec's 'FORCEDTLS' mode (see [`ServerConfig::tls`]); every other option (structured
//!   replies, metadata contexts, extended headers, and `STARTTLS` without TLS) gets
//!   `NBD_REP_ERR_UNSUP` and negotiation continues;
//! - commands `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (flags `FUA`, `NO_HOLE`) and
//!   `DISC`, with simple replies; many requests in flight per connection, replies in
//!   completion order; transmission flags include `CAN_MULTI_CONN`.
//!
//! Bounds, in one place: per connection [`ServerConfig::max_in_flight`] requests and
//! [`ServerConfig::max_in_flight_bytes`]; per export, over all connections and listeners,
//! [`ExportLimits`] (connections, and payload bytes in memory). A request that does not fit
//! waits unread; a connection over the limit is refused during the handshake.
//!
//! Access, in one place: Unix sockets made with [`bind_unix`] carry the mode and group the
//! caller chose from their first instant; TCP clients get TLS with a client certificate
//! when the server has [`ServerConfig::tls`], and plaintext otherwise.
//!
//! Durability, in one place: a WRITE, TRIM or WRITE_ZEROES reply is sent only after the
//! device call returned `Ok`; a FLUSH reply only after [`BlockDevice::flush`] returned
//! `Ok`, and that flush must cover every earlier acknowledged write from any connection; a
//! FUA write is durable when its reply is sent. Requests the server refuses (bounds,
//! read-only, bad flags) never reach the device.
//!
//! The crate never panics on client input: a malformed message either gets an NBD error
//! reply or, when the stream cannot be resynchronised (bad magic, a WRITE over
//! [`MAX_PAYLOAD`]), closes that one connection.

#![warn(missing_docs, unreachable_pub)]

mod device;
mod error;
mod export;
mod file;
mod handshake;
mod proto;
mod server;
mod socket;
mod transmission;

pub use device::{BlockDevice, DeviceError, DeviceFuture, Errno};
pub use error::Error;
pub use export::{ExportLimits, ExportRegistry};
pub use file::FileDevice;
pub use proto::MAX_PAYLOAD;
pub use server::{Server, ServerConfig, serve_tcp, serve_unix};
pub use socket::{bind_unix, resolve_group};
