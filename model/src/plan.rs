//! What one host must run, derived from the model alone: [`host_plan`].
//!
//! The agent's reconcile applies the difference between this plan and what runs; it
//! decides nothing itself. Keyed on where each VM runs and which host sequences each
//! group, so a VM move or a sequencer hand-over changes the plans of exactly the hosts
//! involved.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ClusterModel, DiskId, LinkState, NodeId, ReplicationLink, ReplicationMode, Vm};

/// A write domain: the disks that share one write order. A consistency group, or a VM
/// that is in no group (its disks are ordered on its own host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DomainId {
    /// A consistency group, by id.
    Cg(u64),
    /// A VM in no group, by id.
    Vm(u64),
}

impl DomainId {
    /// A stable file-name key (`cg-7`, `vm-3`): ids are never reused, names may be.
    pub fn key(self) -> String {
        match self {
            DomainId::Cg(id) => format!("cg-{id}"),
            DomainId::Vm(id) => format!("vm-{id}"),
        }
    }

    /// The group id, for a group.
    pub fn cg_id(self) -> Option<u64> {
        match self {
            DomainId::Cg(id) => Some(id),
            DomainId::Vm(_) => None,
        }
    }
}

/// One disk as a host needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPlan {
    /// The disk.
    pub id: DiskId,
    /// Its size in bytes.
    pub size: u64,
    /// Its fencing epoch.
    pub epoch: u64,
    /// The VM it belongs to.
    pub vm: String,
    /// Where that VM runs.
    pub runs_on: NodeId,
}

/// A write domain this host sequences.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencerPlan {
    /// The domain.
    pub domain: DomainId,
    /// Group name, or `vm:<name>` for a VM in no group (for logs and status).
    pub name: String,
    /// The domain's sequencer epoch (1 for a VM in no group).
    pub sequencer_epoch: u64,
    /// Sequence number to continue at after a hand-over (0: this host's own reservation).
    pub seq_start: u64,
    /// Every disk of the domain, in group order.
    pub disks: Vec<DiskPlan>,
    /// The replicas to stream to.
    pub links: Vec<ReplicationLink>,
}

/// A group this host keeps a replica copy of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPlan {
    /// Group id.
    pub cg_id: u64,
    /// Group name.
    pub cg: String,
    /// The only host allowed to stream to this copy.
    pub sequencer: NodeId,
    /// Its sequencer epoch: older senders are refused.
    pub sequencer_epoch: u64,
    /// Mode of this copy's link.
    pub mode: ReplicationMode,
    /// State of this copy's link.
    pub state: LinkState,
    /// The group's disks, in group order.
    pub disks: Vec<DiskPlan>,
}

/// How a writable export on this host reaches its domain's sequencer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportKind {
    /// This host sequences the domain: writes enter its sequencer directly.
    Local {
        /// The domain.
        domain: DomainId,
    },
    /// Another host sequences the group: writes are mirrored to it and acknowledged once
    /// it ordered them; reads come from this host's copy when it is current.
    Mirrored {
        /// Group id.
        cg_id: u64,
        /// The sequencer.
        sequencer: NodeId,
        /// Its sequencer epoch.
        sequencer_epoch: u64,
    },
}

/// A writable NBD export of one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportPlan {
    /// The disk.
    pub disk: DiskPlan,
    /// Where its writes go.
    pub kind: ExportKind,
}

/// A simulated guest to run on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestPlan {
    /// VM name.
    pub vm: String,
    /// VM id.
    pub vm_id: u64,
    /// Workload spec.
    pub workload: String,
    /// Index of the VM's current stay (numbers its write-log segment here).
    pub stay: u64,
    /// The VM's disks, in order (each has a writable export in the plan).
    pub disks: Vec<DiskPlan>,
}

/// A QEMU guest to run on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuPlan {
    /// VM name.
    pub vm: String,
    /// VM id.
    pub vm_id: u64,
    /// How QEMU runs it.
    pub spec: crate::QemuSpec,
    /// The VM's disks, in order (each has a writable export in the plan).
    pub disks: Vec<DiskPlan>,
}

/// Everything one host must run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPlan {
    /// The host.
    pub host: NodeId,
    /// Write domains it sequences.
    pub sequencers: BTreeMap<DomainId, SequencerPlan>,
    /// Groups it keeps a replica of, by group id.
    pub replicas: BTreeMap<u64, ReplicaPlan>,
    /// Writable exports, by disk.
    pub exports: BTreeMap<DiskId, ExportPlan>,
    /// Simulated guests, by VM name.
    pub guests: BTreeMap<String, GuestPlan>,
    /// QEMU guests, by VM name.
    pub qemu: BTreeMap<String, QemuPlan>,
}

impl HostPlan {
    /// Every disk this host keeps an image of (sequenced, replicated or exported), with
    /// its size.
    pub fn images(&self) -> BTreeMap<DiskId, u64> {
        let mut out = BTreeMap::new();
        let seq = self.sequencers.values().flat_map(|s| s.disks.iter());
        let rep = self.replicas.values().flat_map(|r| r.disks.iter());
        let exp = self.exports.values().map(|e| &e.disk);
        for d in seq.chain(rep).chain(exp) {
            out.insert(d.id, d.size);
        }
        out
    }

    /// The sequencer plan of the domain `disk` belongs to, if this host sequences it.
    pub fn sequencer_of(&self, disk: DiskId) -> Option<&SequencerPlan> {
        self.sequencers
            .values()
            .find(|s| s.disks.iter().any(|d| d.id == disk))
    }
}

fn disk_plans(model: &ClusterModel, vm: &Vm) -> Vec<DiskPlan> {
    model
        .vm_disks(vm)
        .into_iter()
        .map(|d| DiskPlan {
            id: d.id,
            size: d.size,
            epoch: d.epoch,
            vm: vm.name.clone(),
            runs_on: vm.host,
        })
        .collect()
}

/// What `host` must run according to `model`. Pure: the same model gives the same plan.
pub fn host_plan(model: &ClusterModel, host: NodeId) -> HostPlan {
    let mut plan = HostPlan {
        host,
        ..HostPlan::default()
    };
    for cg in model.cgs.values() {
        let disks: Vec<DiskPlan> = cg
            .vms
            .iter()
            .filter_map(|v| model.vms.get(v))
            .flat_map(|vm| disk_plans(model, vm))
            .collect();
        if cg.sequencer == host {
            plan.sequencers.insert(
                DomainId::Cg(cg.id),
                SequencerPlan {
                    domain: DomainId::Cg(cg.id),
                    name: cg.name.clone(),
                    sequencer_epoch: cg.sequencer_epoch,
                    seq_start: cg.seq_start,
                    disks: disks.clone(),
                    links: cg.replicas.clone(),
                },
            );
        }
        if let Some(link) = cg.link(host) {
            plan.replicas.insert(
                cg.id,
                ReplicaPlan {
                    cg_id: cg.id,
                    cg: cg.name.clone(),
                    sequencer: cg.sequencer,
                    sequencer_epoch: cg.sequencer_epoch,
                    mode: link.mode,
                    state: link.state,
                    disks: disks.clone(),
                },
            );
        }
        let mirrored = ExportKind::Mirrored {
            cg_id: cg.id,
            sequencer: cg.sequencer,
            sequencer_epoch: cg.sequencer_epoch,
        };
        let kind = if cg.sequencer == host {
            ExportKind::Local {
                domain: DomainId::Cg(cg.id),
            }
        } else {
            mirrored.clone()
        };
        let active_active_here = cg.link(host).is_some_and(|l| l.mode.is_active_active());
        for d in &disks {
            // A VM's disks are writable where it runs; an active-active copy is writable
            // too (both sides have access), its writes ordered by the sequencer.
            if d.runs_on == host || active_active_here {
                plan.exports.insert(
                    d.id,
                    ExportPlan {
                        disk: d.clone(),
                        kind: kind.clone(),
                    },
                );
            }
        }
    }
    for vm in model.vms.values().filter(|v| v.host == host) {
        let disks = disk_plans(model, vm);
        if vm.cg.is_none() {
            let domain = DomainId::Vm(vm.id);
            for d in &disks {
                plan.exports.insert(
                    d.id,
                    ExportPlan {
                        disk: d.clone(),
                        kind: ExportKind::Local { domain },
                    },
                );
            }
            plan.sequencers.insert(
                domain,
                SequencerPlan {
                    domain,
                    name: format!("vm:{}", vm.name),
                    sequencer_epoch: 1,
                    seq_start: 0,
                    disks: disks.clone(),
                    links: Vec::new(),
                },
            );
        }
        if let (true, Some(spec)) = (vm.running, &vm.qemu) {
            plan.qemu.insert(
                vm.name.clone(),
                QemuPlan {
                    vm: vm.name.clone(),
                    vm_id: vm.id,
                    spec: (**spec).clone(),
                    disks: disks.clone(),
                },
            );
        }
        if let (true, Some(workload)) = (vm.running, &vm.workload) {
            plan.guests.insert(
                vm.name.clone(),
                GuestPlan {
                    vm: vm.name.clone(),
                    vm_id: vm.id,
                    workload: workload.clone(),
                    stay: vm.stay(),
                    disks,
                },
            );
        }
    }
    plan
}
