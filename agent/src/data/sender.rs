//! The sequencer's side of one replication link: connects to the replica, brings it up to
//! date (resume from the journal, or a resync from dirty chunks, or the first sync), then
//! streams the journal in sequence order and tracks acknowledgements.
//!
//! Resync without losing a write: new writes keep marking the link's dirty tracker, so a
//! first pass sends the dirty chunks while writes continue; then the journal starts holding
//! writes for the link (the switch point), a second pass sends what became dirty meanwhile,
//! and streaming continues from the switch point. Every chunk then equals the sequencer's
//! content at some moment after the switch, and replaying every write from the switch in
//! order makes the copy exact. The replica snapshots its last consistent state before the
//! first chunk arrives and is reported `inconsistent` until it has applied past the point
//! where the last chunk was read.
//!
//! A first sync sends only what the copy lacks: a copy that already holds data (a former
//! sequencer, a replica removed and re-added, a copy made by `cg sync`) is compared by
//! chunk hashes (delta sessions) and only differing chunks move; an empty copy gets every
//! chunk that holds data.
//!
//! Promises: a synchronous link becomes `consistent` only through a promotion in the
//! sequencer (writes start waiting for the replica before the commit), so nothing is ever
//! acknowledged without a replica that Raft says is consistent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_raft::model::{DiskId, LinkState, NodeId};
use convoy_transport::{Endpoint, FramedRecv, FramedSend, StreamKind};
use serde::Serialize;
use tokio::sync::watch;

use super::sequencer::Sequencer;
use super::wire::{FromReplica, Hello, HelloReply, Payload, ToReplica};

/// Bytes of journal sent per frame.
const FRAME_BYTES: u64 = 1 << 20;
/// Chunks per resync frame.
const CHUNKS_PER_FRAME: usize = 16;
/// How long a promotion may wait for the replica to acknowledge what was written before.
const PROMOTION_WAIT: Duration = Duration::from_secs(5);
/// A synchronous promotion starts only once at most this many writes are still to be
/// sent; the stream keeps sending while it waits, so the wait is about one round trip.
const PROMOTION_BACKLOG: u64 = 256;

/// What the link is doing, for `convoy cg show` and metrics.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct LinkReport {
    /// `connecting`, `initial-sync`, `seeding`, `resync`, `streaming` or `stopped`.
    pub phase: String,
    /// Resyncs from chunks since the agent started (first sync included).
    pub resyncs: u64,
    /// Chunks sent by resyncs.
    pub resync_chunks_sent: u64,
    /// Chunks the running resync still has to send.
    pub resync_chunks_left: u64,
    /// Payload bytes sent on the link (journal, chunks and seeding).
    pub bytes_sent: u64,
    /// Bytes of chunk data sent by resyncs and seeding (the part of `bytes_sent` that is
    /// not the journal).
    pub resync_bytes_sent: u64,
    /// Disk bytes the running (or last) resync has to cover, zero chunks included; grows
    /// when a second pass is needed. For progress bars.
    pub resync_bytes_total: u64,
    /// Disk bytes of it covered so far.
    pub resync_bytes_done: u64,
    /// Last error, if the link is down; the replica's reason when it refused.
    pub last_error: Option<String>,
    /// The replica's reason for refusing the running session, when it sent one: the
    /// reset that ends the stream after it must not hide it.
    #[serde(skip)]
    pub refusal: Option<String>,
}

/// One link's sender.
pub struct LinkSender {
    /// The group's sequencer.
    pub seq: Arc<Sequencer>,
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
    /// Counts bulk transfers on this host (the hash warmer waits while any runs).
    pub bulk: Arc<std::sync::atomic::AtomicUsize>,
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
            {
                let mut r = report(&self.report);
                r.phase = "connecting".into();
                r.refusal = None;
            }
            let outcome = tokio::select! {
                r = self.session() => r,
                _ = stop.changed() => break,
            };
            self.seq.pause_streaming(self.to);
            match outcome {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::info!(cg = %self.seq.name, replica = self.to, error = %e, "replication link down; retrying");
                    let mut r = report(&self.report);
                    r.last_error = Some(match r.refusal.take() {
                        Some(reason) => format!("replica refused: {reason}"),
                        None => e.to_string(),
                    });
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => break,
            }
        }
        self.seq.stop_streaming(self.to);
        report(&self.report).phase = "stopped".into();
    }

    fn cg_id(&self) -> u64 {
        self.seq.cg_id().unwrap_or_default()
    }

    async fn session(&self) -> anyhow::Result<()> {
        let (mut send, mut recv) = self
            .endpoint
            .open_stream(self.to, self.addr, StreamKind::Data)
            .await?;
        let hello = Hello {
            cg_id: self.cg_id(),
            cg: self.seq.name.clone(),
            epoch: self.seq.sequencer_epoch(),
            disks: self
                .seq
                .images()
                .iter()
                .map(|(id, img)| (*id, img.size()))
                .collect(),
            last_seq: self.seq.last_seq(),
            acked_by_you: self.seq.acked_by(self.to),
        };
        send.send_frame(&convoy_codec::encode(&hello)?).await?;
        let reply = tokio::time::timeout(Duration::from_secs(10), recv.recv_frame())
            .await
            .map_err(|_| anyhow::anyhow!("replica did not answer the hello within 10 s"))??;
        let reply: HelloReply = match reply {
            Some(f) => convoy_codec::decode(&f)?,
            None => anyhow::bail!("replica closed the stream during the hello"),
        };
        let (applied, consistent, holds_data) = match reply {
            HelloReply::Accept {
                applied_seq,
                consistent,
                holds_data,
            } => (applied_seq, consistent, holds_data),
            HelloReply::Refuse { reason } => anyhow::bail!("replica refused: {reason}"),
        };
        report(&self.report).last_error = None;
        self.seq.acked(self.to, applied);
        let state = self.link_state();
        let mut pending: Vec<(u64, PendingClear)> = Vec::new();
        let resumed = state != LinkState::Syncing
            && applied > 0
            && consistent
            && self.seq.resume_streaming(self.to, applied + 1);
        // Acknowledgements arrive on the receive half, read from now on (also during a
        // resync: they tell the sequencer the replica is alive, which keeps writers
        // throttled rather than overflowing the journal). After a resync the copy is not
        // consistent until the replica says so again.
        let (ack_tx, mut ack_rx) = watch::channel(Acked {
            applied,
            consistent: consistent && resumed,
        });
        let seed_ready = Arc::new(tokio::sync::Notify::new());
        let reader = tokio::spawn(read_acks(
            recv,
            ack_tx,
            Arc::clone(&self.seq),
            self.to,
            Arc::clone(&self.report),
            Arc::clone(&seed_ready),
        ));
        let _reader = AbortOnDrop(reader);
        let mut from = if resumed {
            tracing::info!(cg = %self.seq.name, replica = self.to, from = applied + 1, "resuming replication from the journal");
            applied + 1
        } else {
            let initial = state == LinkState::Syncing || applied == 0;
            // A copy that lacks writes from before this host ordered the group (a replica
            // that lagged when the order was handed here): this host's dirty tracker only
            // knows its own tenure, so compare by hashes instead.
            let before_tenure = applied + 1 < self.seq.tenure_start();
            let seed = (initial || before_tenure) && holds_data;
            self.resync(&mut send, Some(&seed_ready), initial, seed, &mut pending)
                .await?
        };
        self.stream(&mut send, &mut from, &mut ack_rx, &mut pending)
            .await
    }

    fn link_state(&self) -> LinkState {
        self.seq.link_state(self.to).unwrap_or(LinkState::Syncing)
    }

    /// Records `state` in Raft (compare-and-set on the state this sender knows).
    async fn set_state(&self, state: LinkState) -> anyhow::Result<()> {
        let now = self.link_state();
        if now == state {
            return Ok(());
        }
        self.seq
            .reporter()
            .report(
                self.seq.name.clone(),
                self.cg_id(),
                self.seq.sequencer_epoch(),
                self.to,
                state,
                Some(now),
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot record link state {}: {e}", state.as_str()))?;
        self.seq.note_state(self.to, state);
        Ok(())
    }

    /// Starts recording the link `consistent`. An asynchronous link is recorded at once.
    /// For a synchronous one, writes start waiting for the replica now, and the commit
    /// waits until the replica holds every write made before that (see [`Promotion`]):
    /// only then is it true the moment it lands.
    /// `unsent` is how many writes the stream has yet to send.
    async fn begin_promotion(&self, unsent: u64) -> anyhow::Result<Option<Promotion>> {
        let synchronous = self
            .seq
            .link_status()
            .get(&self.to)
            .is_some_and(|l| l.mode.is_synchronous());
        if !synchronous {
            self.set_state(LinkState::Consistent).await?;
            tracing::info!(cg = %self.seq.name, replica = self.to, "replica is consistent");
            return Ok(None);
        }
        if unsent > PROMOTION_BACKLOG {
            // Not yet: guests' writes would wait behind the whole catch-up.
            return Ok(None);
        }
        Ok(Some(Promotion {
            from: self.link_state(),
            target: self.seq.begin_promotion(self.to),
            deadline: tokio::time::Instant::now() + PROMOTION_WAIT,
        }))
    }

    /// Moves a synchronous promotion on: commits `consistent` once the replica holds
    /// `target` (still a prefix, and no writer gave up on it meanwhile), gives up after
    /// [`PROMOTION_WAIT`]. Returns the promotion while it still waits.
    async fn advance_promotion(
        &self,
        p: Promotion,
        acked: u64,
        consistent: bool,
    ) -> anyhow::Result<Option<Promotion>> {
        if !consistent || !self.seq.promoting(self.to) {
            self.seq.end_promotion(self.to, None);
            return Ok(None);
        }
        if acked < p.target {
            if tokio::time::Instant::now() >= p.deadline {
                tracing::info!(cg = %self.seq.name, replica = self.to, acked, target = p.target, "promotion timed out: the replica did not catch up; trying again");
                self.seq.end_promotion(self.to, None);
                return Ok(None);
            }
            return Ok(Some(p));
        }
        // Checked and marked at once: a writer that gives up from here on waits for the
        // commit's outcome instead of being acknowledged while it may land.
        if !self.seq.commit_promotion(self.to) {
            self.seq.end_promotion(self.to, None);
            return Ok(None);
        }
        // However the commit ends (this future may be dropped with its session), its
        // outcome is settled: unknown counts as committed, so a writer that gave up
        // meanwhile has the link recorded `outdated` before it is acknowledged.
        let mut unsettled = CommitGuard {
            seq: &self.seq,
            to: self.to,
            armed: true,
        };
        let committed = self
            .seq
            .reporter()
            .report(
                self.seq.name.clone(),
                self.cg_id(),
                self.seq.sequencer_epoch(),
                self.to,
                LinkState::Consistent,
                Some(p.from),
            )
            .await;
        unsettled.armed = false;
        self.seq.end_promotion(self.to, Some(LinkState::Consistent));
        match committed {
            Ok(()) => {
                tracing::info!(cg = %self.seq.name, replica = self.to, acked, "replica is consistent");
                Ok(None)
            }
            // Perhaps committed after all (a timeout), perhaps refused: the next applied
            // model corrects the state either way.
            Err(e) => Err(anyhow::anyhow!("cannot record link state consistent: {e}")),
        }
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
        let mut next_mark = Instant::now();
        // Writes wait for the replica while a promotion runs; whatever way this returns,
        // they stop waiting unless it committed.
        let mut promotion = PromotionGuard {
            seq: &self.seq,
            to: self.to,
            running: None,
        };
        loop {
            let notified = self.seq.written.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let Acked {
                applied: acked,
                consistent,
            } = *acks.borrow_and_update();
            if acked > 0 {
                self.seq.acked(self.to, acked);
            }
            let last = self.seq.last_seq();
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
            promotion.running = match promotion.running.take() {
                Some(p) => self.advance_promotion(p, acked, consistent).await?,
                None if promote => self.begin_promotion(last.saturating_sub(*from)).await?,
                None => None,
            };
            self.clear_pending(pending, acked, consistent)?;
            // Periodically remember which dirty chunks the replica will hold once it acks
            // the current sequence, so streamed writes stop counting as dirty.
            if Instant::now() >= next_mark && consistent {
                self.mark_dirty(pending)?;
                next_mark = Instant::now() + Duration::from_secs(1);
            }

            match self.seq.journal_from(self.to, *from, FRAME_BYTES) {
                Err(()) => {
                    // Journal overflow: resync inline, then carry on streaming.
                    *from = self.resync(send, None, false, false, pending).await?;
                    report(&self.report).phase = "streaming".into();
                    continue;
                }
                Ok(writes) if !writes.is_empty() => {
                    let bytes: u64 = writes.iter().map(|w| w.payload.len()).sum();
                    if let Some(last) = writes.last() {
                        *from = last.seq + 1;
                    }
                    let msg = ToReplica::Writes {
                        epoch: self.seq.sequencer_epoch(),
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
        for (disk, image) in self.seq.images() {
            let set = image.dirty_chunks(&self.tracker)?;
            if set.chunks.is_empty() {
                continue;
            }
            // Every write reflected in `set` has a sequence at most this.
            let upto = self.seq.last_seq();
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
                if let Some(image) = self.seq.image(p.disk) {
                    image.clear(&self.tracker, &p.chunks, p.as_of)?;
                }
            } else {
                keep.push((upto, p));
            }
        }
        *pending = keep;
        Ok(())
    }

    /// Sends a resync and returns the sequence streaming continues from. Pass 1 sends, per
    /// disk: the chunks that differ by hash (`seed`, a first sync of a copy that holds
    /// data), every chunk holding data (another first sync), or the dirty chunks.
    /// `seed_ready` is needed for seeding (the replica confirms it let the delta sessions
    /// in).
    async fn resync(
        &self,
        send: &mut FramedSend,
        seed_ready: Option<&tokio::sync::Notify>,
        initial: bool,
        seed: bool,
        pending: &mut Vec<(u64, PendingClear)>,
    ) -> anyhow::Result<u64> {
        let _bulk = super::BulkTransfer::start(&self.bulk);
        let phase = match (initial, seed) {
            (_, true) => "seeding",
            (true, false) => "initial-sync",
            (false, false) => "resync",
        };
        tracing::info!(cg = %self.seq.name, replica = self.to, phase, "bringing the replica up to date from chunks");
        {
            let mut r = report(&self.report);
            r.phase = phase.into();
            r.resyncs += 1;
            r.resync_bytes_total = 0;
            r.resync_bytes_done = 0;
        }
        if !initial && self.link_state() == LinkState::Consistent {
            self.set_state(LinkState::Inconsistent).await?;
        }
        let epoch = self.seq.sequencer_epoch();
        send.send_frame(&convoy_codec::encode(&ToReplica::ResyncBegin { epoch })?)
            .await?;

        // Pass 1 while writes go on. Every write from here on marks the tracker after
        // `as_of`, so pass 2 finds it; and the journal keeps it too, while it has room, so
        // that replaying it replaces pass 2 (a 4 KiB write then costs 4 KiB, not the
        // whole chunk it dirtied).
        let early = self.seq.retain_during_resync(self.to);
        let mut sets = Vec::new();
        for (disk, image) in self.seq.images() {
            // The tracker's set: cleared once the replica holds what pass 1 read.
            let set = image.dirty_chunks(&self.tracker)?;
            sets.push((*disk, set.chunks, set.as_of));
        }
        if seed {
            let ready =
                seed_ready.ok_or_else(|| anyhow::anyhow!("seeding needs the stream's reader"))?;
            self.seed_by_hashes(send, ready, epoch).await?;
        } else if initial {
            // A fresh copy is all zeroes: every chunk that may hold data, found without
            // listing every chunk of the disk (holes are skipped by the file system).
            self.send_data_chunks(send, epoch).await?;
        } else {
            let dirty: Vec<(DiskId, Vec<u64>)> =
                sets.iter().map(|(d, c, _)| (*d, c.clone())).collect();
            self.send_chunks(send, &dirty, epoch, true).await?;
        }

        if self.seq.keep_retention(self.to) {
            // Every chunk was read before this sequence was assigned; the journal holds
            // every write since `early`, and replaying those in order over pass 1's chunks
            // leaves each byte at its latest value.
            let consistent_at = self.seq.next_seq();
            let end = ToReplica::ResyncEnd {
                epoch,
                resume_seq: early,
                consistent_at,
            };
            send.send_frame(&convoy_codec::encode(&end)?).await?;
            for (disk, chunks, as_of) in sets {
                pending.push((
                    consistent_at.saturating_sub(1),
                    PendingClear {
                        disk,
                        chunks,
                        as_of,
                    },
                ));
            }
            tracing::info!(cg = %self.seq.name, replica = self.to, from = early, "pass 1 done; replaying the journal kept since it began");
            return Ok(early);
        }

        // The journal filled up meanwhile. Switch: from here the journal holds this link's
        // writes, and pass 2 sends the chunks written during pass 1.
        let resume = self.seq.begin_streaming(self.to);
        let mut second = Vec::new();
        for (disk, image) in self.seq.images() {
            let set = image.dirty_chunks(&self.tracker)?;
            // Only what was written since pass 1 began: everything else pass 1 read
            // after its last write.
            let as_of = sets
                .iter()
                .find(|(d, _, _)| d == disk)
                .map(|(_, _, a)| *a)
                .unwrap_or(set.as_of);
            let since = image.dirty_since(&self.tracker, as_of)?;
            second.push((*disk, since, set.as_of));
        }
        let second_chunks: Vec<(DiskId, Vec<u64>)> =
            second.iter().map(|(d, c, _)| (*d, c.clone())).collect();
        self.send_chunks(send, &second_chunks, epoch, true).await?;
        // Every chunk was read before this sequence was assigned.
        let consistent_at = self.seq.next_seq();
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

    /// Pass 1 of a first sync of a copy that holds data: compare-delta sessions, disk by
    /// disk, while the replica lets them write its images.
    async fn seed_by_hashes(
        &self,
        send: &mut FramedSend,
        ready: &tokio::sync::Notify,
        epoch: u64,
    ) -> anyhow::Result<()> {
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        send.send_frame(&convoy_codec::encode(&ToReplica::SeedByHashes { epoch })?)
            .await?;
        // The replica confirms once it applied everything before and opened its images to
        // the delta sessions.
        tokio::time::timeout(Duration::from_secs(30), notified)
            .await
            .map_err(|_| anyhow::anyhow!("replica did not get ready for seeding within 30 s"))?;
        let cg = self.cg_id();
        report(&self.report).resync_bytes_total =
            self.seq.images().values().map(|image| image.size()).sum();
        for (disk, image) in self.seq.images() {
            let session = convoy_delta::Session {
                cg,
                disk: *disk,
                epoch,
            };
            let stats = convoy_delta::push(
                &self.endpoint,
                self.to,
                self.addr,
                session,
                convoy_delta::Mode::CompareDelta,
                Arc::clone(image),
                &convoy_delta::DeltaConfig::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("seeding disk {disk}: {e}"))?;
            let mut r = report(&self.report);
            r.resync_chunks_sent += stats.chunks_sent;
            r.bytes_sent += stats.data_bytes_sent;
            r.resync_bytes_sent += stats.data_bytes_sent;
            r.resync_bytes_done += image.size();
            tracing::info!(cg = %self.seq.name, replica = self.to, disk, chunks = stats.chunks_sent, compared = stats.chunks_total, "seeded a disk by hashes");
        }
        Ok(())
    }

    /// Sends every chunk of every disk that may hold data (a first sync to an empty copy).
    async fn send_data_chunks(&self, send: &mut FramedSend, epoch: u64) -> anyhow::Result<()> {
        // Counted first, so that progress has a total (holes are skipped, so this is cheap).
        let mut total = 0;
        for image in self.seq.images().values() {
            total += image.data_bytes()?;
        }
        report(&self.report).resync_bytes_total = total;
        for (disk, image) in self.seq.images() {
            let mut from = 0;
            loop {
                // A batch of data ranges at a time: never the whole disk's chunk list.
                let ranges: Vec<std::ops::Range<u64>> =
                    image.data_chunks(from).take(64).collect::<Result<_, _>>()?;
                let Some(last) = ranges.last() else { break };
                from = last.end;
                let chunks: Vec<u64> = ranges.into_iter().flatten().collect();
                for part in chunks.chunks(4096) {
                    self.send_chunks(send, &[(*disk, part.to_vec())], epoch, false)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Sends `sets`; `counts_toward_total` adds their bytes to the progress total (false
    /// when the caller counted the whole job first).
    async fn send_chunks(
        &self,
        send: &mut FramedSend,
        sets: &[(DiskId, Vec<u64>)],
        epoch: u64,
        counts_toward_total: bool,
    ) -> anyhow::Result<()> {
        let total: u64 = sets.iter().map(|(_, c)| c.len() as u64).sum();
        let mut bytes_total = 0;
        for (disk, chunks) in sets {
            if let Some(image) = self.seq.image(*disk) {
                bytes_total += chunks.len() as u64 * u64::from(image.geometry().chunk_size());
            }
        }
        {
            let mut r = report(&self.report);
            r.resync_chunks_left = total;
            if counts_toward_total {
                r.resync_bytes_total += bytes_total;
            }
        }
        for (disk, chunks) in sets {
            let Some(image) = self.seq.image(*disk) else {
                continue;
            };
            let chunk_size = u64::from(image.geometry().chunk_size());
            for group in chunks.chunks(CHUNKS_PER_FRAME) {
                let mut out = Vec::with_capacity(group.len());
                let mut bytes = 0;
                let mut covered = 0;
                for &c in group {
                    let offset = c * chunk_size;
                    let len = chunk_size.min(image.size() - offset) as usize;
                    covered += chunk_size;
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
                r.resync_bytes_sent += bytes;
                r.resync_bytes_done += covered;
            }
        }
        Ok(())
    }
}

/// A synchronous link's promotion to `consistent` under way.
#[derive(Clone, Copy, Debug)]
struct Promotion {
    /// The committed state it promotes from (compare-and-set in Raft).
    from: LinkState,
    /// The last sequence assigned before writes started waiting for the replica.
    target: u64,
    deadline: tokio::time::Instant,
}

/// Ends a promotion still running when the stream stops, so writes stop waiting for a
/// replica that was never recorded consistent.
struct PromotionGuard<'a> {
    seq: &'a Sequencer,
    to: NodeId,
    running: Option<Promotion>,
}

impl Drop for PromotionGuard<'_> {
    fn drop(&mut self) {
        if self.running.take().is_some() {
            self.seq.end_promotion(self.to, None);
        }
    }
}

/// Settles a promotion whose `consistent` commit was dropped in flight (see
/// [`LinkSender::advance_promotion`]).
struct CommitGuard<'a> {
    seq: &'a Sequencer,
    to: NodeId,
    armed: bool,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.seq.end_promotion(self.to, Some(LinkState::Consistent));
        }
    }
}

/// Aborts a task when dropped (the ack reader ends with its session, whatever the path).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The replica's latest acknowledgement.
#[derive(Clone, Copy, Debug)]
struct Acked {
    /// Data durable through this sequence.
    applied: u64,
    /// Whether the copy is a consistent prefix.
    consistent: bool,
}

/// Reads the replica's acknowledgements into `tx` until the stream ends. Synchronous
/// writers are released from here directly, without a hop through the sender's loop.
async fn read_acks(
    mut recv: FramedRecv,
    tx: watch::Sender<Acked>,
    seq: Arc<Sequencer>,
    to: NodeId,
    report_to: Arc<Mutex<LinkReport>>,
    seed_ready: Arc<tokio::sync::Notify>,
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
                consistent,
                ..
            }) => {
                seq.acked(to, applied_seq);
                let _ = tx.send(Acked {
                    applied: applied_seq,
                    consistent,
                });
            }
            Ok(FromReplica::SeedReady) => seed_ready.notify_one(),
            Ok(FromReplica::Refused { reason }) => {
                tracing::warn!(%reason, "replica refused the stream");
                let mut r = report(&report_to);
                r.last_error = Some(format!("replica refused: {reason}"));
                r.refusal = Some(reason);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame from replica");
                return;
            }
        }
    }
}
