//! The replicated cluster model: hosts, VMs, disks, consistency groups, replication links
//! and migrations, changed only by [`Command`]s committed through Raft.
//!
//! Everything here is pure and deterministic: [`ClusterModel::apply`] must give the same
//! result on every node for the same command sequence, so it never reads clocks, random
//! numbers or the environment. Validation happens here (not in the API layer) so that two
//! racing requests are ordered by the log and exactly one of them wins.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

/// A host's Raft node id. Ids are never reused, even after a node is removed.
pub type NodeId = u64;
/// Cluster-wide disk id, assigned by the model.
pub type DiskId = u64;

/// Smallest disk the model accepts.
pub const MIN_DISK_SIZE: u64 = 1 << 20;
/// Largest disk the model accepts (16 TiB).
pub const MAX_DISK_SIZE: u64 = 16 << 40;
/// Disk sizes must be a multiple of this, so NBD clients with 4 KiB blocks see whole blocks.
pub const DISK_SIZE_ALIGN: u64 = 4096;
/// Most disks one VM may have.
pub const MAX_DISKS_PER_VM: usize = 16;
/// How many request ids the model remembers for retry de-duplication.
pub const DEDUP_WINDOW: usize = 16384;

/// A host known to the cluster. Registered before it joins the Raft membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Node id, also the identity in the host's certificate.
    pub id: NodeId,
    /// QUIC address other agents dial.
    pub raft_addr: String,
    /// Admin API address (HTTPS).
    pub admin_addr: String,
    /// A removed host keeps its record so its id is never handed out again.
    pub retired: bool,
}

/// A virtual machine. It runs on exactly one host at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// Model-assigned id.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// The host the VM runs on (and where its disks are created).
    pub host: NodeId,
    /// The VM's disks, in attachment order.
    pub disks: Vec<DiskId>,
    /// Synthetic-guest workload spec, when the VM is simulated.
    pub workload: Option<String>,
    /// The consistency group the VM belongs to, if any.
    pub cg: Option<String>,
    /// Whether the (simulated) guest is running.
    pub running: bool,
    /// Proposer's wall clock at creation, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// A virtual disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Model-assigned id; also names the image file and NBD export.
    pub id: DiskId,
    /// Owning VM.
    pub vm: String,
    /// Position among the VM's disks.
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Fencing epoch: a write carrying an older epoch is refused.
    pub epoch: u64,
}

/// How the copies of a consistency group are kept in sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// What a replica copy is good for right now, as reported by the primary's agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkState {
    /// Being filled for the first time; not usable.
    Syncing,
    /// A crash-consistent prefix of the group's history (async), or identical (sync).
    Consistent,
    /// Dirty-chunk resync running; the replica kept a snapshot of its last consistent
    /// state, which is the usable copy until the resync ends.
    Inconsistent,
    /// The primary acknowledged writes this copy does not have (it was unreachable in
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

/// A crash-consistent point across all disks of a group, kept on the primary.
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
    /// Model-assigned id.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// Member VMs.
    pub vms: Vec<String>,
    /// Host whose copy takes guest writes.
    pub primary: NodeId,
    /// Host whose order defines the group's history (normally the primary).
    pub sequencer: NodeId,
    /// Copies on other hosts.
    pub replicas: Vec<ReplicationLink>,
    /// Snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<CgSnapshot>,
}

/// A migration of a consistency group. Filled in by the migration engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Model-assigned id.
    pub id: u64,
    /// The group being moved.
    pub cg: String,
    /// Source host.
    pub from: NodeId,
    /// Destination host.
    pub to: NodeId,
}

/// A change to the cluster model. Encoded in the Raft log through `convoy-codec`; new
/// variants go at the end so older logs still decode.
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
    /// Create a consistency group of VMs that all run on one host.
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
    /// Record what a replica copy is good for (reported by the primary's agent).
    SetLinkState {
        /// The group.
        cg: String,
        /// Host of the copy.
        to: NodeId,
        /// New state.
        state: LinkState,
    },
    /// Start or stop a VM's (simulated) guest.
    SetVmRunning {
        /// The VM.
        name: String,
        /// Running or not.
        running: bool,
    },
    /// Record a group snapshot taken on the primary.
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
    /// Fence every disk of a group: all get epoch = old maximum + 1, so writes and data
    /// messages carrying an older epoch are refused.
    BumpEpoch {
        /// The group.
        cg: String,
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
    /// The VM created, with its disks.
    Vm(Vm, Vec<Disk>),
    /// The consistency group created.
    Cg(Cg),
}

/// Why the model refused a command. Messages name the thing and the next step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ModelError {
    /// A name or value is malformed.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// Which input.
        what: String,
        /// What is wrong and what is allowed.
        why: String,
    },
    /// The named object already exists.
    #[error("{kind} '{name}' already exists: pick another name or delete it first")]
    Exists {
        /// Object kind.
        kind: String,
        /// Its name.
        name: String,
    },
    /// The named object does not exist.
    #[error("{kind} '{name}' not found: list them with `convoy {kind} list`")]
    NotFound {
        /// Object kind (`vm`, `cg`, `host`).
        kind: String,
        /// Its name or id.
        name: String,
    },
    /// A host id was used before and retired.
    #[error("node id {0} was used by a removed node; ids are never reused: choose a new id")]
    HostRetired(NodeId),
    /// A host id is registered with different addresses.
    #[error(
        "node id {0} is already registered with other addresses; remove it first or choose a new id"
    )]
    HostConflict(NodeId),
    /// The object is still in use.
    #[error("{0}")]
    InUse(String),
}

fn invalid(what: &str, why: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        what: what.into(),
        why: why.into(),
    }
}

fn not_found(kind: &str, name: impl ToString) -> ModelError {
    ModelError::NotFound {
        kind: kind.into(),
        name: name.to_string(),
    }
}

/// Names of VMs and groups: 1–63 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn validate_name(what: &str, name: &str) -> Result<(), ModelError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 63 {
        return Err(invalid(
            what,
            format!("'{name}' must be 1 to 63 characters"),
        ));
    }
    if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid(
            what,
            format!(
                "'{name}' may only use letters, digits, '.', '_' and '-', starting with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// The whole replicated model. Cheap enough to clone for a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterModel {
    /// Every host ever registered, by id.
    pub hosts: BTreeMap<NodeId, HostRecord>,
    /// VMs by name.
    pub vms: BTreeMap<String, Vm>,
    /// Disks by id.
    pub disks: BTreeMap<DiskId, Disk>,
    /// Consistency groups by name.
    pub cgs: BTreeMap<String, Cg>,
    /// Migrations by id (filled by the migration engine).
    pub migrations: BTreeMap<u64, Migration>,
    next_vm_id: u64,
    next_disk_id: u64,
    next_cg_id: u64,
    dedup: Dedup,
}

/// Remembers the responses to the last [`DEDUP_WINDOW`] client request ids, so a client
/// that retries after losing a response gets the original answer instead of applying twice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Dedup {
    order: VecDeque<u128>,
    answers: HashMap<u128, Result<Outcome, ModelError>>,
}

impl Dedup {
    fn get(&self, id: u128) -> Option<&Result<Outcome, ModelError>> {
        self.answers.get(&id)
    }

    fn remember(&mut self, id: u128, answer: Result<Outcome, ModelError>) {
        if self.answers.insert(id, answer).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > DEDUP_WINDOW {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }
}

impl ClusterModel {
    /// Applies one command. `request_id` (non-zero) makes retries idempotent: a repeated id
    /// returns the first answer without applying again.
    pub fn apply(&mut self, request_id: u128, cmd: &Command) -> Result<Outcome, ModelError> {
        if request_id != 0 {
            if let Some(answer) = self.dedup.get(request_id) {
                return answer.clone();
            }
        }
        let answer = self.apply_command(cmd);
        if request_id != 0 {
            self.dedup.remember(request_id, answer.clone());
        }
        answer
    }

    fn apply_command(&mut self, cmd: &Command) -> Result<Outcome, ModelError> {
        match cmd {
            Command::RegisterHost {
                id,
                raft_addr,
                admin_addr,
            } => self.register_host(*id, raft_addr, admin_addr),
            Command::RetireHost { id } => self.retire_host(*id),
            Command::CreateVm {
                name,
                host,
                disk_sizes,
                workload,
                created_at_ms,
            } => self.create_vm(name, *host, disk_sizes, workload.clone(), *created_at_ms),
            Command::DeleteVm { name } => self.delete_vm(name),
            Command::CreateCg { name, vms } => self.create_cg(name, vms),
            Command::DeleteCg { name } => self.delete_cg(name),
            Command::AddReplica { cg, to, mode } => self.add_replica(cg, *to, *mode),
            Command::RemoveReplica { cg, to } => self.remove_replica(cg, *to),
            Command::SetMode { cg, mode } => self.set_mode(cg, *mode),
            Command::SetLinkState { cg, to, state } => self.set_link_state(cg, *to, *state),
            Command::SetVmRunning { name, running } => self.set_vm_running(name, *running),
            Command::CreateSnapshot {
                cg,
                name,
                created_at_ms,
            } => self.create_snapshot(cg, name, *created_at_ms),
            Command::DeleteSnapshot { cg, name } => self.delete_snapshot(cg, name),
            Command::BumpEpoch { cg } => self.bump_epoch(cg),
        }
    }

    /// A copy of the model without the request de-duplication table: what the data plane
    /// reconciles against, cheap enough to take on every change.
    pub fn topology(&self) -> ClusterModel {
        ClusterModel {
            hosts: self.hosts.clone(),
            vms: self.vms.clone(),
            disks: self.disks.clone(),
            cgs: self.cgs.clone(),
            migrations: self.migrations.clone(),
            next_vm_id: self.next_vm_id,
            next_disk_id: self.next_disk_id,
            next_cg_id: self.next_cg_id,
            dedup: Dedup::default(),
        }
    }

    /// Whether the model has handed out disk id `id` (ids are never reused). A disk with
    /// an issued id that the model does not list was deleted; one with an id not issued
    /// yet is newer than this model (a lagging replica of it).
    pub fn disk_id_issued(&self, id: DiskId) -> bool {
        (1..=self.next_disk_id).contains(&id)
    }

    /// Whether the model has handed out group id `id` (ids are never reused).
    pub fn cg_id_issued(&self, id: u64) -> bool {
        (1..=self.next_cg_id).contains(&id)
    }

    /// Active (not retired) hosts.
    pub fn active_hosts(&self) -> impl Iterator<Item = &HostRecord> {
        self.hosts.values().filter(|h| !h.retired)
    }

    /// The disks of a VM, in order.
    pub fn vm_disks(&self, vm: &Vm) -> Vec<Disk> {
        vm.disks
            .iter()
            .filter_map(|id| self.disks.get(id).cloned())
            .collect()
    }

    fn register_host(
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

    fn retire_host(&mut self, id: NodeId) -> Result<Outcome, ModelError> {
        if let Some(vm) = self.vms.values().find(|vm| vm.host == id) {
            return Err(ModelError::InUse(format!(
                "node {id} still hosts VM '{}': move or delete its VMs first",
                vm.name
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
        let host = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| not_found("host", id))?;
        host.retired = true;
        Ok(Outcome::Host(host.clone()))
    }

    fn create_vm(
        &mut self,
        name: &str,
        host: NodeId,
        disk_sizes: &[u64],
        workload: Option<String>,
        created_at_ms: u64,
    ) -> Result<Outcome, ModelError> {
        validate_name("VM name", name)?;
        if self.vms.contains_key(name) {
            return Err(ModelError::Exists {
                kind: "vm".into(),
                name: name.into(),
            });
        }
        match self.hosts.get(&host) {
            Some(h) if !h.retired => {}
            _ => return Err(not_found("host", host)),
        }
        if disk_sizes.is_empty() || disk_sizes.len() > MAX_DISKS_PER_VM {
            return Err(invalid(
                "disks",
                format!("a VM needs 1 to {MAX_DISKS_PER_VM} disks"),
            ));
        }
        for &size in disk_sizes {
            if !(MIN_DISK_SIZE..=MAX_DISK_SIZE).contains(&size) || size % DISK_SIZE_ALIGN != 0 {
                return Err(invalid(
                    "disk size",
                    format!("{size} bytes: sizes must be 1 MiB to 16 TiB and a multiple of 4 KiB"),
                ));
            }
        }
        self.next_vm_id += 1;
        let mut disks = Vec::with_capacity(disk_sizes.len());
        for (index, &size) in disk_sizes.iter().enumerate() {
            self.next_disk_id += 1;
            let disk = Disk {
                id: self.next_disk_id,
                vm: name.into(),
                index: index as u32,
                size,
                epoch: 1,
            };
            self.disks.insert(disk.id, disk.clone());
            disks.push(disk);
        }
        let vm = Vm {
            id: self.next_vm_id,
            name: name.into(),
            host,
            disks: disks.iter().map(|d| d.id).collect(),
            workload,
            cg: None,
            running: false,
            created_at_ms,
        };
        self.vms.insert(vm.name.clone(), vm.clone());
        Ok(Outcome::Vm(vm, disks))
    }

    fn delete_vm(&mut self, name: &str) -> Result<Outcome, ModelError> {
        let vm = self.vms.get(name).ok_or_else(|| not_found("vm", name))?;
        if let Some(cg) = &vm.cg {
            return Err(ModelError::InUse(format!(
                "VM '{name}' is in consistency group '{cg}': delete the group first (`convoy cg delete {cg}`)"
            )));
        }
        if let Some(vm) = self.vms.remove(name) {
            for id in &vm.disks {
                self.disks.remove(id);
            }
        }
        Ok(Outcome::Done)
    }

    fn create_cg(&mut self, name: &str, vms: &[String]) -> Result<Outcome, ModelError> {
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
        let primary = host.unwrap_or_default();
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
            primary,
            sequencer: primary,
            replicas: Vec::new(),
            snapshots: Vec::new(),
        };
        self.cgs.insert(cg.name.clone(), cg.clone());
        Ok(Outcome::Cg(cg))
    }

    fn delete_cg(&mut self, name: &str) -> Result<Outcome, ModelError> {
        if self.migrations.values().any(|m| m.cg == name) {
            return Err(ModelError::InUse(format!(
                "group '{name}' has a migration: wait for it to end"
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

    /// The disks of a group's VMs, in VM then attachment order.
    pub fn cg_disks(&self, cg: &Cg) -> Vec<Disk> {
        cg.vms
            .iter()
            .filter_map(|v| self.vms.get(v))
            .flat_map(|vm| self.vm_disks(vm))
            .collect()
    }

    /// A group's fencing epoch: the highest epoch of its disks.
    pub fn cg_epoch(&self, cg: &Cg) -> u64 {
        self.cg_disks(cg).iter().map(|d| d.epoch).max().unwrap_or(1)
    }

    fn bump_epoch(&mut self, cg: &str) -> Result<Outcome, ModelError> {
        let group = self.cgs.get(cg).ok_or_else(|| not_found("cg", cg))?.clone();
        let next = self.cg_epoch(&group) + 1;
        for disk in self.cg_disks(&group) {
            if let Some(d) = self.disks.get_mut(&disk.id) {
                d.epoch = next;
            }
        }
        Ok(Outcome::Cg(group))
    }

    fn cg_mut(&mut self, cg: &str) -> Result<&mut Cg, ModelError> {
        self.cgs.get_mut(cg).ok_or_else(|| not_found("cg", cg))
    }

    fn add_replica(
        &mut self,
        cg: &str,
        to: NodeId,
        mode: ReplicationMode,
    ) -> Result<Outcome, ModelError> {
        match self.hosts.get(&to) {
            Some(h) if !h.retired => {}
            _ => return Err(not_found("host", to)),
        }
        let group = self.cg_mut(cg)?;
        if group.primary == to {
            return Err(invalid(
                "replica host",
                format!("node {to} is the primary of '{cg}'; pick another host"),
            ));
        }
        if group.replicas.iter().any(|r| r.to == to) {
            return Err(ModelError::Exists {
                kind: "replica".into(),
                name: format!("{cg} on node {to}"),
            });
        }
        if !group.replicas.is_empty() {
            return Err(invalid(
                "replica host",
                format!("'{cg}' already has a replica; one replica per group is supported"),
            ));
        }
        group.replicas.push(ReplicationLink {
            to,
            mode,
            state: LinkState::Syncing,
        });
        Ok(Outcome::Cg(group.clone()))
    }

    fn remove_replica(&mut self, cg: &str, to: NodeId) -> Result<Outcome, ModelError> {
        let group = self.cg_mut(cg)?;
        let before = group.replicas.len();
        group.replicas.retain(|r| r.to != to);
        if group.replicas.len() == before {
            return Err(not_found("replica", format!("{cg} on node {to}")));
        }
        Ok(Outcome::Cg(group.clone()))
    }

    fn set_mode(&mut self, cg: &str, mode: ReplicationMode) -> Result<Outcome, ModelError> {
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

    fn set_link_state(
        &mut self,
        cg: &str,
        to: NodeId,
        state: LinkState,
    ) -> Result<Outcome, ModelError> {
        let group = self.cg_mut(cg)?;
        let link = group
            .replicas
            .iter_mut()
            .find(|r| r.to == to)
            .ok_or_else(|| not_found("replica", format!("{cg} on node {to}")))?;
        link.state = state;
        Ok(Outcome::Cg(group.clone()))
    }

    fn set_vm_running(&mut self, name: &str, running: bool) -> Result<Outcome, ModelError> {
        let vm = self
            .vms
            .get_mut(name)
            .ok_or_else(|| not_found("vm", name))?;
        if running && vm.workload.is_none() {
            return Err(invalid(
                "vm start",
                format!(
                    "VM '{name}' has no --workload; only simulated guests are started by Convoy"
                ),
            ));
        }
        vm.running = running;
        let vm = vm.clone();
        let disks = self.vm_disks(&vm);
        Ok(Outcome::Vm(vm, disks))
    }

    fn create_snapshot(
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
            host: group.primary,
            created_at_ms,
        });
        Ok(Outcome::Cg(group.clone()))
    }

    fn delete_snapshot(&mut self, cg: &str, name: &str) -> Result<Outcome, ModelError> {
        let group = self.cg_mut(cg)?;
        let before = group.snapshots.len();
        group.snapshots.retain(|s| s.name != name);
        if group.snapshots.len() == before {
            return Err(not_found("snapshot", format!("{cg}/{name}")));
        }
        Ok(Outcome::Cg(group.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn with_hosts(ids: &[NodeId]) -> ClusterModel {
        let mut m = ClusterModel::default();
        for &id in ids {
            m.apply(
                0,
                &Command::RegisterHost {
                    id,
                    raft_addr: format!("r{id}"),
                    admin_addr: format!("a{id}"),
                },
            )
            .unwrap();
        }
        m
    }

    fn create_vm(name: &str, host: NodeId) -> Command {
        Command::CreateVm {
            name: name.into(),
            host,
            disk_sizes: vec![64 * MIB],
            workload: None,
            created_at_ms: 0,
        }
    }

    #[test]
    fn vm_lifecycle() {
        let mut m = with_hosts(&[1, 2]);
        let Outcome::Vm(vm, disks) = m.apply(0, &create_vm("web", 1)).unwrap() else {
            panic!()
        };
        assert_eq!(vm.host, 1);
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].epoch, 1);
        assert!(matches!(
            m.apply(0, &create_vm("web", 2)),
            Err(ModelError::Exists { .. })
        ));
        m.apply(0, &Command::DeleteVm { name: "web".into() })
            .unwrap();
        assert!(m.vms.is_empty() && m.disks.is_empty());
        assert!(matches!(
            m.apply(0, &Command::DeleteVm { name: "web".into() }),
            Err(ModelError::NotFound { .. })
        ));
    }

    #[test]
    fn issued_ids_tell_deleted_from_not_yet_seen() {
        let mut m = with_hosts(&[1]);
        assert!(!m.disk_id_issued(1), "nothing issued yet");
        let Outcome::Vm(_, disks) = m.apply(0, &create_vm("a", 1)).unwrap() else {
            panic!()
        };
        let id = disks[0].id;
        let lagging = m.clone();
        m.apply(0, &Command::DeleteVm { name: "a".into() }).unwrap();
        m.apply(0, &create_vm("b", 1)).unwrap();
        // Deleted: issued and gone. Newer than a lagging model: not issued there.
        assert!(m.disk_id_issued(id) && !m.disks.contains_key(&id));
        assert!(m.disk_id_issued(id + 1) && !lagging.disk_id_issued(id + 1));
        assert!(!m.disk_id_issued(0) && !m.disk_id_issued(id + 2));
        assert!(!m.cg_id_issued(1));
        m.apply(
            0,
            &Command::CreateCg {
                name: "g".into(),
                vms: vec!["b".into()],
            },
        )
        .unwrap();
        assert!(m.cg_id_issued(1) && !m.cg_id_issued(2));
    }

    #[test]
    fn vm_needs_live_host_and_sane_disks() {
        let mut m = with_hosts(&[1]);
        assert!(matches!(
            m.apply(0, &create_vm("a", 9)),
            Err(ModelError::NotFound { .. })
        ));
        let bad = Command::CreateVm {
            name: "a".into(),
            host: 1,
            disk_sizes: vec![1000],
            workload: None,
            created_at_ms: 0,
        };
        assert!(matches!(m.apply(0, &bad), Err(ModelError::Invalid { .. })));
        let none = Command::CreateVm {
            name: "a".into(),
            host: 1,
            disk_sizes: vec![],
            workload: None,
            created_at_ms: 0,
        };
        assert!(matches!(m.apply(0, &none), Err(ModelError::Invalid { .. })));
        assert!(matches!(
            m.apply(0, &create_vm("bad name", 1)),
            Err(ModelError::Invalid { .. })
        ));
        assert!(matches!(
            m.apply(0, &create_vm("-x", 1)),
            Err(ModelError::Invalid { .. })
        ));
    }

    #[test]
    fn host_ids_are_never_reused() {
        let mut m = with_hosts(&[1, 2]);
        m.apply(0, &Command::RetireHost { id: 2 }).unwrap();
        let again = Command::RegisterHost {
            id: 2,
            raft_addr: "r2".into(),
            admin_addr: "a2".into(),
        };
        assert_eq!(m.apply(0, &again), Err(ModelError::HostRetired(2)));
        let conflict = Command::RegisterHost {
            id: 1,
            raft_addr: "other".into(),
            admin_addr: "a1".into(),
        };
        assert_eq!(m.apply(0, &conflict), Err(ModelError::HostConflict(1)));
        let same = Command::RegisterHost {
            id: 1,
            raft_addr: "r1".into(),
            admin_addr: "a1".into(),
        };
        assert!(
            m.apply(0, &same).is_ok(),
            "re-registering the same record is idempotent"
        );
    }

    #[test]
    fn host_with_vms_cannot_retire() {
        let mut m = with_hosts(&[1]);
        m.apply(0, &create_vm("a", 1)).unwrap();
        assert!(matches!(
            m.apply(0, &Command::RetireHost { id: 1 }),
            Err(ModelError::InUse(_))
        ));
    }

    #[test]
    fn cg_membership_rules() {
        let mut m = with_hosts(&[1, 2]);
        m.apply(0, &create_vm("a", 1)).unwrap();
        m.apply(0, &create_vm("b", 1)).unwrap();
        m.apply(0, &create_vm("c", 2)).unwrap();
        let cg = |name: &str, vms: &[&str]| Command::CreateCg {
            name: name.into(),
            vms: vms.iter().map(|s| s.to_string()).collect(),
        };
        assert!(matches!(
            m.apply(0, &cg("g", &["a", "c"])),
            Err(ModelError::Invalid { .. })
        ));
        assert!(matches!(
            m.apply(0, &cg("g", &["a", "a"])),
            Err(ModelError::Invalid { .. })
        ));
        assert!(matches!(
            m.apply(0, &cg("g", &["zz"])),
            Err(ModelError::NotFound { .. })
        ));
        let Outcome::Cg(g) = m.apply(0, &cg("g", &["a", "b"])).unwrap() else {
            panic!()
        };
        assert_eq!((g.primary, g.sequencer), (1, 1));
        assert!(matches!(
            m.apply(0, &cg("h", &["a"])),
            Err(ModelError::InUse(_))
        ));
        assert!(matches!(
            m.apply(0, &Command::DeleteVm { name: "a".into() }),
            Err(ModelError::InUse(_))
        ));
        m.apply(0, &Command::DeleteCg { name: "g".into() }).unwrap();
        assert_eq!(m.vms["a"].cg, None);
        m.apply(0, &Command::DeleteVm { name: "a".into() }).unwrap();
    }

    #[test]
    fn replica_links_and_modes() {
        let mut m = with_hosts(&[1, 2, 3]);
        m.apply(0, &create_vm("a", 1)).unwrap();
        m.apply(
            0,
            &Command::CreateCg {
                name: "g".into(),
                vms: vec!["a".into()],
            },
        )
        .unwrap();
        let add = |to, mode| Command::AddReplica {
            cg: "g".into(),
            to,
            mode,
        };
        assert!(matches!(
            m.apply(0, &add(1, ReplicationMode::Async)),
            Err(ModelError::Invalid { .. })
        ));
        assert!(matches!(
            m.apply(0, &add(9, ReplicationMode::Async)),
            Err(ModelError::NotFound { .. })
        ));
        m.apply(0, &add(2, ReplicationMode::Async)).unwrap();
        assert_eq!(m.cgs["g"].replicas[0].state, LinkState::Syncing);
        assert!(matches!(
            m.apply(0, &add(2, ReplicationMode::Sync)),
            Err(ModelError::Exists { .. })
        ));
        m.apply(
            0,
            &Command::SetMode {
                cg: "g".into(),
                mode: ReplicationMode::Sync,
            },
        )
        .unwrap();
        assert_eq!(m.cgs["g"].replicas[0].mode, ReplicationMode::Sync);
        let consistent = Command::SetLinkState {
            cg: "g".into(),
            to: 2,
            state: LinkState::Consistent,
        };
        m.apply(0, &consistent).unwrap();
        assert!(matches!(
            m.apply(0, &Command::RetireHost { id: 2 }),
            Err(ModelError::InUse(_))
        ));
        m.apply(
            0,
            &Command::RemoveReplica {
                cg: "g".into(),
                to: 2,
            },
        )
        .unwrap();
        assert!(m.cgs["g"].replicas.is_empty());
        assert!(matches!(
            m.apply(
                0,
                &Command::SetMode {
                    cg: "g".into(),
                    mode: ReplicationMode::Async
                }
            ),
            Err(ModelError::Invalid { .. })
        ));
        for text in ["async", "sync", "active-active-sync", "active-active-async"] {
            assert_eq!(ReplicationMode::parse(text).unwrap().as_str(), text);
        }
        assert!(ReplicationMode::parse("fast").is_err());
    }

    #[test]
    fn snapshots_and_running_flag() {
        let mut m = with_hosts(&[1]);
        m.apply(0, &create_vm("a", 1)).unwrap();
        assert!(matches!(
            m.apply(
                0,
                &Command::SetVmRunning {
                    name: "a".into(),
                    running: true
                }
            ),
            Err(ModelError::Invalid { .. })
        ));
        m.apply(
            0,
            &Command::CreateCg {
                name: "g".into(),
                vms: vec!["a".into()],
            },
        )
        .unwrap();
        let snap = |name: &str| Command::CreateSnapshot {
            cg: "g".into(),
            name: name.into(),
            created_at_ms: 5,
        };
        m.apply(0, &snap("s1")).unwrap();
        assert!(matches!(
            m.apply(0, &snap("s1")),
            Err(ModelError::Exists { .. })
        ));
        assert_eq!(m.cgs["g"].snapshots[0].host, 1);
        m.apply(
            0,
            &Command::DeleteSnapshot {
                cg: "g".into(),
                name: "s1".into(),
            },
        )
        .unwrap();
        assert!(m.cgs["g"].snapshots.is_empty());
        let g = m.cgs["g"].clone();
        assert_eq!(m.cg_epoch(&g), 1);
        m.apply(0, &Command::BumpEpoch { cg: "g".into() }).unwrap();
        assert_eq!(m.cg_epoch(&g), 2);
        assert!(m.cg_disks(&g).iter().all(|d| d.epoch == 2));
    }

    #[test]
    fn retried_request_returns_first_answer() {
        let mut m = with_hosts(&[1]);
        let first = m.apply(42, &create_vm("a", 1)).unwrap();
        assert_eq!(m.apply(42, &create_vm("a", 1)).unwrap(), first);
        assert_eq!(m.vms.len(), 1);
        assert!(matches!(
            m.apply(43, &create_vm("a", 1)),
            Err(ModelError::Exists { .. })
        ));
    }

    #[test]
    fn dedup_window_is_bounded() {
        let mut m = with_hosts(&[1]);
        for i in 1..=(DEDUP_WINDOW as u128 + 10) {
            let _ = m.apply(
                i,
                &Command::DeleteVm {
                    name: "none".into(),
                },
            );
        }
        assert_eq!(m.dedup.order.len(), DEDUP_WINDOW);
        assert_eq!(m.dedup.answers.len(), DEDUP_WINDOW);
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let name = prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(String::from);
        let host = 0u64..4;
        prop_oneof![
            host.clone().prop_map(|id| Command::RegisterHost {
                id,
                raft_addr: format!("r{id}"),
                admin_addr: "x".into()
            }),
            host.clone().prop_map(|id| Command::RetireHost { id }),
            (name.clone(), host).prop_map(|(n, h)| create_vm(&n, h)),
            name.clone().prop_map(|name| Command::DeleteVm { name }),
            (name.clone(), prop::collection::vec(name.clone(), 0..3))
                .prop_map(|(name, vms)| Command::CreateCg { name, vms }),
            name.prop_map(|name| Command::DeleteCg { name }),
        ]
    }

    proptest! {
        /// Replaying the same log gives the same model, and references stay consistent.
        #[test]
        fn apply_is_deterministic_and_consistent(cmds in prop::collection::vec(arb_command(), 0..60)) {
            let mut a = ClusterModel::default();
            let mut b = ClusterModel::default();
            for (i, c) in cmds.iter().enumerate() {
                prop_assert_eq!(a.apply(i as u128 + 1, c), b.apply(i as u128 + 1, c));
            }
            prop_assert_eq!(&a, &b);
            for vm in a.vms.values() {
                prop_assert!(a.hosts.contains_key(&vm.host));
                for d in &vm.disks { prop_assert_eq!(&a.disks[d].vm, &vm.name); }
                if let Some(cg) = &vm.cg { prop_assert!(a.cgs[cg].vms.contains(&vm.name)); }
            }
            for cg in a.cgs.values() {
                for vm in &cg.vms { prop_assert_eq!(a.vms[vm].cg.as_deref(), Some(cg.name.as_str())); }
            }
            let disk_count: usize = a.vms.values().map(|v| v.disks.len()).sum();
            prop_assert_eq!(disk_count, a.disks.len());
        }
    }
}
