//! Convoy's replicated state: the openraft type configuration, a durable RocksDB log store,
//! and the cluster-model state machine with crash-safe snapshots.
//!
//! Durability contract (what the rest of Convoy relies on):
//! - a log append is reported flushed to openraft only after the RocksDB WAL holding it has
//!   been fsynced (appends are group-committed: one fsync covers every append queued while
//!   the previous fsync ran);
//! - a vote is fsynced before `save_vote` returns;
//! - a snapshot file is written to a temporary file, fsynced, renamed into place and the
//!   directory fsynced, so a crash leaves either the old or the new snapshot, never a torn one;
//! - on restart the state machine loads the latest snapshot and openraft re-applies the log.
//!
//! All RocksDB and file work runs on tokio's blocking pool or a dedicated thread, never on
//! the async worker threads.

// openraft dictates its (large) error types in every storage signature.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod state_machine;
pub mod upgrade;

/// The cluster model (its own I/O-free crate), re-exported: the language of the log.
pub use convoy_model as model;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use convoy_model::{ClusterModel, Command, ModelError, NodeId, Outcome};
pub use log_store::LogStore;
pub use state_machine::StateMachineStore;

/// Address information of a Raft member, carried in the Raft membership config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// QUIC address (`host:port`) other agents dial for Raft and data traffic.
    pub raft_addr: String,
    /// Admin API address (`host:port`, HTTPS).
    pub admin_addr: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} admin={}", self.raft_addr, self.admin_addr)
    }
}

/// A client command as proposed to Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Client-chosen id for retry de-duplication; 0 means "no de-duplication".
    pub request_id: u128,
    /// The change to apply.
    pub command: Command,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{:x}", self.command.kind(), self.request_id)
    }
}

/// The state machine's answer to one log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// What the command produced, or why the model refused it.
    pub result: Result<Outcome, ModelError>,
}

/// One Raft entry: client requests proposed together. Batching many requests into one entry
/// is Convoy's group commit: openraft 0.9 appends (and fsyncs) entry by entry, so one
/// entry per request would cap writes at one per fsync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The requests, applied in this order.
    pub requests: Vec<Request>,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "proposal of {} request(s)", self.requests.len())
    }
}

/// The state machine's answers to one entry: one [`Response`] per request of a
/// [`Proposal`], in order; empty for blank and membership entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Responses(pub Vec<Response>);

openraft::declare_raft_types!(
    /// Convoy's openraft type configuration.
    pub TypeConfig:
        D = Proposal,
        R = Responses,
        NodeId = NodeId,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Convoy's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// openraft storage error for this configuration.
pub type StorageError = openraft::StorageError<NodeId>;
