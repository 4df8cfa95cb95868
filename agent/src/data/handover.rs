//! Changing who orders a group's writes: a hand-over between two live hosts (`convoy cg
//! switch-primary`, a migration's cut-over), a take-over after the sequencer was lost, and
//! the fence barrier commands wait on.
//!
//! A hand-over runs on the current sequencer: writes pause (they wait, they do not fail),
//! the target's copy acknowledges every write sequenced before the pause, both copies'
//! Merkle roots are compared at that point when asked, this host's copy is flushed and
//! recorded as a consistent replica at that point, and only then is the change committed.
//! Writes stay paused until Raft gives a definite answer: an unknown outcome is proposed
//! again with the same request id, never guessed. The target continues the sequence
//! exactly where this host stopped, this host's copy resumes as its replica from the
//! journal, and no chunk is re-sent. If anything fails before the commit, writes resume
//! here unchanged.

use std::time::{Duration, Instant};

use convoy_raft::model::{DiskId, ModelError, NodeId, ReplicationMode};
use convoy_raft::{Command, Outcome};
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

/// Why a change of sequencer did not happen (nothing changed in every case).
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    /// This host does not order the group, or the target holds no copy of it.
    #[error("{0}")]
    Precondition(String),
    /// The target did not acknowledge every write in time; writes resumed unchanged.
    #[error(
        "node {host} has not caught up ({lag} writes behind after {waited:?}); writes resumed unchanged"
    )]
    NotCaughtUp {
        /// The target.
        host: NodeId,
        /// Writes it lacked.
        lag: u64,
        /// How long it was waited for.
        waited: Duration,
    },
    /// The copies differ at the consistent point: the hand-over must not happen.
    #[error("disk {disk}'s copies differ at the consistent point; the hand-over did not happen")]
    CopiesDiffer {
        /// The first differing disk.
        disk: DiskId,
    },
    /// The model refused the change.
    #[error("the model refused the change: {0}")]
    Refused(ModelError),
    /// Another stream or operation holds the group; try again.
    #[error("{0}")]
    Busy(String),
    /// Storage or another host failed.
    #[error("{0}")]
    Failed(String),
}

/// Asks another host for the roots of its copy of a group (the node layer implements it).
pub type PeerRoots<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = anyhow::Result<Vec<(DiskId, [u8; 32])>>> + Send + 'a>,
>;

/// How long the target may take to acknowledge what was written before the pause.
const CATCH_UP: Duration = Duration::from_secs(5);

impl DataPlane {
    /// Commits `cmd` with `request_id`, proposing it again (same id: the model applies it
    /// once) while the outcome is unknown, until the model answers.
    pub(crate) async fn commit_definitely(
        &self,
        request_id: u128,
        cmd: Command,
    ) -> Result<Outcome, ModelError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.writer.propose(request_id, cmd.clone()).await {
                Ok(answer) => return answer,
                Err(unknown) => {
                    tracing::warn!(kind = cmd.kind(), error = %unknown, "commit outcome unknown; proposing again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Hands group `cg_id`'s order to `to`, which holds a copy. `commit` makes the
    /// command from the last sequence this host assigned and the per-disk roots (this
    /// copy's, the target's) at that point; `peer_roots` asks the target for its roots
    /// (none asked without it; then the roots are empty and nothing is compared).
    pub async fn hand_over(
        &self,
        cg_id: u64,
        cg: &str,
        to: NodeId,
        peer_roots: Option<PeerRoots<'_>>,
        commit: impl FnOnce(u64, &[(DiskId, [u8; 32], [u8; 32])]) -> Command,
    ) -> Result<HandOverReport, HandOverError> {
        let seq = self.group_sequencer(cg_id).ok_or_else(|| {
            HandOverError::Precondition(format!("node {} does not order '{cg}'", self.node))
        })?;
        let _turn = seq.hand_over_turn.lock().await;
        if seq.handed_over() {
            return Err(HandOverError::Precondition(format!(
                "node {} no longer orders '{cg}': it was handed over",
                self.node
            )));
        }
        if !seq.link_status().contains_key(&to) {
            return Err(HandOverError::Precondition(format!(
                "node {to} holds no copy of '{cg}'"
            )));
        }
        // Most of a pause would be the flush of everything written since the last
        // write-back (55-190 ms measured under a QD1 sync writer): flush once while writes
        // go on, so the flush with writes paused has only the last moment's writes left.
        let images: Vec<_> = seq.images().values().cloned().collect();
        tokio::task::spawn_blocking(move || images.iter().try_for_each(|i| i.flush()))
            .await
            .map_err(|e| HandOverError::Failed(e.to_string()))?
            .map_err(|e| {
                HandOverError::Failed(format!("cannot flush before the hand-over: {e}"))
            })?;
        let started = Instant::now();
        let last = seq.pause();
        // When each step of the pause ended (caught up, flushed, state stored), logged
        // with the commit: the pause is what guests feel, so its parts are worth seeing.
        let mut steps = [Duration::ZERO; 3];
        let prepared = async {
            if !seq.wait_acked(to, last, CATCH_UP).await {
                return Err(HandOverError::NotCaughtUp {
                    host: to,
                    lag: last.saturating_sub(seq.acked_by(to)),
                    waited: CATCH_UP,
                });
            }
            steps[0] = started.elapsed();
            let images: Vec<_> = seq.images().values().cloned().collect();
            let compare = peer_roots.is_some();
            let local_roots = tokio::task::spawn_blocking(move || {
                let mut roots = Vec::new();
                for image in &images {
                    image.flush()?;
                    // A root hashes every chunk written since it was last hashed, with
                    // writes paused (0.6-1.9 s measured on a 1 GiB disk under a QD1
                    // writer): only worth it when the target's roots are compared.
                    if compare {
                        roots.push(image.root()?);
                    }
                }
                anyhow::Ok(roots)
            })
            .await
            .map_err(|e| HandOverError::Failed(e.to_string()))?
            .map_err(|e| HandOverError::Failed(format!("{e:#}")))?;
            steps[1] = started.elapsed();
            let mut roots = Vec::new();
            if let Some(peer) = peer_roots {
                let theirs = peer
                    .await
                    .map_err(|e| HandOverError::Failed(format!("roots of node {to}: {e:#}")))?;
                for ((disk, _), mine) in seq.images().iter().zip(&local_roots) {
                    let other = theirs
                        .iter()
                        .find(|(d, _)| d == disk)
                        .map(|(_, r)| *r)
                        .ok_or_else(|| {
                            HandOverError::Failed(format!("node {to} sent no root for disk {disk}"))
                        })?;
                    if other != *mine {
                        return Err(HandOverError::CopiesDiffer { disk: *disk });
                    }
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
            let (mut file, _) = self
                .open_replica_state(cg_id)
                .map_err(|e| HandOverError::Failed(format!("{e:#}")))?;
            file.store(&state)
                .map_err(|e| HandOverError::Failed(e.to_string()))?;
            steps[2] = started.elapsed();
            Ok(roots)
        }
        .await;
        let roots = match prepared {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(self.replica_state_path(cg_id));
                seq.resume();
                return Err(e);
            }
        };
        // Writes stay paused until the model answers for certain.
        let cmd = commit(last, &roots);
        match self.commit_definitely(rand::random(), cmd).await {
            Ok(_) => {
                seq.hand_over();
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                let paused_ms = ms(started.elapsed());
                tracing::info!(
                    cg,
                    to,
                    last,
                    paused_ms,
                    caught_up_ms = ms(steps[0]),
                    flushed_ms = ms(steps[1]),
                    state_stored_ms = ms(steps[2]),
                    "handed the group's order over"
                );
                Ok(HandOverReport {
                    last_seq: last,
                    paused_ms,
                    roots,
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(self.replica_state_path(cg_id));
                seq.resume();
                Err(HandOverError::Refused(e))
            }
        }
    }

    /// The plain hand-over of `convoy cg switch-primary`: `SetSequencer`, the old copy a
    /// replica in the link's mode.
    pub async fn switch_primary(
        &self,
        cg_id: u64,
        cg: &str,
        to: NodeId,
    ) -> Result<HandOverReport, HandOverError> {
        let mode: Option<ReplicationMode> = self
            .group_sequencer(cg_id)
            .and_then(|s| s.link_status().get(&to).map(|l| l.mode));
        let me = self.node;
        self.hand_over(cg_id, cg, to, None, |last, _| Command::SetSequencer {
            cg: cg.to_string(),
            to,
            continue_at: last + 1,
            expect_sequencer: me,
            old_link_mode: mode,
        })
        .await
    }

    /// This host takes group `cg_id`'s order over after its sequencer was lost: the
    /// replica stream ends (so what this copy applied is final), and `commit` gets the
    /// sequence it continues at (`applied + 1`). Returns that sequence once committed.
    pub async fn take_over(
        &self,
        cg_id: u64,
        commit: impl FnOnce(u64) -> Command,
    ) -> Result<u64, HandOverError> {
        if self.replicas.role(cg_id).is_none() {
            return Err(HandOverError::Precondition(format!(
                "node {} holds no replica of group {cg_id}",
                self.node
            )));
        }
        // The lost sequencer's stream must be over: then nothing more is applied here.
        let turn = self.replicas.turn(cg_id);
        let _turn = tokio::time::timeout(Duration::from_secs(3), turn.lock_owned())
            .await
            .map_err(|_| {
                HandOverError::Busy(format!(
                    "the replica stream of group {cg_id} is still alive: its sequencer is not lost"
                ))
            })?;
        let (_, state) = self
            .open_replica_state(cg_id)
            .map_err(|e| HandOverError::Failed(format!("{e:#}")))?;
        if !state.consistent {
            return Err(HandOverError::Precondition(format!(
                "node {}'s copy of group {cg_id} is not a consistent prefix",
                self.node
            )));
        }
        let continue_at = state.applied_seq + 1;
        self.commit_definitely(rand::random(), commit(continue_at))
            .await
            .map_err(HandOverError::Refused)?;
        Ok(continue_at)
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
