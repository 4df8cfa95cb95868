//! What the engine asks the shell to do, and what comes back.

use convoy_model::{
    Command, DiskId, DiskRoots, ModelError, NodeId, Outcome, Phase, ReplicationMode, SequencerBasis,
};
use serde::{Deserialize, Serialize};

/// Names one action. An action emitted again with the same id is a retry of the same
/// request (its reply may have been lost): the shell may run it again, or keep waiting for
/// the first run; the operation's contract makes running it twice harmless.
pub type ActionId = u64;

/// One thing for the shell to do. Its result comes back as a [`crate::Completion`] with
/// the same id, in a later step's observations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// The action's id (see [`ActionId`]).
    pub id: ActionId,
    /// What to do.
    pub kind: ActionKind,
}

/// The kinds of action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionKind {
    /// Propose `command` through Raft with client request id `request_id`, and report the
    /// model's answer ([`ProposalResult::Applied`]) or, when none came in time,
    /// [`ProposalResult::Unknown`]. A retry carries the same request id, so the model
    /// applies the command at most once.
    Propose {
        /// Client request id (non-zero) for the model's de-duplication.
        request_id: u128,
        /// The command.
        command: Command,
    },
    /// Run a storage-provider operation ([`crate::StorageProvider`]).
    Storage(StorageOp),
    /// Run a hypervisor-driver operation ([`crate::HypervisorDriver`]).
    Hypervisor(HypervisorOp),
    /// A line for the shell's log and the live status of the migration (emitted when it
    /// changes, with action id 0 and no completion). Not persisted: what matters later is
    /// in the record's timeline, written by the proposals.
    Note(String),
}

/// What a migration's change to the sequencer is guarded by: the model applies it only
/// while the migration is undecided, coordinated under `claim` and in `phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    /// The migration.
    pub migration: u64,
    /// The coordinator's claim number.
    pub claim: u64,
    /// The phase the coordinator acted in.
    pub phase: Phase,
    /// The coordinator's clock when it asked (for the timeline).
    pub at_ms: u64,
}

impl Guard {
    /// The command a storage provider commits to hand the group's order to `to`,
    /// continuing at `continue_at`, on `basis`.
    pub fn sequencer_command(
        &self,
        to: NodeId,
        continue_at: u64,
        basis: SequencerBasis,
    ) -> Command {
        Command::MigrationSequencer {
            id: self.migration,
            claim: self.claim,
            phase: self.phase,
            to,
            continue_at,
            basis,
            at_ms: self.at_ms,
        }
    }
}

/// A sequencer hand-over between two live hosts at a consistent point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOverRequest {
    /// The group.
    pub cg: String,
    /// The current sequencer.
    pub from: NodeId,
    /// The new sequencer (holds a consistent copy).
    pub to: NodeId,
    /// Mode of `from`'s link afterwards, or `None` to drop its copy.
    pub old_link_mode: Option<ReplicationMode>,
    /// The guard of the committing entry.
    pub guard: Guard,
}

/// A forced take-over of the order by `to` after the sequencer `lost` was lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeOverRequest {
    /// The group.
    pub cg: String,
    /// The lost sequencer.
    pub lost: NodeId,
    /// The host taking the order (its copy holds every acknowledged write).
    pub to: NodeId,
    /// The guard of the committing entry.
    pub guard: Guard,
}

/// `break-consistency`'s fail-back when the destination was lost holding the order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The group.
    pub cg: String,
    /// The host whose copy rolls back (the migration's source, which holds the snapshot).
    pub host: NodeId,
    /// The snapshot.
    pub snapshot: String,
    /// The lost sequencer.
    pub lost: NodeId,
    /// The guard of the committing entry.
    pub guard: Guard,
}

/// Storage-provider operations (see [`crate::StorageProvider`] for each contract).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageOp {
    /// [`crate::StorageProvider::compare_delta`].
    CompareDelta {
        /// The group.
        cg: String,
        /// Host whose copy is the reference (the sequencer).
        from: NodeId,
        /// Host whose image is brought to it.
        to: NodeId,
    },
    /// [`crate::StorageProvider::snapshot`].
    Snapshot {
        /// The group.
        cg: String,
        /// The host (must be the group's sequencer).
        host: NodeId,
        /// Snapshot name.
        name: String,
    },
    /// [`crate::StorageProvider::hand_over`].
    HandOver(HandOverRequest),
    /// [`crate::StorageProvider::take_over`].
    TakeOver(TakeOverRequest),
    /// [`crate::StorageProvider::restore_snapshot`].
    RestoreSnapshot(RestoreRequest),
    /// [`crate::StorageProvider::roots`].
    Roots {
        /// The group.
        cg: String,
        /// The host whose copy is hashed.
        host: NodeId,
    },
}

/// What a storage operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageReply {
    /// A compare-delta pass finished.
    Delta(DeltaReport),
    /// The snapshot exists on the sequencer.
    Snapshot,
    /// The hand-over, take-over or restore committed.
    Sequencer(SequencerReport),
    /// Per disk, the Merkle root of the host's copy.
    Roots(Vec<(DiskId, [u8; 32])>),
}

/// What a compare-delta pass moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaReport {
    /// Bytes whose hashes were compared.
    pub bytes_compared: u64,
    /// Bytes sent because they differed.
    pub bytes_sent: u64,
}

/// What a committed change of sequencer reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencerReport {
    /// Where the new sequencer continues the group's order.
    pub continue_at: u64,
    /// For a hand-over, both copies' roots at the consistent point.
    pub roots: Vec<DiskRoots>,
    /// How long guest writes were held, ms.
    pub pause_ms: u64,
}

/// Why a storage operation failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StorageError {
    /// A host the operation needs did not answer; it may be down or cut off. Retrying
    /// is safe; the coordinator decides whether the host counts as lost.
    #[error("node {0} did not answer: check `convoy cluster status`")]
    Unreachable(NodeId),
    /// The operation's preconditions do not hold in the committed model (for example the
    /// host no longer orders the group). Nothing changed.
    #[error("{0}")]
    Precondition(String),
    /// A hand-over waited in vain for the new sequencer to acknowledge every write and
    /// resumed writes unchanged.
    #[error(
        "node {host} was still {lag} writes behind when the hand-over gave up; writes resumed unchanged"
    )]
    NotCaughtUp {
        /// The lagging host.
        host: NodeId,
        /// Its lag, writes.
        lag: u64,
    },
    /// The copies' roots differed at the consistent point: the hand-over did not happen.
    #[error("disk {disk}'s copies differ at the consistent point; the hand-over did not happen")]
    CopiesDiffer {
        /// The first differing disk.
        disk: DiskId,
    },
    /// The model refused the committing entry (a stale claim or phase). Nothing changed.
    #[error("the model refused the change: {0}")]
    Refused(ModelError),
    /// Another operation of the same kind runs on the group; ask again later.
    #[error("another {0} runs on this group; it will answer first")]
    Busy(String),
    /// Anything else (I/O); safe to retry.
    #[error("storage failure: {0}")]
    Failed(String),
}

/// Hypervisor-driver operations (see [`crate::HypervisorDriver`] for each contract).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HypervisorOp {
    /// [`crate::HypervisorDriver::pause_and_drain`].
    PauseAndDrain {
        /// The VM.
        vm: String,
        /// Where it runs now.
        host: NodeId,
        /// Paused only while the migration is undecided under this claim and phase: a
        /// stale coordinator's pause does nothing.
        guard: Guard,
    },
    /// [`crate::HypervisorDriver::resume`].
    Resume {
        /// The VM.
        vm: String,
        /// Where the model says it runs.
        host: NodeId,
        /// Resumed only while the migration is undecided under this claim and phase: a
        /// stale coordinator must not resume a VM another one is moving.
        guard: Guard,
    },
}

/// What a hypervisor operation returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HypervisorReply {
    /// The VM is paused on the host with no write in flight.
    Drained,
    /// The VM runs on the host.
    Resumed {
        /// Time from its pause (or from its old host's loss) to now, ms, when known.
        stun_ms: Option<u64>,
    },
}

/// Why a hypervisor operation failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HypervisorError {
    /// The host did not answer.
    #[error("node {0}'s hypervisor did not answer: check `convoy cluster status`")]
    Unreachable(NodeId),
    /// The operation's guard no longer holds in the committed model (another coordinator, a
    /// phase change, or the decision came first): nothing was done.
    #[error(
        "the migration moved on (claim, phase or decision changed); nothing was done to VM {0}"
    )]
    Stale(String),
    /// The committed model says the VM runs elsewhere: nothing was done.
    #[error("VM {vm} does not run on node {host} in the committed model; nothing was done")]
    NotThere {
        /// The VM.
        vm: String,
        /// The host asked.
        host: NodeId,
    },
    /// The drain did not finish in time; the VM stays paused.
    #[error("VM {0} still had writes in flight when the drain gave up; it stays paused")]
    DrainTimeout(String),
    /// Anything else.
    #[error("hypervisor failure: {0}")]
    Failed(String),
}

/// What a proposal came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProposalResult {
    /// The command was committed and applied with this answer (an error means it changed
    /// nothing).
    Applied(Result<Outcome, ModelError>),
    /// No answer in time: it may or may not have been committed.
    Unknown,
}

/// The result of one action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionResult {
    /// Of a [`ActionKind::Propose`].
    Proposal(ProposalResult),
    /// Of a [`ActionKind::Storage`].
    Storage(Result<StorageReply, StorageError>),
    /// Of a [`ActionKind::Hypervisor`].
    Hypervisor(Result<HypervisorReply, HypervisorError>),
}
