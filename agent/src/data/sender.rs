//! The primary's side of one replication link: connects to the replica, brings it up to
//! date (resume from the journal, or a dirty-chunk resync, or the initial full sync), then
//! streams the journal in sequence order and tracks acknowledgements.
//!
//! Resync without losing a write: new writes keep marking the link's dirty tracker, so a
//! first pass sends the dirty chunks while writes continue; then the journal starts holding
//! writes for the link (the switch point), a second pass sends what became dirty meanwhile,
//! and streaming continues from the switch point. Every chunk then equals the primary's
//! content at some moment after the switch, and replaying every write from the switch in
//! order makes the copy exact. The replica snapshots its last consistent state before the
//! first chunk arrives and is reported `inconsistent` until it has applied past the point
//! where the last chunk was read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_raft::model::{DiskId, LinkState, NodeId};
use convoy_transport::{Endpoint, FramedRecv, FramedSend, StreamKind};
use serde::Serialize;
use tokio::sync::watch;

use super::pipeline::Pipeline;
use super::wire::{FromReplica, Hello, HelloReply, Payload, ToReplica};

/// Bytes of journal sent per frame.
const FRAME_BYTES: u64 = 1 << 20;
/// Chunks per resync frame.
const CHUNKS_PER_FRAME: usize = 16;

/// What the link is doing, for `convoy cg show` and metrics.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct LinkReport {
    /// `connecting`, `initial-sync`, `resync`, `streaming` or `stopped`.
    pub phase: String,
    /// Highest sequence the replica holds durably.
    pub acked_seq: u64,
    /// Last sequence assigned on the primary.
    pub last_seq: u64,
    /// Writes the replica lacks (the RPO in writes).
    pub lag_writes: u64,
    /// Seconds since the replica last held every write (the RPO in seconds).
    pub lag_seconds: f64,
    /// Resyncs from chunks since the agent started (initial sync included).
    #[serde(default)]
    pub resyncs: u64,
    /// Chunks sent by resyncs, and how many the running one has left.
    pub resync_chunks_sent: u64,
    /// Chunks the running resync still has to send.
    pub resync_chunks_left: u64,
    /// Payload bytes sent on the link (journal and chunks).
    pub bytes_sent: u64,
    /// Last error, if the link is down.
    pub last_error: Option<String>,
}

/// One link's sender.
pub struct LinkSender {
    /// The group's pipeline.
    pub pipeline: Arc<Pipeline>,
    /// Replica host.
    pub to: NodeId,
    /// Replica host's QUIC address.
    pub addr: SocketAddr,
    /// Our endpoint.
    pub endpoint: Endpoint,
    /// Name of this link's dirty tracker on every disk.
    pub tracker: String,
    /// Shared status.
    pub report: Arc<Mutex<LinkReport>>,
}

/// Chunks sent during a resync, to be cleared from the tracker once the replica holds them.
struct PendingClear {
    disk: DiskId,
    chunks: Vec<u64>,
    as_of: convoy_store::WriteSeq,
}

fn report(r: &Mutex<LinkReport>) -> std::sync::MutexGuard<'_, LinkReport> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

impl LinkSender {
    /// Runs until `stop` turns true: sessions with backoff between failures.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                break;
            }
            report(&self.report).phase = "connecting".into();
            let outcome = tokio::select! {
                r = self.session() => r,
                _ = stop.changed() => break,
            };
            self.pipeline.pause_streaming(self.to);
            match outcome {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::info!(cg = %self.pipeline.name, replica = self.to, error = %e, "replication link down; retrying");
                    report(&self.report).last_error = Some(e.to_string());
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => break,
            }
        }
        self.pipeline.stop_streaming(self.to);
        report(&self.report).phase = "stopped".into();
    }

    async fn session(&self) -> anyhow::Result<()> {
        let (mut send, mut recv) = self
            .endpoint
            .open_stream(self.to, self.addr, StreamKind::Data)
            .await?;
        let hello = Hello {
            cg_id: self.pipeline.cg_id,
            cg: self.pipeline.name.clone(),
            epoch: self.pipeline.epoch(),
            disks: self
                .pipeline
                .images()
                .iter()
                .map(|(id, img)| (*id, img.size()))
                .collect(),
            last_seq: self.pipeline.last_seq(),
        };
        send.send_frame(&convoy_codec::encode(&hello)?).await?;
        let reply = tokio::time::timeout(Duration::from_secs(10), recv.recv_frame())
            .await
            .map_err(|_| anyhow::anyhow!("replica did not answer the hello within 10 s"))??;
        let reply: HelloReply = match reply {
            Some(f) => convoy_codec::decode(&f)?,
            None => anyhow::bail!("replica closed the stream during the hello"),
        };
        let (applied, consistent) = match reply {
            HelloReply::Accept {
                applied_seq,
                consistent,
            } => (applied_seq, consistent),
            HelloReply::Refuse { reason } => anyhow::bail!("replica refused: {reason}"),
        };
        report(&self.report).last_error = None;
        self.pipeline.acked(self.to, applied);
        let state = self.link_state();
        let mut pending: Vec<(u64, PendingClear)> = Vec::new();
        let resumed = state != LinkState::Syncing
            && applied > 0
            && consistent
            && self.pipeline.resume_streaming(self.to, applied + 1);
        let mut from = if resumed {
            tracing::info!(cg = %self.pipeline.name, replica = self.to, from = applied + 1, "resuming replication from the journal");
            applied + 1
        } else {
            let initial = state == LinkState::Syncing || applied == 0;
            self.resync(&mut send, initial, &mut pending).await?
        };

        // Acknowledgements arrive on the receive half. After a resync the copy is not
        // consistent until the replica says so again.
        let (ack_tx, mut ack_rx) = watch::channel(Acked {
            applied,
            recorded: applied,
            consistent: consistent && resumed,
        });
        let reader = tokio::spawn(read_acks(recv, ack_tx, Arc::clone(&self.pipeline), self.to));
        let result = self
            .stream(&mut send, &mut from, &mut ack_rx, &mut pending)
            .await;
        reader.abort();
        result
    }

    fn link_state(&self) -> LinkState {
        self.pipeline
            .link_status()
            .into_iter()
            .find(|(to, ..)| *to == self.to)
            .map_or(LinkState::Syncing, |(_, _, s, _, _)| s)
    }

    async fn set_state(&self, state: LinkState) -> anyhow::Result<()> {
        if self.link_state() == state {
            return Ok(());
        }
        self.pipeline
            .reporter()
            .report(self.pipeline.name.clone(), self.to, state)
            .await
            .map_err(|e| anyhow::anyhow!("cannot record link state {}: {e}", state.as_str()))?;
        self.pipeline.note_state(self.to, state);
        Ok(())
    }

    /// Streams the journal from `from`, handling acks, overflow (inline resync) and
    /// tracker clearing. Returns only on error.
    async fn stream(
        &self,
        send: &mut FramedSend,
        from: &mut u64,
        acks: &mut watch::Receiver<Acked>,
        pending: &mut Vec<(u64, PendingClear)>,
    ) -> anyhow::Result<()> {
        report(&self.report).phase = "streaming".into();
        let mut caught_up_at = Instant::now();
        let mut next_mark = Instant::now();
        loop {
            let notified = self.pipeline.written.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let Acked {
                applied: acked,
                recorded,
                consistent,
            } = *acks.borrow_and_update();
            self.pipeline.recorded(self.to, recorded);
            if acked > 0 {
                self.pipeline.acked(self.to, acked);
            }
            let last = self.pipeline.last_seq();
            let promote = match self.link_state() {
                LinkState::Syncing | LinkState::Inconsistent => consistent,
                // It missed acknowledged writes: only once it holds every one of them.
                LinkState::Outdated => consistent && acked >= last,
                LinkState::Consistent => false,
            };
            if !consistent && self.link_state() == LinkState::Consistent {
                // The replica says it is not a prefix right now (re-applying after a crash).
                self.set_state(LinkState::Inconsistent).await?;
            }
            if promote {
                self.set_state(LinkState::Consistent).await?;
                tracing::info!(cg = %self.pipeline.name, replica = self.to, acked, "replica is consistent");
            }
            self.clear_pending(pending, acked, consistent)?;
            if acked >= last {
                caught_up_at = Instant::now();
            }
            {
                let mut r = report(&self.report);
                r.acked_seq = acked;
                r.last_seq = last;
                r.lag_writes = last.saturating_sub(acked);
                r.lag_seconds = if r.lag_writes == 0 {
                    0.0
                } else {
                    caught_up_at.elapsed().as_secs_f64()
                };
            }
            // Periodically remember which dirty chunks the replica will hold once it acks
            // the current sequence, so streamed writes stop counting as dirty.
            if Instant::now() >= next_mark && consistent {
                self.mark_dirty(pending)?;
                next_mark = Instant::now() + Duration::from_secs(1);
            }

            match self.pipeline.journal_from(self.to, *from, FRAME_BYTES) {
                Err(()) => {
                    // Journal overflow: resync inline, then carry on streaming.
                    *from = self.resync(send, false, pending).await?;
                    report(&self.report).phase = "streaming".into();
                    continue;
                }
                Ok(writes) if !writes.is_empty() => {
                    let bytes: u64 = writes.iter().map(|w| w.payload.len()).sum();
                    if let Some(last) = writes.last() {
                        *from = last.seq + 1;
                    }
                    let msg = ToReplica::Writes {
                        epoch: self.pipeline.epoch(),
                        writes,
                    };
                    send.send_frame(&convoy_codec::encode(&msg)?).await?;
                    report(&self.report).bytes_sent += bytes;
                    continue;
                }
                Ok(_) => {}
            }
            tokio::select! {
                _ = &mut notified => {}
                r = acks.changed() => r.map_err(|_| anyhow::anyhow!("replica closed the stream"))?,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    fn mark_dirty(&self, pending: &mut Vec<(u64, PendingClear)>) -> anyhow::Result<()> {
        for (disk, image) in self.pipeline.images() {
            let set = image.dirty_chunks(&self.tracker)?;
            if set.chunks.is_empty() {
                continue;
            }
            // Every write reflected in `set` has a sequence at most this.
            let upto = self.pipeline.last_seq();
            pending.push((
                upto,
                PendingClear {
                    disk: *disk,
                    chunks: set.chunks,
                    as_of: set.as_of,
                },
            ));
        }
        // Bound the list: a replica that never acks keeps only the newest marks.
        if pending.len() > 64 {
            let cut = pending.len() - 64;
            pending.drain(..cut);
        }
        Ok(())
    }

    fn clear_pending(
        &self,
        pending: &mut Vec<(u64, PendingClear)>,
        acked: u64,
        consistent: bool,
    ) -> anyhow::Result<()> {
        if !consistent {
            return Ok(());
        }
        let mut keep = Vec::new();
        for (upto, p) in pending.drain(..) {
            if acked >= upto {
                if let Some(image) = self.pipeline.image(p.disk) {
                    image.clear(&self.tracker, &p.chunks, p.as_of)?;
                }
            } else {
                keep.push((upto, p));
            }
        }
        *pending = keep;
        Ok(())
    }

    /// Sends a resync (all chunks when `initial`, else the dirty ones) and returns the
    /// sequence streaming continues from.
    async fn resync(
        &self,
        send: &mut FramedSend,
        initial: bool,
        pending: &mut Vec<(u64, PendingClear)>,
    ) -> anyhow::Result<u64> {
        let phase = if initial { "initial-sync" } else { "resync" };
        tracing::info!(cg = %self.pipeline.name, replica = self.to, phase, "bringing the replica up to date from chunks");
        {
            let mut r = report(&self.report);
            r.phase = phase.into();
            r.resyncs += 1;
        }
        if !initial && self.link_state() == LinkState::Consistent {
            self.set_state(LinkState::Inconsistent).await?;
        }
        let epoch = self.pipeline.epoch();
        send.send_frame(&convoy_codec::encode(&ToReplica::ResyncBegin { epoch })?)
            .await?;

        // Pass 1 while writes go on.
        let mut sets = Vec::new();
        for (disk, image) in self.pipeline.images() {
            let set = image.dirty_chunks(&self.tracker)?;
            let chunks = if initial {
                (0..image.chunk_count()).collect()
            } else {
                set.chunks.clone()
            };
            sets.push((*disk, chunks, set.as_of));
        }
        self.send_chunks(send, &sets, epoch).await?;

        // Switch: from here the journal holds this link's writes.
        let resume = self.pipeline.begin_streaming(self.to);
        let mut second = Vec::new();
        for (disk, image) in self.pipeline.images() {
            let set = image.dirty_chunks(&self.tracker)?;
            second.push((*disk, set.chunks, set.as_of));
        }
        self.send_chunks(send, &second, epoch).await?;
        // Every chunk was read before this sequence was assigned.
        let consistent_at = self.pipeline.next_seq();
        let end = ToReplica::ResyncEnd {
            epoch,
            resume_seq: resume,
            consistent_at,
        };
        send.send_frame(&convoy_codec::encode(&end)?).await?;
        for (disk, chunks, as_of) in sets.into_iter().chain(second) {
            pending.push((
                consistent_at.saturating_sub(1),
                PendingClear {
                    disk,
                    chunks,
                    as_of,
                },
            ));
        }
        Ok(resume)
    }

    async fn send_chunks(
        &self,
        send: &mut FramedSend,
        sets: &[(DiskId, Vec<u64>, convoy_store::WriteSeq)],
        epoch: u64,
    ) -> anyhow::Result<()> {
        let total: u64 = sets.iter().map(|(_, c, _)| c.len() as u64).sum();
        report(&self.report).resync_chunks_left = total;
        for (disk, chunks, _) in sets {
            let Some(image) = self.pipeline.image(*disk) else {
                continue;
            };
            let chunk_size = u64::from(image.geometry().chunk_size());
            for group in chunks.chunks(CHUNKS_PER_FRAME) {
                let mut out = Vec::with_capacity(group.len());
                let mut bytes = 0;
                for &c in group {
                    let offset = c * chunk_size;
                    let len = chunk_size.min(image.size() - offset) as usize;
                    let data = Arc::clone(image).read_async(offset, len).await?;
                    let payload = if convoy_store::is_zero(&data) {
                        Payload::Zeroes(len as u64)
                    } else {
                        bytes += len as u64;
                        Payload::Data(data)
                    };
                    out.push((*disk, offset, payload));
                }
                let n = out.len() as u64;
                send.send_frame(&convoy_codec::encode(&ToReplica::Chunks {
                    epoch,
                    chunks: out,
                })?)
                .await?;
                let mut r = report(&self.report);
                r.resync_chunks_sent += n;
                r.resync_chunks_left = r.resync_chunks_left.saturating_sub(n);
                r.bytes_sent += bytes;
            }
        }
        Ok(())
    }
}

/// The replica's latest acknowledgement.
#[derive(Clone, Copy, Debug)]
struct Acked {
    /// Data durable through this sequence.
    applied: u64,
    /// Progress record durable through this sequence.
    recorded: u64,
    /// Whether the copy is a consistent prefix.
    consistent: bool,
}

/// Reads the replica's acknowledgements into `tx` until the stream ends.
/// Synchronous writers are released from here directly, without a hop through the
/// sender's loop.
async fn read_acks(
    mut recv: FramedRecv,
    tx: watch::Sender<Acked>,
    pipeline: Arc<Pipeline>,
    to: NodeId,
) {
    loop {
        let frame: Option<Bytes> = match recv.recv_frame().await {
            Ok(f) => f,
            Err(_) => return,
        };
        let Some(frame) = frame else { return };
        match convoy_codec::decode::<FromReplica>(&frame) {
            Ok(FromReplica::Ack {
                applied_seq,
                recorded_seq,
                consistent,
            }) => {
                pipeline.acked(to, applied_seq);
                pipeline.recorded(to, recorded_seq);
                let _ = tx.send(Acked {
                    applied: applied_seq,
                    recorded: recorded_seq,
                    consistent,
                });
            }
            Ok(FromReplica::Refused { reason }) => {
                tracing::warn!(%reason, "replica refused the stream");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame from replica");
                return;
            }
        }
    }
}
