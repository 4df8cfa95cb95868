//! An in-memory [`Backend`] that simulates crashes and disk faults, for deterministic tests
//! of the store and of layers built on it.
//!
//! It models what a real file system promises and nothing more: data and chunk-hash
//! writes are volatile until their sync; metadata and log replacements are atomic; log
//! appends are durable when they return. Storage is sparse (4 KiB pages), so images of
//! many TiB cost only what is written.
//!
//! Faults:
//! - A failpoint ([`SimBackend::fail_after`]) makes the n-th mutating call "die" part-way
//!   (a prefix of a write or append lands, a replacement lands or not) and every later
//!   call fail, as if the process had been killed there.
//! - [`SimBackend::inject`] makes one later call fail the way a failing disk does
//!   ([`Fault`]), and [`SimBackend::set_full`] makes the file system full.
//!
//! [`SimBackend::crash`] then decides what survived (power loss drops unsynced writes at
//! random) and lets the next incarnation open the image.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::backend::Backend;

/// Shared handle to one simulated image; clones see the same storage (the "disk" that
/// outlives a crashed process).
#[derive(Clone, Debug)]
pub struct SimBackend {
    inner: Arc<(Mutex<SimState>, Condvar)>,
}

/// Calls that [`SimBackend::pause`] can hold, to force an interleaving in a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// `write_at` and `punch_hole`, before any data lands.
    Writes,
    /// `sync_data` and `sync_hashes`, before anything is synced.
    Syncs,
    /// `read_at`, after the data was copied out (the caller holds what it read).
    Reads,
    /// `replace_meta`, before the record is replaced.
    Meta,
}

/// A fault that one later call meets, as on a failing or full disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next `sync_data` fails with `EIO`, and the data writes it should have made
    /// durable are lost at a power loss even if a later sync succeeds (Linux marks the
    /// pages of a failed write-back clean).
    DataSyncFails,
    /// The same for the next `sync_hashes`.
    HashSyncFails,
    /// The next `append_log` lands part of its bytes (perhaps none), then fails with `EIO`.
    TornAppend,
    /// The next `replace_meta` fails with `EIO`, leaving the old record.
    MetaFails,
}

const PAGE: usize = 4096;
/// Log space reserved ahead, like the file backend's (smaller, so tests reach its end).
const LOG_RESERVE: usize = 4096;

/// A sparse file: absent pages read as zeros.
#[derive(Clone, Debug, Default)]
struct SparseFile {
    len: u64,
    pages: BTreeMap<u64, Arc<[u8; PAGE]>>,
}

impl SparseFile {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (p, o) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - o).min(buf.len() - done);
            match self.pages.get(&p) {
                Some(page) if at < self.len => buf[done..done + n].copy_from_slice(&page[o..o + n]),
                _ => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (p, o) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - o).min(data.len() - done);
            let page = self.pages.entry(p).or_insert_with(|| Arc::new([0; PAGE]));
            Arc::make_mut(page)[o..o + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }

    fn punch(&mut self, offset: u64, len: u64) {
        let ps = PAGE as u64;
        let end = offset + len;
        let (first_whole, end_whole) = (offset.div_ceil(ps), end / ps);
        if first_whole < end_whole {
            // Whole pages: drop the present ones (a punch of TiBs over a few pages is
            // quick); then the partial head and tail.
            let doomed: Vec<u64> = self
                .pages
                .range(first_whole..end_whole)
                .map(|(&p, _)| p)
                .collect();
            for p in doomed {
                self.pages.remove(&p);
            }
            self.zero_bytes(offset, first_whole * ps);
            self.zero_bytes(end_whole * ps, end);
        } else {
            self.zero_bytes(offset, end);
        }
    }

    /// Zeros `from..to`, which spans at most two pages.
    fn zero_bytes(&mut self, from: u64, to: u64) {
        let ps = PAGE as u64;
        let mut at = from;
        while at < to {
            let (p, o) = (at / ps, at % ps);
            let n = (ps - o).min(to - at);
            if let Some(page) = self.pages.get_mut(&p) {
                Arc::make_mut(page)[o as usize..(o + n) as usize].fill(0);
            }
            at += n;
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            // Zero what is cut off, so growing again reads zeros.
            self.punch(len, self.len - len);
            let last = len.div_ceil(PAGE as u64);
            self.pages.retain(|&p, _| p < last);
        }
        self.len = len;
    }

    fn next_data(&self, offset: u64) -> Option<Range<u64>> {
        let first = offset / PAGE as u64;
        let (&p, _) = self.pages.range(first..).next()?;
        let start = (p * PAGE as u64).max(offset);
        if start >= self.len {
            return None;
        }
        let mut last = p;
        while self.pages.contains_key(&(last + 1)) {
            last += 1;
        }
        Some(start..((last + 1) * PAGE as u64).min(self.len))
    }

    fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len as usize];
        self.read(0, &mut v);
        v
    }
}

#[derive(Clone, Debug)]
enum Change {
    Write(u64, Vec<u8>),
    Punch(u64, u64),
    SetLen(u64),
}

/// One file whose changes are volatile until synced.
#[derive(Clone, Debug, Default)]
struct VolatileFile {
    durable: SparseFile,
    visible: SparseFile,
    /// Changes since the last sync, oldest first.
    unsynced: Vec<Change>,
    /// Pages whose write-back failed: Linux marks them clean, so a later sync does not
    /// write them; the disk keeps their old content until they are written again.
    lost: std::collections::BTreeSet<u64>,
}

impl VolatileFile {
    fn apply(&mut self, c: Change) {
        apply_to(&mut self.visible, &c);
        // A page written again is dirty again: the next sync writes it whole.
        if let Some(r) = c.pages() {
            let hit: Vec<u64> = self.lost.range(r).copied().collect();
            for p in hit {
                self.lost.remove(&p);
            }
        }
        self.unsynced.push(c);
    }

    fn sync(&mut self) {
        let mut d = self.visible.clone();
        for &p in &self.lost {
            match self.durable.pages.get(&p) {
                Some(old) => d.pages.insert(p, Arc::clone(old)),
                None => d.pages.remove(&p),
            };
        }
        self.durable = d;
        self.unsynced.clear();
    }

    /// A failed write-back: the changes stay visible but never become durable (unless
    /// their pages are written again).
    fn lose_unsynced(&mut self) {
        for c in std::mem::take(&mut self.unsynced) {
            if let Some(r) = c.pages() {
                self.lost.extend(r);
            }
        }
    }

    fn crash(&mut self, power_loss: bool, coin: &mut impl FnMut() -> bool) {
        let unsynced = std::mem::take(&mut self.unsynced);
        if power_loss {
            let mut f = self.durable.clone();
            for c in unsynced {
                if coin() {
                    apply_to(&mut f, &c);
                }
            }
            self.durable = f;
        } else {
            // The page cache survives a killed process, lost pages included.
            self.durable = self.visible.clone();
        }
        self.lost.clear();
        self.visible = self.durable.clone();
    }
}

impl Change {
    /// The pages a change touches (`None` for a length change).
    fn pages(&self) -> Option<Range<u64>> {
        let (off, len) = match self {
            Change::Write(off, data) => (*off, data.len() as u64),
            Change::Punch(off, len) => (*off, *len),
            Change::SetLen(_) => return None,
        };
        Some(off / PAGE as u64..(off + len).div_ceil(PAGE as u64))
    }
}

fn apply_to(f: &mut SparseFile, c: &Change) {
    match c {
        Change::Write(off, data) => f.write(*off, data),
        Change::Punch(off, len) => f.punch(*off, *len),
        Change::SetLen(len) => f.set_len(*len),
    }
}

#[derive(Debug)]
struct SimState {
    data: VolatileFile,
    hashes: VolatileFile,
    meta: Option<Vec<u8>>,
    log: Option<Vec<u8>>,
    /// The log may grow to this length without allocating (see `reserve_log`).
    log_reserved: usize,
    countdown: Option<u64>,
    dead: bool,
    rng: u64,
    mutations: u64,
    paused: Option<Gate>,
    held: usize,
    faults: Vec<Fault>,
    full: bool,
}

enum Step {
    Go,
    Dying,
}

impl SimState {
    fn rand(&mut self) -> u64 {
        // xorshift64*: enough for test choices, and deterministic per seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn coin(&mut self) -> bool {
        self.rand() & 1 == 1
    }

    fn check_alive(&self) -> io::Result<()> {
        if self.dead {
            Err(io::Error::other("simulated process is dead"))
        } else {
            Ok(())
        }
    }

    fn step(&mut self) -> io::Result<Step> {
        self.check_alive()?;
        self.mutations += 1;
        match self.countdown {
            Some(0) => {
                self.dead = true;
                Ok(Step::Dying)
            }
            Some(n) => {
                self.countdown = Some(n - 1);
                Ok(Step::Go)
            }
            None => Ok(Step::Go),
        }
    }

    /// Takes an injected fault of kind `f`, if one is pending.
    fn take_fault(&mut self, f: Fault) -> bool {
        match self.faults.iter().position(|&x| x == f) {
            Some(i) => {
                self.faults.remove(i);
                true
            }
            None => false,
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.data.visible.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "past end of image",
            )),
        }
    }
}

fn died() -> io::Error {
    io::Error::other("simulated crash during this call")
}

fn eio() -> io::Error {
    io::Error::from(rustix::io::Errno::IO)
}

fn enospc() -> io::Error {
    io::Error::from(rustix::io::Errno::NOSPC)
}

impl SimBackend {
    /// A zero-filled image of `size` bytes with no metadata; `seed` drives every random
    /// choice (torn writes, what survives a crash). Costs nothing per byte until written.
    pub fn new(size: u64, seed: u64) -> Self {
        let data = VolatileFile {
            durable: SparseFile {
                len: size,
                ..SparseFile::default()
            },
            visible: SparseFile {
                len: size,
                ..SparseFile::default()
            },
            unsynced: Vec::new(),
            lost: Default::default(),
        };
        Self {
            inner: Arc::new((
                Mutex::new(SimState {
                    data,
                    hashes: VolatileFile::default(),
                    meta: None,
                    log: None,
                    log_reserved: 0,
                    countdown: None,
                    dead: false,
                    rng: seed | 1,
                    mutations: 0,
                    paused: None,
                    held: 0,
                    faults: Vec::new(),
                    full: false,
                }),
                Condvar::new(),
            )),
        }
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        self.inner.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits while `gate` is paused, then returns the state.
    fn pass(&self, gate: Gate) -> MutexGuard<'_, SimState> {
        let mut s = self.state();
        if s.paused == Some(gate) {
            s.held += 1;
            self.inner.1.notify_all();
            while s.paused == Some(gate) {
                s = self.inner.1.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            s.held -= 1;
        }
        s
    }

    /// Holds every later call of kind `gate` until [`SimBackend::resume`].
    pub fn pause(&self, gate: Gate) {
        self.state().paused = Some(gate);
    }

    /// Releases held calls.
    pub fn resume(&self) {
        self.state().paused = None;
        self.inner.1.notify_all();
    }

    /// Waits until `n` calls are held at the paused gate; false after `timeout`.
    pub fn wait_held(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state();
        while s.held < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .inner
                .1
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// After `n` more mutating calls succeed, the next one dies part-way and every call
    /// after it fails until [`SimBackend::crash`].
    pub fn fail_after(&self, n: u64) {
        self.state().countdown = Some(n);
    }

    /// Makes the next call of the fault's kind fail (see [`Fault`]). Faults queue; a crash
    /// clears those not yet met.
    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    /// Makes the file system full (or no longer): data writes land a prefix (perhaps
    /// nothing) and fail with `ENOSPC`, chunk-hash writes likewise, replacements of the
    /// metadata or log and log appends past the reserved space fail with `ENOSPC` and
    /// change nothing. Reads, syncs and hole punching work. Survives crashes.
    pub fn set_full(&self, full: bool) {
        self.state().full = full;
    }

    /// Whether a failpoint has fired.
    pub fn is_dead(&self) -> bool {
        self.state().dead
    }

    /// Mutating calls made so far (to choose failpoints).
    pub fn mutations(&self) -> u64 {
        self.state().mutations
    }

    /// Ends the current incarnation. With `power_loss`, each unsynced write (data or chunk
    /// hashes) survives or not at random (the page cache is lost); without, all survive (a
    /// killed process leaves its writes in the page cache). Clears the failpoint and the
    /// injected faults not yet met.
    pub fn crash(&self, power_loss: bool) {
        let mut s = self.state();
        let mut data = std::mem::take(&mut s.data);
        let mut hashes = std::mem::take(&mut s.hashes);
        data.crash(power_loss, &mut || s.coin());
        hashes.crash(power_loss, &mut || s.coin());
        s.data = data;
        s.hashes = hashes;
        s.dead = false;
        s.countdown = None;
        s.faults.clear();
        s.log_reserved = 0;
    }

    /// The current image content (for small images).
    pub fn image(&self) -> Vec<u8> {
        self.state().data.visible.to_vec()
    }

    /// Bytes stored for the image data and the chunk hashes (written pages), to check
    /// that sparse regions cost nothing.
    pub fn stored_bytes(&self) -> u64 {
        let s = self.state();
        (s.data.visible.pages.len() + s.hashes.visible.pages.len()) as u64 * PAGE as u64
    }

    /// The activity log file as it is now.
    pub fn log_bytes(&self) -> Option<Vec<u8>> {
        self.state().log.clone()
    }

    /// Replaces the activity log file (to stage a damaged log).
    pub fn set_log_bytes(&self, bytes: Option<Vec<u8>>) {
        self.state().log = bytes;
    }

    /// Bytes of the activity log that appends may fill without allocating.
    pub fn log_reserved(&self) -> usize {
        self.state().log_reserved
    }
}

impl Backend for SimBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        {
            let s = self.state();
            s.check_alive()?;
            s.check_range(offset, buf.len())?;
            s.data.visible.read(offset, buf);
        }
        drop(self.pass(Gate::Reads));
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.pass(Gate::Writes);
        s.check_range(offset, buf.len())?;
        let step = s.step()?;
        if s.full {
            let n = (s.rand() % (buf.len() as u64 + 1)) as usize;
            s.data.apply(Change::Write(offset, buf[..n].to_vec()));
            return Err(if s.dead { died() } else { enospc() });
        }
        match step {
            Step::Go => {
                s.data.apply(Change::Write(offset, buf.to_vec()));
                Ok(())
            }
            Step::Dying => {
                let n = (s.rand() % (buf.len() as u64 + 1)) as usize;
                s.data.apply(Change::Write(offset, buf[..n].to_vec()));
                Err(died())
            }
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = self.pass(Gate::Writes);
        s.check_range(offset, len as usize)?;
        match s.step()? {
            Step::Go => {
                s.data.apply(Change::Punch(offset, len));
                Ok(())
            }
            Step::Dying => {
                let n = s.rand() % (len + 1);
                s.data.apply(Change::Punch(offset, n));
                Err(died())
            }
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.pass(Gate::Syncs);
        let step = s.step()?;
        if s.take_fault(Fault::DataSyncFails) {
            s.data.lose_unsynced();
            return Err(eio());
        }
        let sync = match step {
            Step::Go => true,
            Step::Dying => s.coin(),
        };
        if sync {
            s.data.sync();
        }
        if s.dead { Err(died()) } else { Ok(()) }
    }

    fn image_len(&self) -> io::Result<u64> {
        let s = self.state();
        s.check_alive()?;
        Ok(s.data.visible.len)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let s = self.state();
        s.check_alive()?;
        Ok(s.data.visible.next_data(offset))
    }

    fn read_meta(&self) -> io::Result<Option<Vec<u8>>> {
        let s = self.state();
        s.check_alive()?;
        Ok(s.meta.clone())
    }

    fn replace_meta(&self, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.pass(Gate::Meta);
        let go = s.step()?;
        if s.take_fault(Fault::MetaFails) {
            return Err(eio());
        }
        if s.full {
            return Err(enospc());
        }
        if matches!(go, Step::Go) || s.coin() {
            s.meta = Some(bytes.to_vec());
        }
        if s.dead { Err(died()) } else { Ok(()) }
    }

    fn read_log(&self) -> io::Result<Option<Vec<u8>>> {
        let s = self.state();
        s.check_alive()?;
        Ok(s.log.clone())
    }

    fn replace_log(&self, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.state();
        let go = s.step()?;
        if s.full {
            return Err(enospc());
        }
        if matches!(go, Step::Go) || s.coin() {
            s.log = Some(bytes.to_vec());
            // Like the file backend: room for the appends until the next replacement.
            s.log_reserved = bytes.len() + LOG_RESERVE;
        }
        if s.dead { Err(died()) } else { Ok(()) }
    }

    fn reserve_log(&self, len: u64) -> io::Result<()> {
        let mut s = self.state();
        s.check_alive()?;
        let need = s.log.as_ref().map_or(0, Vec::len) + len as usize;
        if need <= s.log_reserved {
            return Ok(());
        }
        if s.full {
            return Err(enospc());
        }
        s.log_reserved = need + LOG_RESERVE;
        Ok(())
    }

    fn append_log(&self, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.state();
        let step = s.step()?;
        let len = s.log.as_ref().map_or(0, Vec::len);
        let unreserved = len + bytes.len() > s.log_reserved;
        let (n, err) = if s.take_fault(Fault::TornAppend) {
            ((s.rand() % (bytes.len() as u64 + 1)) as usize, Some(eio()))
        } else if s.full && unreserved {
            let room = s.log_reserved.saturating_sub(len).min(bytes.len());
            (room, Some(enospc()))
        } else {
            match step {
                Step::Go => (bytes.len(), None),
                Step::Dying => ((s.rand() % (bytes.len() as u64 + 1)) as usize, Some(died())),
            }
        };
        s.log
            .get_or_insert_with(Vec::new)
            .extend_from_slice(&bytes[..n]);
        match err {
            Some(e) => Err(e),
            None if s.dead => Err(died()),
            None => Ok(()),
        }
    }

    fn read_hashes(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state();
        s.check_alive()?;
        s.hashes.visible.read(offset, buf);
        Ok(())
    }

    fn write_hashes(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state();
        let step = s.step()?;
        let whole = matches!(step, Step::Go) && !s.full;
        if whole {
            s.hashes.apply(Change::Write(offset, buf.to_vec()));
            return Ok(());
        }
        // Dying or full: a prefix of whole hashes lands (the file system never tears
        // one 32-byte hash; see the Backend contract).
        let n = (s.rand() % (buf.len() as u64 / 32 + 1)) as usize * 32;
        s.hashes.apply(Change::Write(offset, buf[..n].to_vec()));
        Err(if s.dead { died() } else { enospc() })
    }

    fn sync_hashes(&self) -> io::Result<()> {
        let mut s = self.pass(Gate::Syncs);
        let step = s.step()?;
        if s.take_fault(Fault::HashSyncFails) {
            s.hashes.lose_unsynced();
            return Err(eio());
        }
        let sync = match step {
            Step::Go => true,
            Step::Dying => s.coin(),
        };
        if sync {
            s.hashes.sync();
        }
        if s.dead { Err(died()) } else { Ok(()) }
    }

    fn hashes_len(&self) -> io::Result<u64> {
        let s = self.state();
        s.check_alive()?;
        Ok(s.hashes.visible.len)
    }

    fn set_hashes_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state();
        match s.step()? {
            Step::Go => {
                s.hashes.apply(Change::SetLen(len));
                Ok(())
            }
            Step::Dying => Err(died()),
        }
    }

    fn hashes_next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let s = self.state();
        s.check_alive()?;
        Ok(s.hashes.visible.next_data(offset))
    }

    fn describe(&self) -> String {
        "simulated image".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_sync_does_not_persist_pages_whose_write_back_failed() {
        let sim = SimBackend::new(4 * PAGE as u64, 1);
        sim.write_at(&[1; 10], 0).unwrap();
        sim.write_at(&[2; 10], 2 * PAGE as u64).unwrap();
        sim.inject(Fault::DataSyncFails);
        assert!(sim.sync_data().is_err());
        sim.write_at(&[3; 10], 2 * PAGE as u64 + 100).unwrap(); // page 2 dirty again
        sim.sync_data().unwrap();
        assert_eq!(sim.image()[0], 1, "the page cache still shows it");
        sim.crash(true);
        let img = sim.image();
        assert_eq!(img[0], 0, "page 0 was never written back");
        assert_eq!(
            img[2 * PAGE],
            2,
            "page 2 was written whole when synced again"
        );
        assert_eq!(img[2 * PAGE + 100], 3);
    }

    #[test]
    fn sparse_file_reads_what_was_written_and_zeros_elsewhere() {
        let mut f = SparseFile {
            len: 5 * PAGE as u64,
            ..SparseFile::default()
        };
        f.write(4000, &[7; 200]);
        f.write(3 * PAGE as u64, &[9; PAGE]);
        let mut b = vec![1u8; 300];
        f.read(3950, &mut b);
        assert!(b[..50].iter().all(|&x| x == 0));
        assert!(b[50..250].iter().all(|&x| x == 7));
        assert!(b[250..].iter().all(|&x| x == 0));
        assert_eq!(f.next_data(0), Some(0..2 * PAGE as u64));
        assert_eq!(
            f.next_data(2 * PAGE as u64),
            Some(3 * PAGE as u64..4 * PAGE as u64)
        );
        f.punch(0, 5 * PAGE as u64);
        assert!(f.pages.is_empty() || f.to_vec().iter().all(|&x| x == 0));
        assert_eq!(f.next_data(0), None);
        // A huge punch over few pages is quick.
        let mut g = SparseFile {
            len: 16 << 40,
            ..SparseFile::default()
        };
        g.write(1 << 40, &[1; 10]);
        g.punch(0, 16 << 40);
        assert!(g.pages.is_empty());
    }
}
