//! The migration engine: moves every VM of a consistency group from one host to another
//! while a copy that is safe to fail back to exists at every moment, and decides the
//! outcome once, through the Raft log.
//!
//! Like openraft's `engine/` and quinn-proto, the engine is pure: a [`Coordinator`] takes
//! the committed [`convoy_model::ClusterModel`] (which holds the migration's record), the
//! shell's [`Observations`] and the time, and returns [`Action`]s: Raft proposals,
//! [`StorageProvider`] and [`HypervisorDriver`] operations, and notes. It has no tokio, no
//! sockets, no clock and no randomness.
//!
//! # What the shell must do
//!
//! 1. Run one [`Coordinator`] per undecided migration on every agent (a fresh one, with a
//!    new `incarnation`, after every agent start). Only the one whose node holds the
//!    migration's claim acts; the others claim it when the failure detector reports the
//!    holder's host lost.
//! 2. Call [`Coordinator::step`] with the committed model whenever a completion arrives or
//!    the model changes, and on a timer (a few times a second), passing the results of
//!    earlier actions as [`Completion`]s (each once), the failure detector's opinion of the
//!    hosts, the migrating group's link status ([`StorageProvider::link_status`]) and the
//!    group's VM states ([`HypervisorDriver::state`]).
//! 3. Run each action: proposals through Raft with the given request id (reporting
//!    [`ProposalResult::Unknown`] after a client timeout), storage and hypervisor
//!    operations with [`run_storage_op`] and [`run_hypervisor_op`], notes to the log. An
//!    action emitted again with the same id is a retry. Results may arrive late or never:
//!    the engine re-emits after its timeouts.
//! 4. Stop when [`Coordinator::finished`] says the migration is decided: the decision's
//!    own entry put the group in its end state.
//!
//! The engine relies on the committed model for everything that matters: every change it
//! asks for is guarded by its claim and the phase it acted in
//! ([`convoy_model::Command::MigrationStep`], [`convoy_model::Command::MigrationSequencer`]),
//! so a coordinator that lost its claim, or acted on a phase an abort changed, changes
//! nothing, and a new coordinator continues from the record alone.

#![warn(missing_docs, unreachable_pub)]

mod action;
mod engine;
mod observe;
mod provider;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod sim;

pub use action::{
    Action, ActionId, ActionKind, ActionResult, DeltaReport, Guard, HandOverRequest,
    HypervisorError, HypervisorOp, HypervisorReply, ProposalResult, RestoreRequest,
    SequencerReport, StorageError, StorageOp, StorageReply, TakeOverRequest,
};
pub use engine::{Config, Coordinator};
pub use observe::{Completion, HostHealth, LinkStatus, Observations, VmState};
pub use provider::{HypervisorDriver, StorageProvider, run_hypervisor_op, run_storage_op};
