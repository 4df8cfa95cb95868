//! Operations that span hosts: moving a VM, handing a group's order over, fencing. Each
//! commits its change through Raft and drives the hosts involved with node-local
//! requests, in the order that keeps every guarantee (pause before the epoch moves; the
//! fence returns only when no write with an old epoch can still be acknowledged).

use std::time::{Duration, Instant};

use convoy_raft::model::{Cg, Disk, NodeId, Vm};
use convoy_raft::{Command, Outcome};

use super::rpc::{LocalRequest, LocalResponse};
use super::service::{Cluster, ServiceError};
use crate::data::handover::HandOverReport;
use crate::qemu::migrate::{SwitchoverReport, guest_pause_ms};

/// What moving a VM did.
#[derive(Clone, Debug)]
pub struct MoveOutcome {
    /// The VM after the move.
    pub vm: Vm,
    /// Its disks after the move.
    pub disks: Vec<Disk>,
    /// Where it ran.
    pub from: NodeId,
    /// Whether a simulated guest was paused on the source (and so resumed on `to`).
    pub guest_moved: bool,
    /// From the pause until the guest ran on the destination.
    pub stun: Duration,
    /// Whether the sequencer confirmed no write with the old epochs can be acknowledged.
    pub fenced: bool,
    /// What QEMU reported, when a running QEMU guest moved live.
    pub qemu: Option<crate::qemu::migrate::QemuMigrationStats>,
}

/// How long a moved guest may take to start on its destination.
const GUEST_START_WAIT: Duration = Duration::from_secs(15);

fn unexpected(what: &str, answer: LocalResponse) -> ServiceError {
    ServiceError::Internal(format!("unexpected answer to {what}: {answer:?}"))
}

impl Cluster {
    /// Fences `disks` (at their epochs in `disks`) on the sequencer host `sequencer`;
    /// returns whether it confirmed. An unreachable sequencer acknowledges nothing, so
    /// that is reported as not confirmed rather than as an error.
    async fn fence_on(&self, sequencer: NodeId, disks: &[Disk]) -> bool {
        let req = LocalRequest::FenceBarrier {
            disks: disks.iter().map(|d| (d.id, d.epoch)).collect(),
        };
        match self.local(sequencer, req).await {
            Ok(LocalResponse::Fenced { complete }) => complete,
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(sequencer, error = %e, "fence barrier not confirmed");
                false
            }
        }
    }

    /// Why the link of group `cg` from its sequencer `sequencer` to `to` is down, as the
    /// sequencer last saw it (the replica's reason when it refused the stream); `None`
    /// when the link has no error or the sequencer does not answer within a second.
    async fn link_error(&self, cg_id: u64, sequencer: NodeId, to: NodeId) -> Option<String> {
        let req = LocalRequest::GroupStatus { cg_id };
        let asked = tokio::time::timeout(Duration::from_secs(1), self.local(sequencer, req));
        match asked.await {
            Ok(Ok(LocalResponse::GroupStatus(Some(status)))) => {
                status.links.get(&to).and_then(|l| l.last_error.clone())
            }
            _ => None,
        }
    }

    /// Moves VM `name` to host `to`: its simulated guest (if any) is paused and drained on
    /// the old host, `MoveVm` commits (the VM's disk epochs move), the sequencer fences
    /// the old epochs, and the guest resumes on `to`, writing through `to`'s export (to
    /// the group's sequencer, mirrored, when `to` does not order the group).
    pub async fn move_vm(&self, name: &str, to: NodeId) -> Result<MoveOutcome, ServiceError> {
        self.read_barrier().await?;
        let (vm, problem, sequencer) = self.model.read(|m| {
            let vm = m.vms.get(name).cloned();
            let problem = vm.as_ref().and_then(|v| {
                if v.host == to {
                    Some(format!("VM '{name}' already runs on node {to}"))
                } else if !m.is_active_host(to) {
                    Some(format!(
                        "node {to} is not an active host (see `convoy cluster status`)"
                    ))
                } else {
                    m.move_target_problem(v, to)
                }
            });
            let sequencer = vm
                .as_ref()
                .and_then(|v| v.cg.as_ref())
                .and_then(|c| m.cgs.get(c))
                .map(|c| (c.id, c.sequencer));
            (vm, problem, sequencer)
        });
        let vm = vm.ok_or_else(|| {
            ServiceError::NotFound(format!(
                "vm '{name}' not found: list them with `convoy vm list`"
            ))
        })?;
        if let Some(p) = problem {
            let why = match sequencer {
                Some((cg_id, seq)) => self.link_error(cg_id, seq, to).await,
                None => None,
            };
            return Err(ServiceError::BadRequest(with_link_error(p, why)));
        }
        let from = vm.host;
        if vm.qemu.is_some() && vm.running {
            return self.move_qemu_vm(&vm, to, sequencer.map(|(_, s)| s)).await;
        }
        let started = Instant::now();
        let simulated = vm.running && vm.workload.is_some();
        let mut guest_moved = false;
        if simulated {
            match self
                .local(
                    from,
                    LocalRequest::PauseGuest {
                        vm: name.to_string(),
                    },
                )
                .await
            {
                Ok(LocalResponse::Paused { was_running }) => guest_moved = was_running,
                Ok(other) => return Err(unexpected("a guest pause", other)),
                // A dead source writes nothing; the epoch bump fences whatever it had.
                Err(ServiceError::Unavailable(e)) => {
                    tracing::warn!(vm = name, from, error = %e, "source unreachable: moving without a pause");
                }
                Err(e) => return Err(e),
            }
        }
        let committed = self
            .write(
                Command::MoveVm {
                    name: name.to_string(),
                    to,
                    expect_host: Some(from),
                },
                None,
            )
            .await;
        let (vm, disks) = match committed {
            Ok(Outcome::Vm(vm, disks)) => (vm, disks),
            Ok(other) => {
                return Err(ServiceError::Internal(format!(
                    "unexpected outcome {other:?}"
                )));
            }
            Err(e) => {
                if guest_moved {
                    let _ = self
                        .local(
                            from,
                            LocalRequest::ResumeGuest {
                                vm: name.to_string(),
                            },
                        )
                        .await;
                }
                return Err(e);
            }
        };
        let fenced = match sequencer {
            Some((_, s)) => self.fence_on(s, &disks).await,
            None => true,
        };
        if guest_moved {
            let deadline = Instant::now() + GUEST_START_WAIT;
            loop {
                let status = self
                    .local(
                        to,
                        LocalRequest::GuestStatus {
                            vm: name.to_string(),
                        },
                    )
                    .await;
                if let Ok(LocalResponse::GuestStatus(s)) = &status {
                    if s.running {
                        break;
                    }
                    if let Some(e) = &s.error {
                        return Err(ServiceError::Conflict(format!(
                            "VM '{name}' moved to node {to} but its guest cannot start there: {e}"
                        )));
                    }
                }
                if Instant::now() > deadline {
                    return Err(ServiceError::Unavailable(format!(
                        "VM '{name}' moved to node {to}, but its guest did not start there within {GUEST_START_WAIT:?}; see `convoy vm show {name}`"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(MoveOutcome {
            vm,
            disks,
            from,
            guest_moved,
            stun: if guest_moved {
                started.elapsed()
            } else {
                Duration::ZERO
            },
            fenced,
            qemu: None,
        })
    }

    /// Moves a running QEMU guest live: QEMU copies its memory to a QEMU waiting on `to`
    /// and pauses it before the switchover; then the move commits (the disks' epochs
    /// fence the source), `to`'s exports reach the new epochs, and the switchover lets the
    /// guest run on `to`. Until the commit, any failure leaves the guest running on its
    /// source; the guest never runs on two hosts.
    async fn move_qemu_vm(
        &self,
        vm: &Vm,
        to: NodeId,
        sequencer: Option<NodeId>,
    ) -> Result<MoveOutcome, ServiceError> {
        let (name, from) = (vm.name.clone(), vm.host);
        let started = Instant::now();
        let plan = self
            .model
            .read(|m| convoy_raft::model::host_plan(m, from).qemu.remove(&name))
            .ok_or_else(|| {
                ServiceError::Conflict(format!(
                    "VM '{name}' has no QEMU plan on node {from} (are its disks exported there?)"
                ))
            })?;
        let staged: Vec<(u64, u64)> = plan.disks.iter().map(|d| (d.id, d.size)).collect();
        let abort_incoming = || async {
            let req = LocalRequest::QemuAbortIncoming {
                vm: name.clone(),
                disks: staged.clone(),
            };
            if let Err(e) = self.local(to, req).await {
                tracing::warn!(vm = name, to, error = %e, "cannot remove the waiting QEMU");
            }
        };
        let incoming = LocalRequest::QemuIncoming {
            plan: Box::new(plan),
            from,
        };
        match self.local(to, incoming).await {
            Ok(LocalResponse::Done) => {}
            Ok(other) => return Err(unexpected("a QEMU start for a migration", other)),
            Err(e) => {
                abort_incoming().await;
                return Err(e);
            }
        }
        let out = LocalRequest::QemuMigrateOut {
            vm: name.clone(),
            to,
        };
        match self.local(from, out).await {
            Ok(LocalResponse::Done) => {}
            Ok(other) => {
                abort_incoming().await;
                return Err(unexpected("a live migration", other));
            }
            Err(e) => {
                abort_incoming().await;
                return Err(e);
            }
        }
        // The guest is paused with its disk requests drained: the storage step.
        let committed = self
            .write(
                Command::MoveVm {
                    name: name.clone(),
                    to,
                    expect_host: Some(from),
                },
                None,
            )
            .await;
        let (moved, disks) = match committed {
            Ok(Outcome::Vm(vm, disks)) => (vm, disks),
            other => {
                let _ = self
                    .local(from, LocalRequest::QemuCancelOut { vm: name.clone() })
                    .await;
                abort_incoming().await;
                return Err(match other {
                    Err(e) => e,
                    Ok(o) => ServiceError::Internal(format!("unexpected outcome {o:?}")),
                });
            }
        };
        let fenced = match sequencer {
            Some(s) => self.fence_on(s, &disks).await,
            None => true,
        };
        let at_epochs = disks.iter().map(|d| (d.id, d.epoch)).collect();
        // The source sent the guest's last state when it paused (it answers once all is
        // sent); the destination resumes the arrived guest once its exports are at the new
        // epochs.
        let source = async {
            match self
                .local(from, LocalRequest::QemuSwitchover { vm: name.clone() })
                .await?
            {
                LocalResponse::QemuSwitchedOver(report) => Ok(report),
                LocalResponse::QemuMigrated(stats) => Ok(SwitchoverReport {
                    stats,
                    paused_at_unix_us: None,
                }),
                other => Err(unexpected("a switchover", other)),
            }
        };
        let destination = async {
            match self
                .local(to, LocalRequest::QemuExportsReady { disks: at_epochs })
                .await?
            {
                LocalResponse::Done => {}
                other => return Err(unexpected("an export wait", other)),
            }
            match self
                .local(to, LocalRequest::QemuFinishIncoming { vm: name.clone() })
                .await?
            {
                LocalResponse::QemuResumed {
                    waited_ms,
                    resumed_at_unix_us,
                } => Ok((waited_ms, resumed_at_unix_us)),
                other => Err(unexpected("a migration's end", other)),
            }
        };
        let switched = async {
            let (report, resumed) = tokio::join!(source, destination);
            let (report, (waited_ms, resumed_at)) = (report?, resumed?);
            // QEMU's downtime ends when the source has sent everything; the guest's pause
            // lasts until it runs on `to`.
            let mut stats = report.stats;
            let pause = guest_pause_ms(
                stats.downtime_ms,
                waited_ms,
                report.paused_at_unix_us,
                resumed_at,
            );
            stats.total_ms += pause - stats.downtime_ms;
            stats.downtime_ms = pause;
            Ok::<_, ServiceError>(stats)
        };
        let stats = match switched.await {
            Ok(stats) => stats,
            Err(e) => {
                // The move is committed and the source fenced (its QEMU quit in the
                // switchover): the guest's state could not follow, so it starts afresh
                // on `to` from its disks, as after a host loss.
                abort_incoming().await;
                return Err(ServiceError::Conflict(format!(
                    "VM '{name}' moved to node {to} but its live migration failed at the switchover ({e}); it restarts there from its disks"
                )));
            }
        };
        tracing::info!(
            vm = name,
            from,
            to,
            took_ms = started.elapsed().as_millis() as u64,
            downtime_ms = stats.downtime_ms,
            total_ms = stats.total_ms,
            "QEMU guest moved live"
        );
        Ok(MoveOutcome {
            vm: moved,
            disks,
            from,
            guest_moved: true,
            stun: Duration::from_millis(stats.downtime_ms),
            fenced,
            qemu: Some(stats),
        })
    }

    /// Hands group `cg`'s order (and the primary role) to `to`, which holds a consistent
    /// copy; the old sequencer becomes its replica in the link's mode.
    pub async fn switch_primary(
        &self,
        cg: &str,
        to: NodeId,
    ) -> Result<(HandOverReport, NodeId), ServiceError> {
        self.read_barrier().await?;
        let group: Option<Cg> = self.model.read(|m| m.cgs.get(cg).cloned());
        let group = group.ok_or_else(|| {
            ServiceError::NotFound(format!(
                "cg '{cg}' not found: list them with `convoy cg list`"
            ))
        })?;
        let from = group.sequencer;
        if from == to {
            return Err(ServiceError::BadRequest(format!(
                "node {to} already is the primary of '{cg}'"
            )));
        }
        match group.link(to) {
            None => {
                return Err(ServiceError::BadRequest(format!(
                    "node {to} holds no copy of '{cg}': replicate it there first (`convoy cg replicate {cg} --to {to} --mode sync`)"
                )));
            }
            Some(l) if l.state != convoy_raft::model::LinkState::Consistent => {
                let msg = format!(
                    "node {to}'s copy of '{cg}' is {}: wait until `convoy cg show {cg}` says consistent",
                    l.state.as_str()
                );
                let why = self.link_error(group.id, from, to).await;
                return Err(ServiceError::Conflict(with_link_error(msg, why)));
            }
            Some(_) => {}
        }
        if let Some(m) = self.model.read(|m| m.running_migration(cg).map(|m| m.id)) {
            return Err(ServiceError::Conflict(format!(
                "group '{cg}' is being migrated (migration {m}): its primary changes with it"
            )));
        }
        let req = LocalRequest::HandOver {
            cg: cg.to_string(),
            cg_id: group.id,
            to,
        };
        match self.local(from, req).await? {
            LocalResponse::HandedOver(report) => Ok((report, from)),
            other => Err(unexpected("a hand-over", other)),
        }
    }

    /// Fences a whole group (every disk's epoch and the sequencer epoch move) and waits
    /// on its sequencer until no write with an old epoch can be acknowledged. Returns the
    /// group and whether the sequencer confirmed.
    pub async fn fence_group(&self, cg: &str) -> Result<(Cg, bool), ServiceError> {
        let group = match self
            .write(Command::BumpEpoch { cg: cg.to_string() }, None)
            .await?
        {
            Outcome::Cg(c) => c,
            other => {
                return Err(ServiceError::Internal(format!(
                    "unexpected outcome {other:?}"
                )));
            }
        };
        self.read_barrier().await?;
        let disks = self.model.read(|m| m.cg_disks(&group));
        let fenced = self.fence_on(group.sequencer, &disks).await;
        Ok((group, fenced))
    }

    /// Fences one VM (only its disks' epochs move) and waits on its group's sequencer.
    pub async fn fence_vm(&self, name: &str) -> Result<(Vm, Vec<Disk>, bool), ServiceError> {
        let (vm, disks) = match self
            .write(
                Command::FenceVm {
                    name: name.to_string(),
                },
                None,
            )
            .await?
        {
            Outcome::Vm(vm, disks) => (vm, disks),
            other => {
                return Err(ServiceError::Internal(format!(
                    "unexpected outcome {other:?}"
                )));
            }
        };
        let sequencer = self.model.read(|m| {
            vm.cg
                .as_ref()
                .and_then(|c| m.cgs.get(c))
                .map_or(vm.host, |c| c.sequencer)
        });
        let fenced = self.fence_on(sequencer, &disks).await;
        Ok((vm, disks, fenced))
    }
}

/// `msg`, followed by why the copy's link is down when that is known: an operator told to
/// wait for a copy that a replica keeps refusing would wait forever.
fn with_link_error(msg: String, why: Option<String>) -> String {
    match why {
        Some(why) => format!("{msg} (its link: {why})"),
        None => msg,
    }
}
