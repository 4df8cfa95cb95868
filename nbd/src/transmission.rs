//! The transmission phase: one reader task that parses requests, and one executor task
//! that runs them against the device concurrently and serialises the replies.
//!
//! Two tasks, not one per request: at low queue depth each extra task is a thread
//! hand-off per request, which dominated latency.

use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{debug, error, warn};

use crate::device::{BlockDevice, DeviceError, Errno};
use crate::error::Error;
use crate::proto::{self, Command, Limits, MAX_PAYLOAD, REQUEST_LEN, RequestHeader};
use crate::server::ServerConfig;

/// Socket buffer sizes: big enough to batch many small headers per system call.
const IO_BUFFER: usize = 64 << 10;

/// The export a connection serves, as the transmission phase needs it.
pub(crate) struct Target<'a> {
    pub(crate) name: &'a str,
    pub(crate) device: Arc<dyn BlockDevice>,
    /// Size and flags as the handshake announced them.
    pub(crate) limits: Limits,
    /// Payload bytes shared by every connection to the export.
    pub(crate) export_bytes: Arc<Semaphore>,
}

/// Serves requests until the client disconnects, breaks the protocol, or `stop` fires.
///
/// Whatever ends the loop, every request already read is still executed and answered
/// (if the client is still there) before this returns.
pub(crate) async fn serve<R, W>(
    reader: R,
    writer: W,
    target: Target<'_>,
    config: &ServerConfig,
    stop: impl Future<Output = ()>,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Target {
        name,
        device,
        limits,
        export_bytes,
    } = target;
    let max_in_flight = config.max_in_flight.max(1);
    // A single request may need a whole payload's worth of budget.
    let budget = config.max_in_flight_bytes.max(MAX_PAYLOAD);
    let limiter = Limiter {
        slots: Arc::new(Semaphore::new(max_in_flight)),
        bytes: Arc::new(Semaphore::new(budget as usize)),
        export_bytes,
    };
    // Every queued item holds a slot permit, so the channel never holds more than
    // `max_in_flight` items and sending into it does not block for long.
    let (tx, rx) = mpsc::channel::<Work>(max_in_flight);
    let name: Arc<str> = Arc::from(name);
    let writer_task = tokio::spawn(execute_and_reply(writer, rx, device, Arc::clone(&name)));
    let mut reader = BufReader::with_capacity(IO_BUFFER, reader);
    tokio::pin!(stop);

    let ended = loop {
        let step = tokio::select! {
            biased;
            () = &mut stop => {
                debug!(export = %name, "export removed or server stopping; finishing in-flight requests");
                break Ok(());
            }
            // The writer stopped: the client is gone.
            () = tx.closed() => break Ok(()),
            step = next_request(&mut reader, &limiter, &name, &limits) => step,
        };
        match step {
            Ok(Step::Eof) | Ok(Step::Disconnect) => break Ok(()),
            Ok(Step::Reply(reply)) => {
                if tx.send(Work::Reply(reply)).await.is_err() {
                    break Ok(());
                }
            }
            Ok(Step::Run(job)) => {
                if tx.send(Work::Run(job)).await.is_err() {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    // The executor ends once the reader's sender is gone and every job it holds has
    // been answered.
    drop(tx);
    let written = match writer_task.await {
        Ok(r) => r.map_err(Error::from),
        Err(join) => Err(Error::Io(io::Error::other(join))),
    };
    ended.and(written)
}

/// Bounds on concurrent work; a full limiter stops the reader, which in turn stops the
/// client through TCP (or socket) backpressure.
struct Limiter {
    /// Requests of this connection.
    slots: Arc<Semaphore>,
    /// Payload bytes of this connection.
    bytes: Arc<Semaphore>,
    /// Payload bytes of every connection to the export (`ExportLimits`).
    export_bytes: Arc<Semaphore>,
}

/// Held until a request's reply has been written.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

enum Step {
    /// The client closed the connection between requests.
    Eof,
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// A request refused without touching the device.
    Reply(Reply),
    /// A request for the device.
    Run(Job),
}

/// Reads one request (header and any payload) and decides what to do with it.
async fn next_request<R>(
    reader: &mut R,
    limiter: &Limiter,
    export: &str,
    limits: &Limits,
) -> Result<Step, Error>
where
    R: AsyncRead + Unpin,
{
    let Ok(slot) = Arc::clone(&limiter.slots).acquire_owned().await else {
        return Ok(Step::Eof);
    };
    let mut header = [0u8; REQUEST_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        // A client may drop the connection instead of sending DISC.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Step::Eof),
        Err(e) => return Err(e.into()),
    }
    let h = RequestHeader::decode(&header).map_err(|magic| Error::BadMagic {
        what: "request",
        got: u64::from(magic),
    })?;
    let payload_len = h.payload_len().map_err(|len| Error::PayloadTooLarge {
        len,
        max: MAX_PAYLOAD,
    })?;
    let checked = proto::check(&h, limits);
    let budget = match checked {
        Ok(Command::Read { len, .. }) => len,
        _ => payload_len,
    };
    // Both budgets before the payload is read: a request that does not fit waits here,
    // unread, with nothing allocated. Always this connection's first, then the export's,
    // and a reply releases both, so waiters never hold one another up in a cycle.
    let bytes = if budget > 0 {
        let Ok(own) = Arc::clone(&limiter.bytes).acquire_many_owned(budget).await else {
            return Ok(Step::Eof);
        };
        let Ok(shared) = Arc::clone(&limiter.export_bytes)
            .acquire_many_owned(budget)
            .await
        else {
            return Ok(Step::Eof);
        };
        Some((own, shared))
    } else {
        None
    };
    // A refused WRITE's payload is still read, to stay in step with the stream.
    let payload = if payload_len > 0 {
        read_payload(reader, payload_len as usize).await?
    } else {
        Bytes::new()
    };
    let permits = Permits {
        _slot: slot,
        _bytes: bytes,
    };
    Ok(match checked {
        Err(errno) => {
            debug!(%export, ?h, %errno, "request refused");
            Step::Reply(Reply {
                cookie: h.cookie,
                error: errno.code(),
                data: None,
                _permits: permits,
            })
        }
        Ok(Command::Disconnect) => Step::Disconnect,
        Ok(command) => Step::Run(Job {
            cookie: h.cookie,
            command,
            payload,
            permits,
        }),
    })
}

async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    // `take` keeps a larger-than-asked allocation from swallowing the next request.
    let mut limited = reader.take(len as u64);
    while buf.len() < len {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

/// A valid request on its way to the device.
struct Job {
    cookie: u64,
    command: Command,
    payload: Bytes,
    permits: Permits,
}

/// What the reader hands the executor.
enum Work {
    /// Run this request, then reply.
    Run(Job),
    /// Reply at once (a refused request).
    Reply(Reply),
}

impl Job {
    async fn run(self, device: Arc<dyn BlockDevice>, export: Arc<str>) -> Reply {
        let command = self.command;
        // A panicking backend must not leave the client waiting forever for this reply.
        let outcome = AssertUnwindSafe(execute(&*device, command, self.payload))
            .catch_unwind()
            .await;
        let (error, data) = match outcome {
            Ok(Ok(data)) => (0, data),
            Ok(Err(e)) => {
                let errno = e.errno();
                warn!(%export, ?command, error = %e, %errno, "device operation failed");
                (errno.code(), None)
            }
            Err(_) => {
                error!(%export, ?command, "device operation panicked; replying EIO");
                (Errno::Io.code(), None)
            }
        };
        Reply {
            cookie: self.cookie,
            error,
            data,
            _permits: self.permits,
        }
    }
}

/// Runs one command; `Ok(Some(data))` only for reads.
async fn execute(
    device: &dyn BlockDevice,
    command: Command,
    payload: Bytes,
) -> Result<Option<Bytes>, DeviceError> {
    match command {
        Command::Read { offset, len } => {
            if len == 0 {
                return Ok(Some(Bytes::new()));
            }
            let data = device.read(offset, len).await?;
            if data.len() != len as usize {
                // A simple reply's payload length is fixed by the request: never send
                // a different amount.
                return Err(DeviceError::Io(io::Error::other(format!(
                    "device returned {} bytes for a {len}-byte read",
                    data.len()
                ))));
            }
            Ok(Some(data))
        }
        Command::Write { offset, fua } => {
            if !payload.is_empty() {
                device.write(offset, payload, fua).await?;
            }
            Ok(None)
        }
        Command::Flush => {
            device.flush().await?;
            Ok(None)
        }
        Command::Trim { offset, len, fua } => {
            if len > 0 {
                device.trim(offset, len).await?;
                if fua {
                    device.flush().await?;
                }
            }
            Ok(None)
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
        } => {
            if len > 0 {
                device.write_zeroes(offset, len, fua, may_trim).await?;
            }
            Ok(None)
        }
        // Handled by the reader; never turned into a job.
        Command::Disconnect => Ok(None),
    }
}

/// A simple reply, with the permits of its request.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Bytes>,
    _permits: Permits,
}

/// The only task that runs requests and writes to the socket, so a reply's header and
/// payload are never split by another reply. Requests run concurrently (polled here);
/// replies already completed are written together before one flush.
async fn execute_and_reply<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::Receiver<Work>,
    device: Arc<dyn BlockDevice>,
    export: Arc<str>,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(IO_BUFFER, writer);
    let mut running = FuturesUnordered::new();
    let mut open = true;
    // Once the socket fails, requests already read still run to completion (the device
    // sees every request it was promised), but nothing more is read or written.
    let mut broken: Option<io::Error> = None;
    // Refusals taken from the queue along with runnable requests, answered in this round.
    let mut pending: Vec<Reply> = Vec::new();
    while open || !running.is_empty() {
        let reply = tokio::select! {
            work = rx.recv(), if open => match work {
                Some(Work::Run(job)) => {
                    running.push(job.run(Arc::clone(&device), Arc::clone(&export)));
                    None
                }
                Some(Work::Reply(reply)) => Some(reply),
                None => {
                    open = false;
                    None
                }
            },
            Some(reply) = running.next(), if !running.is_empty() => Some(reply),
        };
        // Take every request already queued before running any: at high queue depth their
        // replies then go out together, one system call for many.
        while open {
            match rx.try_recv() {
                Ok(Work::Run(job)) => {
                    running.push(job.run(Arc::clone(&device), Arc::clone(&export)));
                }
                Ok(Work::Reply(early)) => pending.push(early),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if broken.is_some() {
            pending.clear();
            continue;
        }
        let mut result = Ok(());
        for early in pending.drain(..) {
            if result.is_ok() {
                result = put_reply(&mut out, early).await;
            }
        }
        if let Some(reply) = reply.filter(|_| result.is_ok()) {
            result = put_reply(&mut out, reply).await;
        }
        // Coalesce what is ready right now into one flush.
        while result.is_ok() {
            match running.next().now_or_never() {
                Some(Some(reply)) => result = put_reply(&mut out, reply).await,
                _ => break,
            }
        }
        if result.is_ok() {
            result = out.flush().await;
        }
        if let Err(e) = result {
            // Nothing new arrives; what the reader already queued still runs.
            rx.close();
            broken = Some(e);
        }
    }
    match broken {
        Some(e) => Err(e),
        None => out.shutdown().await,
    }
}

async fn put_reply<W: AsyncWrite + Unpin>(out: &mut W, reply: Reply) -> io::Result<()> {
    out.write_all(&proto::simple_reply(reply.cookie, reply.error))
        .await?;
    if let Some(data) = &reply.data {
        out.write_all(data).await?;
    }
    // Dropping the reply here releases its permits, letting the reader take more work.
    Ok(())
}
