//! Migrations: the Raft-logged record of moving every VM of a consistency group from one
//! host to another. Every phase change is a compare-and-set on the record (refused for a
//! stale coordinator), and the decision is written exactly once.
//!
//! The model keeps the record honest; what each phase does is decided by the migration
//! engine (the `convoy-migrate` crate), which proposes these commands. Every change the
//! engine makes to the group itself (a replica, a mode, a snapshot, a VM move, the
//! sequencer) goes through [`crate::Command::MigrationStep`] or
//! [`crate::Command::MigrationSequencer`], which carry the coordinator's claim and the
//! phase it acted in: a coordinator that lost its claim, or acted on a phase that an abort
//! or another coordinator changed meanwhile, changes nothing.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, invalid, not_found, stale};
use crate::{ClusterModel, Command, DiskId, LinkState, NodeId, Outcome, ReplicationMode};

/// How a migration keeps a fail-back copy (see DESIGN.md, "Migration strategies").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// VMs move one at a time; their writes are mirrored back to the source's sequencer.
    ReverseReplication,
    /// The group switches to a synchronous mode while VMs move.
    SyncSwitch {
        /// `active-active-sync` (true) or `sync` (false) during the move.
        active_active: bool,
    },
    /// Compare the destination's copy by hashes, send what differs, then reverse-replicate.
    CompareDelta,
    /// A snapshot on the source is the fail-back point; VMs move in parallel.
    BreakConsistency,
}

impl Strategy {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::ReverseReplication => "reverse-replication",
            Strategy::SyncSwitch { .. } => "sync-switch",
            Strategy::CompareDelta => "compare-delta",
            Strategy::BreakConsistency => "break-consistency",
        }
    }

    /// The forward phases of this strategy, in order. `break-consistency` hands the
    /// group's order to the destination before its VMs move (in parallel); the others move
    /// VMs first and hand the order over last.
    pub fn path(self) -> &'static [Phase] {
        use Phase::*;
        match self {
            Strategy::BreakConsistency => &[Planned, Preparing, CuttingOver, Moving, Verifying],
            _ => &[Planned, Preparing, Moving, CuttingOver, Verifying],
        }
    }

    /// The forward phase after `phase`, if any.
    pub fn next(self, phase: Phase) -> Option<Phase> {
        let path = self.path();
        let i = path.iter().position(|p| *p == phase)?;
        path.get(i + 1).copied()
    }

    fn position(self, phase: Phase) -> Option<usize> {
        self.path().iter().position(|p| *p == phase)
    }
}

/// Why a migration fails back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FailBackCause {
    /// An operator asked for it ([`crate::Command::AbortMigration`]).
    Abort,
    /// The migration was not decided by its deadline.
    Deadline,
    /// The destination host was lost before the decision.
    DestinationLost,
    /// The destination's copy stopped being usable (outdated, or refused by the model).
    DestinationUnusable,
    /// The copies' Merkle roots differed at the cut-over's consistent point.
    CopiesDiffer,
}

impl FailBackCause {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FailBackCause::Abort => "abort",
            FailBackCause::Deadline => "deadline",
            FailBackCause::DestinationLost => "destination-lost",
            FailBackCause::DestinationUnusable => "destination-unusable",
            FailBackCause::CopiesDiffer => "copies-differ",
        }
    }
}

/// Where a migration is. Forward phases follow [`Strategy::path`]; any phase before the
/// decision may turn into [`Phase::FailingBack`] or [`Phase::RollingForward`], and a
/// failing-back migration may still turn into a rolling-forward one (the source was lost).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    /// Recorded; nothing done yet.
    Planned,
    /// Making the destination hold a current copy (replica, seeding, mode switch, snapshot).
    Preparing,
    /// Moving the VMs to the destination.
    Moving,
    /// Handing the group's order over to the destination.
    CuttingOver,
    /// The order is at the destination; proving and recording the consistent point
    /// before the decision.
    Verifying,
    /// Undoing: the order and every VM return to the source, whose copy (or, for
    /// `break-consistency`, whose snapshot) is the fail-back copy.
    FailingBack(FailBackCause),
    /// The source was lost after the destination came to hold every acknowledged write:
    /// the destination takes the order and every VM, and the migration commits.
    RollingForward,
    /// Decided (see [`Migration::decision`]).
    Done,
}

impl Phase {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Preparing => "preparing",
            Phase::Moving => "moving",
            Phase::CuttingOver => "cutting-over",
            Phase::Verifying => "verifying",
            Phase::FailingBack(_) => "failing-back",
            Phase::RollingForward => "rolling-forward",
            Phase::Done => "done",
        }
    }

    /// Whether this is a forward phase (on the strategy's path).
    pub fn is_forward(self) -> bool {
        matches!(
            self,
            Phase::Planned
                | Phase::Preparing
                | Phase::Moving
                | Phase::CuttingOver
                | Phase::Verifying
        )
    }
}

/// The outcome of a migration, written once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Every VM runs on the destination, which orders the group; copies proved equal.
    Committed,
    /// Every VM runs on the source again, from the fail-back copy.
    FailedBack,
}

impl Decision {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Committed => "committed",
            Decision::FailedBack => "failed-back",
        }
    }
}

/// Who coordinates a migration. A takeover increments `number`; every phase change names
/// the number it was made under, so a stale coordinator's proposals are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The coordinating agent.
    pub node: NodeId,
    /// Claim number (starts at 1).
    pub number: u64,
}

/// Merkle roots of one disk's two copies at the cut-over's consistent point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRoots {
    /// The disk.
    pub disk: DiskId,
    /// Root of the source's copy; `None` only when the source was lost before the
    /// cut-over and the migration rolled forward on the destination's copy alone (there
    /// was no second copy left to compare with).
    pub source: Option<[u8; 32]>,
    /// Root of the destination's copy.
    pub destination: [u8; 32],
}

impl DiskRoots {
    /// Whether both roots are known and equal.
    pub fn matches(&self) -> bool {
        self.source == Some(self.destination)
    }
}

/// The decision record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Committed or failed back.
    pub decision: Decision,
    /// Proposer's clock, ms since the epoch.
    pub at_ms: u64,
    /// Why (for a fail-back: what failed).
    pub reason: String,
    /// Per disk, the roots compared (for `Committed`: the roots recorded at the cut-over).
    pub roots: Vec<DiskRoots>,
}

/// One line of a migration's timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Proposer's clock, ms since the epoch.
    pub at_ms: u64,
    /// Phase entered (or the phase the note belongs to).
    pub phase: Phase,
    /// The coordinator that wrote it.
    pub node: NodeId,
    /// What happened.
    pub note: String,
}

/// Figures a migration reports, and the facts of its cut-over (updated with phase
/// changes, not per write).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// Bytes the destination lacked when the migration started (estimate).
    pub bytes_needed: u64,
    /// Bytes moved so far.
    pub bytes_moved: u64,
    /// Stun (pause) time per VM move, ms, in move order.
    pub stun_ms: Vec<(String, u64)>,
    /// Highest lag of the copy the migration waited on, writes.
    pub rpo_writes: u64,
    /// Per disk, the roots of both copies at the cut-over's consistent point, recorded by
    /// the same Raft entry that handed the order to the destination. Empty before it.
    pub cutover_roots: Vec<DiskRoots>,
    /// When the coordinator saw the destination hold every acknowledged write with a
    /// synchronous link (from then on it does, until the link is marked outdated): the
    /// condition for rolling forward if the source is lost.
    pub destination_complete_at_ms: Option<u64>,
    /// When the migration escalated to synchronous mirroring because the copy it waited
    /// on did not converge.
    pub escalated_at_ms: Option<u64>,
    /// Each running QEMU guest's live migration, as QEMU measured it (schema 5).
    pub live_moves: Vec<LiveMove>,
}

/// How QEMU live-migrates a migration's running guests (schema 5). A field left `None`
/// takes the source host's `[qemu]` configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSettings {
    /// QEMU's `downtime-limit`, ms.
    pub downtime_limit_ms: Option<u64>,
    /// QEMU's `max-bandwidth`, MiB/s (0: QEMU's default).
    pub max_bandwidth_mib: Option<u64>,
    /// QEMU's `auto-converge` capability.
    pub auto_converge: Option<bool>,
}

/// Largest `downtime-limit` QEMU accepts, ms.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

impl LiveSettings {
    /// Checks the numbers QEMU would refuse.
    pub fn validate(&self) -> Result<(), ModelError> {
        if let Some(ms) = self.downtime_limit_ms {
            if !(1..=MAX_DOWNTIME_LIMIT_MS).contains(&ms) {
                return Err(invalid(
                    "downtime limit",
                    format!("{ms} ms: QEMU takes 1 to {MAX_DOWNTIME_LIMIT_MS} ms"),
                ));
            }
        }
        if let Some(mib) = self.max_bandwidth_mib {
            if mib > (u64::MAX >> 20) {
                return Err(invalid(
                    "bandwidth",
                    format!("{mib} MiB/s is more than QEMU can count"),
                ));
            }
        }
        Ok(())
    }
}

/// One running QEMU guest's live migration, as QEMU measured it (`query-migrate`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveMove {
    /// The VM.
    pub vm: String,
    /// The guest's downtime, ms.
    pub downtime_ms: u64,
    /// From QEMU's `migrate` to completion, ms.
    pub total_ms: u64,
    /// Guest memory bytes sent.
    pub ram_bytes: u64,
}

/// A migration of a consistency group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Model-assigned id.
    pub id: u64,
    /// The group being moved.
    pub cg: String,
    /// Source host (the group's sequencer when the migration started).
    pub from: NodeId,
    /// Destination host.
    pub to: NodeId,
    /// How the fail-back copy is kept.
    pub strategy: Strategy,
    /// Where the migration is.
    pub phase: Phase,
    /// Current coordinator.
    pub claim: Claim,
    /// Proposer's clock at start, ms since the epoch.
    pub started_at_ms: u64,
    /// Fail back if not decided by then (ms since the epoch).
    pub deadline_ms: u64,
    /// Whether the destination held a replica before the migration (kept on fail-back).
    pub destination_had_copy: bool,
    /// The group's replication mode before the migration, restored at the decision.
    pub prior_mode: Option<crate::ReplicationMode>,
    /// VMs moved to the destination so far.
    pub moved: Vec<String>,
    /// Figures for the report and the cut-over's facts.
    pub stats: MigrationStats,
    /// What happened, in order.
    pub timeline: Vec<TimelineEntry>,
    /// The decision, once made.
    pub decision: Option<DecisionRecord>,
    /// How QEMU live-migrates its running guests (schema 5).
    pub live: LiveSettings,
}

/// Most timeline entries a migration keeps (the oldest are dropped beyond it).
pub const MAX_TIMELINE: usize = 256;

impl Migration {
    fn note(&mut self, at_ms: u64, node: NodeId, note: impl Into<String>) {
        self.timeline.push(TimelineEntry {
            at_ms,
            phase: self.phase,
            node,
            note: note.into(),
        });
        if self.timeline.len() > MAX_TIMELINE {
            self.timeline.remove(1);
        }
    }

    /// Name of the group snapshot that is a `break-consistency` migration's fail-back
    /// point, taken on the source.
    pub fn failback_snapshot(&self) -> String {
        format!("migration-{}", self.id)
    }

    /// Name of the group snapshot a `break-consistency` migration records on the
    /// destination once consistency is re-established there.
    pub fn final_snapshot(&self) -> String {
        format!("migration-{}-final", self.id)
    }

    /// Whether `to` may follow the current phase through
    /// [`crate::Command::AdvanceMigration`].
    pub fn may_advance(&self, to: Phase) -> bool {
        let from = self.phase;
        if from == Phase::Done || to == Phase::Done {
            return false;
        }
        if to == from {
            return true;
        }
        match to {
            Phase::FailingBack(_) => from.is_forward(),
            Phase::RollingForward => from.is_forward() || matches!(from, Phase::FailingBack(_)),
            _ => match (self.strategy.position(from), self.strategy.position(to)) {
                (Some(a), Some(b)) => b > a,
                _ => false,
            },
        }
    }

    /// The host of the other side: `from` for `to` and `to` for `from`.
    pub fn other_side(&self, host: NodeId) -> NodeId {
        if host == self.from {
            self.to
        } else {
            self.from
        }
    }
}

/// A change to a migration's progress, applied with a phase change. Fields are deltas, so
/// a coordinator with a slightly stale view cannot erase what another command recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// VMs now running on the destination (each recorded once).
    pub moved: Vec<String>,
    /// Stun times of VM moves to append, ms.
    pub stun_ms: Vec<(String, u64)>,
    /// New estimate of the bytes the destination lacked, if known.
    pub bytes_needed: Option<u64>,
    /// New count of bytes moved, if known.
    pub bytes_moved: Option<u64>,
    /// A lag seen on the copy the migration waits on, writes (the record keeps the highest).
    pub rpo_writes: Option<u64>,
    /// The destination holds every acknowledged write from now on (synchronous, caught up).
    pub destination_complete: bool,
    /// The migration escalated to synchronous mirroring now.
    pub escalated: bool,
}

/// What a [`crate::Command::MigrationSequencer`] hands the group's order over on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SequencerBasis {
    /// The current sequencer paused writes, waited until the new one acknowledged every
    /// write, and computed both copies' roots at that consistent point. The old sequencer
    /// becomes a consistent replica in `old_link_mode` (or drops its copy with `None`).
    HandOver {
        /// Per disk, both copies' roots at the consistent point (must be equal).
        roots: Vec<DiskRoots>,
        /// Mode of the old sequencer's new link, or `None` to drop its copy.
        old_link_mode: Option<ReplicationMode>,
    },
    /// The current sequencer was lost. The new one holds every acknowledged write (its
    /// link is synchronous and consistent, and for the destination the migration recorded
    /// it complete). The lost sequencer's copy is recorded outdated: it may hold writes
    /// it ordered but never acknowledged, which the new order does not have.
    TakeOver,
    /// `break-consistency` fail-back after the destination was lost holding the order:
    /// the source's copy was rolled back to the migration's fail-back snapshot, whose
    /// point the group's order continues from. Writes acknowledged after the snapshot are
    /// lost: the price this strategy states up front.
    Snapshot {
        /// The snapshot (the migration's [`Migration::failback_snapshot`]).
        name: String,
    },
}

impl ClusterModel {
    /// The undecided migration of group `cg`, if any.
    pub fn running_migration(&self, cg: &str) -> Option<&Migration> {
        self.migrations
            .values()
            .find(|m| m.cg == cg && m.decision.is_none())
    }

    fn migration_mut(&mut self, id: u64) -> Result<&mut Migration, ModelError> {
        self.migrations
            .get_mut(&id)
            .ok_or_else(|| not_found("migration", id))
    }

    /// The migration `id`, if undecided and coordinated under `claim` in `phase`.
    fn guarded(&self, id: u64, claim: u64, phase: Phase) -> Result<&Migration, ModelError> {
        let m = self
            .migrations
            .get(&id)
            .ok_or_else(|| not_found("migration", id))?;
        if let Some(d) = &m.decision {
            return Err(stale(format!(
                "migration {id} was already decided: {}",
                d.decision.as_str()
            )));
        }
        if m.claim.number != claim {
            return Err(stale(format!(
                "migration {id} is coordinated under claim {} now, not {claim}",
                m.claim.number
            )));
        }
        if m.phase != phase {
            return Err(stale(format!(
                "migration {id} is {} now, not {}",
                m.phase.as_str(),
                phase.as_str()
            )));
        }
        Ok(m)
    }

    /// Records a running guest's live migration, as QEMU measured it, in the report and
    /// timeline of migration `id` (once per VM: a retried report changes nothing).
    pub(crate) fn record_live_move(
        &mut self,
        id: u64,
        live: &LiveMove,
        node: NodeId,
        at_ms: u64,
    ) -> Result<Outcome, ModelError> {
        let m = self
            .migrations
            .get_mut(&id)
            .ok_or_else(|| not_found("migration", id))?;
        if !m.stats.live_moves.iter().any(|l| l.vm == live.vm) {
            m.stats.live_moves.push(live.clone());
            m.note(
                at_ms,
                node,
                format!(
                    "{} arrived on node {node} by QEMU live migration: downtime {} ms, total {} ms, {} bytes of memory sent",
                    live.vm, live.downtime_ms, live.total_ms, live.ram_bytes
                ),
            );
        }
        Ok(Outcome::Migration(Box::new(m.clone())))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_migration(
        &mut self,
        cg: &str,
        to: NodeId,
        strategy: Strategy,
        coordinator: NodeId,
        started_at_ms: u64,
        deadline_ms: u64,
        live: LiveSettings,
    ) -> Result<Outcome, ModelError> {
        live.validate()?;
        let group = self.cgs.get(cg).ok_or_else(|| not_found("cg", cg))?;
        if !self.is_active_host(to) {
            return Err(not_found("host", to));
        }
        if group.sequencer == to {
            return Err(invalid(
                "destination",
                format!("node {to} already orders group '{cg}'"),
            ));
        }
        if let Some(m) = self.running_migration(cg) {
            return Err(ModelError::InUse(format!(
                "group '{cg}' already has migration {} running: wait for it or abort it (`convoy migrate abort {}`)",
                m.id, m.id
            )));
        }
        if let Some(vm) = group
            .vms
            .iter()
            .filter_map(|v| self.vms.get(v))
            .find(|v| v.host != group.sequencer)
        {
            return Err(invalid(
                "migration",
                format!(
                    "VM '{}' runs on node {}, not on the group's sequencer (node {}): move it back first",
                    vm.name, vm.host, group.sequencer
                ),
            ));
        }
        if deadline_ms <= started_at_ms {
            return Err(invalid("deadline", "the deadline must be in the future"));
        }
        let destination_had_copy = group.link(to).is_some();
        let from = group.sequencer;
        self.next_migration_id += 1;
        let mut m = Migration {
            id: self.next_migration_id,
            cg: cg.into(),
            from,
            to,
            strategy,
            phase: Phase::Planned,
            claim: Claim {
                node: coordinator,
                number: 1,
            },
            started_at_ms,
            deadline_ms,
            destination_had_copy,
            prior_mode: group.replicas.first().map(|l| l.mode),
            moved: Vec::new(),
            stats: MigrationStats::default(),
            timeline: Vec::new(),
            decision: None,
            live,
        };
        m.note(
            started_at_ms,
            coordinator,
            format!(
                "planned: {} from node {from} to node {to}",
                strategy.as_str()
            ),
        );
        self.migrations.insert(m.id, m.clone());
        Ok(Outcome::Migration(Box::new(m)))
    }

    pub(crate) fn claim_migration(
        &mut self,
        id: u64,
        node: NodeId,
        expect_claim: u64,
        at_ms: u64,
    ) -> Result<Outcome, ModelError> {
        let m = self.migration_mut(id)?;
        if m.decision.is_some() {
            return Err(stale(format!("migration {id} is already decided")));
        }
        if m.claim.number != expect_claim {
            return Err(stale(format!(
                "migration {id} was claimed by node {} (claim {}) meanwhile",
                m.claim.node, m.claim.number
            )));
        }
        let previous = m.claim.node;
        m.claim = Claim {
            node,
            number: expect_claim + 1,
        };
        m.note(
            at_ms,
            node,
            format!(
                "node {node} claimed coordination (claim {}) from node {previous}",
                expect_claim + 1
            ),
        );
        Ok(Outcome::Migration(Box::new(m.clone())))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn advance_migration(
        &mut self,
        id: u64,
        claim: u64,
        from: Phase,
        to: Phase,
        at_ms: u64,
        note: &str,
        progress: &Progress,
    ) -> Result<Outcome, ModelError> {
        let m = self.guarded(id, claim, from)?;
        if !m.may_advance(to) {
            return Err(invalid(
                "migration phase",
                format!(
                    "{} cannot follow {} in a {} migration",
                    to.as_str(),
                    from.as_str(),
                    m.strategy.as_str()
                ),
            ));
        }
        let m = self.migration_mut(id)?;
        m.phase = to;
        for vm in &progress.moved {
            if !m.moved.contains(vm) {
                m.moved.push(vm.clone());
            }
        }
        m.stats.stun_ms.extend(progress.stun_ms.iter().cloned());
        if let Some(b) = progress.bytes_needed {
            m.stats.bytes_needed = b;
        }
        if let Some(b) = progress.bytes_moved {
            m.stats.bytes_moved = b;
        }
        if let Some(lag) = progress.rpo_writes {
            m.stats.rpo_writes = m.stats.rpo_writes.max(lag);
        }
        if progress.destination_complete && m.stats.destination_complete_at_ms.is_none() {
            m.stats.destination_complete_at_ms = Some(at_ms);
        }
        if progress.escalated && m.stats.escalated_at_ms.is_none() {
            m.stats.escalated_at_ms = Some(at_ms);
        }
        let node = m.claim.node;
        m.note(at_ms, node, note);
        Ok(Outcome::Migration(Box::new(m.clone())))
    }

    pub(crate) fn abort_migration(
        &mut self,
        id: u64,
        at_ms: u64,
        reason: &str,
    ) -> Result<Outcome, ModelError> {
        let m = self.migration_mut(id)?;
        if let Some(d) = &m.decision {
            return Err(stale(format!(
                "migration {id} was already decided: {}",
                d.decision.as_str()
            )));
        }
        match m.phase {
            // Asking twice is not an error: the first request already turned it around.
            Phase::FailingBack(_) => {}
            Phase::RollingForward => {
                return Err(ModelError::InUse(format!(
                    "migration {id} lost its source and is rolling forward onto node {}: there is nothing left to fail back to",
                    m.to
                )));
            }
            _ => {
                m.phase = Phase::FailingBack(FailBackCause::Abort);
                let node = m.claim.node;
                m.note(at_ms, node, format!("abort requested: {reason}"));
            }
        }
        Ok(Outcome::Migration(Box::new(m.clone())))
    }

    /// Checks that `cmd` is a change a migration of `m`'s group may make to it.
    fn migration_step_allowed(&self, m: &Migration, cmd: &Command) -> Result<(), ModelError> {
        let own_cg = |cg: &str| {
            if cg == m.cg {
                Ok(())
            } else {
                Err(invalid(
                    "migration step",
                    format!("migration {} moves group '{}', not '{cg}'", m.id, m.cg),
                ))
            }
        };
        let own_host = |h: NodeId| {
            if h == m.from || h == m.to {
                Ok(())
            } else {
                Err(invalid(
                    "migration step",
                    format!(
                        "migration {} involves nodes {} and {}, not node {h}",
                        m.id, m.from, m.to
                    ),
                ))
            }
        };
        let own_snapshot = |name: &str| {
            if name == m.failback_snapshot() || name == m.final_snapshot() {
                Ok(())
            } else {
                Err(invalid(
                    "migration step",
                    format!("snapshot '{name}' is not one of migration {}'s", m.id),
                ))
            }
        };
        match cmd {
            Command::AddReplica { cg, to, .. } | Command::RemoveReplica { cg, to } => {
                own_cg(cg)?;
                own_host(*to)
            }
            Command::SetMode { cg, .. } => own_cg(cg),
            Command::CreateSnapshot { cg, name, .. } | Command::DeleteSnapshot { cg, name } => {
                own_cg(cg)?;
                own_snapshot(name)
            }
            Command::MoveVm { name, to, .. } => {
                let vm = self.vms.get(name).ok_or_else(|| not_found("vm", name))?;
                own_cg(vm.cg.as_deref().unwrap_or(""))?;
                own_host(*to)
            }
            other => Err(invalid(
                "migration step",
                format!("a migration does not {}", other.kind()),
            )),
        }
    }

    pub(crate) fn migration_step(
        &mut self,
        id: u64,
        claim: u64,
        phase: Phase,
        at_ms: u64,
        cmd: &Command,
    ) -> Result<Outcome, ModelError> {
        let m = self.guarded(id, claim, phase)?.clone();
        self.migration_step_allowed(&m, cmd)?;
        let outcome = self.apply_command(cmd)?;
        let note = match cmd {
            Command::MoveVm { name, to, .. } => format!("VM {name} now runs on node {to}"),
            Command::AddReplica { to, mode, .. } => {
                format!("copy added on node {to} ({})", mode.as_str())
            }
            Command::RemoveReplica { to, .. } => format!("copy on node {to} dropped"),
            Command::SetMode { mode, .. } => format!("group mode set to {}", mode.as_str()),
            Command::CreateSnapshot { name, .. } => format!("snapshot {name} recorded"),
            Command::DeleteSnapshot { name, .. } => format!("snapshot {name} deleted"),
            other => other.kind().to_string(),
        };
        let m = self.migration_mut(id)?;
        let node = m.claim.node;
        m.note(at_ms, node, note);
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn migration_sequencer(
        &mut self,
        id: u64,
        claim: u64,
        phase: Phase,
        to: NodeId,
        continue_at: u64,
        basis: &SequencerBasis,
        at_ms: u64,
    ) -> Result<Outcome, ModelError> {
        let m = self.guarded(id, claim, phase)?.clone();
        if to != m.from && to != m.to {
            return Err(invalid(
                "new sequencer",
                format!(
                    "migration {} involves nodes {} and {}, not node {to}",
                    m.id, m.from, m.to
                ),
            ));
        }
        let group = self
            .cgs
            .get(&m.cg)
            .ok_or_else(|| not_found("cg", &m.cg))?
            .clone();
        let old = m.other_side(to);
        if group.sequencer != old {
            return Err(stale(format!(
                "node {} orders '{}' now, not node {old}",
                group.sequencer, m.cg
            )));
        }
        let disks: BTreeSet<DiskId> = self.cg_disks(&group).iter().map(|d| d.id).collect();
        let note;
        match basis {
            SequencerBasis::HandOver {
                roots,
                old_link_mode,
            } => {
                let covered: BTreeSet<DiskId> = roots.iter().map(|r| r.disk).collect();
                if covered != disks || roots.len() != disks.len() {
                    return Err(invalid(
                        "cut-over roots",
                        "one root pair per disk of the group is needed",
                    ));
                }
                if let Some(r) = roots.iter().find(|r| !r.matches()) {
                    return Err(invalid(
                        "cut-over roots",
                        format!(
                            "disk {} differs between node {old} and node {to} at the consistent point: the hand-over must not happen",
                            r.disk
                        ),
                    ));
                }
                self.set_sequencer(&m.cg, to, continue_at, old, *old_link_mode)?;
                note = format!(
                    "node {to} orders the group from sequence {continue_at} (hand-over, roots equal)"
                );
            }
            SequencerBasis::TakeOver => {
                let ok_link = group
                    .link(to)
                    .is_some_and(|l| l.state == LinkState::Consistent && l.mode.is_synchronous());
                let proven = to == m.from || m.stats.destination_complete_at_ms.is_some();
                if !ok_link || !proven {
                    return Err(invalid(
                        "take-over",
                        format!(
                            "node {to}'s copy of '{}' is not known to hold every acknowledged write (it needs a consistent synchronous link{})",
                            m.cg,
                            if proven {
                                ""
                            } else {
                                " seen caught up by the migration"
                            }
                        ),
                    ));
                }
                let mode = group.link(to).map(|l| l.mode);
                self.set_sequencer(&m.cg, to, continue_at, old, mode)?;
                if let Some(g) = self.cgs.get_mut(&m.cg) {
                    for l in g.replicas.iter_mut().filter(|l| l.to == old) {
                        l.state = LinkState::Outdated;
                    }
                }
                note = format!(
                    "node {old} lost: node {to} takes the order over from sequence {continue_at}; node {old}'s copy is outdated"
                );
            }
            SequencerBasis::Snapshot { name } => {
                let is_failback = matches!(m.phase, Phase::FailingBack(_))
                    && m.strategy == Strategy::BreakConsistency
                    && to == m.from
                    && *name == m.failback_snapshot()
                    && group
                        .snapshots
                        .iter()
                        .any(|s| s.name == *name && s.host == to);
                if !is_failback {
                    return Err(invalid(
                        "snapshot fail-back",
                        format!(
                            "only a failing-back break-consistency migration returns the order to its fail-back snapshot on its source (node {})",
                            m.from
                        ),
                    ));
                }
                if continue_at == 0 {
                    return Err(invalid("sequence", "continue_at must be at least 1"));
                }
                if !self.is_active_host(to) {
                    return Err(not_found("host", to));
                }
                let Some(g) = self.cgs.get_mut(&m.cg) else {
                    return Err(not_found("cg", &m.cg));
                };
                let mode = g
                    .link(to)
                    .map(|l| l.mode)
                    .or(m.prior_mode)
                    .unwrap_or(ReplicationMode::Async);
                g.replicas.retain(|l| l.to != to);
                g.replicas.push(crate::ReplicationLink {
                    to: old,
                    mode,
                    state: LinkState::Outdated,
                });
                g.sequencer = to;
                g.sequencer_epoch += 1;
                g.seq_start = continue_at;
                note = format!(
                    "node {old} lost: node {to} rolled back to snapshot {name} and orders the group from sequence {continue_at}; writes acknowledged after the snapshot are lost"
                );
            }
        }
        let m = self.migration_mut(id)?;
        if let SequencerBasis::HandOver {
            roots,
            old_link_mode,
        } = basis
        {
            if to == m.to {
                m.stats.cutover_roots = roots.clone();
            } else if old_link_mode.is_some_and(ReplicationMode::is_synchronous)
                && m.stats.destination_complete_at_ms.is_none()
            {
                // Handed back to the source: the destination held every write at the
                // consistent point and follows synchronously from it, so it holds every
                // acknowledged write (it may take the order if the source is lost).
                m.stats.destination_complete_at_ms = Some(at_ms);
            }
        }
        if m.phase == Phase::CuttingOver && to == m.to {
            if let Some(next) = m.strategy.next(Phase::CuttingOver) {
                m.phase = next;
            }
        }
        let node = m.claim.node;
        m.note(at_ms, node, note);
        Ok(Outcome::Migration(Box::new(m.clone())))
    }

    pub(crate) fn decide_migration(
        &mut self,
        id: u64,
        claim: u64,
        record: &DecisionRecord,
    ) -> Result<Outcome, ModelError> {
        let m = self.migration_mut(id)?;
        if let Some(d) = &m.decision {
            return Err(stale(format!(
                "migration {id} was already decided: {}",
                d.decision.as_str()
            )));
        }
        if m.claim.number != claim {
            return Err(stale(format!(
                "migration {id} is coordinated under claim {} now, not {claim}",
                m.claim.number
            )));
        }
        let m = m.clone();
        let group = self
            .cgs
            .get(&m.cg)
            .ok_or_else(|| not_found("cg", &m.cg))?
            .clone();
        let side = match record.decision {
            Decision::Committed => m.to,
            Decision::FailedBack => m.from,
        };
        let phase_ok = match record.decision {
            Decision::Committed => matches!(m.phase, Phase::Verifying | Phase::RollingForward),
            Decision::FailedBack => matches!(m.phase, Phase::FailingBack(_)),
        };
        if !phase_ok {
            return Err(stale(format!(
                "migration {id} is {}: it cannot be decided {} from there",
                m.phase.as_str(),
                record.decision.as_str()
            )));
        }
        if group.sequencer != side {
            return Err(invalid(
                "decision",
                format!(
                    "{} needs node {side} to order group '{}', but node {} does",
                    record.decision.as_str(),
                    m.cg,
                    group.sequencer
                ),
            ));
        }
        if let Some(vm) = group
            .vms
            .iter()
            .filter_map(|v| self.vms.get(v))
            .find(|v| v.host != side)
        {
            return Err(invalid(
                "decision",
                format!(
                    "{} needs every VM on node {side}, but VM '{}' runs on node {}",
                    record.decision.as_str(),
                    vm.name,
                    vm.host
                ),
            ));
        }
        if record.decision == Decision::Committed {
            let disks: BTreeSet<DiskId> = self.cg_disks(&group).iter().map(|d| d.id).collect();
            let covered: BTreeSet<DiskId> = record.roots.iter().map(|r| r.disk).collect();
            let proof_ok = covered == disks
                && record.roots.len() == disks.len()
                && if m.stats.cutover_roots.is_empty() {
                    // Rolled forward before any cut-over: the source's copy is gone.
                    m.phase == Phase::RollingForward
                        && record.roots.iter().all(|r| r.source.is_none())
                } else {
                    record.roots == m.stats.cutover_roots
                        && record.roots.iter().all(DiskRoots::matches)
                };
            if !proof_ok {
                return Err(invalid(
                    "decision",
                    "committed needs, for every disk, the equal Merkle roots of both copies recorded at the cut-over (or, rolled forward after losing the source before it, the destination's roots alone)",
                ));
            }
        }
        // The decision's own entry puts the group in its end state, so no coordinator has
        // to come back after the decision: the previous mode is restored (roles swapped
        // when committed), a copy the migration created for nothing is dropped, and the
        // migration's snapshots are forgotten (hosts collect their files).
        let failback = m.failback_snapshot();
        let finalsnap = m.final_snapshot();
        if let Some(g) = self.cgs.get_mut(&m.cg) {
            match record.decision {
                Decision::Committed => {
                    let mode = m.prior_mode.unwrap_or(ReplicationMode::Async);
                    if g.link(m.from).is_none() {
                        g.replicas.push(crate::ReplicationLink {
                            to: m.from,
                            mode,
                            state: LinkState::Syncing,
                        });
                    }
                    for l in &mut g.replicas {
                        l.mode = mode;
                    }
                    g.snapshots.retain(|s| s.name != failback);
                }
                Decision::FailedBack => {
                    if !m.destination_had_copy {
                        g.replicas.retain(|l| l.to != m.to);
                    }
                    if let Some(mode) = m.prior_mode {
                        for l in &mut g.replicas {
                            l.mode = mode;
                        }
                    }
                    g.snapshots
                        .retain(|s| s.name != failback && s.name != finalsnap);
                }
            }
        }
        let m = self.migration_mut(id)?;
        m.phase = Phase::Done;
        m.decision = Some(record.clone());
        let node = m.claim.node;
        m.note(
            record.at_ms,
            node,
            format!("decided {}: {}", record.decision.as_str(), record.reason),
        );
        Ok(Outcome::Migration(Box::new(m.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_order_is_the_declared_order() {
        use super::Phase::*;
        let all = [
            Planned,
            Preparing,
            Moving,
            CuttingOver,
            Verifying,
            FailingBack(FailBackCause::Abort),
            RollingForward,
            Done,
        ];
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn break_consistency_cuts_over_before_moving_and_the_others_after() {
        use super::Phase::*;
        assert_eq!(
            Strategy::BreakConsistency.next(Preparing),
            Some(CuttingOver)
        );
        assert_eq!(Strategy::BreakConsistency.next(CuttingOver), Some(Moving));
        assert_eq!(Strategy::BreakConsistency.next(Moving), Some(Verifying));
        for s in [
            Strategy::ReverseReplication,
            Strategy::CompareDelta,
            Strategy::SyncSwitch {
                active_active: true,
            },
        ] {
            assert_eq!(s.next(Preparing), Some(Moving));
            assert_eq!(s.next(Moving), Some(CuttingOver));
            assert_eq!(s.next(CuttingOver), Some(Verifying));
            assert_eq!(s.next(Verifying), None);
        }
    }
}
