//! The write pipeline of one write domain (a consistency group, or a VM in no group): the
//! group's *sequencer*.
//!
//! Every guest write (NBD or simulated guest) gets the next sequence number of its group
//! and is applied to the local image under one lock, so the local image always changes in
//! sequence order and a replica applying the same writes in the same order ends in the same
//! state. Then, by the replication mode of each link:
//! - async: the write is acknowledged now; the link's sender streams the journal;
//! - sync: the write is acknowledged once the replica has it durably; if the replica does
//!   not answer within the sync timeout, the link is first recorded `outdated` in Raft (so
//!   no failover picks a copy that lacks acknowledged writes) and then writes go on.
//!
//! Sequence numbers survive restarts: blocks of them are reserved durably ahead of use, so
//! a restarted primary never reuses a number a replica may have applied.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use convoy_raft::model::{DiskId, LinkState, NodeId, ReplicationMode};
use convoy_store::DiskImage;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use super::journal::Journal;
use super::wire::{Payload, WireWrite};

/// Sequence numbers reserved per durable write of the reservation file.
const SEQ_BLOCK: u64 = 1 << 20;

/// Errors of the write path. Each maps to an NBD errno for the guest.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The writer's epoch is older than the disk's: another host owns the disk now.
    #[error(
        "stale epoch {writer} (disk is at {current}): this copy was fenced; the write was refused"
    )]
    StaleEpoch {
        /// Epoch the writer holds.
        writer: u64,
        /// Current epoch.
        current: u64,
    },
    /// The disk is not part of this pipeline.
    #[error("disk {0} is not served by this pipeline")]
    UnknownDisk(DiskId),
    /// Local storage failed.
    #[error("local storage: {0}")]
    Store(#[from] convoy_store::StoreError),
    /// The sequence reservation file could not be read or written.
    #[error("sequence reservation: {0}")]
    Meta(String),
    /// The pipeline was shut down (VM moved or deleted).
    #[error("the pipeline is shut down")]
    Closed,
    /// A synchronous replica neither acknowledged nor could be marked outdated.
    #[error(
        "synchronous replica on node {node} did not acknowledge and could not be marked outdated: {reason}"
    )]
    SyncFailed {
        /// Replica host.
        node: NodeId,
        /// What failed.
        reason: String,
    },
}

/// Records link states in Raft (implemented by the agent over its cluster service).
pub trait LinkReporter: Send + Sync + 'static {
    /// Commits `state` for the link of group `cg` to `to`; resolves once committed.
    fn report(
        &self,
        cg: String,
        to: NodeId,
        state: LinkState,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// Acknowledgement waits of the synchronous replicas a write must wait for.
type SyncWaits = Vec<(NodeId, oneshot::Receiver<()>)>;

/// Durable reservation of sequence numbers.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SeqReservation {
    /// Every number below this may have been used.
    reserved_until: u64,
}

/// Per-link state the pipeline keeps for its sender and for synchronous writers.
#[derive(Debug)]
pub struct LinkRuntime {
    /// Replication mode.
    pub mode: ReplicationMode,
    /// Last state known to be committed in Raft.
    pub state: LinkState,
    /// While streaming: the journal must keep writes from this sequence on.
    pub retain_from: Option<u64>,
    /// Set when the journal overflowed and stopped holding this link's writes.
    pub overflowed: bool,
    /// Highest sequence the replica holds durably.
    acked: u64,
    /// Synchronous writers waiting for `acked` to reach their sequence, in sequence order.
    /// Each is woken alone when its write is acknowledged (a broadcast to all of them per
    /// acknowledgement cost 32 wake-ups per batch at queue depth 32).
    ack_waiters: VecDeque<(u64, oneshot::Sender<()>)>,
    /// Highest sequence the replica's progress record holds: it resumes from here after a
    /// crash, so the journal keeps what lies above it.
    recorded: u64,
}

impl LinkRuntime {
    fn new(mode: ReplicationMode, state: LinkState) -> Self {
        Self {
            mode,
            state,
            retain_from: None,
            overflowed: false,
            acked: 0,
            ack_waiters: VecDeque::new(),
            recorded: 0,
        }
    }

    /// Whether writes wait for this replica.
    fn waits(&self) -> bool {
        // While streaming, every write reaches the replica in order: wait for it unless the
        // link was given up on (outdated) in Raft.
        self.mode.is_synchronous()
            && self.retain_from.is_some()
            && self.state != LinkState::Outdated
    }
}

struct Inner {
    next_seq: u64,
    reserved_until: u64,
    journal: Journal,
    links: BTreeMap<NodeId, LinkRuntime>,
    closed: bool,
}

/// Counters for status output and metrics.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Writes acknowledged.
    pub writes: AtomicU64,
    /// Bytes written by guests.
    pub bytes: AtomicU64,
    /// Writes refused for a stale epoch.
    pub stale_epoch: AtomicU64,
}

/// One write domain's sequencer.
pub struct Pipeline {
    /// Group id (0 for a VM in no group).
    pub cg_id: u64,
    /// Group name, or `vm:<name>` for a VM in no group.
    pub name: String,
    images: BTreeMap<DiskId, Arc<DiskImage>>,
    inner: Mutex<Inner>,
    epoch: AtomicU64,
    seq_path: PathBuf,
    /// Woken after every write, for the senders.
    pub written: Notify,
    reporter: Arc<dyn LinkReporter>,
    sync_timeout: Duration,
    /// Counters.
    pub stats: PipelineStats,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pipeline {
    /// Opens the pipeline for `images`, continuing the sequence recorded at `seq_path`.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        cg_id: u64,
        name: String,
        images: BTreeMap<DiskId, Arc<DiskImage>>,
        epoch: u64,
        seq_path: PathBuf,
        journal_limit: u64,
        sync_timeout: Duration,
        reporter: Arc<dyn LinkReporter>,
    ) -> Result<Arc<Self>, WriteError> {
        let reservation: SeqReservation = convoy_codec::file::read_record(&seq_path)
            .map_err(|e| WriteError::Meta(e.to_string()))?
            .unwrap_or_default();
        let next_seq = reservation.reserved_until.max(1);
        Ok(Arc::new(Self {
            cg_id,
            name,
            images,
            inner: Mutex::new(Inner {
                next_seq,
                reserved_until: next_seq,
                journal: Journal::new(next_seq, journal_limit),
                links: BTreeMap::new(),
                closed: false,
            }),
            epoch: AtomicU64::new(epoch),
            seq_path,
            written: Notify::new(),
            reporter,
            sync_timeout,
            stats: PipelineStats::default(),
        }))
    }

    /// The image of `disk`.
    pub fn image(&self, disk: DiskId) -> Option<&Arc<DiskImage>> {
        self.images.get(&disk)
    }

    /// All images, by disk.
    pub fn images(&self) -> &BTreeMap<DiskId, Arc<DiskImage>> {
        &self.images
    }

    /// The current fencing epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Raises the epoch (never lowers it).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::SeqCst);
    }

    /// The next sequence number to be assigned.
    pub fn next_seq(&self) -> u64 {
        lock(&self.inner).next_seq
    }

    /// Runs `f` with writes held back (blocking: call from a blocking thread). Every write
    /// acknowledged before is in the images, none is in flight and none starts until `f`
    /// returns, so what `f` sees of all the group's disks is one crash-consistent point.
    /// Returns `f`'s result and the last sequence number that point contains.
    pub fn with_writes_paused<T>(
        &self,
        f: impl FnOnce(&BTreeMap<DiskId, Arc<DiskImage>>) -> T,
    ) -> (T, u64) {
        let g = lock(&self.inner);
        let last = g.next_seq - 1;
        let out = f(&self.images);
        drop(g);
        (out, last)
    }

    /// Stops accepting writes (VM moved or deleted).
    pub fn close(&self) {
        lock(&self.inner).closed = true;
    }

    /// Makes the pipeline's links match the model: adds, removes and updates modes/states.
    /// New links start without journal retention (their sender syncs them first).
    pub fn set_links(&self, links: &[(NodeId, ReplicationMode, LinkState)]) {
        let mut g = lock(&self.inner);
        g.links
            .retain(|to, _| links.iter().any(|(t, _, _)| t == to));
        for (to, mode, state) in links {
            let link = g
                .links
                .entry(*to)
                .or_insert_with(|| LinkRuntime::new(*mode, *state));
            link.mode = *mode;
            link.state = *state;
        }
        Self::trim(&mut g);
    }

    /// Mode and state of each link, and what the replica acknowledged.
    pub fn link_status(&self) -> Vec<(NodeId, ReplicationMode, LinkState, u64, bool)> {
        let g = lock(&self.inner);
        g.links
            .iter()
            .map(|(to, l)| (*to, l.mode, l.state, l.acked, l.retain_from.is_some()))
            .collect()
    }

    /// Sequences `write` and applies it locally (blocking: call from a blocking thread).
    /// Returns its sequence number and the acknowledgement waits of synchronous links.
    fn sequence_local(
        &self,
        disk: DiskId,
        offset: u64,
        payload: Payload,
    ) -> Result<(u64, SyncWaits), WriteError> {
        let image = self
            .images
            .get(&disk)
            .ok_or(WriteError::UnknownDisk(disk))?;
        let mut g = lock(&self.inner);
        if g.closed {
            return Err(WriteError::Closed);
        }
        let seq = g.next_seq;
        if seq >= g.reserved_until {
            let reserved_until = seq + SEQ_BLOCK;
            convoy_codec::file::write_record(&self.seq_path, &SeqReservation { reserved_until })
                .map_err(|e| WriteError::Meta(e.to_string()))?;
            g.reserved_until = reserved_until;
        }
        // Applying under the lock keeps the local image in sequence order.
        match &payload {
            Payload::Data(b) => image.write_at(b, offset)?,
            Payload::Zeroes(n) => image.write_zeroes(offset, *n)?,
        }
        g.next_seq += 1;
        let retaining = g.links.values().any(|l| l.retain_from.is_some());
        if retaining {
            let w = WireWrite {
                seq,
                disk,
                offset,
                payload,
            };
            if g.journal.push(w).is_err() {
                // Cannot happen: pushes are serialised here. Treat as overflow to be safe.
                g.journal.reset(seq + 1);
            }
            if g.journal.over_limit() {
                Self::drop_laggards(&mut g);
            }
        } else {
            g.journal.reset(seq + 1);
        }
        let waits = g
            .links
            .iter_mut()
            .filter(|(_, l)| l.waits())
            .map(|(to, l)| {
                let (tx, rx) = oneshot::channel();
                l.ack_waiters.push_back((seq, tx));
                (*to, rx)
            })
            .collect();
        Ok((seq, waits))
    }

    /// The journal is over its limit: stop retaining for the replica furthest behind (it
    /// will resync from dirty chunks) until the journal fits again.
    fn drop_laggards(g: &mut Inner) {
        while g.journal.over_limit() {
            let slowest = g
                .links
                .iter()
                .filter(|(_, l)| l.retain_from.is_some())
                .min_by_key(|(_, l)| l.acked)
                .map(|(to, _)| *to);
            let Some(to) = slowest else { break };
            if let Some(link) = g.links.get_mut(&to) {
                tracing::warn!(
                    replica = to,
                    "journal limit reached: replica falls back to a dirty-chunk resync"
                );
                link.retain_from = None;
                link.overflowed = true;
            }
            Self::trim(g);
        }
    }

    /// Drops journal entries every retaining link has acknowledged.
    fn trim(g: &mut Inner) {
        let keep_from = g
            .links
            .values()
            .filter_map(|l| l.retain_from.map(|from| from.max(l.recorded + 1)))
            .min();
        match keep_from {
            Some(from) => g.journal.trim_through(from.saturating_sub(1)),
            None => {
                let next = g.next_seq;
                g.journal.reset(next);
            }
        }
    }

    /// A guest write: sequenced, applied locally, replicated per mode. Returns the sequence
    /// number once the write is as durable as the mode promises (and, with `fua`, durable
    /// locally).
    pub async fn write(
        self: &Arc<Self>,
        disk: DiskId,
        offset: u64,
        payload: Payload,
        fua: bool,
        writer_epoch: u64,
    ) -> Result<u64, WriteError> {
        let current = self.epoch();
        if writer_epoch < current {
            self.stats.stale_epoch.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("convoy_stale_epoch_refused_total", "where" => "local").increment(1);
            return Err(WriteError::StaleEpoch {
                writer: writer_epoch,
                current,
            });
        }
        let len = payload.len();
        // A page-cache write takes microseconds: done right on this runtime worker, as
        // any hand-off to another thread costs more than the write. Outside a
        // multi-threaded runtime (unit tests) fall back to the blocking pool.
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let (seq, waits) = if multi {
            self.sequence_local(disk, offset, payload)?
        } else {
            let this = Arc::clone(self);
            tokio::task::spawn_blocking(move || this.sequence_local(disk, offset, payload))
                .await
                .map_err(|_| WriteError::Closed)??
        };
        self.written.notify_waiters();
        for (to, acked) in waits {
            // An error means the link is gone (its waiters dropped): treated as no answer.
            let reached = matches!(
                tokio::time::timeout(self.sync_timeout, acked).await,
                Ok(Ok(()))
            );
            if !reached {
                self.outdate(to).await?;
            }
        }
        if fua {
            self.flush_disk(disk).await?;
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(seq)
    }

    /// A synchronous replica did not answer in time: record it `outdated` in Raft before any
    /// write it lacks is acknowledged, then stop waiting for it.
    async fn outdate(&self, to: NodeId) -> Result<(), WriteError> {
        let already = lock(&self.inner)
            .links
            .get(&to)
            .is_none_or(|l| l.state == LinkState::Outdated);
        if !already {
            tracing::warn!(cg = %self.name, replica = to, "synchronous replica did not acknowledge in time: marking it outdated");
            self.reporter
                .report(self.name.clone(), to, LinkState::Outdated)
                .await
                .map_err(|reason| WriteError::SyncFailed { node: to, reason })?;
            let mut g = lock(&self.inner);
            if let Some(link) = g.links.get_mut(&to) {
                link.state = LinkState::Outdated;
            }
        }
        Ok(())
    }

    /// Makes every acknowledged write to `disk` durable locally.
    pub async fn flush_disk(&self, disk: DiskId) -> Result<(), WriteError> {
        let image = Arc::clone(
            self.images
                .get(&disk)
                .ok_or(WriteError::UnknownDisk(disk))?,
        );
        image.flush_async().await?;
        Ok(())
    }

    /// Reads from the local image.
    pub async fn read(&self, disk: DiskId, offset: u64, len: usize) -> Result<Bytes, WriteError> {
        let image = Arc::clone(
            self.images
                .get(&disk)
                .ok_or(WriteError::UnknownDisk(disk))?,
        );
        Ok(image.read_async(offset, len).await?)
    }

    // ---- for the link senders ----

    /// Starts journal retention for link `to` from the next write on; returns that sequence.
    pub fn begin_streaming(&self, to: NodeId) -> u64 {
        let mut g = lock(&self.inner);
        let next = g.next_seq;
        if g.journal.first_seq() > next || g.links.values().all(|l| l.retain_from.is_none()) {
            g.journal.reset(next);
        }
        if let Some(link) = g.links.get_mut(&to) {
            link.retain_from = Some(next);
            link.overflowed = false;
        }
        next
    }

    /// Resumes streaming for `to` from `from` if the journal still holds it.
    pub fn resume_streaming(&self, to: NodeId, from: u64) -> bool {
        let mut g = lock(&self.inner);
        if from < g.journal.first_seq() || from > g.next_seq {
            return false;
        }
        // With no retaining link the journal holds nothing; `from` must be exactly next.
        if g.links.values().all(|l| l.retain_from.is_none()) && from != g.next_seq {
            return false;
        }
        if let Some(link) = g.links.get_mut(&to) {
            link.retain_from = Some(from);
            link.overflowed = false;
            true
        } else {
            false
        }
    }

    /// The link's stream broke: keep holding what the replica has not acknowledged, so a
    /// reconnect resumes from the journal (until the journal limit drops the link into a
    /// resync).
    pub fn pause_streaming(&self, to: NodeId) {
        let mut g = lock(&self.inner);
        if let Some(link) = g.links.get_mut(&to) {
            if link.retain_from.is_some() {
                link.retain_from = Some(link.recorded + 1);
            }
        }
        Self::trim(&mut g);
    }

    /// Stops retaining for `to` (link removed or sender stopped).
    pub fn stop_streaming(&self, to: NodeId) {
        let mut g = lock(&self.inner);
        if let Some(link) = g.links.get_mut(&to) {
            link.retain_from = None;
        }
        Self::trim(&mut g);
    }

    /// Journal writes for `to` from `from`: `Ok(writes)` (possibly empty), or `Err(())` if
    /// the link lost its retention (journal overflow): resync needed.
    #[allow(clippy::result_unit_err)]
    pub fn journal_from(
        &self,
        to: NodeId,
        from: u64,
        max_bytes: u64,
    ) -> Result<Vec<WireWrite>, ()> {
        let g = lock(&self.inner);
        match g.links.get(&to) {
            Some(l) if l.retain_from.is_some() => g.journal.read_from(from, max_bytes).ok_or(()),
            _ => Err(()),
        }
    }

    /// The replica on `to` holds everything through `seq` durably.
    pub fn acked(&self, to: NodeId, seq: u64) {
        let mut g = lock(&self.inner);
        if let Some(link) = g.links.get_mut(&to) {
            link.acked = link.acked.max(seq);
            while link
                .ack_waiters
                .front()
                .is_some_and(|(waiting, _)| *waiting <= link.acked)
            {
                if let Some((_, tx)) = link.ack_waiters.pop_front() {
                    // The writer may have timed out and gone: nothing to tell then.
                    let _ = tx.send(());
                }
            }
        }
        Self::trim(&mut g);
    }

    /// The replica on `to` recorded its progress durably through `seq`: the journal may
    /// drop what lies at or below it.
    pub fn recorded(&self, to: NodeId, seq: u64) {
        let mut g = lock(&self.inner);
        if let Some(link) = g.links.get_mut(&to) {
            link.recorded = link.recorded.max(seq);
        }
        Self::trim(&mut g);
    }

    /// Records a link state committed in Raft.
    pub fn note_state(&self, to: NodeId, state: LinkState) {
        if let Some(link) = lock(&self.inner).links.get_mut(&to) {
            link.state = state;
        }
    }

    /// The reporter, for senders.
    pub fn reporter(&self) -> &Arc<dyn LinkReporter> {
        &self.reporter
    }

    /// Sequence assigned last (0 if none).
    pub fn last_seq(&self) -> u64 {
        lock(&self.inner).next_seq - 1
    }
}
