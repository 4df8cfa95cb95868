//! Hosts: one agent each, registered before they join the Raft membership.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, invalid, not_found};
use crate::{ClusterModel, NodeId, Outcome};

/// A host known to the cluster. Registered before it joins Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Node id, also the identity in the host's certificate.
    pub id: NodeId,
    /// QUIC address other agents dial.
    pub raft_addr: String,
    /// Admin API address (HTTPS).
    pub admin_addr: String,
    /// A removed host keeps its record so its id is never handed out again, and its
    /// certificate opens nothing.
    pub retired: bool,
}

impl ClusterModel {
    /// Active (not retired) hosts.
    pub fn active_hosts(&self) -> impl Iterator<Item = &HostRecord> {
        self.hosts.values().filter(|h| !h.retired)
    }

    /// Whether `id` is a registered host that was not retired.
    pub fn is_active_host(&self, id: NodeId) -> bool {
        self.hosts.get(&id).is_some_and(|h| !h.retired)
    }

    pub(crate) fn register_host(
        &mut self,
        id: NodeId,
        raft_addr: &str,
        admin_addr: &str,
    ) -> Result<Outcome, ModelError> {
        if id == 0 {
            return Err(invalid("node id", "0 is reserved; node ids start at 1"));
        }
        let record = HostRecord {
            id,
            raft_addr: raft_addr.into(),
            admin_addr: admin_addr.into(),
            retired: false,
        };
        match self.hosts.get(&id) {
            Some(h) if h.retired => Err(ModelError::HostRetired(id)),
            Some(h) if *h != record => Err(ModelError::HostConflict(id)),
            _ => {
                self.hosts.insert(id, record.clone());
                Ok(Outcome::Host(record))
            }
        }
    }

    pub(crate) fn retire_host(&mut self, id: NodeId) -> Result<Outcome, ModelError> {
        if let Some(vm) = self.vms.values().find(|vm| vm.host == id) {
            return Err(ModelError::InUse(format!(
                "node {id} still hosts VM '{}': move or delete its VMs first",
                vm.name
            )));
        }
        if let Some(cg) = self.cgs.values().find(|c| c.sequencer == id) {
            return Err(ModelError::InUse(format!(
                "node {id} orders the writes of group '{}': hand it over first (`convoy cg switch-primary {} --to HOST`)",
                cg.name, cg.name
            )));
        }
        if let Some(cg) = self
            .cgs
            .values()
            .find(|c| c.replicas.iter().any(|r| r.to == id))
        {
            return Err(ModelError::InUse(format!(
                "node {id} holds a replica of group '{}': remove it first (`convoy cg unreplicate {} --from {id}`)",
                cg.name, cg.name
            )));
        }
        if let Some(m) = self
            .migrations
            .values()
            .find(|m| m.decision.is_none() && (m.from == id || m.to == id))
        {
            return Err(ModelError::InUse(format!(
                "node {id} takes part in migration {} of group '{}': wait for it to end or abort it",
                m.id, m.cg
            )));
        }
        let host = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| not_found("host", id))?;
        host.retired = true;
        Ok(Outcome::Host(host.clone()))
    }
}
