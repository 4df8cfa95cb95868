//! The one codec for every wire message and on-disk record in Convoy.
//!
//! Every encoded value is `[version byte][bincode 2 body]`. The version byte lets a format
//! evolve: a reader that finds an older version can decode the older shape and upgrade it
//! (see [`split_version`]); a reader that finds a newer version refuses it with
//! [`CodecError::UnsupportedVersion`] instead of misreading it.
//!
//! Decoding is safe on untrusted input: it never panics, allocates at most
//! [`MAX_DECODE_BYTES`] for one value, and rejects trailing garbage.

pub mod file;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The format version this build writes.
pub const FORMAT_VERSION: u8 = 1;

/// Upper bound on what one decoded value may allocate; guards against hostile length fields.
pub const MAX_DECODE_BYTES: usize = 256 << 20;

/// Errors from [`encode`] and [`decode`].
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The input had no version byte at all.
    #[error("empty input: expected a version byte")]
    Empty,
    /// The input was written by a format version this build does not know.
    #[error("unsupported format version {found} (this build reads {supported})")]
    UnsupportedVersion {
        /// Version byte found in the input.
        found: u8,
        /// Version this build reads.
        supported: u8,
    },
    /// The body did not decode as the expected type.
    #[error("malformed body: {0}")]
    Decode(String),
    /// The body decoded but bytes were left over, so the input is not what it claims.
    #[error("{0} trailing bytes after the encoded value")]
    TrailingBytes(usize),
    /// The value could not be encoded (a serde shape bincode does not support).
    #[error("cannot encode value: {0}")]
    Encode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

/// Encodes `value` as `[FORMAT_VERSION][body]`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Appends the encoding of `value` to `out` (useful to build a framed message in place).
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(())
}

/// Encodes `value` as `[version][body]` for a stored type that keeps its own schema
/// version (and upgrades older ones when reading: see [`split_version`] and
/// [`decode_body`]).
pub fn encode_versioned<T: Serialize + ?Sized>(
    version: u8,
    value: &T,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.push(version);
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Splits an encoded value into its version byte and body, for readers that upgrade
/// older versions themselves.
pub fn split_version(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    match bytes.split_first() {
        Some((v, body)) => Ok((*v, body)),
        None => Err(CodecError::Empty),
    }
}

/// Decodes a value written by [`encode`] with the current [`FORMAT_VERSION`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (version, body) = split_version(bytes)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    decode_body(body)
}

/// Decodes a bare body (no version byte). Used by readers that dispatched on
/// [`split_version`] themselves.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping(u64),
        Put {
            key: String,
            value: Vec<u8>,
            extra: Option<BTreeMap<u64, String>>,
        },
    }

    #[test]
    fn round_trip_keeps_value() {
        let m = Msg::Put {
            key: "k".into(),
            value: vec![1, 2, 3],
            extra: Some(BTreeMap::from([(7, "x".into())])),
        };
        let bytes = encode(&m).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Msg>(&bytes).unwrap(), m);
    }

    #[test]
    fn refuses_unknown_version_and_trailing_bytes() {
        let mut bytes = encode(&Msg::Ping(5)).unwrap();
        bytes[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode::<Msg>(&bytes),
            Err(CodecError::UnsupportedVersion { .. })
        ));
        let mut bytes = encode(&Msg::Ping(5)).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<Msg>(&bytes),
            Err(CodecError::TrailingBytes(1))
        ));
        assert!(matches!(decode::<Msg>(&[]), Err(CodecError::Empty)));
    }

    #[test]
    fn hostile_length_does_not_allocate_unbounded() {
        // Version byte, variant 1 (Put), then a varint length claiming ~2^64 bytes.
        let bytes = [
            FORMAT_VERSION,
            1,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
        ];
        assert!(decode::<Msg>(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Msg>(&data);
        }

        #[test]
        fn any_ping_round_trips(n in any::<u64>()) {
            prop_assert_eq!(decode::<Msg>(&encode(&Msg::Ping(n)).unwrap()).unwrap(), Msg::Ping(n));
        }
    }
}
