//! Group commit on the leader: concurrent client requests are proposed to Raft together as
//! one entry, so one log append and one fsync serve many writes.
//!
//! openraft 0.9 appends and flushes each entry before it handles the next request, which
//! caps throughput at one entry per fsync. The proposer keeps at most [`IN_FLIGHT`] entries
//! in Raft and packs everything that arrived meanwhile into the next one: under load,
//! batches grow by themselves; an idle cluster still commits a lone request at once.

use std::sync::Arc;

use convoy_raft::{NodeId, Proposal, Raft, Request, Response};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Entries the proposer keeps in Raft at once: one committing while the next is appended.
pub const IN_FLIGHT: usize = 2;
/// Most requests in one entry (bounds entry size and the damage of a slow one).
pub const MAX_BATCH: usize = 512;

/// What became of one proposed request.
#[derive(Debug)]
pub enum Proposed {
    /// Committed and applied; the model's answer.
    Applied(Response),
    /// This node is not the leader; the known leader, if any.
    NotLeader(Option<NodeId>),
    /// Raft failed (storage error, shutdown).
    Failed(String),
}

type Job = (Request, oneshot::Sender<Proposed>);

/// Handle to the proposer task.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Job>,
}

impl Proposer {
    /// Starts the proposer for `raft`.
    pub fn spawn(raft: Raft) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(raft, rx));
        Self { tx }
    }

    /// Proposes `req` and waits until it is applied (or refused).
    pub async fn propose(&self, req: Request) -> Proposed {
        let (done, wait) = oneshot::channel();
        if self.tx.send((req, done)).await.is_err() {
            return Proposed::Failed("the proposer stopped (agent shutting down)".into());
        }
        wait.await
            .unwrap_or_else(|_| Proposed::Failed("the proposer dropped the request".into()))
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Job>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        // Everything that queued while we waited for a slot joins this entry.
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        metrics::histogram!("convoy_raft_batch_requests").record(jobs.len() as f64);
        let raft = raft.clone();
        tokio::spawn(async move {
            let proposal = Proposal {
                requests: jobs.iter().map(|(r, _)| r.clone()).collect(),
            };
            let result = raft.client_write(proposal).await;
            drop(permit);
            match result {
                Ok(resp) => {
                    let mut answers = resp.data.0.into_iter();
                    for (_, done) in jobs {
                        let answer = match answers.next() {
                            Some(r) => Proposed::Applied(r),
                            None => Proposed::Failed(
                                "the state machine returned too few answers".into(),
                            ),
                        };
                        let _ = done.send(answer);
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    for (_, done) in jobs {
                        let _ = done.send(Proposed::NotLeader(f.leader_id));
                    }
                }
                Err(e) => {
                    let msg = format!("raft write failed: {e}");
                    for (_, done) in jobs {
                        let _ = done.send(Proposed::Failed(msg.clone()));
                    }
                }
            }
        });
    }
}
