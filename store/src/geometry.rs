//! Disk geometry: how bytes map to chunks (hash and dirty granularity) and chunks to
//! extents (activity-log granularity).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

/// Default chunk size: 64 KiB, the unit of hashing, dirty tracking and resync.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Default extent size in chunks: 64 chunks = 4 MiB, the unit of the activity log.
pub const DEFAULT_EXTENT_CHUNKS: u32 = 64;
/// Default fan-out of the hash tree.
pub const DEFAULT_FANOUT: u32 = 64;

/// The layout parameters of one disk image, stored in its metadata.
///
/// Two copies of a disk can compare hash trees only if their `size`, `chunk_size` and
/// `fanout` are equal; `extent_chunks` is local (crash-recovery granularity) and may differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    size: u64,
    chunk_size: u32,
    extent_chunks: u32,
    fanout: u32,
}

impl Geometry {
    /// Default geometry for a disk of `size` bytes.
    pub fn new(size: u64) -> Result<Self> {
        Self::with_params(
            size,
            DEFAULT_CHUNK_SIZE,
            DEFAULT_EXTENT_CHUNKS,
            DEFAULT_FANOUT,
        )
    }

    /// A geometry with explicit parameters. `size` must be positive; `chunk_size` a power
    /// of two of at least 512; `extent_chunks` at least 1; `fanout` at least 2; and the
    /// extent count must fit in a `u32`.
    pub fn with_params(
        size: u64,
        chunk_size: u32,
        extent_chunks: u32,
        fanout: u32,
    ) -> Result<Self> {
        let g = Self {
            size,
            chunk_size,
            extent_chunks,
            fanout,
        };
        g.validate()?;
        Ok(g)
    }

    /// Checks the invariants [`Geometry::with_params`] enforces (used on decoded metadata).
    pub fn validate(&self) -> Result<()> {
        if self.size == 0 {
            return Err(StoreError::invalid(
                "size",
                "a disk must be at least 1 byte",
            ));
        }
        if self.chunk_size < 512 || !self.chunk_size.is_power_of_two() {
            return Err(StoreError::invalid(
                "chunk size",
                format!("{} is not a power of two >= 512", self.chunk_size),
            ));
        }
        if self.extent_chunks == 0 {
            return Err(StoreError::invalid(
                "extent size",
                "must be at least 1 chunk",
            ));
        }
        if self.fanout < 2 {
            return Err(StoreError::invalid("fan-out", "must be at least 2"));
        }
        if self.chunk_count().div_ceil(u64::from(self.extent_chunks)) > u64::from(u32::MAX) {
            return Err(StoreError::invalid(
                "size",
                "too many extents; raise the extent size",
            ));
        }
        Ok(())
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Chunks per activity-log extent.
    pub fn extent_chunks(&self) -> u32 {
        self.extent_chunks
    }

    /// Fan-out of the hash tree.
    pub fn fanout(&self) -> u32 {
        self.fanout
    }

    /// Number of chunks; the last one is shorter when the size is not a multiple.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size))
    }

    /// Number of activity-log extents.
    pub fn extent_count(&self) -> u32 {
        // validate() bounds this by u32::MAX.
        self.chunk_count().div_ceil(u64::from(self.extent_chunks)) as u32
    }

    /// Byte offset of chunk `c`.
    pub fn chunk_offset(&self, c: u64) -> u64 {
        c * u64::from(self.chunk_size)
    }

    /// Length in bytes of chunk `c` (the last chunk may be short; 0 past the end).
    pub fn chunk_len(&self, c: u64) -> usize {
        let start = self.chunk_offset(c).min(self.size);
        let end = (start + u64::from(self.chunk_size)).min(self.size);
        (end - start) as usize
    }

    /// Chunks touched by the non-empty byte range `offset..offset+len`.
    pub fn chunks_of(&self, offset: u64, len: u64) -> Range<u64> {
        let cs = u64::from(self.chunk_size);
        offset / cs..(offset + len).div_ceil(cs)
    }

    /// Extent containing chunk `c`.
    pub fn extent_of(&self, c: u64) -> u32 {
        (c / u64::from(self.extent_chunks)) as u32
    }

    /// Extents touched by a non-empty chunk range.
    pub fn extents_of(&self, chunks: &Range<u64>) -> Range<u32> {
        self.extent_of(chunks.start)..self.extent_of(chunks.end - 1) + 1
    }

    /// Chunks of extent `e` (clamped to the disk).
    pub fn extent_chunk_range(&self, e: u32) -> Range<u64> {
        let ec = u64::from(self.extent_chunks);
        let start = u64::from(e) * ec;
        start.min(self.chunk_count())..(start + ec).min(self.chunk_count())
    }

    /// Errors unless `offset..offset+len` lies within the disk.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Errors unless `chunk` is a valid chunk index.
    pub fn check_chunk(&self, chunk: u64) -> Result<()> {
        if chunk < self.chunk_count() {
            Ok(())
        } else {
            Err(StoreError::OutOfRange {
                offset: chunk,
                len: 1,
                size: self.chunk_count(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_and_extent_math() {
        let g = Geometry::with_params(10_000, 1024, 4, 2).unwrap();
        assert_eq!(g.chunk_count(), 10);
        assert_eq!(g.extent_count(), 3);
        assert_eq!(g.chunk_len(9), 10_000 - 9 * 1024);
        assert_eq!(g.chunk_len(10), 0);
        assert_eq!(g.chunks_of(1023, 2), 0..2);
        assert_eq!(g.chunks_of(1024, 1024), 1..2);
        assert_eq!(g.extents_of(&(3..5)), 0..2);
        assert_eq!(g.extent_chunk_range(2), 8..10);
        assert!(g.check_range(9_999, 1).is_ok());
        assert!(g.check_range(9_999, 2).is_err());
        assert!(g.check_range(u64::MAX, 2).is_err());
        assert!(Geometry::with_params(0, 1024, 4, 2).is_err());
        assert!(Geometry::with_params(10, 1000, 4, 2).is_err());
        assert!(Geometry::with_params(10, 1024, 0, 2).is_err());
        assert!(Geometry::with_params(10, 1024, 4, 1).is_err());
    }
}
