//! An in-memory [`Backend`] that simulates crashes, for deterministic tests of the store
//! and of layers built on it.
//!
//! It models what a real file system promises and nothing more: data writes are volatile
//! until `sync_data`; metadata and log replacements are atomic; log appends are durable
//! when they return. A failpoint ([`SimBackend::fail_after`]) makes the n-th mutating call
//! "die" part-way (a prefix of a write or append lands, a replacement lands or not) and
//! every later call fail, as if the process had been killed there; [`SimBackend::crash`]
//! then decides what survived and lets the next incarnation open the image.

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
    /// `sync_data`, before anything is synced.
    Syncs,
    /// `read_at`, after the data was copied out (the caller holds what it read).
    Reads,
}

#[derive(Debug)]
struct SimState {
    durable: Vec<u8>,
    visible: Vec<u8>,
    /// Data changes since the last sync, oldest first.
    unsynced: Vec<(u64, Vec<u8>)>,
    meta: Option<Vec<u8>>,
    log: Option<Vec<u8>>,
    countdown: Option<u64>,
    dead: bool,
    rng: u64,
    mutations: u64,
    paused: Option<Gate>,
    held: usize,
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

    fn apply(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.visible[o..o + data.len()].copy_from_slice(data);
        self.unsynced.push((offset, data.to_vec()));
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match (offset as usize).checked_add(len) {
            Some(end) if end <= self.visible.len() => Ok(()),
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

impl SimBackend {
    /// A zero-filled image of `size` bytes with no metadata; `seed` drives every random
    /// choice (torn writes, what survives a crash).
    pub fn new(size: u64, seed: u64) -> Self {
        Self {
            inner: Arc::new((
                Mutex::new(SimState {
                    durable: vec![0; size as usize],
                    visible: vec![0; size as usize],
                    unsynced: Vec::new(),
                    meta: None,
                    log: None,
                    countdown: None,
                    dead: false,
                    rng: seed | 1,
                    mutations: 0,
                    paused: None,
                    held: 0,
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

    /// Whether a failpoint has fired.
    pub fn is_dead(&self) -> bool {
        self.state().dead
    }

    /// Mutating calls made so far (to choose failpoints).
    pub fn mutations(&self) -> u64 {
        self.state().mutations
    }

    /// Ends the current incarnation. With `power_loss`, each unsynced data write survives
    /// or not at random (the page cache is lost); without, all survive (a killed process
    /// leaves its writes in the page cache). Clears the failpoint.
    pub fn crash(&self, power_loss: bool) {
        let mut s = self.state();
        let unsynced = std::mem::take(&mut s.unsynced);
        if power_loss {
            let mut img = s.durable.clone();
            for (off, data) in unsynced {
                if s.coin() {
                    let o = off as usize;
                    img[o..o + data.len()].copy_from_slice(&data);
                }
            }
            s.durable = img;
        } else {
            s.durable = s.visible.clone();
        }
        s.visible = s.durable.clone();
        s.dead = false;
        s.countdown = None;
    }

    /// The current image content.
    pub fn image(&self) -> Vec<u8> {
        self.state().visible.clone()
    }
}

impl Backend for SimBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        {
            let s = self.state();
            s.check_alive()?;
            s.check_range(offset, buf.len())?;
            let o = offset as usize;
            buf.copy_from_slice(&s.visible[o..o + buf.len()]);
        }
        drop(self.pass(Gate::Reads));
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.pass(Gate::Writes);
        s.check_range(offset, buf.len())?;
        match s.step()? {
            Step::Go => {
                s.apply(offset, buf);
                Ok(())
            }
            Step::Dying => {
                let n = (s.rand() % (buf.len() as u64 + 1)) as usize;
                s.apply(offset, &buf[..n]);
                Err(died())
            }
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0; len as usize], offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.pass(Gate::Syncs);
        let sync = match s.step()? {
            Step::Go => true,
            Step::Dying => s.coin(),
        };
        if sync {
            s.durable = s.visible.clone();
            s.unsynced.clear();
        }
        if s.dead { Err(died()) } else { Ok(()) }
    }

    fn image_len(&self) -> io::Result<u64> {
        let s = self.state();
        s.check_alive()?;
        Ok(s.visible.len() as u64)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let s = self.state();
        s.check_alive()?;
        let o = (offset as usize).min(s.visible.len());
        Ok(s.visible[o..]
            .iter()
            .position(|&b| b != 0)
            .map(|p| (o + p) as u64..(o + p + 1) as u64))
    }

    fn read_meta(&self) -> io::Result<Option<Vec<u8>>> {
        let s = self.state();
        s.check_alive()?;
        Ok(s.meta.clone())
    }

    fn replace_meta(&self, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.state();
        let go = s.step()?;
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
        if matches!(go, Step::Go) || s.coin() {
            s.log = Some(bytes.to_vec());
        }
        if s.dead { Err(died()) } else { Ok(()) }
    }

    fn append_log(&self, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.state();
        let n = match s.step()? {
            Step::Go => bytes.len(),
            Step::Dying => (s.rand() % (bytes.len() as u64 + 1)) as usize,
        };
        s.log
            .get_or_insert_with(Vec::new)
            .extend_from_slice(&bytes[..n]);
        if s.dead { Err(died()) } else { Ok(()) }
    }

    fn describe(&self) -> String {
        "simulated image".to_owned()
    }
}
