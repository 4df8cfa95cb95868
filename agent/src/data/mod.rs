//! The data plane of one host: disk images, write pipelines (sequencers), replication
//! senders and receivers, and the NBD exports, all driven by the replicated model.
//!
//! [`DataPlane::reconcile`] is level-triggered: on every applied Raft entry it compares what
//! the model says this host should serve with what runs, and starts or stops pieces. So a
//! restarted agent, a missed event or a crash in the middle all converge the same way.

pub mod guests;
pub mod journal;
pub mod pipeline;
pub mod receiver;
pub mod replica_state;
pub mod sender;
pub mod volume;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use anyhow::Context;
use convoy_nbd::{ExportRegistry, Server};
use convoy_raft::model::{ClusterModel, DiskId, LinkState, NodeId, ReplicationMode};
use convoy_store::DiskImage;
use convoy_transport::Endpoint;
use serde::Serialize;
use tokio::sync::watch;

use pipeline::{LinkReporter, Pipeline};
use replica_state::{ReplicaState, StateFile};
use sender::{LinkReport, LinkSender};
use volume::{ReadOnlyCopy, Volume};

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
    /// Journal limit per group, bytes; beyond it a lagging replica resyncs from dirty chunks.
    pub journal_limit: u64,
    /// How long a synchronous write waits for its replica before marking it outdated.
    pub sync_timeout: Duration,
}

/// What this host must do for a group it replicates.
#[derive(Clone, Debug)]
pub struct ReplicaRole {
    /// Group name.
    pub cg: String,
    /// The primary allowed to stream to us.
    pub primary: NodeId,
    /// The group's epoch in the model.
    pub epoch: u64,
    /// Disks and sizes, in group order.
    pub disks: Vec<(DiskId, u64)>,
    /// Mode of our link (active-active modes make this copy writable).
    pub mode: ReplicationMode,
}

/// A running pipeline and its link senders.
struct Domain {
    pipeline: Arc<Pipeline>,
    disks: Vec<DiskId>,
    senders: HashMap<NodeId, (watch::Sender<bool>, Arc<Mutex<LinkReport>>)>,
}

/// One exported disk (writable volume or read-only copy).
struct Export {
    name: String,
    socket: PathBuf,
    stop: watch::Sender<bool>,
    epoch: u64,
}

/// Status of a group's copies as the primary sees it, for `convoy cg show`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct GroupStatus {
    /// Last sequence assigned.
    pub last_seq: u64,
    /// Writes acknowledged since the pipeline started.
    pub writes: u64,
    /// Writes refused for a stale epoch.
    pub stale_epoch_refused: u64,
    /// Per replica host.
    pub links: BTreeMap<NodeId, LinkReport>,
}

/// Result of `convoy cg sync`, per disk.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SyncReport {
    /// Compare-delta (true) or full copy.
    pub compare: bool,
    /// One entry per disk.
    pub disks: Vec<DiskSync>,
}

/// One disk's delta session.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct DiskSync {
    /// Disk id.
    pub disk: DiskId,
    /// Its size.
    pub size: u64,
    /// Chunks of the disk.
    pub chunks_total: u64,
    /// Hash tree nodes compared.
    pub hash_nodes_compared: u64,
    /// Bytes of hashes exchanged.
    pub hash_bytes: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Chunk bytes sent.
    pub data_bytes_sent: u64,
    /// All bytes of the session.
    pub wire_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// The host's data plane.
pub struct DataPlane {
    node: NodeId,
    /// Delta sessions (either side) running on this host; background hashing waits.
    bulk_transfers: Arc<AtomicUsize>,
    cfg: DataConfig,
    endpoint: Endpoint,
    reporter: Arc<dyn LinkReporter>,
    images: Mutex<HashMap<DiskId, Arc<DiskImage>>>,
    domains: Mutex<HashMap<String, Domain>>,
    disk_domain: RwLock<HashMap<DiskId, Arc<Pipeline>>>,
    replica_roles: RwLock<HashMap<u64, ReplicaRole>>,
    replica_turns: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// Held by a reconcile and by garbage collection, so neither sees the other half done.
    housekeeping: Mutex<()>,
    /// Snapshot directories being created (`None`) or recorded in Raft at an instant:
    /// garbage collection leaves them alone until it reads a model that includes them.
    snapshots_in_progress: Mutex<HashMap<PathBuf, Option<std::time::Instant>>>,
    exports: Mutex<HashMap<String, Export>>,
    registry: ExportRegistry,
    peers: RwLock<HashMap<NodeId, std::net::SocketAddr>>,
    guests: tokio::sync::Mutex<guests::Guests>,
    apply_locks: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
    /// The latest model this host reconciled against (for the delta resolver).
    model: RwLock<ClusterModel>,
    delta: std::sync::OnceLock<convoy_delta::DeltaServer>,
    /// Per replicated group: what this copy applied durably (for active-active writers).
    replica_applied: Mutex<HashMap<u64, watch::Sender<u64>>>,
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

impl DataPlane {
    /// Creates the data plane and starts the TCP NBD listener if configured.
    pub async fn start(
        node: NodeId,
        cfg: DataConfig,
        endpoint: Endpoint,
        reporter: Arc<dyn LinkReporter>,
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
            cfg: cfg.clone(),
            endpoint,
            reporter,
            images: Mutex::new(HashMap::new()),
            domains: Mutex::new(HashMap::new()),
            disk_domain: RwLock::new(HashMap::new()),
            replica_roles: RwLock::new(HashMap::new()),
            bulk_transfers: Arc::new(AtomicUsize::new(0)),
            replica_turns: Mutex::new(HashMap::new()),
            housekeeping: Mutex::new(()),
            snapshots_in_progress: Mutex::new(HashMap::new()),
            exports: Mutex::new(HashMap::new()),
            registry: ExportRegistry::with_limits(cfg.nbd_limits),
            peers: RwLock::new(HashMap::new()),
            guests: tokio::sync::Mutex::new(guests::Guests::default()),
            apply_locks: Mutex::new(HashMap::new()),
            model: RwLock::new(ClusterModel::default()),
            delta: std::sync::OnceLock::new(),
            replica_applied: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&plane);
        let resolver = move |peer: u64, binding: &convoy_delta::Binding| {
            weak.upgrade().and_then(|p| p.delta_offer(peer, binding))
        };
        let server = convoy_delta::DeltaServer::new(convoy_delta::DeltaConfig::default(), resolver)
            .map_err(|e| anyhow::anyhow!("cannot start the delta server: {e}"))?;
        let _ = plane.delta.set(server);
        tokio::spawn(hash_warmer(Arc::downgrade(&plane)));
        if let Some(addr) = cfg.nbd_tcp {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for NBD on {addr} (key `nbd.tcp`)"))?;
            let server = Server::with_config(plane.registry.clone(), cfg.nbd_tcp_server.clone());
            tokio::spawn(async move { server.serve_tcp(listener, std::future::pending()).await });
        }
        Ok(plane)
    }

    fn disks_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("disks")
    }

    /// The NBD URIs of an export on this host.
    pub fn uris(&self, export: &str) -> Vec<String> {
        let socket = self.cfg.socket_dir.join(format!("{export}.sock"));
        let mut out = vec![format!("nbd+unix:///{export}?socket={}", socket.display())];
        if let Some(tcp) = self.cfg.nbd_tcp {
            let scheme = if self.cfg.nbd_tcp_server.tls.is_some() {
                "nbds"
            } else {
                "nbd"
            };
            out.push(format!("{scheme}://{tcp}/{export}"));
        }
        out
    }

    /// Opens (creating if needed) the local image of `disk`.
    fn image(&self, disk: DiskId, size: u64) -> anyhow::Result<Arc<DiskImage>> {
        let mut images = lock(&self.images);
        if let Some(img) = images.get(&disk) {
            return Ok(Arc::clone(img));
        }
        let dir = self.disks_dir();
        let id = disk.to_string();
        let [img_path, _, _] = convoy_store::image_paths(&dir, &id)?;
        let image = if img_path.exists() {
            DiskImage::open(&dir, &id)
                .with_context(|| format!("cannot open the image of disk {disk}"))?
        } else {
            DiskImage::create(&dir, &id, size)
                .with_context(|| format!("cannot create the image of disk {disk}"))?
        };
        if image.size() != size {
            anyhow::bail!(
                "image of disk {disk} has {} bytes but the model says {size}",
                image.size()
            );
        }
        let image = Arc::new(image);
        images.insert(disk, Arc::clone(&image));
        Ok(image)
    }

    /// The pipeline that writes `disk`, if this host is its writer.
    pub fn pipeline_for(&self, disk: DiskId) -> Option<Arc<Pipeline>> {
        self.disk_domain
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&disk)
            .cloned()
    }

    /// This host's role for group `cg_id` as a replica.
    pub fn replica_role(&self, cg_id: u64) -> Option<ReplicaRole> {
        self.replica_roles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cg_id)
            .cloned()
    }

    /// Held (write) while a replica applies a batch of group `cg_id`, and (read) while a
    /// checker reads that copy, so the checker sees a state between batches.
    pub fn apply_lock(&self, cg_id: u64) -> Arc<RwLock<()>> {
        Arc::clone(lock(&self.apply_locks).entry(cg_id).or_default())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    /// Starts, restarts (after a fence) and stops simulated guests to match the model.
    pub async fn reconcile_guests(self: &Arc<Self>, model: &ClusterModel) {
        let mut guests = self.guests.lock().await;
        let mut want = Vec::new();
        for vm in model
            .vms
            .values()
            .filter(|v| v.host == self.node && v.running)
        {
            let Some(workload) = &vm.workload else {
                continue;
            };
            let disks = model.vm_disks(vm);
            let Some(first) = disks.first() else { continue };
            let Some(pipeline) = self.pipeline_for(first.id) else {
                continue;
            };
            want.push((
                vm.name.clone(),
                vm.id,
                workload.clone(),
                disks,
                pipeline.epoch(),
            ));
        }
        for name in guests.names() {
            let keep = want
                .iter()
                .any(|(n, _, _, _, e)| *n == name && guests.is_running(n, *e));
            if !keep {
                if let Some(handle) = guests.take(&name) {
                    let stats = handle.stop().await;
                    tracing::info!(vm = %name, acked = stats.writes_acked, failed = stats.writes_failed, "simulated guest stopped");
                    guests.stopped(&name, stats);
                }
            }
        }
        for (name, vm_id, workload, disks, epoch) in want {
            if guests.is_running(&name, epoch) {
                continue;
            }
            let volumes: Option<Vec<(Volume, u64)>> = disks
                .iter()
                .map(|d| self.volume(d.id).map(|v| (v, d.size)))
                .collect();
            let Some(volumes) = volumes else { continue };
            if let Err(e) =
                guests.start(&self.cfg.data_dir, &name, vm_id, &workload, volumes, epoch)
            {
                tracing::warn!(vm = %name, error = format!("{e:#}"), "cannot start the simulated guest");
            }
        }
    }

    /// Stats of `vm`'s simulated guest on this host.
    pub async fn guest_stats(&self, vm: &str) -> Option<convoy_guest::GuestStats> {
        self.guests.lock().await.stats(vm)
    }

    /// Verifies this host's copies of `vms` against their logs (fetched with `fetch_log`
    /// when they live on another host).
    pub fn verify(
        &self,
        vms: &[guests::VmToVerify],
        logs: &[Vec<convoy_guest::LogRecord>],
        mode: convoy_guest::VerifyMode,
        freeze: Option<u64>,
    ) -> anyhow::Result<convoy_guest::VerifyReport> {
        let mut readers = Vec::new();
        for vm in vms {
            let images: anyhow::Result<Vec<Arc<DiskImage>>> = vm
                .disks
                .iter()
                .map(|(d, size)| {
                    if !lock(&self.images).contains_key(d) && !self.has_image_file(*d) {
                        anyhow::bail!(
                            "node {} holds no copy of disk {d} of VM '{}'",
                            self.node,
                            vm.name
                        );
                    }
                    self.image(*d, *size)
                })
                .collect();
            readers.push(guests::LocalCopy { images: images? });
        }
        let lock_handle = freeze.map(|cg| self.apply_lock(cg));
        let _frozen = lock_handle
            .as_ref()
            .map(|l| l.read().unwrap_or_else(|p| p.into_inner()));
        let copies: Vec<convoy_guest::VmCopy<'_>> = vms
            .iter()
            .zip(&readers)
            .zip(logs)
            .map(|((vm, reader), records)| convoy_guest::VmCopy {
                vm_id: vm.vm_id,
                records,
                reader,
            })
            .collect();
        Ok(convoy_guest::verify(
            mode,
            &copies,
            &convoy_guest::VerifyOptions::default(),
        )?)
    }

    fn has_image_file(&self, disk: DiskId) -> bool {
        convoy_store::image_paths(&self.disks_dir(), &disk.to_string())
            .is_ok_and(|[img, _, _]| img.exists())
    }

    /// What this host offers a delta session from `peer`: the destination of a group's
    /// disk it is neither primary nor live replica of (a live replica is kept by its
    /// replication stream, which must stay the only writer).
    fn delta_offer(
        &self,
        peer: u64,
        binding: &convoy_delta::Binding,
    ) -> Option<convoy_delta::Offer> {
        let model = self.model.read().unwrap_or_else(|p| p.into_inner());
        let cg = model.cgs.values().find(|c| c.id == binding.cg)?;
        if cg.primary != peer
            || cg.primary == self.node
            || cg.replicas.iter().any(|r| r.to == self.node)
        {
            return None;
        }
        let disk = model
            .cg_disks(cg)
            .into_iter()
            .find(|d| d.id == binding.disk)?;
        let epoch = model.cg_epoch(cg);
        drop(model);
        let image = self.image(disk.id, disk.size).ok()?;
        Some(convoy_delta::Offer {
            expect: convoy_delta::Expect {
                cg: binding.cg,
                disk: disk.id,
                min_epoch: epoch,
            },
            role: convoy_delta::Role::Destination,
            image,
        })
    }

    /// Serves an inbound delta stream.
    pub async fn serve_delta(self: Arc<Self>, stream: convoy_transport::InboundStream) {
        let peer = stream.peer;
        let Some(server) = self.delta.get() else {
            return;
        };
        let _bulk = BulkTransfer::start(&self.bulk_transfers);
        match server.serve(stream).await {
            Ok(convoy_delta::Served::Completed(report)) => {
                tracing::info!(peer, disk = report.binding.disk, "delta session completed");
            }
            Ok(_) => {}
            Err(e) => tracing::info!(peer, error = %e, "delta session failed"),
        }
    }

    /// Brings `to`'s copy of group `cg` (this host is its primary) up to date with delta
    /// sessions, disk by disk; `compare` chooses compare-delta over a full copy.
    pub async fn sync_to(&self, cg: &str, to: NodeId, compare: bool) -> anyhow::Result<SyncReport> {
        let _bulk = BulkTransfer::start(&self.bulk_transfers);
        let (cg_id, epoch, disks, addr) = {
            let model = self.model.read().unwrap_or_else(|p| p.into_inner());
            let group = model
                .cgs
                .get(cg)
                .with_context(|| format!("group '{cg}' not found"))?;
            if group.primary != self.node {
                anyhow::bail!("node {} is not the primary of '{cg}'", self.node);
            }
            if to == self.node {
                anyhow::bail!("node {to} is the primary itself");
            }
            if group.replicas.iter().any(|r| r.to == to) {
                anyhow::bail!(
                    "node {to} holds a live replica of '{cg}', kept up to date by replication (see `convoy cg show {cg}`)"
                );
            }
            let host = model
                .hosts
                .get(&to)
                .filter(|h| !h.retired)
                .with_context(|| format!("node {to} is not an active host"))?;
            let addr: std::net::SocketAddr = host
                .raft_addr
                .parse()
                .with_context(|| format!("bad address of node {to}"))?;
            (group.id, model.cg_epoch(group), model.cg_disks(group), addr)
        };
        let mode = if compare {
            convoy_delta::Mode::CompareDelta
        } else {
            convoy_delta::Mode::FullCopy
        };
        let mut report = SyncReport {
            compare,
            disks: Vec::new(),
        };
        for d in disks {
            let pipeline = self
                .pipeline_for(d.id)
                .with_context(|| format!("disk {} is not written here", d.id))?;
            let image = Arc::clone(
                pipeline
                    .image(d.id)
                    .with_context(|| format!("no image of disk {}", d.id))?,
            );
            let session = convoy_delta::Session {
                cg: cg_id,
                disk: d.id,
                epoch,
            };
            let stats = convoy_delta::push(
                &self.endpoint,
                to,
                addr,
                session,
                mode,
                image,
                &convoy_delta::DeltaConfig::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("disk {}: {e}", d.id))?;
            report.disks.push(DiskSync {
                disk: d.id,
                size: d.size,
                chunks_total: stats.chunks_total,
                hash_nodes_compared: stats.chunks_compared,
                hash_bytes: stats.hash_bytes,
                chunks_sent: stats.chunks_sent,
                data_bytes_sent: stats.data_bytes_sent,
                wire_bytes: stats.wire_bytes,
                seconds: stats.elapsed.as_secs_f64(),
            });
        }
        Ok(report)
    }

    fn applied_sender(&self, cg_id: u64) -> watch::Sender<u64> {
        lock(&self.replica_applied)
            .entry(cg_id)
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }

    /// Records that this replica holds group `cg_id` durably through `seq`.
    pub fn note_applied(&self, cg_id: u64, seq: u64) {
        self.applied_sender(cg_id).send_if_modified(|a| {
            let moved = seq > *a;
            *a = (*a).max(seq);
            moved
        });
    }

    /// Waits until this replica holds group `cg_id` through `seq`.
    pub async fn wait_applied(&self, cg_id: u64, seq: u64) -> anyhow::Result<()> {
        let mut rx = self.applied_sender(cg_id).subscribe();
        let waited =
            tokio::time::timeout(self.cfg.sync_timeout * 5, rx.wait_for(|a| *a >= seq)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => anyhow::bail!(
                "the replication stream did not deliver write {seq} to this copy in time"
            ),
        }
    }

    /// Sends a write made on an active-active copy to the group's sequencer; returns the
    /// sequence number it got.
    pub async fn mirrored_write(
        &self,
        primary: NodeId,
        disk: DiskId,
        offset: u64,
        payload: wire::Payload,
        fua: bool,
        epoch: u64,
    ) -> anyhow::Result<u64> {
        let addr = self
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&primary)
            .copied()
            .with_context(|| format!("no address for node {primary}"))?;
        let req = crate::node::rpc::ForwardRequest::Local(
            crate::node::rpc::LocalRequest::MirroredWrite {
                disk,
                offset,
                payload,
                fua,
                epoch,
            },
        );
        let bytes = convoy_codec::encode(&req)?;
        let reply = self
            .endpoint
            .request(
                primary,
                addr,
                convoy_transport::StreamKind::Forward,
                &bytes,
                self.cfg.sync_timeout * 5,
            )
            .await?;
        match convoy_codec::decode::<crate::node::rpc::ForwardResponse>(&reply)? {
            crate::node::rpc::ForwardResponse::Local(json) => Ok(serde_json::from_str(&json)?),
            crate::node::rpc::ForwardResponse::Failed(f) => {
                anyhow::bail!("the sequencer refused the write: {f:?}")
            }
            other => anyhow::bail!("unexpected answer from the sequencer: {other:?}"),
        }
    }

    fn snapshot_dir(&self, cg_id: u64, name: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join("snapshots")
            .join(format!("cg-{cg_id}"))
            .join(name)
    }

    /// Takes a crash-consistent snapshot of every disk of group `cg` (this host is its
    /// primary). Writes are held back only while the copies start (microseconds); the
    /// copying runs while guests keep writing, each write first saving the chunks it is
    /// about to change (copy-before-write). Returns the last sequence number the snapshot
    /// contains, once the copies are complete and durable. Blocking.
    pub fn snapshot_create(&self, cg: &str, name: &str) -> anyhow::Result<u64> {
        convoy_raft::model::validate_name("snapshot name", name)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (pipeline, cg_id) = {
            let domains = lock(&self.domains);
            let d = domains
                .get(cg)
                .with_context(|| format!("node {} is not the primary of '{cg}'", self.node))?;
            (Arc::clone(&d.pipeline), d.pipeline.cg_id)
        };
        let dir = self.snapshot_dir(cg_id, name);
        if dir.exists() {
            anyhow::bail!(
                "snapshot '{name}' of '{cg}' already exists on node {}",
                self.node
            );
        }
        lock(&self.snapshots_in_progress).insert(dir.clone(), None);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            lock(&self.snapshots_in_progress).remove(&dir);
            return Err(e.into());
        }
        // The point in time: every disk's copy starts with no write in flight.
        let (begun, last) = pipeline.with_writes_paused(|images| {
            let mut started: Vec<Arc<DiskImage>> = Vec::new();
            for (disk, image) in images {
                if let Err(e) = image.live_snapshot_begin(&dir, &disk.to_string()) {
                    started.iter().for_each(|i| i.live_snapshot_abort());
                    return Err(e);
                }
                started.push(Arc::clone(image));
            }
            Ok(started)
        });
        let copied = begun.map_err(anyhow::Error::from).and_then(|images| {
            let copy = || -> anyhow::Result<()> {
                for image in &images {
                    while !image.live_snapshot_step(64)? {}
                    image.live_snapshot_finish()?.close()?;
                }
                Ok(())
            };
            copy().inspect_err(|_| images.iter().for_each(|i| i.live_snapshot_abort()))
        });
        if let Err(e) = copied {
            let _ = std::fs::remove_dir_all(&dir);
            lock(&self.snapshots_in_progress).remove(&dir);
            return Err(e.context(format!("cannot snapshot '{cg}'")));
        }
        Ok(last)
    }

    /// The snapshot was recorded in Raft: a model read after a barrier started from now on
    /// lists it (or its deletion), so garbage collection may judge it by the model.
    pub fn snapshot_recorded(&self, cg_id: u64, name: &str) {
        let dir = self.snapshot_dir(cg_id, name);
        if let Some(at) = lock(&self.snapshots_in_progress).get_mut(&dir) {
            *at = Some(std::time::Instant::now());
        }
    }

    /// Deletes a snapshot's files on this host.
    pub fn snapshot_delete_files(&self, cg_id: u64, name: &str) {
        let dir = self.snapshot_dir(cg_id, name);
        let _ = std::fs::remove_dir_all(&dir);
        lock(&self.snapshots_in_progress).remove(&dir);
    }

    /// Rewrites group `cg`'s disks with snapshot `name`'s content, through the pipeline, so
    /// replicas follow: only chunks whose hashes differ are written. Returns chunks written.
    pub async fn snapshot_restore(&self, cg: &str, name: &str) -> anyhow::Result<u64> {
        let pipeline = {
            let domains = lock(&self.domains);
            let d = domains
                .get(cg)
                .with_context(|| format!("node {} is not the primary of '{cg}'", self.node))?;
            Arc::clone(&d.pipeline)
        };
        let dir = self.snapshot_dir(pipeline.cg_id, name);
        if !dir.exists() {
            anyhow::bail!(
                "snapshot '{name}' of '{cg}' has no files on node {}",
                self.node
            );
        }
        let mut written = 0;
        for (disk, image) in pipeline.images().clone() {
            let dir2 = dir.clone();
            let snap = Arc::new(
                tokio::task::spawn_blocking(move || DiskImage::open(&dir2, &disk.to_string()))
                    .await??,
            );
            let chunk = u64::from(image.geometry().chunk_size());
            for c in 0..image.chunk_count() {
                let live = Arc::clone(&image).chunk_hash_async(c).await?;
                let old = Arc::clone(&snap).chunk_hash_async(c).await?;
                if live == old {
                    continue;
                }
                let offset = c * chunk;
                let len = chunk.min(image.size() - offset) as usize;
                let data = Arc::clone(&snap).read_async(offset, len).await?;
                let payload = if convoy_store::is_zero(&data) {
                    wire::Payload::Zeroes(len as u64)
                } else {
                    wire::Payload::Data(data)
                };
                pipeline
                    .write(disk, offset, payload, false, pipeline.epoch())
                    .await?;
                written += 1;
            }
            pipeline.flush_disk(disk).await?;
            let _ = snap.close();
        }
        Ok(written)
    }

    /// Serialises streams of one group.
    pub fn replica_turn(&self, cg_id: u64) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.replica_turns).entry(cg_id).or_default())
    }

    /// Opens the replica's images for the group's disks.
    pub fn open_replica_images(
        &self,
        disks: &[(DiskId, u64)],
    ) -> anyhow::Result<BTreeMap<DiskId, Arc<DiskImage>>> {
        disks
            .iter()
            .map(|(d, size)| Ok((*d, self.image(*d, *size)?)))
            .collect()
    }

    /// Opens the replica's progress record of a group.
    pub fn open_replica_state(&self, cg_id: u64) -> anyhow::Result<(StateFile, ReplicaState)> {
        let path = self
            .cfg
            .data_dir
            .join("replication")
            .join(format!("cg-{cg_id}.replica"));
        StateFile::open(&path).with_context(|| format!("cannot open {}", path.display()))
    }

    fn resync_dir(&self, cg_id: u64) -> PathBuf {
        self.cfg
            .data_dir
            .join("resync-snapshots")
            .join(format!("cg-{cg_id}"))
    }

    /// Keeps the replica's current (consistent) images before a resync overwrites them.
    pub fn snapshot_before_resync(
        &self,
        cg_id: u64,
        images: &BTreeMap<DiskId, Arc<DiskImage>>,
    ) -> anyhow::Result<()> {
        let dir = self.resync_dir(cg_id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for (disk, image) in images {
            image.flush()?;
            let snap = image.snapshot_to(&dir, &disk.to_string())?;
            snap.close()?;
        }
        tracing::info!(cg_id, dir = %dir.display(), "kept a before-resync snapshot");
        Ok(())
    }

    /// Drops the before-resync snapshot once the copy is consistent again.
    pub fn drop_resync_snapshot(&self, cg_id: u64, _images: &BTreeMap<DiskId, Arc<DiskImage>>) {
        let _ = std::fs::remove_dir_all(self.resync_dir(cg_id));
    }

    /// Serves an inbound replication stream.
    pub async fn serve_stream(self: Arc<Self>, stream: convoy_transport::InboundStream) {
        let peer = stream.peer;
        if let Err(e) = receiver::serve(stream, self).await {
            tracing::info!(peer, error = %e, "replication stream ended with an error");
        }
    }

    /// Status of group `cg` if this host runs its pipeline.
    pub fn group_status(&self, cg: &str) -> Option<GroupStatus> {
        let domains = lock(&self.domains);
        let d = domains.get(cg)?;
        let stats = &d.pipeline.stats;
        Some(GroupStatus {
            last_seq: d.pipeline.last_seq(),
            writes: stats.writes.load(std::sync::atomic::Ordering::Relaxed),
            stale_epoch_refused: stats.stale_epoch.load(std::sync::atomic::Ordering::Relaxed),
            links: d
                .senders
                .iter()
                .map(|(to, (_, r))| (*to, lock(r).clone()))
                .collect(),
        })
    }

    /// The volume of a local disk, for the simulated guest.
    pub fn volume(self: &Arc<Self>, disk: DiskId) -> Option<Volume> {
        let pipeline = self.pipeline_for(disk)?;
        let size = pipeline.image(disk)?.size();
        Some(Volume::new(
            disk,
            size,
            pipeline.epoch(),
            Arc::downgrade(self),
        ))
    }

    /// Exposes the local copy of `disk` read-only; returns its URIs.
    pub fn expose_readonly(
        self: &Arc<Self>,
        disk: DiskId,
        size: u64,
    ) -> anyhow::Result<Vec<String>> {
        let name = readonly_export_name(disk);
        if !lock(&self.images).contains_key(&disk) && !self.has_image_file(disk) {
            anyhow::bail!("node {} holds no copy of disk {disk}", self.node);
        }
        if !lock(&self.exports).contains_key(&name) {
            let image = self.image(disk, size)?;
            self.add_export(
                &name,
                Arc::new(ReadOnlyCopy::new(image)),
                "read-only copy",
                0,
            )?;
        }
        Ok(self.uris(&name))
    }

    fn add_export(
        &self,
        name: &str,
        device: Arc<dyn convoy_nbd::BlockDevice>,
        description: &str,
        epoch: u64,
    ) -> anyhow::Result<()> {
        let socket = self.cfg.socket_dir.join(format!("{name}.sock"));
        let listener = convoy_nbd::bind_unix(&socket, 0o660, self.cfg.nbd_socket_group)
            .with_context(|| format!("cannot create NBD socket {}", socket.display()))?;
        self.registry
            .add(name, device, description)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (stop, mut stopped) = watch::channel(false);
        let server = Server::new(self.registry.clone());
        tokio::spawn(async move {
            server
                .serve_unix(listener, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        });
        lock(&self.exports).insert(
            name.to_string(),
            Export {
                name: name.to_string(),
                socket,
                stop,
                epoch,
            },
        );
        Ok(())
    }

    fn remove_export(&self, name: &str) {
        if let Some(e) = lock(&self.exports).remove(name) {
            self.registry.remove(&e.name);
            let _ = e.stop.send(true);
            let _ = std::fs::remove_file(&e.socket);
        }
    }

    /// Brings this host's data plane in line with the model.
    pub fn reconcile(self: &Arc<Self>, model: &ClusterModel) {
        if let Err(e) = self.reconcile_inner(model) {
            tracing::warn!(
                error = format!("{e:#}"),
                "data plane reconcile failed; will retry on the next change"
            );
        }
    }

    fn reconcile_inner(self: &Arc<Self>, model: &ClusterModel) -> anyhow::Result<()> {
        let _housekeeping = lock(&self.housekeeping);
        let me = self.node;
        *self.model.write().unwrap_or_else(|p| p.into_inner()) = model.clone();
        {
            let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
            for h in model.active_hosts() {
                if let Ok(a) = h.raft_addr.parse() {
                    peers.insert(h.id, a);
                }
            }
        }

        // What this host must write: groups it is primary of, and its VMs in no group.
        struct Want {
            cg_id: u64,
            disks: Vec<(DiskId, u64)>,
            epoch: u64,
            links: Vec<(NodeId, ReplicationMode, LinkState)>,
        }
        let mut want: BTreeMap<String, Want> = BTreeMap::new();
        for cg in model.cgs.values().filter(|c| c.primary == me) {
            let disks = model.cg_disks(cg);
            want.insert(
                cg.name.clone(),
                Want {
                    cg_id: cg.id,
                    epoch: model.cg_epoch(cg),
                    disks: disks.iter().map(|d| (d.id, d.size)).collect(),
                    links: cg
                        .replicas
                        .iter()
                        .map(|l| (l.to, l.mode, l.state))
                        .collect(),
                },
            );
        }
        for vm in model
            .vms
            .values()
            .filter(|v| v.host == me && v.cg.is_none())
        {
            let disks = model.vm_disks(vm);
            want.insert(
                format!("vm:{}", vm.name),
                Want {
                    cg_id: 0,
                    epoch: disks.iter().map(|d| d.epoch).max().unwrap_or(1),
                    disks: disks.iter().map(|d| (d.id, d.size)).collect(),
                    links: Vec::new(),
                },
            );
        }

        let mut domains = lock(&self.domains);
        // Stop domains no longer wanted (or whose disk set changed).
        let stale: Vec<String> = domains
            .iter()
            .filter(|(name, d)| {
                want.get(*name).is_none_or(|w| {
                    w.disks.iter().map(|(id, _)| *id).collect::<Vec<_>>() != d.disks
                })
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some(d) = domains.remove(&name) {
                d.pipeline.close();
                for (_, (stop, _)) in d.senders {
                    let _ = stop.send(true);
                }
                let mut map = self.disk_domain.write().unwrap_or_else(|p| p.into_inner());
                for disk in &d.disks {
                    map.remove(disk);
                }
            }
        }
        for (name, w) in &want {
            if !domains.contains_key(name) {
                let mut images = BTreeMap::new();
                for (disk, size) in &w.disks {
                    images.insert(*disk, self.image(*disk, *size)?);
                }
                let seq_path = self
                    .cfg
                    .data_dir
                    .join("replication")
                    .join(format!("{}.seq", name.replace(':', "-")));
                let pipeline = Pipeline::open(
                    w.cg_id,
                    name.clone(),
                    images,
                    w.epoch,
                    seq_path,
                    self.cfg.journal_limit,
                    self.cfg.sync_timeout,
                    Arc::clone(&self.reporter),
                )?;
                let mut map = self.disk_domain.write().unwrap_or_else(|p| p.into_inner());
                for (disk, _) in &w.disks {
                    map.insert(*disk, Arc::clone(&pipeline));
                }
                drop(map);
                domains.insert(
                    name.clone(),
                    Domain {
                        pipeline,
                        disks: w.disks.iter().map(|(d, _)| *d).collect(),
                        senders: HashMap::new(),
                    },
                );
            }
            let Some(domain) = domains.get_mut(name) else {
                continue;
            };
            domain.pipeline.set_epoch(w.epoch);
            domain.pipeline.set_links(&w.links);
            // Trackers first: every write from now on marks the link's dirty chunks.
            for (to, _, _) in &w.links {
                for image in domain.pipeline.images().values() {
                    if !image.trackers().contains(&tracker_name(*to)) {
                        image.start_tracking(&tracker_name(*to))?;
                    }
                }
            }
            domain.senders.retain(|to, (stop, _)| {
                let keep = w.links.iter().any(|(t, _, _)| t == to);
                if !keep {
                    let _ = stop.send(true);
                }
                keep
            });
            for (to, _, _) in &w.links {
                if domain.senders.contains_key(to) {
                    continue;
                }
                let Some(addr) = self
                    .peers
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(to)
                    .copied()
                else {
                    continue;
                };
                let report = Arc::new(Mutex::new(LinkReport::default()));
                let (stop, stopped) = watch::channel(false);
                let sender = LinkSender {
                    pipeline: Arc::clone(&domain.pipeline),
                    to: *to,
                    addr,
                    endpoint: self.endpoint.clone(),
                    tracker: tracker_name(*to),
                    report: Arc::clone(&report),
                };
                tokio::spawn(sender.run(stopped));
                domain.senders.insert(*to, (stop, report));
            }
            // Drop trackers of links that went away.
            for image in domain.pipeline.images().values() {
                for t in image.trackers() {
                    if t.starts_with("link-")
                        && !w.links.iter().any(|(to, _, _)| tracker_name(*to) == t)
                    {
                        image.drop_tracking(&t)?;
                    }
                }
            }
        }
        drop(domains);

        // Writable exports for every local disk. When the epoch moves, new connections get
        // a volume at the new epoch while connections opened before keep the old one,
        // whose writes are refused as stale (that is the fence).
        let mut local: BTreeMap<DiskId, (u64, u64)> = BTreeMap::new();
        for w in want.values() {
            for (disk, size) in &w.disks {
                local.insert(*disk, (*size, w.epoch));
            }
        }
        let current: Vec<String> = lock(&self.exports)
            .keys()
            .filter(|n| !n.ends_with("-ro"))
            .cloned()
            .collect();
        // Disks of groups this host holds an active-active copy of are exported below.
        let active_active: Vec<DiskId> = model
            .cgs
            .values()
            .filter(|c| {
                c.replicas
                    .iter()
                    .any(|l| l.to == me && l.mode.is_active_active())
            })
            .flat_map(|c| model.cg_disks(c))
            .map(|d| d.id)
            .collect();
        for name in current {
            let wanted = local
                .keys()
                .chain(active_active.iter())
                .any(|d| export_name(*d) == name);
            if !wanted {
                self.remove_export(&name);
            }
        }
        for (disk, (size, epoch)) in &local {
            let name = export_name(*disk);
            let volume = Arc::new(Volume::new(*disk, *size, *epoch, Arc::downgrade(self)));
            let existing = lock(&self.exports).get(&name).map(|e| e.epoch);
            match existing {
                Some(e) if e == *epoch => {}
                Some(_) => {
                    self.registry.replace(&name, volume);
                    if let Some(export) = lock(&self.exports).get_mut(&name) {
                        export.epoch = *epoch;
                    }
                }
                None => self.add_export(&name, volume, &format!("disk {disk}"), *epoch)?,
            }
        }

        // Replica roles.
        let mut roles = HashMap::new();
        for cg in model.cgs.values() {
            if cg.replicas.iter().any(|l| l.to == me) {
                let disks = model.cg_disks(cg);
                roles.insert(
                    cg.id,
                    ReplicaRole {
                        cg: cg.name.clone(),
                        primary: cg.primary,
                        epoch: model.cg_epoch(cg),
                        disks: disks.iter().map(|d| (d.id, d.size)).collect(),
                        mode: cg
                            .replicas
                            .iter()
                            .find(|l| l.to == me)
                            .map_or(ReplicationMode::Async, |l| l.mode),
                    },
                );
            }
        }
        // Active-active copies are writable here too; their writes go to the sequencer.
        for (cg_id, role) in &roles {
            for (disk, size) in &role.disks {
                let name = export_name(*disk);
                let existing = lock(&self.exports).get(&name).map(|e| e.epoch);
                if !role.mode.is_active_active() {
                    if existing.is_some() {
                        self.remove_export(&name);
                    }
                    continue;
                }
                if existing == Some(role.epoch) {
                    continue;
                }
                let volume = Arc::new(volume::RemoteVolume {
                    cg_id: *cg_id,
                    primary: role.primary,
                    disk: *disk,
                    size: *size,
                    epoch: role.epoch,
                    image: self.image(*disk, *size)?,
                    plane: Arc::downgrade(self),
                });
                if existing.is_some() {
                    self.registry.replace(&name, volume);
                    if let Some(e) = lock(&self.exports).get_mut(&name) {
                        e.epoch = role.epoch;
                    }
                } else {
                    self.add_export(
                        &name,
                        volume,
                        &format!("disk {disk} (active-active copy)"),
                        role.epoch,
                    )?;
                }
            }
        }
        *self
            .replica_roles
            .write()
            .unwrap_or_else(|p| p.into_inner()) = roles;

        // Images of disks that left the model are deleted; read-only exports of them too.
        let gone: Vec<DiskId> = lock(&self.images)
            .keys()
            .filter(|d| !model.disks.contains_key(d))
            .copied()
            .collect();
        for disk in gone {
            self.delete_image(disk, "its disk was deleted");
        }
        Ok(())
    }

    /// Deletes what this host keeps for copies the cluster no longer gives it: images of
    /// deleted disks (also those not opened since a restart), and a former replica's copy
    /// of a group (its images, progress record and before-resync snapshot) once the host
    /// neither replicates, runs nor migrates that group. Copies made by `cg sync` have no
    /// progress record and are kept. Blocking.
    ///
    /// `model` must be current (read after a read barrier): a stale model could lack a link
    /// that exists. Ids are never reused, so anything newer than `model` is left alone too.
    pub fn collect_garbage(
        &self,
        model: &ClusterModel,
        barrier_started: std::time::Instant,
    ) -> Vec<String> {
        // Replica roles below are the last reconcile's; it cannot run meanwhile.
        let _housekeeping = lock(&self.housekeeping);
        let me = self.node;
        let mut removed = Vec::new();
        for (disk, _) in numbered_entries(&self.disks_dir(), "disk-", ".img") {
            if model.disk_id_issued(disk) && !model.disks.contains_key(&disk) {
                self.delete_image(disk, "its disk was deleted");
                removed.push(format!("image of deleted disk {disk}"));
            }
        }

        // Snapshot files the model does not list: deleted snapshots, or creations that
        // failed or crashed before being recorded (not those still being created).
        let snap_root = self.cfg.data_dir.join("snapshots");
        for (cg_id, group_dir) in numbered_entries(&snap_root, "cg-", "") {
            if !model.cg_id_issued(cg_id) {
                continue;
            }
            let cg = model.cgs.values().find(|c| c.id == cg_id);
            for snap in std::fs::read_dir(group_dir).into_iter().flatten().flatten() {
                let sname = snap.file_name().to_string_lossy().to_string();
                let listed =
                    cg.is_some_and(|c| c.snapshots.iter().any(|s| s.name == sname && s.host == me));
                let path = snap.path();
                let mut in_progress = lock(&self.snapshots_in_progress);
                let judged_by_model = match in_progress.get(&path) {
                    None => true,
                    Some(None) => false,
                    // Recorded before the barrier began: `model` has the record (or its
                    // deletion).
                    Some(Some(at)) => *at < barrier_started,
                };
                if !judged_by_model {
                    continue;
                }
                in_progress.remove(&path);
                drop(in_progress);
                if !listed {
                    let _ = std::fs::remove_dir_all(&path);
                    removed.push(format!("files of snapshot {sname} of group {cg_id}"));
                }
            }
        }

        let replication = self.cfg.data_dir.join("replication");
        for (cg_id, record) in numbered_entries(&replication, "cg-", ".replica") {
            if !model.cg_id_issued(cg_id) {
                continue;
            }
            let cg = model.cgs.values().find(|c| c.id == cg_id);
            let still_here = cg.is_some_and(|c| {
                c.primary == me
                    || c.replicas.iter().any(|l| l.to == me)
                    || model
                        .migrations
                        .values()
                        .any(|m| m.cg == c.name && (m.to == me || m.from == me))
            });
            if still_here || self.replica_role(cg_id).is_some() {
                continue;
            }
            // No stream of the group may run (or start) while its files go.
            let turn = self.replica_turn(cg_id);
            let Ok(_turn) = turn.try_lock() else { continue };
            if let Some(c) = cg {
                for d in model.cg_disks(c) {
                    let runs_here = model.vms.get(&d.vm).is_some_and(|v| v.host == me);
                    if !runs_here {
                        self.delete_image(d.id, "this host no longer holds a replica of its group");
                        removed.push(format!("replica copy of disk {}", d.id));
                    }
                }
            }
            let _ = std::fs::remove_dir_all(self.resync_dir(cg_id));
            match std::fs::remove_file(&record) {
                Ok(()) => {
                    let _ = std::fs::File::open(&replication).and_then(|d| d.sync_all());
                    tracing::info!(cg_id, "removed the progress record of a former replica");
                    removed.push(format!("replica progress record of group {cg_id}"));
                }
                Err(e) => {
                    tracing::warn!(cg_id, error = %e, "cannot remove a replica progress record")
                }
            }
        }
        removed
    }

    /// Closes and deletes the local image of `disk`, and its read-only export.
    fn delete_image(&self, disk: DiskId, why: &str) {
        self.remove_export(&readonly_export_name(disk));
        if let Some(img) = lock(&self.images).remove(&disk) {
            let _ = img.close();
        }
        match DiskImage::destroy(&self.disks_dir(), &disk.to_string()) {
            Ok(()) => tracing::info!(disk, why, "deleted a local disk image"),
            Err(e) => tracing::warn!(disk, error = %e, "cannot delete a local disk image"),
        }
    }

    /// Closes every image cleanly (agent shutdown).
    pub fn shutdown(&self) {
        for (_, d) in lock(&self.domains).drain() {
            d.pipeline.close();
            for (_, (stop, _)) in d.senders {
                let _ = stop.send(true);
            }
        }
        for (_, img) in lock(&self.images).drain() {
            let _ = img.close();
        }
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.cfg.socket_dir
    }
}

/// Counts one bulk transfer for as long as it lives.
struct BulkTransfer(Arc<AtomicUsize>);

impl BulkTransfer {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for BulkTransfer {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Entries of `dir` named `<prefix><number><suffix>`, with their numbers.
fn numbered_entries(dir: &Path, prefix: &str, suffix: &str) -> Vec<(u64, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name
                .strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect()
}

/// Whether the hash warmer should hash an image now: it was not written since the last look
/// (`previous`, the write count then) and not already fully hashed at this write count.
fn worth_warming(previous: Option<u64>, writes: u64, hashed_at: Option<u64>) -> bool {
    previous == Some(writes) && hashed_at != Some(writes)
}

/// Keeps idle images' chunk hashes computed, so a compare-delta against them only hashes
/// what changed since. An image is hashed once it has gone a whole look without writes:
/// hashing a busy image would only be redone, and takes CPU from its writers. (Counting
/// unknown hashes instead mistook a busy image for idle once every chunk was unknown.)
async fn hash_warmer(plane: std::sync::Weak<DataPlane>) {
    let mut last_writes: HashMap<DiskId, u64> = HashMap::new();
    // The write count at which each image was last found fully hashed.
    let mut hashed_at: HashMap<DiskId, u64> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Some(p) = plane.upgrade() else { return };
        let bulk = Arc::clone(&p.bulk_transfers);
        if bulk.load(Ordering::Relaxed) > 0 {
            // A copy is running on this host: hashing now would only slow it down.
            continue;
        }
        let images: Vec<(DiskId, Arc<DiskImage>)> = lock(&p.images)
            .iter()
            .map(|(d, i)| (*d, Arc::clone(i)))
            .collect();
        drop(p);
        last_writes.retain(|d, _| images.iter().any(|(disk, _)| disk == d));
        hashed_at.retain(|d, _| images.iter().any(|(disk, _)| disk == d));
        for (disk, image) in images {
            let writes = image.write_count();
            let previous = last_writes.insert(disk, writes);
            if !worth_warming(previous, writes, hashed_at.get(&disk).copied()) {
                continue;
            }
            let started = std::time::Instant::now();
            let busy = Arc::clone(&bulk);
            let hashing = move || image.hash_all_while_idle(|| busy.load(Ordering::Relaxed) > 0);
            match tokio::task::spawn_blocking(hashing).await {
                Ok(Ok(None)) => {
                    // Written meanwhile (a copy or guest started): try again once idle.
                    last_writes.remove(&disk);
                }
                Ok(Ok(Some(pass))) => {
                    hashed_at.insert(disk, writes);
                    tracing::debug!(
                        disk,
                        read = pass.read,
                        holes = pass.holes,
                        ms = started.elapsed().as_millis() as u64,
                        "hashed idle image"
                    );
                }
                Ok(Err(e)) => tracing::debug!(disk, error = %e, "hashing an idle image failed"),
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worth_warming;

    #[test]
    fn warmer_hashes_only_images_quiet_for_a_whole_look_and_not_yet_hashed() {
        // First look at an image: nothing to compare with yet.
        assert!(!worth_warming(None, 10, None));
        // Written since the last look (a busy guest, even one that has touched every chunk).
        assert!(!worth_warming(Some(8), 10, None));
        // Quiet for a look: hash it.
        assert!(worth_warming(Some(10), 10, None));
        // Already fully hashed at this write count: nothing to do.
        assert!(!worth_warming(Some(10), 10, Some(10)));
        // Hashed before, written since, quiet again: hash the changes.
        assert!(worth_warming(Some(12), 12, Some(10)));
    }
}
