//! Decoding what the log store and the state machine stored, at any schema version this
//! build knows, into the current types. Version 1 is the format before schema versions
//! existed; its shapes are mirrored here (serde shapes only) and upgraded with the
//! model's [`convoy_model::v1`] conversions.

use convoy_codec::CodecError;
use convoy_model::{SCHEMA_VERSION, v1, v3, v4};
use openraft::{EntryPayload, LogId, Membership, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::state_machine::SmState;
use crate::{NodeAddr, NodeId, Proposal, Request, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

/// Version 1 of [`Request`].
#[derive(Serialize, Deserialize)]
struct V1Request {
    request_id: u128,
    command: v1::Command,
}

/// Version 1 of [`Proposal`].
#[derive(Serialize, Deserialize)]
struct V1Proposal {
    requests: Vec<V1Request>,
}

/// Version 1 of openraft's `EntryPayload` over our type config (same variant order).
#[derive(Serialize, Deserialize)]
enum V1Payload {
    Blank,
    Normal(V1Proposal),
    Membership(Membership<NodeId, NodeAddr>),
}

/// Version 1 of openraft's `Entry` over our type config.
#[derive(Serialize, Deserialize)]
struct V1Entry {
    log_id: LogId<NodeId>,
    payload: V1Payload,
}

/// Version 1 of [`SmState`].
#[derive(Serialize, Deserialize)]
struct V1SmState {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, NodeAddr>,
    model: v1::ClusterModel,
}

/// Version 4 of [`SmState`].
#[derive(Serialize, Deserialize)]
struct V4SmState {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, NodeAddr>,
    model: v4::ClusterModel,
}

/// Version 3 of [`SmState`] (versions 2 and 3 wrote the same shapes).
#[derive(Serialize, Deserialize)]
struct V3SmState {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, NodeAddr>,
    model: v3::ClusterModel,
}

fn unsupported(found: u8) -> CodecError {
    CodecError::UnsupportedVersion {
        found,
        supported: SCHEMA_VERSION,
    }
}

/// Encodes a log entry at the current schema version.
pub fn encode_entry(entry: &Entry) -> Result<Vec<u8>, CodecError> {
    convoy_codec::encode_versioned(SCHEMA_VERSION, entry)
}

/// Decodes a stored log entry of any known schema version.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, CodecError> {
    let (version, body) = convoy_codec::split_version(bytes)?;
    match version {
        // Versions 3, 4 and 5 only appended command variants: version 2, 3 and 4 entries
        // decode as they are.
        SCHEMA_VERSION | 4 | 3 | 2 => convoy_codec::decode_body(body),
        1 => {
            let old: V1Entry = convoy_codec::decode_body(body)?;
            let payload = match old.payload {
                V1Payload::Blank => EntryPayload::Blank,
                V1Payload::Membership(m) => EntryPayload::Membership(m),
                V1Payload::Normal(p) => EntryPayload::Normal(Proposal {
                    requests: p
                        .requests
                        .into_iter()
                        .map(|r| Request {
                            request_id: r.request_id,
                            command: r.command.into(),
                        })
                        .collect(),
                }),
            };
            Ok(Entry {
                log_id: old.log_id,
                payload,
            })
        }
        other => Err(unsupported(other)),
    }
}

/// Encodes the state machine's state (a snapshot's data) at the current schema version.
pub fn encode_state(state: &SmState) -> Result<Vec<u8>, CodecError> {
    convoy_codec::encode_versioned(SCHEMA_VERSION, state)
}

/// Decodes a snapshot's data of any known schema version.
pub fn decode_state(bytes: &[u8]) -> Result<SmState, CodecError> {
    let (version, body) = convoy_codec::split_version(bytes)?;
    match version {
        SCHEMA_VERSION => convoy_codec::decode_body(body),
        // Version 5 gave migrations their QEMU settings and measurements.
        4 => {
            let old: V4SmState = convoy_codec::decode_body(body)?;
            Ok(SmState {
                last_applied: old.last_applied,
                last_membership: old.last_membership,
                model: old.model.upgrade(),
            })
        }
        // Version 3 only appended a command variant to version 2: both snapshots hold
        // VMs without the QEMU configuration version 4 added.
        3 | 2 => {
            let old: V3SmState = convoy_codec::decode_body(body)?;
            Ok(SmState {
                last_applied: old.last_applied,
                last_membership: old.last_membership,
                model: old.model.upgrade(),
            })
        }
        1 => {
            let old: V1SmState = convoy_codec::decode_body(body)?;
            Ok(SmState {
                last_applied: old.last_applied,
                last_membership: old.last_membership,
                model: old.model.upgrade(),
            })
        }
        other => Err(unsupported(other)),
    }
}
