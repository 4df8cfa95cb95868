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
//!   `LIST` and `ABORT`; every other option (TLS, structured replies, metadata contexts,
//!   extended headers) gets `NBD_REP_ERR_UNSUP` and negotiation continues;
//! - commands `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (flags `FUA`, `NO_HOLE`) and
//!   `DISC`, with simple replies; many requests in flight per connection, replies in
//!   completion order; transmission flags include `CAN_MULTI_CONN`.
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
mod transmission;

pub use device::{BlockDevice, DeviceError, DeviceFuture, Errno};
pub use error::Error;
pub use export::ExportRegistry;
pub use file::FileDevice;
pub use proto::MAX_PAYLOAD;
pub use server::{Server, ServerConfig, serve_tcp, serve_unix};
