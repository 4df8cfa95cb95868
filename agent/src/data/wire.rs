//! Messages of the replication stream (QUIC stream kind `Data`), sequencer → replica and
//! back. Every message is bound to the group and its sequencer epoch, and writes carry
//! their group sequence number, so a replica refuses a stale sender, a replay into another
//! group, and a duplicate or out-of-order write.

use bytes::Bytes;
use convoy_raft::model::DiskId;
use serde::{Deserialize, Serialize};

/// First frame of a replication stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Group id (model-assigned).
    pub cg_id: u64,
    /// Group name, for messages.
    pub cg: String,
    /// The sender's sequencer epoch for the group.
    pub epoch: u64,
    /// The group's disks and their sizes, in the group's order.
    pub disks: Vec<(DiskId, u64)>,
    /// Last sequence number the sequencer assigned: every write the replica can hold is
    /// at or below it.
    pub last_seq: u64,
    /// The highest sequence this replica acknowledged (durable) to this sequencer in an
    /// earlier session, 0 if none: its progress record may lag behind it, and the
    /// sequencer's journal is trimmed by acknowledgements, so the replica resumes from here.
    pub acked_by_you: u64,
}

/// The replica's answer to [`Hello`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum HelloReply {
    /// Ready: the replica durably applied every write up to `applied_seq` in order.
    Accept {
        /// Highest sequence applied and durable (0 = nothing yet).
        applied_seq: u64,
        /// Whether the copy is a consistent prefix (false while a resync is unfinished).
        consistent: bool,
        /// Whether the copy holds data (its images existed before this stream): a first
        /// sync then compares hashes and sends only differing chunks instead of a full copy.
        holds_data: bool,
    },
    /// Refused, with a reason for the sender's log.
    Refuse {
        /// Why.
        reason: String,
    },
}

/// Content of one replicated write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// Bytes to write.
    Data(Bytes),
    /// A range of zeroes of this length.
    Zeroes(u64),
}

impl Payload {
    /// Bytes this write changes.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Data(b) => b.len() as u64,
            Payload::Zeroes(n) => *n,
        }
    }

    /// True for an empty write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What holding this write costs a journal, in bytes: its data, or only a descriptor
    /// for a range of zeroes (a whole-disk discard must not overflow the journal).
    pub fn journal_cost(&self) -> u64 {
        const DESCRIPTOR: u64 = 48;
        match self {
            Payload::Data(b) => b.len() as u64 + DESCRIPTOR,
            Payload::Zeroes(_) => DESCRIPTOR,
        }
    }
}

/// One guest write in group order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireWrite {
    /// Group sequence number.
    pub seq: u64,
    /// Disk written.
    pub disk: DiskId,
    /// Byte offset.
    pub offset: u64,
    /// What was written.
    pub payload: Payload,
}

/// Primary → replica, after the hello.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToReplica {
    /// Consecutive writes in sequence order.
    Writes {
        /// Sender's epoch (must not be older than the replica's).
        epoch: u64,
        /// The writes; their seqs are consecutive and the first follows what was applied.
        writes: Vec<WireWrite>,
    },
    /// A dirty-chunk resync begins: keep a snapshot of the last consistent state first.
    ResyncBegin {
        /// Sender's epoch.
        epoch: u64,
    },
    /// During a resync: the sender now compares this copy's disks by hashes with delta
    /// sessions (stream kind `Delta`), which write the images directly; the replica lets
    /// them in until the next message on this stream.
    SeedByHashes {
        /// Sender's epoch.
        epoch: u64,
    },
    /// Whole chunks during a resync (not in sequence order).
    Chunks {
        /// Sender's epoch.
        epoch: u64,
        /// (disk, offset, content) triples.
        chunks: Vec<(DiskId, u64, Payload)>,
    },
    /// The resync's chunks are all sent. Writes continue from `resume_seq`; the copy is
    /// consistent again once every write before `consistent_at` is applied.
    ResyncEnd {
        /// Sender's epoch.
        epoch: u64,
        /// First sequence number the stream continues with.
        resume_seq: u64,
        /// The copy is a consistent prefix once it applied everything below this.
        consistent_at: u64,
    },
}

/// Replica → primary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromReplica {
    /// Everything up to `applied_seq` is applied and durable on the replica.
    Ack {
        /// Highest sequence whose data is durable in the replica's images.
        applied_seq: u64,
        /// Highest sequence the replica's progress record holds durably (informational:
        /// the sequencer remembers `applied_seq` and tells a reconnecting replica).
        recorded_seq: u64,
        /// Whether the copy is currently a consistent prefix.
        consistent: bool,
    },
    /// The replica applied everything sent before [`ToReplica::SeedByHashes`] and lets
    /// the sender's delta sessions write its images until the next message.
    SeedReady,
    /// The replica refused a message; the stream ends.
    Refused {
        /// Why (stale epoch, gap, duplicate, unknown disk...).
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_round_trip_through_the_codec() {
        let msg = ToReplica::Writes {
            epoch: 3,
            writes: vec![
                WireWrite {
                    seq: 7,
                    disk: 1,
                    offset: 4096,
                    payload: Payload::Data(Bytes::from_static(b"abc")),
                },
                WireWrite {
                    seq: 8,
                    disk: 2,
                    offset: 0,
                    payload: Payload::Zeroes(65536),
                },
            ],
        };
        let bytes = convoy_codec::encode(&msg).unwrap();
        let back: ToReplica = convoy_codec::decode(&bytes).unwrap();
        match back {
            ToReplica::Writes { epoch, writes } => {
                assert_eq!(epoch, 3);
                assert_eq!(writes[0].payload, Payload::Data(Bytes::from_static(b"abc")));
                assert_eq!(writes[1].payload.len(), 65536);
            }
            other => panic!("{other:?}"),
        }
    }
}
