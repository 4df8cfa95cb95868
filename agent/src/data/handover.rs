//! Handing a group's order to another host (`convoy cg switch-primary`, and a migration's
//! cut-over), and the fence barrier commands wait on.
//!
//! A hand-over runs on the current sequencer: writes pause (they wait, they do not fail),
//! the target's copy acknowledges every write sequenced before the pause, this host's copy
//! is flushed and recorded as a consistent replica at that point, and only then is
//! `SetSequencer` committed. The target continues the sequence exactly where this host
//! stopped, this host's copy resumes as its replica from the journal, and no chunk is
//! re-sent. If anything fails before the commit, writes resume here unchanged.

use std::time::{Duration, Instant};

use convoy_raft::Command;
use convoy_raft::model::{DiskId, NodeId, ReplicationMode};
use serde::{Deserialize, Serialize};

use super::DataPlane;
use super::replica_state::ReplicaState;

/// What a hand-over did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HandOverReport {
    /// The last sequence this host assigned; the new sequencer continues after it.
    pub last_seq: u64,
    /// How long writes were paused here until the commit (they then go to the new
    /// sequencer as soon as both hosts applied it).
    pub paused_ms: f64,
    /// Per disk, the Merkle roots of this copy and the target's at the hand-over point
    /// (when asked for): equal roots prove the copies identical.
    pub roots: Vec<(DiskId, [u8; 32], [u8; 32])>,
}

/// Asks another host for the roots of its copy of a group (the node layer implements it).
pub type PeerRoots<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = anyhow::Result<Vec<(DiskId, [u8; 32])>>> + Send + 'a>,
>;

/// How long the target may take to acknowledge what was written before the pause.
const CATCH_UP: Duration = Duration::from_secs(5);

impl DataPlane {
    /// Hands group `cg_id`'s order to `to`, which holds a consistent copy. The old link's
    /// mode is kept for this host's copy. With `peer_roots`, the copies' Merkle roots are
    /// compared at the hand-over point (while writes are paused) and recorded in the report.
    pub async fn hand_over(
        &self,
        cg_id: u64,
        cg: &str,
        to: NodeId,
        peer_roots: Option<PeerRoots<'_>>,
    ) -> anyhow::Result<HandOverReport> {
        let seq = self
            .group_sequencer(cg_id)
            .ok_or_else(|| anyhow::anyhow!("node {} does not order '{cg}'", self.node))?;
        let link = seq
            .link_status()
            .get(&to)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("node {to} holds no copy of '{cg}'"))?;
        let mode: ReplicationMode = link.mode;
        let started = Instant::now();
        let last = seq.pause();
        let outcome = async {
            if !seq.wait_acked(to, last, CATCH_UP).await {
                anyhow::bail!(
                    "node {to} has not caught up (it acknowledged {} of {last} writes within {CATCH_UP:?}); nothing changed",
                    seq.acked_by(to)
                );
            }
            let images: Vec<_> = seq.images().values().cloned().collect();
            let local_roots = tokio::task::spawn_blocking(move || {
                let mut roots = Vec::new();
                for image in &images {
                    image.flush()?;
                    roots.push(image.root()?);
                }
                anyhow::Ok(roots)
            })
            .await??;
            let mut roots = Vec::new();
            if let Some(peer) = peer_roots {
                let theirs = peer.await?;
                for ((disk, _), mine) in seq.images().iter().zip(&local_roots) {
                    let other = theirs
                        .iter()
                        .find(|(d, _)| d == disk)
                        .map(|(_, r)| *r)
                        .ok_or_else(|| anyhow::anyhow!("node {to} sent no root for disk {disk}"))?;
                    roots.push((*disk, *mine, other));
                }
            }
            // This copy becomes a replica that holds exactly everything through `last`.
            let state = ReplicaState {
                applied_seq: last,
                epoch: seq.sequencer_epoch() + 1,
                consistent: true,
                consistent_at: None,
                resync_snapshot: false,
                may_have_applied: last,
            };
            let (mut file, _) = self.open_replica_state(cg_id)?;
            file.store(&state)?;
            let cmd = Command::SetSequencer {
                cg: cg.to_string(),
                to,
                continue_at: last + 1,
                expect_sequencer: self.node,
                old_link_mode: Some(mode),
            };
            self.writer
                .propose(cmd)
                .await
                .map_err(|e| anyhow::anyhow!("the hand-over was not committed: {e}"))?;
            Ok(roots)
        }
        .await;
        match outcome {
            Ok(roots) => {
                seq.hand_over();
                Ok(HandOverReport {
                    last_seq: last,
                    paused_ms: started.elapsed().as_secs_f64() * 1000.0,
                    roots,
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(self.replica_state_path(cg_id));
                seq.resume();
                Err(e)
            }
        }
    }

    /// The Merkle roots of this host's copy of group `cg_id`'s disks, read between
    /// replica batches (or with writes paused, on the sequencer). Blocking.
    pub fn copy_roots(&self, cg_id: u64) -> anyhow::Result<Vec<(DiskId, [u8; 32])>> {
        let view = self.view.borrow().clone();
        let cg = view
            .model
            .cg_by_id(cg_id)
            .ok_or_else(|| anyhow::anyhow!("group {cg_id} is not in the model"))?;
        let disks = view.model.cg_disks(cg);
        let apply = self.replicas.apply_lock(cg_id);
        let _frozen = apply.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for d in disks {
            let image = self.images.open(d.id, d.size)?;
            out.push((d.id, image.root()?));
        }
        Ok(out)
    }

    /// Fences `disks` at their new epochs on this host's sequencer (if it runs their
    /// domain) and waits until no write carrying an older epoch can still be acknowledged
    /// here. Returns whether that was reached within `timeout` (true when this host does
    /// not order them: nothing here can acknowledge).
    pub async fn fence_barrier(&self, disks: &[(DiskId, u64)], timeout: Duration) -> bool {
        let seqs: Vec<_> = {
            let domains = super::lock(&self.domains);
            domains
                .values()
                .filter(|d| disks.iter().any(|(x, _)| d.disks.contains(x)))
                .map(|d| std::sync::Arc::clone(&d.seq))
                .collect()
        };
        let mut all = true;
        for seq in seqs {
            all &= seq.fence(disks, timeout).await;
        }
        all
    }
}
