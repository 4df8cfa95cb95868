//! Block devices the NBD server and the simulated guests write through.
//!
//! A [`Volume`] is the writable view of a disk on the host its VM runs on. Each request
//! looks up the disk's current [`Route`]: this host's sequencer (the host orders the
//! disk's group), or a mirror stream to the group's sequencer on another host. When the
//! order moves (a hand-over), requests that were not applied wait for the new route and
//! go there; the guest sees a short pause, not an error. Every write carries the epoch
//! the volume was opened at, so a volume opened before a fence or a move is refused.
//! A [`ReadOnlyCopy`] exposes any copy (sequencer's or replica's) for inspection.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use convoy_nbd::{BlockDevice, DeviceError, DeviceFuture};
use convoy_raft::model::DiskId;
use convoy_store::DiskImage;

use super::DataPlane;
use super::mirror::{FailKind, MirrorClient, MirrorError};
use super::sequencer::{Sequencer, WriteError};
use super::wire::Payload;

/// Where a disk's writes go from this host.
#[derive(Clone)]
pub enum Route {
    /// This host sequences the disk's domain.
    Local(Arc<Sequencer>),
    /// Another host sequences the group; this host holds a replica copy of it.
    Mirrored {
        /// The stream to the sequencer.
        client: Arc<MirrorClient>,
        /// The group.
        cg_id: u64,
        /// This host's copy (for reads once it is current).
        image: Arc<DiskImage>,
    },
}

/// Errors of a volume request.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The local sequencer refused or failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The remote sequencer refused or failed, or did not answer.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// Local storage failed (a read or flush of this host's copy).
    #[error("local storage: {0}")]
    Store(#[from] convoy_store::StoreError),
    /// The disk has no route here (its VM does not run here, or the host is stopping).
    #[error("disk {0} is not writable on this host now")]
    NoRoute(DiskId),
}

fn device_error(e: VolumeError) -> DeviceError {
    match &e {
        VolumeError::Write(WriteError::StaleEpoch { .. })
        | VolumeError::Mirror(MirrorError::Failed {
            kind: FailKind::StaleEpoch | FailKind::NotAllowed,
            ..
        }) => DeviceError::PermissionDenied(e.to_string()),
        VolumeError::Write(WriteError::Store(s)) | VolumeError::Store(s) if s.is_no_space() => {
            DeviceError::NoSpace
        }
        VolumeError::Mirror(MirrorError::Failed {
            kind: FailKind::NoSpace,
            ..
        }) => DeviceError::NoSpace,
        VolumeError::Write(WriteError::Closed) | VolumeError::NoRoute(_) => {
            DeviceError::ShuttingDown
        }
        _ => DeviceError::Io(std::io::Error::other(e.to_string())),
    }
}

/// How long a request waits for a route (a hand-over finishing) before it fails.
const ROUTE_WAIT: Duration = Duration::from_secs(10);

/// The writable view of a disk on the host its VM runs on.
pub struct Volume {
    disk: DiskId,
    size: u64,
    epoch: u64,
    plane: Weak<DataPlane>,
}

impl Volume {
    /// A volume for `disk` at `epoch`.
    pub fn new(disk: DiskId, size: u64, epoch: u64, plane: Weak<DataPlane>) -> Self {
        Self {
            disk,
            size,
            epoch,
            plane,
        }
    }

    /// The disk.
    pub fn disk(&self) -> DiskId {
        self.disk
    }

    /// The epoch the volume writes with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn plane(&self) -> Result<Arc<DataPlane>, VolumeError> {
        self.plane.upgrade().ok_or(VolumeError::NoRoute(self.disk))
    }

    /// Writes and returns the group sequence number the write got.
    pub async fn write_seq(
        &self,
        offset: u64,
        payload: Payload,
        fua: bool,
    ) -> Result<u64, VolumeError> {
        let plane = self.plane()?;
        let deadline = tokio::time::Instant::now() + ROUTE_WAIT;
        loop {
            let (version, route) = plane.route(self.disk);
            let outcome = match route {
                None => None,
                Some(Route::Local(seq)) => {
                    match seq
                        .write(self.disk, offset, payload.clone(), fua, self.epoch)
                        .await
                    {
                        Ok(s) => return Ok(s),
                        Err(e @ (WriteError::Moved | WriteError::PausedTooLong(_))) => {
                            Some(VolumeError::from(e))
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(Route::Mirrored { client, .. }) => {
                    match client
                        .write(self.disk, self.epoch, offset, payload.clone(), fua)
                        .await
                    {
                        Ok(s) => return Ok(s),
                        Err(e) if e.retry_elsewhere() => Some(VolumeError::from(e)),
                        // The outcome is unknown (the stream broke: a hand-over stopped
                        // the sequencer mid-request). The guest was not answered, so no
                        // later write depends on this one: send it again if the group's
                        // order moves (the same data at the same place).
                        Err(e @ MirrorError::Lost { .. }) => Some(VolumeError::from(e)),
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            // Not applied. A writer the model fenced (its VM moved, or its group's order
            // was taken over while this host was away) gets its answer now, counted, not
            // after a route wait: no route takes its epoch any more.
            if let Some(stale) = self.fenced(&plane) {
                return Err(stale);
            }
            // Otherwise wait for the route to change (a hand-over landing here).
            if !plane.wait_route_change(version, deadline).await {
                return Err(self
                    .fenced(&plane)
                    .or(outcome)
                    .unwrap_or(VolumeError::NoRoute(self.disk)));
            }
        }
    }

    /// The refusal for a write of this volume's epoch if the model moved its disk past it.
    fn fenced(&self, plane: &DataPlane) -> Option<VolumeError> {
        let current = plane.model_epoch(self.disk).filter(|e| *e > self.epoch)?;
        metrics::counter!("convoy_stale_epoch_refused_total", "where" => "export").increment(1);
        Some(
            WriteError::StaleEpoch {
                writer: self.epoch,
                current,
            }
            .into(),
        )
    }

    async fn flush_inner(&self) -> Result<(), VolumeError> {
        let plane = self.plane()?;
        let deadline = tokio::time::Instant::now() + ROUTE_WAIT;
        loop {
            let (version, route) = plane.route(self.disk);
            match route {
                Some(Route::Local(seq)) => match seq.flush_everywhere(self.disk).await {
                    Ok(()) => return Ok(()),
                    Err(WriteError::Moved) => {}
                    Err(e) => return Err(e.into()),
                },
                Some(Route::Mirrored { client, image, .. }) => {
                    match client.flush(self.disk).await {
                        Ok(()) => {
                            image.flush_async().await?;
                            return Ok(());
                        }
                        Err(e) if e.retry_elsewhere() => {}
                        Err(e @ MirrorError::Lost { .. }) => {
                            if !plane.wait_route_change(version, deadline).await {
                                return Err(e.into());
                            }
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                None => {}
            }
            if !plane.wait_route_change(version, deadline).await {
                return Err(VolumeError::NoRoute(self.disk));
            }
        }
    }

    async fn read_inner(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        let plane = self.plane()?;
        let deadline = tokio::time::Instant::now() + ROUTE_WAIT;
        loop {
            let (version, route) = plane.route(self.disk);
            match route {
                Some(Route::Local(seq)) => match seq.read(self.disk, offset, len as usize).await {
                    Ok(b) => return Ok(b),
                    Err(WriteError::Moved) => {}
                    Err(e) => return Err(e.into()),
                },
                Some(Route::Mirrored {
                    client,
                    cg_id,
                    image,
                }) => {
                    // The local copy serves once it applied every write this host made to
                    // the disk (and what preceded this host's stream); otherwise ask the
                    // sequencer, whose copy is always current.
                    let current = match client.needs(self.disk).await {
                        Some(need) => plane.replica_applied(cg_id) >= need,
                        None => false,
                    };
                    if current {
                        return Ok(image.read_async(offset, len as usize).await?);
                    }
                    match client.read(self.disk, offset, len).await {
                        Ok(b) => return Ok(b),
                        Err(e) if e.retry_elsewhere() => {}
                        Err(e @ MirrorError::Lost { .. }) => {
                            if !plane.wait_route_change(version, deadline).await {
                                return Err(e.into());
                            }
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                None => {}
            }
            if !plane.wait_route_change(version, deadline).await {
                return Err(VolumeError::NoRoute(self.disk));
            }
        }
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: u32) -> DeviceFuture<'_, Bytes> {
        Box::pin(async move { self.read_inner(offset, len).await.map_err(device_error) })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            self.write_seq(offset, Payload::Data(data), fua)
                .await
                .map(|_| ())
                .map_err(device_error)
        })
    }

    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(async move { self.flush_inner().await.map_err(device_error) })
    }

    fn trim(&self, offset: u64, len: u32) -> DeviceFuture<'_, ()> {
        // Replicated as zeroes so every copy stays byte-identical.
        Box::pin(async move {
            self.write_seq(offset, Payload::Zeroes(u64::from(len)), false)
                .await
                .map(|_| ())
                .map_err(device_error)
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        _may_trim: bool,
    ) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            self.write_seq(offset, Payload::Zeroes(u64::from(len)), fua)
                .await
                .map(|_| ())
                .map_err(device_error)
        })
    }
}

/// A read-only view of a local copy of a disk.
pub struct ReadOnlyCopy {
    image: Arc<DiskImage>,
}

impl ReadOnlyCopy {
    /// Exposes `image` read-only.
    pub fn new(image: Arc<DiskImage>) -> Self {
        Self { image }
    }
}

impl BlockDevice for ReadOnlyCopy {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: u32) -> DeviceFuture<'_, Bytes> {
        Box::pin(async move {
            Arc::clone(&self.image)
                .read_async(offset, len as usize)
                .await
                .map_err(|e| DeviceError::Io(std::io::Error::other(e.to_string())))
        })
    }

    fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async { Err(DeviceError::PermissionDenied("read-only copy".into())) })
    }

    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
