//! The migration engine's two interfaces over this cluster: Convoy's replicated store as
//! the [`StorageProvider`], simulated guests as the [`HypervisorDriver`].
//!
//! The coordinator's side ([`ClusterProvider`]) sends each operation to the host it
//! concerns; that host runs it against its own data plane ([`Cluster::run_storage_here`],
//! [`Cluster::run_hypervisor_here`]), checking preconditions and guards against the
//! committed model (after a read barrier), so a stale coordinator changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoy_migrate::{
    DeltaReport, Guard, HandOverRequest, HypervisorDriver, HypervisorError, HypervisorOp,
    HypervisorReply, LinkStatus, RestoreRequest, SequencerReport, StorageError, StorageOp,
    StorageProvider, StorageReply, TakeOverRequest, VmState,
};
use convoy_raft::Command;
use convoy_raft::model::{DiskId, DiskRoots, LinkState, LiveMove, NodeId, SequencerBasis};

use super::rpc::{LocalRequest, LocalResponse};
use super::service::{Cluster, ServiceError};
use crate::data::handover::HandOverError;
use crate::qemu::migrate::{Role, SwitchoverReport, guest_pause_ms};

/// How long a resumed guest may take to start on its host.
const RESUME_WAIT: Duration = Duration::from_secs(15);

fn storage_failed(e: impl std::fmt::Display) -> StorageError {
    StorageError::Failed(e.to_string())
}

impl From<HandOverError> for StorageError {
    fn from(e: HandOverError) -> Self {
        match e {
            HandOverError::Precondition(m) => StorageError::Precondition(m),
            HandOverError::NotCaughtUp { host, lag, .. } => StorageError::NotCaughtUp { host, lag },
            HandOverError::CopiesDiffer { disk } => StorageError::CopiesDiffer { disk },
            HandOverError::Refused(m) => StorageError::Refused(m),
            HandOverError::Busy(m) => StorageError::Busy(m),
            HandOverError::Failed(m) => StorageError::Failed(m),
        }
    }
}

impl Cluster {
    /// Whether `guard` holds in the committed model: its migration is undecided and
    /// coordinated under its claim, in its phase.
    async fn guard_holds(&self, guard: &Guard) -> Result<bool, ServiceError> {
        self.read_barrier().await?;
        Ok(self.guard_holds_here(guard))
    }

    /// [`Self::guard_holds`] on this node's applied model, without the read barrier's
    /// round to the leader. Only for checks that merely save work: what a stale
    /// coordinator asks next is a guarded command the model refuses.
    fn guard_holds_here(&self, guard: &Guard) -> bool {
        self.model.read(|m| {
            m.migrations.get(&guard.migration).is_some_and(|mig| {
                mig.decision.is_none()
                    && mig.claim.number == guard.claim
                    && mig.phase == guard.phase
            })
        })
    }

    fn cg_id_of(&self, cg: &str) -> Result<u64, StorageError> {
        self.model
            .read(|m| m.cgs.get(cg).map(|c| c.id))
            .ok_or_else(|| StorageError::Precondition(format!("group '{cg}' is not in the model")))
    }

    /// Runs a storage operation on this node's data plane (this node is the host the
    /// operation concerns).
    pub(crate) async fn run_storage_here(
        &self,
        op: StorageOp,
    ) -> Result<StorageReply, StorageError> {
        let plane = self
            .data()
            .ok_or_else(|| StorageError::Failed("the data plane is still starting".into()))?;
        match op {
            StorageOp::CompareDelta { cg, to, .. } => {
                let report = plane
                    .sync_to(&cg, to, true)
                    .await
                    .map_err(|e| StorageError::Precondition(format!("{e:#}")))?;
                Ok(StorageReply::Delta(DeltaReport {
                    bytes_compared: report.disks.iter().map(|d| d.size).sum(),
                    bytes_sent: report.disks.iter().map(|d| d.data_bytes_sent).sum(),
                }))
            }
            StorageOp::Snapshot { cg, name, .. } => {
                self.read_barrier().await.map_err(storage_failed)?;
                let (cg_id, recorded, sequencer) = self
                    .model
                    .read(|m| {
                        m.cgs.get(&cg).map(|c| {
                            (
                                c.id,
                                c.snapshots.iter().any(|s| s.name == name),
                                c.sequencer,
                            )
                        })
                    })
                    .ok_or_else(|| StorageError::Precondition(format!("group '{cg}' is gone")))?;
                if sequencer != self.id {
                    return Err(StorageError::Precondition(format!(
                        "node {} does not order '{cg}'",
                        self.id
                    )));
                }
                if plane.snapshot_exists(cg_id, &name) {
                    if recorded {
                        return Ok(StorageReply::Snapshot);
                    }
                    // An unrecorded leftover of an earlier try: take it afresh.
                    let (p, n) = (Arc::clone(&plane), name.clone());
                    tokio::task::spawn_blocking(move || p.snapshot_delete_files(cg_id, &n))
                        .await
                        .map_err(storage_failed)?;
                }
                let (p, c, n) = (Arc::clone(&plane), cg.clone(), name.clone());
                tokio::task::spawn_blocking(move || p.snapshot_create(&c, &n))
                    .await
                    .map_err(storage_failed)?
                    .map_err(|e| StorageError::Failed(format!("{e:#}")))?;
                plane.snapshot_recorded(cg_id, &name);
                Ok(StorageReply::Snapshot)
            }
            StorageOp::HandOver(req) => self.hand_over_here(&req).await,
            StorageOp::TakeOver(req) => self.take_over_here(&req).await,
            StorageOp::RestoreSnapshot(req) => self.restore_here(&req).await,
            StorageOp::Roots { cg, .. } => {
                let cg_id = self.cg_id_of(&cg)?;
                let p = Arc::clone(&plane);
                let roots = tokio::task::spawn_blocking(move || p.copy_roots(cg_id))
                    .await
                    .map_err(storage_failed)?
                    .map_err(|e| StorageError::Failed(format!("{e:#}")))?;
                Ok(StorageReply::Roots(roots))
            }
        }
    }

    async fn hand_over_here(&self, req: &HandOverRequest) -> Result<StorageReply, StorageError> {
        let plane = self
            .data()
            .ok_or_else(|| StorageError::Failed("the data plane is still starting".into()))?;
        self.read_barrier().await.map_err(storage_failed)?;
        let (cg_id, sequencer) = self
            .model
            .read(|m| m.cgs.get(&req.cg).map(|c| (c.id, c.sequencer)))
            .ok_or_else(|| StorageError::Precondition(format!("group '{}' is gone", req.cg)))?;
        if sequencer == req.to {
            // Already committed (a retry whose first answer was lost).
            let roots = self.model.read(|m| {
                m.migrations
                    .get(&req.guard.migration)
                    .map(|mig| mig.stats.cutover_roots.clone())
                    .unwrap_or_default()
            });
            return Ok(StorageReply::Sequencer(SequencerReport {
                continue_at: self
                    .model
                    .read(|m| m.cgs.get(&req.cg).map_or(0, |c| c.seq_start)),
                roots,
                pause_ms: 0,
            }));
        }
        let to = req.to;
        let peer_roots: crate::data::handover::PeerRoots<'_> = Box::pin(async move {
            match self
                .local_remote(
                    to,
                    LocalRequest::Storage {
                        op: StorageOp::Roots {
                            cg: req.cg.clone(),
                            host: to,
                        },
                    },
                )
                .await
            {
                Ok(LocalResponse::Storage(Ok(StorageReply::Roots(r)))) => Ok(r),
                Ok(LocalResponse::Storage(Err(e))) => Err(anyhow::anyhow!("{e}")),
                Ok(other) => Err(anyhow::anyhow!("unexpected answer {other:?}")),
                Err(e) => Err(anyhow::anyhow!("{e}")),
            }
        });
        let guard = req.guard;
        let old_link_mode = req.old_link_mode;
        let report = plane
            .hand_over(cg_id, &req.cg, to, Some(peer_roots), |last, roots| {
                guard.sequencer_command(
                    to,
                    last + 1,
                    SequencerBasis::HandOver {
                        roots: disk_roots(roots),
                        old_link_mode,
                    },
                )
            })
            .await?;
        Ok(StorageReply::Sequencer(SequencerReport {
            continue_at: report.last_seq + 1,
            roots: disk_roots(&report.roots),
            pause_ms: report.paused_ms as u64,
        }))
    }

    async fn take_over_here(&self, req: &TakeOverRequest) -> Result<StorageReply, StorageError> {
        let plane = self
            .data()
            .ok_or_else(|| StorageError::Failed("the data plane is still starting".into()))?;
        self.read_barrier().await.map_err(storage_failed)?;
        let (cg_id, sequencer, seq_start) = self
            .model
            .read(|m| m.cgs.get(&req.cg).map(|c| (c.id, c.sequencer, c.seq_start)))
            .ok_or_else(|| StorageError::Precondition(format!("group '{}' is gone", req.cg)))?;
        if sequencer == req.to {
            return Ok(StorageReply::Sequencer(SequencerReport {
                continue_at: seq_start,
                roots: Vec::new(),
                pause_ms: 0,
            }));
        }
        let guard = req.guard;
        let to = req.to;
        let continue_at = plane
            .take_over(cg_id, |at| {
                guard.sequencer_command(to, at, SequencerBasis::TakeOver)
            })
            .await?;
        Ok(StorageReply::Sequencer(SequencerReport {
            continue_at,
            roots: Vec::new(),
            pause_ms: 0,
        }))
    }

    async fn restore_here(&self, req: &RestoreRequest) -> Result<StorageReply, StorageError> {
        let plane = self
            .data()
            .ok_or_else(|| StorageError::Failed("the data plane is still starting".into()))?;
        self.read_barrier().await.map_err(storage_failed)?;
        let (cg_id, sequencer, seq_start) = self
            .model
            .read(|m| m.cgs.get(&req.cg).map(|c| (c.id, c.sequencer, c.seq_start)))
            .ok_or_else(|| StorageError::Precondition(format!("group '{}' is gone", req.cg)))?;
        if sequencer == req.host {
            return Ok(StorageReply::Sequencer(SequencerReport {
                continue_at: seq_start,
                roots: Vec::new(),
                pause_ms: 0,
            }));
        }
        let (p, name) = (Arc::clone(&plane), req.snapshot.clone());
        let last = tokio::task::spawn_blocking(move || p.restore_in_place(cg_id, &name))
            .await
            .map_err(storage_failed)?
            .map_err(|e| StorageError::Precondition(format!("{e:#}")))?;
        let cmd = req.guard.sequencer_command(
            req.host,
            last + 1,
            SequencerBasis::Snapshot {
                name: req.snapshot.clone(),
            },
        );
        plane
            .commit_definitely(rand::random(), cmd)
            .await
            .map_err(StorageError::Refused)?;
        Ok(StorageReply::Sequencer(SequencerReport {
            continue_at: last + 1,
            roots: Vec::new(),
            pause_ms: 0,
        }))
    }

    /// Runs a hypervisor operation for a VM of this node.
    pub(crate) async fn run_hypervisor_here(
        &self,
        op: HypervisorOp,
    ) -> Result<HypervisorReply, HypervisorError> {
        let plane = self
            .data()
            .ok_or_else(|| HypervisorError::Failed("the data plane is still starting".into()))?;
        let failed = |e: ServiceError| HypervisorError::Failed(e.to_string());
        let is_qemu = self
            .model
            .read(|m| m.vms.get(op_vm(&op)).is_some_and(|v| v.qemu.is_some()));
        if is_qemu {
            return self.run_qemu_op_here(op).await;
        }
        match op {
            HypervisorOp::PauseAndDrain { vm, guard, .. } => {
                if !self.guard_holds(&guard).await.map_err(failed)? {
                    return Err(HypervisorError::Stale(vm));
                }
                let runs_here = self
                    .model
                    .read(|m| m.vms.get(&vm).is_some_and(|v| v.host == self.id));
                if runs_here {
                    plane.pause_guest(&vm).await;
                }
                Ok(HypervisorReply::Drained)
            }
            HypervisorOp::Resume { vm, host, guard } => {
                if !self.guard_holds(&guard).await.map_err(failed)? {
                    return Err(HypervisorError::Stale(vm));
                }
                let (there, simulated) = self.model.read(|m| {
                    m.vms.get(&vm).map_or((false, false), |v| {
                        (v.host == self.id, v.running && v.workload.is_some())
                    })
                });
                if !there {
                    return Err(HypervisorError::NotThere { vm, host });
                }
                // The data plane applies the move a moment after Raft does: resume once
                // its plan runs the guest here.
                if simulated && !plane.wait_guest_planned(&vm, Duration::from_secs(5)).await {
                    return Err(HypervisorError::Failed(format!(
                        "node {} has not applied VM {vm}'s move yet",
                        self.id
                    )));
                }
                plane.resume_guest(&vm).await;
                if simulated {
                    let deadline = Instant::now() + RESUME_WAIT;
                    loop {
                        let (running, _) = plane.guest_running_paused(&vm).await;
                        if running {
                            break;
                        }
                        if Instant::now() > deadline {
                            return Err(HypervisorError::Failed(format!(
                                "the guest of VM {vm} did not start on node {} within {RESUME_WAIT:?}",
                                self.id
                            )));
                        }
                        plane.reconcile_guests().await;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                Ok(HypervisorReply::Resumed { stun_ms: None })
            }
        }
    }

    /// How VM `vm` runs on this node.
    /// A QEMU guest's part of a migration, on this node. The pause is QEMU's live
    /// migration up to its pause before the switchover (towards the migration's other
    /// host); the resume on the destination is the switchover, and on the source (the
    /// move did not happen) cancels the migration.
    async fn run_qemu_op_here(&self, op: HypervisorOp) -> Result<HypervisorReply, HypervisorError> {
        let failed = |e: ServiceError| HypervisorError::Failed(e.to_string());
        let qemu = self.qemu.get().cloned().ok_or_else(|| {
            HypervisorError::Failed(format!("node {}'s QEMU driver is still starting", self.id))
        })?;
        match op {
            HypervisorOp::PauseAndDrain { vm, guard, .. } => {
                if !self.guard_holds(&guard).await.map_err(failed)? {
                    return Err(HypervisorError::Stale(vm));
                }
                let (plan, target, live) = self.model.read(|m| {
                    let plan = convoy_raft::model::host_plan(m, self.id).qemu.remove(&vm);
                    let mig = m.migrations.get(&guard.migration);
                    let target = mig.map(|mig| {
                        if mig.from == self.id {
                            mig.to
                        } else {
                            mig.from
                        }
                    });
                    (plan, target, mig.map(|mig| mig.live).unwrap_or_default())
                });
                let (Some(plan), Some(target)) = (plan, target) else {
                    // Not planned here (stopped, or already moved): nothing to pause.
                    return Ok(HypervisorReply::Drained);
                };
                match qemu.run_state(&vm).await {
                    Some((s, _)) if s == "running" => {}
                    // Powered off (QEMU waits with -no-shutdown): nothing runs, a cold move.
                    Some((s, _)) if s == "shutdown" => return Ok(HypervisorReply::Drained),
                    // No QEMU of it here at all: nothing runs, the move is cold.
                    None if qemu.live_pid(&vm).is_none() => return Ok(HypervisorReply::Drained),
                    // A QEMU of it exists but is not (yet) running or not yet re-attached
                    // (an agent that just restarted): ask again rather than move it cold.
                    other => {
                        return Err(HypervisorError::Failed(format!(
                            "VM {vm}'s QEMU on node {} is not ready to migrate ({other:?}); retrying",
                            self.id
                        )));
                    }
                }
                let staged: Vec<(u64, u64)> = plan.disks.iter().map(|d| (d.id, d.size)).collect();
                let abort_incoming = || async {
                    let req = LocalRequest::QemuAbortIncoming {
                        vm: vm.clone(),
                        disks: staged.clone(),
                    };
                    let _ = Box::pin(self.local(target, req)).await;
                };
                let incoming = LocalRequest::QemuIncoming {
                    plan: Box::new(plan),
                    from: self.id,
                };
                if let Err(e) = Box::pin(self.local(target, incoming)).await {
                    abort_incoming().await;
                    return Err(HypervisorError::Failed(format!(
                        "node {target} cannot receive VM {vm}: {e}"
                    )));
                }
                let addr = self.peer_addr(target).ok_or_else(|| {
                    HypervisorError::Failed(format!("node {target} is not a member"))
                })?;
                if let Err(e) = qemu
                    .migrate_out(&vm, target, &self.endpoint, addr, &live)
                    .await
                {
                    abort_incoming().await;
                    return Err(HypervisorError::Failed(format!("{e:#}")));
                }
                // The memory copy took a while: a coordinator that lost its claim
                // meanwhile must not leave the guest paused. Checked on this node's model,
                // not through a read barrier, because the guest is paused now: a claim
                // lost but not yet applied here is caught all the same, as the stale
                // coordinator's move is refused and its successor resumes the guest here.
                if !self.guard_holds_here(&guard) {
                    qemu.cancel_out(&vm).await;
                    abort_incoming().await;
                    return Err(HypervisorError::Stale(vm));
                }
                // The device state and last pages travel while the coordinator does the
                // storage step; the destination resumes the guest only after it.
                if let Err(e) = qemu.begin_switchover(&vm).await {
                    qemu.cancel_out(&vm).await;
                    abort_incoming().await;
                    return Err(HypervisorError::Failed(format!("{e:#}")));
                }
                Ok(HypervisorReply::Drained)
            }
            HypervisorOp::Resume { vm, host, guard } => {
                if !self.guard_holds(&guard).await.map_err(failed)? {
                    return Err(HypervisorError::Stale(vm));
                }
                let (there, disks) = self.model.read(|m| {
                    let there = m.vms.get(&vm).is_some_and(|v| v.host == self.id);
                    let disks: Vec<(u64, u64)> = m
                        .vms
                        .get(&vm)
                        .map(|v| m.vm_disks(v).iter().map(|d| (d.id, d.epoch)).collect())
                        .unwrap_or_default();
                    (there, disks)
                });
                if !there {
                    return Err(HypervisorError::NotThere { vm, host });
                }
                let plane = self.data().ok_or_else(|| {
                    HypervisorError::Failed("the data plane is still starting".into())
                })?;
                match qemu.role(&vm).await {
                    Some(Role::Incoming { from, .. }) => {
                        // The source sent the guest's last state when it paused; it
                        // answers once all is sent, then quits its QEMU (a failed transfer
                        // leaves it fenced: it quits all the same).
                        let switchover = async {
                            let req = LocalRequest::QemuSwitchover { vm: vm.clone() };
                            match Box::pin(self.local(from, req)).await {
                                Ok(LocalResponse::QemuSwitchedOver(report)) => Ok(report),
                                Ok(LocalResponse::QemuMigrated(stats)) => Ok(SwitchoverReport {
                                    stats,
                                    paused_at_unix_us: None,
                                }),
                                other => Err(format!("{other:?}")),
                            }
                        };
                        // The arrived guest runs once its disks are exported here at their
                        // new epochs.
                        let arrival = async {
                            let exported = async {
                                let deadline = Instant::now() + Duration::from_secs(10);
                                while !plane.exported_at(&disks) {
                                    if Instant::now() > deadline {
                                        return false;
                                    }
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                }
                                true
                            };
                            let (exported, arrived) =
                                tokio::join!(exported, qemu.wait_arrived(&vm, RESUME_WAIT));
                            let arrived = arrived.map_err(|e| (true, format!("{e:#}")))?;
                            if !exported {
                                return Err((
                                    false,
                                    format!(
                                        "node {}'s exports did not reach VM {vm}'s new epochs",
                                        self.id
                                    ),
                                ));
                            }
                            let resumed_at = qemu
                                .resume_arrived(&vm)
                                .await
                                .map_err(|e| (false, format!("{e:#}")))?;
                            Ok((arrived.elapsed(), resumed_at))
                        };
                        let (stats, waited) = tokio::join!(switchover, arrival);
                        let (waited, resumed_at) = match waited {
                            Ok(resumed) => resumed,
                            Err((true, why)) => {
                                // The guest's state did not arrive, and the source's QEMU
                                // quit (its disks are fenced): the guest starts afresh
                                // here from its disks, as after a host loss.
                                qemu.abort_incoming(&vm).await;
                                return Err(HypervisorError::Failed(format!(
                                    "VM {vm}'s switchover failed ({why}; the source said {:?}); it restarts on node {} from its disks",
                                    stats.err(),
                                    self.id
                                )));
                            }
                            Err((false, why)) => return Err(HypervisorError::Failed(why)),
                        };
                        let ids: Vec<u64> = disks.iter().map(|(d, _)| *d).collect();
                        plane.seal_exports(&ids);
                        let report = match stats {
                            Ok(report) => report,
                            Err(why) => {
                                // The guest runs here; only its figures are lost (a retried
                                // resume finds the source's QEMU gone).
                                tracing::warn!(
                                    vm,
                                    from,
                                    why,
                                    "the guest arrived but its source did not report the migration's figures"
                                );
                                return Ok(HypervisorReply::Resumed { stun_ms: None });
                            }
                        };
                        // QEMU's downtime ends when the source has sent everything; the
                        // guest's pause lasts until it runs here.
                        let mut stats = report.stats;
                        let waited_ms = (waited.as_micros() as u64).div_ceil(1000);
                        let pause = guest_pause_ms(
                            stats.downtime_ms,
                            waited_ms,
                            report.paused_at_unix_us,
                            resumed_at,
                        );
                        tracing::info!(
                            vm,
                            from,
                            paused_ms = pause,
                            qemu_downtime_ms = stats.downtime_ms,
                            waited_here_ms = waited_ms,
                            total_ms = stats.total_ms,
                            ram_bytes = stats.ram_bytes,
                            "QEMU guest arrived by live migration"
                        );
                        stats.total_ms += pause - stats.downtime_ms;
                        stats.downtime_ms = pause;
                        // For the migration's report only: a record that does not land
                        // changes nothing else.
                        let record = Command::RecordLiveMove {
                            id: guard.migration,
                            live: LiveMove {
                                vm: vm.clone(),
                                downtime_ms: stats.downtime_ms,
                                total_ms: stats.total_ms,
                                ram_bytes: stats.ram_bytes,
                            },
                            node: self.id,
                            at_ms: self.now_ms(),
                        };
                        if let Err(e) = self.write(record, None).await {
                            tracing::warn!(vm, migration = guard.migration, error = %e, "cannot record the live migration's figures in the report");
                        }
                        Ok(HypervisorReply::Resumed {
                            stun_ms: Some(stats.downtime_ms),
                        })
                    }
                    Some(Role::Outgoing { to }) => {
                        // The move did not happen: the guest goes on here.
                        qemu.cancel_out(&vm).await;
                        let req = LocalRequest::QemuAbortIncoming {
                            vm: vm.clone(),
                            disks: disks.iter().map(|(d, _)| (*d, 0)).collect(),
                        };
                        let _ = Box::pin(self.local(to, req)).await;
                        Ok(HypervisorReply::Resumed { stun_ms: None })
                    }
                    None => {
                        // Started here from its disks (its old host was lost, or it was
                        // not running when it moved): wait until QEMU runs it.
                        let deadline = Instant::now() + RESUME_WAIT;
                        loop {
                            match qemu.run_state(&vm).await {
                                Some((s, _)) if s == "running" => break,
                                _ if Instant::now() > deadline => {
                                    return Err(HypervisorError::Failed(format!(
                                        "QEMU did not start VM {vm} on node {} within {RESUME_WAIT:?}",
                                        self.id
                                    )));
                                }
                                _ => tokio::time::sleep(Duration::from_millis(20)).await,
                            }
                        }
                        Ok(HypervisorReply::Resumed { stun_ms: None })
                    }
                }
            }
        }
    }

    pub(crate) async fn vm_state_here(&self, vm: &str) -> VmState {
        let Some(plane) = self.data() else {
            return VmState::Unknown;
        };
        let qemu_vm = self
            .model
            .read(|m| m.vms.get(vm).is_some_and(|v| v.qemu.is_some()));
        if qemu_vm {
            let (here, running) = self.model.read(|m| {
                m.vms
                    .get(vm)
                    .map_or((false, false), |v| (v.host == self.id, v.running))
            });
            let state = match self.qemu.get() {
                Some(q) => q.run_state(vm).await,
                None => return VmState::Unknown,
            };
            return match state {
                Some((s, Some(Role::Outgoing { .. }))) if s != "running" => {
                    VmState::Paused(self.id)
                }
                Some((s, _)) if s == "running" => VmState::Running(self.id),
                // Planned here, not running yet (arriving, starting): waiting for a resume.
                _ if here && running => VmState::Paused(self.id),
                _ => VmState::Stopped,
            };
        }
        let (here, running, simulated) = self.model.read(|m| {
            m.vms.get(vm).map_or((false, false, false), |v| {
                (v.host == self.id, v.running, v.workload.is_some())
            })
        });
        let (guest, paused) = plane.guest_running_paused(vm).await;
        if paused {
            return VmState::Paused(self.id);
        }
        if guest || (here && running && !simulated) {
            return VmState::Running(self.id);
        }
        if here && running {
            // Planned here, not started yet: waiting for a resume.
            return VmState::Paused(self.id);
        }
        VmState::Stopped
    }
}

/// The (acknowledged, last) pair a migration judges a link's lag by: chunks while the
/// replica is seeded from them (or waits to be, never having held the group's data),
/// else writes in the group's order. A copy that held the group's data and is
/// (re)connecting lacks the writes it has not acknowledged: counting its chunks instead
/// (none yet) made a destination that had just restarted look caught up, so a migration
/// switched it to sync while it lacked thousands of writes, guests' writes waited on it
/// and the link was outdated (the migration benchmark's fail-back, 0.2 s into moving).
fn observed_position(l: &crate::data::LinkStatusView, state: LinkState) -> (u64, u64) {
    let chunks = (
        l.resync_chunks_sent,
        l.resync_chunks_sent + l.resync_chunks_left,
    );
    match l.phase.as_str() {
        "initial-sync" | "seeding" | "resync" => chunks,
        _ if state == LinkState::Syncing => chunks,
        _ => (l.acked_seq, l.last_seq),
    }
}

fn op_vm(op: &HypervisorOp) -> &str {
    match op {
        HypervisorOp::PauseAndDrain { vm, .. } | HypervisorOp::Resume { vm, .. } => vm,
    }
}

fn disk_roots(roots: &[(DiskId, [u8; 32], [u8; 32])]) -> Vec<DiskRoots> {
    roots
        .iter()
        .map(|(disk, source, destination)| DiskRoots {
            disk: *disk,
            source: Some(*source),
            destination: *destination,
        })
        .collect()
}

/// The coordinator's side: sends each operation to the host it concerns.
pub struct ClusterProvider {
    cluster: Arc<Cluster>,
    /// When each VM was paused by this coordinator (for its stun time).
    pauses: Mutex<HashMap<String, Instant>>,
    /// Per (group, replica): what the link had sent, what the group had written and what
    /// the replica lacked when this coordinator first looked, so the figures it reports
    /// count this migration only.
    baselines: Mutex<HashMap<(String, NodeId), Baseline>>,
}

/// See [`ClusterProvider::baselines`].
#[derive(Clone, Copy, Debug)]
struct Baseline {
    sent: u64,
    written: u64,
    lacking: u64,
}

impl ClusterProvider {
    /// A provider over `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self {
            cluster,
            pauses: Mutex::new(HashMap::new()),
            baselines: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets the figures of group `cg` (its migration is decided).
    pub fn forget(&self, cg: &str) {
        self.baselines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(c, _), _| c != cg);
    }

    async fn storage_on(&self, host: NodeId, op: StorageOp) -> Result<StorageReply, StorageError> {
        match self.cluster.local(host, LocalRequest::Storage { op }).await {
            Ok(LocalResponse::Storage(r)) => r,
            Ok(other) => Err(StorageError::Failed(format!("unexpected answer {other:?}"))),
            Err(ServiceError::Unavailable(_)) => Err(StorageError::Unreachable(host)),
            Err(e) => Err(storage_failed(e)),
        }
    }

    async fn hypervisor_on(
        &self,
        host: NodeId,
        op: HypervisorOp,
    ) -> Result<HypervisorReply, HypervisorError> {
        match self
            .cluster
            .local(host, LocalRequest::Hypervisor { op })
            .await
        {
            Ok(LocalResponse::Hypervisor(r)) => r,
            Ok(other) => Err(HypervisorError::Failed(format!(
                "unexpected answer {other:?}"
            ))),
            Err(ServiceError::Unavailable(_)) => Err(HypervisorError::Unreachable(host)),
            Err(e) => Err(HypervisorError::Failed(e.to_string())),
        }
    }
}

impl StorageProvider for ClusterProvider {
    async fn link_status(&self, cg: &str) -> Result<BTreeMap<NodeId, LinkStatus>, StorageError> {
        let group = self
            .cluster
            .model
            .read(|m| m.cgs.get(cg).cloned())
            .ok_or_else(|| StorageError::Precondition(format!("group '{cg}' is gone")))?;
        let status = match self
            .cluster
            .local(
                group.sequencer,
                LocalRequest::GroupStatus { cg_id: group.id },
            )
            .await
        {
            Ok(LocalResponse::GroupStatus(Some(s))) => s,
            Ok(_) => return Ok(BTreeMap::new()),
            Err(ServiceError::Unavailable(_)) => {
                return Err(StorageError::Unreachable(group.sequencer));
            }
            Err(e) => return Err(storage_failed(e)),
        };
        // Exact where the sequencer's journal still holds what a replica lacks; else (a
        // sequencer of the previous build, or writes already trimmed) priced at the
        // average write, which a fill pass of large writes inflates many times over.
        let lag_bytes = match self
            .cluster
            .local(
                group.sequencer,
                LocalRequest::GroupLagBytes { cg_id: group.id },
            )
            .await
        {
            Ok(LocalResponse::GroupLagBytes(Some(lags))) => lags,
            _ => BTreeMap::new(),
        };
        let mut out = BTreeMap::new();
        let average_write = status
            .bytes_written
            .checked_div(status.writes)
            .unwrap_or(4096);
        for link in &group.replicas {
            let Some(l) = status.links.get(&link.to) else {
                continue;
            };
            let lagging = lag_bytes
                .get(&link.to)
                .copied()
                .flatten()
                .unwrap_or(l.lag_writes * average_write);
            let lacking_now =
                lagging + l.resync_chunks_left * convoy_store::DEFAULT_CHUNK_SIZE as u64;
            let base = *self
                .baselines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((cg.to_string(), link.to))
                .or_insert(Baseline {
                    sent: l.bytes_sent,
                    written: status.bytes_written,
                    lacking: lacking_now,
                });
            let (acked_seq, last_seq) = observed_position(l, link.state);
            out.insert(
                link.to,
                LinkStatus {
                    acked_seq,
                    last_seq,
                    up_to_date: l.phase == "streaming"
                        && link.mode.is_synchronous()
                        && link.state == LinkState::Consistent,
                    // Missing when the migration began, plus what guests wrote since.
                    bytes_needed: base.lacking + status.bytes_written.saturating_sub(base.written),
                    bytes_moved: l.bytes_sent.saturating_sub(base.sent),
                },
            );
        }
        Ok(out)
    }

    async fn compare_delta(
        &self,
        cg: &str,
        from: NodeId,
        to: NodeId,
    ) -> Result<DeltaReport, StorageError> {
        match self
            .storage_on(
                from,
                StorageOp::CompareDelta {
                    cg: cg.to_string(),
                    from,
                    to,
                },
            )
            .await?
        {
            StorageReply::Delta(d) => Ok(d),
            other => Err(StorageError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    async fn snapshot(&self, cg: &str, host: NodeId, name: &str) -> Result<(), StorageError> {
        self.storage_on(
            host,
            StorageOp::Snapshot {
                cg: cg.to_string(),
                host,
                name: name.to_string(),
            },
        )
        .await
        .map(|_| ())
    }

    async fn hand_over(&self, req: &HandOverRequest) -> Result<SequencerReport, StorageError> {
        match self
            .storage_on(req.from, StorageOp::HandOver(req.clone()))
            .await?
        {
            StorageReply::Sequencer(r) => Ok(r),
            other => Err(StorageError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    async fn take_over(&self, req: &TakeOverRequest) -> Result<SequencerReport, StorageError> {
        match self
            .storage_on(req.to, StorageOp::TakeOver(req.clone()))
            .await?
        {
            StorageReply::Sequencer(r) => Ok(r),
            other => Err(StorageError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    async fn restore_snapshot(
        &self,
        req: &RestoreRequest,
    ) -> Result<SequencerReport, StorageError> {
        match self
            .storage_on(req.host, StorageOp::RestoreSnapshot(req.clone()))
            .await?
        {
            StorageReply::Sequencer(r) => Ok(r),
            other => Err(StorageError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    async fn roots(&self, cg: &str, host: NodeId) -> Result<Vec<(DiskId, [u8; 32])>, StorageError> {
        match self
            .storage_on(
                host,
                StorageOp::Roots {
                    cg: cg.to_string(),
                    host,
                },
            )
            .await?
        {
            StorageReply::Roots(r) => Ok(r),
            other => Err(StorageError::Failed(format!("unexpected reply {other:?}"))),
        }
    }
}

impl HypervisorDriver for ClusterProvider {
    async fn pause_and_drain(
        &self,
        vm: &str,
        host: NodeId,
        guard: &Guard,
    ) -> Result<(), HypervisorError> {
        self.hypervisor_on(
            host,
            HypervisorOp::PauseAndDrain {
                vm: vm.to_string(),
                host,
                guard: *guard,
            },
        )
        .await?;
        self.pauses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vm.to_string())
            .or_insert_with(Instant::now);
        Ok(())
    }

    async fn resume(
        &self,
        vm: &str,
        host: NodeId,
        guard: &Guard,
    ) -> Result<Option<u64>, HypervisorError> {
        let reply = self
            .hypervisor_on(
                host,
                HypervisorOp::Resume {
                    vm: vm.to_string(),
                    host,
                    guard: *guard,
                },
            )
            .await?;
        let paused = self
            .pauses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
        // A host that measured the stun itself (QEMU's downtime of a live migration)
        // knows it better than this coordinator's clock around two requests.
        let measured = match reply {
            HypervisorReply::Resumed { stun_ms } => stun_ms,
            HypervisorReply::Drained => None,
        };
        Ok(measured.or(paused.map(|at| at.elapsed().as_millis() as u64)))
    }

    async fn state(&self, vm: &str) -> VmState {
        let Some(host) = self.cluster.model.read(|m| m.vms.get(vm).map(|v| v.host)) else {
            return VmState::Stopped;
        };
        match self
            .cluster
            .local(host, LocalRequest::VmState { vm: vm.to_string() })
            .await
        {
            Ok(LocalResponse::VmState(s)) => s,
            _ => VmState::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::LinkStatusView;

    fn view(phase: &str) -> LinkStatusView {
        LinkStatusView {
            phase: phase.into(),
            acked_seq: 1_000,
            last_seq: 9_000,
            resync_chunks_sent: 0,
            resync_chunks_left: 0,
            ..LinkStatusView::default()
        }
    }

    #[test]
    fn a_reconnecting_copy_lacks_the_writes_it_has_not_acknowledged() {
        for phase in ["connecting", "stopped", "streaming"] {
            for state in [LinkState::Consistent, LinkState::Outdated] {
                assert_eq!(
                    observed_position(&view(phase), state),
                    (1_000, 9_000),
                    "{phase} {state:?}"
                );
            }
        }
        // Seeded from chunks: its lag is the chunks still to send.
        let mut seeding = view("resync");
        seeding.resync_chunks_sent = 5;
        seeding.resync_chunks_left = 7;
        assert_eq!(observed_position(&seeding, LinkState::Outdated), (5, 12));
        // A copy that never held the group's data waits for its first sync: chunks too.
        assert_eq!(
            observed_position(&view("connecting"), LinkState::Syncing),
            (0, 0)
        );
    }
}
