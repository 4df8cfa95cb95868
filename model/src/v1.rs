//! Schema version 1: the model as written before schema versions existed (Convoy up to
//! the replicated-disks release). Frozen: these definitions must never change, since they
//! decode bytes already on operators' disks. Each type upgrades to the current schema.
//!
//! What changed in version 2: a VM records every host it stayed on (`Vm::stays`); a group
//! has no separate `primary` (the sequencer is the primary), and gains a sequencer epoch
//! and the sequence its sequencer continued at; `SetLinkState` gained a compare-and-set
//! expectation; migrations became real records; new commands were appended.

#![allow(missing_docs)]

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::NodeId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: NodeId,
    pub raft_addr: String,
    pub admin_addr: String,
    pub retired: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: u64,
    pub name: String,
    pub host: NodeId,
    pub disks: Vec<u64>,
    pub workload: Option<String>,
    pub cg: Option<String>,
    pub running: bool,
    pub created_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: u64,
    pub vm: String,
    pub index: u32,
    pub size: u64,
    pub epoch: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationMode {
    Async,
    Sync,
    ActiveActiveSync,
    ActiveActiveAsync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkState {
    Syncing,
    Consistent,
    Inconsistent,
    Outdated,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationLink {
    pub to: NodeId,
    pub mode: ReplicationMode,
    pub state: LinkState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgSnapshot {
    pub name: String,
    pub host: NodeId,
    pub created_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cg {
    pub id: u64,
    pub name: String,
    pub vms: Vec<String>,
    pub primary: NodeId,
    pub sequencer: NodeId,
    pub replicas: Vec<ReplicationLink>,
    pub snapshots: Vec<CgSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub id: u64,
    pub cg: String,
    pub from: NodeId,
    pub to: NodeId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    RegisterHost {
        id: NodeId,
        raft_addr: String,
        admin_addr: String,
    },
    RetireHost {
        id: NodeId,
    },
    CreateVm {
        name: String,
        host: NodeId,
        disk_sizes: Vec<u64>,
        workload: Option<String>,
        created_at_ms: u64,
    },
    DeleteVm {
        name: String,
    },
    CreateCg {
        name: String,
        vms: Vec<String>,
    },
    DeleteCg {
        name: String,
    },
    AddReplica {
        cg: String,
        to: NodeId,
        mode: ReplicationMode,
    },
    RemoveReplica {
        cg: String,
        to: NodeId,
    },
    SetMode {
        cg: String,
        mode: ReplicationMode,
    },
    SetLinkState {
        cg: String,
        to: NodeId,
        state: LinkState,
    },
    SetVmRunning {
        name: String,
        running: bool,
    },
    CreateSnapshot {
        cg: String,
        name: String,
        created_at_ms: u64,
    },
    DeleteSnapshot {
        cg: String,
        name: String,
    },
    BumpEpoch {
        cg: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    Host(HostRecord),
    Vm(Vm, Vec<Disk>),
    Cg(Cg),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelError {
    Invalid { what: String, why: String },
    Exists { kind: String, name: String },
    NotFound { kind: String, name: String },
    HostRetired(NodeId),
    HostConflict(NodeId),
    InUse(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dedup {
    pub order: VecDeque<u128>,
    pub answers: HashMap<u128, Result<Outcome, ModelError>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterModel {
    pub hosts: BTreeMap<NodeId, HostRecord>,
    pub vms: BTreeMap<String, Vm>,
    pub disks: BTreeMap<u64, Disk>,
    pub cgs: BTreeMap<String, Cg>,
    pub migrations: BTreeMap<u64, Migration>,
    pub next_vm_id: u64,
    pub next_disk_id: u64,
    pub next_cg_id: u64,
    pub dedup: Dedup,
}

// ---- upgrades to the current schema ----

impl From<HostRecord> for crate::HostRecord {
    fn from(h: HostRecord) -> Self {
        crate::HostRecord {
            id: h.id,
            raft_addr: h.raft_addr,
            admin_addr: h.admin_addr,
            retired: h.retired,
        }
    }
}

impl From<Vm> for crate::Vm {
    fn from(v: Vm) -> Self {
        crate::Vm {
            id: v.id,
            name: v.name,
            host: v.host,
            disks: v.disks,
            workload: v.workload,
            cg: v.cg,
            running: v.running,
            created_at_ms: v.created_at_ms,
            // Version 1 never moved a VM: it stayed where it was created.
            stays: vec![v.host],
            qemu: None,
        }
    }
}

impl From<Disk> for crate::Disk {
    fn from(d: Disk) -> Self {
        crate::Disk {
            id: d.id,
            vm: d.vm,
            index: d.index,
            size: d.size,
            epoch: d.epoch,
        }
    }
}

impl From<ReplicationMode> for crate::ReplicationMode {
    fn from(m: ReplicationMode) -> Self {
        match m {
            ReplicationMode::Async => crate::ReplicationMode::Async,
            ReplicationMode::Sync => crate::ReplicationMode::Sync,
            ReplicationMode::ActiveActiveSync => crate::ReplicationMode::ActiveActiveSync,
            ReplicationMode::ActiveActiveAsync => crate::ReplicationMode::ActiveActiveAsync,
        }
    }
}

impl From<LinkState> for crate::LinkState {
    fn from(s: LinkState) -> Self {
        match s {
            LinkState::Syncing => crate::LinkState::Syncing,
            LinkState::Consistent => crate::LinkState::Consistent,
            LinkState::Inconsistent => crate::LinkState::Inconsistent,
            LinkState::Outdated => crate::LinkState::Outdated,
        }
    }
}

impl From<ReplicationLink> for crate::ReplicationLink {
    fn from(l: ReplicationLink) -> Self {
        crate::ReplicationLink {
            to: l.to,
            mode: l.mode.into(),
            state: l.state.into(),
        }
    }
}

impl From<CgSnapshot> for crate::CgSnapshot {
    fn from(s: CgSnapshot) -> Self {
        crate::CgSnapshot {
            name: s.name,
            host: s.host,
            created_at_ms: s.created_at_ms,
        }
    }
}

impl Cg {
    /// Upgrades a group; `max_disk_epoch` is the highest epoch of its disks, which is what
    /// version 1 put in replication messages (and what replicas recorded), so it becomes
    /// the sequencer epoch and no replica refuses the upgraded sequencer.
    pub fn upgrade(self, max_disk_epoch: u64) -> crate::Cg {
        crate::Cg {
            id: self.id,
            name: self.name,
            vms: self.vms,
            // Version 1 kept primary == sequencer.
            sequencer: self.sequencer,
            sequencer_epoch: max_disk_epoch.max(1),
            seq_start: 0,
            replicas: self.replicas.into_iter().map(Into::into).collect(),
            snapshots: self.snapshots.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<Command> for crate::Command {
    fn from(c: Command) -> Self {
        use crate::Command as C;
        match c {
            Command::RegisterHost {
                id,
                raft_addr,
                admin_addr,
            } => C::RegisterHost {
                id,
                raft_addr,
                admin_addr,
            },
            Command::RetireHost { id } => C::RetireHost { id },
            Command::CreateVm {
                name,
                host,
                disk_sizes,
                workload,
                created_at_ms,
            } => C::CreateVm {
                name,
                host,
                disk_sizes,
                workload,
                created_at_ms,
            },
            Command::DeleteVm { name } => C::DeleteVm { name },
            Command::CreateCg { name, vms } => C::CreateCg { name, vms },
            Command::DeleteCg { name } => C::DeleteCg { name },
            Command::AddReplica { cg, to, mode } => C::AddReplica {
                cg,
                to,
                mode: mode.into(),
            },
            Command::RemoveReplica { cg, to } => C::RemoveReplica { cg, to },
            Command::SetMode { cg, mode } => C::SetMode {
                cg,
                mode: mode.into(),
            },
            Command::SetLinkState { cg, to, state } => C::SetLinkState {
                cg,
                to,
                state: state.into(),
                expect: None,
            },
            Command::SetVmRunning { name, running } => C::SetVmRunning { name, running },
            Command::CreateSnapshot {
                cg,
                name,
                created_at_ms,
            } => C::CreateSnapshot {
                cg,
                name,
                created_at_ms,
            },
            Command::DeleteSnapshot { cg, name } => C::DeleteSnapshot { cg, name },
            Command::BumpEpoch { cg } => C::BumpEpoch { cg },
        }
    }
}

impl From<ModelError> for crate::ModelError {
    fn from(e: ModelError) -> Self {
        use crate::ModelError as E;
        match e {
            ModelError::Invalid { what, why } => E::Invalid { what, why },
            ModelError::Exists { kind, name } => E::Exists { kind, name },
            ModelError::NotFound { kind, name } => E::NotFound { kind, name },
            ModelError::HostRetired(id) => E::HostRetired(id),
            ModelError::HostConflict(id) => E::HostConflict(id),
            ModelError::InUse(m) => E::InUse(m),
        }
    }
}

impl Outcome {
    /// Upgrades a remembered answer. A group in it gets the sequencer epoch it has in
    /// `model` (already upgraded), or 1 if it was deleted since.
    fn upgrade(self, model: &crate::ClusterModel) -> crate::Outcome {
        match self {
            Outcome::Done => crate::Outcome::Done,
            Outcome::Host(h) => crate::Outcome::Host(h.into()),
            Outcome::Vm(v, d) => {
                crate::Outcome::Vm(v.into(), d.into_iter().map(Into::into).collect())
            }
            Outcome::Cg(c) => {
                let epoch = model
                    .cgs
                    .get(&c.name)
                    .filter(|now| now.id == c.id)
                    .map_or(1, |now| now.sequencer_epoch);
                crate::Outcome::Cg(c.upgrade(epoch))
            }
        }
    }
}

impl ClusterModel {
    /// Upgrades a whole model (a state-machine snapshot) to the current schema.
    pub fn upgrade(self) -> crate::ClusterModel {
        let disks: BTreeMap<u64, crate::Disk> = self
            .disks
            .into_iter()
            .map(|(id, d)| (id, d.into()))
            .collect();
        let vms: BTreeMap<String, crate::Vm> =
            self.vms.into_iter().map(|(n, v)| (n, v.into())).collect();
        let cgs = self
            .cgs
            .into_iter()
            .map(|(name, cg)| {
                let max_epoch = cg
                    .vms
                    .iter()
                    .filter_map(|v| vms.get(v))
                    .flat_map(|v| v.disks.iter())
                    .filter_map(|d| disks.get(d))
                    .map(|d| d.epoch)
                    .max()
                    .unwrap_or(1);
                (name, cg.upgrade(max_epoch))
            })
            .collect();
        let next_migration_id = self.migrations.keys().max().copied().unwrap_or(0);
        // No version-1 command created migrations; a record could only come from a build
        // that never shipped. Keep it, decided, so its id is never reused.
        let migrations = self
            .migrations
            .into_values()
            .map(|m| {
                let record = crate::Migration {
                    id: m.id,
                    cg: m.cg,
                    from: m.from,
                    to: m.to,
                    strategy: crate::Strategy::ReverseReplication,
                    phase: crate::Phase::Done,
                    claim: crate::Claim {
                        node: m.from,
                        number: 1,
                    },
                    started_at_ms: 0,
                    deadline_ms: 0,
                    destination_had_copy: false,
                    prior_mode: None,
                    moved: Vec::new(),
                    stats: crate::MigrationStats::default(),
                    timeline: Vec::new(),
                    decision: Some(crate::DecisionRecord {
                        decision: crate::Decision::FailedBack,
                        at_ms: 0,
                        reason: "recorded by schema version 1, which had no migrations".into(),
                        roots: Vec::new(),
                    }),
                    live: crate::LiveSettings::default(),
                };
                (record.id, record)
            })
            .collect();
        let mut model = crate::ClusterModel {
            hosts: self
                .hosts
                .into_iter()
                .map(|(id, h)| (id, h.into()))
                .collect(),
            vms,
            disks,
            cgs,
            migrations,
            next_vm_id: self.next_vm_id,
            next_disk_id: self.next_disk_id,
            next_cg_id: self.next_cg_id,
            next_migration_id,
            dedup: crate::Dedup::default(),
        };
        let mut dedup = crate::Dedup::default();
        for id in self.dedup.order {
            if let Some(answer) = self.dedup.answers.get(&id) {
                let upgraded = match answer.clone() {
                    Ok(o) => Ok(o.upgrade(&model)),
                    Err(e) => Err(e.into()),
                };
                dedup.remember(id, upgraded);
            }
        }
        model.dedup = dedup;
        model
    }
}
