//! The data plane of one host: disk images, sequencers, replication senders and receivers,
//! mirrored writes, NBD exports, delta sessions, snapshots and simulated guests.
//!
//! Nothing here decides what the host should run: [`convoy_raft::model::host_plan`] does,
//! from the replicated model alone. [`DataPlane::reconcile`] is level-triggered: on every
//! applied Raft entry it applies the difference between that plan and what runs, so a
//! restarted agent, a missed event or a crash in the middle all converge the same way. A
//! step that fails for one disk or group is recorded and retried; it never stops the
//! others.
//!
//! Layout by concern: `images` (open images and failures), `sequencer` and `journal`
//! (ordering a domain's writes), `sender`, `receiver`, `replica_state`, `replicas` and
//! `wire` (replication), `mirror` and `volume` (where a disk's writes go from this host),
//! `exports` (NBD), `delta` (compare-delta and full copies), `crash` (a sequencer back
//! from a crash takes its synchronous replica's data first), `snapshots`, `handover`
//! (sequencer hand-over and fencing), `guests` (simulated guests), `gc` (garbage
//! collection and hash warming).

pub mod crash;
pub mod delta;
pub mod exports;
pub mod gc;
pub mod guests;
pub mod handover;
pub mod images;
pub mod journal;
pub mod mirror;
pub mod receiver;
pub mod replica_state;
pub mod replicas;
pub mod sender;
pub mod sequencer;
pub mod snapshots;
pub mod volume;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use anyhow::Context;
use convoy_raft::model::{
    ClusterModel, DiskId, DomainId, ExportKind, HostPlan, NodeId, ReplicaPlan, SequencerPlan,
    host_plan,
};
use convoy_raft::{Command, Outcome};
use convoy_transport::Endpoint;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use delta::{DiskSync, SyncReport};
use images::Images;
use mirror::MirrorClient;
use replica_state::{ReplicaState, StateFile};
use replicas::Replicas;
use sender::{LinkReport, LinkSender};
use sequencer::{LinkReporter, Sequencer, SequencerConfig, SequencerSpec};
use volume::{ReadOnlyCopy, Route, Volume};

/// Data-plane settings (from the agent config).
#[derive(Clone, Debug)]
pub struct DataConfig {
    /// Where images, replication state and snapshots live.
    pub data_dir: PathBuf,
    /// Where per-disk NBD sockets are created.
    pub socket_dir: PathBuf,
    /// Optional TCP address serving every export.
    pub nbd_tcp: Option<std::net::SocketAddr>,
    /// Server settings of the TCP listener; `tls` is `None` only when plaintext was asked for.
    pub nbd_tcp_server: convoy_nbd::ServerConfig,
    /// Connection and in-flight byte caps of every export.
    pub nbd_limits: convoy_nbd::ExportLimits,
    /// Group (gid) of the Unix sockets, which get mode 0660; `None` = the agent's group.
    pub nbd_socket_group: Option<u32>,
    /// Journal limit per group, bytes; beyond it a replica that is not keeping up resyncs
    /// from dirty chunks.
    pub journal_limit: u64,
    /// How long a synchronous write waits for its replica before marking it outdated.
    pub sync_timeout: Duration,
    /// How long a former replica's copy is kept after its link was removed, so a re-added
    /// replica catches up with only what it lacks.
    pub keep_former_copies: Duration,
    /// How long a sequencer back from an unclean stop waits for its synchronous replica's
    /// data before it goes on with its own copy (see [`crash`]).
    pub crash_pull_wait: Duration,
}

/// Proposes commands to the replicated model (implemented by the agent over its cluster
/// service): the only way the data plane changes the model.
pub trait ModelWriter: LinkReporter {
    /// Proposes `cmd` with client request id `request_id` (the model applies a request
    /// id once). Resolves with the model's answer once committed and applied, or with
    /// `Err` when the outcome is unknown (no leader, timeout): proposing again with the
    /// same id is then safe.
    fn propose(
        &self,
        request_id: u128,
        cmd: Command,
    ) -> BoxFuture<'static, Result<Result<Outcome, convoy_raft::model::ModelError>, String>>;

    /// The model as of now: read after a linearizable barrier, so it includes every entry
    /// committed before the call. `Err` while there is no leader.
    fn current_model(&self) -> BoxFuture<'static, Result<ClusterModel, String>>;
}

/// A running sequencer and its link senders.
struct Domain {
    seq: Arc<Sequencer>,
    disks: Vec<DiskId>,
    senders: HashMap<NodeId, (watch::Sender<bool>, Arc<Mutex<LinkReport>>)>,
}

/// What the last reconcile applied, for requests that must judge by the model.
struct View {
    model: ClusterModel,
    plan: HostPlan,
}

/// Status of a group's copies as its sequencer sees it, for `convoy cg show`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Last sequence assigned.
    pub last_seq: u64,
    /// Writes acknowledged since the sequencer started.
    pub writes: u64,
    /// Bytes those writes changed.
    pub bytes_written: u64,
    /// Writes refused for a stale epoch.
    pub stale_epoch_refused: u64,
    /// Times writers waited for a lagging replica.
    pub throttled: u64,
    /// Bytes the journal holds.
    pub journal_bytes: u64,
    /// Per replica host.
    pub links: BTreeMap<NodeId, LinkStatusView>,
    /// A `convoy cg sync` running from this host, if any.
    pub sync: Option<delta::SyncProgressView>,
}

/// One link as its sequencer sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LinkStatusView {
    /// What the sender is doing.
    pub phase: String,
    /// Highest sequence the replica holds durably.
    pub acked_seq: u64,
    /// Last sequence assigned on the sequencer.
    pub last_seq: u64,
    /// Writes the replica lacks (the RPO in writes), in every state.
    pub lag_writes: u64,
    /// Seconds since the replica last held every write (the RPO in seconds), in every
    /// state: 0 while it holds every write.
    pub lag_seconds: f64,
    /// Resyncs from chunks since the sequencer started (first sync included).
    pub resyncs: u64,
    /// Chunks sent by resyncs.
    pub resync_chunks_sent: u64,
    /// Chunks the running resync still has to send.
    pub resync_chunks_left: u64,
    /// Bytes sent on the link.
    pub bytes_sent: u64,
    /// Bytes of chunk data sent by resyncs and seeding.
    pub resync_bytes_sent: u64,
    /// Disk bytes the running (or last) resync has to cover.
    pub resync_bytes_total: u64,
    /// Disk bytes of it covered so far.
    pub resync_bytes_done: u64,
    /// Last error (the replica's reason when it refused).
    pub last_error: Option<String>,
}

/// What a link's sender can be doing (`LinkStatusView::phase`).
pub const LINK_PHASES: [&str; 6] = [
    "connecting",
    "initial-sync",
    "seeding",
    "resync",
    "streaming",
    "stopped",
];

/// The data plane's state for `/metrics`, read when it is scraped.
#[derive(Clone, Debug, Default)]
pub struct DataPlaneMetrics {
    /// Groups this host sequences.
    pub groups: Vec<GroupMetrics>,
    /// Disks whose image this host cannot open.
    pub disk_open_failures: Vec<DiskId>,
}

/// One group this host sequences.
#[derive(Clone, Debug, Default)]
pub struct GroupMetrics {
    /// Group name.
    pub cg: String,
    /// Last sequence assigned.
    pub last_seq: u64,
    /// Writes acknowledged since the sequencer started.
    pub writes: u64,
    /// Bytes those writes changed.
    pub bytes_written: u64,
    /// Times writers waited for a lagging replica.
    pub throttled: u64,
    /// Bytes the journal holds.
    pub journal_bytes: u64,
    /// Per replica host.
    pub links: Vec<LinkMetrics>,
}

/// One link of a group, as its sequencer sees it.
#[derive(Clone, Debug, Default)]
pub struct LinkMetrics {
    /// The replica's host.
    pub replica: NodeId,
    /// Committed state (None while the sequencer has no link runtime for it yet).
    pub state: Option<convoy_raft::model::LinkState>,
    /// What the sender is doing (one of [`LINK_PHASES`]).
    pub phase: String,
    /// Highest sequence the replica holds durably.
    pub acked_seq: u64,
    /// Writes the replica lacks.
    pub lag_writes: u64,
    /// Seconds since the replica last held every write.
    pub lag_seconds: f64,
    /// Resyncs since the sequencer started.
    pub resyncs: u64,
    /// Bytes sent on the link.
    pub bytes_sent: u64,
    /// Bytes of chunk data sent by resyncs and seeding.
    pub resync_bytes_sent: u64,
}

/// Records a sequencer's lag record every [`sequencer::LAG_RECORD_INTERVAL`] (when it
/// changed) for as long as the sequencer runs, so a restarted agent still knows what its
/// replicas lack and since when.
async fn record_lag(seq: std::sync::Weak<Sequencer>) {
    loop {
        tokio::time::sleep(sequencer::LAG_RECORD_INTERVAL).await;
        let Some(s) = seq.upgrade() else {
            return;
        };
        if s.is_closed() {
            return;
        }
        let name = s.name.clone();
        match tokio::task::spawn_blocking(move || s.record_lag()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(domain = %name, error = %e, "cannot record replication lag")
            }
            Err(_) => return,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Export name of a disk's writable volume.
pub fn export_name(disk: DiskId) -> String {
    format!("disk-{disk}")
}

/// Export name of a read-only exposed copy.
pub fn readonly_export_name(disk: DiskId) -> String {
    format!("disk-{disk}-ro")
}

/// Tracker name of the link to `to`.
pub fn tracker_name(to: NodeId) -> String {
    format!("link-{to}")
}

/// Whether `peer` may write `disk` (its VM runs there, or the host holds an active-active
/// copy of its group), judged on `model`. A refusal says why, and whether the writer's
/// `epoch` is newer than the model's (so a model that lags may yet allow it).
fn write_verdict(
    model: &ClusterModel,
    peer: NodeId,
    disk: DiskId,
    epoch: u64,
) -> Result<(), (String, bool)> {
    let Some(d) = model.disks.get(&disk) else {
        return Err((format!("disk {disk} is not in the model"), false));
    };
    let vm = model.vms.get(&d.vm);
    let runs_there = vm.is_some_and(|v| v.host == peer);
    let active_active = vm
        .and_then(|v| v.cg.as_ref())
        .and_then(|c| model.cgs.get(c))
        .and_then(|c| c.link(peer))
        .is_some_and(|l| l.mode.is_active_active());
    if runs_there || active_active {
        return Ok(());
    }
    Err((
        format!(
            "node {peer} may not write disk {disk}: its VM runs on node {}",
            vm.map_or(0, |v| v.host)
        ),
        d.epoch < epoch,
    ))
}

/// Counts one bulk transfer for as long as it lives.
pub(crate) struct BulkTransfer(Arc<AtomicUsize>);

impl BulkTransfer {
    pub(crate) fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for BulkTransfer {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The host's data plane.
pub struct DataPlane {
    node: NodeId,
    cfg: DataConfig,
    endpoint: Endpoint,
    writer: Arc<dyn ModelWriter>,
    images: Images,
    exports: exports::Exports,
    replicas: Replicas,
    domains: Mutex<HashMap<DomainId, Domain>>,
    routes: RwLock<HashMap<DiskId, Route>>,
    route_version: watch::Sender<u64>,
    mirrors: Mutex<HashMap<(u64, NodeId, u64), Arc<MirrorClient>>>,
    peers: RwLock<HashMap<NodeId, SocketAddr>>,
    view: watch::Sender<Arc<View>>,
    /// Delta sessions and resyncs running on this host; background hashing waits.
    bulk: Arc<AtomicUsize>,
    delta: std::sync::OnceLock<convoy_delta::DeltaServer>,
    guests: tokio::sync::Mutex<guests::Guests>,
    /// Held by a reconcile and by garbage collection, so neither sees the other half done.
    housekeeping: Mutex<()>,
    /// Snapshot directories being created (`None`) or recorded in Raft at an instant:
    /// garbage collection leaves them alone until it reads a model that includes them.
    snapshots_in_progress: Mutex<HashMap<PathBuf, Option<std::time::Instant>>>,
    /// When each group stopped having a replica here (garbage collection keeps the copy
    /// for [`DataConfig::keep_former_copies`]).
    former_replicas: Mutex<HashMap<u64, std::time::Instant>>,
    /// `convoy cg sync` runs from this host, by group id, for their progress bars.
    syncs: Mutex<HashMap<u64, delta::SyncRun>>,
    /// Groups and disks settled after an unclean stop (see [`crash`]).
    settlement: crash::Settlement,
    /// Asks the agent's reconcile loop for a reconcile now rather than at its next tick.
    pub reconcile_soon: tokio::sync::Notify,
}

/// A writer reporter wrapper, so the sequencer sees only the narrow trait.
struct Reporter(Arc<dyn ModelWriter>);

impl LinkReporter for Reporter {
    fn report(
        &self,
        cg: String,
        cg_id: u64,
        sequencer_epoch: u64,
        to: NodeId,
        state: convoy_raft::model::LinkState,
        expect: Option<convoy_raft::model::LinkState>,
    ) -> BoxFuture<'static, Result<(), String>> {
        self.0.report(cg, cg_id, sequencer_epoch, to, state, expect)
    }
}

impl DataPlane {
    /// Creates the data plane and starts the TCP NBD listener if configured.
    pub async fn start(
        node: NodeId,
        cfg: DataConfig,
        endpoint: Endpoint,
        writer: Arc<dyn ModelWriter>,
    ) -> anyhow::Result<Arc<Self>> {
        for dir in [
            cfg.data_dir.join("disks"),
            cfg.data_dir.join("replication"),
            cfg.socket_dir.clone(),
        ] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let plane = Arc::new(Self {
            node,
            images: Images::new(cfg.data_dir.join("disks")),
            exports: exports::Exports::new(
                cfg.socket_dir.clone(),
                cfg.nbd_tcp.map(|a| (a, cfg.nbd_tcp_server.tls.is_some())),
                cfg.nbd_limits,
                cfg.nbd_socket_group,
            ),
            cfg: cfg.clone(),
            endpoint,
            writer,
            replicas: Replicas::default(),
            domains: Mutex::new(HashMap::new()),
            routes: RwLock::new(HashMap::new()),
            route_version: watch::channel(0).0,
            mirrors: Mutex::new(HashMap::new()),
            peers: RwLock::new(HashMap::new()),
            view: watch::channel(Arc::new(View {
                model: ClusterModel::default(),
                plan: HostPlan::default(),
            }))
            .0,
            bulk: Arc::new(AtomicUsize::new(0)),
            syncs: Mutex::new(HashMap::new()),
            delta: std::sync::OnceLock::new(),
            guests: tokio::sync::Mutex::new(guests::Guests::default()),
            housekeeping: Mutex::new(()),
            snapshots_in_progress: Mutex::new(HashMap::new()),
            former_replicas: Mutex::new(HashMap::new()),
            settlement: crash::Settlement::default(),
            reconcile_soon: tokio::sync::Notify::new(),
        });
        let weak = Arc::downgrade(&plane);
        let resolver =
            move |peer: u64, binding: &convoy_delta::Binding, role: convoy_delta::Role| {
                weak.upgrade()
                    .and_then(|p| p.delta_offer(peer, binding, role))
            };
        let server = convoy_delta::DeltaServer::new(convoy_delta::DeltaConfig::default(), resolver)
            .map_err(|e| anyhow::anyhow!("cannot start the delta server: {e}"))?;
        let _ = plane.delta.set(server);
        tokio::spawn(gc::hash_warmer(Arc::downgrade(&plane)));
        if let Some(addr) = cfg.nbd_tcp {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for NBD on {addr} (key `nbd.tcp`)"))?;
            let server = convoy_nbd::Server::with_config(
                plane.exports.registry().clone(),
                cfg.nbd_tcp_server.clone(),
            );
            tokio::spawn(async move { server.serve_tcp(listener, std::future::pending()).await });
        }
        Ok(plane)
    }

    /// This host.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> &Path {
        self.exports.socket_dir()
    }

    /// The NBD URIs of an export on this host.
    pub fn uris(&self, export: &str) -> Vec<String> {
        self.exports.uris(export)
    }

    /// The URIs of `disk`'s writable export here, if it is exported here.
    pub fn disk_uris(&self, disk: DiskId) -> Vec<String> {
        let name = export_name(disk);
        if self.exports.epoch(&name).is_some() {
            self.exports.uris(&name)
        } else {
            Vec::new()
        }
    }

    /// Stages the exports of disks (id, size) for a VM arriving here by live migration
    /// (see [`exports::Exports::stage`]); this host must hold a copy of each. Returns
    /// what QEMU attaches each disk to.
    pub fn stage_exports(
        &self,
        disks: &[(DiskId, u64)],
    ) -> anyhow::Result<Vec<crate::qemu::DiskExport>> {
        let mut out = Vec::new();
        for (i, (disk, size)) in disks.iter().enumerate() {
            let Some(image) = self.images.get(*disk) else {
                self.unstage_exports(&disks[..i]);
                anyhow::bail!("this host holds no open copy of disk {disk}");
            };
            let name = export_name(*disk);
            let early_reads = Arc::new(ReadOnlyCopy::new(image));
            match self.exports.stage(&name, *size, early_reads) {
                Ok(socket) => out.push(crate::qemu::DiskExport {
                    export: name,
                    socket,
                }),
                Err(e) => {
                    self.unstage_exports(&disks[..i]);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Ends the staging of these disks' exports: the arrived VM runs here.
    pub fn seal_exports(&self, disks: &[DiskId]) {
        for disk in disks {
            self.exports.seal(&export_name(*disk));
        }
    }

    /// Undoes [`Self::stage_exports`] for disks no device came for.
    pub fn unstage_exports(&self, disks: &[(DiskId, u64)]) {
        for (disk, _) in disks {
            self.exports.unstage(&export_name(*disk));
        }
    }

    /// Whether each disk (id, epoch) is exported here at that epoch.
    pub fn exported_at(&self, disks: &[(DiskId, u64)]) -> bool {
        disks
            .iter()
            .all(|(d, epoch)| self.exports.epoch(&export_name(*d)) == Some(*epoch))
    }

    /// Disks whose image cannot be opened here, with why.
    pub fn disk_failures(&self) -> BTreeMap<DiskId, String> {
        self.images.failures()
    }

    /// Free bytes in the data directory's file system (0 if unknown). Blocking.
    pub fn free_bytes(&self) -> u64 {
        rustix::fs::statvfs(&self.cfg.data_dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(0)
    }

    /// Whether this host's image directory can hold sparse images of `sizes` bytes:
    /// creates a probe file of the largest size and removes it (sparse, so it costs no
    /// space). Catches the file system's own limit (ext4 with 4 KiB blocks: 16 TiB -
    /// 4 KiB) before a VM is created, instead of a create that fails later on the host.
    /// Blocking.
    pub fn probe_disks(&self, sizes: &[u64]) -> Result<(), String> {
        let Some(&largest) = sizes.iter().max() else {
            return Ok(());
        };
        let dir = self.images.dir();
        let path = dir.join(format!(".probe-{}.img", rand::random::<u64>()));
        let probed = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|f| f.set_len(largest));
        let _ = std::fs::remove_file(&path);
        probed.map_err(|e| {
            let hint = if e.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error()) {
                " (ext4 with 4 KiB blocks holds at most 16 TiB - 4 KiB; use a smaller disk, or XFS on that host)"
            } else {
                ""
            };
            format!(
                "node {} cannot hold a disk of {}: its file system refuses a file of that size in {}: {e}{hint}",
                self.node,
                crate::units::format_size(largest),
                dir.display()
            )
        })
    }

    /// Per disk, the bytes its local copy's image takes (0 when there is none). Blocking.
    pub fn copy_sizes(&self, disks: &[DiskId]) -> Vec<(DiskId, u64)> {
        use std::os::unix::fs::MetadataExt;
        disks
            .iter()
            .map(|d| {
                let used = convoy_store::image_paths(self.images.dir(), &d.to_string())
                    .ok()
                    .and_then(|[img, _, _]| std::fs::metadata(img).ok())
                    .map_or(0, |m| m.blocks() * 512);
                (*d, used)
            })
            .collect()
    }

    fn replication_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("replication")
    }

    fn peer_addr(&self, node: NodeId) -> Option<SocketAddr> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
    }

    // ---- routes ----

    /// The current route of `disk`'s writes from this host, with the routes' version (to
    /// wait for a change).
    pub fn route(&self, disk: DiskId) -> (u64, Option<Route>) {
        let version = *self.route_version.borrow();
        let route = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&disk)
            .cloned()
            // Not exported here (its VM moved away), but still ordered here: a writer
            // left over from before gets the sequencer's verdict (its epoch is stale).
            .or_else(|| self.sequencer_for(disk).map(Route::Local));
        (version, route)
    }

    /// Waits until the routes change from `seen`, or `deadline`; returns whether they did.
    pub async fn wait_route_change(&self, seen: u64, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.route_version.subscribe();
        let changed = rx.wait_for(|v| *v != seen);
        matches!(tokio::time::timeout_at(deadline, changed).await, Ok(Ok(_)))
    }

    /// The epoch of `disk` in the model this host last applied.
    pub fn model_epoch(&self, disk: DiskId) -> Option<u64> {
        self.view.borrow().model.disks.get(&disk).map(|d| d.epoch)
    }

    /// The sequencer of `disk`'s domain, if this host runs it.
    pub fn sequencer_for(&self, disk: DiskId) -> Option<Arc<Sequencer>> {
        lock(&self.domains)
            .values()
            .find(|d| d.disks.contains(&disk))
            .map(|d| Arc::clone(&d.seq))
    }

    /// The running sequencer of group `cg_id` (not handed over).
    fn group_sequencer(&self, cg_id: u64) -> Option<Arc<Sequencer>> {
        lock(&self.domains)
            .get(&DomainId::Cg(cg_id))
            .map(|d| Arc::clone(&d.seq))
            .filter(|s| !s.handed_over())
    }

    /// The sequencer of group `cg_id` once this host runs it at sequencer epoch `epoch` or
    /// later (waiting up to `timeout` for this host to apply a hand-over).
    pub async fn sequencer_at_least(
        &self,
        cg_id: u64,
        epoch: u64,
        timeout: Duration,
    ) -> Option<Arc<Sequencer>> {
        let mut rx = self.view.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(s) = self.group_sequencer(cg_id) {
                if s.sequencer_epoch() >= epoch {
                    return Some(s);
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    // ---- replica side ----

    /// This host's role for group `cg_id` as a replica.
    pub fn replica_role(&self, cg_id: u64) -> Option<ReplicaPlan> {
        self.replicas.role(cg_id)
    }

    /// This host's role for group `cg_id` once its plan has sequencer epoch `epoch` or
    /// later for it (waiting up to `timeout`), or the current role if that does not come.
    pub async fn replica_role_at_least(
        &self,
        cg_id: u64,
        epoch: u64,
        timeout: Duration,
    ) -> Option<ReplicaPlan> {
        let mut rx = self.view.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(r) = self.replicas.role(cg_id) {
                if r.sequencer_epoch >= epoch {
                    return Some(r);
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.replicas.role(cg_id);
            }
        }
    }

    /// Serialises streams of one group.
    pub fn replica_turn(&self, cg_id: u64) -> Arc<tokio::sync::Mutex<()>> {
        self.replicas.turn(cg_id)
    }

    /// Held (write) while a replica applies a batch of group `cg_id`, and (read) while a
    /// checker reads that copy, so the checker sees a state between batches.
    pub fn apply_lock(&self, cg_id: u64) -> Arc<RwLock<()>> {
        self.replicas.apply_lock(cg_id)
    }

    /// Records that this replica holds group `cg_id` durably through `seq`.
    pub fn note_applied(&self, cg_id: u64, seq: u64) {
        self.replicas.note_applied(cg_id, seq);
    }

    /// How far this host's replica of group `cg_id` applied.
    pub fn replica_applied(&self, cg_id: u64) -> u64 {
        self.replicas.applied(cg_id)
    }

    /// Lets delta sessions write group `cg_id`'s replica copy (seeding), or stops that.
    pub fn set_seeding(&self, cg_id: u64, on: bool) {
        self.replicas.set_seeding(cg_id, on);
    }

    /// Opens the replica's images for the group's disks. Blocking.
    pub fn open_replica_images(
        &self,
        disks: &[(DiskId, u64)],
    ) -> anyhow::Result<BTreeMap<DiskId, Arc<convoy_store::DiskImage>>> {
        disks
            .iter()
            .map(|(d, size)| Ok((*d, self.images.open(*d, *size)?)))
            .collect()
    }

    fn replica_state_path(&self, cg_id: u64) -> PathBuf {
        self.replication_dir().join(format!("cg-{cg_id}.replica"))
    }

    /// Opens the replica's progress record of a group. Blocking.
    pub fn open_replica_state(&self, cg_id: u64) -> anyhow::Result<(StateFile, ReplicaState)> {
        let path = self.replica_state_path(cg_id);
        StateFile::open(&path).with_context(|| format!("cannot open {}", path.display()))
    }

    /// Serves an inbound replication stream.
    pub async fn serve_stream(self: Arc<Self>, stream: convoy_transport::InboundStream) {
        let peer = stream.peer;
        if let Err(e) = receiver::serve(stream, self).await {
            tracing::info!(peer, error = %e, "replication stream ended with an error");
        }
    }

    /// Serves an inbound mirror stream (writes of a VM running on `peer`).
    pub async fn serve_mirror(self: Arc<Self>, stream: convoy_transport::InboundStream) {
        let peer = stream.peer;
        if let Err(e) = mirror::serve(stream, self).await {
            tracing::info!(peer, error = %e, "mirror stream ended with an error");
        }
    }

    /// Whether `peer` may write `disk` with `epoch`: the disk's VM runs there, or the
    /// host holds an active-active copy of its group. A write with an epoch newer than
    /// this host's model waits (briefly) for the model to catch up before it is judged.
    pub async fn may_write(&self, peer: NodeId, disk: DiskId, epoch: u64) -> Result<(), String> {
        let mut rx = self.view.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let verdict = write_verdict(&rx.borrow_and_update().model, peer, disk, epoch);
            match verdict {
                Ok(()) => return Ok(()),
                Err((why, true)) => {
                    // The writer knows a newer epoch: wait for this host's model.
                    if tokio::time::timeout_at(deadline, rx.changed())
                        .await
                        .is_err()
                    {
                        return Err(why);
                    }
                }
                Err((why, false)) => return Err(why),
            }
        }
    }

    // ---- status ----

    /// Status of group `cg_id` if this host sequences it (by id: a group created again
    /// under a deleted one's name is another group, with other links).
    pub fn group_status(&self, cg_id: u64) -> Option<GroupStatus> {
        let domains = lock(&self.domains);
        let d = domains.get(&DomainId::Cg(cg_id))?;
        let stats = &d.seq.stats;
        let last = d.seq.last_seq();
        let links = d.seq.link_status();
        Some(GroupStatus {
            last_seq: last,
            writes: stats.writes.load(Ordering::Relaxed),
            bytes_written: stats.bytes.load(Ordering::Relaxed),
            stale_epoch_refused: stats.stale_epoch.load(Ordering::Relaxed),
            throttled: stats.throttled.load(Ordering::Relaxed),
            journal_bytes: d.seq.journal_bytes(),
            links: d
                .senders
                .iter()
                .map(|(to, (_, r))| {
                    let r = r.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let l = links.get(to);
                    let acked = l.map_or(0, |l| l.acked);
                    (
                        *to,
                        LinkStatusView {
                            phase: r.phase,
                            acked_seq: acked,
                            last_seq: last,
                            lag_writes: l.map_or(last.saturating_sub(acked), |l| l.lag_writes),
                            lag_seconds: l.map_or(0.0, |l| l.lag_seconds),
                            resyncs: r.resyncs,
                            resync_chunks_sent: r.resync_chunks_sent,
                            resync_chunks_left: r.resync_chunks_left,
                            bytes_sent: r.bytes_sent,
                            resync_bytes_sent: r.resync_bytes_sent,
                            resync_bytes_total: r.resync_bytes_total,
                            resync_bytes_done: r.resync_bytes_done,
                            last_error: r.last_error,
                        },
                    )
                })
                .collect(),
            sync: lock(&self.syncs).get(&cg_id).map(delta::SyncRun::view),
        })
    }

    /// Per replica of group `cg_id` (if this host sequences it), the bytes it lacks, where
    /// the journal still holds every write it lacks.
    pub fn group_lag_bytes(&self, cg_id: u64) -> Option<BTreeMap<NodeId, Option<u64>>> {
        let domains = lock(&self.domains);
        let d = domains.get(&DomainId::Cg(cg_id))?;
        Some(
            d.seq
                .link_status()
                .into_iter()
                .map(|(to, l)| (to, l.lag_bytes))
                .collect(),
        )
    }

    /// The state `/metrics` shows: every group this host sequences with its links, and
    /// the disks whose image cannot be opened. Takes short locks only (no I/O).
    pub fn metrics(&self) -> DataPlaneMetrics {
        let domains = lock(&self.domains);
        let mut groups: Vec<GroupMetrics> = domains
            .values()
            .filter(|d| d.seq.cg_id().is_some())
            .map(|d| {
                let stats = &d.seq.stats;
                let last = d.seq.last_seq();
                let links = d.seq.link_status();
                let mut out: Vec<LinkMetrics> = d
                    .senders
                    .iter()
                    .map(|(to, (_, r))| {
                        let r = lock(r);
                        let l = links.get(to);
                        let acked = l.map_or(0, |l| l.acked);
                        LinkMetrics {
                            replica: *to,
                            state: l.map(|l| l.state),
                            phase: r.phase.clone(),
                            acked_seq: acked,
                            lag_writes: l.map_or(last.saturating_sub(acked), |l| l.lag_writes),
                            lag_seconds: l.map_or(0.0, |l| l.lag_seconds),
                            resyncs: r.resyncs,
                            bytes_sent: r.bytes_sent,
                            resync_bytes_sent: r.resync_bytes_sent,
                        }
                    })
                    .collect();
                out.sort_by_key(|l| l.replica);
                GroupMetrics {
                    cg: d.seq.name.clone(),
                    last_seq: last,
                    writes: stats.writes.load(Ordering::Relaxed),
                    bytes_written: stats.bytes.load(Ordering::Relaxed),
                    throttled: stats.throttled.load(Ordering::Relaxed),
                    journal_bytes: d.seq.journal_bytes(),
                    links: out,
                }
            })
            .collect();
        drop(domains);
        groups.sort_by(|a, b| a.cg.cmp(&b.cg));
        DataPlaneMetrics {
            groups,
            disk_open_failures: self.images.failures().into_keys().collect(),
        }
    }

    /// The volume of a local disk at its planned epoch, for a simulated guest.
    pub fn volume(self: &Arc<Self>, disk: DiskId, size: u64, epoch: u64) -> Volume {
        Volume::new(disk, size, epoch, Arc::downgrade(self))
    }

    /// Exposes the local copy of `disk` read-only; returns its URIs. Blocking.
    pub fn expose_readonly(
        self: &Arc<Self>,
        disk: DiskId,
        size: u64,
    ) -> anyhow::Result<Vec<String>> {
        let name = readonly_export_name(disk);
        if !self.images.has_file(disk) {
            anyhow::bail!("node {} holds no copy of disk {disk}", self.node);
        }
        if self.exports.epoch(&name).is_none() {
            let image = self.images.open(disk, size)?;
            self.exports.put(
                &name,
                Arc::new(ReadOnlyCopy::new(image)),
                "read-only copy",
                0,
            )?;
        }
        Ok(self.exports.uris(&name))
    }

    // ---- reconcile ----

    /// Brings this host's data plane in line with the model. Blocking.
    pub fn reconcile(self: &Arc<Self>, model: &ClusterModel) {
        let _housekeeping = lock(&self.housekeeping);
        let plan = host_plan(model, self.node);
        {
            let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
            for h in model.active_hosts() {
                if let Ok(a) = h.raft_addr.parse() {
                    peers.insert(h.id, a);
                }
            }
        }
        let wanted_images = plan.images();
        self.images.forget_failures_except(&wanted_images);
        self.stop_unplanned_domains(&plan);
        self.set_replica_roles(&plan);
        self.settle_replicas(&plan);
        for sp in plan.sequencers.values() {
            if let Err(e) = self.run_domain(sp) {
                tracing::warn!(domain = %sp.name, error = format!("{e:#}"), "cannot run a sequencer; will retry");
            }
        }
        // Every image the plan names is open (a replica's copy before its stream comes, an
        // export's before its first request); a failure is recorded per disk.
        for (disk, size) in &wanted_images {
            let _ = self.images.open(*disk, *size);
        }
        self.update_routes(&plan);
        self.update_exports(&plan);
        // Images of disks that left the model are deleted; read-only exports of them too.
        let gone: Vec<DiskId> = self
            .images
            .all()
            .into_iter()
            .map(|(d, _)| d)
            .filter(|d| !model.disks.contains_key(d))
            .collect();
        for disk in gone {
            self.exports.remove(&readonly_export_name(disk));
            self.images.delete(disk, "its disk was deleted");
        }
        self.view.send_replace(Arc::new(View {
            model: model.clone(),
            plan,
        }));
    }

    /// Stops sequencers the plan no longer gives this host, or whose disks or tenure
    /// changed (they reopen below).
    fn stop_unplanned_domains(&self, plan: &HostPlan) {
        let mut domains = lock(&self.domains);
        let stale: Vec<DomainId> = domains
            .iter()
            .filter(|(id, d)| {
                plan.sequencers.get(*id).is_none_or(|p| {
                    p.disks.iter().map(|x| x.id).collect::<Vec<_>>() != d.disks
                        || p.seq_start != d.seq.tenure_start()
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(d) = domains.remove(&id) {
                if !d.seq.handed_over() {
                    d.seq.close();
                }
                for (_, (stop, _)) in d.senders {
                    let _ = stop.send(true);
                }
                if let Some(cg) = id.cg_id() {
                    self.replicas.reset_applied(cg);
                }
                tracing::info!(domain = %d.seq.name, "sequencer stopped");
            }
        }
    }

    /// Replica roles from the plan. Groups that stopped being replicated here are noted
    /// for garbage collection.
    fn set_replica_roles(&self, plan: &HostPlan) {
        let before = self.replicas.roles();
        let roles: HashMap<u64, ReplicaPlan> = plan
            .replicas
            .iter()
            .map(|(id, r)| (*id, r.clone()))
            .collect();
        let mut former = lock(&self.former_replicas);
        for id in before.keys().filter(|id| !roles.contains_key(id)) {
            former.insert(*id, std::time::Instant::now());
        }
        for id in roles.keys() {
            former.remove(id);
        }
        drop(former);
        self.replicas.set_roles(roles);
    }

    /// Starts (or updates) the sequencer of one planned domain, its links and senders.
    fn run_domain(self: &Arc<Self>, sp: &SequencerPlan) -> anyhow::Result<()> {
        let running = lock(&self.domains)
            .get(&sp.domain)
            .map(|d| Arc::clone(&d.seq));
        let seq = match running {
            Some(s) => s,
            None if !self.settle_crash(sp)? => return Ok(()),
            None => self.open_domain(sp)?,
        };
        seq.set_sequencer_epoch(sp.sequencer_epoch);
        // Epochs move only forward; raising them is the fence (writes already in flight
        // finish; a fence barrier waits for them where a command needs it).
        let epochs: Vec<(DiskId, u64)> = sp.disks.iter().map(|d| (d.id, d.epoch)).collect();
        seq.raise_epochs(&epochs);
        let links: Vec<_> = sp.links.iter().map(|l| (l.to, l.mode, l.state)).collect();
        seq.set_links(&links);
        // Trackers first: every write from now on marks the link's dirty chunks.
        for (to, _, _) in &links {
            for image in seq.images().values() {
                if !image.trackers().contains(&tracker_name(*to)) {
                    image.start_tracking(&tracker_name(*to))?;
                }
            }
        }
        let mut domains = lock(&self.domains);
        let Some(domain) = domains.get_mut(&sp.domain) else {
            return Ok(());
        };
        domain.senders.retain(|to, (stop, _)| {
            let keep = links.iter().any(|(t, _, _)| t == to);
            if !keep {
                let _ = stop.send(true);
            }
            keep
        });
        for (to, _, _) in &links {
            if domain.senders.contains_key(to) {
                continue;
            }
            let Some(addr) = self.peer_addr(*to) else {
                continue;
            };
            let report = Arc::new(Mutex::new(LinkReport::default()));
            let (stop, stopped) = watch::channel(false);
            let sender = LinkSender {
                seq: Arc::clone(&domain.seq),
                to: *to,
                addr,
                endpoint: self.endpoint.clone(),
                tracker: tracker_name(*to),
                report: Arc::clone(&report),
                bulk: Arc::clone(&self.bulk),
            };
            tokio::spawn(sender.run(stopped));
            domain.senders.insert(*to, (stop, report));
        }
        drop(domains);
        // Drop trackers of links that went away.
        for image in seq.images().values() {
            for t in image.trackers() {
                if t.starts_with("link-") && !links.iter().any(|(to, _, _)| tracker_name(*to) == t)
                {
                    image.drop_tracking(&t)?;
                }
            }
        }
        Ok(())
    }

    /// Opens the sequencer of a domain this host starts to order: after the replica
    /// stream of the group (if this host held a replica) has ended, so nothing else writes
    /// the images. Blocking.
    fn open_domain(self: &Arc<Self>, sp: &SequencerPlan) -> anyhow::Result<Arc<Sequencer>> {
        let mut disks = Vec::new();
        for d in &sp.disks {
            disks.push((d.id, self.images.open(d.id, d.size)?, d.epoch));
        }
        let _turn = match sp.domain {
            DomainId::Cg(cg_id) => {
                let turn = self.replicas.turn(cg_id);
                let started = std::time::Instant::now();
                loop {
                    if let Ok(g) = turn.clone().try_lock_owned() {
                        break Some(g);
                    }
                    if started.elapsed() > Duration::from_secs(3) {
                        anyhow::bail!(
                            "the replica stream of '{}' still runs; the sequencer opens once it ends",
                            sp.name
                        );
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            DomainId::Vm(_) => None,
        };
        if let DomainId::Cg(cg_id) = sp.domain {
            // This host writes the images now: a replica progress record from an earlier
            // role would lie about them.
            let path = self.replica_state_path(cg_id);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                let _ = std::fs::File::open(self.replication_dir()).and_then(|d| d.sync_all());
            }
            self.replicas.reset_applied(cg_id);
        }
        let legacy = match sp.domain {
            DomainId::Cg(_) => sp.name.clone(),
            DomainId::Vm(_) => sp.name.replace(':', "-"),
        };
        let spec = SequencerSpec {
            domain: sp.domain,
            name: sp.name.clone(),
            disks,
            sequencer_epoch: sp.sequencer_epoch,
            seq_start: sp.seq_start,
            seq_path: sequencer::seq_record_path(&self.replication_dir(), sp.domain),
            lag_path: Some(sequencer::lag_record_path(
                &self.replication_dir(),
                sp.domain,
            )),
            legacy_seq_path: Some(sequencer::legacy_seq_record_path(
                &self.replication_dir(),
                &legacy,
            )),
            floor: sequencer::host_sequence_floor(&self.replication_dir()),
        };
        let cfg = SequencerConfig {
            journal_limit: self.cfg.journal_limit,
            sync_timeout: self.cfg.sync_timeout,
        };
        let reporter: Arc<dyn LinkReporter> = Arc::new(Reporter(Arc::clone(&self.writer)));
        let seq = Sequencer::open(spec, cfg, reporter)?;
        tracing::info!(domain = %sp.name, first_seq = seq.next_seq(), epoch = sp.sequencer_epoch, "sequencer started");
        tokio::spawn(record_lag(Arc::downgrade(&seq)));
        lock(&self.domains).insert(
            sp.domain,
            Domain {
                seq: Arc::clone(&seq),
                disks: sp.disks.iter().map(|d| d.id).collect(),
                senders: HashMap::new(),
            },
        );
        Ok(seq)
    }

    /// Routes every planned export's writes: to this host's sequencer, or to a mirror
    /// stream to the group's sequencer. Waiting writers are woken when a route changes.
    fn update_routes(&self, plan: &HostPlan) {
        let mut routes = HashMap::new();
        let mut used_mirrors = Vec::new();
        for (disk, e) in &plan.exports {
            let route = match &e.kind {
                ExportKind::Local { .. } => self.sequencer_for(*disk).map(Route::Local),
                ExportKind::Mirrored {
                    cg_id,
                    sequencer,
                    sequencer_epoch,
                } => {
                    let key = (*cg_id, *sequencer, *sequencer_epoch);
                    let client = self.peer_addr(*sequencer).map(|addr| {
                        Arc::clone(lock(&self.mirrors).entry(key).or_insert_with(|| {
                            Arc::new(MirrorClient::new(
                                *cg_id,
                                *sequencer,
                                *sequencer_epoch,
                                addr,
                                self.endpoint.clone(),
                                self.cfg.sync_timeout * 5,
                            ))
                        }))
                    });
                    used_mirrors.push(key);
                    match (client, self.images.get(*disk)) {
                        (Some(client), Some(image)) => Some(Route::Mirrored {
                            client,
                            cg_id: *cg_id,
                            image,
                        }),
                        _ => None,
                    }
                }
            };
            if let Some(r) = route {
                routes.insert(*disk, r);
            }
        }
        lock(&self.mirrors).retain(|k, _| used_mirrors.contains(k));
        let changed = {
            let current = self.routes.read().unwrap_or_else(|p| p.into_inner());
            current.len() != routes.len()
                || routes.iter().any(|(d, r)| match (current.get(d), r) {
                    (Some(Route::Local(a)), Route::Local(b)) => !Arc::ptr_eq(a, b),
                    (
                        Some(Route::Mirrored { client: a, .. }),
                        Route::Mirrored { client: b, .. },
                    ) => !Arc::ptr_eq(a, b),
                    _ => true,
                })
        };
        if changed {
            *self.routes.write().unwrap_or_else(|p| p.into_inner()) = routes;
            self.route_version.send_modify(|v| *v += 1);
        }
    }

    /// Writable exports for every planned disk. When the epoch moves, new connections get
    /// a volume at the new epoch while connections opened before keep the old one, whose
    /// writes are refused as stale (that is the fence).
    fn update_exports(self: &Arc<Self>, plan: &HostPlan) {
        // A disk whose VM moved away keeps its export here while this host holds a copy:
        // its volume stays at the old epoch, so a writer left over from before is refused
        // (and counted) rather than silently disconnected.
        let copies = plan.images();
        for name in self.exports.names() {
            let held = copies.keys().any(|d| export_name(*d) == name);
            if !held && !name.ends_with("-ro") {
                self.exports.remove(&name);
            }
        }
        for (disk, e) in &plan.exports {
            let name = export_name(*disk);
            if self.exports.epoch(&name) == Some(e.disk.epoch) {
                continue;
            }
            if self.images.get(*disk).is_none() {
                // Its image failed to open (recorded): no export until it does.
                continue;
            }
            let volume = Arc::new(self.volume(*disk, e.disk.size, e.disk.epoch));
            let what = match e.kind {
                ExportKind::Local { .. } => format!("disk {disk}"),
                ExportKind::Mirrored { sequencer, .. } => {
                    format!("disk {disk} (writes ordered by node {sequencer})")
                }
            };
            if let Err(err) = self.exports.put(&name, volume, &what, e.disk.epoch) {
                tracing::warn!(
                    disk,
                    error = format!("{err:#}"),
                    "cannot export a disk; will retry"
                );
            }
        }
    }

    /// Closes every image cleanly (agent shutdown). Blocking.
    pub fn shutdown(&self) {
        for (_, d) in lock(&self.domains).drain() {
            d.seq.close();
            for (_, (stop, _)) in d.senders {
                let _ = stop.send(true);
            }
        }
        self.images.close_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_raft::model::ReplicationMode;

    fn apply(m: &mut ClusterModel, cmd: Command) {
        if let Err(e) = m.apply(0, &cmd) {
            panic!("{} refused: {e}", cmd.kind());
        }
    }

    /// VM `a` on host 1 in group `g`, with a copy of `mode` on host 2; host 3 holds none.
    fn model(mode: ReplicationMode) -> (ClusterModel, DiskId) {
        let mut m = ClusterModel::default();
        for id in 1..=3 {
            apply(
                &mut m,
                Command::RegisterHost {
                    id,
                    raft_addr: format!("r{id}"),
                    admin_addr: format!("a{id}"),
                },
            );
        }
        apply(
            &mut m,
            Command::CreateVm {
                name: "a".into(),
                host: 1,
                disk_sizes: vec![1 << 20],
                workload: None,
                created_at_ms: 0,
            },
        );
        apply(
            &mut m,
            Command::CreateCg {
                name: "g".into(),
                vms: vec!["a".into()],
            },
        );
        apply(
            &mut m,
            Command::AddReplica {
                cg: "g".into(),
                to: 2,
                mode,
            },
        );
        let disk = *m.disks.keys().next().expect("a disk");
        (m, disk)
    }

    #[test]
    fn only_the_host_a_disks_vm_runs_on_or_an_active_active_copy_may_write_it() {
        let (m, disk) = model(ReplicationMode::Sync);
        let epoch = m.disks[&disk].epoch;
        assert_eq!(write_verdict(&m, 1, disk, epoch), Ok(()));
        // A replica that is not active-active, or a host with no copy, is refused.
        for peer in [2, 3] {
            let (why, newer) = write_verdict(&m, peer, disk, epoch).unwrap_err();
            assert!(
                why.contains(&format!("node {peer} may not write disk {disk}")),
                "{why}"
            );
            assert!(!newer);
        }
        // A writer that knows a newer epoch than this model is told the model may lag.
        assert!(write_verdict(&m, 3, disk, epoch + 1).unwrap_err().1);
        assert!(
            write_verdict(&m, 1, disk + 1, epoch).is_err(),
            "unknown disk"
        );

        let (m, disk) = model(ReplicationMode::ActiveActiveSync);
        assert_eq!(write_verdict(&m, 2, disk, epoch), Ok(()));
        assert!(write_verdict(&m, 3, disk, epoch).is_err());
    }
}
