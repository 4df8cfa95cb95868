//! The narrow I/O interface under [`DiskImage`](crate::DiskImage), and its file
//! implementation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::ReadWriteFlags;

use crate::error::{Result, StoreError};

/// Storage for one image: its data, its metadata record and its activity log.
///
/// Implementations must keep these promises, on which crash safety rests:
/// - `write_at` / `punch_hole` may be lost by a crash until `sync_data` returns after them;
///   `sync_data` makes every data change that returned before it was called durable. The
///   same holds for `write_hashes` and `sync_hashes` on the chunk-hash file, and a crash
///   never tears one 32-byte hash (hashes are 32-byte aligned, within one sector).
/// - `replace_meta` and `replace_log` are atomic and durable when they return: after a
///   crash the file holds the complete old or the complete new content. When they fail
///   with `ENOSPC`/`EDQUOT`, the old content is still in place and nothing new is pending.
/// - `append_log` is durable when it returns; a crash during it may leave a prefix of the
///   appended bytes. After `reserve_log(n)` returned, appends of up to `n` bytes in total
///   do not fail for lack of space.
/// - A failed sync (`sync_data`, `sync_hashes`) may have lost the writes it covered even
///   if a later sync succeeds (Linux marks such pages clean): callers must treat it as
///   permanent.
/// - Methods may be called concurrently from many threads; `append_log`, `reserve_log` and
///   `replace_log` are never called concurrently with each other by `DiskImage`.
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
    /// Makes sure the next `len` bytes appended to the activity log have space, so an
    /// append never fails half-way for lack of it. An error leaves the log unchanged.
    fn reserve_log(&self, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Reads `buf.len()` bytes of the chunk-hash file at `offset`; bytes past its end read
    /// as zeros.
    fn read_hashes(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` to the chunk-hash file at `offset` (durable after `sync_hashes`). An
    /// all-zero, page-aligned buffer may be stored as a hole.
    fn write_hashes(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every returned `write_hashes` and `set_hashes_len` durable.
    fn sync_hashes(&self) -> io::Result<()>;
    /// Length of the chunk-hash file (0 if it does not exist).
    fn hashes_len(&self) -> io::Result<u64>;
    /// Sets the length of the chunk-hash file, creating it if needed (new bytes are zeros).
    fn set_hashes_len(&self, len: u64) -> io::Result<()>;
    /// Like [`Backend::next_data`] for the chunk-hash file.
    fn hashes_next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        Ok(Some(offset..u64::MAX))
    }
    /// A name for error messages (the image path).
    fn describe(&self) -> String;
}

/// An image stored as `<dir>/disk-<id>.img` (sparse raw data), `<dir>/disk-<id>.meta`
/// (metadata checkpoint), `<dir>/disk-<id>.al` (activity log) and `<dir>/disk-<id>.hashes`
/// (chunk hashes, 32 bytes per chunk, sparse).
#[derive(Debug)]
pub struct FileBackend {
    image_path: PathBuf,
    meta_path: PathBuf,
    log_path: PathBuf,
    image: File,
    hashes: File,
    /// Append handle of the current log file; reset when the file is replaced so appends
    /// never go to an unlinked inode, and after a failed append so nothing is ever
    /// appended behind a torn frame.
    log: Mutex<LogHandle>,
    /// Whether the kernel takes `RWF_DONTCACHE` on this file (cleared on the first refusal).
    uncached: AtomicBool,
}

/// The activity log's append handle and how far space is reserved behind its end.
#[derive(Debug, Default)]
struct LogHandle {
    file: Option<File>,
    /// Length of the file as appended through this handle.
    len: u64,
    /// Space is allocated up to here (`fallocate` with `KEEP_SIZE`).
    reserved: u64,
}

/// Space reserved behind the activity log's end at a time: far more than a checkpoint
/// interval's appends (a frame per batch of extents, tens of bytes), so that in normal
/// operation an append never allocates and so never fails with `ENOSPC`.
const LOG_RESERVE: u64 = 256 << 10;

/// Reads and writes at least this long bypass the page cache's retention (see
/// [`FileBackend::bulk_flags`]).
const UNCACHED_IO_MIN: usize = 64 << 10;

/// `RWF_DONTCACHE` (Linux 6.14+; ext4 and XFS since 6.15): buffered I/O whose pages are
/// dropped once written back (or once read, if they were not cached before).
const RWF_DONTCACHE: ReadWriteFlags = ReadWriteFlags::from_bits_retain(0x80);

/// Fault injection for tests only: milliseconds every [`FileBackend`] fsync/fdatasync of
/// image data, chunk hashes and activity-log appends waits before it syncs (0: none).
static TEST_SYNC_DELAY_MS: AtomicU64 = AtomicU64::new(0);

/// **Test-only fault injection**: makes every later fsync/fdatasync of every
/// [`FileBackend`] in this process (image data, chunk hashes, activity-log appends) take
/// `delay` longer, as on a slow or overloaded disk. Tests use it to check that a slow disk
/// stalls only the I/O that waits for it; nothing else should call it.
pub fn set_test_sync_delay(delay: Duration) {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    TEST_SYNC_DELAY_MS.store(ms, Ordering::Relaxed);
}

/// Fault injection for tests only: while this file exists, every [`FileBackend`]
/// fsync/fdatasync fails with EIO.
static TEST_SYNC_FAIL_IF: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// **Test-only fault injection**: from now on, every fsync/fdatasync of every
/// [`FileBackend`] in this process fails with EIO while `trigger` exists, as on a disk
/// that lost its write cache. Tests use it to check that a failed sync fences the image
/// and is reported; nothing else should call it. Set once per process.
pub fn set_test_sync_failure_while(trigger: PathBuf) {
    let _ = TEST_SYNC_FAIL_IF.set(trigger);
}

/// Waits out the test-only sync delay and fails as the test-only trigger says, if set
/// (see [`set_test_sync_delay`], [`set_test_sync_failure_while`]).
fn test_sync_delay() -> io::Result<()> {
    let ms = TEST_SYNC_DELAY_MS.load(Ordering::Relaxed);
    if ms > 0 {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if TEST_SYNC_FAIL_IF.get().is_some_and(|p| p.exists()) {
        return Err(io::Error::from_raw_os_error(
            rustix::io::Errno::IO.raw_os_error(),
        ));
    }
    Ok(())
}

/// The paths of image `id` in `dir`: data, metadata, activity log. The image has one more
/// file, its chunk hashes (see [`image_files`]); this keeps its shape for callers that
/// only look for the data file.
pub fn image_paths(dir: &Path, id: &str) -> Result<[PathBuf; 3]> {
    let [img, meta, log, _] = image_files(dir, id)?;
    Ok([img, meta, log])
}

/// Every file of image `id` in `dir`: data, metadata, activity log, chunk hashes.
pub fn image_files(dir: &Path, id: &str) -> Result<[PathBuf; 4]> {
    validate_id(id)?;
    Ok([
        dir.join(format!("disk-{id}.img")),
        dir.join(format!("disk-{id}.meta")),
        dir.join(format!("disk-{id}.al")),
        dir.join(format!("disk-{id}.hashes")),
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
        let [image_path, meta_path, log_path, hashes_path] = image_files(dir, id)?;
        for p in [&image_path, &meta_path, &log_path, &hashes_path] {
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
        let rest = (|| {
            image
                .set_len(size)
                .map_err(|e| StoreError::io(ctx("size"), e))?;
            image
                .sync_all()
                .map_err(|e| StoreError::io(ctx("fsync"), e))?;
            let hashes = open_hashes(&hashes_path)?;
            sync_dir(dir).map_err(|e| StoreError::io(format!("fsync {}", dir.display()), e))?;
            Ok(hashes)
        })();
        let hashes = match rest {
            Ok(h) => h,
            Err(e) => {
                // Leave nothing behind that a later open would refuse as a broken image
                // (a file system too small, or one that refuses the size).
                let _ = fs::remove_file(&image_path);
                let _ = fs::remove_file(&hashes_path);
                return Err(e);
            }
        };
        Ok(Self {
            image_path,
            meta_path,
            log_path,
            image,
            hashes,
            log: Mutex::new(LogHandle::default()),
            uncached: AtomicBool::new(true),
        })
    }

    /// Opens an existing image's files.
    pub fn open(dir: &Path, id: &str) -> Result<Self> {
        let [image_path, meta_path, log_path, hashes_path] = image_files(dir, id)?;
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
        // Images written before chunk hashes had their own file have none yet: opening
        // creates it empty, and the metadata upgrade fills it.
        let hashes = open_hashes(&hashes_path)?;
        Ok(Self {
            image_path,
            meta_path,
            log_path,
            image,
            hashes,
            log: Mutex::new(LogHandle::default()),
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

fn open_hashes(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StoreError::io(format!("open {}", path.display()), e))
}

/// `SEEK_DATA`/`SEEK_HOLE` from `offset`: the next region that may hold data.
fn seek_data(file: &File, offset: u64) -> io::Result<Option<Range<u64>>> {
    // lseek moves the shared file position, which positional I/O never uses.
    let start = match rustix::fs::seek(file, SeekFrom::Data(offset)) {
        Ok(s) => s,
        Err(rustix::io::Errno::NXIO) => return Ok(None),
        Err(rustix::io::Errno::INVAL) => return Ok(Some(offset..u64::MAX)),
        Err(e) => return Err(e.into()),
    };
    // Unknown hole position: report data to the end, which never skips data.
    let end = rustix::fs::seek(file, SeekFrom::Hole(start)).unwrap_or(u64::MAX);
    Ok(Some(start..end.max(start + 1)))
}

/// Replaces `path` durably; on failure removes the temporary file the replacement left
/// (`convoy_codec::file::durable_write` names it `.<name>.tmp`), so a full file system
/// gets its space back.
fn durable_replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let res = convoy_codec::file::durable_write(path, bytes);
    if res.is_err() {
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
            let _ = fs::remove_file(dir.join(format!(".{}.tmp", name.to_string_lossy())));
        }
    }
    res
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
        test_sync_delay()?;
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
        seek_data(&self.image, offset)
    }

    fn read_meta(&self) -> io::Result<Option<Vec<u8>>> {
        read_optional(&self.meta_path)
    }

    fn replace_meta(&self, bytes: &[u8]) -> io::Result<()> {
        durable_replace(&self.meta_path, bytes)
    }

    fn read_log(&self) -> io::Result<Option<Vec<u8>>> {
        read_optional(&self.log_path)
    }

    fn replace_log(&self, bytes: &[u8]) -> io::Result<()> {
        let mut handle = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        *handle = LogHandle::default();
        durable_replace(&self.log_path, bytes)?;
        // Reserve room for the appends until the next replacement now, while the caller
        // (a checkpoint) can afford to fail; best effort, an append reserves again.
        let file = OpenOptions::new().append(true).open(&self.log_path)?;
        *handle = LogHandle {
            file: Some(file),
            len: bytes.len() as u64,
            reserved: bytes.len() as u64,
        };
        let _ = reserve(&mut handle, LOG_RESERVE);
        Ok(())
    }

    fn reserve_log(&self, len: u64) -> io::Result<()> {
        let mut handle = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log_file(&mut handle, &self.log_path)?;
        reserve(&mut handle, len)
    }

    fn append_log(&self, bytes: &[u8]) -> io::Result<()> {
        let mut handle = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let res = log_file(&mut handle, &self.log_path).and_then(|f| {
            f.write_all(bytes)?;
            test_sync_delay()?;
            f.sync_data()
        });
        match res {
            Ok(()) => {
                handle.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // The file may now end in a torn frame: never append behind it.
                *handle = LogHandle::default();
                Err(e)
            }
        }
    }

    fn read_hashes(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.hashes.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_hashes(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Pages of zero hashes (chunks reading as zeros) stay holes, so the file of a
        // sparse disk stays small and a discarded region gives its space back.
        if buf.len() >= 4096
            && offset % 4096 == 0
            && buf.len() % 4096 == 0
            && crate::hash::is_zero(buf)
        {
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match rustix::fs::fallocate(&self.hashes, flags, offset, buf.len() as u64) {
                Ok(()) => {
                    let end = offset + buf.len() as u64;
                    if self.hashes.metadata()?.len() < end {
                        self.hashes.set_len(end)?;
                    }
                    return Ok(());
                }
                Err(rustix::io::Errno::OPNOTSUPP) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.hashes.write_all_at(buf, offset)
    }

    fn sync_hashes(&self) -> io::Result<()> {
        test_sync_delay()?;
        self.hashes.sync_data()
    }

    fn hashes_len(&self) -> io::Result<u64> {
        Ok(self.hashes.metadata()?.len())
    }

    fn set_hashes_len(&self, len: u64) -> io::Result<()> {
        self.hashes.set_len(len)
    }

    fn hashes_next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        seek_data(&self.hashes, offset)
    }

    fn describe(&self) -> String {
        self.image_path.display().to_string()
    }
}

/// The append handle, opened (creating a headerless log if none exists) if needed.
fn log_file<'a>(handle: &'a mut LogHandle, path: &Path) -> io::Result<&'a mut File> {
    if handle.file.is_none() {
        // A missing log is created headerless, which recovery reads as "trust nothing":
        // conservative, never wrong.
        let f = OpenOptions::new().append(true).create(true).open(path)?;
        let len = f.metadata()?.len();
        *handle = LogHandle {
            file: Some(f),
            len,
            reserved: len,
        };
    }
    handle
        .file
        .as_mut()
        .ok_or_else(|| io::Error::other("activity log handle missing"))
}

/// Allocates space so the next `len` appended bytes need none.
fn reserve(handle: &mut LogHandle, len: u64) -> io::Result<()> {
    let need = handle.len + len;
    if need <= handle.reserved {
        return Ok(());
    }
    let Some(f) = handle.file.as_ref() else {
        return Ok(());
    };
    let end = need.max(handle.len + LOG_RESERVE);
    match rustix::fs::fallocate(f, FallocateFlags::KEEP_SIZE, handle.len, end - handle.len) {
        Ok(()) => {
            handle.reserved = end;
            Ok(())
        }
        // No preallocation on this file system: appends allocate as they go (and are
        // not asked again each time).
        Err(rustix::io::Errno::OPNOTSUPP) => {
            handle.reserved = end;
            Ok(())
        }
        Err(e) => Err(e.into()),
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
    fn a_create_the_file_system_refuses_leaves_no_files() {
        let dir = tempfile::tempdir().unwrap();
        // Past what any file system holds (ext4: 16 TiB - 4 KiB; XFS, tmpfs: 8 EiB).
        assert!(FileBackend::create(dir.path(), "t", u64::MAX / 2 + 1).is_err());
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
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
