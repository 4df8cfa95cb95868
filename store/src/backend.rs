//! The narrow I/O interface under [`DiskImage`](crate::DiskImage), and its file
//! implementation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::ReadWriteFlags;

use crate::error::{Result, StoreError};

/// Storage for one image: its data, its metadata record and its activity log.
///
/// Implementations must keep these promises, on which crash safety rests:
/// - `write_at` / `punch_hole` may be lost by a crash until `sync_data` returns after them;
///   `sync_data` makes every data change that returned before it was called durable.
/// - `replace_meta` and `replace_log` are atomic and durable when they return: after a
///   crash the file holds the complete old or the complete new content.
/// - `append_log` is durable when it returns; a crash during it may leave a prefix of the
///   appended bytes.
/// - Methods may be called concurrently from many threads; `append_log` and `replace_log`
///   are never called concurrently with each other by `DiskImage`.
pub trait Backend: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset` (within the image).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` (within the image).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the buffers one after another from `offset`, as one write.
    fn write_vectored_at(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<()> {
        let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.write_at(&whole, offset)
    }
    /// Makes `offset..offset + len` read as zeros, releasing its space where possible.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes all returned data changes durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Starts writing `offset..offset + len` to the device without waiting, so that a later
    /// `sync_data` has less left to do (bulk copies). Promises nothing about durability.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Current length of the image data in bytes.
    fn image_len(&self) -> io::Result<u64>;
    /// The next region at or after `offset` that may hold non-zero data, or `None` if the
    /// rest reads as zeros. Must never skip data; may report holes as data.
    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        Ok(Some(offset..u64::MAX))
    }
    /// The metadata record, or `None` if there is none.
    fn read_meta(&self) -> io::Result<Option<Vec<u8>>>;
    /// Atomically and durably replaces the metadata record.
    fn replace_meta(&self, bytes: &[u8]) -> io::Result<()>;
    /// The activity log, or `None` if there is none.
    fn read_log(&self) -> io::Result<Option<Vec<u8>>>;
    /// Atomically and durably replaces the activity log.
    fn replace_log(&self, bytes: &[u8]) -> io::Result<()>;
    /// Durably appends to the activity log.
    fn append_log(&self, bytes: &[u8]) -> io::Result<()>;
    /// A name for error messages (the image path).
    fn describe(&self) -> String;
}

/// An image stored as `<dir>/disk-<id>.img` (sparse raw data), `<dir>/disk-<id>.meta`
/// (metadata checkpoint) and `<dir>/disk-<id>.al` (activity log).
#[derive(Debug)]
pub struct FileBackend {
    image_path: PathBuf,
    meta_path: PathBuf,
    log_path: PathBuf,
    image: File,
    /// Append handle of the current log file; reset when the file is replaced so appends
    /// never go to an unlinked inode.
    log: Mutex<Option<File>>,
    /// Whether the kernel takes `RWF_DONTCACHE` on this file (cleared on the first refusal).
    uncached: AtomicBool,
}

/// Reads and writes at least this long bypass the page cache's retention (see
/// [`FileBackend::bulk_flags`]).
const UNCACHED_IO_MIN: usize = 64 << 10;

/// `RWF_DONTCACHE` (Linux 6.14+; ext4 and XFS since 6.15): buffered I/O whose pages are
/// dropped once written back (or once read, if they were not cached before).
const RWF_DONTCACHE: ReadWriteFlags = ReadWriteFlags::from_bits_retain(0x80);

/// The three paths of image `id` in `dir`: data, metadata, activity log.
pub fn image_paths(dir: &Path, id: &str) -> Result<[PathBuf; 3]> {
    validate_id(id)?;
    Ok([
        dir.join(format!("disk-{id}.img")),
        dir.join(format!("disk-{id}.meta")),
        dir.join(format!("disk-{id}.al")),
    ])
}

fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "disk id",
            format!("{id:?}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.'"),
        ))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FileBackend {
    /// Creates a sparse image file of `size` bytes (no metadata yet) and makes its
    /// existence durable. Fails if any of the image's files exists.
    pub fn create(dir: &Path, id: &str, size: u64) -> Result<Self> {
        let [image_path, meta_path, log_path] = image_paths(dir, id)?;
        for p in [&image_path, &meta_path, &log_path] {
            if p.exists() {
                return Err(StoreError::AlreadyExists {
                    path: p.display().to_string(),
                });
            }
        }
        let image = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&image_path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => StoreError::AlreadyExists {
                    path: image_path.display().to_string(),
                },
                _ => StoreError::io(format!("create {}", image_path.display()), e),
            })?;
        let ctx = |what: &str| format!("{what} {}", image_path.display());
        image
            .set_len(size)
            .map_err(|e| StoreError::io(ctx("size"), e))?;
        image
            .sync_all()
            .map_err(|e| StoreError::io(ctx("fsync"), e))?;
        sync_dir(dir).map_err(|e| StoreError::io(format!("fsync {}", dir.display()), e))?;
        Ok(Self {
            image_path,
            meta_path,
            log_path,
            image,
            log: Mutex::new(None),
            uncached: AtomicBool::new(true),
        })
    }

    /// Opens an existing image's files.
    pub fn open(dir: &Path, id: &str) -> Result<Self> {
        let [image_path, meta_path, log_path] = image_paths(dir, id)?;
        let image = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image_path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::NotFound {
                    path: image_path.display().to_string(),
                },
                _ => StoreError::io(format!("open {}", image_path.display()), e),
            })?;
        Ok(Self {
            image_path,
            meta_path,
            log_path,
            image,
            log: Mutex::new(None),
            uncached: AtomicBool::new(true),
        })
    }

    /// Path of the image data file.
    pub fn image_path(&self) -> &Path {
        &self.image_path
    }

    /// Flags for an I/O of `len` bytes. Bulk transfers (copies, resyncs, hash passes, big
    /// guest I/O) go uncached: with large page-cache folios (ext4 on Linux 6.16+), a
    /// big write or readahead leaves folios of up to 2 MiB behind, and every later 4 KiB
    /// guest write into one walks all its block buffers — measured 2 us -> ~45 us per
    /// write on such a kernel. Uncached pages are evicted once clean, so small guest
    /// writes get small folios again.
    fn bulk_flags(&self, len: usize) -> Option<ReadWriteFlags> {
        (len >= UNCACHED_IO_MIN && self.uncached.load(Ordering::Relaxed)).then_some(RWF_DONTCACHE)
    }

    /// The kernel or file system refused `RWF_DONTCACHE`: use plain I/O from now on.
    fn uncached_refused(&self, e: rustix::io::Errno) -> bool {
        let refused = matches!(
            e,
            rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS
        );
        if refused {
            self.uncached.store(false, Ordering::Relaxed);
        }
        refused
    }

    /// pwritev of all `bufs` at `offset`, with `flags` if given.
    fn pwritev_all(
        &self,
        bufs: &[io::IoSlice<'_>],
        offset: u64,
        mut flags: Option<ReadWriteFlags>,
    ) -> io::Result<()> {
        let mut owned: Vec<io::IoSlice<'_>> = bufs.to_vec();
        let mut slices = &mut owned[..];
        let mut at = offset;
        // At most IOV_MAX slices per call; pwritev may also write less than asked.
        while !slices.is_empty() {
            let n = slices.len().min(1024);
            let written = match flags {
                Some(f) => match rustix::io::pwritev2(&self.image, &slices[..n], at, f) {
                    Err(e) if self.uncached_refused(e) => {
                        flags = None;
                        continue;
                    }
                    r => r?,
                },
                None => rustix::io::pwritev(&self.image, &slices[..n], at)?,
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            at += written as u64;
            io::IoSlice::advance_slices(&mut slices, written);
        }
        Ok(())
    }
}

fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Backend for FileBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(flags) = self.bulk_flags(buf.len()) else {
            return self.image.read_exact_at(buf, offset);
        };
        let mut done = 0;
        while done < buf.len() {
            let mut slice = [io::IoSliceMut::new(&mut buf[done..])];
            match rustix::io::preadv2(&self.image, &mut slice, offset + done as u64, flags) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) if self.uncached_refused(e) => {
                    return self
                        .image
                        .read_exact_at(&mut buf[done..], offset + done as u64);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.bulk_flags(buf.len()) {
            None => self.image.write_all_at(buf, offset),
            flags => self.pwritev_all(&[io::IoSlice::new(buf)], offset, flags),
        }
    }

    fn write_vectored_at(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<()> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        self.pwritev_all(bufs, offset, self.bulk_flags(len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.image, flags, offset, len) {
            Ok(()) => Ok(()),
            // File systems without hole punching: write zeros instead.
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let zeros = vec![0u8; 1 << 20];
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(zeros.len() as u64) as usize;
                    self.image.write_all_at(&zeros[..n], pos)?;
                    pos += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.image.sync_data()
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        // POSIX_FADV_DONTNEED starts asynchronous writeback of the range's dirty pages
        // (WB_SYNC_NONE) and drops only pages already clean, which these are not: the
        // effect of sync_file_range(SYNC_FILE_RANGE_WRITE), without unsafe code.
        let Some(len) = std::num::NonZeroU64::new(len) else {
            return Ok(());
        };
        rustix::fs::fadvise(&self.image, offset, Some(len), rustix::fs::Advice::DontNeed)
            .map_err(io::Error::from)
    }

    fn image_len(&self) -> io::Result<u64> {
        Ok(self.image.metadata()?.len())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        // lseek moves the shared file position, which positional I/O never uses.
        let start = match rustix::fs::seek(&self.image, SeekFrom::Data(offset)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => return Ok(None),
            Err(rustix::io::Errno::INVAL) => return Ok(Some(offset..u64::MAX)),
            Err(e) => return Err(e.into()),
        };
        // Unknown hole position: report data to the end, which never skips data.
        let end = rustix::fs::seek(&self.image, SeekFrom::Hole(start)).unwrap_or(u64::MAX);
        Ok(Some(start..end.max(start + 1)))
    }

    fn read_meta(&self) -> io::Result<Option<Vec<u8>>> {
        read_optional(&self.meta_path)
    }

    fn replace_meta(&self, bytes: &[u8]) -> io::Result<()> {
        convoy_codec::file::durable_write(&self.meta_path, bytes)
    }

    fn read_log(&self) -> io::Result<Option<Vec<u8>>> {
        read_optional(&self.log_path)
    }

    fn replace_log(&self, bytes: &[u8]) -> io::Result<()> {
        let mut handle = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        *handle = None;
        convoy_codec::file::durable_write(&self.log_path, bytes)
    }

    fn append_log(&self, bytes: &[u8]) -> io::Result<()> {
        let mut handle = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let f = match handle.as_mut() {
            Some(f) => f,
            // A missing log is created headerless, which recovery reads as "trust nothing":
            // conservative, never wrong.
            None => handle.insert(
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&self.log_path)?,
            ),
        };
        f.write_all(bytes)?;
        f.sync_data()
    }

    fn describe(&self) -> String {
        self.image_path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        let d = Path::new("/x");
        assert!(image_paths(d, "vm1-disk_0.a").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(image_paths(d, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn next_data_skips_holes() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::create(dir.path(), "t", 64 << 20).unwrap();
        assert_eq!(b.next_data(0).unwrap(), None);
        b.write_at(&[1; 4096], 32 << 20).unwrap();
        let r = b.next_data(0).unwrap().unwrap();
        assert!(r.start <= 32 << 20 && r.end > 32 << 20, "{r:?}");
        b.punch_hole(32 << 20, 4096).unwrap();
        let mut buf = [9u8; 4096];
        b.read_at(&mut buf, 32 << 20).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
    }

    #[test]
    fn writeback_hint_keeps_dirty_data_and_cached_reads_intact() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::create(dir.path(), "t", 8 << 20).unwrap();
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        b.write_at(&data, 1 << 20).unwrap();
        b.start_writeback(1 << 20, data.len() as u64).unwrap();
        b.start_writeback(0, 0).unwrap();
        let mut back = vec![0u8; data.len()];
        b.read_at(&mut back, 1 << 20).unwrap();
        assert!(back == data, "data changed by the writeback hint");
        // Again once the pages are clean (they may be dropped from the cache, not lost).
        b.sync_data().unwrap();
        b.start_writeback(1 << 20, data.len() as u64).unwrap();
        b.read_at(&mut back, 1 << 20).unwrap();
        assert!(back == data, "data changed by the writeback hint");
    }

    #[test]
    fn vectored_writes_land_like_one_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::create(dir.path(), "t", 8 << 20).unwrap();
        // Many uneven pieces (more than IOV_MAX) must land back to back.
        let pieces: Vec<Vec<u8>> = (0..1500usize)
            .map(|i| vec![(i % 256) as u8; 1 + i % 700])
            .collect();
        let slices: Vec<io::IoSlice<'_>> = pieces.iter().map(|p| io::IoSlice::new(p)).collect();
        b.write_vectored_at(&slices, 12_345).unwrap();
        let whole = pieces.concat();
        let mut back = vec![0u8; whole.len()];
        b.read_at(&mut back, 12_345).unwrap();
        assert!(back == whole);
    }

    #[test]
    fn uncached_bulk_io_and_small_cached_io_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::create(dir.path(), "t", 8 << 20).unwrap();
        let big: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 253) as u8).collect();
        assert!(b.bulk_flags(4096).is_none(), "small I/O must stay cached");
        b.write_at(&big, 1 << 20).unwrap();
        // A small write into the bulk-written range, before and after writeback.
        b.write_at(&[7; 4096], (1 << 20) + 8192).unwrap();
        let mut expect = big.clone();
        expect[8192..8192 + 4096].fill(7);
        for round in 0..2 {
            let mut back = vec![0u8; expect.len()];
            b.read_at(&mut back, 1 << 20).unwrap();
            assert!(back == expect, "round {round}: bulk read differs");
            let mut small = [0u8; 4096];
            b.read_at(&mut small, (1 << 20) + 8192).unwrap();
            assert_eq!(small, [7; 4096]);
            b.sync_data().unwrap();
        }
        // A bulk read past the end is an error, not a short buffer.
        let mut past = vec![0u8; 1 << 20];
        assert!(b.read_at(&mut past, (8 << 20) - 4096).is_err());
    }
}
