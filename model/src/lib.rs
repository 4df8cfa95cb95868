//! The cluster model: hosts, VMs, disks, consistency groups, replication links and
//! migrations, changed only by [`Command`]s committed through Raft. This crate is the
//! language of Convoy's Raft log and has no I/O: no files, sockets, clocks or randomness.
//!
//! [`ClusterModel::apply`] must give the same result on every node for the same command
//! sequence. Validation happens here (not in the API layer) so that two racing requests
//! are ordered by the log and exactly one of them wins; commands that must not act on a
//! stale view carry what their proposer expected (compare-and-set) and are refused with
//! [`ModelError::Stale`] otherwise.
//!
//! # Schema versions
//!
//! Everything the log and snapshots store is written with [`SCHEMA_VERSION`]. Each older
//! version keeps its own frozen type definitions in a module ([`v1`]) with an explicit
//! upgrade to the current types, so a cluster whose log and snapshots were written by an
//! older Convoy keeps working after an upgrade. (Under bincode, `#[serde(default)]` does
//! nothing: a field added without a version bump makes old records undecodable.)
//!
//! [`host_plan`] derives what one host must run from the model alone.

#![warn(missing_docs, unreachable_pub)]

mod cg;
mod command;
mod error;
mod host;
mod migration;
pub mod plan;
pub mod v1;
pub mod v3;
pub mod v4;
mod vm;

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use cg::{Cg, CgSnapshot, LinkState, ReplicationLink, ReplicationMode};
pub use command::{Command, Outcome};
pub use error::ModelError;
pub use host::HostRecord;
pub use migration::{
    Claim, Decision, DecisionRecord, DiskRoots, FailBackCause, LiveMove, LiveSettings,
    MAX_DOWNTIME_LIMIT_MS, MAX_TIMELINE, Migration, MigrationStats, Phase, Progress,
    SequencerBasis, Strategy, TimelineEntry,
};
pub use plan::{
    DiskPlan, DomainId, ExportKind, ExportPlan, GuestPlan, HostPlan, QemuPlan, ReplicaPlan,
    SequencerPlan, host_plan,
};
pub use vm::{
    Accel, DISK_SIZE_ALIGN, Disk, MAX_CPUS, MAX_DISK_SIZE, MAX_DISKS_PER_VM, MAX_MEMORY_MIB,
    MIN_DISK_SIZE, QemuSpec, Vm,
};

use error::invalid;

/// The schema version this build writes. Version 1 is the format before schema versions
/// existed (see [`v1`]). Version 3 appended [`Command::ReportLinkState`]; every version 2
/// record decodes unchanged as version 3 (bincode numbers enum variants in order), and the
/// bump makes an older build refuse a version 3 log instead of misreading it. Version 4
/// gave [`Vm`] its QEMU configuration ([`Vm::qemu`]) and appended
/// [`Command::CreateQemuVm`]: version 3 log entries decode unchanged, version 3 snapshots
/// (whose VMs lack the field) are upgraded through [`v3`]. Version 5 appended
/// [`Command::ReportGroupLinkState`], [`Command::StartMigrationWithSettings`] and
/// [`Command::RecordLiveMove`], and gave [`Migration`] its QEMU settings
/// ([`Migration::live`]) and its stats the guests' live moves: version 4 log entries decode
/// unchanged, version 4 snapshots (whose migrations lack the fields) are upgraded through
/// [`v4`].
pub const SCHEMA_VERSION: u8 = 5;

/// A host's Raft node id. Ids are never reused, even after a node is removed.
pub type NodeId = u64;
/// Cluster-wide disk id, assigned by the model.
pub type DiskId = u64;

/// How many request ids the model remembers for retry de-duplication.
pub const DEDUP_WINDOW: usize = 16384;

/// Names of VMs and groups: 1–63 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn validate_name(what: &str, name: &str) -> Result<(), ModelError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 63 {
        return Err(invalid(
            what,
            format!("'{name}' must be 1 to 63 characters"),
        ));
    }
    if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid(
            what,
            format!(
                "'{name}' may only use letters, digits, '.', '_' and '-', starting with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// The whole replicated model. Cheap enough to clone for a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterModel {
    /// Every host ever registered, by id.
    pub hosts: BTreeMap<NodeId, HostRecord>,
    /// VMs by name.
    pub vms: BTreeMap<String, Vm>,
    /// Disks by id.
    pub disks: BTreeMap<DiskId, Disk>,
    /// Consistency groups by name.
    pub cgs: BTreeMap<String, Cg>,
    /// Migrations by id, decided ones included.
    pub migrations: BTreeMap<u64, Migration>,
    next_vm_id: u64,
    next_disk_id: u64,
    next_cg_id: u64,
    next_migration_id: u64,
    dedup: Dedup,
}

/// Remembers the responses to the last [`DEDUP_WINDOW`] client request ids, so a client
/// that retries after losing a response gets the original answer instead of applying twice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Dedup {
    order: VecDeque<u128>,
    answers: HashMap<u128, Result<Outcome, ModelError>>,
}

impl Dedup {
    fn get(&self, id: u128) -> Option<&Result<Outcome, ModelError>> {
        self.answers.get(&id)
    }

    fn remember(&mut self, id: u128, answer: Result<Outcome, ModelError>) {
        if self.answers.insert(id, answer).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > DEDUP_WINDOW {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }
}

impl ClusterModel {
    /// Applies one command. `request_id` (non-zero) makes retries idempotent: a repeated id
    /// returns the first answer without applying again.
    pub fn apply(&mut self, request_id: u128, cmd: &Command) -> Result<Outcome, ModelError> {
        if request_id != 0 {
            if let Some(answer) = self.dedup.get(request_id) {
                return answer.clone();
            }
        }
        let answer = self.apply_command(cmd);
        if request_id != 0 {
            self.dedup.remember(request_id, answer.clone());
        }
        answer
    }

    fn apply_command(&mut self, cmd: &Command) -> Result<Outcome, ModelError> {
        match cmd {
            Command::RegisterHost {
                id,
                raft_addr,
                admin_addr,
            } => self.register_host(*id, raft_addr, admin_addr),
            Command::RetireHost { id } => self.retire_host(*id),
            Command::CreateVm {
                name,
                host,
                disk_sizes,
                workload,
                created_at_ms,
            } => self.create_vm(
                name,
                *host,
                disk_sizes,
                workload.clone(),
                None,
                *created_at_ms,
            ),
            Command::CreateQemuVm {
                name,
                host,
                disk_sizes,
                qemu,
                created_at_ms,
            } => self.create_vm(
                name,
                *host,
                disk_sizes,
                None,
                Some(qemu.clone()),
                *created_at_ms,
            ),
            Command::DeleteVm { name } => self.delete_vm(name),
            Command::CreateCg { name, vms } => self.create_cg(name, vms),
            Command::DeleteCg { name } => self.delete_cg(name),
            Command::AddReplica { cg, to, mode } => self.add_replica(cg, *to, *mode),
            Command::RemoveReplica { cg, to } => self.remove_replica(cg, *to),
            Command::SetMode { cg, mode } => self.set_mode(cg, *mode),
            Command::SetLinkState {
                cg,
                to,
                state,
                expect,
            } => self.set_link_state(cg, *to, *state, *expect),
            Command::ReportLinkState {
                cg,
                from,
                sequencer_epoch,
                to,
                state,
                expect,
            } => self.report_link_state(cg, *from, *sequencer_epoch, *to, *state, *expect),
            Command::ReportGroupLinkState {
                cg,
                cg_id,
                from,
                sequencer_epoch,
                to,
                state,
                expect,
            } => self.report_group_link_state(
                (cg, *cg_id),
                *from,
                *sequencer_epoch,
                *to,
                *state,
                *expect,
            ),
            Command::SetVmRunning { name, running } => self.set_vm_running(name, *running),
            Command::CreateSnapshot {
                cg,
                name,
                created_at_ms,
            } => self.create_snapshot(cg, name, *created_at_ms),
            Command::DeleteSnapshot { cg, name } => self.delete_snapshot(cg, name),
            Command::BumpEpoch { cg } => self.bump_epoch(cg),
            Command::FenceVm { name } => self.fence_vm(name),
            Command::MoveVm {
                name,
                to,
                expect_host,
            } => self.move_vm(name, *to, *expect_host),
            Command::SetSequencer {
                cg,
                to,
                continue_at,
                expect_sequencer,
                old_link_mode,
            } => self.set_sequencer(cg, *to, *continue_at, *expect_sequencer, *old_link_mode),
            Command::StartMigration {
                cg,
                to,
                strategy,
                coordinator,
                started_at_ms,
                deadline_ms,
            } => self.start_migration(
                cg,
                *to,
                *strategy,
                *coordinator,
                *started_at_ms,
                *deadline_ms,
                LiveSettings::default(),
            ),
            Command::StartMigrationWithSettings {
                cg,
                to,
                strategy,
                coordinator,
                started_at_ms,
                deadline_ms,
                live,
            } => self.start_migration(
                cg,
                *to,
                *strategy,
                *coordinator,
                *started_at_ms,
                *deadline_ms,
                *live,
            ),
            Command::RecordLiveMove {
                id,
                live,
                node,
                at_ms,
            } => self.record_live_move(*id, live, *node, *at_ms),
            Command::ClaimMigration {
                id,
                node,
                expect_claim,
                at_ms,
            } => self.claim_migration(*id, *node, *expect_claim, *at_ms),
            Command::AdvanceMigration {
                id,
                claim,
                from,
                to,
                at_ms,
                note,
                progress,
            } => self.advance_migration(*id, *claim, *from, *to, *at_ms, note, progress),
            Command::DecideMigration { id, claim, record } => {
                self.decide_migration(*id, *claim, record)
            }
            Command::AbortMigration { id, at_ms, reason } => {
                self.abort_migration(*id, *at_ms, reason)
            }
            Command::MigrationStep {
                id,
                claim,
                phase,
                at_ms,
                command,
            } => self.migration_step(*id, *claim, *phase, *at_ms, command),
            Command::MigrationSequencer {
                id,
                claim,
                phase,
                to,
                continue_at,
                basis,
                at_ms,
            } => self.migration_sequencer(*id, *claim, *phase, *to, *continue_at, basis, *at_ms),
        }
    }

    /// A copy of the model without the request de-duplication table: what the data plane
    /// reconciles against, cheap enough to take on every change.
    pub fn topology(&self) -> ClusterModel {
        ClusterModel {
            hosts: self.hosts.clone(),
            vms: self.vms.clone(),
            disks: self.disks.clone(),
            cgs: self.cgs.clone(),
            migrations: self.migrations.clone(),
            next_vm_id: self.next_vm_id,
            next_disk_id: self.next_disk_id,
            next_cg_id: self.next_cg_id,
            next_migration_id: self.next_migration_id,
            dedup: Dedup::default(),
        }
    }

    /// Whether the model has handed out disk id `id` (ids are never reused). A disk with
    /// an issued id that the model does not list was deleted; one with an id not issued
    /// yet is newer than this model (a lagging replica of it).
    pub fn disk_id_issued(&self, id: DiskId) -> bool {
        (1..=self.next_disk_id).contains(&id)
    }

    /// Whether the model has handed out group id `id` (ids are never reused).
    pub fn cg_id_issued(&self, id: u64) -> bool {
        (1..=self.next_cg_id).contains(&id)
    }

    /// Whether the model has handed out VM id `id` (ids are never reused).
    pub fn vm_id_issued(&self, id: u64) -> bool {
        (1..=self.next_vm_id).contains(&id)
    }
}

#[cfg(test)]
mod tests;
