//! Compare-delta and full-copy sessions of this host: `convoy cg sync` as the source, and
//! the destination side (what this host lets a session write).

use std::sync::Arc;

use anyhow::Context;
use convoy_raft::model::{DiskId, NodeId};
use serde::{Deserialize, Serialize};

use super::{BulkTransfer, DataPlane};

/// Result of `convoy cg sync`, per disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncReport {
    /// Compare-delta (true) or full copy.
    pub compare: bool,
    /// One entry per disk.
    pub disks: Vec<DiskSync>,
}

/// One disk's delta session.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// A `convoy cg sync` in progress on this host.
pub(crate) struct SyncRun {
    compare: bool,
    /// Bytes a full copy may have to send (the disks' data chunks); unknown for
    /// compare-delta, which learns what differs as it goes.
    bytes_total: Option<u64>,
    progress: Arc<convoy_delta::DeltaProgress>,
}

impl SyncRun {
    pub(crate) fn view(&self) -> SyncProgressView {
        SyncProgressView {
            compare: self.compare,
            bytes_total: self.bytes_total,
            bytes_sent: self.progress.data_bytes_sent(),
            chunks_sent: self.progress.chunks_sent(),
        }
    }
}

/// Progress of a running `convoy cg sync`, for `convoy cg show` and its progress bar.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncProgressView {
    /// Compare-delta (true) or full copy.
    pub compare: bool,
    /// Most chunk data bytes a full copy sends; none for compare-delta.
    pub bytes_total: Option<u64>,
    /// Chunk data bytes sent so far.
    pub bytes_sent: u64,
    /// Chunks sent so far, zero markers included.
    pub chunks_sent: u64,
}

/// Removes a sync's progress entry however the sync ends.
struct SyncEntry<'a>(&'a DataPlane, u64);

impl Drop for SyncEntry<'_> {
    fn drop(&mut self) {
        super::lock(&self.0.syncs).remove(&self.1);
    }
}

impl DataPlane {
    /// What this host offers a delta session from `peer` (the group's sequencer).
    ///
    /// - To be written (`Destination`): its copy of a group's disk it holds no live
    ///   replica of, or its replica while the replica's stream asked for seeding by hashes
    ///   (the stream then waits, so the session is the only writer).
    /// - To be read (`Source`): its replica, for a sequencer that came back from a crash
    ///   and pulls what this copy holds before it takes writes again
    ///   ([`DataPlane::settle_crash`]); its stream has not started then.
    pub(crate) fn delta_offer(
        &self,
        peer: u64,
        binding: &convoy_delta::Binding,
        role: convoy_delta::Role,
    ) -> Option<convoy_delta::Offer> {
        let view = self.view.borrow().clone();
        let model = &view.model;
        let cg = model.cg_by_id(binding.cg)?;
        if cg.sequencer != peer || cg.sequencer == self.node {
            return None;
        }
        let live_replica = cg.link(self.node).is_some();
        match role {
            convoy_delta::Role::Destination if live_replica && !self.replicas.seeding(cg.id) => {
                return None;
            }
            convoy_delta::Role::Source if !live_replica => return None,
            _ => {}
        }
        let disk = model
            .cg_disks(cg)
            .into_iter()
            .find(|d| d.id == binding.disk)?;
        let epoch = cg.sequencer_epoch;
        let image = self.images.open(disk.id, disk.size).ok()?;
        Some(convoy_delta::Offer {
            expect: convoy_delta::Expect {
                cg: binding.cg,
                disk: disk.id,
                min_epoch: epoch,
            },
            role,
            image,
        })
    }

    /// Serves an inbound delta stream.
    pub async fn serve_delta(self: Arc<Self>, stream: convoy_transport::InboundStream) {
        let peer = stream.peer;
        let Some(server) = self.delta.get() else {
            return;
        };
        let _bulk = BulkTransfer::start(&self.bulk);
        match server.serve(stream).await {
            Ok(convoy_delta::Served::Completed(report)) => {
                tracing::info!(peer, disk = report.binding.disk, "delta session completed");
            }
            Ok(_) => {}
            Err(e) => tracing::info!(peer, error = %e, "delta session failed"),
        }
    }

    /// Brings `to`'s copy of group `cg` (this host is its sequencer) up to date with delta
    /// sessions, disk by disk; `compare` chooses compare-delta over a full copy.
    pub async fn sync_to(&self, cg: &str, to: NodeId, compare: bool) -> anyhow::Result<SyncReport> {
        let _bulk = BulkTransfer::start(&self.bulk);
        let (cg_id, epoch, disks, addr) = {
            let view = self.view.borrow().clone();
            let model = &view.model;
            let group = model
                .cgs
                .get(cg)
                .with_context(|| format!("group '{cg}' not found"))?;
            if group.sequencer != self.node {
                anyhow::bail!("node {} is not the primary of '{cg}'", self.node);
            }
            if to == self.node {
                anyhow::bail!("node {to} is the primary itself");
            }
            if group.link(to).is_some() {
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
            (group.id, group.sequencer_epoch, model.cg_disks(group), addr)
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
        let progress = Arc::new(convoy_delta::DeltaProgress::default());
        let bytes_total = if compare {
            None
        } else {
            let mut total = 0;
            for d in &disks {
                if let Some(image) = self
                    .sequencer_for(d.id)
                    .and_then(|s| s.image(d.id).cloned())
                {
                    total += image.data_bytes()?;
                }
            }
            Some(total)
        };
        {
            let mut syncs = super::lock(&self.syncs);
            if syncs.contains_key(&cg_id) {
                anyhow::bail!(
                    "a sync of '{cg}' is already running from node {}",
                    self.node
                );
            }
            syncs.insert(
                cg_id,
                SyncRun {
                    compare,
                    bytes_total,
                    progress: Arc::clone(&progress),
                },
            );
        }
        let _entry = SyncEntry(self, cg_id);
        let mut config = convoy_delta::DeltaConfig::default();
        config.progress = Some(progress);
        for d in disks {
            let seq = self
                .sequencer_for(d.id)
                .with_context(|| format!("disk {} is not written here", d.id))?;
            let image = Arc::clone(
                seq.image(d.id)
                    .with_context(|| format!("no image of disk {}", d.id))?,
            );
            let session = convoy_delta::Session {
                cg: cg_id,
                disk: d.id,
                epoch,
            };
            let stats = convoy_delta::push(&self.endpoint, to, addr, session, mode, image, &config)
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
}
