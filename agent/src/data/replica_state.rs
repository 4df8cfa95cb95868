//! The replica's durable progress for one group: how far it applied, whether it is a
//! consistent prefix, and whether a before-resync snapshot exists.
//!
//! Written after every applied batch, so it must be cheap: two 512-byte slots written in
//! place alternately, each with a generation and a checksum, then fdatasync. A torn write
//! damages at most the slot being written; the reader takes the valid slot with the higher
//! generation, which is the previous durable state.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

const SLOT: u64 = 512;

/// What a replica knows about its copy of a group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// Every write up to this sequence is applied and durable (0 = none).
    pub applied_seq: u64,
    /// Highest epoch seen from a primary; older senders are refused.
    pub epoch: u64,
    /// Whether the copy is a consistent prefix of the group's history.
    pub consistent: bool,
    /// During a resync: consistent again once `applied_seq + 1 >= consistent_at`.
    pub consistent_at: Option<u64>,
    /// A before-resync snapshot exists and is the last consistent state.
    pub resync_snapshot: bool,
    /// No write above this sequence has touched the images. Raised (durably) in blocks
    /// before applying beyond it, so after a crash the replica knows how far its images
    /// may be ahead of `applied_seq`, and that re-applying up to here is not a prefix.
    #[serde(default)]
    pub may_have_applied: u64,
}

#[derive(Serialize, Deserialize)]
struct Slot {
    generation: u64,
    state: ReplicaState,
}

/// The state file, kept open.
pub struct StateFile {
    file: File,
    generation: u64,
}

impl StateFile {
    /// Opens (or creates) the state file and reads the latest valid state.
    pub fn open(path: &Path) -> io::Result<(Self, ReplicaState)> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if !existed {
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let mut best: Option<Slot> = None;
        for i in 0..2 {
            let mut buf = vec![0u8; SLOT as usize];
            let n = read_full(&file, &mut buf, i * SLOT)?;
            if let Some(slot) = decode_slot(&buf[..n]) {
                if best.as_ref().is_none_or(|b| slot.generation > b.generation) {
                    best = Some(slot);
                }
            }
        }
        let (generation, state) =
            best.map_or((0, ReplicaState::default()), |s| (s.generation, s.state));
        Ok((Self { file, generation }, state))
    }

    /// Durably records `state` (blocking: fdatasync).
    pub fn store(&mut self, state: &ReplicaState) -> io::Result<()> {
        self.generation += 1;
        let body = convoy_codec::encode(&Slot {
            generation: self.generation,
            state: state.clone(),
        })
        .map_err(io::Error::other)?;
        let mut buf = vec![0u8; SLOT as usize];
        if body.len() + 12 > buf.len() {
            return Err(io::Error::other("replica state record too large"));
        }
        buf[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        buf[4..12].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        buf[12..12 + body.len()].copy_from_slice(&body);
        self.file.write_all_at(&buf, (self.generation % 2) * SLOT)?;
        self.file.sync_data()
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

fn decode_slot(buf: &[u8]) -> Option<Slot> {
    if buf.len() < 12 {
        return None;
    }
    let len = u32::from_le_bytes(buf[..4].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(buf[4..12].try_into().ok()?);
    let body = buf.get(12..12 + len)?;
    if len == 0 || xxhash_rust::xxh3::xxh3_64(body) != sum {
        return None;
    }
    convoy_codec::decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_valid_slot_wins_and_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let (mut f, s) = StateFile::open(&p).unwrap();
        assert_eq!(s, ReplicaState::default());
        for seq in 1..=5 {
            f.store(&ReplicaState {
                applied_seq: seq,
                epoch: 1,
                consistent: true,
                ..Default::default()
            })
            .unwrap();
        }
        let (_, s) = StateFile::open(&p).unwrap();
        assert_eq!(s.applied_seq, 5);
        // Tear the newest slot (generation 5 lives in slot 1): the older one is used.
        let raw = OpenOptions::new().write(true).open(&p).unwrap();
        raw.write_all_at(&[0xff; 4], SLOT + 13).unwrap();
        let (mut f, s) = StateFile::open(&p).unwrap();
        assert_eq!(s.applied_seq, 4);
        f.store(&ReplicaState {
            applied_seq: 9,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(StateFile::open(&p).unwrap().1.applied_seq, 9);
    }
}
