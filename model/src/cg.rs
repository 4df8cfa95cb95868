//! Consistency groups: disks of one or more VMs that share one write order, the host that
//! orders them (the sequencer), their copies on other hosts and their snapshots.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, invalid, not_found, stale};
use crate::{ClusterModel, Disk, NodeId, Outcome, validate_name};

/// How the copies of a consistency group are kept in sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicationMode {
    /// Active/passive asynchronous.
    Async,
    /// Active/passive synchronous.
    Sync,
    /// Both copies accept writes; durable on both before acknowledgement.
    ActiveActiveSync,
    /// Both copies accept writes; each streams its writes to the other.
    ActiveActiveAsync,
}

impl ReplicationMode {
    /// The CLI spelling (`async`, `sync`, `active-active-sync`, `active-active-async`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Async => "async",
            ReplicationMode::Sync => "sync",
            ReplicationMode::ActiveActiveSync => "active-active-sync",
            ReplicationMode::ActiveActiveAsync => "active-active-async",
        }
    }

    /// Parses the CLI spelling.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        match text {
            "async" => Ok(ReplicationMode::Async),
            "sync" => Ok(ReplicationMode::Sync),
            "active-active-sync" => Ok(ReplicationMode::ActiveActiveSync),
            "active-active-async" => Ok(ReplicationMode::ActiveActiveAsync),
            other => Err(invalid(
                "replication mode",
                format!("'{other}': use async, sync, active-active-sync or active-active-async"),
            )),
        }
    }

    /// Whether a guest write waits for the replica to hold it durably.
    pub fn is_synchronous(self) -> bool {
        matches!(
            self,
            ReplicationMode::Sync | ReplicationMode::ActiveActiveSync
        )
    }

    /// Whether both copies accept guest writes.
    pub fn is_active_active(self) -> bool {
        matches!(
            self,
            ReplicationMode::ActiveActiveSync | ReplicationMode::ActiveActiveAsync
        )
    }
}

/// What a replica copy is good for right now, as recorded by the sequencer's agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinkState {
    /// Being filled for the first time; not usable.
    Syncing,
    /// A crash-consistent prefix of the group's history (async), or identical (sync).
    Consistent,
    /// Dirty-chunk resync running; the replica kept a snapshot of its last consistent
    /// state, which is the usable copy until the resync ends.
    Inconsistent,
    /// The sequencer acknowledged writes this copy does not have (it was unreachable in
    /// sync mode): it must not be failed over to.
    Outdated,
}

impl LinkState {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Syncing => "syncing",
            LinkState::Consistent => "consistent",
            LinkState::Inconsistent => "inconsistent",
            LinkState::Outdated => "outdated",
        }
    }
}

/// A copy of a consistency group kept on another host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationLink {
    /// Host holding the copy.
    pub to: NodeId,
    /// Mode of this link.
    pub mode: ReplicationMode,
    /// What the copy is good for.
    pub state: LinkState,
}

/// A crash-consistent point across all disks of a group, kept on the host that was its
/// sequencer when it was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgSnapshot {
    /// Name, unique within the group.
    pub name: String,
    /// Host holding the snapshot images.
    pub host: NodeId,
    /// Proposer's clock at creation, ms since the epoch.
    pub created_at_ms: u64,
}

/// A consistency group: disks of one or more VMs that share one write order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cg {
    /// Model-assigned id; everything on the data path is keyed by it, never by name.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// Member VMs.
    pub vms: Vec<String>,
    /// The host whose order defines the group's history: it sequences every write of the
    /// group (its own VMs' and, mirrored, those of VMs running elsewhere) and streams them
    /// to the replicas. Operators call it the primary.
    pub sequencer: NodeId,
    /// Bumped whenever the sequencer changes or the group is fenced. Replication and
    /// mirrored-write streams carry it; a copy refuses a sender with an older one.
    pub sequencer_epoch: u64,
    /// Sequence number the current sequencer continues at, set when it took over (0: the
    /// group's first sequencer, which starts from its own reservation).
    pub seq_start: u64,
    /// Copies on other hosts.
    pub replicas: Vec<ReplicationLink>,
    /// Snapshots, oldest first.
    pub snapshots: Vec<CgSnapshot>,
}

impl Cg {
    /// The link to `to`, if `to` holds a copy.
    pub fn link(&self, to: NodeId) -> Option<&ReplicationLink> {
        self.replicas.iter().find(|l| l.to == to)
    }

    /// Whether `host` holds a copy of the group (the sequencer's or a replica).
    pub fn holds_copy(&self, host: NodeId) -> bool {
        self.sequencer == host || self.link(host).is_some()
    }
}

impl ClusterModel {
    /// The disks of a group's VMs, in VM then attachment order.
    pub fn cg_disks(&self, cg: &Cg) -> Vec<Disk> {
        cg.vms
            .iter()
            .filter_map(|v| self.vms.get(v))
            .flat_map(|vm| self.vm_disks(vm))
            .collect()
    }

    /// The group with id `id`.
    pub fn cg_by_id(&self, id: u64) -> Option<&Cg> {
        self.cgs.values().find(|c| c.id == id)
    }

    /// The highest epoch of a group's disks.
    pub fn cg_max_disk_epoch(&self, cg: &Cg) -> u64 {
        self.cg_disks(cg).iter().map(|d| d.epoch).max().unwrap_or(1)
    }

    fn cg_mut(&mut self, cg: &str) -> Result<&mut Cg, ModelError> {
        self.cgs.get_mut(cg).ok_or_else(|| not_found("cg", cg))
    }

    pub(crate) fn create_cg(&mut self, name: &str, vms: &[String]) -> Result<Outcome, ModelError> {
        validate_name("group name", name)?;
        if self.cgs.contains_key(name) {
            return Err(ModelError::Exists {
                kind: "cg".into(),
                name: name.into(),
            });
        }
        if vms.is_empty() {
            return Err(invalid(
                "group members",
                "a consistency group needs at least one VM (--vm NAME)",
            ));
        }
        let unique: BTreeSet<&String> = vms.iter().collect();
        if unique.len() != vms.len() {
            return Err(invalid("group members", "a VM is listed twice"));
        }
        let mut host = None;
        for vm_name in vms {
            let vm = self
                .vms
                .get(vm_name)
                .ok_or_else(|| not_found("vm", vm_name))?;
            if let Some(other) = &vm.cg {
                return Err(ModelError::InUse(format!(
                    "VM '{vm_name}' is already in consistency group '{other}'"
                )));
            }
            match host {
                None => host = Some(vm.host),
                Some(h) if h != vm.host => {
                    return Err(invalid(
                        "group members",
                        format!(
                            "VM '{vm_name}' runs on node {} but the others on node {h}; a group starts on one host",
                            vm.host
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let sequencer = host.unwrap_or_default();
        for vm_name in vms {
            if let Some(vm) = self.vms.get_mut(vm_name) {
                vm.cg = Some(name.into());
            }
        }
        self.next_cg_id += 1;
        let cg = Cg {
            id: self.next_cg_id,
            name: name.into(),
            vms: vms.to_vec(),
            sequencer,
            sequencer_epoch: 1,
            seq_start: 0,
            replicas: Vec::new(),
            snapshots: Vec::new(),
        };
        self.cgs.insert(cg.name.clone(), cg.clone());
        Ok(Outcome::Cg(cg))
    }

    pub(crate) fn delete_cg(&mut self, name: &str) -> Result<Outcome, ModelError> {
        if let Some(m) = self
            .migrations
            .values()
            .find(|m| m.cg == name && m.decision.is_none())
        {
            return Err(ModelError::InUse(format!(
                "group '{name}' has migration {} running: wait for it to end or abort it (`convoy migrate abort {}`)",
                m.id, m.id
            )));
        }
        let cg = self.cgs.get(name).ok_or_else(|| not_found("cg", name))?;
        if let Some(vm) = cg
            .vms
            .iter()
            .filter_map(|v| self.vms.get(v))
            .find(|v| v.host != cg.sequencer)
        {
            return Err(ModelError::InUse(format!(
                "VM '{}' of group '{name}' runs on node {}, away from the group's sequencer (node {}): its disks exist there only as the group's copy; move it back first (`convoy vm move {} --to {}`)",
                vm.name, vm.host, cg.sequencer, vm.name, cg.sequencer
            )));
        }
        let cg = self.cgs.remove(name).ok_or_else(|| not_found("cg", name))?;
        for vm_name in &cg.vms {
            if let Some(vm) = self.vms.get_mut(vm_name) {
                vm.cg = None;
            }
        }
        Ok(Outcome::Done)
    }

    pub(crate) fn bump_epoch(&mut self, cg: &str) -> Result<Outcome, ModelError> {
        let group = self.cgs.get(cg).ok_or_else(|| not_found("cg", cg))?.clone();
        let next = self.cg_max_disk_epoch(&group) + 1;
        for disk in self.cg_disks(&group) {
            if let Some(d) = self.disks.get_mut(&disk.id) {
                d.epoch = next;
            }
        }
        let group = self.cg_mut(cg)?;
        group.sequencer_epoch += 1;
        Ok(Outcome::Cg(group.clone()))
    }

    pub(crate) fn add_replica(
        &mut self,
        cg: &str,
        to: crate::NodeId,
        mode: ReplicationMode,
    ) -> Result<Outcome, ModelError> {
        if !self.is_active_host(to) {
            return Err(not_found("host", to));
        }
        let group = self.cg_mut(cg)?;
        if group.sequencer == to {
            return Err(invalid(
                "replica host",
                format!("node {to} is the primary (sequencer) of '{cg}'; pick another host"),
            ));
        }
        if group.link(to).is_some() {
            return Err(ModelError::Exists {
                kind: "replica".into(),
                name: format!("{cg} on node {to}"),
            });
        }
        if let Some(other) = group.replicas.first() {
            if other.mode != mode {
                return Err(invalid(
                    "replication mode",
                    format!(
                        "the group's other copies are {}: every copy of a group has one mode (change it with `convoy cg set-mode {cg} MODE`)",
                        other.mode.as_str()
                    ),
                ));
            }
        }
        group.replicas.push(ReplicationLink {
            to,
            mode,
            state: LinkState::Syncing,
        });
        Ok(Outcome::Cg(group.clone()))
    }

    pub(crate) fn remove_replica(&mut self, cg: &str, to: NodeId) -> Result<Outcome, ModelError> {
        if let Some(vm) = self
            .cgs
            .get(cg)
            .into_iter()
            .flat_map(|c| c.vms.iter())
            .filter_map(|v| self.vms.get(v))
            .find(|v| v.host == to)
        {
            return Err(ModelError::InUse(format!(
                "VM '{}' runs on node {to} and writes through its copy: move it first (`convoy vm move {} --to HOST`)",
                vm.name, vm.name
            )));
        }
        let group = self.cg_mut(cg)?;
        let before = group.replicas.len();
        group.replicas.retain(|r| r.to != to);
        if group.replicas.len() == before {
            return Err(not_found("replica", format!("{cg} on node {to}")));
        }
        Ok(Outcome::Cg(group.clone()))
    }

    pub(crate) fn set_mode(
        &mut self,
        cg: &str,
        mode: ReplicationMode,
    ) -> Result<Outcome, ModelError> {
        let group = self.cg_mut(cg)?;
        if group.replicas.is_empty() {
            return Err(invalid(
                "replication mode",
                format!(
                    "'{cg}' has no replica: add one with `convoy cg replicate {cg} --to HOST --mode MODE`"
                ),
            ));
        }
        for link in &mut group.replicas {
            link.mode = mode;
        }
        Ok(Outcome::Cg(group.clone()))
    }

    pub(crate) fn set_link_state(
        &mut self,
        cg: &str,
        to: NodeId,
        state: LinkState,
        expect: Option<LinkState>,
    ) -> Result<Outcome, ModelError> {
        let group = self.cg_mut(cg)?;
        let link = group
            .replicas
            .iter_mut()
            .find(|r| r.to == to)
            .ok_or_else(|| not_found("replica", format!("{cg} on node {to}")))?;
        if let Some(expected) = expect {
            if link.state != expected {
                return Err(stale(format!(
                    "the copy of '{cg}' on node {to} is {} now, not {}",
                    link.state.as_str(),
                    expected.as_str()
                )));
            }
        }
        link.state = state;
        Ok(Outcome::Cg(group.clone()))
    }

    pub(crate) fn report_link_state(
        &mut self,
        cg: &str,
        from: NodeId,
        sequencer_epoch: u64,
        to: NodeId,
        state: LinkState,
        expect: Option<LinkState>,
    ) -> Result<Outcome, ModelError> {
        let group = self.cg_mut(cg)?;
        if group.sequencer != from || group.sequencer_epoch != sequencer_epoch {
            return Err(stale(format!(
                "node {from} (sequencer epoch {sequencer_epoch}) no longer orders '{cg}': node {} does, in epoch {}",
                group.sequencer, group.sequencer_epoch
            )));
        }
        self.set_link_state(cg, to, state, expect)
    }

    /// [`Self::report_link_state`] for the group `cg` that has id `cg_id`: a group
    /// deleted and created again under its name has a new id, and a report meant for the
    /// old one is refused.
    pub(crate) fn report_group_link_state(
        &mut self,
        (cg, cg_id): (&str, u64),
        from: NodeId,
        sequencer_epoch: u64,
        to: NodeId,
        state: LinkState,
        expect: Option<LinkState>,
    ) -> Result<Outcome, ModelError> {
        let id = self.cg_mut(cg)?.id;
        if id != cg_id {
            return Err(stale(format!(
                "group '{cg}' with id {cg_id} was deleted; the group of that name now has id {id}"
            )));
        }
        self.report_link_state(cg, from, sequencer_epoch, to, state, expect)
    }

    pub(crate) fn set_sequencer(
        &mut self,
        cg: &str,
        to: NodeId,
        continue_at: u64,
        expect_sequencer: NodeId,
        old_link_mode: Option<ReplicationMode>,
    ) -> Result<Outcome, ModelError> {
        if !self.is_active_host(to) {
            return Err(not_found("host", to));
        }
        let group = self.cg_mut(cg)?;
        if group.sequencer != expect_sequencer {
            return Err(stale(format!(
                "node {} orders '{cg}' now, not node {expect_sequencer}",
                group.sequencer
            )));
        }
        if to == group.sequencer {
            return Err(invalid(
                "new sequencer",
                format!("node {to} already orders '{cg}'"),
            ));
        }
        match group.link(to) {
            None => {
                return Err(invalid(
                    "new sequencer",
                    format!(
                        "node {to} holds no copy of '{cg}': replicate it there first (`convoy cg replicate {cg} --to {to} --mode sync`)"
                    ),
                ));
            }
            Some(l) if l.state != LinkState::Consistent => {
                return Err(invalid(
                    "new sequencer",
                    format!(
                        "node {to}'s copy of '{cg}' is {}: only a consistent copy can take over",
                        l.state.as_str()
                    ),
                ));
            }
            Some(_) => {}
        }
        if continue_at == 0 {
            return Err(invalid("sequence", "continue_at must be at least 1"));
        }
        let old = group.sequencer;
        group.replicas.retain(|l| l.to != to);
        if let Some(mode) = old_link_mode {
            group.replicas.push(ReplicationLink {
                to: old,
                mode,
                state: LinkState::Consistent,
            });
        }
        group.sequencer = to;
        group.sequencer_epoch += 1;
        group.seq_start = continue_at;
        Ok(Outcome::Cg(group.clone()))
    }

    pub(crate) fn create_snapshot(
        &mut self,
        cg: &str,
        name: &str,
        created_at_ms: u64,
    ) -> Result<Outcome, ModelError> {
        validate_name("snapshot name", name)?;
        let group = self.cg_mut(cg)?;
        if group.snapshots.iter().any(|s| s.name == name) {
            return Err(ModelError::Exists {
                kind: "snapshot".into(),
                name: format!("{cg}/{name}"),
            });
        }
        group.snapshots.push(CgSnapshot {
            name: name.into(),
            host: group.sequencer,
            created_at_ms,
        });
        Ok(Outcome::Cg(group.clone()))
    }

    pub(crate) fn delete_snapshot(&mut self, cg: &str, name: &str) -> Result<Outcome, ModelError> {
        let group = self.cg_mut(cg)?;
        let before = group.snapshots.len();
        group.snapshots.retain(|s| s.name != name);
        if group.snapshots.len() == before {
            return Err(not_found("snapshot", format!("{cg}/{name}")));
        }
        Ok(Outcome::Cg(group.clone()))
    }
}
