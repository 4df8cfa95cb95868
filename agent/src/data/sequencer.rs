//! The sequencer of one write domain (a consistency group, or a VM in no group): the one
//! place that orders the domain's writes.
//!
//! Every write (a local guest's, or one mirrored from a VM running on another host) gets
//! the next sequence number of its domain and is applied to the local image under one
//! lock, so the local images always change in sequence order and a replica applying the
//! same writes in the same order ends in the same state. The epoch of the written disk is
//! checked inside that critical section, so once a fence is applied here no write carrying
//! the old epoch is sequenced. Then, by each link's promise:
//! - a link that does not promise (async, or not consistent): the write is acknowledged
//!   now; the link's sender streams the journal;
//! - a link that promises (a synchronous link recorded `consistent` in Raft, or one being
//!   promoted to it): the write is acknowledged only once that replica has it durably, or
//!   after Raft has committed that the link no longer promises it (`outdated`). Nothing is
//!   ever acknowledged in between: that is DRBD's `fencing resource-only`.
//!
//! A replica that lags but keeps up (connected, acknowledging) slows writers down rather
//! than falling into a resync: writers wait while the journal is above its high-water mark.
//!
//! Sequence numbers survive restarts: blocks of them are reserved durably ahead of use, so
//! a restarted sequencer never reuses a number a replica may have applied. After a
//! hand-over the new sequencer continues exactly at the sequence the model recorded.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_raft::model::{DiskId, DomainId, LinkState, NodeId, ReplicationMode};
use convoy_store::DiskImage;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot, watch};

use super::journal::Journal;
use super::wire::{Payload, WireWrite};

/// Sequence numbers reserved per durable write of the reservation file.
const SEQ_BLOCK: u64 = 1 << 20;
/// Schema version of the reservation record (version 1 had no tenure and was keyed by the
/// domain's name).
const SEQ_RECORD_VERSION: u8 = 2;

/// Errors of the write path. Each maps to an NBD errno for the guest.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The writer's epoch is older than the disk's: the disk was fenced or its VM moved.
    #[error(
        "stale epoch {writer} (disk is at {current}): this writer was fenced; the write was refused"
    )]
    StaleEpoch {
        /// Epoch the writer holds.
        writer: u64,
        /// Current epoch.
        current: u64,
    },
    /// The disk is not part of this domain.
    #[error("disk {0} is not served by this sequencer")]
    UnknownDisk(DiskId),
    /// Local storage failed.
    #[error("local storage: {0}")]
    Store(#[from] convoy_store::StoreError),
    /// The sequence reservation file could not be read or written.
    #[error("sequence reservation: {0}")]
    Meta(String),
    /// The sequencer was shut down (domain deleted, agent stopping).
    #[error("the sequencer is shut down")]
    Closed,
    /// The domain's order was handed to another host; the write was not sequenced here and
    /// may be sent to the new sequencer.
    #[error("this host no longer orders the group's writes; the write was not applied")]
    Moved,
    /// Writes stayed paused (a hand-over or fence in progress) for too long.
    #[error("writes have been paused for {0:?}; the write was not applied")]
    PausedTooLong(Duration),
    /// A promising replica neither acknowledged nor could be marked outdated.
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

impl WriteError {
    /// Whether the write was certainly not applied, so the writer may send it again
    /// (to this sequencer after a pause, or to the new one after a hand-over).
    pub fn not_applied(&self) -> bool {
        matches!(
            self,
            WriteError::Moved
                | WriteError::PausedTooLong(_)
                | WriteError::StaleEpoch { .. }
                | WriteError::UnknownDisk(_)
        )
    }
}

/// Records link states in Raft (implemented by the agent over its cluster service).
pub trait LinkReporter: Send + Sync + 'static {
    /// Commits `state` for the link of group `cg` (id `cg_id`) to `to`, if the link is in
    /// `expect` now (when given) and this host still orders the group in
    /// `sequencer_epoch`; resolves once committed.
    fn report(
        &self,
        cg: String,
        cg_id: u64,
        sequencer_epoch: u64,
        to: NodeId,
        state: LinkState,
        expect: Option<LinkState>,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// The durable reservation record, at [`SEQ_RECORD_VERSION`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SeqRecord {
    /// The sequence this host's current tenure as sequencer began at (the model's
    /// `seq_start`; 0 for a group's first sequencer).
    tenure_start: u64,
    /// Every number below this may have been used in that tenure.
    reserved_until: u64,
}

/// Schema version of the lag record.
const LAG_RECORD_VERSION: u8 = 1;
/// How often a sequencer records what it knows of its links' lag (when it changed).
pub const LAG_RECORD_INTERVAL: Duration = Duration::from_secs(1);

/// What a sequencer last knew of its replicas, kept beside the reservation record so a
/// restarted sequencer still reports a replica's lag truthfully: what it acknowledged,
/// since when it lacks writes, and which sequence numbers were really used before the
/// restart (the restart skips to the end of the reserved block).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct LagRecord {
    /// The tenure it belongs to (a record of another tenure is ignored).
    tenure_start: u64,
    /// Last sequence assigned when it was written.
    last_seq: u64,
    /// Per replica host.
    links: BTreeMap<NodeId, LinkLagRecord>,
}

/// One link in a [`LagRecord`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct LinkLagRecord {
    /// Highest sequence the replica acknowledged.
    acked: u64,
    /// When it last held every write (milliseconds since the Unix epoch).
    held_all_unix_ms: u64,
}

/// Where a domain's lag record lives.
pub fn lag_record_path(replication_dir: &Path, domain: DomainId) -> PathBuf {
    replication_dir.join(format!("{}.lag", domain.key()))
}

fn unix_ms(at: Instant) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(at.elapsed()).as_millis() as u64
}

fn instant_of_unix_ms(ms: u64) -> Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ago = now.saturating_sub(Duration::from_millis(ms));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

fn read_lag_record(path: &Path) -> Option<LagRecord> {
    let bytes = convoy_codec::file::read_bytes(path).ok()??;
    let (version, body) = convoy_codec::split_version(&bytes).ok()?;
    (version == LAG_RECORD_VERSION)
        .then(|| convoy_codec::decode_body(body).ok())
        .flatten()
}

/// Version 1 of the reservation record.
#[derive(Deserialize)]
struct SeqRecordV1 {
    reserved_until: u64,
}

/// Where a domain's reservation record lives (keyed by id: names may be reused).
pub fn seq_record_path(replication_dir: &Path, domain: DomainId) -> PathBuf {
    replication_dir.join(format!("{}.seq", domain.key()))
}

/// Where version 1 kept it: keyed by the domain's name (`shop.seq`, `vm-web.seq`).
pub fn legacy_seq_record_path(replication_dir: &Path, name: &str) -> PathBuf {
    replication_dir.join(format!("{}.seq", name.replace(':', "-")))
}

/// Above every sequence number any domain of this host reserved (its `*.seq` records):
/// the least first sequence of a domain that does not continue another host's tenure.
/// A group deleted and created again over the same disks, or a VM leaving or joining a
/// group, gets a new domain whose numbers must not repeat the old one's: the guest's
/// acknowledged-write log and its checker order a VM's writes by them. Unreadable records
/// are skipped (their domain's own open reports them). Blocking.
pub fn host_sequence_floor(replication_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(replication_dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seq"))
        .filter_map(|p| read_seq_record(&p).ok().flatten())
        .map(|r| r.reserved_until)
        .max()
        .unwrap_or(0)
}

fn read_seq_record(path: &Path) -> Result<Option<SeqRecord>, WriteError> {
    let meta = |e: String| WriteError::Meta(format!("{}: {e}", path.display()));
    let Some(bytes) = convoy_codec::file::read_bytes(path).map_err(|e| meta(e.to_string()))? else {
        return Ok(None);
    };
    let (version, body) = convoy_codec::split_version(&bytes).map_err(|e| meta(e.to_string()))?;
    match version {
        SEQ_RECORD_VERSION => convoy_codec::decode_body(body)
            .map(Some)
            .map_err(|e| meta(e.to_string())),
        1 => {
            // Version 1: no hand-overs existed, so its tenure began with the group.
            let v1: SeqRecordV1 =
                convoy_codec::decode_body(body).map_err(|e| meta(e.to_string()))?;
            Ok(Some(SeqRecord {
                tenure_start: 0,
                reserved_until: v1.reserved_until,
            }))
        }
        other => Err(meta(format!("unsupported record version {other}"))),
    }
}

/// The first sequence number a sequencer opening now may assign: after a restart within
/// the same tenure, past everything reserved (and so perhaps used); after a hand-over,
/// exactly where the model says the new tenure begins; for a new domain, 1.
fn first_sequence(record: Option<SeqRecord>, seq_start: u64) -> u64 {
    match record {
        Some(r) if r.tenure_start == seq_start => r.reserved_until.max(seq_start).max(1),
        _ => seq_start.max(1),
    }
}

/// Whether writes are being taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    /// Writes wait (a hand-over in progress).
    Paused,
    /// The order moved to another host: waiting and new writes get [`WriteError::Moved`].
    HandedOver,
    /// Shut down.
    Closed,
}

/// Per-link state the sequencer keeps for its sender and for promising writes.
#[derive(Debug)]
pub struct LinkRuntime {
    /// Replication mode.
    pub mode: ReplicationMode,
    /// Last state known to be committed in Raft.
    pub state: LinkState,
    /// A promotion to `consistent` is under way: writes wait for this replica as if it were
    /// consistent, so nothing is acknowledged without it between the check and the commit.
    promoting: bool,
    /// The promotion's `consistent` is being committed in Raft: a writer that gives up
    /// waiting for the replica now waits for the outcome (see [`Sequencer::outdate`]).
    committing: bool,
    /// While streaming: the journal must keep writes from this sequence on.
    pub retain_from: Option<u64>,
    /// A sender session is connected and streaming.
    connected: bool,
    /// The retention is a resync's: kept while pass 1 runs so the journal can replace
    /// pass 2, but the first to go when the journal fills, and never a reason to slow
    /// writers.
    soft: bool,
    /// Set when the journal overflowed and stopped holding this link's writes.
    pub overflowed: bool,
    /// Highest sequence the replica holds durably.
    acked: u64,
    /// When `acked` last moved (for telling a slow replica from a stuck one).
    acked_at: Instant,
    /// The last moment the replica held every write (its RPO in time is the time since).
    held_all_at: Instant,
    /// Writers waiting for `acked` to reach their sequence, in sequence order. Each is
    /// woken alone when its write is acknowledged.
    ack_waiters: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl LinkRuntime {
    fn new(mode: ReplicationMode, state: LinkState) -> Self {
        Self {
            mode,
            state,
            promoting: false,
            committing: false,
            retain_from: None,
            connected: false,
            soft: false,
            overflowed: false,
            acked: 0,
            acked_at: Instant::now(),
            held_all_at: Instant::now(),
            ack_waiters: VecDeque::new(),
        }
    }

    /// Whether writes must wait for this replica before they are acknowledged.
    fn promises(&self) -> bool {
        self.mode.is_synchronous() && (self.state == LinkState::Consistent || self.promoting)
    }
}

/// A snapshot of one link, for senders and status.
#[derive(Clone, Copy, Debug)]
pub struct LinkStatus {
    /// Mode.
    pub mode: ReplicationMode,
    /// Committed state.
    pub state: LinkState,
    /// Highest sequence the replica holds durably.
    pub acked: u64,
    /// Whether the journal retains this link's writes.
    pub retaining: bool,
    /// Writes the replica lacks (sequence numbers a restart skipped are not writes).
    pub lag_writes: u64,
    /// Seconds since the replica last held every write (0 while it does).
    pub lag_seconds: f64,
    /// Bytes the replica lacks, as replication would send them (data, or a descriptor
    /// for zeroes), if the journal still holds every write it lacks.
    pub lag_bytes: Option<u64>,
}

struct Inner {
    next_seq: u64,
    reserved_until: u64,
    journal: Journal,
    links: BTreeMap<NodeId, LinkRuntime>,
    run: RunState,
    /// Writes sequenced and not yet completed, per (disk, epoch they carried).
    in_flight: BTreeMap<(DiskId, u64), usize>,
}

/// Counters for status output and metrics.
#[derive(Debug, Default)]
pub struct SequencerStats {
    /// Writes acknowledged.
    pub writes: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// Writes refused for a stale epoch.
    pub stale_epoch: AtomicU64,
    /// Times writers waited for a lagging replica (backpressure).
    pub throttled: AtomicU64,
}

/// One disk of the domain.
struct DiskSlot {
    image: Arc<DiskImage>,
    epoch: AtomicU64,
}

/// Settings of a sequencer.
#[derive(Clone, Debug)]
pub struct SequencerConfig {
    /// Journal byte limit; a replica further behind (and not keeping up) resyncs.
    pub journal_limit: u64,
    /// How long a promising replica may take to acknowledge before it is outdated.
    pub sync_timeout: Duration,
}

/// One write domain's sequencer.
pub struct Sequencer {
    /// The domain.
    pub domain: DomainId,
    /// Group name, or `vm:<name>` for a VM in no group.
    pub name: String,
    disks: BTreeMap<DiskId, DiskSlot>,
    images: BTreeMap<DiskId, Arc<DiskImage>>,
    inner: Mutex<Inner>,
    sequencer_epoch: AtomicU64,
    seq_path: PathBuf,
    tenure_start: u64,
    /// For a domain this host never sequenced before (no record, not a hand-over): the
    /// number below its first one. Every replica holds all of the domain's writes through
    /// it (there are none), so new links start acknowledged there and their lag counts
    /// only this domain's writes. 0 otherwise: what a replica holds is unknown until it
    /// answers.
    held_by_all: u64,
    /// The first sequence this run of the sequencer assigns.
    run_start: u64,
    /// The last sequence known to have been used before this run (a restart skips the
    /// rest of the reserved block: numbers above it and below `run_start` took no write).
    used_before_run: u64,
    /// Links as the previous run last recorded them, taken by the first `set_links`.
    restored: Mutex<Option<BTreeMap<NodeId, LinkLagRecord>>>,
    /// Where the lag record lives, and what was last written there.
    lag_path: Option<PathBuf>,
    lag_written: Mutex<Option<LagRecord>>,
    /// Woken after every write, for the senders.
    pub written: Notify,
    /// Woken whenever the journal shrinks or an in-flight write completes.
    progress: Notify,
    run: watch::Sender<RunState>,
    reporter: Arc<dyn LinkReporter>,
    cfg: SequencerConfig,
    /// Counters.
    pub stats: SequencerStats,
    /// Held through a hand-over: pauses do not nest, so a second hand-over (a new
    /// coordinator asking again while the first still runs) must wait for the first to
    /// end, or the first one's resume would release the second one's pause.
    pub hand_over_turn: tokio::sync::Mutex<()>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Acknowledgement waits of the promising replicas a write must wait for.
type SyncWaits = Vec<(NodeId, oneshot::Receiver<()>)>;

/// Decrements the in-flight count of a sequenced write when it completes (or is dropped).
struct InFlight<'a> {
    seq: &'a Sequencer,
    key: (DiskId, u64),
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut g = lock(&self.seq.inner);
        if let Some(n) = g.in_flight.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                g.in_flight.remove(&self.key);
            }
        }
        drop(g);
        self.seq.progress.notify_waiters();
    }
}

/// Where a sequencer opens: its disks, epochs and tenure.
pub struct SequencerSpec {
    /// The domain.
    pub domain: DomainId,
    /// Name for logs.
    pub name: String,
    /// Disks with their images and epochs.
    pub disks: Vec<(DiskId, Arc<DiskImage>, u64)>,
    /// The domain's sequencer epoch.
    pub sequencer_epoch: u64,
    /// The model's `seq_start` (where this tenure began; 0 for a first sequencer).
    pub seq_start: u64,
    /// The reservation record's path.
    pub seq_path: PathBuf,
    /// The lag record's path ([`lag_record_path`]); none keeps no record.
    pub lag_path: Option<PathBuf>,
    /// Version 1's record, read once if the current one does not exist yet.
    pub legacy_seq_path: Option<PathBuf>,
    /// Unless the tenure continues another host's (`seq_start > 0`), the first sequence
    /// is at least this ([`host_sequence_floor`]).
    pub floor: u64,
}

impl Sequencer {
    /// Opens the sequencer, continuing the domain's sequence (see [`first_sequence`]), and
    /// durably records the tenure before any write is taken. Blocking (file I/O).
    pub fn open(
        spec: SequencerSpec,
        cfg: SequencerConfig,
        reporter: Arc<dyn LinkReporter>,
    ) -> Result<Arc<Self>, WriteError> {
        let mut record = read_seq_record(&spec.seq_path)?;
        if record.is_none() {
            if let Some(legacy) = &spec.legacy_seq_path {
                record = read_seq_record(legacy)?;
            }
        }
        let brand_new = record.is_none() && spec.seq_start == 0;
        let continues_tenure = record.is_some_and(|r| r.tenure_start == spec.seq_start);
        let mut next_seq = first_sequence(record, spec.seq_start);
        if spec.seq_start == 0 {
            // A hand-over's tenure starts exactly where the model says; any other starts
            // above every number this host gave out in other domains.
            next_seq = next_seq.max(spec.floor);
        }
        // What the previous run of this tenure knew of its links (nothing after a
        // hand-over: another host ordered the writes in between).
        let lag = spec
            .lag_path
            .as_deref()
            .and_then(read_lag_record)
            .filter(|r| {
                continues_tenure && r.tenure_start == spec.seq_start && r.last_seq < next_seq
            });
        let used_before_run = lag.as_ref().map_or(next_seq - 1, |r| r.last_seq);
        let reserved_until = next_seq + SEQ_BLOCK;
        let fresh = SeqRecord {
            tenure_start: spec.seq_start,
            reserved_until,
        };
        convoy_codec::file::write_record_versioned(&spec.seq_path, SEQ_RECORD_VERSION, &fresh)
            .map_err(|e| WriteError::Meta(e.to_string()))?;
        if let Some(legacy) = &spec.legacy_seq_path {
            // Upgraded: the id-keyed record replaces it.
            let _ = std::fs::remove_file(legacy);
        }
        let disks = spec
            .disks
            .iter()
            .map(|(d, img, epoch)| {
                (
                    *d,
                    DiskSlot {
                        image: Arc::clone(img),
                        epoch: AtomicU64::new(*epoch),
                    },
                )
            })
            .collect();
        let images = spec
            .disks
            .iter()
            .map(|(d, img, _)| (*d, Arc::clone(img)))
            .collect();
        Ok(Arc::new(Self {
            domain: spec.domain,
            name: spec.name,
            disks,
            images,
            inner: Mutex::new(Inner {
                next_seq,
                reserved_until,
                journal: Journal::new(next_seq, cfg.journal_limit),
                links: BTreeMap::new(),
                run: RunState::Running,
                in_flight: BTreeMap::new(),
            }),
            sequencer_epoch: AtomicU64::new(spec.sequencer_epoch),
            seq_path: spec.seq_path,
            tenure_start: spec.seq_start,
            held_by_all: if brand_new { next_seq - 1 } else { 0 },
            run_start: next_seq,
            used_before_run,
            restored: Mutex::new(lag.map(|r| r.links)),
            lag_path: spec.lag_path,
            lag_written: Mutex::new(None),
            written: Notify::new(),
            hand_over_turn: tokio::sync::Mutex::new(()),
            progress: Notify::new(),
            run: watch::channel(RunState::Running).0,
            reporter,
            cfg,
            stats: SequencerStats::default(),
        }))
    }

    /// The group id, for a group.
    pub fn cg_id(&self) -> Option<u64> {
        self.domain.cg_id()
    }

    /// The image of `disk`.
    pub fn image(&self, disk: DiskId) -> Option<&Arc<DiskImage>> {
        self.images.get(&disk)
    }

    /// All images, by disk.
    pub fn images(&self) -> &BTreeMap<DiskId, Arc<DiskImage>> {
        &self.images
    }

    /// The disks, in order.
    pub fn disk_ids(&self) -> Vec<DiskId> {
        self.images.keys().copied().collect()
    }

    /// The domain's sequencer epoch (carried by replication streams).
    pub fn sequencer_epoch(&self) -> u64 {
        self.sequencer_epoch.load(Ordering::SeqCst)
    }

    /// Raises the sequencer epoch (never lowers it).
    pub fn set_sequencer_epoch(&self, epoch: u64) {
        self.sequencer_epoch.fetch_max(epoch, Ordering::SeqCst);
    }

    /// The current epoch of `disk`.
    pub fn disk_epoch(&self, disk: DiskId) -> Option<u64> {
        self.disks
            .get(&disk)
            .map(|s| s.epoch.load(Ordering::SeqCst))
    }

    /// The first sequence of this host's tenure (the model's `seq_start`).
    pub fn tenure_start(&self) -> u64 {
        self.tenure_start
    }

    /// Raises the epochs of `disks` (never lowers them) inside the critical section, so no
    /// write with an older epoch is sequenced afterwards; then waits (up to `timeout`) for
    /// writes sequenced before with an older epoch to complete. Returns whether they did:
    /// after `true`, no write carrying an older epoch of these disks will ever be
    /// acknowledged by this sequencer.
    pub async fn fence(&self, disks: &[(DiskId, u64)], timeout: Duration) -> bool {
        self.raise_epochs(disks);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let progressed = self.progress.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            let pending = {
                let g = lock(&self.inner);
                disks.iter().any(|(d, e)| {
                    g.in_flight
                        .keys()
                        .any(|(disk, epoch)| disk == d && epoch < e)
                })
            };
            if !pending {
                return true;
            }
            if tokio::time::timeout_at(deadline, progressed).await.is_err() {
                return false;
            }
        }
    }

    /// Raises the epochs of `disks` (never lowers them) inside the critical section: no
    /// write with an older epoch is sequenced afterwards. See [`Self::fence`] to also wait
    /// for writes already sequenced.
    pub fn raise_epochs(&self, disks: &[(DiskId, u64)]) {
        let _g = lock(&self.inner);
        for (d, e) in disks {
            if let Some(slot) = self.disks.get(d) {
                slot.epoch.fetch_max(*e, Ordering::SeqCst);
            }
        }
    }

    /// Stops taking writes (domain removed or agent stopping): waiting and new writes get
    /// [`WriteError::Closed`].
    pub fn close(&self) {
        self.set_run(RunState::Closed);
    }

    fn set_run(&self, state: RunState) {
        lock(&self.inner).run = state;
        self.run.send_replace(state);
    }

    /// Holds new writes back (they wait, they do not fail) and returns the last sequence
    /// assigned: every write that will ever be sequenced here before [`Self::resume`] or
    /// [`Self::hand_over`] is at or below it.
    pub fn pause(&self) -> u64 {
        let mut g = lock(&self.inner);
        if g.run == RunState::Running {
            g.run = RunState::Paused;
        }
        let last = g.next_seq - 1;
        drop(g);
        self.run.send_replace(RunState::Paused);
        last
    }

    /// Takes writes again after [`Self::pause`].
    pub fn resume(&self) {
        let mut g = lock(&self.inner);
        if g.run == RunState::Paused {
            g.run = RunState::Running;
            drop(g);
            self.run.send_replace(RunState::Running);
        }
    }

    /// The order moved to another host: waiting and new writes get [`WriteError::Moved`]
    /// and may be sent to the new sequencer.
    pub fn hand_over(&self) {
        self.set_run(RunState::HandedOver);
    }

    /// Whether the sequencer stopped taking writes for good (closed or handed over).
    pub fn is_closed(&self) -> bool {
        matches!(*self.run.borrow(), RunState::Closed | RunState::HandedOver)
    }

    /// Whether the order was handed to another host.
    pub fn handed_over(&self) -> bool {
        *self.run.borrow() == RunState::HandedOver
    }

    /// Runs `f` with writes held back (blocking: call from a blocking thread). Every write
    /// acknowledged before is in the images, none is being applied and none starts until
    /// `f` returns, so what `f` sees of all the domain's disks is one crash-consistent
    /// point. Returns `f`'s result and the last sequence number that point contains.
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

    /// Makes the sequencer's links match the model: adds, removes and updates modes and
    /// committed states. A link that starts out consistent (or outdated) is retained from
    /// the first sequence of this tenure: its replica is expected to resume from the
    /// journal (after a hand-over the old sequencer holds everything before it).
    pub fn set_links(&self, links: &[(NodeId, ReplicationMode, LinkState)]) {
        // Links the previous run knew keep what it knew of them (once: a link added later
        // is a new copy). A link syncing from scratch starts over.
        let restored = self
            .restored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let mut g = lock(&self.inner);
        let first = g.journal.first_seq();
        g.links
            .retain(|to, _| links.iter().any(|(t, _, _)| t == to));
        for (to, mode, state) in links {
            let link = g.links.entry(*to).or_insert_with(|| {
                let mut l = LinkRuntime::new(*mode, *state);
                l.acked = self.held_by_all;
                if let Some(r) = restored.get(to).filter(|_| *state != LinkState::Syncing) {
                    l.acked = l.acked.max(r.acked);
                    l.held_all_at = instant_of_unix_ms(r.held_all_unix_ms);
                }
                if matches!(state, LinkState::Consistent | LinkState::Outdated) {
                    l.retain_from = Some(first);
                }
                l
            });
            link.mode = *mode;
            // A promotion in flight keeps its own view until it commits.
            link.state = *state;
        }
        Self::trim(&mut g);
        drop(g);
        self.progress.notify_waiters();
    }

    /// Mode, state and acknowledged sequence of each link.
    pub fn link_status(&self) -> BTreeMap<NodeId, LinkStatus> {
        let g = lock(&self.inner);
        let last = g.next_seq - 1;
        g.links
            .iter()
            .map(|(to, l)| {
                let lacks = self.lacks(l.acked, last);
                (
                    *to,
                    LinkStatus {
                        mode: l.mode,
                        state: l.state,
                        acked: l.acked,
                        retaining: l.retain_from.is_some(),
                        lag_writes: lacks,
                        lag_seconds: if lacks == 0 {
                            0.0
                        } else {
                            l.held_all_at.elapsed().as_secs_f64()
                        },
                        lag_bytes: g.journal.cost_from(l.acked + 1),
                    },
                )
            })
            .collect()
    }

    /// Writes a replica that acknowledged `acked` lacks when `last` is the last sequence
    /// assigned. Numbers a restart skipped (above what the previous run used and below
    /// this run's first) took no write and are not counted.
    fn lacks(&self, acked: u64, last: u64) -> u64 {
        if acked + 1 >= self.run_start {
            last.saturating_sub(acked)
        } else {
            self.used_before_run.saturating_sub(acked) + (last + 1).saturating_sub(self.run_start)
        }
    }

    /// Records what this sequencer knows of its links' lag, if it changed since it last
    /// did, so a restart does not forget it. Blocking (a durable write).
    pub fn record_lag(&self) -> Result<(), WriteError> {
        let Some(path) = &self.lag_path else {
            return Ok(());
        };
        let g = lock(&self.inner);
        let record = LagRecord {
            tenure_start: self.tenure_start,
            last_seq: g.next_seq - 1,
            links: g
                .links
                .iter()
                .map(|(to, l)| {
                    (
                        *to,
                        LinkLagRecord {
                            acked: l.acked,
                            held_all_unix_ms: unix_ms(l.held_all_at),
                        },
                    )
                })
                .collect(),
        };
        drop(g);
        let mut written = self.lag_written.lock().unwrap_or_else(|p| p.into_inner());
        // Times are recomputed from the monotonic clock: ignore a few ms of jitter.
        let same = written.as_ref().is_some_and(|w| {
            w.tenure_start == record.tenure_start
                && w.last_seq == record.last_seq
                && w.links.len() == record.links.len()
                && w.links.iter().zip(&record.links).all(|((a, x), (b, y))| {
                    a == b
                        && x.acked == y.acked
                        && x.held_all_unix_ms.abs_diff(y.held_all_unix_ms) < 50
                })
        });
        if same {
            return Ok(());
        }
        convoy_codec::file::write_record_versioned(path, LAG_RECORD_VERSION, &record)
            .map_err(|e| WriteError::Meta(e.to_string()))?;
        *written = Some(record);
        Ok(())
    }

    /// Sequences `payload` for `disk` and applies it locally. Returns its sequence number,
    /// the acknowledgement waits of promising replicas, and the in-flight guard.
    fn sequence_local(
        &self,
        disk: DiskId,
        offset: u64,
        payload: Payload,
        writer_epoch: u64,
    ) -> Result<(u64, SyncWaits, InFlight<'_>), WriteError> {
        let slot = self.disks.get(&disk).ok_or(WriteError::UnknownDisk(disk))?;
        let mut g = lock(&self.inner);
        match g.run {
            RunState::Running => {}
            RunState::Paused => return Err(WriteError::PausedTooLong(Duration::ZERO)),
            RunState::HandedOver => return Err(WriteError::Moved),
            RunState::Closed => return Err(WriteError::Closed),
        }
        // The fence check, inside the critical section: a writer with a newer epoch than
        // this sequencer knew proves the model moved on (only the model hands out epochs),
        // so it fences older writers from here on.
        let current = slot.epoch.fetch_max(writer_epoch, Ordering::SeqCst);
        if writer_epoch < current {
            self.stats.stale_epoch.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("convoy_stale_epoch_refused_total", "where" => "sequencer")
                .increment(1);
            return Err(WriteError::StaleEpoch {
                writer: writer_epoch,
                current,
            });
        }
        let seq = g.next_seq;
        if seq >= g.reserved_until {
            let reserved_until = seq + SEQ_BLOCK;
            let record = SeqRecord {
                tenure_start: self.tenure_start,
                reserved_until,
            };
            convoy_codec::file::write_record_versioned(&self.seq_path, SEQ_RECORD_VERSION, &record)
                .map_err(|e| WriteError::Meta(e.to_string()))?;
            g.reserved_until = reserved_until;
        }
        // Applying under the lock keeps the local images in sequence order.
        let applied = match &payload {
            Payload::Data(b) => slot.image.write_at(b, offset),
            Payload::Zeroes(n) => slot.image.write_zeroes(offset, *n),
        };
        if let Err(e) = applied {
            // The write may have landed in part (a full file system fails it midway): what
            // the range holds now is sequenced and replicated like any write, so no data
            // stays here without a sequence number and every copy holds the same bytes.
            // The writer still gets the error. A range that cannot be read back means a
            // failed image, which takes no more writes.
            let mut now = vec![0u8; payload.len() as usize];
            if slot.image.read_at(&mut now, offset).is_ok() {
                self.assign(&mut g, seq, disk, offset, Payload::Data(Bytes::from(now)));
                self.written.notify_waiters();
            }
            return Err(e.into());
        }
        self.assign(&mut g, seq, disk, offset, payload);
        let waits = g
            .links
            .iter_mut()
            .filter(|(_, l)| l.promises())
            .map(|(to, l)| {
                let (tx, rx) = oneshot::channel();
                l.ack_waiters.push_back((seq, tx));
                (*to, rx)
            })
            .collect();
        let key = (disk, writer_epoch);
        *g.in_flight.entry(key).or_default() += 1;
        Ok((seq, waits, InFlight { seq: self, key }))
    }

    /// Gives the write applied locally as `seq` its number: the next one is taken, and the
    /// write is journaled for the links that stream from the journal.
    fn assign(&self, g: &mut Inner, seq: u64, disk: DiskId, offset: u64, payload: Payload) {
        g.next_seq += 1;
        let now = Instant::now();
        for l in g.links.values_mut() {
            if self.lacks(l.acked, seq - 1) == 0 {
                // It held every write until this one.
                l.held_all_at = now;
            }
        }
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
                Self::drop_laggards(g);
            }
        } else {
            g.journal.reset(seq + 1);
        }
    }

    /// The journal is over its limit: stop retaining for the replica furthest behind (it
    /// will resync from dirty chunks) until the journal fits again. A promising link
    /// dropped here is not forgotten: writes keep waiting for it until Raft records it
    /// outdated.
    fn drop_laggards(g: &mut Inner) {
        while g.journal.over_limit() {
            let slowest = g
                .links
                .iter()
                .filter(|(_, l)| l.retain_from.is_some())
                .min_by_key(|(_, l)| (!l.soft, l.acked))
                .map(|(to, _)| *to);
            let Some(to) = slowest else { break };
            if let Some(link) = g.links.get_mut(&to) {
                tracing::warn!(
                    replica = to,
                    "journal limit reached: replica falls back to a dirty-chunk resync"
                );
                metrics::counter!("convoy_journal_overflows_total").increment(1);
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
            .filter_map(|l| l.retain_from.map(|from| from.max(l.acked + 1)))
            .min();
        match keep_from {
            Some(from) => g.journal.trim_through(from.saturating_sub(1)),
            None => {
                let next = g.next_seq;
                g.journal.reset(next);
            }
        }
    }

    /// Whether a writer should wait for a lagging replica: the journal is past half its
    /// limit and the link holding it back is connected and acknowledged recently (it is
    /// slow, not gone: dropping it into a resync would cost far more than waiting).
    fn throttled(&self) -> bool {
        let g = lock(&self.inner);
        if g.journal.bytes() <= self.cfg.journal_limit / 2 {
            return false;
        }
        // Only the link that holds the journal back can make writers wait; when that is a
        // resync's soft retention, the journal grows until the limit drops it instead.
        let holder = g
            .links
            .values()
            .filter_map(|l| l.retain_from.map(|from| (from.max(l.acked + 1), l)))
            .min_by_key(|(keep_from, l)| (*keep_from, !l.soft))
            .map(|(_, l)| l);
        holder
            .is_some_and(|l| !l.soft && l.connected && l.acked_at.elapsed() < self.cfg.sync_timeout)
    }

    /// Waits while writes are paused, or while a healthy replica lags (backpressure).
    async fn admit(&self) -> Result<(), WriteError> {
        let started = tokio::time::Instant::now();
        let paused_limit = self.cfg.sync_timeout * 5;
        let mut run = self.run.subscribe();
        loop {
            let state = *run.borrow_and_update();
            match state {
                RunState::Running => {}
                RunState::HandedOver => return Err(WriteError::Moved),
                RunState::Closed => return Err(WriteError::Closed),
                RunState::Paused => {
                    let left = paused_limit.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(WriteError::PausedTooLong(started.elapsed()));
                    }
                    let _ = tokio::time::timeout(left, run.changed()).await;
                    continue;
                }
            }
            if !self.throttled() {
                return Ok(());
            }
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            let progressed = self.progress.notified();
            // Re-check on every journal trim. A replica that stops acknowledging stops
            // throttling after the sync timeout (then it overflows into a resync).
            let _ = tokio::time::timeout(Duration::from_millis(50), progressed).await;
        }
    }

    /// A write: sequenced, applied locally, replicated per the links' promises. Returns the
    /// sequence number once the write is as durable as the links promise (and, with `fua`,
    /// durable locally).
    pub async fn write(
        &self,
        disk: DiskId,
        offset: u64,
        payload: Payload,
        fua: bool,
        writer_epoch: u64,
    ) -> Result<u64, WriteError> {
        // A first write to an extent appends to the image's activity log and fsyncs it:
        // done here on the blocking pool, not in `sequence_local` on a runtime worker
        // under the group's lock (a slow disk held both there: every write of the group
        // waited, and two groups held every worker, Raft's tasks included).
        if let Some(image) = self.images.get(&disk)
            && !image.is_active(offset, payload.len())
        {
            Arc::clone(image)
                .activate_async(offset, payload.len())
                .await?;
        }
        loop {
            self.admit().await?;
            let len = payload.len();
            match self.sequence_local(disk, offset, payload.clone(), writer_epoch) {
                // Paused between the admission and the lock: wait again.
                Err(WriteError::PausedTooLong(d)) if d.is_zero() => continue,
                Err(e) => return Err(e),
                Ok((seq, waits, in_flight)) => {
                    self.written.notify_waiters();
                    self.complete(seq, waits, fua.then_some(disk)).await?;
                    drop(in_flight);
                    self.stats.writes.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(len, Ordering::Relaxed);
                    return Ok(seq);
                }
            }
        }
    }

    /// Waits for the promising replicas of a sequenced write (outdating those that do not
    /// answer in time, through Raft, before giving up on them), then makes `flush_disk`
    /// durable locally.
    async fn complete(
        &self,
        seq: u64,
        waits: SyncWaits,
        flush_disk: Option<DiskId>,
    ) -> Result<(), WriteError> {
        for (to, acked) in waits {
            // An error means the link is gone (its waiters dropped): treated as no answer.
            let reached = matches!(
                tokio::time::timeout(self.cfg.sync_timeout, acked).await,
                Ok(Ok(()))
            );
            if !reached {
                self.outdate(to, seq).await?;
            }
        }
        if let Some(disk) = flush_disk {
            self.flush_disk(disk).await?;
        }
        Ok(())
    }

    /// A promising replica did not acknowledge `seq` in time: unless it did meanwhile, or
    /// no longer promises, record it `outdated` in Raft before any write it lacks is
    /// acknowledged, then stop waiting for it.
    async fn outdate(&self, to: NodeId, seq: u64) -> Result<(), WriteError> {
        let must_commit = loop {
            let resolved = self.progress.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            {
                let mut g = lock(&self.inner);
                match g.links.get_mut(&to) {
                    None => break false,
                    Some(l) if l.acked >= seq => break false,
                    // Its `consistent` may land in Raft any moment: acknowledged now,
                    // this write would be missing from a copy Raft calls consistent.
                    // Wait for the outcome, then judge as for any link.
                    Some(l) if l.promoting && l.committing => {}
                    Some(l) if l.promoting && l.state != LinkState::Consistent => {
                        // Not being committed: stop the promotion instead.
                        l.promoting = false;
                        break false;
                    }
                    Some(l) => break l.state == LinkState::Consistent && l.mode.is_synchronous(),
                }
            }
            resolved.await;
        };
        if must_commit {
            tracing::warn!(cg = %self.name, replica = to, seq, "synchronous replica did not acknowledge in time: marking it outdated");
            self.reporter
                .report(
                    self.name.clone(),
                    self.cg_id().unwrap_or_default(),
                    self.sequencer_epoch(),
                    to,
                    LinkState::Outdated,
                    None,
                )
                .await
                .map_err(|reason| WriteError::SyncFailed { node: to, reason })?;
            let mut g = lock(&self.inner);
            if let Some(link) = g.links.get_mut(&to) {
                link.state = LinkState::Outdated;
                link.promoting = false;
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

    /// A guest's FLUSH: every write acknowledged before it is durable on every copy the
    /// links promise (local images flushed; promising replicas hold everything up to the
    /// last sequence assigned now, which makes it durable there).
    pub async fn flush_everywhere(&self, disk: DiskId) -> Result<(), WriteError> {
        let (last, waits) = {
            let mut g = lock(&self.inner);
            let last = g.next_seq - 1;
            let waits: SyncWaits = g
                .links
                .iter_mut()
                .filter(|(_, l)| l.promises() && l.acked < last)
                .map(|(to, l)| {
                    let (tx, rx) = oneshot::channel();
                    // Waiters are kept in sequence order.
                    let at = l.ack_waiters.partition_point(|(s, _)| *s <= last);
                    l.ack_waiters.insert(at, (last, tx));
                    (*to, rx)
                })
                .collect();
            (last, waits)
        };
        self.flush_disk(disk).await?;
        self.complete(last, waits, None).await
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
        self.retain_from_next(to, false)
    }

    /// Starts a resync's soft retention for `to` from the next write on (see
    /// [`LinkRuntime::soft`]); returns that sequence. [`Sequencer::keep_retention`] tells
    /// afterwards whether the journal still holds everything since.
    pub fn retain_during_resync(&self, to: NodeId) -> u64 {
        self.retain_from_next(to, true)
    }

    fn retain_from_next(&self, to: NodeId, soft: bool) -> u64 {
        let mut g = lock(&self.inner);
        let next = g.next_seq;
        if g.journal.first_seq() > next || g.links.values().all(|l| l.retain_from.is_none()) {
            g.journal.reset(next);
        }
        if let Some(link) = g.links.get_mut(&to) {
            link.retain_from = Some(next);
            link.soft = soft;
            link.overflowed = false;
            link.connected = true;
        }
        next
    }

    /// Turns a resync's soft retention into a streaming one if the journal still holds
    /// every write since it began; false if it was dropped meanwhile.
    pub fn keep_retention(&self, to: NodeId) -> bool {
        let mut g = lock(&self.inner);
        match g.links.get_mut(&to) {
            Some(link) if link.soft && link.retain_from.is_some() => {
                link.soft = false;
                true
            }
            _ => false,
        }
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
            link.soft = false;
            link.overflowed = false;
            link.connected = true;
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
            link.connected = false;
            if link.soft {
                // A resync broke off: the replica never got what this held for it.
                link.retain_from = None;
                link.soft = false;
            } else if link.retain_from.is_some() {
                link.retain_from = Some(link.acked + 1);
            }
        }
        Self::trim(&mut g);
        drop(g);
        self.progress.notify_waiters();
    }

    /// Stops retaining for `to` (link removed or sender stopped).
    pub fn stop_streaming(&self, to: NodeId) {
        let mut g = lock(&self.inner);
        if let Some(link) = g.links.get_mut(&to) {
            link.retain_from = None;
            link.soft = false;
            link.connected = false;
        }
        Self::trim(&mut g);
        drop(g);
        self.progress.notify_waiters();
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

    /// The replica on `to` holds everything through `seq` durably: wakes the writers
    /// waiting for it and trims the journal.
    pub fn acked(&self, to: NodeId, seq: u64) {
        let mut g = lock(&self.inner);
        let next = g.next_seq;
        if let Some(link) = g.links.get_mut(&to) {
            // Any acknowledgement shows the replica alive and working (during a resync it
            // acknowledges chunk batches without new sequence numbers).
            link.acked_at = Instant::now();
            link.acked = link.acked.max(seq);
            if self.lacks(link.acked, next - 1) == 0 {
                link.held_all_at = Instant::now();
            }
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
        drop(g);
        self.progress.notify_waiters();
    }

    /// What the replica on `to` acknowledged to this sequencer (0 if nothing yet).
    pub fn acked_by(&self, to: NodeId) -> u64 {
        lock(&self.inner).links.get(&to).map_or(0, |l| l.acked)
    }

    /// Starts promoting the link to `to` to `consistent`: from now on writes wait for this
    /// replica as if it were consistent. Returns the last sequence assigned before: once
    /// the replica acknowledged it, it holds every acknowledged write.
    pub fn begin_promotion(&self, to: NodeId) -> u64 {
        let mut g = lock(&self.inner);
        let last = g.next_seq - 1;
        if let Some(l) = g.links.get_mut(&to) {
            l.promoting = true;
        }
        last
    }

    /// Whether the link to `to` is being promoted (a writer that gave up waiting for the
    /// replica ends the promotion).
    pub fn promoting(&self, to: NodeId) -> bool {
        lock(&self.inner)
            .links
            .get(&to)
            .is_some_and(|l| l.promoting)
    }

    /// Starts committing the promotion of `to`, if it still runs (no writer gave up on it):
    /// from here until [`Self::end_promotion`] a writer that gives up waiting for the
    /// replica waits for the commit's outcome instead of ending the promotion.
    pub fn commit_promotion(&self, to: NodeId) -> bool {
        let mut g = lock(&self.inner);
        match g.links.get_mut(&to) {
            Some(l) if l.promoting => {
                l.committing = true;
                true
            }
            _ => false,
        }
    }

    /// Ends a promotion: `committed` records the new state (`consistent` also when the
    /// commit's outcome is unknown: it may have landed); otherwise writes stop waiting for
    /// the replica again (it was never recorded consistent).
    pub fn end_promotion(&self, to: NodeId, committed: Option<LinkState>) {
        {
            let mut g = lock(&self.inner);
            if let Some(l) = g.links.get_mut(&to) {
                l.promoting = false;
                l.committing = false;
                if let Some(state) = committed {
                    l.state = state;
                }
            }
        }
        self.progress.notify_waiters();
    }

    /// Records a link state committed in Raft.
    pub fn note_state(&self, to: NodeId, state: LinkState) {
        if let Some(link) = lock(&self.inner).links.get_mut(&to) {
            link.state = state;
        }
    }

    /// The committed state of the link to `to`.
    pub fn link_state(&self, to: NodeId) -> Option<LinkState> {
        lock(&self.inner).links.get(&to).map(|l| l.state)
    }

    /// The reporter, for senders.
    pub fn reporter(&self) -> &Arc<dyn LinkReporter> {
        &self.reporter
    }

    /// Sequence assigned last (`tenure start - 1` if none yet).
    pub fn last_seq(&self) -> u64 {
        lock(&self.inner).next_seq - 1
    }

    /// The next sequence number to be assigned.
    pub fn next_seq(&self) -> u64 {
        lock(&self.inner).next_seq
    }

    /// Payload bytes the journal holds.
    pub fn journal_bytes(&self) -> u64 {
        lock(&self.inner).journal.bytes()
    }

    /// Waits until the replica on `to` acknowledged `seq`, or `timeout` passed.
    pub async fn wait_acked(&self, to: NodeId, seq: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let progressed = self.progress.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            if self.acked_by(to) >= seq {
                return true;
            }
            if tokio::time::timeout_at(deadline, progressed).await.is_err() {
                return self.acked_by(to) >= seq;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Mutex<Vec<(NodeId, LinkState)>>);

    impl LinkReporter for Recorder {
        fn report(
            &self,
            _cg: String,
            _cg_id: u64,
            _sequencer_epoch: u64,
            to: NodeId,
            state: LinkState,
            _expect: Option<LinkState>,
        ) -> BoxFuture<'static, Result<(), String>> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((to, state));
            Box::pin(async { Ok(()) })
        }
    }

    fn open(dir: &Path, seq_start: u64, journal_limit: u64) -> (Arc<Sequencer>, Arc<Recorder>) {
        let image = match DiskImage::open(dir, "1") {
            Ok(image) => Arc::new(image),
            Err(_) => Arc::new(DiskImage::create(dir, "1", 1 << 20).unwrap()),
        };
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let spec = SequencerSpec {
            domain: DomainId::Cg(1),
            name: "g".into(),
            disks: vec![(1, image, 1)],
            sequencer_epoch: 1,
            seq_start,
            seq_path: dir.join("cg-1.seq"),
            legacy_seq_path: None,
            lag_path: Some(lag_record_path(dir, DomainId::Cg(1))),
            floor: 0,
        };
        let cfg = SequencerConfig {
            journal_limit,
            sync_timeout: Duration::from_millis(200),
        };
        let s = Sequencer::open(spec, cfg, Arc::clone(&rec) as Arc<dyn LinkReporter>).unwrap();
        (s, rec)
    }

    fn data(n: usize) -> Payload {
        Payload::Data(Bytes::from(vec![7u8; n]))
    }

    #[test]
    fn first_sequence_continues_a_tenure_and_starts_a_new_one_exactly() {
        // New domain.
        assert_eq!(first_sequence(None, 0), 1);
        // Restart within the tenure: past everything reserved.
        let r = SeqRecord {
            tenure_start: 0,
            reserved_until: 5000,
        };
        assert_eq!(first_sequence(Some(r), 0), 5000);
        // Took over at 77: exactly there, even if an old tenure reserved further.
        assert_eq!(first_sequence(Some(r), 77), 77);
        assert_eq!(first_sequence(None, 77), 77);
        // Restart within that tenure.
        let r2 = SeqRecord {
            tenure_start: 77,
            reserved_until: 77 + SEQ_BLOCK,
        };
        assert_eq!(first_sequence(Some(r2), 77), 77 + SEQ_BLOCK);
    }

    /// A migration's "bytes needed" starts from this: after a fill pass of large writes, a
    /// replica that lacks only small writes lacks their bytes, not their count times the
    /// group's average write (which the large ones inflate).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lag_in_bytes_counts_exactly_the_writes_a_replica_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path(), 0, 64 << 20);
        s.set_links(&[
            (2, ReplicationMode::Async, LinkState::Consistent),
            (3, ReplicationMode::Async, LinkState::Consistent),
        ]);
        assert_eq!(s.link_status()[&2].lag_bytes, Some(0));
        // The test disk holds 1 MiB.
        for i in 0..8 {
            s.write(1, i << 16, data(1 << 16), false, 1).await.unwrap();
        }
        s.acked(2, s.last_seq());
        for i in 0..10 {
            s.write(1, i * 4096, data(4096), false, 1).await.unwrap();
        }
        s.write(1, 0, Payload::Zeroes(1 << 19), false, 1)
            .await
            .unwrap();
        let status = s.link_status();
        let descriptor = Payload::Zeroes(1 << 19).journal_cost();
        assert_eq!(status[&2].lag_writes, 11);
        assert_eq!(
            status[&2].lag_bytes,
            Some(10 * data(4096).journal_cost() + descriptor)
        );
        assert_eq!(
            status[&3].lag_bytes,
            Some(8 * data(1 << 16).journal_cost() + 10 * data(4096).journal_cost() + descriptor)
        );
        s.acked(2, s.last_seq());
        assert_eq!(s.link_status()[&2].lag_bytes, Some(0));
        s.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_sequencer_remembers_what_its_replicas_lack_and_since_when() {
        let dir = tempfile::tempdir().unwrap();
        let links = |state| {
            [
                (2, ReplicationMode::Async, state),
                (3, ReplicationMode::Async, LinkState::Consistent),
            ]
        };
        let (s, _) = open(dir.path(), 0, 1 << 20);
        s.set_links(&links(LinkState::Consistent));
        let first = s.write(1, 0, data(512), false, 1).await.unwrap();
        s.acked(2, first);
        s.acked(3, first);
        for _ in 0..4 {
            s.write(1, 0, data(512), false, 1).await.unwrap();
        }
        s.acked(3, s.last_seq());
        std::thread::sleep(Duration::from_millis(300));
        let before = s.link_status()[&2];
        assert_eq!((before.acked, before.lag_writes), (first, 4));
        assert!(before.lag_seconds >= 0.3);
        s.record_lag().unwrap();
        s.close();
        drop(s);

        // Restarted: numbering skips ahead, yet the replica lacks the same 4 writes, since
        // the same moment; the caught-up one lacks none.
        let (s, _) = open(dir.path(), 0, 1 << 20);
        s.set_links(&links(LinkState::Outdated));
        let after = s.link_status();
        assert!(s.last_seq() > first + SEQ_BLOCK / 2);
        assert_eq!((after[&2].acked, after[&2].lag_writes), (first, 4));
        assert!(after[&2].lag_seconds >= before.lag_seconds, "{after:?}");
        assert_eq!((after[&3].lag_writes, after[&3].lag_seconds), (0, 0.0));
        // Writes of the new run count one each, for both.
        s.write(1, 0, data(512), false, 1).await.unwrap();
        let after = s.link_status();
        assert_eq!((after[&2].lag_writes, after[&3].lag_writes), (5, 1));
        // Acknowledging the new run's writes (after a resync) means holding every write.
        s.acked(2, s.last_seq());
        assert_eq!(
            (
                s.link_status()[&2].lag_writes,
                s.link_status()[&2].lag_seconds
            ),
            (0, 0.0)
        );
        s.close();
        drop(s);

        // A link syncing from scratch (removed and added again) starts over.
        let (s, _) = open(dir.path(), 0, 1 << 20);
        s.set_links(&links(LinkState::Syncing));
        assert_eq!(s.link_status()[&2].acked, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_domain_numbers_above_every_other_domain_of_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let (old, _) = open(dir.path(), 0, 1 << 20);
        let last_old = old.write(1, 0, data(512), false, 1).await.unwrap();
        old.close();
        drop(old);
        let floor = host_sequence_floor(dir.path());
        assert!(floor > last_old);
        let cfg = SequencerConfig {
            journal_limit: 1 << 20,
            sync_timeout: Duration::from_secs(1),
        };
        let spec = |domain: DomainId, seq_start| SequencerSpec {
            domain,
            name: "shop".into(),
            disks: vec![(
                1,
                Arc::new(DiskImage::create(dir.path(), &domain.key(), 1 << 20).unwrap()),
                1,
            )],
            sequencer_epoch: 1,
            seq_start,
            seq_path: seq_record_path(dir.path(), domain),
            legacy_seq_path: None,
            lag_path: None,
            floor,
        };
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        // A group created again under the old name gets a new id, and new numbers.
        let new = Sequencer::open(spec(DomainId::Cg(2), 0), cfg.clone(), rec.clone()).unwrap();
        assert!(new.next_seq() >= floor);
        // Its replica lacks none of its writes yet: no lag from the numbers it skipped.
        new.set_links(&[(2, ReplicationMode::Async, LinkState::Syncing)]);
        let l = new.link_status()[&2];
        assert_eq!((l.acked, l.lag_seconds), (new.next_seq() - 1, 0.0));
        new.close();
        // A hand-over's tenure still starts exactly where the model says.
        let taken = Sequencer::open(spec(DomainId::Cg(3), 77), cfg, rec).unwrap();
        assert_eq!(taken.next_seq(), 77);
    }

    #[test]
    fn a_schema_1_reservation_record_is_upgraded() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/shop.seq");
        let dir = tempfile::tempdir().unwrap();
        let legacy = legacy_seq_record_path(dir.path(), "shop");
        std::fs::copy(&fixture, &legacy).unwrap();
        let rec = read_seq_record(&legacy).unwrap().unwrap();
        assert_eq!(
            rec,
            SeqRecord {
                tenure_start: 0,
                reserved_until: 3 << 20
            }
        );
        // Opening the group's first sequencer continues past it and replaces the file.
        let image = Arc::new(DiskImage::create(dir.path(), "1", 1 << 20).unwrap());
        let spec = SequencerSpec {
            domain: DomainId::Cg(1),
            name: "shop".into(),
            disks: vec![(1, image, 1)],
            sequencer_epoch: 1,
            seq_start: 0,
            seq_path: seq_record_path(dir.path(), DomainId::Cg(1)),
            legacy_seq_path: Some(legacy.clone()),
            lag_path: None,
            floor: 0,
        };
        let cfg = SequencerConfig {
            journal_limit: 1 << 20,
            sync_timeout: Duration::from_secs(1),
        };
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let s = Sequencer::open(spec, cfg, rec).unwrap();
        assert_eq!(s.next_seq(), 3 << 20);
        assert!(!legacy.exists());
        let now = read_seq_record(&seq_record_path(dir.path(), DomainId::Cg(1)))
            .unwrap()
            .unwrap();
        assert!(now.reserved_until > 3 << 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_epoch_is_refused_and_a_newer_one_fences_older_writers() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path(), 0, 1 << 20);
        assert_eq!(s.write(1, 0, data(512), false, 1).await.unwrap(), 1);
        // A writer at epoch 2 (the VM moved; this sequencer had not heard yet).
        assert_eq!(s.write(1, 0, data(512), false, 2).await.unwrap(), 2);
        let e = s.write(1, 0, data(512), false, 1).await.unwrap_err();
        assert!(matches!(
            e,
            WriteError::StaleEpoch {
                writer: 1,
                current: 2
            }
        ));
        assert_eq!(s.stats.stale_epoch.load(Ordering::Relaxed), 1);
        assert_eq!(s.last_seq(), 2, "a refused write takes no sequence number");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_promising_link_is_waited_for_until_raft_says_outdated() {
        let dir = tempfile::tempdir().unwrap();
        let (s, rec) = open(dir.path(), 0, 1 << 20);
        s.set_links(&[(2, ReplicationMode::Sync, LinkState::Consistent)]);
        let started = Instant::now();
        // No replica answers: the write waits the sync timeout, then Raft records outdated.
        s.write(1, 0, data(512), false, 1).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![(2, LinkState::Outdated)],
            "acknowledged only after the link was recorded outdated"
        );
        // From then on writes do not wait.
        let started = Instant::now();
        s.write(1, 0, data(512), false, 1).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(150));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_never_acks_past_a_consistent_link_during_overflow() {
        // The journal overflows and stops holding the sync replica's writes; Raft still
        // says consistent, so writes must keep waiting until it says outdated.
        let dir = tempfile::tempdir().unwrap();
        let (s, rec) = open(dir.path(), 0, 4096);
        s.set_links(&[(2, ReplicationMode::Sync, LinkState::Consistent)]);
        s.begin_streaming(2);
        let w = s.write(1, 0, data(8192), false, 1).await;
        assert!(w.is_ok());
        assert!(s.journal_from(2, 1, 1 << 20).is_err(), "overflowed");
        assert_eq!(*rec.0.lock().unwrap(), vec![(2, LinkState::Outdated)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_promotion_makes_writes_wait_before_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path(), 0, 1 << 20);
        s.set_links(&[(2, ReplicationMode::Sync, LinkState::Outdated)]);
        s.begin_streaming(2);
        s.write(1, 0, data(512), false, 1).await.unwrap();
        let target = s.begin_promotion(2);
        assert_eq!(target, 1);
        // A write made during the promotion waits for the replica.
        let s2 = Arc::clone(&s);
        let w = tokio::spawn(async move { s2.write(1, 0, data(512), false, 1).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!w.is_finished(), "waits for the replica being promoted");
        s.acked(2, 2);
        assert_eq!(w.await.unwrap().unwrap(), 2);
        s.end_promotion(2, Some(LinkState::Consistent));
        assert_eq!(s.link_state(2), Some(LinkState::Consistent));
    }

    /// Issue 9 item 1's last gap: a writer that gives up on the replica while the
    /// promotion's `consistent` is being committed is acknowledged only after the link is
    /// recorded `outdated` (before, it was acknowledged at once, and the commit then landed
    /// on a copy that lacked it). If the commit did not happen, it goes without a report.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_giving_up_during_the_promotion_commit_waits_for_outdated() {
        let dir = tempfile::tempdir().unwrap();
        let (s, rec) = open(dir.path(), 0, 1 << 20);
        s.set_links(&[(2, ReplicationMode::Sync, LinkState::Outdated)]);
        s.begin_streaming(2);
        s.begin_promotion(2);
        assert!(s.commit_promotion(2));
        // The replica never acknowledges: past the sync timeout (200 ms here) the writer
        // gives up, and waits for the commit's outcome.
        let s2 = Arc::clone(&s);
        let w = tokio::spawn(async move { s2.write(1, 0, data(512), false, 1).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!w.is_finished(), "acknowledged while the commit may land");
        assert!(rec.0.lock().unwrap().is_empty());
        // It landed: the link is recorded outdated before the write is acknowledged.
        s.end_promotion(2, Some(LinkState::Consistent));
        w.await.unwrap().unwrap();
        assert_eq!(*rec.0.lock().unwrap(), vec![(2, LinkState::Outdated)]);
        assert_eq!(s.link_state(2), Some(LinkState::Outdated));

        // A commit that did not happen: the writer goes on without a report.
        s.begin_promotion(2);
        assert!(s.commit_promotion(2));
        let s2 = Arc::clone(&s);
        let w = tokio::spawn(async move { s2.write(1, 0, data(512), false, 1).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!w.is_finished());
        s.end_promotion(2, None);
        w.await.unwrap().unwrap();
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        // Once a writer ended a promotion, it cannot be committed.
        s.begin_promotion(2);
        let w = s.write(1, 0, data(512), false, 1).await;
        assert!(w.is_ok());
        assert!(!s.commit_promotion(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paused_writes_wait_and_a_hand_over_tells_them_to_go_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path(), 40, 1 << 20);
        assert_eq!(s.write(1, 0, data(512), false, 1).await.unwrap(), 40);
        assert_eq!(s.pause(), 40);
        let s2 = Arc::clone(&s);
        let w = tokio::spawn(async move { s2.write(1, 0, data(512), false, 1).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!w.is_finished());
        s.hand_over();
        let e = w.await.unwrap().unwrap_err();
        assert!(matches!(e, WriteError::Moved) && e.not_applied());
        assert_eq!(s.last_seq(), 40);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fence_waits_for_older_writes_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path(), 0, 1 << 20);
        s.set_links(&[(2, ReplicationMode::Sync, LinkState::Consistent)]);
        s.begin_streaming(2);
        let s2 = Arc::clone(&s);
        let w = tokio::spawn(async move { s2.write(1, 0, data(512), false, 1).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The write (epoch 1) is sequenced and waits for the replica: the fence waits too.
        assert!(!s.fence(&[(1, 2)], Duration::from_millis(50)).await);
        s.acked(2, 1);
        w.await.unwrap().unwrap();
        assert!(s.fence(&[(1, 2)], Duration::from_millis(50)).await);
        assert!(matches!(
            s.write(1, 0, data(512), false, 1).await,
            Err(WriteError::StaleEpoch { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_healthy_lagging_replica_slows_writers_instead_of_overflowing() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path(), 0, 64 * 1024);
        s.set_links(&[(2, ReplicationMode::Async, LinkState::Consistent)]);
        s.begin_streaming(2);
        s.acked(2, 0);
        // A replica that acknowledges as writes come: never dropped.
        let s2 = Arc::clone(&s);
        let acker = tokio::spawn(async move {
            for _ in 0..400 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let last = s2.last_seq();
                s2.acked(2, last);
            }
        });
        for i in 0..100u64 {
            s.write(1, (i % 64) * 4096, data(4096), false, 1)
                .await
                .unwrap();
        }
        acker.abort();
        assert!(
            s.journal_from(2, s.acked_by(2) + 1, 1 << 20).is_ok(),
            "never overflowed"
        );
        // Zero writes cost the journal a descriptor, not their length.
        let before = s.journal_bytes();
        s.write(1, 0, Payload::Zeroes(1 << 20), false, 1)
            .await
            .unwrap();
        assert!(s.journal_bytes() - before < 4096);
    }

    #[tokio::test]
    async fn a_resync_keeps_its_writes_in_the_journal_without_slowing_writers() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path(), 0, 64 * 1024);
        s.set_links(&[(2, ReplicationMode::Async, LinkState::Inconsistent)]);
        let early = s.retain_during_resync(2);
        s.acked(2, 0);
        // Pass 1 runs; guests write past half the journal limit. Nothing acknowledges,
        // and nobody waits for the resyncing replica.
        for i in 0..12u64 {
            tokio::time::timeout(
                Duration::from_secs(1),
                s.write(1, (i % 16) * 4096, data(4096), false, 1),
            )
            .await
            .expect("a resync's retention never throttles writers")
            .unwrap();
        }
        assert!(s.keep_retention(2), "the journal still holds every write");
        let kept = s.journal_from(2, early, 1 << 20).unwrap();
        assert_eq!(kept.len(), 12);
        assert_eq!(kept[0].seq, early);

        // Another resync whose writes outgrow the journal: the soft retention goes first,
        // and the sender learns it must send pass 2 by chunks.
        s.set_links(&[
            (2, ReplicationMode::Async, LinkState::Inconsistent),
            (3, ReplicationMode::Async, LinkState::Consistent),
        ]);
        s.retain_during_resync(2);
        s.begin_streaming(3);
        let s3 = Arc::clone(&s);
        let acker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let last = s3.last_seq();
                s3.acked(3, last);
            }
        });
        for i in 0..40u64 {
            s.write(1, (i % 16) * 4096, data(4096), false, 1)
                .await
                .unwrap();
        }
        acker.abort();
        assert!(!s.keep_retention(2), "dropped when the journal filled");
        assert!(
            s.journal_from(3, s.acked_by(3) + 1, 1 << 20).is_ok(),
            "the streaming replica kept its retention"
        );
    }
}
