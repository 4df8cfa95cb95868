//! The commands of the Raft log and what applying one produced.

use serde::{Deserialize, Serialize};

use crate::{
    Cg, DecisionRecord, Disk, HostRecord, LinkState, LiveMove, LiveSettings, Migration, NodeId,
    Phase, Progress, QemuSpec, ReplicationMode, SequencerBasis, Strategy, Vm,
};

/// A change to the cluster model, as committed in the Raft log. Stored entries carry the
/// schema version they were written with ([`crate::SCHEMA_VERSION`]); entries of older
/// versions are upgraded on read ([`crate::v1`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Record a host (before it joins Raft). Idempotent for an identical active record;
    /// refused for a retired id.
    RegisterHost {
        /// Node id from the host's certificate.
        id: NodeId,
        /// QUIC address.
        raft_addr: String,
        /// Admin API address.
        admin_addr: String,
    },
    /// Mark a host removed; its id is never reused.
    RetireHost {
        /// The host.
        id: NodeId,
    },
    /// Create a VM with its disks on `host`.
    CreateVm {
        /// Unique name.
        name: String,
        /// Host to create it on.
        host: NodeId,
        /// Size of each disk in bytes.
        disk_sizes: Vec<u64>,
        /// Synthetic workload spec, if simulated.
        workload: Option<String>,
        /// Proposer's clock, ms since the epoch (informational).
        created_at_ms: u64,
    },
    /// Delete a VM that is in no consistency group.
    DeleteVm {
        /// The VM.
        name: String,
    },
    /// Create a consistency group of VMs that all run on one host (its sequencer).
    CreateCg {
        /// Unique name.
        name: String,
        /// Member VMs (at least one, each in no other group).
        vms: Vec<String>,
    },
    /// Delete a consistency group (its VMs stay).
    DeleteCg {
        /// The group.
        name: String,
    },
    /// Add a copy of a group on another host (starts `Syncing`).
    AddReplica {
        /// The group.
        cg: String,
        /// Host for the copy.
        to: NodeId,
        /// Replication mode of the link.
        mode: ReplicationMode,
    },
    /// Drop a group's copy on a host.
    RemoveReplica {
        /// The group.
        cg: String,
        /// Host of the copy.
        to: NodeId,
    },
    /// Change the replication mode of every link of a group.
    SetMode {
        /// The group.
        cg: String,
        /// New mode.
        mode: ReplicationMode,
    },
    /// Record what a replica copy is good for (proposed by the sequencer's agent).
    SetLinkState {
        /// The group.
        cg: String,
        /// Host of the copy.
        to: NodeId,
        /// New state.
        state: LinkState,
        /// Applied only if the link is in this state now (compare-and-set).
        expect: Option<LinkState>,
    },
    /// Start or stop a VM's (simulated) guest.
    SetVmRunning {
        /// The VM.
        name: String,
        /// Running or not.
        running: bool,
    },
    /// Record a group snapshot taken on the sequencer.
    CreateSnapshot {
        /// The group.
        cg: String,
        /// Snapshot name.
        name: String,
        /// Proposer's clock, ms since the epoch.
        created_at_ms: u64,
    },
    /// Forget a group snapshot.
    DeleteSnapshot {
        /// The group.
        cg: String,
        /// Snapshot name.
        name: String,
    },
    /// Fence a whole group: every disk gets epoch = old maximum + 1 and the sequencer
    /// epoch moves, so writes and data messages carrying older epochs are refused.
    BumpEpoch {
        /// The group.
        cg: String,
    },
    /// Fence one VM: only its disks' epochs move; other VMs of its group keep writing.
    FenceVm {
        /// The VM.
        name: String,
    },
    /// The VM now runs on `to` (its guest paused and drained on the old host first): its
    /// disks' epochs move, so the old host's writers are refused.
    MoveVm {
        /// The VM.
        name: String,
        /// Destination host: the group's sequencer or a host with a consistent copy.
        to: NodeId,
        /// Applied only if the VM runs there now (compare-and-set).
        expect_host: Option<NodeId>,
    },
    /// Hand a group's order to `to`, which continues the group's sequence at
    /// `continue_at`. The old sequencer becomes a replica in `old_link_mode` (if given),
    /// recorded consistent: it held every write before `continue_at` when it handed over.
    SetSequencer {
        /// The group.
        cg: String,
        /// New sequencer (holds a consistent copy).
        to: NodeId,
        /// First sequence number the new sequencer assigns.
        continue_at: u64,
        /// Applied only if this host orders the group now (compare-and-set).
        expect_sequencer: NodeId,
        /// Mode of the old sequencer's new link, or `None` to drop its copy.
        old_link_mode: Option<ReplicationMode>,
    },
    /// Record a new migration of a group, coordinated by `coordinator`.
    StartMigration {
        /// The group.
        cg: String,
        /// Destination host.
        to: NodeId,
        /// Strategy.
        strategy: Strategy,
        /// The agent that coordinates first.
        coordinator: NodeId,
        /// Proposer's clock, ms since the epoch.
        started_at_ms: u64,
        /// Fail back if not decided by then (ms since the epoch).
        deadline_ms: u64,
    },
    /// Take over coordination of a migration (compare-and-set on the claim number).
    ClaimMigration {
        /// The migration.
        id: u64,
        /// The new coordinator.
        node: NodeId,
        /// The claim number the new coordinator saw.
        expect_claim: u64,
        /// Proposer's clock.
        at_ms: u64,
    },
    /// Move a migration from phase `from` to `to` (compare-and-set on claim and phase).
    AdvanceMigration {
        /// The migration.
        id: u64,
        /// The coordinator's claim number.
        claim: u64,
        /// The phase the coordinator saw.
        from: Phase,
        /// The next phase (may equal `from` to record progress only).
        to: Phase,
        /// Proposer's clock.
        at_ms: u64,
        /// Timeline note.
        note: String,
        /// Progress to record with it.
        progress: Progress,
    },
    /// Write a migration's decision; refused if one was written before, if the phase
    /// does not allow it (committed: verifying or rolling forward; failed back: failing
    /// back), if the group's order and VMs are not all on the deciding side, or (committed)
    /// without the cut-over's equal roots. The same entry restores the group's previous
    /// mode (roles swapped when committed), drops a destination copy the migration
    /// created when failing back, and forgets the migration's fail-back snapshot.
    DecideMigration {
        /// The migration.
        id: u64,
        /// The coordinator's claim number.
        claim: u64,
        /// The decision.
        record: DecisionRecord,
    },
    /// An operator's abort: an undecided migration turns to failing back at once, whoever
    /// coordinates it (commands of the phase it left are refused from then on). Refused
    /// for a decided migration and for one rolling forward (its source is lost).
    AbortMigration {
        /// The migration.
        id: u64,
        /// Proposer's clock.
        at_ms: u64,
        /// Who asked and why, for the timeline.
        reason: String,
    },
    /// A change a migration makes to its group (add or drop a copy on its source or
    /// destination, set the group's mode, record or delete one of its snapshots, move one
    /// of its VMs between its two hosts), applied only while the migration is undecided,
    /// coordinated under `claim` and in `phase` (compare-and-set), so a stale coordinator
    /// changes nothing.
    MigrationStep {
        /// The migration.
        id: u64,
        /// The coordinator's claim number.
        claim: u64,
        /// The phase the coordinator acted in.
        phase: Phase,
        /// Proposer's clock.
        at_ms: u64,
        /// The change: `AddReplica`, `RemoveReplica`, `SetMode`, `CreateSnapshot`,
        /// `DeleteSnapshot` or `MoveVm`, for this migration's group and hosts.
        command: Box<Command>,
    },
    /// Hand a migrating group's order to `to` (its source or destination), guarded like
    /// [`Command::MigrationStep`]. Committed by the storage provider at the consistent
    /// point it reached; when the destination takes the order in the cut-over phase, the
    /// roots are recorded and the phase moves to the strategy's next one in this entry.
    MigrationSequencer {
        /// The migration.
        id: u64,
        /// The coordinator's claim number.
        claim: u64,
        /// The phase the coordinator acted in.
        phase: Phase,
        /// The new sequencer.
        to: NodeId,
        /// First sequence number the new sequencer assigns.
        continue_at: u64,
        /// What the hand-over rests on.
        basis: SequencerBasis,
        /// Proposer's clock.
        at_ms: u64,
    },
    /// [`Command::SetLinkState`] as the group's sequencer reports it (schema 3): refused
    /// unless `from` still orders the group in tenure `sequencer_epoch`. A sequencer that
    /// missed its hand-over or a take-over (frozen, partitioned) can then neither record
    /// its successor's replica `outdated` and acknowledge writes without it, nor promote
    /// a copy.
    ReportLinkState {
        /// The group.
        cg: String,
        /// The reporting sequencer's host.
        from: NodeId,
        /// The group's sequencer epoch the reporter runs under.
        sequencer_epoch: u64,
        /// Host of the copy.
        to: NodeId,
        /// New state.
        state: LinkState,
        /// Applied only if the link is in this state now (compare-and-set).
        expect: Option<LinkState>,
    },
    /// Create a VM with its disks on `host` that runs as a QEMU guest (schema 4).
    CreateQemuVm {
        /// Unique name.
        name: String,
        /// Host to create it on.
        host: NodeId,
        /// Size of each disk in bytes.
        disk_sizes: Vec<u64>,
        /// How QEMU runs it.
        qemu: QemuSpec,
        /// Proposer's clock, ms since the epoch (informational).
        created_at_ms: u64,
    },
    /// [`Command::ReportLinkState`] bound to the group's id as well (schema 5): refused
    /// for a group of that name created since (a report from a sender of a deleted group
    /// must not change the state of a new group that took its name).
    ReportGroupLinkState {
        /// The group's name.
        cg: String,
        /// The group's id: refused unless the group of that name still has it.
        cg_id: u64,
        /// The reporting sequencer's host.
        from: NodeId,
        /// The group's sequencer epoch the reporter runs under.
        sequencer_epoch: u64,
        /// Host of the copy.
        to: NodeId,
        /// New state.
        state: LinkState,
        /// Applied only if the link is in this state now (compare-and-set).
        expect: Option<LinkState>,
    },
    /// [`Command::StartMigration`] with how QEMU live-migrates the group's running guests
    /// (schema 5).
    StartMigrationWithSettings {
        /// The group.
        cg: String,
        /// Destination host.
        to: NodeId,
        /// Strategy.
        strategy: Strategy,
        /// The agent that coordinates first.
        coordinator: NodeId,
        /// Proposer's clock, ms since the epoch.
        started_at_ms: u64,
        /// Fail back if not decided by then (ms since the epoch).
        deadline_ms: u64,
        /// QEMU's migration parameters for this migration.
        live: LiveSettings,
    },
    /// Record a running guest's live migration, as QEMU measured it, in a migration's
    /// report (schema 5).
    RecordLiveMove {
        /// The migration.
        id: u64,
        /// What QEMU measured.
        live: LiveMove,
        /// The host the guest arrived on.
        node: NodeId,
        /// Proposer's clock, ms since the epoch.
        at_ms: u64,
    },
}

impl Command {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::RegisterHost { .. } => "register_host",
            Command::RetireHost { .. } => "retire_host",
            Command::CreateVm { .. } => "create_vm",
            Command::DeleteVm { .. } => "delete_vm",
            Command::CreateCg { .. } => "create_cg",
            Command::DeleteCg { .. } => "delete_cg",
            Command::AddReplica { .. } => "add_replica",
            Command::RemoveReplica { .. } => "remove_replica",
            Command::SetMode { .. } => "set_mode",
            Command::SetLinkState { .. } => "set_link_state",
            Command::SetVmRunning { .. } => "set_vm_running",
            Command::CreateSnapshot { .. } => "create_snapshot",
            Command::DeleteSnapshot { .. } => "delete_snapshot",
            Command::BumpEpoch { .. } => "bump_epoch",
            Command::FenceVm { .. } => "fence_vm",
            Command::MoveVm { .. } => "move_vm",
            Command::SetSequencer { .. } => "set_sequencer",
            Command::StartMigration { .. } => "start_migration",
            Command::ClaimMigration { .. } => "claim_migration",
            Command::AdvanceMigration { .. } => "advance_migration",
            Command::DecideMigration { .. } => "decide_migration",
            Command::AbortMigration { .. } => "abort_migration",
            Command::MigrationStep { .. } => "migration_step",
            Command::MigrationSequencer { .. } => "migration_sequencer",
            Command::ReportLinkState { .. } => "report_link_state",
            Command::CreateQemuVm { .. } => "create_qemu_vm",
            Command::ReportGroupLinkState { .. } => "report_group_link_state",
            Command::StartMigrationWithSettings { .. } => "start_migration",
            Command::RecordLiveMove { .. } => "record_live_move",
        }
    }
}

/// What a successfully applied command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Nothing to report (blank or membership entries, deletions).
    Done,
    /// The host record after the command.
    Host(HostRecord),
    /// The VM after the command, with its disks.
    Vm(Vm, Vec<Disk>),
    /// The consistency group after the command.
    Cg(Cg),
    /// The migration after the command.
    Migration(Box<Migration>),
}
