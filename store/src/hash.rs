//! Chunk hashing: 256-bit BLAKE3, with a constant for all-zero chunks.

use serde::{Deserialize, Serialize};

/// A 256-bit chunk (or tree node) hash. Equal hashes mean "same content, skip sending".
pub type ChunkHash = [u8; 32];

/// The hash of every all-zero chunk, whatever its length. A constant so that sparse and
/// freshly created regions hash without reading or hashing anything. (A BLAKE3 output of
/// all zeros would need a preimage attack, so the constant cannot collide in practice.)
pub const ZERO_CHUNK_HASH: ChunkHash = [0; 32];

/// The chunk hash algorithm, recorded in the metadata so a later build can refuse or
/// recompute hashes made by another algorithm instead of comparing apples with pears.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashAlgo {
    /// BLAKE3, 256-bit output; [`ZERO_CHUNK_HASH`] for all-zero chunks.
    Blake3,
}

/// Hash of one chunk's bytes, as stored in the metadata and compared between copies.
/// Every copy of a disk must use this function, so that equal content gives equal hashes.
pub fn hash_chunk(data: &[u8]) -> ChunkHash {
    if is_zero(data) {
        ZERO_CHUNK_HASH
    } else {
        blake3::hash(data).into()
    }
}

/// Whether `data` is all zero bytes.
pub fn is_zero(data: &[u8]) -> bool {
    // Slice equality lowers to memcmp, which is fast even when this crate is built
    // without optimisation.
    static ZEROS: [u8; 4096] = [0; 4096];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Hash of an interior tree node over its children's hashes. The leading domain byte keeps
/// a node hash from ever being mistaken for a chunk hash.
pub(crate) fn hash_node(children: &[ChunkHash]) -> ChunkHash {
    let mut h = blake3::Hasher::new();
    h.update(&[1]);
    for c in children {
        h.update(c);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_hash_to_the_constant() {
        assert_eq!(hash_chunk(&[0; 65536]), ZERO_CHUNK_HASH);
        assert_eq!(hash_chunk(&[0; 700]), ZERO_CHUNK_HASH);
        let mut d = vec![0u8; 65536];
        d[65535] = 1;
        assert_ne!(hash_chunk(&d), ZERO_CHUNK_HASH);
        assert_eq!(hash_chunk(&d), <[u8; 32]>::from(blake3::hash(&d)));
        assert!(is_zero(&[]));
    }
}
