//! What the shell feeds the engine besides the model: results of earlier actions and what
//! it can see of hosts, links and VMs.

use std::collections::BTreeMap;

use convoy_model::NodeId;
use serde::{Deserialize, Serialize};

use crate::{ActionId, ActionResult};

/// The result of an action the engine emitted earlier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// The action's id.
    pub action: ActionId,
    /// What it came to.
    pub result: ActionResult,
}

/// What the shell's failure detector says of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostHealth {
    /// Its agent answers.
    Up,
    /// Its agent has not answered for the detector's timeout. The engine acts on this at
    /// once (fails back, rolls forward, takes over coordination); that is safe even when
    /// the host is merely cut off, because every change it makes is fenced by epochs.
    Lost,
}

/// A replica link's status as the group's sequencer reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Highest sequence number the replica acknowledged.
    pub acked_seq: u64,
    /// Highest sequence number the sequencer assigned.
    pub last_seq: u64,
    /// The replica holds every write the sequencer acknowledged to a guest, and will hold
    /// every later one before it is acknowledged (synchronous mode with the backlog of the
    /// asynchronous time drained; DRBD's UpToDate under protocol C).
    pub up_to_date: bool,
    /// Bytes the replica lacked when its current seeding or catch-up began.
    pub bytes_needed: u64,
    /// Bytes sent to it since.
    pub bytes_moved: u64,
}

impl LinkStatus {
    /// How much the replica lacks: writes behind in the group's order, or, while it is
    /// being seeded, chunks still to send (`acked_seq` then counts up to `last_seq` as
    /// they go). Convergence is judged on it either way.
    pub fn lag(&self) -> u64 {
        self.last_seq.saturating_sub(self.acked_seq)
    }
}

/// Where and how a VM runs, as its hypervisor driver reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Running on this host, writing.
    Running(NodeId),
    /// Paused on this host with no write in flight.
    Paused(NodeId),
    /// Not running anywhere (an operator stopped it).
    Stopped,
    /// Not known (its host does not answer).
    Unknown,
}

/// Everything the engine sees in one step besides the model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observations {
    /// Results of earlier actions that arrived since the last step.
    pub completions: Vec<Completion>,
    /// Hosts the failure detector has an opinion on; a host not listed counts as up.
    pub hosts: BTreeMap<NodeId, HostHealth>,
    /// The migrating group's links, by replica host, as its sequencer reports them; a link
    /// not listed is not known (the engine waits).
    pub links: BTreeMap<NodeId, LinkStatus>,
    /// The group's VMs, by name; a VM not listed counts as [`VmState::Unknown`].
    pub vms: BTreeMap<String, VmState>,
}

impl Observations {
    /// Whether the failure detector reports `host` lost.
    pub fn lost(&self, host: NodeId) -> bool {
        self.hosts.get(&host) == Some(&HostHealth::Lost)
    }

    /// How `vm` runs.
    pub fn vm(&self, vm: &str) -> VmState {
        self.vms.get(vm).copied().unwrap_or(VmState::Unknown)
    }
}
