//! Virtual machines and their disks: where a VM runs, and each disk's fencing epoch.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, invalid, not_found, stale};
use crate::{ClusterModel, DiskId, NodeId, Outcome, validate_name};

/// Smallest disk the model accepts.
pub const MIN_DISK_SIZE: u64 = 1 << 20;
/// Largest disk the model accepts (16 TiB).
pub const MAX_DISK_SIZE: u64 = 16 << 40;
/// Disk sizes must be a multiple of this, so NBD clients with 4 KiB blocks see whole blocks.
pub const DISK_SIZE_ALIGN: u64 = 4096;
/// Most disks one VM may have.
pub const MAX_DISKS_PER_VM: usize = 16;
/// Most guest memory a QEMU VM may have, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most virtual CPUs a QEMU VM may have.
pub const MAX_CPUS: u32 = 256;

/// Which QEMU accelerator runs a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accel {
    /// KVM where the host's KVM works (probed), TCG otherwise.
    #[default]
    Auto,
    /// KVM only: the VM does not start where KVM does not work.
    Kvm,
    /// TCG (software emulation), everywhere.
    Tcg,
}

impl Accel {
    /// The name the CLI and API use.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parses `auto`, `kvm` or `tcg`.
    pub fn parse(s: &str) -> Result<Accel, ModelError> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(invalid("accel", format!("'{other}': use auto, kvm or tcg"))),
        }
    }
}

/// How QEMU runs a VM. Part of the model, so whichever host the VM runs on can start it
/// the same way; paths name files on that host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuSpec {
    /// Guest memory in MiB (1 ..= [`MAX_MEMORY_MIB`]).
    pub memory_mib: u64,
    /// Virtual CPUs (1 ..= [`MAX_CPUS`]).
    pub cpus: u32,
    /// Kernel for direct boot (`-kernel`); without it the guest boots from its first disk.
    pub kernel: Option<String>,
    /// Initial ramdisk (`-initrd`); only with a kernel.
    pub initrd: Option<String>,
    /// Kernel command line (`-append`); only with a kernel.
    pub append: Option<String>,
    /// Accelerator.
    pub accel: Accel,
}

impl QemuSpec {
    /// Checks the numbers and that initrd and append come with a kernel. (Whether the
    /// files exist is checked where they are read: the API node and the VM's host.)
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(1..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(
                "memory",
                format!(
                    "{} MiB: a QEMU VM needs 1 MiB to {MAX_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            ));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(invalid(
                "cpus",
                format!("{}: a QEMU VM needs 1 to {MAX_CPUS} CPUs", self.cpus),
            ));
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.append.is_some()) {
            return Err(invalid(
                "kernel",
                "--initrd and --append need --kernel (they are passed to a directly booted kernel)",
            ));
        }
        for (what, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(p) = path {
                if !p.starts_with('/') {
                    return Err(invalid(
                        what,
                        format!("'{p}' must be an absolute path (the VM's host opens it)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A virtual machine. It runs on exactly one host at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// Model-assigned id.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// The host the VM runs on now; its writes enter the data path there.
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
    /// Every host the VM has run on, one entry per stay, in order; the last is `host`.
    /// A stay's index numbers the guest's write-log segment kept on that host.
    pub stays: Vec<NodeId>,
    /// How QEMU runs the VM, when it is a QEMU guest (schema 4); `running` then means its
    /// host keeps a QEMU process for it. (Boxed: most VMs have none, and a `Vm` travels
    /// inside every command result.)
    pub qemu: Option<Box<QemuSpec>>,
}

impl Vm {
    /// Index of the current stay (0 until the VM first moves).
    pub fn stay(&self) -> u64 {
        self.stays.len().saturating_sub(1) as u64
    }
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
    /// Fencing epoch: a write carrying an older epoch is refused. Bumped for this disk
    /// alone when its VM moves or is fenced, so other VMs of its group keep writing.
    pub epoch: u64,
}

impl ClusterModel {
    /// The disks of a VM, in order.
    pub fn vm_disks(&self, vm: &Vm) -> Vec<Disk> {
        vm.disks
            .iter()
            .filter_map(|id| self.disks.get(id).cloned())
            .collect()
    }

    /// The VM a disk belongs to.
    pub fn disk_vm(&self, disk: DiskId) -> Option<&Vm> {
        self.disks.get(&disk).and_then(|d| self.vms.get(&d.vm))
    }

    pub(crate) fn create_vm(
        &mut self,
        name: &str,
        host: NodeId,
        disk_sizes: &[u64],
        workload: Option<String>,
        qemu: Option<QemuSpec>,
        created_at_ms: u64,
    ) -> Result<Outcome, ModelError> {
        validate_name("VM name", name)?;
        if let Some(spec) = &qemu {
            spec.validate()?;
        }
        if self.vms.contains_key(name) {
            return Err(ModelError::Exists {
                kind: "vm".into(),
                name: name.into(),
            });
        }
        if !self.is_active_host(host) {
            return Err(not_found("host", host));
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
            stays: vec![host],
            qemu: qemu.map(Box::new),
        };
        self.vms.insert(vm.name.clone(), vm.clone());
        Ok(Outcome::Vm(vm, disks))
    }

    pub(crate) fn delete_vm(&mut self, name: &str) -> Result<Outcome, ModelError> {
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

    pub(crate) fn set_vm_running(
        &mut self,
        name: &str,
        running: bool,
    ) -> Result<Outcome, ModelError> {
        let vm = self
            .vms
            .get_mut(name)
            .ok_or_else(|| not_found("vm", name))?;
        if running && vm.workload.is_none() && vm.qemu.is_none() {
            return Err(invalid(
                "vm start",
                format!(
                    "VM '{name}' has neither --workload nor --driver qemu; Convoy starts only simulated and QEMU guests"
                ),
            ));
        }
        vm.running = running;
        let vm = vm.clone();
        let disks = self.vm_disks(&vm);
        Ok(Outcome::Vm(vm, disks))
    }

    /// Bumps the epoch of each of `vm`'s disks: writers that opened them before are refused.
    fn fence_disks(&mut self, vm: &Vm) {
        for id in &vm.disks {
            if let Some(d) = self.disks.get_mut(id) {
                d.epoch += 1;
            }
        }
    }

    pub(crate) fn fence_vm(&mut self, name: &str) -> Result<Outcome, ModelError> {
        let vm = self
            .vms
            .get(name)
            .ok_or_else(|| not_found("vm", name))?
            .clone();
        self.fence_disks(&vm);
        let disks = self.vm_disks(&vm);
        Ok(Outcome::Vm(vm, disks))
    }

    /// Where `vm` may run: a host that holds a copy of its data that follows the group's
    /// order (the group's sequencer, or a replica whose copy is a consistent prefix).
    pub fn move_target_problem(&self, vm: &Vm, to: NodeId) -> Option<String> {
        let Some(cg_name) = &vm.cg else {
            return Some(format!(
                "VM '{}' is in no consistency group, so its disks exist only on node {}: put it in a group and replicate the group to node {to} first (`convoy cg create`, `convoy cg replicate`)",
                vm.name, vm.host
            ));
        };
        let cg = self.cgs.get(cg_name)?;
        if cg.sequencer == to {
            return None;
        }
        match cg.replicas.iter().find(|l| l.to == to) {
            None => Some(format!(
                "node {to} holds no copy of group '{cg_name}': replicate it there first (`convoy cg replicate {cg_name} --to {to}`)"
            )),
            Some(l) if l.state != crate::LinkState::Consistent => Some(format!(
                "node {to}'s copy of group '{cg_name}' is {} and cannot take the VM yet: wait until `convoy cg show {cg_name}` says consistent",
                l.state.as_str()
            )),
            Some(_) => None,
        }
    }

    pub(crate) fn move_vm(
        &mut self,
        name: &str,
        to: NodeId,
        expect_host: Option<NodeId>,
    ) -> Result<Outcome, ModelError> {
        let vm = self
            .vms
            .get(name)
            .ok_or_else(|| not_found("vm", name))?
            .clone();
        if !self.is_active_host(to) {
            return Err(not_found("host", to));
        }
        if let Some(expected) = expect_host {
            if vm.host != expected {
                return Err(stale(format!(
                    "VM '{name}' runs on node {} now, not node {expected}",
                    vm.host
                )));
            }
        }
        if vm.host == to {
            return Err(invalid(
                "destination",
                format!("VM '{name}' already runs on node {to}"),
            ));
        }
        if let Some(problem) = self.move_target_problem(&vm, to) {
            return Err(invalid("destination", problem));
        }
        self.fence_disks(&vm);
        let moved = {
            let Some(v) = self.vms.get_mut(name) else {
                return Err(not_found("vm", name));
            };
            v.host = to;
            v.stays.push(to);
            v.clone()
        };
        let disks = self.vm_disks(&moved);
        Ok(Outcome::Vm(moved, disks))
    }
}
