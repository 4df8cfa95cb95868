//! A block device backed by a (sparse) file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::device::{BlockDevice, DeviceError, DeviceFuture};

/// Zeroes written by `write_zeroes`, one chunk at a time.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// A [`BlockDevice`] on a regular file, using positional reads and writes on Tokio's
/// blocking pool.
///
/// Durability: `flush` and FUA writes call `fdatasync`, which covers every write made
/// before it through any handle to the file, so one `FileDevice` may be shared by many
/// connections (as the NBD multi-connection flag promises). TRIM is accepted and ignored,
/// and `write_zeroes` writes real zeroes (punching holes would need `fallocate`), so the
/// file never becomes sparser than it was created.
#[derive(Debug, Clone)]
pub struct FileDevice {
    file: Arc<File>,
    size: u64,
    read_only: bool,
}

impl FileDevice {
    /// Opens an existing file; its current length is the export size.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file, read_only)
    }

    /// Creates a new sparse file of `size` bytes (it must not exist yet), and makes the
    /// file and its directory entry durable before returning.
    pub fn create(path: impl AsRef<Path>, size: u64) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(size)?;
        file.sync_all()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Self::from_file(file, false)
    }

    /// Wraps an open file; its current length is the export size. A file opened without
    /// write access must be passed with `read_only = true`, or writes fail with `EPERM`
    /// or `EIO` from the OS.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self {
            file: Arc::new(file),
            size,
            read_only,
        })
    }
}

/// Runs blocking file I/O off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, DeviceError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(DeviceError::from),
        Err(join) => Err(DeviceError::Io(io::Error::other(join))),
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, len: u32) -> DeviceFuture<'_, Bytes> {
        let file = Arc::clone(&self.file);
        Box::pin(async move {
            let buf = blocking(move || {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await?;
            Ok(Bytes::from(buf))
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceFuture<'_, ()> {
        let file = Arc::clone(&self.file);
        Box::pin(blocking(move || {
            file.write_all_at(&data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        }))
    }

    fn flush(&self) -> DeviceFuture<'_, ()> {
        let file = Arc::clone(&self.file);
        Box::pin(blocking(move || file.sync_data()))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        _may_trim: bool,
    ) -> DeviceFuture<'_, ()> {
        let file = Arc::clone(&self.file);
        Box::pin(blocking(move || {
            let end = offset + u64::from(len);
            let mut at = offset;
            while at < end {
                let n =
                    usize::try_from(end - at).map_or(ZEROES.len(), |left| left.min(ZEROES.len()));
                file.write_all_at(&ZEROES[..n], at)?;
                at += n as u64;
            }
            if fua {
                file.sync_data()?;
            }
            Ok(())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_device_reads_back_writes_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::create(dir.path().join("disk.img"), 3 << 20).unwrap();
        assert_eq!(dev.size(), 3 << 20);
        assert!(!dev.read_only());
        assert_eq!(dev.read(0, 4).await.unwrap(), Bytes::from_static(&[0; 4]));
        dev.write(10, Bytes::from_static(b"hello"), true)
            .await
            .unwrap();
        assert_eq!(&dev.read(10, 5).await.unwrap()[..], b"hello");
        let ones = Bytes::from(vec![1u8; 3 << 20]);
        dev.write(0, ones, false).await.unwrap();
        dev.write_zeroes(5, (2 << 20) + 3, false, true)
            .await
            .unwrap();
        dev.flush().await.unwrap();
        let all = dev.read(0, 3 << 20).await.unwrap();
        assert!(all[..5].iter().all(|&b| b == 1));
        assert!(all[5..(2 << 20) + 8].iter().all(|&b| b == 0));
        assert!(all[(2 << 20) + 8..].iter().all(|&b| b == 1));
        assert!(
            dev.read((3 << 20) - 1, 2).await.is_err(),
            "read past EOF must fail"
        );
        assert!(
            FileDevice::create(dir.path().join("disk.img"), 1).is_err(),
            "create must not clobber"
        );
        let ro = FileDevice::open(dir.path().join("disk.img"), true).unwrap();
        assert!(ro.read_only());
        assert_eq!(ro.size(), 3 << 20);
    }
}
