//! Schema version 4: the shapes that version 5 changed, frozen as version 4 wrote them
//! (2026-12-07). These definitions must never change, since they decode bytes already on
//! operators' disks. Types version 5 did not change are the current ones.
//!
//! What changed in version 5: a migration records how QEMU live-migrates its guests
//! ([`crate::Migration::live`]) and what QEMU measured
//! ([`crate::MigrationStats::live_moves`]), so a snapshot's migrations (in the model and in
//! remembered answers) gained fields. Log entries did not change: version 5 only appended
//! commands, so version 4 entries decode as they are.

#![allow(missing_docs)]

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{
    Cg, Claim, DecisionRecord, Disk, DiskRoots, HostRecord, ModelError, NodeId, Phase,
    ReplicationMode, Strategy, TimelineEntry, Vm,
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    pub bytes_needed: u64,
    pub bytes_moved: u64,
    pub stun_ms: Vec<(String, u64)>,
    pub rpo_writes: u64,
    pub cutover_roots: Vec<DiskRoots>,
    pub destination_complete_at_ms: Option<u64>,
    pub escalated_at_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub id: u64,
    pub cg: String,
    pub from: NodeId,
    pub to: NodeId,
    pub strategy: Strategy,
    pub phase: Phase,
    pub claim: Claim,
    pub started_at_ms: u64,
    pub deadline_ms: u64,
    pub destination_had_copy: bool,
    pub prior_mode: Option<ReplicationMode>,
    pub moved: Vec<String>,
    pub stats: MigrationStats,
    pub timeline: Vec<TimelineEntry>,
    pub decision: Option<DecisionRecord>,
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

// ---- upgrades to the current schema ----

impl From<MigrationStats> for crate::MigrationStats {
    fn from(s: MigrationStats) -> Self {
        crate::MigrationStats {
            bytes_needed: s.bytes_needed,
            bytes_moved: s.bytes_moved,
            stun_ms: s.stun_ms,
            rpo_writes: s.rpo_writes,
            cutover_roots: s.cutover_roots,
            destination_complete_at_ms: s.destination_complete_at_ms,
            escalated_at_ms: s.escalated_at_ms,
            // Version 4 did not record QEMU's measurements.
            live_moves: Vec::new(),
        }
    }
}

impl From<Migration> for crate::Migration {
    fn from(m: Migration) -> Self {
        crate::Migration {
            id: m.id,
            cg: m.cg,
            from: m.from,
            to: m.to,
            strategy: m.strategy,
            phase: m.phase,
            claim: m.claim,
            started_at_ms: m.started_at_ms,
            deadline_ms: m.deadline_ms,
            destination_had_copy: m.destination_had_copy,
            prior_mode: m.prior_mode,
            moved: m.moved,
            stats: m.stats.into(),
            timeline: m.timeline,
            decision: m.decision,
            // Version 4 migrated guests with each source host's configuration.
            live: crate::LiveSettings::default(),
        }
    }
}

impl From<Outcome> for crate::Outcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Done => crate::Outcome::Done,
            Outcome::Host(h) => crate::Outcome::Host(h),
            Outcome::Vm(v, d) => crate::Outcome::Vm(v, d),
            Outcome::Cg(c) => crate::Outcome::Cg(c),
            Outcome::Migration(m) => crate::Outcome::Migration(Box::new((*m).into())),
        }
    }
}

impl ClusterModel {
    /// Upgrades a whole model (a state-machine snapshot) to the current schema.
    pub fn upgrade(self) -> crate::ClusterModel {
        let mut dedup = crate::Dedup::default();
        for id in self.dedup.order {
            if let Some(answer) = self.dedup.answers.get(&id) {
                dedup.remember(id, answer.clone().map(Into::into));
            }
        }
        crate::ClusterModel {
            hosts: self.hosts,
            vms: self.vms,
            disks: self.disks,
            cgs: self.cgs,
            migrations: self
                .migrations
                .into_iter()
                .map(|(id, m)| (id, m.into()))
                .collect(),
            next_vm_id: self.next_vm_id,
            next_disk_id: self.next_disk_id,
            next_cg_id: self.next_cg_id,
            next_migration_id: self.next_migration_id,
            dedup,
        }
    }
}
