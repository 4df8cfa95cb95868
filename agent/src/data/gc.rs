//! Garbage collection of local copies the cluster no longer gives this host, and the
//! background hash warmer that keeps idle images' chunk hashes computed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use convoy_raft::model::{ClusterModel, DiskId};
use convoy_store::DiskImage;

use super::{DataPlane, lock};

impl DataPlane {
    /// Deletes what this host keeps for copies the cluster no longer gives it: images of
    /// deleted disks (also those not opened since a restart), and a former replica's copy
    /// of a group (its images, progress record and before-resync snapshot) once the host
    /// neither orders, replicates, runs nor migrates that group and the copy has been
    /// unused for the configured grace time (a re-added replica then catches up with only
    /// its lag). Copies made by `cg sync` have no progress record and are kept. Blocking.
    ///
    /// `model` must be current (read after a read barrier): a stale model could lack a link
    /// that exists. Ids are never reused, so anything newer than `model` is left alone too.
    pub fn collect_garbage(
        &self,
        model: &ClusterModel,
        barrier_started: std::time::Instant,
    ) -> Vec<String> {
        // Replica roles below are the last reconcile's; it cannot run meanwhile.
        let _housekeeping = lock(&self.housekeeping);
        let me = self.node;
        let mut removed = Vec::new();
        for (disk, _) in numbered_entries(self.images.dir(), "disk-", ".img") {
            if model.disk_id_issued(disk) && !model.disks.contains_key(&disk) {
                self.exports.remove(&super::readonly_export_name(disk));
                self.images.delete(disk, "its disk was deleted");
                removed.push(format!("image of deleted disk {disk}"));
            }
        }

        // Snapshot files the model does not list: deleted snapshots, or creations that
        // failed or crashed before being recorded (not those still being created).
        let snap_root = self.cfg.data_dir.join("snapshots");
        for (cg_id, group_dir) in numbered_entries(&snap_root, "cg-", "") {
            if !model.cg_id_issued(cg_id) {
                continue;
            }
            let cg = model.cg_by_id(cg_id);
            for snap in std::fs::read_dir(group_dir).into_iter().flatten().flatten() {
                let sname = snap.file_name().to_string_lossy().to_string();
                let listed =
                    cg.is_some_and(|c| c.snapshots.iter().any(|s| s.name == sname && s.host == me));
                let path = snap.path();
                let mut in_progress = lock(&self.snapshots_in_progress);
                let judged_by_model = match in_progress.get(&path) {
                    None => true,
                    Some(None) => false,
                    // Recorded before the barrier began: `model` has the record (or its
                    // deletion).
                    Some(Some(at)) => *at < barrier_started,
                };
                if !judged_by_model {
                    continue;
                }
                in_progress.remove(&path);
                drop(in_progress);
                if !listed {
                    let _ = std::fs::remove_dir_all(&path);
                    removed.push(format!("files of snapshot {sname} of group {cg_id}"));
                }
            }
        }

        let replication = self.replication_dir();
        for (cg_id, record) in numbered_entries(&replication, "cg-", ".replica") {
            if !model.cg_id_issued(cg_id) {
                continue;
            }
            let cg = model.cg_by_id(cg_id);
            let still_here = cg.is_some_and(|c| {
                c.holds_copy(me)
                    || c.vms
                        .iter()
                        .any(|v| model.vms.get(v).is_some_and(|vm| vm.host == me))
                    || model.migrations.values().any(|m| {
                        m.cg == c.name && m.decision.is_none() && (m.to == me || m.from == me)
                    })
            });
            if still_here || self.replicas.role(cg_id).is_some() {
                continue;
            }
            // Kept for a while after the link went: a re-added replica resumes from it.
            let grace = self.cfg.keep_former_copies;
            let since = *lock(&self.former_replicas)
                .entry(cg_id)
                .or_insert_with(std::time::Instant::now);
            if cg.is_some() && since.elapsed() < grace {
                continue;
            }
            // No stream of the group may run (or start) while its files go.
            let turn = self.replicas.turn(cg_id);
            let Ok(_turn) = turn.try_lock() else { continue };
            if let Some(c) = cg {
                for d in model.cg_disks(c) {
                    self.exports.remove(&super::readonly_export_name(d.id));
                    self.images
                        .delete(d.id, "this host no longer holds a replica of its group");
                    removed.push(format!("replica copy of disk {}", d.id));
                }
            }
            let _ = std::fs::remove_dir_all(self.resync_dir(cg_id));
            match std::fs::remove_file(&record) {
                Ok(()) => {
                    let _ = std::fs::File::open(&replication).and_then(|d| d.sync_all());
                    lock(&self.former_replicas).remove(&cg_id);
                    tracing::info!(cg_id, "removed the progress record of a former replica");
                    removed.push(format!("replica progress record of group {cg_id}"));
                }
                Err(e) => {
                    tracing::warn!(cg_id, error = %e, "cannot remove a replica progress record")
                }
            }
        }
        removed
    }
}

/// Entries of `dir` named `<prefix><number><suffix>`, with their numbers.
fn numbered_entries(dir: &Path, prefix: &str, suffix: &str) -> Vec<(u64, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name
                .strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect()
}

/// Whether the hash warmer should hash an image now: it was not written since the last look
/// (`previous`, the write count then) and not already fully hashed at this write count.
fn worth_warming(previous: Option<u64>, writes: u64, hashed_at: Option<u64>) -> bool {
    previous == Some(writes) && hashed_at != Some(writes)
}

/// Keeps idle images' chunk hashes computed, so a compare-delta against them only hashes
/// what changed since. An image is hashed once it has gone a whole look without writes:
/// hashing a busy image would only be redone, and takes CPU from its writers. (Counting
/// unknown hashes instead mistook a busy image for idle once every chunk was unknown.)
pub(crate) async fn hash_warmer(plane: std::sync::Weak<DataPlane>) {
    let mut last_writes: HashMap<DiskId, u64> = HashMap::new();
    // The write count at which each image was last found fully hashed.
    let mut hashed_at: HashMap<DiskId, u64> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Some(p) = plane.upgrade() else { return };
        let bulk = Arc::clone(&p.bulk);
        if bulk.load(Ordering::Relaxed) > 0 {
            // A copy is running on this host: hashing now would only slow it down.
            continue;
        }
        let images: Vec<(DiskId, Arc<DiskImage>)> = p.images.all();
        drop(p);
        last_writes.retain(|d, _| images.iter().any(|(disk, _)| disk == d));
        hashed_at.retain(|d, _| images.iter().any(|(disk, _)| disk == d));
        for (disk, image) in images {
            let writes = image.write_count();
            let previous = last_writes.insert(disk, writes);
            if !worth_warming(previous, writes, hashed_at.get(&disk).copied()) {
                continue;
            }
            let started = std::time::Instant::now();
            let busy = Arc::clone(&bulk);
            let hashing = move || image.hash_all_while_idle(|| busy.load(Ordering::Relaxed) > 0);
            match tokio::task::spawn_blocking(hashing).await {
                Ok(Ok(None)) => {
                    // Written meanwhile (a copy or guest started): try again once idle.
                    last_writes.remove(&disk);
                }
                Ok(Ok(Some(pass))) => {
                    hashed_at.insert(disk, writes);
                    tracing::debug!(
                        disk,
                        read = pass.read,
                        holes = pass.holes,
                        ms = started.elapsed().as_millis() as u64,
                        "hashed idle image"
                    );
                }
                Ok(Err(e)) => tracing::debug!(disk, error = %e, "hashing an idle image failed"),
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worth_warming;

    #[test]
    fn warmer_hashes_only_images_quiet_for_a_whole_look_and_not_yet_hashed() {
        // First look at an image: nothing to compare with yet.
        assert!(!worth_warming(None, 10, None));
        // Written since the last look (a busy guest, even one that has touched every chunk).
        assert!(!worth_warming(Some(8), 10, None));
        // Quiet for a look: hash it.
        assert!(worth_warming(Some(10), 10, None));
        // Already fully hashed at this write count: nothing to do.
        assert!(!worth_warming(Some(10), 10, Some(10)));
        // Hashed before, written since, quiet again: hash the changes.
        assert!(worth_warming(Some(12), 12, Some(10)));
    }
}
