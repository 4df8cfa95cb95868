//! Block devices the NBD server and the simulated guests write through.
//!
//! A [`Volume`] is the writable view of a disk on the host its VM runs on: every write goes
//! through the disk's pipeline (sequence number, local apply, replication), carrying the
//! epoch the volume was opened at, so a volume opened before a fence is refused. A
//! [`ReadOnlyCopy`] exposes any copy (primary or replica) for inspection.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use convoy_nbd::{BlockDevice, DeviceError, DeviceFuture};
use convoy_raft::model::DiskId;
use convoy_store::DiskImage;

use super::DataPlane;
use super::pipeline::WriteError;
use super::wire::Payload;

fn device_error(e: WriteError) -> DeviceError {
    match e {
        WriteError::StaleEpoch { .. } => DeviceError::PermissionDenied(e.to_string()),
        WriteError::Closed => DeviceError::ShuttingDown,
        other => DeviceError::Io(std::io::Error::other(other.to_string())),
    }
}

/// The writable view of a local disk.
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

    /// Writes and returns the group sequence number the write got.
    pub async fn write_seq(
        &self,
        offset: u64,
        payload: Payload,
        fua: bool,
    ) -> Result<u64, WriteError> {
        let plane = self.plane.upgrade().ok_or(WriteError::Closed)?;
        let pipeline = plane.pipeline_for(self.disk).ok_or(WriteError::Closed)?;
        pipeline
            .write(self.disk, offset, payload, fua, self.epoch)
            .await
    }

    async fn flush_inner(&self) -> Result<(), WriteError> {
        let plane = self.plane.upgrade().ok_or(WriteError::Closed)?;
        let pipeline = plane.pipeline_for(self.disk).ok_or(WriteError::Closed)?;
        pipeline.flush_disk(self.disk).await
    }

    async fn read_inner(&self, offset: u64, len: u32) -> Result<Bytes, WriteError> {
        let plane = self.plane.upgrade().ok_or(WriteError::Closed)?;
        let pipeline = plane.pipeline_for(self.disk).ok_or(WriteError::Closed)?;
        pipeline.read(self.disk, offset, len as usize).await
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

/// The writable view of a disk on an active-active replica: writes are ordered by the
/// group's sequencer (the primary) and acknowledged once this copy has applied them, so
/// both copies see one write order and a reader here sees its own writes.
pub struct RemoteVolume {
    /// Group id.
    pub cg_id: u64,
    /// The sequencer.
    pub primary: u64,
    /// The disk.
    pub disk: DiskId,
    /// Its size.
    pub size: u64,
    /// Epoch the volume was opened at.
    pub epoch: u64,
    /// The local copy.
    pub image: Arc<DiskImage>,
    /// The data plane (to reach the primary and see what this copy applied).
    pub plane: Weak<DataPlane>,
}

impl RemoteVolume {
    async fn write_inner(
        &self,
        offset: u64,
        payload: Payload,
        fua: bool,
    ) -> Result<(), DeviceError> {
        let plane = self.plane.upgrade().ok_or(DeviceError::ShuttingDown)?;
        let seq = plane
            .mirrored_write(self.primary, self.disk, offset, payload, fua, self.epoch)
            .await
            .map_err(|e| DeviceError::Io(std::io::Error::other(e.to_string())))?;
        plane
            .wait_applied(self.cg_id, seq)
            .await
            .map_err(|e| DeviceError::Io(std::io::Error::other(e.to_string())))
    }
}

impl BlockDevice for RemoteVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: u32) -> DeviceFuture<'_, Bytes> {
        Box::pin(async move {
            Arc::clone(&self.image)
                .read_async(offset, len as usize)
                .await
                .map_err(|e| DeviceError::Io(std::io::Error::other(e.to_string())))
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(self.write_inner(offset, Payload::Data(data), fua))
    }

    fn flush(&self) -> DeviceFuture<'_, ()> {
        // Every acknowledged write was applied here by a batch that ended in fdatasync.
        Box::pin(async move {
            Arc::clone(&self.image)
                .flush_async()
                .await
                .map_err(|e| DeviceError::Io(std::io::Error::other(e.to_string())))
        })
    }

    fn trim(&self, offset: u64, len: u32) -> DeviceFuture<'_, ()> {
        Box::pin(self.write_inner(offset, Payload::Zeroes(u64::from(len)), false))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        _may_trim: bool,
    ) -> DeviceFuture<'_, ()> {
        Box::pin(self.write_inner(offset, Payload::Zeroes(u64::from(len)), fua))
    }
}
