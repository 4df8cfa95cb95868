//! Test support: a recording in-memory device, a raw protocol client, and a server on a
//! Unix socket in a temporary directory.
// Test support: a failed unwrap is a failed test.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use convoy_nbd::{BlockDevice, DeviceError, DeviceFuture, ExportRegistry, Server, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, oneshot};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// Runs a test body with a deadline, so a protocol hang fails the test instead of CI.
pub async fn bounded<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .expect("test exceeded its deadline")
}

/// One call the server made on a [`MemDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    },
}

impl Op {
    pub fn changes_data(&self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }
        )
    }
}

/// What the next calls of a [`MemDevice`] should do instead of succeeding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    NoSpace,
    Denied,
    Io,
    Panic,
    ShortRead,
}

/// An in-memory device that records every call and models durability: `durable` is
/// what would survive a crash (updated by flush and FUA).
pub struct MemDevice {
    pub data: Mutex<Vec<u8>>,
    pub durable: Mutex<Vec<u8>>,
    pub ops: Mutex<Vec<Op>>,
    pub read_only: bool,
    pub min_block: u32,
    pub fault: Mutex<Fault>,
    /// When set, writes wait on this gate; `entered` counts writes that are waiting.
    pub gate: Option<Arc<Gate>>,
}

/// Holds writes until released, counting how many are held at once.
#[derive(Default)]
pub struct Gate {
    pub waiting: Mutex<usize>,
    pub max_waiting: Mutex<usize>,
    pub open: Mutex<bool>,
    pub changed: Notify,
}

impl Gate {
    pub fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_waiters();
    }

    async fn pass(&self) {
        {
            let mut w = self.waiting.lock().unwrap();
            *w += 1;
            let mut m = self.max_waiting.lock().unwrap();
            *m = (*m).max(*w);
        }
        self.changed.notify_waiters();
        loop {
            let notified = self.changed.notified();
            if *self.open.lock().unwrap() {
                break;
            }
            notified.await;
        }
        *self.waiting.lock().unwrap() -= 1;
    }

    /// Waits until at least `n` writes are held at once.
    pub async fn wait_for_waiting(&self, n: usize) {
        loop {
            let notified = self.changed.notified();
            if *self.waiting.lock().unwrap() >= n {
                return;
            }
            notified.await;
        }
    }
}

impl MemDevice {
    pub fn new(size: usize) -> Arc<Self> {
        Arc::new(Self::build(size, false, None))
    }

    pub fn read_only(size: usize) -> Arc<Self> {
        Arc::new(Self::build(size, true, None))
    }

    pub fn gated(size: usize, gate: Arc<Gate>) -> Arc<Self> {
        Arc::new(Self::build(size, false, Some(gate)))
    }

    pub fn build(size: usize, read_only: bool, gate: Option<Arc<Gate>>) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            durable: Mutex::new(vec![0; size]),
            ops: Mutex::new(Vec::new()),
            read_only,
            min_block: 1,
            fault: Mutex::new(Fault::None),
            gate,
        }
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    fn record(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }

    fn fault(&self) -> Result<(), DeviceError> {
        // Copy first: panicking with the lock held would poison it.
        let fault = *self.fault.lock().unwrap();
        match fault {
            Fault::NoSpace => Err(DeviceError::NoSpace),
            Fault::Denied => Err(DeviceError::PermissionDenied("stale epoch".into())),
            Fault::Io => Err(DeviceError::Io(std::io::Error::other("disk on fire"))),
            Fault::Panic => panic!("device bug"),
            Fault::None | Fault::ShortRead => Ok(()),
        }
    }

    fn persist(&self, offset: u64, len: u32) {
        let data = self.data.lock().unwrap();
        let (a, b) = (offset as usize, offset as usize + len as usize);
        self.durable.lock().unwrap()[a..b].copy_from_slice(&data[a..b]);
    }

    fn check_range(&self, offset: u64, len: u32) {
        let size = self.data.lock().unwrap().len() as u64;
        assert!(len > 0, "server passed an empty range");
        assert!(
            offset + u64::from(len) <= size,
            "server passed an out-of-range request"
        );
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn min_block_size(&self) -> u32 {
        self.min_block
    }

    fn read(&self, offset: u64, len: u32) -> DeviceFuture<'_, Bytes> {
        Box::pin(async move {
            self.record(Op::Read { offset, len });
            self.check_range(offset, len);
            self.fault()?;
            let mut out =
                self.data.lock().unwrap()[offset as usize..offset as usize + len as usize].to_vec();
            if *self.fault.lock().unwrap() == Fault::ShortRead {
                out.pop();
            }
            Ok(Bytes::from(out))
        })
    }

    fn write(&self, offset: u64, buf: Bytes, fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            let len = buf.len() as u32;
            assert!(!self.read_only, "write reached a read-only device");
            self.record(Op::Write { offset, len, fua });
            self.check_range(offset, len);
            if let Some(gate) = &self.gate {
                gate.pass().await;
            }
            self.fault()?;
            self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()]
                .copy_from_slice(&buf);
            if fua {
                self.persist(offset, len);
            }
            Ok(())
        })
    }

    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            self.record(Op::Flush);
            self.fault()?;
            let data = self.data.lock().unwrap().clone();
            *self.durable.lock().unwrap() = data;
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u32) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            assert!(!self.read_only, "trim reached a read-only device");
            self.record(Op::Trim { offset, len });
            self.check_range(offset, len);
            self.fault()
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            assert!(!self.read_only, "write_zeroes reached a read-only device");
            self.record(Op::WriteZeroes {
                offset,
                len,
                fua,
                may_trim,
            });
            self.check_range(offset, len);
            self.fault()?;
            self.data.lock().unwrap()[offset as usize..offset as usize + len as usize].fill(0);
            if fua {
                self.persist(offset, len);
            }
            Ok(())
        })
    }
}

/// A server on a Unix socket in a temporary directory.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub exports: ExportRegistry,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(exports: ExportRegistry) -> Self {
        Self::start_with(exports, ServerConfig::default())
    }

    pub fn start_with(exports: ExportRegistry, config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = Server::with_config(exports.clone(), config);
        let task = tokio::spawn(async move {
            server
                .serve_unix(listener, async {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            dir,
            socket,
            exports,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `nbd+unix` URI of an export, as libnbd and QEMU take it.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub async fn connect(&self) -> RawClient<UnixStream> {
        RawClient::handshake(UnixStream::connect(&self.socket).await.unwrap(), true).await
    }

    /// Stops the server and waits until every connection has closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// An option reply: (option, type, data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A minimal NBD client that speaks the wire format directly.
pub struct RawClient<S> {
    pub stream: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// Reads the greeting and sends client flags (fixed newstyle, optionally no-zeroes).
    pub async fn handshake(stream: S, no_zeroes: bool) -> Self {
        Self::handshake_with_flags(stream, if no_zeroes { 0b11 } else { 0b01 }).await
    }

    /// Reads the greeting and sends exactly `client_flags`.
    pub async fn handshake_with_flags(mut stream: S, client_flags: u32) -> Self {
        assert_eq!(stream.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(stream.read_u64().await.unwrap(), IHAVEOPT);
        let flags = stream.read_u16().await.unwrap();
        assert_eq!(
            flags, 0b11,
            "server must offer FIXED_NEWSTYLE and NO_ZEROES"
        );
        stream.write_u32(client_flags).await.unwrap();
        Self { stream }
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut msg = Vec::new();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.stream.write_all(&msg).await.unwrap();
    }

    pub async fn read_opt_reply(&mut self) -> OptReply {
        assert_eq!(self.stream.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        let option = self.stream.read_u32().await.unwrap();
        let kind = self.stream.read_u32().await.unwrap();
        let len = self.stream.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        OptReply { option, kind, data }
    }

    /// Sends an option and collects replies up to the final one (ACK or an error).
    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data).await;
        let mut replies = Vec::new();
        loop {
            let r = self.read_opt_reply().await;
            assert_eq!(r.option, option, "reply names the option it answers");
            let last = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// `NBD_OPT_GO`; returns (size, transmission flags) from `NBD_INFO_EXPORT`.
    pub async fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self
            .option(OPT_GO, &Self::info_data(name, &[INFO_BLOCK_SIZE]))
            .await;
        assert_eq!(
            replies.last().unwrap().kind,
            REP_ACK,
            "GO failed: {replies:?}"
        );
        export_info(&replies).expect("GO without NBD_INFO_EXPORT")
    }

    pub async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut msg = Vec::with_capacity(28 + payload.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg).await.unwrap();
    }

    /// Reads a simple reply header: (error, cookie).
    pub async fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.stream.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        let error = self.stream.read_u32().await.unwrap();
        let cookie = self.stream.read_u64().await.unwrap();
        (error, cookie)
    }

    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.stream.read_exact(&mut b).await.unwrap();
        b
    }

    /// Sends one request and returns the error of its reply (reads are not for this).
    pub async fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> u32 {
        self.request(kind, flags, 99, offset, len, payload).await;
        let (error, cookie) = self.reply().await;
        assert_eq!(cookie, 99);
        error
    }

    /// READ; returns the data, or the error.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, 7, offset, len, &[]).await;
        let (error, cookie) = self.reply().await;
        assert_eq!(cookie, 7);
        if error != 0 {
            return Err(error);
        }
        Ok(self.read_bytes(len as usize).await)
    }

    /// True once the server has closed the connection (reads hit EOF or a reset).
    pub async fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b).await, Ok(0) | Err(_))
    }
}

/// (size, flags) from the `NBD_INFO_EXPORT` reply among `replies`.
pub fn export_info(replies: &[OptReply]) -> Option<(u64, u16)> {
    replies.iter().find_map(|r| {
        (r.kind == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes()).then(|| {
            assert_eq!(r.data.len(), 12);
            (
                u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
                u16::from_be_bytes(r.data[10..12].try_into().unwrap()),
            )
        })
    })
}

/// Registry with one export of `device` under `name`.
pub fn registry(name: &str, device: Arc<dyn BlockDevice>) -> ExportRegistry {
    let exports = ExportRegistry::new();
    exports
        .add(name, device, format!("test disk {name}"))
        .unwrap();
    exports
}
