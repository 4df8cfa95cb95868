//! Simulated guests on this host, and verification of local copies against their logs.
//!
//! A VM that runs here with a workload gets a [`convoy_guest::Guest`] writing through the
//! same volumes the NBD exports use, so its writes take exactly the NBD path (sequencer or
//! mirror, replication, fencing). Its acknowledged-write log is kept per stay: the stay on
//! this host appends to `<data_dir>/guests/<vm>.log` (the VM's first stay) or
//! `<vm>.<stay>.log`; each stay's write ids start above every earlier stay's, so the
//! segments of all the hosts a VM ran on, read in stay order, are one log.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use convoy_guest::{
    CopyReader, Guest, GuestDisk, GuestHandle, GuestStats, LogRecord, Workload, WriteLog,
};
use convoy_raft::model::{DiskId, GuestPlan, NodeId};
use convoy_store::DiskImage;
use futures::future::BoxFuture;

use super::volume::Volume;
use super::wire::Payload;

/// Write ids of stay `n` start at `n << STAY_ID_SHIFT` (2^40 writes per stay).
pub const STAY_ID_SHIFT: u32 = 40;

/// Adapts a [`Volume`] to the guest's write interface.
struct VolumeDisk(Volume, u64);

impl GuestDisk for VolumeDisk {
    fn size(&self) -> u64 {
        self.1
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            self.0
                .write_seq(offset, Payload::Data(data), false)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            use convoy_nbd::BlockDevice;
            BlockDevice::flush(&self.0).await.map_err(|e| e.to_string())
        })
    }
}

/// A running guest and what it was started with.
struct Running {
    handle: GuestHandle,
    /// Epochs its volumes carry; a fence restarts it with new volumes.
    epochs: Vec<u64>,
    /// Its stay.
    stay: u64,
    /// When it started (for stun measurements).
    started: std::time::Instant,
}

/// The guests of this host.
#[derive(Default)]
pub struct Guests {
    running: HashMap<String, Running>,
    last: HashMap<String, GuestStats>,
    /// Guests stopped for a move (drained): not started here until resumed.
    paused: HashSet<String>,
    /// Guests that arrived here with a migration, waiting for its coordinator's resume.
    held: HashSet<String>,
    /// Guests a migration's coordinator resumed here: not held again.
    released: HashSet<String>,
    /// Why a planned guest could not start (shown by `vm show`).
    failures: HashMap<String, String>,
}

/// Where the log of `vm`'s stay `stay` lives under `data_dir`.
pub fn log_path(data_dir: &Path, vm: &str, stay: u64) -> PathBuf {
    let dir = data_dir.join("guests");
    if stay == 0 {
        dir.join(format!("{vm}.log"))
    } else {
        dir.join(format!("{vm}.{stay}.log"))
    }
}

impl Guests {
    /// Whether `vm`'s guest runs in `stay` with volumes at `epochs`.
    pub fn is_running(&self, vm: &str, stay: u64, epochs: &[u64]) -> bool {
        self.running
            .get(vm)
            .is_some_and(|r| r.stay == stay && r.epochs == epochs)
    }

    /// Names of running guests.
    pub fn names(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    /// Whether `vm` was paused for a move, or is held for a migration's resume.
    pub fn is_paused(&self, vm: &str) -> bool {
        self.paused.contains(vm) || self.held.contains(vm)
    }

    /// Marks `vm` paused for a move (or not).
    pub fn set_paused(&mut self, vm: &str, paused: bool) {
        if paused {
            self.paused.insert(vm.to_string());
        } else {
            self.paused.remove(vm);
        }
    }

    /// Keeps pause marks only for guests still planned here.
    pub fn retain_paused(&mut self, planned: &HashSet<String>) {
        self.paused.retain(|v| planned.contains(v));
        self.held.retain(|v| planned.contains(v));
    }

    /// Holds a guest that arrives here with a migration until the coordinator resumes it
    /// (as a hypervisor keeps an incoming VM paused): its stun is measured from the pause
    /// on the source to that resume.
    fn hold_for_migration(&mut self, vm: &str) {
        if !self.released.contains(vm) && !self.running.contains_key(vm) {
            self.held.insert(vm.to_string());
        }
    }

    /// The coordinator resumed `vm` here.
    fn release(&mut self, vm: &str) {
        self.paused.remove(vm);
        self.held.remove(vm);
        self.released.insert(vm.to_string());
    }

    /// Forgets holds and releases of VMs no longer under migration.
    fn retain_released(&mut self, migrating: &HashSet<String>) {
        self.released.retain(|v| migrating.contains(v));
        self.held.retain(|v| migrating.contains(v));
    }

    /// Starts `plan`'s guest over `volumes` (in disk order).
    pub fn start(
        &mut self,
        data_dir: &Path,
        plan: &GuestPlan,
        volumes: Vec<(Volume, u64)>,
    ) -> anyhow::Result<()> {
        let vm = plan.vm.as_str();
        let result = (|| {
            let mut workload: Workload = plan
                .workload
                .parse()
                .map_err(|e| anyhow::anyhow!("workload of VM '{vm}': {e}"))?;
            if plan.stay > 0 {
                // The fill pass is the VM's first boot; a later stay continues its life.
                workload.fill = None;
            }
            let path = log_path(data_dir, vm, plan.stay);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let log = WriteLog::open_from(&path, plan.vm_id, plan.stay << STAY_ID_SHIFT)?;
            let epochs = volumes.iter().map(|(v, _)| v.epoch()).collect();
            let disks: Vec<Arc<dyn GuestDisk>> = volumes
                .into_iter()
                .map(|(v, size)| Arc::new(VolumeDisk(v, size)) as Arc<dyn GuestDisk>)
                .collect();
            let handle = Guest::start(plan.vm_id, disks, workload, log)?;
            anyhow::Ok(Running {
                handle,
                epochs,
                stay: plan.stay,
                started: std::time::Instant::now(),
            })
        })();
        match result {
            Ok(r) => {
                tracing::info!(vm, stay = plan.stay, "simulated guest started");
                self.failures.remove(vm);
                self.running.insert(vm.to_string(), r);
                Ok(())
            }
            Err(e) => {
                self.failures.insert(vm.to_string(), format!("{e:#}"));
                Err(e)
            }
        }
    }

    /// Stops `vm`'s guest (waits for its writes in flight and syncs its log).
    pub fn take(&mut self, vm: &str) -> Option<GuestHandle> {
        self.running.remove(vm).map(|r| r.handle)
    }

    /// Records the final stats of a stopped guest.
    pub fn stopped(&mut self, vm: &str, stats: GuestStats) {
        self.last.insert(vm.to_string(), stats);
    }

    /// Current (or last) stats of `vm`'s guest.
    pub fn stats(&self, vm: &str) -> Option<GuestStats> {
        self.running
            .get(vm)
            .map(|r| r.handle.stats())
            .or_else(|| self.last.get(vm).cloned())
    }

    /// Whether `vm`'s guest runs here, and for how long.
    pub fn running_for(&self, vm: &str) -> Option<std::time::Duration> {
        self.running.get(vm).map(|r| r.started.elapsed())
    }

    /// Why `vm`'s planned guest could not start, if it could not.
    pub fn failure(&self, vm: &str) -> Option<String> {
        self.failures.get(vm).cloned()
    }

    /// Forgets failures of guests no longer planned here.
    pub fn retain_failures(&mut self, planned: &HashSet<String>) {
        self.failures.retain(|v, _| planned.contains(v));
    }
}

/// Reads a local copy of a VM's disks for the checker.
pub struct LocalCopy {
    /// Images by disk index.
    pub images: Vec<Arc<DiskImage>>,
}

impl CopyReader for LocalCopy {
    fn disk_sizes(&self) -> std::io::Result<Vec<u64>> {
        Ok(self.images.iter().map(|i| i.size()).collect())
    }

    fn read(&self, disk_index: u32, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let image = self
            .images
            .get(disk_index as usize)
            .ok_or_else(|| std::io::Error::other(format!("no disk {disk_index}")))?;
        let mut buf = vec![0u8; len];
        image
            .read_at(&mut buf, offset)
            .map_err(std::io::Error::other)?;
        Ok(buf)
    }
}

/// What a verify request needs to know about one VM.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmToVerify {
    /// VM name (its logs' file names).
    pub name: String,
    /// VM id (in its sectors' tags).
    pub vm_id: u64,
    /// Every stay of the VM, in order: the host holding that stay's log segment.
    pub stays: Vec<NodeId>,
    /// Its disks in order: (id, size).
    pub disks: Vec<(DiskId, u64)>,
}

/// Reads the acknowledged-write log of `vm`'s stay `stay` on this host (empty if the stay
/// never wrote here).
pub fn read_log(data_dir: &Path, vm: &str, stay: u64) -> anyhow::Result<Vec<LogRecord>> {
    let path = log_path(data_dir, vm, stay);
    if !path.exists() {
        return Ok(Vec::new());
    }
    Ok(WriteLog::read_all(&path)?.records)
}

impl super::DataPlane {
    /// Starts, restarts (after a fence or a new stay) and stops simulated guests to match
    /// this host's plan. A guest paused for a move stays stopped.
    pub async fn reconcile_guests(self: &Arc<Self>) {
        let view = self.view.borrow().clone();
        let plan = &view.plan;
        let mut guests = self.guests.lock().await;
        let planned: HashSet<String> = plan.guests.keys().cloned().collect();
        guests.retain_paused(&planned);
        guests.retain_failures(&planned);
        // VMs of groups under migration: a guest arriving here waits for the
        // coordinator's resume instead of starting on its own.
        let migrating: HashSet<String> = view
            .model
            .migrations
            .values()
            .filter(|m| m.decision.is_none())
            .filter_map(|m| view.model.cgs.get(&m.cg))
            .flat_map(|c| c.vms.iter().cloned())
            .collect();
        guests.retain_released(&migrating);
        for vm in planned.iter().filter(|v| migrating.contains(*v)) {
            guests.hold_for_migration(vm);
        }
        let want: Vec<(GuestPlan, Vec<u64>)> = plan
            .guests
            .values()
            .filter(|g| !guests.is_paused(&g.vm))
            .map(|g| (g.clone(), g.disks.iter().map(|d| d.epoch).collect()))
            .collect();
        for name in guests.names() {
            let keep = want
                .iter()
                .any(|(g, epochs)| g.vm == name && guests.is_running(&name, g.stay, epochs));
            if !keep {
                if let Some(handle) = guests.take(&name) {
                    let stats = handle.stop().await;
                    tracing::info!(vm = %name, acked = stats.writes_acked, failed = stats.writes_failed, "simulated guest stopped");
                    guests.stopped(&name, stats);
                }
            }
        }
        for (g, epochs) in want {
            if guests.is_running(&g.vm, g.stay, &epochs) {
                continue;
            }
            // Every disk needs its export's route here first.
            if g.disks.iter().any(|d| self.route(d.id).1.is_none()) {
                continue;
            }
            let volumes: Vec<(Volume, u64)> = g
                .disks
                .iter()
                .map(|d| (self.volume(d.id, d.size, d.epoch), d.size))
                .collect();
            if let Err(e) = guests.start(&self.cfg.data_dir, &g, volumes) {
                tracing::warn!(vm = %g.vm, error = format!("{e:#}"), "cannot start the simulated guest");
            }
        }
    }

    /// Stops `vm`'s guest for a move: its writes in flight complete and its log is synced;
    /// it is not restarted here until [`Self::resume_guest`] or the move is applied.
    /// Returns whether a guest was running.
    pub async fn pause_guest(&self, vm: &str) -> bool {
        let mut guests = self.guests.lock().await;
        guests.set_paused(vm, true);
        match guests.take(vm) {
            Some(handle) => {
                let stats = handle.stop().await;
                tracing::info!(
                    vm,
                    acked = stats.writes_acked,
                    "simulated guest paused for a move"
                );
                guests.stopped(vm, stats);
                true
            }
            None => false,
        }
    }

    /// Undoes [`Self::pause_guest`] (a move that did not commit), or starts a guest a
    /// migration brought here.
    pub async fn resume_guest(self: &Arc<Self>, vm: &str) {
        self.guests.lock().await.release(vm);
        self.reconcile_guests().await;
    }

    /// Stats of `vm`'s simulated guest on this host, whether it runs here now, and why it
    /// could not start (if it could not).
    pub async fn guest_status(
        &self,
        vm: &str,
    ) -> (
        Option<GuestStats>,
        Option<std::time::Duration>,
        Option<String>,
    ) {
        let guests = self.guests.lock().await;
        (guests.stats(vm), guests.running_for(vm), guests.failure(vm))
    }

    /// Whether `vm`'s guest runs here, and whether it is paused for a move.
    pub async fn guest_running_paused(&self, vm: &str) -> (bool, bool) {
        let guests = self.guests.lock().await;
        (guests.running_for(vm).is_some(), guests.is_paused(vm))
    }

    /// Waits (up to `timeout`) until this host's applied plan runs `vm`'s guest here;
    /// returns whether it does.
    pub async fn wait_guest_planned(&self, vm: &str, timeout: std::time::Duration) -> bool {
        let mut rx = self.view.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if rx.borrow_and_update().plan.guests.contains_key(vm) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Stats of `vm`'s simulated guest on this host.
    pub async fn guest_stats(&self, vm: &str) -> Option<GuestStats> {
        self.guests.lock().await.stats(vm)
    }

    /// Verifies this host's copies of `vms` against their logs (gathered by the caller
    /// from every host the VMs stayed on, in stay order). `freeze` pauses that group's
    /// replica applier while reading. Blocking.
    pub fn verify(
        &self,
        vms: &[VmToVerify],
        logs: &[Vec<LogRecord>],
        mode: convoy_guest::VerifyMode,
        freeze: Option<u64>,
    ) -> anyhow::Result<convoy_guest::VerifyReport> {
        let mut readers = Vec::new();
        for vm in vms {
            let images: anyhow::Result<Vec<Arc<DiskImage>>> = vm
                .disks
                .iter()
                .map(|(d, size)| {
                    if !self.images.has_file(*d) {
                        anyhow::bail!(
                            "node {} holds no copy of disk {d} of VM '{}'",
                            self.node,
                            vm.name
                        );
                    }
                    self.images.open(*d, *size)
                })
                .collect();
            readers.push(LocalCopy { images: images? });
        }
        let lock_handle = freeze.map(|cg| self.apply_lock(cg));
        let _frozen = lock_handle
            .as_ref()
            .map(|l| l.read().unwrap_or_else(|p| p.into_inner()));
        let copies: Vec<convoy_guest::VmCopy<'_>> = vms
            .iter()
            .zip(&readers)
            .zip(logs)
            .map(|((vm, reader), records)| convoy_guest::VmCopy {
                vm_id: vm.vm_id,
                records,
                reader,
            })
            .collect();
        Ok(convoy_guest::verify(
            mode,
            &copies,
            &convoy_guest::VerifyOptions::default(),
        )?)
    }
}
