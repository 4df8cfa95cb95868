//! Mirrored writes: a VM running on a host that is not its group's sequencer writes
//! through an export whose writes go to the sequencer over a long-lived QUIC stream of
//! their own (stream kind `Mirror`), pipelined: many requests in flight, answered as each
//! completes. A write is acknowledged to the guest only after the sequencer ordered it and
//! made it as durable as the group's links promise. This is how the seeds' reverse
//! replication keeps the source's copy complete while VMs run on the destination.
//!
//! Every request is bound to the group (hello), the disk and the writer's epoch for it;
//! the sequencer checks the epoch inside its critical section and checks that the sending
//! host may write the disk (the disk's VM runs there, or the host holds an active-active
//! copy). Reads go to the sequencer only when the local copy is not known to hold the
//! writes this host made (see [`MirrorClient::needs`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use convoy_raft::model::{DiskId, NodeId};
use convoy_transport::{Endpoint, FramedSend, InboundStream, StreamKind};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::DataPlane;
use super::sequencer::WriteError;
use super::wire::Payload;

/// First frame of a mirror stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MirrorHello {
    /// Group id.
    pub cg_id: u64,
    /// The sequencer epoch the writer's route was made for.
    pub sequencer_epoch: u64,
}

/// The sequencer's answer to [`MirrorHello`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MirrorHelloReply {
    /// Ready; `last_seq` is the last sequence assigned so far (every write the writer's
    /// host made before is at or below it).
    Accept {
        /// Last sequence assigned.
        last_seq: u64,
    },
    /// Not the group's sequencer (any more), or refused.
    Refuse {
        /// Why.
        reason: String,
    },
}

/// A request from the writer's host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToSequencer {
    /// Order and apply a write.
    Write {
        /// Request id (unique per stream).
        id: u64,
        /// Disk written.
        disk: DiskId,
        /// The writer's epoch for the disk.
        epoch: u64,
        /// Byte offset.
        offset: u64,
        /// What is written.
        payload: Payload,
        /// Durable on the sequencer when acknowledged.
        fua: bool,
    },
    /// Make every acknowledged write of `disk` durable on every copy the group promises.
    Flush {
        /// Request id.
        id: u64,
        /// The disk.
        disk: DiskId,
    },
    /// Read from the sequencer's copy.
    Read {
        /// Request id.
        id: u64,
        /// The disk.
        disk: DiskId,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
}

/// Why a mirrored request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailKind {
    /// The writer's epoch is stale: it was fenced.
    StaleEpoch,
    /// The receiver does not order the group (any more); not applied: send it to the
    /// group's current sequencer.
    Moved,
    /// The sending host may not write this disk.
    NotAllowed,
    /// Writes were paused too long (a hand-over that did not finish); not applied.
    Paused,
    /// The sequencer's storage failed.
    Io,
    /// Out of space on the sequencer.
    NoSpace,
}

/// The sequencer's answer to one request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromSequencer {
    /// Ordered (sequence number) and as durable as promised.
    Written {
        /// Request id.
        id: u64,
        /// Group sequence number.
        seq: u64,
    },
    /// Flushed.
    Flushed {
        /// Request id.
        id: u64,
    },
    /// Read data.
    Data {
        /// Request id.
        id: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Failed.
    Failed {
        /// Request id.
        id: u64,
        /// Class.
        kind: FailKind,
        /// Message for logs.
        message: String,
    },
}

impl FromSequencer {
    fn id(&self) -> u64 {
        match self {
            FromSequencer::Written { id, .. }
            | FromSequencer::Flushed { id }
            | FromSequencer::Data { id, .. }
            | FromSequencer::Failed { id, .. } => *id,
        }
    }
}

/// Errors of a mirrored request, as the writer's side sees them.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The sequencer refused or failed the request.
    #[error("the sequencer (node {node}) answered {kind:?}: {message}")]
    Failed {
        /// The sequencer.
        node: NodeId,
        /// Class.
        kind: FailKind,
        /// Its message.
        message: String,
    },
    /// The stream broke or the answer did not come in time: the outcome is unknown.
    #[error("no answer from the sequencer (node {node}): {why}")]
    Lost {
        /// The sequencer.
        node: NodeId,
        /// What happened.
        why: String,
    },
}

impl MirrorError {
    /// Whether the request was certainly not applied and may go to the current sequencer.
    pub fn retry_elsewhere(&self) -> bool {
        matches!(
            self,
            MirrorError::Failed {
                kind: FailKind::Moved | FailKind::Paused,
                ..
            }
        )
    }

    /// The class, if the sequencer answered.
    pub fn kind(&self) -> Option<FailKind> {
        match self {
            MirrorError::Failed { kind, .. } => Some(*kind),
            MirrorError::Lost { .. } => None,
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<FromSequencer>>>>;

/// One live stream to the sequencer.
struct Conn {
    send: tokio::sync::Mutex<FramedSend>,
    pending: Pending,
    reader: tokio::task::JoinHandle<()>,
    /// The sequencer's last sequence when the stream opened.
    floor: u64,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The writer host's side: one per (group, sequencer host, sequencer epoch).
pub struct MirrorClient {
    /// Group id.
    pub cg_id: u64,
    /// The sequencer.
    pub sequencer: NodeId,
    /// Its sequencer epoch.
    pub sequencer_epoch: u64,
    addr: SocketAddr,
    endpoint: Endpoint,
    timeout: Duration,
    next_id: AtomicU64,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// Per disk: the highest sequence a write from this host got (or the sequencer's last
    /// sequence when the stream opened): the local copy serves reads once it applied it.
    need: Mutex<HashMap<DiskId, u64>>,
}

fn lost(node: NodeId, why: impl std::fmt::Display) -> MirrorError {
    MirrorError::Lost {
        node,
        why: why.to_string(),
    }
}

impl MirrorClient {
    /// A client for group `cg_id` ordered by `sequencer` at `addr`.
    pub fn new(
        cg_id: u64,
        sequencer: NodeId,
        sequencer_epoch: u64,
        addr: SocketAddr,
        endpoint: Endpoint,
        timeout: Duration,
    ) -> Self {
        Self {
            cg_id,
            sequencer,
            sequencer_epoch,
            addr,
            endpoint,
            timeout,
            next_id: AtomicU64::new(1),
            conn: tokio::sync::Mutex::new(None),
            need: Mutex::new(HashMap::new()),
        }
    }

    async fn connection(&self) -> Result<Arc<Conn>, MirrorError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.reader.is_finished() {
                return Ok(Arc::clone(c));
            }
        }
        let node = self.sequencer;
        let (mut send, mut recv) = self
            .endpoint
            .open_stream(node, self.addr, StreamKind::Mirror)
            .await
            .map_err(|e| lost(node, e))?;
        let hello = MirrorHello {
            cg_id: self.cg_id,
            sequencer_epoch: self.sequencer_epoch,
        };
        send.send_frame(&convoy_codec::encode(&hello).map_err(|e| lost(node, e))?)
            .await
            .map_err(|e| lost(node, e))?;
        let reply = tokio::time::timeout(self.timeout, recv.recv_frame())
            .await
            .map_err(|_| lost(node, "no answer to the hello"))?
            .map_err(|e| lost(node, e))?
            .ok_or_else(|| lost(node, "stream closed during the hello"))?;
        let floor =
            match convoy_codec::decode::<MirrorHelloReply>(&reply).map_err(|e| lost(node, e))? {
                MirrorHelloReply::Accept { last_seq } => last_seq,
                MirrorHelloReply::Refuse { reason } => {
                    return Err(MirrorError::Failed {
                        node,
                        kind: FailKind::Moved,
                        message: reason,
                    });
                }
            };
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let p2 = Arc::clone(&pending);
        let reader = tokio::spawn(async move {
            while let Ok(Some(frame)) = recv.recv_frame().await {
                let Ok(msg) = convoy_codec::decode::<FromSequencer>(&frame) else {
                    break;
                };
                let waiter = p2
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&msg.id());
                if let Some(tx) = waiter {
                    let _ = tx.send(msg);
                }
            }
            // Dropping the senders tells every waiter the stream is gone.
            p2.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        let conn = Arc::new(Conn {
            send: tokio::sync::Mutex::new(send),
            pending,
            reader,
            floor,
        });
        {
            let mut need = self.need.lock().unwrap_or_else(|p| p.into_inner());
            for v in need.values_mut() {
                *v = (*v).max(floor);
            }
        }
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    async fn call(
        &self,
        make: impl FnOnce(u64) -> ToSequencer,
    ) -> Result<FromSequencer, MirrorError> {
        let node = self.sequencer;
        let conn = self.connection().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let frame = convoy_codec::encode(&make(id)).map_err(|e| lost(node, e))?;
        let sent = conn.send.lock().await.send_frame(&frame).await;
        if let Err(e) = sent {
            conn.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(lost(node, e));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(FromSequencer::Failed { kind, message, .. })) => Err(MirrorError::Failed {
                node,
                kind,
                message,
            }),
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(lost(node, "the stream broke")),
            Err(_) => {
                conn.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(lost(node, format!("no answer within {:?}", self.timeout)))
            }
        }
    }

    /// Sends a write; returns the group sequence it got once the sequencer made it as
    /// durable as promised.
    pub async fn write(
        &self,
        disk: DiskId,
        epoch: u64,
        offset: u64,
        payload: Payload,
        fua: bool,
    ) -> Result<u64, MirrorError> {
        let answer = self
            .call(|id| ToSequencer::Write {
                id,
                disk,
                epoch,
                offset,
                payload,
                fua,
            })
            .await?;
        match answer {
            FromSequencer::Written { seq, .. } => {
                let mut need = self.need.lock().unwrap_or_else(|p| p.into_inner());
                let n = need.entry(disk).or_default();
                *n = (*n).max(seq);
                Ok(seq)
            }
            other => Err(lost(self.sequencer, format!("unexpected answer {other:?}"))),
        }
    }

    /// Flushes `disk` on every copy the group promises.
    pub async fn flush(&self, disk: DiskId) -> Result<(), MirrorError> {
        match self.call(|id| ToSequencer::Flush { id, disk }).await? {
            FromSequencer::Flushed { .. } => Ok(()),
            other => Err(lost(self.sequencer, format!("unexpected answer {other:?}"))),
        }
    }

    /// Reads from the sequencer's copy.
    pub async fn read(&self, disk: DiskId, offset: u64, len: u32) -> Result<Bytes, MirrorError> {
        match self
            .call(|id| ToSequencer::Read {
                id,
                disk,
                offset,
                len,
            })
            .await?
        {
            FromSequencer::Data { data, .. } => Ok(data),
            other => Err(lost(self.sequencer, format!("unexpected answer {other:?}"))),
        }
    }

    /// The sequence the local copy must have applied before it may serve reads of `disk`:
    /// the last write this host made to it, and at least what the sequencer had assigned
    /// when the stream opened (writes made before this host took the VM over). `None`
    /// until a stream opened: read from the sequencer then.
    pub async fn needs(&self, disk: DiskId) -> Option<u64> {
        let floor = self.conn.lock().await.as_ref().map(|c| c.floor)?;
        let need = self
            .need
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&disk)
            .copied()
            .unwrap_or(0);
        Some(need.max(floor))
    }

    /// Opens the stream now (so reads know their floor before the first write).
    pub async fn connect(&self) -> Result<(), MirrorError> {
        self.connection().await.map(|_| ())
    }
}

fn fail(id: u64, e: &WriteError) -> FromSequencer {
    let kind = match e {
        WriteError::StaleEpoch { .. } => FailKind::StaleEpoch,
        WriteError::Moved | WriteError::Closed | WriteError::UnknownDisk(_) => FailKind::Moved,
        WriteError::PausedTooLong(_) => FailKind::Paused,
        WriteError::Store(s) if s.is_no_space() => FailKind::NoSpace,
        _ => FailKind::Io,
    };
    FromSequencer::Failed {
        id,
        kind,
        message: e.to_string(),
    }
}

/// Serves one inbound mirror stream on the sequencer until it ends.
pub async fn serve(stream: InboundStream, plane: Arc<DataPlane>) -> anyhow::Result<()> {
    let InboundStream {
        peer,
        mut send,
        mut recv,
        ..
    } = stream;
    let Some(first) = recv.recv_frame().await? else {
        return Ok(());
    };
    let hello: MirrorHello = convoy_codec::decode(&first)?;
    let seq = plane
        .sequencer_at_least(hello.cg_id, hello.sequencer_epoch, Duration::from_secs(3))
        .await;
    let Some(seq) = seq else {
        let reply = MirrorHelloReply::Refuse {
            reason: format!(
                "node {} does not order group {} (epoch {})",
                plane.node(),
                hello.cg_id,
                hello.sequencer_epoch
            ),
        };
        send.send_frame(&convoy_codec::encode(&reply)?).await?;
        return Ok(());
    };
    let reply = MirrorHelloReply::Accept {
        last_seq: seq.last_seq(),
    };
    send.send_frame(&convoy_codec::encode(&reply)?).await?;
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            frame = recv.recv_frame() => {
                let Some(frame) = frame? else { break };
                let req: ToSequencer = convoy_codec::decode(&frame)?;
                let plane = Arc::clone(&plane);
                let seq = Arc::clone(&seq);
                running.push(async move {
                    match req {
                        ToSequencer::Write { id, disk, epoch, offset, payload, fua } => {
                            if let Err(why) = plane.may_write(peer, disk, epoch).await {
                                metrics::counter!("convoy_mirror_refused_total").increment(1);
                                return FromSequencer::Failed { id, kind: FailKind::NotAllowed, message: why };
                            }
                            match seq.write(disk, offset, payload, fua, epoch).await {
                                Ok(s) => FromSequencer::Written { id, seq: s },
                                Err(e) => fail(id, &e),
                            }
                        }
                        ToSequencer::Flush { id, disk } => match seq.flush_everywhere(disk).await {
                            Ok(()) => {
                                // Counted only once every copy the mode promises is
                                // flushed: shows that a mirrored FLUSH reached the order.
                                metrics::counter!("convoy_mirror_flushes_total").increment(1);
                                FromSequencer::Flushed { id }
                            }
                            Err(e) => fail(id, &e),
                        },
                        ToSequencer::Read { id, disk, offset, len } => {
                            match seq.read(disk, offset, len as usize).await {
                                Ok(data) => FromSequencer::Data { id, data },
                                Err(e) => fail(id, &e),
                            }
                        }
                    }
                });
            }
            Some(answer) = running.next(), if !running.is_empty() => {
                send.send_frame(&convoy_codec::encode(&answer)?).await?;
            }
        }
    }
    // The writer went away: finish what was started (its writes are sequenced) quietly.
    while running.next().await.is_some() {}
    Ok(())
}
