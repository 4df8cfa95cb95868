//! The metadata checkpoint file, `disk-<id>.meta`, in its two formats.
//!
//! **Format 1** (every image before this module): one codec value holding every chunk
//! hash (32 bytes per chunk), a dense hash-known bitmap and each tracker's dense bitmap.
//! Its size grows with the disk (512 MiB per TiB) and passes the codec's decode limit
//! for disks over ~508 GiB.
//!
//! **Format 2**: `MAGIC`, a version byte (2), then length-prefixed codec values: a header,
//! the bitmap of chunks whose hash is unknown, then one bitmap per tracker, then an
//! xxh3-64 of everything before it. Chunk hashes live in `disk-<id>.hashes`; bitmaps are
//! sparse (all-zero and all-one pages cost a few bytes), so the record stays small for
//! any disk size, and each value is decoded on its own (a bitmap is at most 2 MiB per TiB
//! of disk). A format-1 record starts with the codec's version byte (1), never with
//! `MAGIC`, which is how the two are told apart.
//!
//! Upgrade: a format-1 image is converted on open ([`upgrade_v1`] writes its hashes to the
//! chunk-hash file) and checkpointed in format 2 before anything else changes it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bitmap::Bitmap;
use crate::geometry::Geometry;
use crate::hash::{ChunkHash, HashAlgo, ZERO_CHUNK_HASH};
use crate::leaves::{LEAVES_PER_PAGE, LeafPage, PAGE_BYTES, hash_file_len};
use crate::sparse::SparseBitmap;

/// First bytes of a format-2 (and later) metadata file.
pub(crate) const MAGIC: &[u8; 8] = b"CVYSMETA";
/// The format this build writes.
pub(crate) const FORMAT: u8 = 2;

/// The metadata checkpoint of format 1, as it was stored (kept to read old images).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MetaRecordV1 {
    pub(crate) geometry: Geometry,
    pub(crate) hash_algo: HashAlgo,
    /// Incremented by every checkpoint; pairs the record with its activity log.
    pub(crate) generation: u64,
    /// 32 bytes per chunk; meaningful where `known` is set.
    pub(crate) hashes: Vec<u8>,
    pub(crate) known: Bitmap,
    pub(crate) trackers: BTreeMap<String, Bitmap>,
}

/// Header of a format-2 record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct HeaderV2 {
    geometry: Geometry,
    hash_algo: HashAlgo,
    generation: u64,
    /// Length of the chunk-hash file this record goes with (32 bytes per chunk, whole
    /// 4 KiB pages); a file of another length is not trusted.
    hash_file_len: u64,
    /// Tracker names, in the order of their bitmaps.
    trackers: Vec<String>,
}

/// The content of a metadata checkpoint, whatever its format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) geometry: Geometry,
    pub(crate) generation: u64,
    /// Chunks whose slot in the chunk-hash file must not be trusted.
    pub(crate) unknown: SparseBitmap,
    pub(crate) trackers: BTreeMap<String, SparseBitmap>,
}

/// What a metadata file held.
pub(crate) enum Decoded {
    /// Format 2: the chunk hashes are in the chunk-hash file.
    Current(Meta),
    /// Format 1: the chunk hashes are in the record; see [`upgrade_v1`].
    V1(MetaRecordV1),
}

/// Encodes `meta` in the current format.
pub(crate) fn encode(meta: &Meta) -> Result<Vec<u8>, convoy_codec::CodecError> {
    let header = HeaderV2 {
        geometry: meta.geometry,
        hash_algo: HashAlgo::Blake3,
        generation: meta.generation,
        hash_file_len: hash_file_len(meta.geometry.chunk_count()),
        trackers: meta.trackers.keys().cloned().collect(),
    };
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    push_value(&mut out, &header)?;
    push_value(&mut out, &meta.unknown.to_repr())?;
    for t in meta.trackers.values() {
        push_value(&mut out, &t.to_repr())?;
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

fn push_value<T: Serialize>(out: &mut Vec<u8>, v: &T) -> Result<(), convoy_codec::CodecError> {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    convoy_codec::encode_into(v, out)?;
    let len = u32::try_from(out.len() - at - 4)
        .map_err(|_| convoy_codec::CodecError::Encode("metadata value over 4 GiB".into()))?;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Decodes a metadata file of any known format. Errors say what is wrong.
pub(crate) fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        // Format 1 has no marker of its own: one codec value.
        let r: MetaRecordV1 = convoy_codec::decode(bytes).map_err(|e| e.to_string())?;
        return Ok(Decoded::V1(r));
    };
    match rest.first() {
        Some(&FORMAT) => {}
        Some(v) => {
            return Err(format!(
                "metadata format {v}, this build reads formats 1 and {FORMAT}; use a newer build"
            ));
        }
        None => return Err("metadata file ends after its marker".into()),
    }
    let Some(body_len) = bytes.len().checked_sub(8) else {
        return Err("metadata file too short".into());
    };
    let (body, sum) = bytes.split_at(body_len);
    let mut s = [0u8; 8];
    s.copy_from_slice(sum);
    if xxhash_rust::xxh3::xxh3_64(body) != u64::from_le_bytes(s) {
        return Err("metadata checksum mismatch".into());
    }
    let mut rest = &body[MAGIC.len() + 1..];
    let header: HeaderV2 = take_value(&mut rest)?;
    header.geometry.validate().map_err(|e| e.to_string())?;
    if header.hash_algo != HashAlgo::Blake3 {
        return Err(format!("unknown hash algorithm {:?}", header.hash_algo));
    }
    let n = header.geometry.chunk_count();
    if header.hash_file_len != hash_file_len(n) {
        return Err(format!(
            "chunk-hash file of {} bytes for {n} chunks",
            header.hash_file_len
        ));
    }
    let unknown = SparseBitmap::from_repr(take_value(&mut rest)?, n)
        .map_err(|e| format!("hash-unknown bitmap: {e}"))?;
    let mut trackers = BTreeMap::new();
    for name in header.trackers {
        let t = SparseBitmap::from_repr(take_value(&mut rest)?, n)
            .map_err(|e| format!("tracker {name:?}: {e}"))?;
        if trackers.insert(name.clone(), t).is_some() {
            return Err(format!("tracker {name:?} listed twice"));
        }
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last bitmap", rest.len()));
    }
    Ok(Decoded::Current(Meta {
        geometry: header.geometry,
        generation: header.generation,
        unknown,
        trackers,
    }))
}

fn take_value<T: serde::de::DeserializeOwned>(rest: &mut &[u8]) -> Result<T, String> {
    let len = rest
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("metadata truncated")?;
    let v = rest.get(4..4 + len).ok_or("metadata truncated")?;
    let out = convoy_codec::decode(v).map_err(|e| e.to_string())?;
    *rest = &rest[4 + len..];
    Ok(out)
}

/// Converts a format-1 record: checks it, and returns its content with the pages of its
/// known non-zero hashes (page index, page) for the caller to write to the chunk-hash
/// file. Unknown hashes are stored as zeros (their slots are never trusted).
#[allow(clippy::type_complexity)]
pub(crate) fn upgrade_v1(r: MetaRecordV1) -> Result<(Meta, Vec<(u64, Box<LeafPage>)>), String> {
    r.geometry.validate().map_err(|e| e.to_string())?;
    let n = r.geometry.chunk_count();
    if r.hash_algo != HashAlgo::Blake3 {
        return Err(format!("unknown hash algorithm {:?}", r.hash_algo));
    }
    if r.hashes.len() as u64 != n * 32 {
        return Err(format!("{} hash bytes for {n} chunks", r.hashes.len()));
    }
    if r.known.len() != n || !r.known.is_well_formed() {
        return Err("hash-known bitmap does not match the chunk count".into());
    }
    let mut unknown = SparseBitmap::new(n);
    for c in 0..n {
        if !r.known.get(c) {
            unknown.set(c);
        }
    }
    let mut trackers = BTreeMap::new();
    for (name, t) in &r.trackers {
        if t.len() != n || !t.is_well_formed() {
            return Err(format!("tracker {name:?} does not match the chunk count"));
        }
        let mut s = SparseBitmap::new(n);
        for c in t.iter_ones() {
            s.set(c);
        }
        trackers.insert(name.clone(), s);
    }
    let mut pages = Vec::new();
    for (p, bytes) in r.hashes.chunks(PAGE_BYTES).enumerate() {
        let mut page = Box::new([ZERO_CHUNK_HASH; LEAVES_PER_PAGE as usize]);
        let mut any = false;
        for (i, h) in bytes.chunks_exact(32).enumerate() {
            let c = p as u64 * LEAVES_PER_PAGE + i as u64;
            if r.known.get(c) && h != ZERO_CHUNK_HASH {
                let mut a: ChunkHash = [0; 32];
                a.copy_from_slice(h);
                page[i] = a;
                any = true;
            }
        }
        if any {
            pages.push((p as u64, page));
        }
    }
    let meta = Meta {
        geometry: r.geometry,
        generation: r.generation,
        unknown,
        trackers,
    };
    Ok((meta, pages))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        let g = Geometry::with_params(100 * 4096 + 7, 4096, 4, 3).unwrap();
        let n = g.chunk_count();
        let mut unknown = SparseBitmap::new(n);
        unknown.set_range(3..9);
        let mut t = SparseBitmap::new(n);
        t.set(100);
        Meta {
            geometry: g,
            generation: 9,
            unknown,
            trackers: BTreeMap::from([("r".to_string(), t), ("s".into(), SparseBitmap::new(n))]),
        }
    }

    #[test]
    fn round_trip_and_damage_is_refused() {
        let m = meta();
        let bytes = encode(&m).unwrap();
        assert!(bytes.starts_with(MAGIC));
        match decode(&bytes).unwrap() {
            Decoded::Current(back) => assert_eq!(back, m),
            Decoded::V1(_) => panic!("decoded as format 1"),
        }
        for cut in [9, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(decode(&flipped).is_err());
        let mut newer = bytes;
        newer[MAGIC.len()] = FORMAT + 1;
        let e = decode(&newer).err().unwrap_or_default();
        assert!(e.contains("newer build"), "{e}");
    }

    #[test]
    fn a_16_tib_record_is_small() {
        let g = Geometry::new(16 << 40).unwrap();
        let n = g.chunk_count();
        let mut unknown = SparseBitmap::new(n);
        unknown.set_range(0..n);
        let mut t = SparseBitmap::new(n);
        for c in (0..n).step_by(1 << 14) {
            t.set(c);
        }
        let m = Meta {
            geometry: g,
            generation: 1,
            unknown,
            trackers: BTreeMap::from([("r".to_string(), t)]),
        };
        let bytes = encode(&m).unwrap();
        assert!(bytes.len() < 256 << 10, "{} bytes", bytes.len());
        assert!(matches!(decode(&bytes), Ok(Decoded::Current(back)) if back == m));
    }
}
