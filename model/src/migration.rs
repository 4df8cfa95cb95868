//! Migrations: the Raft-logged record of moving every VM of a consistency group from one
//! host to another. Every phase change is a compare-and-set on the record (refused for a
//! stale coordinator), and the decision is written exactly once.
//!
//! The model only keeps the record honest; what each phase does is decided by the
//! migration engine (the `convoy-migrate` crate), which proposes these commands.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, invalid, not_found, stale};
use crate::{ClusterModel, NodeId, Outcome};

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
}

/// Where a migration is. Phases only move forward, except that any phase before the
/// decision may turn into [`Phase::FailingBack`].
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
    /// Comparing the copies' Merkle roots before the decision.
    Verifying,
    /// Undoing: VMs return to the source, whose copy is the fail-back copy.
    FailingBack,
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
            Phase::FailingBack => "failing-back",
            Phase::Done => "done",
        }
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
    pub disk: u64,
    /// Root of the source's copy.
    pub source: [u8; 32],
    /// Root of the destination's copy.
    pub destination: [u8; 32],
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
    /// Per disk, the roots compared (required to be equal for `Committed`).
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

/// Figures a migration reports (updated with phase changes, not per write).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// Bytes the destination lacked when the migration started (estimate).
    pub bytes_needed: u64,
    /// Bytes moved so far.
    pub bytes_moved: u64,
    /// Stun (pause) time per VM move, ms, in move order.
    pub stun_ms: Vec<(String, u64)>,
    /// Highest lag of the fail-back copy seen, writes.
    pub rpo_writes: u64,
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
    /// The group's replication mode before the migration, restored at the end.
    pub prior_mode: Option<crate::ReplicationMode>,
    /// VMs moved to the destination so far.
    pub moved: Vec<String>,
    /// Figures for the report.
    pub stats: MigrationStats,
    /// What happened, in order.
    pub timeline: Vec<TimelineEntry>,
    /// The decision, once made.
    pub decision: Option<DecisionRecord>,
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
}

/// A change to a migration's progress, applied with a phase change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// VMs moved since the last update.
    pub moved: Vec<String>,
    /// New figures, if any.
    pub stats: Option<MigrationStats>,
    /// The group's mode before the migration, recorded once known.
    pub prior_mode: Option<crate::ReplicationMode>,
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

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_migration(
        &mut self,
        cg: &str,
        to: NodeId,
        strategy: Strategy,
        coordinator: NodeId,
        started_at_ms: u64,
        deadline_ms: u64,
    ) -> Result<Outcome, ModelError> {
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
            format!("node {node} took over coordination from node {previous}"),
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
        let m = self.migration_mut(id)?;
        if m.claim.number != claim {
            return Err(stale(format!(
                "migration {id} is coordinated under claim {} now, not {claim}",
                m.claim.number
            )));
        }
        if m.phase != from {
            return Err(stale(format!(
                "migration {id} is {} now, not {}",
                m.phase.as_str(),
                from.as_str()
            )));
        }
        let allowed = to == from
            || (to > from && to != Phase::Done && from != Phase::FailingBack)
            || (to == Phase::FailingBack && from != Phase::Done);
        if !allowed {
            return Err(invalid(
                "migration phase",
                format!("{} cannot follow {}", to.as_str(), from.as_str()),
            ));
        }
        m.phase = to;
        for vm in &progress.moved {
            if !m.moved.contains(vm) {
                m.moved.push(vm.clone());
            }
        }
        if let Some(stats) = &progress.stats {
            m.stats = stats.clone();
        }
        if progress.prior_mode.is_some() {
            m.prior_mode = progress.prior_mode;
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
        if record.decision == Decision::Committed
            && (record.roots.is_empty() || record.roots.iter().any(|r| r.source != r.destination))
        {
            return Err(invalid(
                "decision",
                "committed needs, for every disk, equal Merkle roots of both copies",
            ));
        }
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
    #[test]
    fn phase_order_is_the_declared_order() {
        use super::Phase::*;
        let all = [
            Planned,
            Preparing,
            Moving,
            CuttingOver,
            Verifying,
            FailingBack,
            Done,
        ];
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }
}
