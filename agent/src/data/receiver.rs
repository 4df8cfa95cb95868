//! The replica's side of a replication stream: validates the sender, applies writes in
//! sequence order, makes them durable, and acknowledges.
//!
//! Refused and counted: a sender that is not the group's sequencer, a sequencer epoch
//! older than the replica has seen, a write whose sequence is not exactly the next one (a
//! duplicate or a gap), a disk that is not in the group. After a refusal the stream ends
//! with the reason sent to the sender; it reconnects and resumes from what the replica
//! acknowledged.
//!
//! Durability: frames are applied as they arrive; before each acknowledgement the written
//! images are fdatasynced, so an acknowledged sequence survives SIGKILL and power loss.
//! The progress record follows a little later (at most [`RECORD_EVERY`] behind, or when a
//! flag changes); after a crash the sequencer tells the replica how far it acknowledged,
//! and the replica resumes from there. Before applying past its "may have applied" mark
//! the replica raises that mark durably, so after a crash it knows which suffix of its
//! images may be torn and that it is not a prefix until it re-applied past it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use convoy_raft::model::DiskId;
use convoy_store::{Backend, DiskImage};
use convoy_transport::InboundStream;
use futures::FutureExt;

use super::DataPlane;
use super::replica_state::{ReplicaState, StateFile};
use super::wire::{FromReplica, Hello, HelloReply, Payload, ToReplica};

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Sender's epoch is older than the replica's.
    #[error("stale epoch {got}: this replica has seen epoch {have}")]
    StaleEpoch {
        /// Epoch in the message.
        got: u64,
        /// Epoch the replica knows.
        have: u64,
    },
    /// A write arrived out of order.
    #[error("write {got} out of order: expected {expected} (duplicate or gap)")]
    OutOfOrder {
        /// Expected sequence.
        expected: u64,
        /// Received sequence.
        got: u64,
    },
    /// Local storage failed.
    #[error("local storage on the replica: {0}")]
    Storage(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Checks a batch of writes against the replica's progress: pure, for unit tests.
pub fn check_writes(state: &ReplicaState, epoch: u64, seqs: &[u64]) -> Result<(), Refusal> {
    if epoch < state.epoch {
        return Err(Refusal::StaleEpoch {
            got: epoch,
            have: state.epoch,
        });
    }
    for (expected, &s) in (state.applied_seq + 1..).zip(seqs) {
        if s != expected {
            return Err(Refusal::OutOfOrder { expected, got: s });
        }
    }
    Ok(())
}

/// What a sequencer that remembers `acked` (this replica acknowledged it durably in an
/// earlier session) lets the replica conclude: it holds everything through `acked`, if its
/// own record agrees that far could have been applied. Pure, for unit tests.
pub fn resume_point(state: &ReplicaState, acked: u64) -> u64 {
    if acked > state.applied_seq && acked <= state.may_have_applied {
        acked
    } else {
        state.applied_seq
    }
}

fn refuse_metric(r: &Refusal) {
    let kind = match r {
        Refusal::StaleEpoch { .. } => "stale_epoch",
        Refusal::OutOfOrder { .. } => "out_of_order",
        Refusal::Storage(_) => "storage",
        Refusal::Other(_) => "other",
    };
    crate::metrics::replica_refused(kind);
}

/// Sends one message to the sequencer.
async fn send_msg(
    send: &mut convoy_transport::FramedSend,
    msg: &(impl serde::Serialize + ?Sized),
) -> anyhow::Result<()> {
    send.send_frame(&convoy_codec::encode(msg)?).await?;
    Ok(())
}

/// Sends the hello's refusal and finishes the stream, so the sender reads the reason:
/// a stream dropped unfinished is reset, and a reset discards what was not read yet.
async fn end_with_refusal(
    send: &mut convoy_transport::FramedSend,
    msg: &HelloReply,
) -> anyhow::Result<()> {
    send_msg(send, msg).await?;
    send.finish()?;
    Ok(())
}

/// Serves one inbound replication stream until it ends.
pub async fn serve(stream: InboundStream, plane: Arc<DataPlane>) -> anyhow::Result<()> {
    let InboundStream {
        peer,
        mut send,
        mut recv,
        ..
    } = stream;
    let Some(first) = recv.recv_frame().await? else {
        return Ok(());
    };
    let hello: Hello = convoy_codec::decode(&first)?;
    let refuse = |reason: String| HelloReply::Refuse { reason };
    // A sender with a newer epoch than this host knows proves the model moved on (a
    // hand-over): wait briefly for this host to apply it before judging the sender.
    let role = plane
        .replica_role_at_least(hello.cg_id, hello.epoch, Duration::from_secs(3))
        .await;
    let role = match role {
        Some(r) => r,
        None => {
            let msg = refuse(format!(
                "node {} holds no replica of group '{}' (id {})",
                plane.node(),
                hello.cg,
                hello.cg_id
            ));
            crate::metrics::replica_refused("not_a_replica");
            return end_with_refusal(&mut send, &msg).await;
        }
    };
    if role.sequencer != peer {
        let msg = refuse(format!(
            "node {peer} does not order group '{}' (node {} does)",
            role.cg, role.sequencer
        ));
        crate::metrics::replica_refused("not_the_sequencer");
        return end_with_refusal(&mut send, &msg).await;
    }
    if hello.epoch < role.sequencer_epoch {
        let r = Refusal::StaleEpoch {
            got: hello.epoch,
            have: role.sequencer_epoch,
        };
        refuse_metric(&r);
        return end_with_refusal(&mut send, &refuse(r.to_string())).await;
    }
    let expected: Vec<(DiskId, u64)> = role.disks.iter().map(|d| (d.id, d.size)).collect();
    if hello.disks != expected {
        let msg = refuse(format!(
            "disk list {:?} does not match the model's {:?}",
            hello.disks, expected
        ));
        crate::metrics::replica_refused("disk_mismatch");
        return end_with_refusal(&mut send, &msg).await;
    }
    // One stream per group at a time; a new sequencer connection replaces a dead one.
    let _turn = match tokio::time::timeout(
        Duration::from_secs(10),
        plane.replica_turn(hello.cg_id).lock_owned(),
    )
    .await
    {
        Ok(t) => t,
        Err(_) => {
            crate::metrics::replica_refused("busy");
            return end_with_refusal(
                &mut send,
                &refuse("another stream for this group is active".into()),
            )
            .await;
        }
    };
    let plane2 = Arc::clone(&plane);
    let expected2 = expected.clone();
    let cg_id = hello.cg_id;
    let opened = tokio::task::spawn_blocking(move || {
        let images = plane2.open_replica_images(&expected2)?;
        let holds_data = images
            .values()
            .any(|img| img.backend().next_data(0).ok().flatten().is_some());
        let (state_file, state) = plane2.open_replica_state(cg_id)?;
        anyhow::Ok((images, holds_data, state_file, state))
    })
    .await?;
    let (images, holds_data, state_file, mut state) = match opened {
        Ok(o) => o,
        Err(e) => {
            let r = Refusal::Storage(format!("{e:#}"));
            refuse_metric(&r);
            return end_with_refusal(&mut send, &refuse(r.to_string())).await;
        }
    };
    if hello.epoch < state.epoch {
        let r = Refusal::StaleEpoch {
            got: hello.epoch,
            have: state.epoch,
        };
        refuse_metric(&r);
        return end_with_refusal(&mut send, &refuse(r.to_string())).await;
    }
    state.epoch = hello.epoch;
    let resumed_at = resume_point(&state, hello.acked_by_you);
    let mut session = Session {
        cg_id: hello.cg_id,
        state,
        state_file,
        recorded: 0,
        reapply_until: None,
    };
    // After a crash the images may hold writes past the recorded progress; re-applying
    // those is not a prefix until the copy passes them again. Judged before the record
    // below, which would otherwise bring the mark down to the acknowledged point and
    // forget a torn suffix past it (a torn power cut showed one: a snapshot was kept).
    let until = session.state.may_have_applied.min(hello.last_seq);
    let lagged = resumed_at > session.state.applied_seq;
    if lagged {
        // The data through `resumed_at` is durable (this replica acknowledged it); only
        // the record lagged.
        session.state.applied_seq = resumed_at;
    }
    session.reapply_until = (until > session.state.applied_seq).then_some(until);
    if lagged {
        session = record(session).await?;
    }
    session.recorded = session.state.applied_seq;
    let accept = HelloReply::Accept {
        applied_seq: session.state.applied_seq,
        consistent: session.state.consistent,
        holds_data: holds_data || session.state.applied_seq > 0,
    };
    send_msg(&mut send, &accept).await?;
    tracing::info!(cg = %role.cg, sequencer = peer, applied = session.state.applied_seq, consistent = session.state.consistent, holds_data, "replication stream accepted");

    let mut record_at: Option<tokio::time::Instant> = None;
    // A broken stream or a bad frame ends the session through the record below, not by
    // returning at once: between batches nothing is half applied, so the copy is an exact
    // prefix through `applied_seq`, and the record brings the "may have applied" mark down
    // to it. (Returning left the mark up, and the next session, unable to tell the copy
    // from a torn one, kept no before-resync snapshot after a replica froze under load.)
    macro_rules! or_end {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => break Err(anyhow::Error::from(e)),
            }
        };
    }
    let result = loop {
        // Progress records are cheap to delay: written at most RECORD_EVERY after the
        // first unrecorded batch, measured from that batch (a timer re-armed on every
        // frame would never fire under load).
        let behind = session.state.applied_seq > session.recorded;
        if behind && record_at.is_none() {
            record_at = Some(tokio::time::Instant::now() + RECORD_EVERY);
        }
        let deadline = record_at.unwrap_or_else(|| tokio::time::Instant::now() + RECORD_EVERY);
        let frame = tokio::select! {
            f = recv.recv_frame() => or_end!(f),
            _ = tokio::time::sleep_until(deadline), if behind => {
                record_at = None;
                session = record(session).await?;
                or_end!(send_msg(&mut send, &session.ack()).await);
                continue;
            }
        };
        let Some(frame) = frame else { break Ok(()) };
        plane.set_seeding(session.cg_id, false);
        // Everything already received is applied before one fdatasync. Read here, not
        // in a separate task: a hand-off per batch costs more than the fdatasync.
        let mut frames = vec![frame];
        while frames.len() < 64 {
            match recv.recv_frame().now_or_never() {
                Some(Ok(Some(f))) => frames.push(f),
                _ => break,
            }
        }
        let msgs: Vec<ToReplica> = or_end!(
            frames
                .iter()
                .map(|f| convoy_codec::decode(f))
                .collect::<Result<_, _>>()
        );
        let seeding = msgs
            .last()
            .is_some_and(|m| matches!(m, ToReplica::SeedByHashes { .. }));
        // Applying ends in an fdatasync, and a resync starts with a copy of the whole
        // group (the before-resync snapshot): both run on the blocking pool. On a runtime
        // worker, a slow disk (300 ms per fsync in the test) held it for as long, and two
        // groups held every worker of a two-core host, so Raft's heartbeats went
        // unanswered and the node started elections (a new term within a second). The
        // hand-off costs ~0.1 ms of a sync write's latency.
        let plane2 = Arc::clone(&plane);
        let images2 = images.clone();
        let (r, s) = tokio::task::spawn_blocking(move || {
            let mut session = session;
            let r = apply_batch(&plane2, &images2, &mut session, msgs);
            (r, session)
        })
        .await?;
        session = s;
        match r {
            Ok(stored) => {
                if stored {
                    record_at = None;
                }
                plane.note_applied(session.cg_id, session.state.applied_seq);
                if session.last_record_due() {
                    record_at = None;
                    session = record(session).await?;
                }
                or_end!(send_msg(&mut send, &session.ack()).await);
                if seeding {
                    plane.set_seeding(session.cg_id, true);
                    or_end!(send_msg(&mut send, &FromReplica::SeedReady).await);
                }
            }
            Err(refusal) => {
                refuse_metric(&refusal);
                tracing::warn!(cg = %role.cg, sequencer = peer, reason = %refusal, "refused replication data");
                let msg = FromReplica::Refused {
                    reason: refusal.to_string(),
                };
                or_end!(send_msg(&mut send, &msg).await);
                or_end!(send.finish());
                // Read on until the sender ends its half: dropping ours now would stop the
                // sender's writes, and that error could end its session before it read the
                // reason.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Ok(Some(_)) = recv.recv_frame().await {}
                })
                .await;
                break Ok(());
            }
        }
    };
    plane.set_seeding(session.cg_id, false);
    // The stream ended: record progress so a reconnect resumes without re-applying.
    if session.state.applied_seq > session.recorded
        || session.state.may_have_applied > session.state.applied_seq
    {
        record(session).await?;
    }
    result
}

/// How long applied progress may wait before it is recorded durably.
const RECORD_EVERY: Duration = Duration::from_millis(50);
/// How far ahead of what it applies the replica reserves its "may have applied" mark.
const APPLY_RESERVE: u64 = 1024;

/// One stream's replica state.
struct Session {
    cg_id: u64,
    state: ReplicaState,
    state_file: StateFile,
    /// `applied_seq` as last stored durably.
    recorded: u64,
    /// After a crash: re-applied writes up to here make the copy a non-prefix for a while.
    reapply_until: Option<u64>,
}

impl Session {
    fn ack(&self) -> FromReplica {
        FromReplica::Ack {
            applied_seq: self.state.applied_seq,
            recorded_seq: self.recorded,
            consistent: self.state.consistent,
        }
    }

    fn last_record_due(&self) -> bool {
        // Far behind: record now rather than lean on the sequencer's memory.
        self.state.applied_seq > self.recorded + APPLY_RESERVE / 2
    }

    fn store(&mut self) -> Result<(), Refusal> {
        self.state_file
            .store(&self.state)
            .map_err(|e| Refusal::Storage(e.to_string()))?;
        self.recorded = self.state.applied_seq;
        Ok(())
    }
}

/// Stores the progress record (data of everything applied is already durable). Called
/// between batches, when nothing past `applied_seq` touched the images, so the "may have
/// applied" mark comes down to it: a crash now leaves no torn suffix to distrust.
async fn record(session: Session) -> anyhow::Result<Session> {
    let (r, s) = tokio::task::spawn_blocking(move || {
        let mut s = session;
        if s.reapply_until.is_none() && s.state.consistent && s.state.consistent_at.is_none() {
            s.state.may_have_applied = s.state.applied_seq;
        }
        let r = s.store();
        (r, s)
    })
    .await?;
    r.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(s)
}

/// Applies decoded messages in order, then makes the data durable (one fdatasync per
/// written image). The progress record is stored only when a flag changes or the
/// "may have applied" mark must move; otherwise [`record`] stores it a little later.
/// Returns whether the record was stored.
fn apply_batch(
    plane: &DataPlane,
    images: &BTreeMap<DiskId, Arc<DiskImage>>,
    session: &mut Session,
    msgs: Vec<ToReplica>,
) -> Result<bool, Refusal> {
    let apply_lock = plane.apply_lock(session.cg_id);
    let _applying = apply_lock.write().unwrap_or_else(|p| p.into_inner());
    let mut touched = BTreeSet::new();
    let io = |e: convoy_store::StoreError| Refusal::Storage(e.to_string());
    let mut result = Ok(());
    let mut store = false;
    let mut stored = false;
    for msg in msgs {
        match msg {
            ToReplica::Writes { epoch, writes } => {
                let seqs: Vec<u64> = writes.iter().map(|w| w.seq).collect();
                if let Err(r) = check_writes(&session.state, epoch, &seqs) {
                    result = Err(r);
                    break;
                }
                let Some(&last) = seqs.last() else { continue };
                if let Some(until) = session.reapply_until {
                    if until > session.state.applied_seq && session.state.consistent {
                        // Re-applying what the images may already hold: not a prefix
                        // until the copy is past it again.
                        session.state.consistent = false;
                        session.state.consistent_at = Some(until + 1);
                        session.store()?;
                        stored = true;
                    }
                    if last >= until {
                        session.reapply_until = None;
                    }
                }
                if last > session.state.may_have_applied {
                    session.state.may_have_applied = last + APPLY_RESERVE;
                    session.store()?;
                    stored = true;
                }
                for w in writes {
                    let image = images.get(&w.disk).ok_or_else(|| {
                        Refusal::Other(format!("disk {} is not in this group", w.disk))
                    })?;
                    if let Err(e) = apply(image, w.offset, &w.payload) {
                        // The write may have partly landed: the mark must not come down.
                        session.reapply_until = Some(session.state.may_have_applied);
                        return Err(io(e));
                    }
                    touched.insert(w.disk);
                    session.state.applied_seq = w.seq;
                }
            }
            ToReplica::ResyncBegin { epoch } => {
                if epoch < session.state.epoch {
                    result = Err(Refusal::StaleEpoch {
                        got: epoch,
                        have: session.state.epoch,
                    });
                    break;
                }
                // Only a true prefix may become the fallback: after a crash the images may
                // hold a torn suffix past `applied_seq` until it was re-applied.
                let torn_tail = session
                    .reapply_until
                    .is_some_and(|until| until > session.state.applied_seq);
                session.reapply_until = None;
                if session.state.consistent && !session.state.resync_snapshot && !torn_tail {
                    // Keep the last consistent state before the copy stops being a prefix.
                    for image in images.values() {
                        image.flush().map_err(io)?;
                    }
                    plane
                        .snapshot_before_resync(session.cg_id, images)
                        .map_err(|e| Refusal::Storage(format!("{e:#}")))?;
                    session.state.resync_snapshot = true;
                } else if torn_tail && !session.state.resync_snapshot {
                    tracing::warn!(
                        cg_id = session.cg_id,
                        "a resync starts on a copy that may hold a torn suffix: no consistent fallback is kept"
                    );
                }
                session.state.consistent = false;
                session.state.consistent_at = None;
                session.store()?;
                stored = true;
            }
            ToReplica::SeedByHashes { epoch } => {
                if epoch < session.state.epoch {
                    result = Err(Refusal::StaleEpoch {
                        got: epoch,
                        have: session.state.epoch,
                    });
                    break;
                }
            }
            ToReplica::Chunks { epoch, chunks } => {
                if epoch < session.state.epoch {
                    result = Err(Refusal::StaleEpoch {
                        got: epoch,
                        have: session.state.epoch,
                    });
                    break;
                }
                for (disk, offset, payload) in chunks {
                    let image = images.get(&disk).ok_or_else(|| {
                        Refusal::Other(format!("disk {disk} is not in this group"))
                    })?;
                    apply(image, offset, &payload).map_err(io)?;
                    touched.insert(disk);
                }
            }
            ToReplica::ResyncEnd {
                epoch,
                resume_seq,
                consistent_at,
            } => {
                if epoch < session.state.epoch {
                    result = Err(Refusal::StaleEpoch {
                        got: epoch,
                        have: session.state.epoch,
                    });
                    break;
                }
                session.state.applied_seq = resume_seq.saturating_sub(1);
                session.state.may_have_applied = session
                    .state
                    .may_have_applied
                    .max(session.state.applied_seq);
                session.state.consistent_at = Some(consistent_at);
                store = true;
            }
        }
    }
    for disk in &touched {
        if let Some(image) = images.get(disk) {
            image.flush().map_err(io)?;
        }
    }
    if let Some(at) = session.state.consistent_at {
        if session.state.applied_seq + 1 >= at {
            session.state.consistent = true;
            session.state.consistent_at = None;
            store = true;
        }
    }
    if store {
        session.store()?;
        stored = true;
    }
    if session.state.consistent && session.state.resync_snapshot {
        // The flag goes first, durably: a crash between the two must not leave a flag
        // that points at a half-removed snapshot.
        session.state.resync_snapshot = false;
        session.store()?;
        stored = true;
        plane.drop_resync_snapshot(session.cg_id);
    }
    result.map(|()| stored)
}

fn apply(image: &DiskImage, offset: u64, payload: &Payload) -> convoy_store::Result<()> {
    match payload {
        Payload::Data(b) => image.write_at(b, offset),
        Payload::Zeroes(n) => image.write_zeroes(offset, *n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_duplicate_and_gap_are_refused() {
        let s = ReplicaState {
            applied_seq: 10,
            epoch: 3,
            consistent: true,
            ..Default::default()
        };
        assert!(check_writes(&s, 3, &[11, 12, 13]).is_ok());
        assert!(matches!(
            check_writes(&s, 2, &[11]),
            Err(Refusal::StaleEpoch { got: 2, have: 3 })
        ));
        assert!(matches!(
            check_writes(&s, 3, &[10]),
            Err(Refusal::OutOfOrder {
                expected: 11,
                got: 10
            })
        ));
        assert!(matches!(
            check_writes(&s, 3, &[12]),
            Err(Refusal::OutOfOrder {
                expected: 11,
                got: 12
            })
        ));
        assert!(matches!(
            check_writes(&s, 4, &[11, 13]),
            Err(Refusal::OutOfOrder {
                expected: 12,
                got: 13
            })
        ));
    }

    #[test]
    fn a_replica_resumes_from_what_it_acknowledged_not_from_its_lagging_record() {
        let s = ReplicaState {
            applied_seq: 100,
            may_have_applied: 1124,
            consistent: true,
            ..Default::default()
        };
        assert_eq!(resume_point(&s, 600), 600);
        // Nothing newer acknowledged: the record stands.
        assert_eq!(resume_point(&s, 0), 100);
        assert_eq!(resume_point(&s, 50), 100);
        // Beyond what it could have applied (a wiped copy, a confused sender): ignored.
        assert_eq!(resume_point(&s, 5000), 100);
        assert_eq!(resume_point(&ReplicaState::default(), 7), 0);
    }
}
