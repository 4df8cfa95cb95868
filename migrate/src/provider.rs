//! The two interfaces the shell implements to carry out the engine's actions. The engine
//! never calls them: it emits [`crate::StorageOp`]s and [`crate::HypervisorOp`]s, and the
//! shell runs them with [`run_storage_op`] and [`run_hypervisor_op`] and feeds the results
//! back as [`crate::Completion`]s.
//!
//! Both traits are I/O-free in their signatures (plain futures, no runtime types), so the
//! agent implements them over its data plane and the simulator over simulated hosts.
//!
//! Shared obligations of every operation:
//! - **Idempotent.** The engine retries an operation whose reply it did not get, with the
//!   same arguments; running it twice must leave the same state as running it once (a
//!   hand-over whose entry already committed reports success, a snapshot of the same name
//!   is replaced, a resume of a running VM returns at once).
//! - **Committed model first.** Every precondition is checked against the committed model
//!   (not a cached view), and every model change goes through Raft as the guarded command
//!   the request names, so a stale coordinator's request changes nothing.
//! - **An unknown Raft outcome is resolved, never guessed.** When a commit's answer does
//!   not come, the provider re-proposes the same request (same request id: the model
//!   de-duplicates it) until it gets a definite answer, keeping guest writes paused where
//!   the operation paused them.

use std::collections::BTreeMap;
use std::future::Future;

use convoy_model::{DiskId, NodeId};

use crate::{
    DeltaReport, Guard, HandOverRequest, HypervisorError, HypervisorOp, HypervisorReply,
    LinkStatus, RestoreRequest, SequencerReport, StorageError, StorageOp, StorageReply,
    TakeOverRequest, VmState,
};

/// The component that owns a group's copies and replication (Convoy's replicated store,
/// or a storage array's adapter). Adding a copy, changing a mode and recording a snapshot
/// are model commands the engine proposes; the provider reacts to them (seeding a new copy
/// with only what it lacks: the journal tail, the dirty chunks, or the chunks whose hashes
/// differ). The operations here are those that need the provider's own view of the data.
pub trait StorageProvider {
    /// Status of each replica link of group `cg`, as its sequencer sees it now.
    ///
    /// The engine relies on [`LinkStatus::up_to_date`] meaning that every write
    /// acknowledged to a guest so far is durable on that replica and that every later
    /// one will be before it is acknowledged.
    fn link_status(
        &self,
        cg: &str,
    ) -> impl Future<Output = Result<BTreeMap<NodeId, LinkStatus>, StorageError>> + Send;

    /// Bring `to`'s image of `cg`'s disks close to `from`'s copy (the sequencer's) by
    /// comparing chunk hashes and sending only the chunks that differ, outside the group's
    /// order: for a destination with data but no replication history, so that the copy the
    /// engine adds next is seeded with only what still differs. Nothing relies on `to`'s
    /// image until that copy reports consistent.
    fn compare_delta(
        &self,
        cg: &str,
        from: NodeId,
        to: NodeId,
    ) -> impl Future<Output = Result<DeltaReport, StorageError>> + Send;

    /// Take a crash-consistent snapshot of `cg` named `name` on `host`, which must order
    /// the group in the committed model. When it returns `Ok`, the snapshot exists on
    /// `host`'s disk at one point of the group's order, and stays unchanged until the
    /// model forgets it. A snapshot of the same name not recorded in the model is
    /// replaced. The engine records it in the model afterwards.
    fn snapshot(
        &self,
        cg: &str,
        host: NodeId,
        name: &str,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Hand `req.cg`'s order from `req.from` to `req.to`, both live: pause guest writes at
    /// `from`, wait until `to` acknowledged every write `from` ordered, compute per-disk
    /// Merkle roots of both copies at that consistent point, commit
    /// `req.guard.sequencer_command(to, last + 1, SequencerBasis::HandOver { roots,
    /// old_link_mode })`, then resume writes (now ordered by whoever the committed model
    /// says). Returns the roots on commit. If the roots differ, returns
    /// [`StorageError::CopiesDiffer`] without committing; if `to` does not catch up in the
    /// provider's time limit, [`StorageError::NotCaughtUp`]; if the model refuses,
    /// [`StorageError::Refused`]; in every failure writes resume unchanged. If the
    /// committed model already shows `to` ordering the group for this migration, returns
    /// success without pausing.
    fn hand_over(
        &self,
        req: &HandOverRequest,
    ) -> impl Future<Output = Result<SequencerReport, StorageError>> + Send;

    /// `req.lost` (the group's sequencer) is lost: `req.to` takes the order over at its
    /// own last applied sequence number + 1 by committing
    /// `req.guard.sequencer_command(to, applied + 1, SequencerBasis::TakeOver)` (the model
    /// accepts it only for a copy that holds every acknowledged write). From the commit on,
    /// `to` orders the group's writes, including mirrored ones still waiting for the lost
    /// host; writes the lost host ordered beyond `applied` were never acknowledged and are
    /// dropped with its copy, which is recorded outdated.
    fn take_over(
        &self,
        req: &TakeOverRequest,
    ) -> impl Future<Output = Result<SequencerReport, StorageError>> + Send;

    /// `break-consistency` fail-back after the destination was lost holding the order:
    /// roll `req.host`'s copy back to snapshot `req.snapshot` (the migration's fail-back
    /// point), then commit `req.guard.sequencer_command(host, snapshot_seq + 1,
    /// SequencerBasis::Snapshot { name })`. Writes acknowledged after the snapshot are lost;
    /// that is the strategy's stated price.
    fn restore_snapshot(
        &self,
        req: &RestoreRequest,
    ) -> impl Future<Output = Result<SequencerReport, StorageError>> + Send;

    /// Per disk of `cg`, the Merkle root of `host`'s copy now.
    fn roots(
        &self,
        cg: &str,
        host: NodeId,
    ) -> impl Future<Output = Result<Vec<(DiskId, [u8; 32])>, StorageError>> + Send;
}

/// Runs VMs. It resumes a VM only where the committed model says the VM runs, with its
/// disks opened at the model's current epochs, so an instance left behind on another host
/// is refused by every copy.
pub trait HypervisorDriver {
    /// Pause `vm` on `host` and wait until none of its writes is in flight (each was
    /// acknowledged or failed). First, atomically with the pause, check `guard` against
    /// the committed model: if the migration is decided or its claim or phase differ,
    /// return [`HypervisorError::Stale`] and do nothing (a stale coordinator must not
    /// pause a VM nobody will resume). Returns `Ok` at once if the VM is already paused
    /// or stopped there, or does not run there. The VM is paused once: if it is resumed
    /// while draining, the operation ends without pausing it again. On
    /// [`HypervisorError::DrainTimeout`] the VM stays paused.
    fn pause_and_drain(
        &self,
        vm: &str,
        host: NodeId,
        guard: &Guard,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Run `vm` on `host`, which must be where the committed model says it runs
    /// ([`HypervisorError::NotThere`] otherwise, changing nothing), checking `guard` like
    /// [`HypervisorDriver::pause_and_drain`] does ([`HypervisorError::Stale`]): resume its
    /// paused instance there, or start it there from the host's copy at the disks'
    /// current epochs (its old host was lost), stopping an instance left on another live
    /// host first (one that was cut off when the VM was moved away). Returns at once if it
    /// already runs there. Reports the stun time (from pause, or from the old host's loss).
    fn resume(
        &self,
        vm: &str,
        host: NodeId,
        guard: &Guard,
    ) -> impl Future<Output = Result<Option<u64>, HypervisorError>> + Send;

    /// How `vm` runs now.
    fn state(&self, vm: &str) -> impl Future<Output = VmState> + Send;
}

/// Runs one storage operation through `provider`: the mapping every shell uses.
pub async fn run_storage_op<S: StorageProvider + Sync>(
    provider: &S,
    op: &StorageOp,
) -> Result<StorageReply, StorageError> {
    match op {
        StorageOp::CompareDelta { cg, from, to } => provider
            .compare_delta(cg, *from, *to)
            .await
            .map(StorageReply::Delta),
        StorageOp::Snapshot { cg, host, name } => provider
            .snapshot(cg, *host, name)
            .await
            .map(|()| StorageReply::Snapshot),
        StorageOp::HandOver(req) => provider.hand_over(req).await.map(StorageReply::Sequencer),
        StorageOp::TakeOver(req) => provider.take_over(req).await.map(StorageReply::Sequencer),
        StorageOp::RestoreSnapshot(req) => provider
            .restore_snapshot(req)
            .await
            .map(StorageReply::Sequencer),
        StorageOp::Roots { cg, host } => provider.roots(cg, *host).await.map(StorageReply::Roots),
    }
}

/// Runs one hypervisor operation through `driver`: the mapping every shell uses.
pub async fn run_hypervisor_op<H: HypervisorDriver + Sync>(
    driver: &H,
    op: &HypervisorOp,
) -> Result<HypervisorReply, HypervisorError> {
    match op {
        HypervisorOp::PauseAndDrain { vm, host, guard } => driver
            .pause_and_drain(vm, *host, guard)
            .await
            .map(|()| HypervisorReply::Drained),
        HypervisorOp::Resume { vm, host, guard } => driver
            .resume(vm, *host, guard)
            .await
            .map(|stun_ms| HypervisorReply::Resumed { stun_ms }),
    }
}
