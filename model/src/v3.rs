//! Schema version 3: the shapes that version 4 changed, frozen as version 3 wrote them
//! (2026-12-06). These definitions must never change, since they decode bytes already on
//! operators' disks. Types versions 4 and 5 did not change are the current ones; a
//! migration is version 4's (version 5 changed it), and a version 3 model upgrades
//! through version 4's.
//!
//! What changed in version 4: a VM records how QEMU runs it ([`crate::Vm::qemu`]), so a
//! snapshot's VMs (in the model and in remembered answers) gained a field. Log entries did
//! not change: version 4 only appended [`crate::Command::CreateQemuVm`], so version 3
//! entries decode as they are.

#![allow(missing_docs)]

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::v4::Migration;
use crate::{Cg, Disk, HostRecord, ModelError, NodeId};

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
    pub stays: Vec<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    Host(HostRecord),
    Vm(Vm, Vec<Disk>),
    Cg(Cg),
    Migration(Box<Migration>),
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
    pub next_migration_id: u64,
    pub dedup: Dedup,
}

// ---- upgrades to version 4 ----

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
            stays: v.stays,
            // Version 3 had no QEMU guests.
            qemu: None,
        }
    }
}

impl From<Outcome> for crate::v4::Outcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Done => crate::v4::Outcome::Done,
            Outcome::Host(h) => crate::v4::Outcome::Host(h),
            Outcome::Vm(v, d) => crate::v4::Outcome::Vm(v.into(), d),
            Outcome::Cg(c) => crate::v4::Outcome::Cg(c),
            Outcome::Migration(m) => crate::v4::Outcome::Migration(m),
        }
    }
}

impl ClusterModel {
    /// Upgrades a whole model (a state-machine snapshot) to the current schema, through
    /// version 4.
    pub fn upgrade(self) -> crate::ClusterModel {
        let mut dedup = crate::v4::Dedup::default();
        for id in self.dedup.order {
            if let Some(answer) = self.dedup.answers.get(&id) {
                dedup.order.push_back(id);
                dedup.answers.insert(id, answer.clone().map(Into::into));
            }
        }
        crate::v4::ClusterModel {
            hosts: self.hosts,
            vms: self.vms.into_iter().map(|(n, v)| (n, v.into())).collect(),
            disks: self.disks,
            cgs: self.cgs,
            migrations: self.migrations,
            next_vm_id: self.next_vm_id,
            next_disk_id: self.next_disk_id,
            next_cg_id: self.next_cg_id,
            next_migration_id: self.next_migration_id,
            dedup,
        }
        .upgrade()
    }
}
