//! Group snapshots on the sequencer (create, restore, delete), and the replica's
//! before-resync snapshot (its last consistent state while a resync runs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use convoy_raft::model::DiskId;
use convoy_store::DiskImage;

use super::sequencer::Sequencer;
use super::wire::Payload;
use super::{DataPlane, lock};

/// Where a snapshot records the last sequence it contains.
const SNAPSHOT_SEQ_FILE: &str = "last_seq";

impl DataPlane {
    fn snapshot_dir(&self, cg_id: u64, name: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join("snapshots")
            .join(format!("cg-{cg_id}"))
            .join(name)
    }

    /// The running sequencer of group `cg` by name (this host orders it).
    fn named_sequencer(&self, cg: &str) -> anyhow::Result<Arc<Sequencer>> {
        lock(&self.domains)
            .values()
            .find(|d| d.seq.name == cg && d.seq.cg_id().is_some())
            .map(|d| Arc::clone(&d.seq))
            .with_context(|| format!("node {} is not the primary of '{cg}'", self.node))
    }

    /// Takes a crash-consistent snapshot of every disk of group `cg` (this host is its
    /// sequencer). Writes are held back only while the copies start (microseconds); the
    /// copying runs while guests keep writing, each write first saving the chunks it is
    /// about to change (copy-before-write). Returns the last sequence number the snapshot
    /// contains, once the copies are complete and durable. Blocking.
    pub fn snapshot_create(&self, cg: &str, name: &str) -> anyhow::Result<u64> {
        convoy_raft::model::validate_name("snapshot name", name)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = self.named_sequencer(cg)?;
        let cg_id = seq.cg_id().unwrap_or_default();
        let dir = self.snapshot_dir(cg_id, name);
        if dir.exists() {
            anyhow::bail!(
                "snapshot '{name}' of '{cg}' already exists on node {}",
                self.node
            );
        }
        lock(&self.snapshots_in_progress).insert(dir.clone(), None);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            lock(&self.snapshots_in_progress).remove(&dir);
            return Err(e.into());
        }
        // The point in time: every disk's copy starts with no write in flight.
        let (begun, last) = seq.with_writes_paused(|images| {
            let mut started: Vec<Arc<DiskImage>> = Vec::new();
            for (disk, image) in images {
                if let Err(e) = image.live_snapshot_begin(&dir, &disk.to_string()) {
                    started.iter().for_each(|i| i.live_snapshot_abort());
                    return Err(e);
                }
                started.push(Arc::clone(image));
            }
            Ok(started)
        });
        let copied = begun.map_err(anyhow::Error::from).and_then(|images| {
            let copy = || -> anyhow::Result<()> {
                for image in &images {
                    while !image.live_snapshot_step(64)? {}
                    image.live_snapshot_finish()?.close()?;
                }
                Ok(())
            };
            copy().inspect_err(|_| images.iter().for_each(|i| i.live_snapshot_abort()))
        });
        let copied = copied.and_then(|()| {
            // The point's sequence, for a restore that continues the order from it.
            convoy_codec::file::write_record(&dir.join(SNAPSHOT_SEQ_FILE), &last)
                .map_err(anyhow::Error::from)
        });
        if let Err(e) = copied {
            let _ = std::fs::remove_dir_all(&dir);
            lock(&self.snapshots_in_progress).remove(&dir);
            return Err(e.context(format!("cannot snapshot '{cg}'")));
        }
        Ok(last)
    }

    /// Whether snapshot `name` of group `cg_id` has files on this host.
    pub fn snapshot_exists(&self, cg_id: u64, name: &str) -> bool {
        self.snapshot_dir(cg_id, name).exists()
    }

    /// Rolls this host's copy of group `cg_id` back to snapshot `name` in place (only
    /// chunks whose hashes differ are written), when nothing else writes the copy: this
    /// host neither orders nor replicates the group now. Returns the last sequence the
    /// snapshot contains. Blocking.
    pub fn restore_in_place(&self, cg_id: u64, name: &str) -> anyhow::Result<u64> {
        if lock(&self.domains).contains_key(&convoy_raft::model::DomainId::Cg(cg_id)) {
            anyhow::bail!(
                "node {} orders group {cg_id}: restore through the sequencer",
                self.node
            );
        }
        let turn = self.replicas.turn(cg_id);
        let Ok(_turn) = turn.try_lock() else {
            anyhow::bail!(
                "a replica stream of group {cg_id} runs on node {}",
                self.node
            );
        };
        let dir = self.snapshot_dir(cg_id, name);
        let last: u64 = convoy_codec::file::read_record(&dir.join(SNAPSHOT_SEQ_FILE))?
            .with_context(|| format!("snapshot '{name}' has no recorded sequence"))?;
        let view = self.view.borrow().clone();
        let cg = view
            .model
            .cg_by_id(cg_id)
            .with_context(|| format!("group {cg_id} is not in the model"))?;
        for d in view.model.cg_disks(cg) {
            let image = self.images.open(d.id, d.size)?;
            let snap = DiskImage::open(&dir, &d.id.to_string())?;
            let chunk = u64::from(image.geometry().chunk_size());
            let mut buf = vec![0u8; chunk as usize];
            for c in 0..image.chunk_count() {
                if image.chunk_hash(c)? == snap.chunk_hash(c)? {
                    continue;
                }
                let offset = c * chunk;
                let len = chunk.min(image.size() - offset) as usize;
                snap.read_at(&mut buf[..len], offset)?;
                if convoy_store::is_zero(&buf[..len]) {
                    image.write_zeroes(offset, len as u64)?;
                } else {
                    image.write_at(&buf[..len], offset)?;
                }
            }
            image.flush()?;
            snap.close()?;
        }
        tracing::info!(
            cg_id,
            snapshot = name,
            last,
            "rolled this copy back to a snapshot"
        );
        Ok(last)
    }

    /// The snapshot was recorded in Raft: a model read after a barrier started from now on
    /// lists it (or its deletion), so garbage collection may judge it by the model.
    pub fn snapshot_recorded(&self, cg_id: u64, name: &str) {
        let dir = self.snapshot_dir(cg_id, name);
        if let Some(at) = lock(&self.snapshots_in_progress).get_mut(&dir) {
            *at = Some(std::time::Instant::now());
        }
    }

    /// Deletes a snapshot's files on this host. Blocking.
    pub fn snapshot_delete_files(&self, cg_id: u64, name: &str) {
        let dir = self.snapshot_dir(cg_id, name);
        let _ = std::fs::remove_dir_all(&dir);
        lock(&self.snapshots_in_progress).remove(&dir);
    }

    /// Rewrites group `cg`'s disks with snapshot `name`'s content, through the sequencer,
    /// so replicas follow: only chunks whose hashes differ are written. Returns chunks
    /// written.
    pub async fn snapshot_restore(&self, cg: &str, name: &str) -> anyhow::Result<u64> {
        let seq = self.named_sequencer(cg)?;
        let dir = self.snapshot_dir(seq.cg_id().unwrap_or_default(), name);
        if !dir.exists() {
            anyhow::bail!(
                "snapshot '{name}' of '{cg}' has no files on node {}",
                self.node
            );
        }
        let mut written = 0;
        for (disk, image) in seq.images().clone() {
            let dir2 = dir.clone();
            let snap = Arc::new(
                tokio::task::spawn_blocking(move || DiskImage::open(&dir2, &disk.to_string()))
                    .await??,
            );
            let chunk = u64::from(image.geometry().chunk_size());
            let epoch = seq.disk_epoch(disk).unwrap_or(1);
            for c in 0..image.chunk_count() {
                let live = Arc::clone(&image).chunk_hash_async(c).await?;
                let old = Arc::clone(&snap).chunk_hash_async(c).await?;
                if live == old {
                    continue;
                }
                let offset = c * chunk;
                let len = chunk.min(image.size() - offset) as usize;
                let data = Arc::clone(&snap).read_async(offset, len).await?;
                let payload = if convoy_store::is_zero(&data) {
                    Payload::Zeroes(len as u64)
                } else {
                    Payload::Data(data)
                };
                seq.write(disk, offset, payload, false, epoch).await?;
                written += 1;
            }
            seq.flush_disk(disk).await?;
            let _ = snap.close();
        }
        Ok(written)
    }

    pub(crate) fn resync_dir(&self, cg_id: u64) -> PathBuf {
        self.cfg
            .data_dir
            .join("resync-snapshots")
            .join(format!("cg-{cg_id}"))
    }

    /// Keeps the replica's current (consistent, flushed) images before a resync overwrites
    /// them. Blocking.
    pub fn snapshot_before_resync(
        &self,
        cg_id: u64,
        images: &BTreeMap<DiskId, Arc<DiskImage>>,
    ) -> anyhow::Result<()> {
        let dir = self.resync_dir(cg_id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for (disk, image) in images {
            image.flush()?;
            let snap = image.snapshot_to(&dir, &disk.to_string())?;
            snap.close()?;
        }
        tracing::info!(cg_id, dir = %dir.display(), "kept a before-resync snapshot");
        Ok(())
    }

    /// Drops the before-resync snapshot once the copy is consistent again (its flag was
    /// cleared durably first). Blocking.
    pub fn drop_resync_snapshot(&self, cg_id: u64) {
        let _ = std::fs::remove_dir_all(self.resync_dir(cg_id));
    }
}
