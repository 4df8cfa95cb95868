//! In-memory disks and copies for tests (here and in other crates).
//!
//! A [`SimCg`] plays the agent: it sequences the writes of all its disks with one
//! counter, applies them to sparse in-memory images and keeps the history, so a test can
//! build the copy an in-order replica would hold at any cut ([`SimCg::copy_at`]).
//! [`SimDisk`] is the [`GuestDisk`] with latency and failure injection.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::check::CopyReader;
use crate::content::{BlockTag, SECTOR_SIZE, read_tag};
use crate::runner::GuestDisk;

const SECTOR: u64 = SECTOR_SIZE as u64;

/// A sparse in-memory disk image (unwritten sectors read as zeros).
#[derive(Clone, Debug, Default)]
pub struct SimImage {
    size: u64,
    sectors: HashMap<u64, Box<[u8]>>,
}

impl SimImage {
    /// A blank image of `size` bytes.
    pub fn new(size: u64) -> SimImage {
        SimImage {
            size,
            sectors: HashMap::new(),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes `data` at `offset`; both must be sector-aligned and inside the image.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        check_range(self.size, offset, data.len())?;
        for (i, s) in data.chunks_exact(SECTOR_SIZE).enumerate() {
            self.sectors.insert(offset / SECTOR + i as u64, s.into());
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`; both must be sector-aligned and inside the image.
    pub fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        check_range(self.size, offset, len)?;
        let mut out = vec![0u8; len];
        for (i, s) in out.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            if let Some(d) = self.sectors.get(&(offset / SECTOR + i as u64)) {
                s.copy_from_slice(d);
            }
        }
        Ok(out)
    }
}

fn check_range(size: u64, offset: u64, len: usize) -> io::Result<()> {
    let end = offset.checked_add(len as u64);
    if offset % SECTOR != 0 || len % SECTOR_SIZE != 0 || end.is_none_or(|e| e > size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is not sector-aligned inside a {size}-byte disk"),
        ));
    }
    Ok(())
}

/// A copy of a VM's disks in memory; implements [`CopyReader`] (disk index = position).
#[derive(Clone, Debug, Default)]
pub struct SimCopy {
    /// The disks.
    pub images: Vec<SimImage>,
}

impl SimCopy {
    /// Blank disks of the given sizes.
    pub fn blank(sizes: &[u64]) -> SimCopy {
        SimCopy {
            images: sizes.iter().map(|&s| SimImage::new(s)).collect(),
        }
    }

    /// Writes `data` to disk `disk_index` at `offset`.
    pub fn write(&mut self, disk_index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.images
            .get_mut(disk_index as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such disk"))?
            .write(offset, data)
    }
}

impl CopyReader for SimCopy {
    fn disk_sizes(&self) -> io::Result<Vec<u64>> {
        Ok(self.images.iter().map(SimImage::size).collect())
    }

    fn read(&self, disk_index: u32, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.images
            .get(disk_index as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such disk"))?
            .read(offset, len)
    }
}

/// One write the group applied, in sequence order.
#[derive(Clone, Debug)]
pub struct Applied {
    /// Its sequence number.
    pub seq: u64,
    /// Disk id within the group.
    pub disk: usize,
    /// Byte offset.
    pub offset: u64,
    /// The data.
    pub data: Bytes,
}

/// How a write ended, as seen by the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The guest tag of the data, if it is one whole guest write.
    pub tag: Option<BlockTag>,
    /// Sequence number, if the write was applied.
    pub seq: Option<u64>,
    /// Whether `Ok` was returned.
    pub acked: bool,
}

#[derive(Debug, Default)]
struct CgState {
    next_seq: u64,
    images: Vec<SimImage>,
    history: Vec<Applied>,
}

/// A simulated consistency group: one sequence counter for all its disks.
#[derive(Clone, Debug, Default)]
pub struct SimCg {
    state: Arc<Mutex<CgState>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fault injection for a [`SimDisk`].
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Delay before each write or flush answers.
    pub latency: Duration,
    /// Fail every n-th write (counted per disk); 0 = never.
    pub fail_every: u64,
    /// Whether a failed write is applied (sequenced and stored) before the error is
    /// returned, as when the ack is lost; otherwise it is refused untouched, as when
    /// fenced.
    pub failed_writes_land: bool,
}

impl SimCg {
    /// An empty group; sequence numbers start at 1.
    pub fn new() -> SimCg {
        SimCg::default()
    }

    /// Adds a blank disk of `size` bytes; its id within the group is the number of disks
    /// added before it.
    pub fn add_disk(&self, size: u64, faults: Faults) -> Arc<SimDisk> {
        let mut st = lock(&self.state);
        st.images.push(SimImage::new(size));
        Arc::new(SimDisk {
            state: Arc::clone(&self.state),
            id: st.images.len() - 1,
            size,
            faults,
            writes: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            outcomes: Mutex::new(Vec::new()),
        })
    }

    /// The current content of the given disks (by group id), as a copy whose disk index
    /// is the position in `disks`.
    pub fn copy(&self, disks: &[usize]) -> SimCopy {
        let st = lock(&self.state);
        SimCopy {
            images: disks
                .iter()
                .map(|&d| st.images.get(d).cloned().unwrap_or_default())
                .collect(),
        }
    }

    /// The content an in-order replica would hold after applying every write with
    /// `seq <= upto`.
    pub fn copy_at(&self, disks: &[usize], upto: u64) -> SimCopy {
        let st = lock(&self.state);
        let mut copy = SimCopy {
            images: disks
                .iter()
                .map(|&d| SimImage::new(st.images.get(d).map_or(0, SimImage::size)))
                .collect(),
        };
        for a in st.history.iter().take_while(|a| a.seq <= upto) {
            if let Some(i) = disks.iter().position(|&d| d == a.disk) {
                // History entries were range-checked when applied.
                let _ = copy.images[i].write(a.offset, &a.data);
            }
        }
        copy
    }

    /// Every applied write, in sequence order.
    pub fn history(&self) -> Vec<Applied> {
        lock(&self.state).history.clone()
    }

    /// The last sequence number given out (0 if none).
    pub fn last_seq(&self) -> u64 {
        lock(&self.state).next_seq
    }
}

/// An in-memory [`GuestDisk`] of a [`SimCg`].
#[derive(Debug)]
pub struct SimDisk {
    state: Arc<Mutex<CgState>>,
    id: usize,
    size: u64,
    faults: Faults,
    writes: AtomicU64,
    fenced: AtomicBool,
    outcomes: Mutex<Vec<Outcome>>,
}

impl SimDisk {
    /// Id within the group.
    pub fn id(&self) -> usize {
        self.id
    }

    /// While fenced, every write is refused untouched (like a stale epoch).
    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::SeqCst);
    }

    /// How every write so far ended, in completion order.
    pub fn outcomes(&self) -> Vec<Outcome> {
        lock(&self.outcomes).clone()
    }

    fn apply(&self, offset: u64, data: &Bytes) -> Result<u64, String> {
        let mut st = lock(&self.state);
        let image = st
            .images
            .get_mut(self.id)
            .ok_or_else(|| format!("disk {} is gone", self.id))?;
        image.write(offset, data).map_err(|e| e.to_string())?;
        st.next_seq += 1;
        let seq = st.next_seq;
        st.history.push(Applied {
            seq,
            disk: self.id,
            offset,
            data: data.clone(),
        });
        Ok(seq)
    }
}

impl GuestDisk for SimDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
            let fenced = self.fenced.load(Ordering::SeqCst);
            let fail = fenced || (self.faults.fail_every > 0 && n % self.faults.fail_every == 0);
            let result = if fail && (fenced || !self.faults.failed_writes_land) {
                Err(None)
            } else {
                match self.apply(offset, &data) {
                    Ok(seq) if fail => Err(Some(seq)),
                    Ok(seq) => Ok(seq),
                    Err(e) => {
                        lock(&self.outcomes).push(Outcome {
                            tag: read_tag(&data).ok().flatten(),
                            seq: None,
                            acked: false,
                        });
                        return Err(e);
                    }
                }
            };
            if !self.faults.latency.is_zero() {
                tokio::time::sleep(self.faults.latency).await;
            }
            lock(&self.outcomes).push(Outcome {
                tag: read_tag(&data).ok().flatten(),
                seq: match result {
                    Ok(s) | Err(Some(s)) => Some(s),
                    Err(None) => None,
                },
                acked: result.is_ok(),
            });
            result.map_err(|_| {
                if fenced {
                    format!("disk {}: write refused: stale epoch", self.id)
                } else {
                    format!("disk {}: injected write failure", self.id)
                }
            })
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if !self.faults.latency.is_zero() {
                tokio::time::sleep(self.faults.latency).await;
            }
            Ok(())
        })
    }
}
