//! A FUSE file system for power-loss tests.
//!
//! SIGKILL keeps the page cache: a process that forgot an fsync loses nothing when it is
//! killed, so a test that kills processes cannot tell durable code from lucky code. This
//! file system passes every operation through to a backing directory and remembers, per
//! file, what it looked like when it was last fsynced (its length then and the old bytes
//! of every range overwritten since). [`CrashFs::power_cut`] unmounts it and rolls every
//! file back to that state: what a disk keeps when the power goes, under a simple model:
//!
//! - file data survives only through `fsync`/`fdatasync` of that file;
//! - metadata (create, rename, unlink, mkdir) is durable at once, as on a journaling file
//!   system that commits it before the data (a file created and written but never
//!   fsynced comes back empty, as ext4 may leave it).
//!
//! [`CrashFs::power_cut_torn`] models a disk whose volatile cache had written back some of
//! the unsynced data when the power went: each overwrite since the last fsync survives or
//! not, at random, and an unsynced tail survives up to a random length. A program that
//! takes unsynced data for a prefix of what it wrote finds otherwise.
//!
//! Symlinks are kept (as metadata). Unix sockets and hard links are not supported: keep
//! them elsewhere.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, Metadata, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Why the file system could not be mounted or rolled back.
#[derive(Debug, thiserror::Error)]
pub enum CrashFsError {
    /// The machine has no FUSE device.
    #[error("/dev/fuse is missing: load the fuse module (modprobe fuse) to run power-loss tests")]
    NoFuse,
    /// mount(2) or the FUSE session failed.
    #[error("cannot mount the crash file system on {path}: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Unmounting failed (a process still uses it?).
    #[error("cannot unmount the crash file system: {0}")]
    Unmount(String),
    /// Rolling a file back failed.
    #[error("cannot roll {path} back to its last fsync: {source}")]
    RollBack {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// What a power cut took away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerCut {
    /// Files written since their last fsync, rolled back.
    pub files: u64,
    /// Bytes past the fsynced length that were dropped.
    pub bytes_dropped: u64,
    /// Bytes overwritten since the last fsync that were put back.
    pub bytes_restored: u64,
    /// Torn cuts: overwrites since the last fsync that survived.
    pub writes_kept: u64,
}

/// A mounted crash file system.
pub struct CrashFs {
    state: Arc<State>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl CrashFs {
    /// Mounts a crash file system at `mountpoint` (an existing empty directory) that keeps
    /// its files in `backing` (an existing directory). Needs root and /dev/fuse.
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<CrashFs, CrashFsError> {
        if !Path::new("/dev/fuse").exists() {
            return Err(CrashFsError::NoFuse);
        }
        let root = backing
            .canonicalize()
            .map_err(|source| CrashFsError::Mount {
                path: mountpoint.to_path_buf(),
                source,
            })?;
        let state = Arc::new(State {
            root,
            paths: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            undo: Mutex::new(HashMap::new()),
        });
        let mut fs = CrashFs {
            state,
            mountpoint: mountpoint.to_path_buf(),
            session: None,
        };
        fs.mount_again()?;
        Ok(fs)
    }

    fn mount_again(&mut self) -> Result<(), CrashFsError> {
        let mut cfg = Config::default();
        cfg.mount_options = vec![MountOption::FSName("convoy-crashfs".into())];
        cfg.n_threads = Some(4);
        let fs = Fs {
            state: Arc::clone(&self.state),
        };
        let session = fuser::spawn_mount(fs, &self.mountpoint, &cfg).map_err(|source| {
            CrashFsError::Mount {
                path: self.mountpoint.clone(),
                source,
            }
        })?;
        self.session = Some(session);
        Ok(())
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Cuts the power: unmounts (every process using the file system must be gone: kill
    /// them first), rolls every file back to its last fsync, and mounts again.
    pub fn power_cut(&mut self) -> Result<PowerCut, CrashFsError> {
        self.cut(None)
    }

    /// Like [`CrashFs::power_cut`], but a random part of what was not synced survives
    /// (chosen by `seed`): every overwrite since a file's last fsync survives with
    /// probability 1/2, and its unsynced tail up to a random length.
    pub fn power_cut_torn(&mut self, seed: u64) -> Result<PowerCut, CrashFsError> {
        self.cut(Some(SplitMix(seed)))
    }

    fn cut(&mut self, torn: Option<SplitMix>) -> Result<PowerCut, CrashFsError> {
        self.unmount_when_unused()?;
        if let Some(s) = self.session.take() {
            // Unmounted: the session's thread ends with the kernel's connection.
            s.join().map_err(|e| CrashFsError::Unmount(e.to_string()))?;
        }
        self.state.handles().clear();
        let cut = self.state.roll_back(torn)?;
        self.mount_again()?;
        Ok(cut)
    }
}

impl CrashFs {
    /// Unmounts once no process uses the file system any more (a killed process may take
    /// a moment to close its files), within 10 s.
    fn unmount_when_unused(&self) -> Result<(), CrashFsError> {
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
            .map_err(|e| CrashFsError::Unmount(e.to_string()))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            // SAFETY: umount2 reads the C string it is given.
            if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            return Err(CrashFsError::Unmount(format!(
                "{e}; processes using it: {}",
                users_of(&self.mountpoint).join(", ")
            )));
        }
    }
}

/// Processes with an open file or their working directory under `dir`, as "pid (name)".
fn users_of(dir: &Path) -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut users = Vec::new();
    for p in procs.filter_map(Result::ok) {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let base = p.path();
        let cwd = std::fs::read_link(base.join("cwd")).ok();
        let files = std::fs::read_dir(base.join("fd"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_link(fd.path()).ok());
        if cwd.into_iter().chain(files).any(|l| l.starts_with(dir)) {
            let name = std::fs::read_to_string(base.join("comm")).unwrap_or_default();
            users.push(format!("{pid} ({})", name.trim()));
        }
    }
    users
}

impl Drop for CrashFs {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if self.unmount_when_unused().is_ok() {
            let _ = session.join();
            return;
        }
        // Still in use (a test failed with processes left): detach it rather than leave a
        // dead mount behind; its thread ends when the last user goes.
        if let Ok(path) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 reads the C string it is given.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        std::mem::forget(session);
    }
}

/// A small seeded generator (splitmix64): which unsynced writes a torn cut keeps.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=n`.
    fn up_to(&mut self, n: u64) -> u64 {
        if n == u64::MAX {
            self.next()
        } else {
            self.next() % (n + 1)
        }
    }
}

/// What a file looked like at its last fsync, as far as it changed since.
struct Undo {
    synced_len: u64,
    /// Old bytes of ranges (within `synced_len`) overwritten since, oldest first.
    saved: Vec<(u64, Vec<u8>)>,
}

struct Handle {
    file: File,
    ino: u64,
}

struct State {
    root: PathBuf,
    /// Inode → its path as last seen (inode numbers are the backing ones + 1; 1 is root).
    paths: Mutex<HashMap<u64, PathBuf>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    undo: Mutex<HashMap<u64, Undo>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

const TTL: Duration = Duration::ZERO;

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

impl State {
    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        lock(&self.handles)
    }

    fn ino_of(&self, path: &Path, meta: &Metadata) -> u64 {
        if path == self.root { 1 } else { meta.ino() + 1 }
    }

    fn path(&self, ino: u64) -> Result<PathBuf, Errno> {
        if ino == 1 {
            return Ok(self.root.clone());
        }
        lock(&self.paths).get(&ino).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    fn attr(&self, path: &Path, meta: &Metadata) -> FileAttr {
        let kind = if meta.is_dir() {
            FileType::Directory
        } else if meta.file_type().is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        FileAttr {
            ino: INodeNo(self.ino_of(path, meta)),
            size: meta.len(),
            blocks: meta.blocks(),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Looks `path` up and remembers its inode's path.
    fn entry(&self, path: PathBuf) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
        let attr = self.attr(&path, &meta);
        lock(&self.paths).insert(attr.ino.0, path);
        Ok(attr)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_handle(&self, file: File, ino: u64) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles().insert(fh, Arc::new(Handle { file, ino }));
        FileHandle(fh)
    }

    /// Before `file` (inode `ino`) changes in `[offset, offset + len)`: keeps what the
    /// range held at the last fsync, and the length then.
    fn before_change(&self, ino: u64, file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        let mut undo = lock(&self.undo);
        let u = match undo.entry(ino) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Undo {
                synced_len: file.metadata()?.len(),
                saved: Vec::new(),
            }),
        };
        let end = offset.saturating_add(len).min(u.synced_len);
        if offset < end {
            let mut old = vec![0u8; (end - offset) as usize];
            let n = read_at_most(file, &mut old, offset)?;
            old.truncate(n);
            u.saved.push((offset, old));
        }
        Ok(())
    }

    fn synced(&self, ino: u64) {
        lock(&self.undo).remove(&ino);
    }

    fn roll_back(&self, mut torn: Option<SplitMix>) -> Result<PowerCut, CrashFsError> {
        let undo: Vec<(u64, Undo)> = lock(&self.undo).drain().collect();
        let paths = lock(&self.paths).clone();
        let mut cut = PowerCut::default();
        for (ino, u) in undo {
            let Some(path) = paths.get(&ino) else {
                continue;
            };
            // Gone, or another file by now: its inode's data went with it.
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.ino() + 1 == ino && m.is_file() => {}
                _ => continue,
            }
            let failed = |source| CrashFsError::RollBack {
                path: path.clone(),
                source,
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(failed)?;
            let len = file.metadata().map_err(failed)?.len();
            cut.files += 1;
            // A torn cut keeps part of the unsynced tail (a file shrunk since its last
            // fsync comes back at its synced length: the bytes cut off are gone).
            let kept_len = match torn.as_mut() {
                Some(r) if len > u.synced_len => u.synced_len + r.up_to(len - u.synced_len),
                _ => u.synced_len,
            };
            cut.bytes_dropped += len.saturating_sub(kept_len);
            file.set_len(kept_len).map_err(failed)?;
            for (offset, old) in u.saved.iter().rev() {
                if torn.as_mut().is_some_and(|r| r.next() & 1 == 1) {
                    cut.writes_kept += 1;
                    continue;
                }
                let old = &old[..old.len().min(kept_len.saturating_sub(*offset) as usize)];
                file.write_all_at(old, *offset).map_err(failed)?;
                cut.bytes_restored += old.len() as u64;
            }
            file.sync_all().map_err(failed)?;
        }
        Ok(cut)
    }
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

struct Fs {
    state: Arc<State>,
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .state
            .child(parent.0, name)
            .and_then(|p| self.state.entry(p))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let result = (|| {
            let path = self.state.path(ino.0)?;
            let meta = match fh.and_then(|fh| self.state.handle(fh).ok()) {
                Some(h) => h.file.metadata(),
                None => std::fs::symlink_metadata(&path),
            }
            .map_err(|e| errno(&e))?;
            Ok(self.state.attr(&path, &meta))
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| {
            let path = self.state.path(ino.0)?;
            if let Some(size) = size {
                let file = match fh.and_then(|fh| self.state.handle(fh).ok()) {
                    Some(h) => h.file.try_clone(),
                    None => OpenOptions::new().read(true).write(true).open(&path),
                }
                .map_err(|e| errno(&e))?;
                let len = file.metadata().map_err(|e| errno(&e))?.len();
                if size < len {
                    self.state
                        .before_change(ino.0, &file, size, len - size)
                        .map_err(|e| errno(&e))?;
                } else {
                    self.state
                        .before_change(ino.0, &file, len, 0)
                        .map_err(|e| errno(&e))?;
                }
                file.set_len(size).map_err(|e| errno(&e))?;
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| errno(&e))?;
            }
            let meta = std::fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
            Ok(self.state.attr(&path, &meta))
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Sockets, pipes and devices: keep them off this file system.
            reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            return;
        }
        let result = (|| {
            let path = self.state.child(parent.0, name)?;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(&path)
                .map_err(|e| errno(&e))?;
            self.state.entry(path)
        })();
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = (|| {
            let path = self.state.child(parent.0, name)?;
            std::fs::create_dir(&path).map_err(|e| errno(&e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !umask))
                .map_err(|e| errno(&e))?;
            self.state.entry(path)
        })();
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = (|| {
            let path = self.state.child(parent.0, link_name)?;
            std::os::unix::fs::symlink(target, &path).map_err(|e| errno(&e))?;
            self.state.entry(path)
        })();
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .state
            .path(ino.0)
            .and_then(|p| std::fs::read_link(p).map_err(|e| errno(&e)))
        {
            Ok(target) => reply.data(target.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = (|| {
            let path = self.state.child(parent.0, name)?;
            std::fs::remove_file(&path).map_err(|e| errno(&e))
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = (|| {
            let path = self.state.child(parent.0, name)?;
            std::fs::remove_dir(&path).map_err(|e| errno(&e))
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        let result = (|| {
            let from = self.state.child(parent.0, name)?;
            let to = self.state.child(newparent.0, newname)?;
            std::fs::rename(&from, &to).map_err(|e| errno(&e))?;
            self.state.entry(to).map(|_| ())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = (|| {
            let path = self.state.path(ino.0)?;
            let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
            let file = OpenOptions::new()
                .read(true)
                .write(writes)
                .open(&path)
                .map_err(|e| errno(&e))?;
            if writes && flags.0 & libc::O_TRUNC != 0 {
                let len = file.metadata().map_err(|e| errno(&e))?.len();
                self.state
                    .before_change(ino.0, &file, 0, len)
                    .map_err(|e| errno(&e))?;
                file.set_len(0).map_err(|e| errno(&e))?;
            }
            Ok(self.state.add_handle(file, ino.0))
        })();
        match result {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = (|| {
            let h = self.state.handle(fh)?;
            let mut buf = vec![0u8; size as usize];
            let n = read_at_most(&h.file, &mut buf, offset).map_err(|e| errno(&e))?;
            buf.truncate(n);
            Ok(buf)
        })();
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = (|| {
            let h = self.state.handle(fh)?;
            self.state
                .before_change(h.ino, &h.file, offset, data.len() as u64)
                .map_err(|e| errno(&e))?;
            h.file.write_all_at(data, offset).map_err(|e| errno(&e))?;
            Ok(data.len() as u32)
        })();
        match result {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state.handles().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The backing file need not reach its disk: the power cut is this file system's.
        self.state.synced(ino.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = (|| {
            let path = self.state.path(ino.0)?;
            let mut entries: Vec<(u64, FileType, std::ffi::OsString)> = vec![
                (ino.0, FileType::Directory, ".".into()),
                (1, FileType::Directory, "..".into()),
            ];
            let mut children: Vec<_> = std::fs::read_dir(&path)
                .map_err(|e| errno(&e))?
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let meta = e.metadata().ok()?;
                    let kind = if meta.is_dir() {
                        FileType::Directory
                    } else if meta.file_type().is_symlink() {
                        FileType::Symlink
                    } else {
                        FileType::RegularFile
                    };
                    Some((meta.ino() + 1, kind, e.file_name()))
                })
                .collect();
            children.sort_by(|a, b| a.2.cmp(&b.2));
            entries.extend(children);
            Ok(entries)
        })();
        match result {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // SAFETY: statvfs only writes the struct it is given.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let Ok(root) = std::ffi::CString::new(self.state.root.as_os_str().as_encoded_bytes())
        else {
            reply.error(Errno::EINVAL);
            return;
        };
        // SAFETY: `root` is a valid C string and `st` a valid statvfs.
        if unsafe { libc::statvfs(root.as_ptr(), &mut st) } != 0 {
            reply.error(errno(&std::io::Error::last_os_error()));
            return;
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = (|| {
            let path = self.state.child(parent.0, name)?;
            let mut opts = OpenOptions::new();
            opts.read(true).write(true).mode(mode & !umask & 0o7777);
            if flags & libc::O_EXCL != 0 {
                opts.create_new(true);
            } else {
                opts.create(true);
            }
            let file = opts.open(&path).map_err(|e| errno(&e))?;
            let attr = self.state.entry(path)?;
            if flags & libc::O_TRUNC != 0 {
                let len = file.metadata().map_err(|e| errno(&e))?.len();
                self.state
                    .before_change(attr.ino.0, &file, 0, len)
                    .map_err(|e| errno(&e))?;
                file.set_len(0).map_err(|e| errno(&e))?;
            }
            let fh = self.state.add_handle(file, attr.ino.0);
            Ok((attr, fh))
        })();
        match result {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            let h = self.state.handle(fh)?;
            let changes_data =
                mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
            if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
                return Err(Errno::from_i32(libc::EOPNOTSUPP));
            }
            let len = if changes_data { length } else { 0 };
            self.state
                .before_change(h.ino, &h.file, offset, len)
                .map_err(|e| errno(&e))?;
            // SAFETY: a plain fallocate(2) on a file descriptor this handle owns.
            let r = unsafe {
                libc::fallocate(
                    h.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            };
            if r != 0 {
                return Err(errno(&std::io::Error::last_os_error()));
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fields drop in order: unmounted before its directories go.
    struct Mounted {
        fs: CrashFs,
        _mount: tempfile::TempDir,
        _backing: tempfile::TempDir,
    }

    fn mounted() -> Mounted {
        let (backing, mount) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        match CrashFs::mount(backing.path(), mount.path()) {
            Ok(fs) => Mounted {
                fs,
                _mount: mount,
                _backing: backing,
            },
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_power_cut_keeps_what_was_fsynced_and_drops_the_rest() {
        let mut m = mounted();
        let fs = &mut m.fs;
        let dir = fs.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        let synced = dir.join("synced");
        let mut f = File::create(&synced).unwrap();
        std::io::Write::write_all(&mut f, b"hello world").unwrap();
        f.sync_data().unwrap();
        // After the fsync: an overwrite, an append, and a second file never synced.
        f.write_all_at(b"HELLO", 0).unwrap();
        f.write_all_at(b" and more", 11).unwrap();
        drop(f);
        std::fs::write(dir.join("unsynced"), b"lost").unwrap();
        assert_eq!(
            std::fs::read(&synced).unwrap(),
            b"HELLO world and more".to_vec()
        );

        let cut = fs.power_cut().unwrap();
        assert_eq!(cut.files, 2, "{cut:?}");
        assert_eq!(std::fs::read(&synced).unwrap(), b"hello world".to_vec());
        // Its creation was metadata (kept); its data was never synced.
        assert_eq!(
            std::fs::read(dir.join("unsynced")).unwrap(),
            Vec::<u8>::new()
        );

        // A truncate since the last fsync is undone too; a synced one is kept.
        let f = OpenOptions::new().write(true).open(&synced).unwrap();
        f.set_len(5).unwrap();
        f.sync_all().unwrap();
        f.set_len(2).unwrap();
        drop(f);
        fs.power_cut().unwrap();
        assert_eq!(std::fs::read(&synced).unwrap(), b"hello".to_vec());
    }

    #[test]
    fn a_torn_power_cut_keeps_some_unsynced_writes_whole_and_every_synced_byte() {
        let mut m = mounted();
        let fs = &mut m.fs;
        let path = fs.path().join("disk");
        let f = File::create(&path).unwrap();
        f.write_all_at(&[0xaa; 150 * 4096], 0).unwrap();
        f.sync_data().unwrap();
        for block in 0..100u64 {
            f.write_all_at(&[0xbb; 4096], block * 4096).unwrap();
        }
        f.write_all_at(&[0xcc; 8192], 150 * 4096).unwrap();
        drop(f);

        let cut = fs.power_cut_torn(7).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(
            data.len() >= 150 * 4096 && data.len() <= 152 * 4096,
            "{}",
            data.len()
        );
        let blocks: Vec<&[u8]> = data[..150 * 4096].chunks(4096).collect();
        let kept = blocks[..100].iter().filter(|b| b[0] == 0xbb).count();
        for b in &blocks[..100] {
            assert!(b.iter().all(|&x| x == b[0]) && (b[0] == 0xaa || b[0] == 0xbb));
        }
        assert!(
            blocks[100..].iter().all(|b| b.iter().all(|&x| x == 0xaa)),
            "synced bytes no write touched changed"
        );
        assert!(kept > 0 && kept < 100, "kept {kept} of 100 overwrites");
        assert_eq!(cut.writes_kept, kept as u64, "{cut:?}");
        assert!(data[150 * 4096..].iter().all(|&x| x == 0xcc));
    }

    #[test]
    fn a_file_renamed_over_another_keeps_its_own_synced_state() {
        let mut m = mounted();
        let fs = &mut m.fs;
        // write-fsync-rename, as a careful program replaces a file.
        let tmp = fs.path().join("state.tmp");
        let dst = fs.path().join("state");
        std::fs::write(&dst, b"old").unwrap();
        File::open(&dst).unwrap().sync_all().unwrap();
        let f = File::create(&tmp).unwrap();
        f.write_all_at(b"new", 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        std::fs::rename(&tmp, &dst).unwrap();
        fs.power_cut().unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"new".to_vec());
        assert!(!tmp.exists());
    }
}
