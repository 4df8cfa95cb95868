//! Verifiable block content.
//!
//! Every 512-byte sector the guest writes is self-describing, so any copy of a disk can be
//! checked sector by sector without the original data:
//!
//! ```text
//! 0..8     magic "CVYGUEST"
//! 8..16    vm_id            (u64 LE)
//! 16..24   offset           (u64 LE, byte offset of the write's first sector)
//! 24..32   write_id         (u64 LE)
//! 32..36   disk_index       (u32 LE)
//! 36..40   sector index within the write (u32 LE)
//! 40..44   sectors in the write          (u32 LE)
//! 44..48   format version (1)
//! 48..504  filler, a deterministic function of bytes 0..48
//! 504..512 xxh3-64 of bytes 0..504
//! ```
//!
//! The checksum sits at the end so that a sector torn inside (new head, old tail) never
//! validates; the position fields catch a sector written to the wrong place; never-written
//! sectors are all zero. Content is a pure function of the tag, so two copies of the same
//! write are byte-identical (delta sync sees them as equal).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::GuestError;

/// Bytes per sector: the unit in which content is tagged and checked.
pub const SECTOR_SIZE: usize = 512;

const MAGIC: [u8; 8] = *b"CVYGUEST";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
const CHECKSUM_AT: usize = SECTOR_SIZE - 8;

/// Identifies one guest write: which VM, disk and offset, and the guest's own monotonic
/// write id. Every sector of the write carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockTag {
    /// VM that issued the write.
    pub vm_id: u64,
    /// Disk position within the VM.
    pub disk_index: u32,
    /// Byte offset of the write's first sector.
    pub offset: u64,
    /// The guest's write counter; unique per VM across restarts of its guest.
    pub write_id: u64,
}

/// What one valid guest sector says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SectorTag {
    /// The write the sector belongs to.
    pub tag: BlockTag,
    /// Index of this sector within the write.
    pub index: u32,
    /// Number of sectors in the write.
    pub count: u32,
}

impl SectorTag {
    /// Byte offset where this sector belongs, or `None` if the header's numbers overflow.
    pub fn position(&self) -> Option<u64> {
        u64::from(self.index)
            .checked_mul(SECTOR_SIZE as u64)
            .and_then(|d| self.tag.offset.checked_add(d))
    }
}

/// Why a non-zero sector is not a valid guest sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectorFault {
    /// No guest magic: data the guest never wrote.
    NoHeader,
    /// Magic present but the checksum fails: a torn or damaged sector.
    BadChecksum,
    /// Checksum valid but the header is inconsistent or of an unknown format version.
    BadHeader,
}

impl std::fmt::Display for SectorFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SectorFault::NoHeader => "no guest header: foreign data",
            SectorFault::BadChecksum => "checksum mismatch: torn or damaged sector",
            SectorFault::BadHeader => "inconsistent header",
        })
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes one sector; `sector` is exactly `SECTOR_SIZE` bytes.
fn fill_sector(sector: &mut [u8], tag: &BlockTag, index: u32, count: u32) {
    sector[0..8].copy_from_slice(&MAGIC);
    sector[8..16].copy_from_slice(&tag.vm_id.to_le_bytes());
    sector[16..24].copy_from_slice(&tag.offset.to_le_bytes());
    sector[24..32].copy_from_slice(&tag.write_id.to_le_bytes());
    sector[32..36].copy_from_slice(&tag.disk_index.to_le_bytes());
    sector[36..40].copy_from_slice(&index.to_le_bytes());
    sector[40..44].copy_from_slice(&count.to_le_bytes());
    sector[44..48].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let mut state = xxh3_64(&sector[..HEADER_LEN]);
    for word in sector[HEADER_LEN..CHECKSUM_AT].chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    let sum = xxh3_64(&sector[..CHECKSUM_AT]);
    sector[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
}

/// Fills `buf` with the content of the write `tag`: `buf.len() / 512` self-describing
/// sectors. The result depends only on `tag` and `buf.len()`.
///
/// Fails only if `buf` is empty, not a whole number of sectors, or longer than
/// `u32::MAX` sectors.
pub fn fill_block(buf: &mut [u8], tag: BlockTag) -> Result<(), GuestError> {
    let count = sector_count(buf.len())?;
    for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        // `i < count <= u32::MAX`, so the cast is exact.
        fill_sector(sector, &tag, i as u32, count);
    }
    Ok(())
}

/// Allocates and fills a block of `len` bytes for `tag` (see [`fill_block`]).
pub fn make_block(tag: BlockTag, len: usize) -> Result<Bytes, GuestError> {
    let mut buf = vec![0u8; len];
    fill_block(&mut buf, tag)?;
    Ok(Bytes::from(buf))
}

fn sector_count(len: usize) -> Result<u32, GuestError> {
    if len == 0 || len % SECTOR_SIZE != 0 {
        return Err(GuestError::NotSectorAligned { len });
    }
    u32::try_from(len / SECTOR_SIZE).map_err(|_| GuestError::NotSectorAligned { len })
}

/// Decodes one sector: `Ok(None)` if it is all zero (never written), `Ok(Some(_))` if it
/// is a valid guest sector, `Err` if it is anything else.
pub fn decode_sector(sector: &[u8; SECTOR_SIZE]) -> Result<Option<SectorTag>, SectorFault> {
    decode_sector_slice(sector)
}

/// As [`decode_sector`]; `sector` must be exactly `SECTOR_SIZE` bytes (callers use
/// `chunks_exact`).
pub(crate) fn decode_sector_slice(sector: &[u8]) -> Result<Option<SectorTag>, SectorFault> {
    if sector[0..8] != MAGIC {
        // Slice equality is a memcmp, fast even in unoptimised builds.
        return if sector == [0u8; SECTOR_SIZE].as_slice() {
            Ok(None)
        } else {
            Err(SectorFault::NoHeader)
        };
    }
    if xxh3_64(&sector[..CHECKSUM_AT]) != le_u64(sector, CHECKSUM_AT) {
        return Err(SectorFault::BadChecksum);
    }
    let index = le_u32(sector, 36);
    let count = le_u32(sector, 40);
    if le_u32(sector, 44) != FORMAT_VERSION || index >= count {
        return Err(SectorFault::BadHeader);
    }
    let st = SectorTag {
        tag: BlockTag {
            vm_id: le_u64(sector, 8),
            offset: le_u64(sector, 16),
            write_id: le_u64(sector, 24),
            disk_index: le_u32(sector, 32),
        },
        index,
        count,
    };
    if st.position().is_none() {
        return Err(SectorFault::BadHeader);
    }
    Ok(Some(st))
}

/// Reads back the tag of a block that covers exactly one write's extent (as written by
/// [`fill_block`]).
///
/// Returns `Ok(None)` if every sector is zero, `Ok(Some(tag))` if every sector belongs to
/// the same write in order and the write has exactly this many sectors, and an error
/// naming the first bad sector otherwise: [`GuestError::CorruptSector`] for a sector that
/// is not valid guest data (including one torn inside), [`GuestError::TornBlock`] for
/// sectors from different writes (a torn multi-sector write) or a mix of zero and data.
pub fn read_tag(buf: &[u8]) -> Result<Option<BlockTag>, GuestError> {
    let count = sector_count(buf.len())?;
    let mut first: Option<Option<BlockTag>> = None;
    for (i, sector) in buf.chunks_exact(SECTOR_SIZE).enumerate() {
        let decoded = decode_sector_slice(sector)
            .map_err(|fault| GuestError::CorruptSector { sector: i, fault })?;
        let this = match decoded {
            None => None,
            Some(st) if st.index as usize == i && st.count == count => Some(st.tag),
            Some(_) => return Err(GuestError::TornBlock { sector: i }),
        };
        match first {
            None => first = Some(this),
            Some(expected) if expected == this => {}
            Some(_) => return Err(GuestError::TornBlock { sector: i }),
        }
    }
    Ok(first.flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(write_id: u64) -> BlockTag {
        BlockTag {
            vm_id: 7,
            disk_index: 1,
            offset: 8192,
            write_id,
        }
    }

    #[test]
    fn tag_round_trips() {
        let t = tag(99);
        let block = make_block(t, 4096).unwrap();
        assert_eq!(read_tag(&block).unwrap(), Some(t));
        // Deterministic: the same tag gives the same bytes.
        assert_eq!(block, make_block(t, 4096).unwrap());
        // Different writes differ in every sector.
        let other = make_block(tag(100), 4096).unwrap();
        for (a, b) in block.chunks(SECTOR_SIZE).zip(other.chunks(SECTOR_SIZE)) {
            assert_ne!(a, b);
        }
    }

    #[test]
    fn zero_block_reads_as_none() {
        assert_eq!(read_tag(&[0u8; 4096]).unwrap(), None);
    }

    #[test]
    fn every_sector_describes_its_position() {
        let t = tag(5);
        let block = make_block(t, 2048).unwrap();
        for (i, s) in block.chunks_exact(SECTOR_SIZE).enumerate() {
            let st = decode_sector_slice(s).unwrap().unwrap();
            assert_eq!(st.tag, t);
            assert_eq!(st.count, 4);
            assert_eq!(st.position(), Some(8192 + 512 * i as u64));
        }
    }

    #[test]
    fn torn_sector_is_detected() {
        let old = make_block(tag(1), 512).unwrap();
        let new = make_block(tag(2), 512).unwrap();
        let mut torn = new.to_vec();
        torn[256..].copy_from_slice(&old[256..]);
        assert!(matches!(
            read_tag(&torn),
            Err(GuestError::CorruptSector {
                sector: 0,
                fault: SectorFault::BadChecksum
            })
        ));
        // Old head, new tail: no magic problem, still a checksum failure.
        let mut torn = old.to_vec();
        torn[256..].copy_from_slice(&new[256..]);
        assert!(matches!(
            read_tag(&torn),
            Err(GuestError::CorruptSector {
                fault: SectorFault::BadChecksum,
                ..
            })
        ));
    }

    #[test]
    fn torn_block_is_detected() {
        let old = make_block(tag(1), 4096).unwrap();
        let new = make_block(tag(2), 4096).unwrap();
        let mut torn = new.to_vec();
        torn[2048..].copy_from_slice(&old[2048..]);
        assert!(matches!(
            read_tag(&torn),
            Err(GuestError::TornBlock { sector: 4 })
        ));
        // Half written over zeros.
        let mut half = vec![0u8; 4096];
        half[..2048].copy_from_slice(&new[..2048]);
        assert!(matches!(
            read_tag(&half),
            Err(GuestError::TornBlock { sector: 4 })
        ));
        // A buffer that starts in the middle of a write.
        assert!(matches!(
            read_tag(&new[512..]),
            Err(GuestError::TornBlock { sector: 0 })
        ));
    }

    #[test]
    fn foreign_and_damaged_sectors_are_faults() {
        let mut junk = [0u8; SECTOR_SIZE];
        junk[100] = 1;
        assert_eq!(decode_sector(&junk), Err(SectorFault::NoHeader));
        let mut flipped = [0u8; SECTOR_SIZE];
        flipped.copy_from_slice(&make_block(tag(3), 512).unwrap());
        flipped[300] ^= 0x40;
        assert_eq!(decode_sector(&flipped), Err(SectorFault::BadChecksum));
    }

    #[test]
    fn bad_lengths_are_rejected() {
        let mut buf = vec![0u8; 1000];
        assert!(matches!(
            fill_block(&mut buf, tag(1)),
            Err(GuestError::NotSectorAligned { len: 1000 })
        ));
        assert!(matches!(
            read_tag(&[]),
            Err(GuestError::NotSectorAligned { len: 0 })
        ));
    }
}
