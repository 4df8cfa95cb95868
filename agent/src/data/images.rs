//! The disk images this host holds open, and the disks whose image could not be opened.
//!
//! One [`DiskImage`] per disk, shared by whatever uses it (the sequencer, a replica's
//! stream, an export, a delta session). A disk that cannot be opened (a missing metadata
//! file after a kill during create, a full file system, an I/O error) is recorded with its
//! reason and reported; it never stops the other disks of the host.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use convoy_raft::model::DiskId;
use convoy_store::DiskImage;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether an image file holds no data at all (no allocated blocks): a create that died
/// before anything was written.
fn never_written(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).is_ok_and(|m| m.blocks() == 0)
}

/// The images of one host.
pub struct Images {
    dir: PathBuf,
    open: Mutex<HashMap<DiskId, Arc<DiskImage>>>,
    failed: Mutex<BTreeMap<DiskId, String>>,
    /// One opener per disk at a time: two racing creates of one image (a reconcile and a
    /// replica stream) would each find no file, and one would tear the other's half-made
    /// image down.
    opening: Mutex<HashMap<DiskId, Arc<Mutex<()>>>>,
}

impl Images {
    /// Images kept in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            open: Mutex::new(HashMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            opening: Mutex::new(HashMap::new()),
        }
    }

    /// Where the images live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The open image of `disk`, opening (or creating, when no file exists) it first.
    /// A failure is recorded for status until a later open succeeds. Blocking.
    pub fn open(&self, disk: DiskId, size: u64) -> anyhow::Result<Arc<DiskImage>> {
        if let Some(img) = lock(&self.open).get(&disk) {
            return Ok(Arc::clone(img));
        }
        let turn = Arc::clone(lock(&self.opening).entry(disk).or_default());
        let _turn = lock(&turn);
        // Opened by whoever held the turn before us.
        if let Some(img) = lock(&self.open).get(&disk) {
            return Ok(Arc::clone(img));
        }
        let result = self.open_uncached(disk, size);
        match &result {
            Ok(img) => {
                lock(&self.failed).remove(&disk);
                // Another thread may have opened it meanwhile: keep one.
                let mut open = lock(&self.open);
                let kept = open.entry(disk).or_insert_with(|| Arc::clone(img));
                return Ok(Arc::clone(kept));
            }
            Err(e) => {
                let why = format!("{e:#}");
                let mut failed = lock(&self.failed);
                if failed.get(&disk) != Some(&why) {
                    tracing::warn!(disk, error = %why, "cannot open a disk image");
                }
                failed.insert(disk, why);
            }
        }
        result
    }

    fn open_uncached(&self, disk: DiskId, size: u64) -> anyhow::Result<Arc<DiskImage>> {
        let id = disk.to_string();
        let [img_path, _, _] = convoy_store::image_paths(&self.dir, &id)?;
        let image = if img_path.exists() {
            match DiskImage::open(&self.dir, &id) {
                Ok(img) => img,
                Err(e) if never_written(&img_path) => {
                    // A create interrupted before its metadata landed (a kill during
                    // `vm create`): nothing was ever written, so finish the create.
                    tracing::warn!(disk, error = %e, "finishing an interrupted image create");
                    DiskImage::destroy(&self.dir, &id)
                        .with_context(|| format!("cannot clean up the image of disk {disk}"))?;
                    DiskImage::create(&self.dir, &id, size)
                        .with_context(|| format!("cannot create the image of disk {disk}"))?
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e))
                        .with_context(|| format!("cannot open the image of disk {disk}"));
                }
            }
        } else {
            DiskImage::create(&self.dir, &id, size)
                .with_context(|| format!("cannot create the image of disk {disk}"))?
        };
        if image.size() != size {
            anyhow::bail!(
                "image of disk {disk} has {} bytes but the model says {size}",
                image.size()
            );
        }
        Ok(Arc::new(image))
    }

    /// The image of `disk` if it is open.
    pub fn get(&self, disk: DiskId) -> Option<Arc<DiskImage>> {
        lock(&self.open).get(&disk).cloned()
    }

    /// Every open image.
    pub fn all(&self) -> Vec<(DiskId, Arc<DiskImage>)> {
        lock(&self.open)
            .iter()
            .map(|(d, i)| (*d, Arc::clone(i)))
            .collect()
    }

    /// Whether an image file of `disk` exists here (open or not).
    pub fn has_file(&self, disk: DiskId) -> bool {
        lock(&self.open).contains_key(&disk)
            || convoy_store::image_paths(&self.dir, &disk.to_string())
                .is_ok_and(|[img, _, _]| img.exists())
    }

    /// Disks whose image could not be opened, or failed since (a failed fsync makes an
    /// image refuse writes until it is reopened), with why.
    pub fn failures(&self) -> BTreeMap<DiskId, String> {
        let mut out = lock(&self.failed).clone();
        for (disk, image) in lock(&self.open).iter() {
            if let Some(why) = image.failure() {
                out.insert(*disk, format!("failed: {why}"));
            }
        }
        out
    }

    /// Closes and deletes the image of `disk`. Blocking.
    pub fn delete(&self, disk: DiskId, why: &str) {
        let turn = Arc::clone(lock(&self.opening).entry(disk).or_default());
        let _turn = lock(&turn);
        if let Some(img) = lock(&self.open).remove(&disk) {
            let _ = img.close();
        }
        lock(&self.failed).remove(&disk);
        match DiskImage::destroy(&self.dir, &disk.to_string()) {
            Ok(()) => tracing::info!(disk, why, "deleted a local disk image"),
            Err(e) => tracing::warn!(disk, error = %e, "cannot delete a local disk image"),
        }
    }

    /// Forgets disks that left the model without deleting anything (their files are
    /// collected later), so failures of deleted disks are not reported.
    pub fn forget_failures_except(&self, keep: &BTreeMap<DiskId, u64>) {
        lock(&self.failed).retain(|d, _| keep.contains_key(d));
    }

    /// Closes every image cleanly (agent shutdown). Blocking.
    pub fn close_all(&self) {
        for (_, img) in lock(&self.open).drain() {
            let _ = img.close();
        }
    }
}
