//! Simulated guests on this host, and verification of local copies against their logs.
//!
//! A running VM with a workload gets a [`convoy_guest::Guest`] writing through the same
//! volumes the NBD exports use, so its writes take exactly the NBD path (sequencer,
//! replication, fencing). Its acknowledged-write log lives at `<data_dir>/guests/<vm>.log`
//! on the VM's host.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use convoy_guest::{
    CopyReader, Guest, GuestDisk, GuestHandle, GuestStats, LogRecord, Workload, WriteLog,
};
use convoy_raft::model::DiskId;
use convoy_store::DiskImage;
use futures::future::BoxFuture;

use super::volume::Volume;
use super::wire::Payload;

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
    /// Epoch its volumes carry; a fence restarts it with new volumes.
    epoch: u64,
}

/// The guests of this host.
#[derive(Default)]
pub struct Guests {
    running: HashMap<String, Running>,
    last: HashMap<String, GuestStats>,
}

/// Where VM `vm`'s log lives under `data_dir`.
pub fn log_path(data_dir: &std::path::Path, vm: &str) -> PathBuf {
    data_dir.join("guests").join(format!("{vm}.log"))
}

impl Guests {
    /// Whether `vm`'s guest runs with volumes at `epoch`.
    pub fn is_running(&self, vm: &str, epoch: u64) -> bool {
        self.running.get(vm).is_some_and(|r| r.epoch == epoch)
    }

    /// Names of running guests.
    pub fn names(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    /// Starts `vm`'s guest over `volumes` (in disk order).
    pub fn start(
        &mut self,
        data_dir: &std::path::Path,
        vm: &str,
        vm_id: u64,
        workload: &str,
        volumes: Vec<(Volume, u64)>,
        epoch: u64,
    ) -> anyhow::Result<()> {
        let workload: Workload = workload
            .parse()
            .map_err(|e| anyhow::anyhow!("workload of VM '{vm}': {e}"))?;
        let path = log_path(data_dir, vm);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = WriteLog::open(&path, vm_id)?;
        let disks: Vec<Arc<dyn GuestDisk>> = volumes
            .into_iter()
            .map(|(v, size)| Arc::new(VolumeDisk(v, size)) as Arc<dyn GuestDisk>)
            .collect();
        let handle = Guest::start(vm_id, disks, workload, log)?;
        tracing::info!(vm, epoch, "simulated guest started");
        self.running
            .insert(vm.to_string(), Running { handle, epoch });
        Ok(())
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
    /// VM name (its log's file name).
    pub name: String,
    /// VM id (in its sectors' tags).
    pub vm_id: u64,
    /// Host holding its log.
    pub log_host: u64,
    /// Its disks in order: (id, size).
    pub disks: Vec<(DiskId, u64)>,
}

/// Reads the acknowledged-write log of `vm` on this host.
pub fn read_log(data_dir: &std::path::Path, vm: &str) -> anyhow::Result<Vec<LogRecord>> {
    let path = log_path(data_dir, vm);
    if !path.exists() {
        return Ok(Vec::new());
    }
    Ok(WriteLog::read_all(&path)?.records)
}
