//! What any agent can do for a client: propose writes (forwarding them to the leader),
//! linearizable reads, membership changes and status. The admin API and the inbound
//! forwarding handler both call into [`Cluster`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_raft::log_store::LogStats;
use convoy_raft::model::ModelError;
use convoy_raft::state_machine::ModelReader;
use convoy_raft::{Command, NodeAddr, NodeId, Outcome, Raft, Request, Response};
use convoy_transport::{Endpoint, StreamKind, TransportError};
use openraft::ChangeMembers;
use openraft::error::{ClientWriteError, RaftError};

use super::proposer::{Proposed, Proposer};
use super::rpc::{ForwardFailure, ForwardRequest, ForwardResponse, LocalRequest, LocalResponse};
use crate::api::types::{ClusterStatus, DiskFailure, MemberStatus, NodeStatus};

/// How long a write or read waits for a leader before giving up.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);
/// Timeout of one forwarded request; a dead leader is noticed this fast.
const FORWARD_TIMEOUT: Duration = Duration::from_millis(1500);
/// Timeout of a node-local request forwarded to another node.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of node-local requests that copy or read whole disks.
const LONG_LOCAL_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most a link measurement sends (a frame holds 64 MiB).
const MAX_LINK_PROBE: u64 = 32 << 20;
/// Timeout of the reachability probes behind `cluster status`.
const PING_TIMEOUT: Duration = Duration::from_millis(700);
/// How long add-node waits for a new node's agent to answer before anything changes.
const NEW_NODE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a new node may take to catch up as a learner before add-node gives up.
pub const LEARNER_CATCH_UP: Duration = Duration::from_secs(60);

/// Errors of cluster operations, classed the way the API reports them.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The model refused the command.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// No leader within the wait.
    #[error(
        "no leader: {reachable} of {total} nodes reachable; a majority must be up (check `convoy cluster status` and the agents' logs)"
    )]
    NoLeader {
        /// Members this node reached.
        reachable: usize,
        /// Members in the configuration.
        total: usize,
    },
    /// This node's Raft has no membership yet.
    #[error(
        "the cluster is not initialized: run `convoy cluster init` on one node, then `convoy cluster add-node` for the others"
    )]
    NotInitialized,
    /// Invalid input detected before proposing.
    #[error("{0}")]
    BadRequest(String),
    /// Conflicts with current state.
    #[error("{0}")]
    Conflict(String),
    /// Unknown object.
    #[error("{0}")]
    NotFound(String),
    /// Anything else (storage failure, shutdown, bug).
    #[error("{0}")]
    Internal(String),
    /// A node needed for the request did not answer.
    #[error("{0}")]
    Unavailable(String),
}

impl From<ForwardFailure> for ServiceError {
    fn from(f: ForwardFailure) -> Self {
        match f {
            ForwardFailure::BadRequest(m) => ServiceError::BadRequest(m),
            ForwardFailure::Conflict(m) => ServiceError::Conflict(m),
            ForwardFailure::NotFound(m) => ServiceError::NotFound(m),
            ForwardFailure::Other(m) => ServiceError::Internal(m),
        }
    }
}

impl ServiceError {
    fn to_failure(&self) -> ForwardFailure {
        match self {
            ServiceError::Model(ModelError::Invalid { .. }) | ServiceError::BadRequest(_) => {
                ForwardFailure::BadRequest(self.to_string())
            }
            ServiceError::Model(ModelError::NotFound { .. }) | ServiceError::NotFound(_) => {
                ForwardFailure::NotFound(self.to_string())
            }
            ServiceError::Model(_) | ServiceError::Conflict(_) => {
                ForwardFailure::Conflict(self.to_string())
            }
            _ => ForwardFailure::Other(self.to_string()),
        }
    }
}

/// One step of a leader-directed operation.
enum Attempt<T> {
    Done(T),
    /// Not the leader (any more); try again with this hint.
    Retry(Option<NodeId>),
}

/// The cluster as one agent sees and drives it.
pub struct Cluster {
    /// This node.
    pub id: NodeId,
    /// The Raft instance.
    pub raft: Raft,
    /// The applied model.
    pub model: ModelReader,
    /// The QUIC endpoint.
    pub endpoint: Endpoint,
    /// This node's advertised addresses.
    pub addr: NodeAddr,
    /// Group-commit counters of the log store.
    pub log_stats: Arc<LogStats>,
    /// Batches concurrent writes into Raft entries.
    pub proposer: Proposer,
    /// This host's data plane, set once it started.
    pub data: std::sync::OnceLock<Arc<crate::data::DataPlane>>,
    /// This host's QEMU guests, set once the data plane started.
    pub qemu: std::sync::OnceLock<Arc<crate::qemu::QemuHost>>,
    /// The migration coordinators' live view (notes, observed links).
    pub migrations: Arc<super::migration::Migrations>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Cluster {
    fn metrics(&self) -> openraft::RaftMetrics<NodeId, NodeAddr> {
        self.raft.metrics().borrow().clone()
    }

    fn members(&self) -> BTreeMap<NodeId, NodeAddr> {
        let m = self.metrics();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }

    pub(crate) fn peer_addr(&self, id: NodeId) -> Option<SocketAddr> {
        self.members()
            .get(&id)
            .and_then(|n| n.raft_addr.parse().ok())
    }

    fn is_initialized(&self) -> bool {
        self.metrics()
            .membership_config
            .membership()
            .nodes()
            .next()
            .is_some()
    }

    /// Waits (up to `deadline`) until a leader other than `not` is known.
    async fn wait_leader(&self, not: Option<NodeId>, deadline: Instant) -> Option<NodeId> {
        let mut rx = self.raft.metrics();
        loop {
            let leader = rx.borrow().current_leader;
            if leader.is_some() && leader != not {
                return leader;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            // Wake on any metrics change, or re-check after a short pause: a leader we
            // believe in may be dead, which metrics only show after an election.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), rx.changed()).await;
        }
    }

    async fn no_leader_error(&self) -> ServiceError {
        if !self.is_initialized() {
            return ServiceError::NotInitialized;
        }
        let members = self.members();
        let reachable = self
            .probe_members(&members)
            .await
            .values()
            .filter(|ok| **ok)
            .count();
        ServiceError::NoLeader {
            reachable,
            total: members.len(),
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        req: &ForwardRequest,
    ) -> Result<ForwardResponse, String> {
        let addr = self
            .peer_addr(leader)
            .ok_or_else(|| format!("leader {leader} has no known address"))?;
        let payload = convoy_codec::encode(req).map_err(|e| e.to_string())?;
        let timeout = match req {
            // Membership changes wait for a learner to catch up on the leader.
            ForwardRequest::AddNode { catch_up, .. } => *catch_up + FORWARD_TIMEOUT,
            ForwardRequest::RemoveNode { .. } => LEADER_WAIT + FORWARD_TIMEOUT,
            _ => FORWARD_TIMEOUT,
        };
        let reply: Bytes = self
            .endpoint
            .request(leader, addr, StreamKind::Forward, &payload, timeout)
            .await
            .map_err(|e| e.to_string())?;
        convoy_codec::decode(&reply).map_err(|e| e.to_string())
    }

    /// Resolves once this node no longer believes `leader` leads.
    async fn leader_changed_from(&self, leader: NodeId) {
        let mut rx = self.raft.metrics();
        loop {
            if rx.borrow_and_update().current_leader != Some(leader) {
                return;
            }
            if rx.changed().await.is_err() {
                // Raft stopped: never resolve; the forward's own timeout ends the wait.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Runs `local` on the leader: here if this node leads, else forwarded as `req`.
    /// Retries across leader changes until [`LEADER_WAIT`] has passed.
    async fn on_leader<T, F, Fut>(
        &self,
        req: ForwardRequest,
        local: F,
        from_remote: impl Fn(ForwardResponse) -> Result<Attempt<T>, ServiceError>,
    ) -> Result<T, ServiceError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ServiceError>>,
    {
        if !self.is_initialized() {
            return Err(ServiceError::NotInitialized);
        }
        let deadline = Instant::now() + LEADER_WAIT;
        let mut hint = self.metrics().current_leader;
        let mut failed_leader = None;
        loop {
            let leader = match hint {
                Some(l) if Some(l) != failed_leader => Some(l),
                _ => self.wait_leader(failed_leader, deadline).await,
            };
            let Some(leader) = leader else {
                return Err(self.no_leader_error().await);
            };
            let attempt = if leader == self.id {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, local()).await {
                    Ok(r) => r?,
                    // A leader that lost its quorum cannot commit; report it as no leader.
                    Err(_) => return Err(self.no_leader_error().await),
                }
            } else {
                // Give up on a leader as soon as Raft elects another: a SIGKILLed leader
                // would otherwise hold the request until the forward timeout. Retrying is
                // safe: writes carry a request id the state machine de-duplicates.
                let outcome = tokio::select! {
                    r = self.forward(leader, &req) => Some(r),
                    _ = self.leader_changed_from(leader) => None,
                };
                match outcome {
                    None => Attempt::Retry(None),
                    Some(Ok(resp)) => from_remote(resp)?,
                    Some(Err(e)) => {
                        tracing::debug!(leader, error = %e, "forward to leader failed; waiting for a new leader");
                        failed_leader = Some(leader);
                        Attempt::Retry(None)
                    }
                }
            };
            match attempt {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry(next) => {
                    if Instant::now() >= deadline {
                        return Err(self.no_leader_error().await);
                    }
                    hint = next;
                    if next.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    }

    /// Proposes `command` and returns what the model answered. Retries with the same
    /// request id across leader changes, so the command applies at most once.
    pub async fn write(
        &self,
        command: Command,
        request_id: Option<u128>,
    ) -> Result<Outcome, ServiceError> {
        let req = Request {
            request_id: request_id.unwrap_or_else(rand::random),
            command,
        };
        let resp = self
            .on_leader(
                ForwardRequest::Write(req.clone()),
                || self.write_local(req.clone()),
                |resp| match resp {
                    ForwardResponse::Written(r) => Ok(Attempt::Done(r)),
                    ForwardResponse::NotLeader { leader } => Ok(Attempt::Retry(leader)),
                    ForwardResponse::Failed(f) => Err(f.into()),
                    other => Err(ServiceError::Internal(format!(
                        "unexpected reply to a write: {other:?}"
                    ))),
                },
            )
            .await?;
        Ok(resp.result?)
    }

    async fn write_local(&self, req: Request) -> Result<Attempt<Response>, ServiceError> {
        let started = Instant::now();
        let kind = req.command.kind();
        match self.proposer.propose(req).await {
            Proposed::Applied(r) => {
                crate::metrics::record_write(kind, started.elapsed());
                Ok(Attempt::Done(r))
            }
            Proposed::NotLeader(leader) => Ok(Attempt::Retry(leader)),
            Proposed::Failed(e) => Err(ServiceError::Internal(e)),
        }
    }

    /// Returns once this node's state machine reflects every write committed before the
    /// call, so reads that follow are linearizable.
    pub async fn read_barrier(&self) -> Result<(), ServiceError> {
        let index = self
            .on_leader(
                ForwardRequest::ReadIndex,
                || self.read_index_local(),
                |resp| match resp {
                    ForwardResponse::ReadIndex(i) => Ok(Attempt::Done(i)),
                    ForwardResponse::NotLeader { leader } => Ok(Attempt::Retry(leader)),
                    ForwardResponse::Failed(f) => Err(f.into()),
                    other => Err(ServiceError::Internal(format!(
                        "unexpected reply to a read index: {other:?}"
                    ))),
                },
            )
            .await?;
        self.raft
            .wait(Some(LEADER_WAIT))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| {
                ServiceError::Internal(format!(
                    "state machine did not catch up to index {index}: {e}"
                ))
            })?;
        Ok(())
    }

    /// The index a linearizable read waits for: openraft's read log id, but never below this
    /// leader's last log entry. openraft 0.9 takes the larger of the committed index and the
    /// leader's first entry of its term; a leader restarted without losing its term (it
    /// resumes leading at once) keeps its old first entry, and its committed index is saved
    /// without fsync, so after a power cut it lags: entries that a majority held and that
    /// were acknowledged would be missing from the read until the next commit (seen: the
    /// last acknowledged `vm create` missing from `vm list`). Any entry in the leader's log
    /// may be committed, so waiting for all of them is safe; it costs at most one commit
    /// round under concurrent writes.
    async fn read_index_local(&self) -> Result<Attempt<u64>, ServiceError> {
        let last_log = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
        match self.raft.get_read_log_id().await {
            Ok((read, _applied)) => Ok(Attempt::Done(read.map_or(0, |l| l.index).max(last_log))),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Ok(Attempt::Retry(f.leader_id))
            }
            Err(RaftError::APIError(e)) => {
                tracing::debug!(error = %e, "leadership not confirmed");
                Ok(Attempt::Retry(None))
            }
            Err(e) => Err(ServiceError::Internal(format!("read index failed: {e}"))),
        }
    }

    /// Initializes a new cluster with this node as its only voter.
    pub async fn init(&self) -> Result<(), ServiceError> {
        if self.is_initialized() {
            return Err(ServiceError::Conflict(
                "the cluster is already initialized: see `convoy cluster status`; add nodes with `convoy cluster add-node`"
                    .into(),
            ));
        }
        let members = BTreeMap::from([(self.id, self.addr.clone())]);
        self.raft
            .initialize(members)
            .await
            .map_err(|e| ServiceError::Conflict(format!("cannot initialize: {e}")))?;
        self.raft
            .wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader == Some(self.id), "init: become leader")
            .await
            .map_err(|e| {
                ServiceError::Internal(format!("initialized, but did not become leader: {e}"))
            })?;
        self.write(self.register_command(), None).await?;
        Ok(())
    }

    fn register_command(&self) -> Command {
        Command::RegisterHost {
            id: self.id,
            raft_addr: self.addr.raft_addr.clone(),
            admin_addr: self.addr.admin_addr.clone(),
        }
    }

    /// Adds a node: registers its id (refused if ever used by a removed node), adds it as a
    /// learner, waits for it to catch up, then makes it a voter.
    pub async fn add_node(
        &self,
        id: NodeId,
        raft_addr: String,
        admin_addr: String,
        catch_up: Duration,
    ) -> Result<(), ServiceError> {
        raft_addr.parse::<SocketAddr>().map_err(|e| {
            ServiceError::BadRequest(format!("invalid raft address '{raft_addr}': {e}"))
        })?;
        admin_addr.parse::<SocketAddr>().map_err(|e| {
            ServiceError::BadRequest(format!("invalid admin address '{admin_addr}': {e}"))
        })?;
        let req = ForwardRequest::AddNode {
            id,
            raft_addr: raft_addr.clone(),
            admin_addr: admin_addr.clone(),
            catch_up,
        };
        self.on_leader(
            req,
            || self.add_node_local(id, &raft_addr, &admin_addr, catch_up),
            done_or_retry,
        )
        .await
    }

    async fn add_node_local(
        &self,
        id: NodeId,
        raft_addr: &str,
        admin_addr: &str,
        catch_up: Duration,
    ) -> Result<Attempt<()>, ServiceError> {
        // An agent that is not running is refused before anything changes: a learner
        // nobody answers for would only make the leader retry (and log) forever.
        let already_member = self
            .metrics()
            .membership_config
            .membership()
            .nodes()
            .any(|(n, _)| *n == id);
        if !already_member {
            if let Err(e) = self.probe_new_node(id, raft_addr).await {
                return Err(ServiceError::BadRequest(format!(
                    "node {id}'s agent does not answer at {raft_addr} ({e}): is it running (`convoy agent --config ...` on that host) and listening there? Nothing was changed; start it, then run add-node again"
                )));
            }
        }
        let register = Command::RegisterHost {
            id,
            raft_addr: raft_addr.to_string(),
            admin_addr: admin_addr.to_string(),
        };
        match self
            .write_local(Request {
                request_id: rand::random(),
                command: register,
            })
            .await?
        {
            Attempt::Retry(l) => return Ok(Attempt::Retry(l)),
            Attempt::Done(resp) => {
                resp.result?;
            }
        }
        let node = NodeAddr {
            raft_addr: raft_addr.to_string(),
            admin_addr: admin_addr.to_string(),
        };
        // openraft's own "blocking" add_learner counts a learner within 5000 entries as
        // caught up, even one that never received anything; wait for real replication.
        let membership_index = match self.raft.add_learner(id, node, false).await {
            Ok(r) => r.log_id.index,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                return Ok(Attempt::Retry(f.leader_id));
            }
            Err(e) => {
                return Err(ServiceError::Internal(format!(
                    "cannot add node {id} as learner: {e}"
                )));
            }
        };
        let caught_up = self
            .raft
            .wait(Some(catch_up))
            .metrics(
                |m| match &m.replication {
                    Some(repl) => repl
                        .get(&id)
                        .copied()
                        .flatten()
                        .is_some_and(|l| l.index >= membership_index),
                    // No longer leader: stop waiting; the change below reports it.
                    None => true,
                },
                "learner caught up",
            )
            .await;
        if caught_up.is_err() {
            // Leave no learner behind: the leader would keep replicating to it.
            let removed = self
                .raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .is_ok();
            let left = if removed {
                "it was not added".to_string()
            } else {
                format!("it stays a learner until removed (`convoy cluster remove-node {id}`)")
            };
            return Err(ServiceError::Internal(format!(
                "node {id} did not catch up within {}s: is its agent running and reachable at {raft_addr}, with a certificate from this cluster's CA? {left}",
                catch_up.as_secs()
            )));
        }
        let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        match self.raft.change_membership(change, false).await {
            Ok(_) => Ok(Attempt::Done(())),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Ok(Attempt::Retry(f.leader_id))
            }
            Err(e) => Err(ServiceError::Internal(format!(
                "cannot make node {id} a voter: {e}"
            ))),
        }
    }

    /// Whether a node about to be added answers at `raft_addr`: `Err` only when nothing
    /// answers there (unreachable or no answer in time); any other failure (a certificate
    /// from another CA, say) is left to the learner's catch-up to report.
    async fn probe_new_node(&self, id: NodeId, raft_addr: &str) -> Result<(), String> {
        let addr: SocketAddr = raft_addr.parse().map_err(|e| format!("{e}"))?;
        let payload = convoy_codec::encode(&ForwardRequest::Ping).map_err(|e| e.to_string())?;
        match self
            .endpoint
            .request(
                id,
                addr,
                StreamKind::Forward,
                &payload,
                NEW_NODE_PROBE_TIMEOUT,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e @ (TransportError::Unreachable { .. } | TransportError::Timeout { .. })) => {
                Err(e.to_string())
            }
            Err(_) => Ok(()),
        }
    }

    /// Removes a node from the membership and retires its id for good.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), ServiceError> {
        self.on_leader(
            ForwardRequest::RemoveNode { id },
            || self.remove_node_local(id),
            done_or_retry,
        )
        .await
    }

    async fn remove_node_local(&self, id: NodeId) -> Result<Attempt<()>, ServiceError> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let is_member = membership.nodes().any(|(n, _)| *n == id);
        if is_member {
            if voters.len() == 1 && voters.contains(&id) {
                return Err(ServiceError::Conflict(format!(
                    "node {id} is the last voter; a cluster cannot remove its last voter"
                )));
            }
            if let Some(vm) = self.model.read(|m| {
                m.vms
                    .values()
                    .find(|v| v.host == id)
                    .map(|v| v.name.clone())
            }) {
                return Err(ServiceError::Conflict(format!(
                    "node {id} still hosts VM '{vm}': move or delete its VMs first"
                )));
            }
            let change = if voters.contains(&id) {
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([id]))
            };
            match self.raft.change_membership(change, false).await {
                Ok(_) => {}
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    return Ok(Attempt::Retry(f.leader_id));
                }
                Err(e) => {
                    return Err(ServiceError::Internal(format!(
                        "cannot remove node {id}: {e}"
                    )));
                }
            }
        } else {
            match self.model.read(|m| m.hosts.get(&id).map(|h| h.retired)) {
                None => {
                    return Err(ServiceError::NotFound(format!(
                        "node {id} is not a member: see `convoy cluster status`"
                    )));
                }
                // Removed before (as `etcdctl member remove` of a removed member, an error
                // that says so, not a second retirement reported as this one).
                Some(true) => {
                    return Err(ServiceError::NotFound(format!(
                        "node {id} was already removed; its id is retired for good (see `convoy cluster status`)"
                    )));
                }
                // Left the membership but was not retired yet (the removal was cut short):
                // finish it below.
                Some(false) => {}
            }
        }
        // Retiring may run on a new leader if this node just removed itself: go through write().
        match self.write(Command::RetireHost { id }, None).await {
            Ok(_) => Ok(Attempt::Done(())),
            Err(e) => Err(e),
        }
    }

    /// Serves a request forwarded by another node. Only the leader executes; others say
    /// who they think leads.
    pub async fn handle_forward(&self, peer: NodeId, req: ForwardRequest) -> ForwardResponse {
        let req = match req {
            ForwardRequest::Ping => return ForwardResponse::Done,
            ForwardRequest::Local(local) => {
                return match self.local_here(local).await {
                    Ok(answer) => ForwardResponse::Local(Box::new(answer)),
                    Err(e) => ForwardResponse::Failed(e.to_failure()),
                };
            }
            other => other,
        };
        let not_leader = || ForwardResponse::NotLeader {
            leader: self.metrics().current_leader,
        };
        tracing::trace!(peer, ?req, "forwarded request");
        let result = match req {
            ForwardRequest::Write(r) => self
                .write_local(r)
                .await
                .map(|a| a.map(ForwardResponse::Written)),
            ForwardRequest::ReadIndex => self
                .read_index_local()
                .await
                .map(|a| a.map(ForwardResponse::ReadIndex)),
            ForwardRequest::AddNode {
                id,
                raft_addr,
                admin_addr,
                catch_up,
            } => self
                .add_node_local(id, &raft_addr, &admin_addr, catch_up)
                .await
                .map(|a| a.map(|_| ForwardResponse::Done)),
            ForwardRequest::RemoveNode { id } => self
                .remove_node_local(id)
                .await
                .map(|a| a.map(|_| ForwardResponse::Done)),
            ForwardRequest::Progress => Ok(Attempt::Done(self.progress_local().await)),
            ForwardRequest::Ping | ForwardRequest::Local(_) => {
                Ok(Attempt::Done(ForwardResponse::Done))
            }
        };
        match result {
            Ok(Attempt::Done(resp)) => resp,
            Ok(Attempt::Retry(_)) => not_leader(),
            Err(e) => ForwardResponse::Failed(e.to_failure()),
        }
    }

    async fn progress_local(&self) -> ForwardResponse {
        let m = self.metrics();
        match &m.replication {
            Some(repl) if m.current_leader == Some(self.id) => ForwardResponse::Progress {
                matched: repl
                    .iter()
                    .map(|(id, l)| (*id, l.map(|l| l.index)))
                    .collect(),
                commit_index: self.commit_index().await,
            },
            _ => ForwardResponse::NotLeader {
                leader: m.current_leader,
            },
        }
    }

    async fn commit_index(&self) -> u64 {
        self.raft
            .with_raft_state(|s| s.committed.map_or(0, |l| l.index))
            .await
            .unwrap_or(0)
    }

    /// Probes every member concurrently; returns whether each answered.
    async fn probe_members(&self, members: &BTreeMap<NodeId, NodeAddr>) -> BTreeMap<NodeId, bool> {
        let probes = members.iter().map(|(id, node)| {
            let id = *id;
            let addr = node.raft_addr.parse::<SocketAddr>().ok();
            async move {
                if id == self.id {
                    return (id, true);
                }
                let Some(addr) = addr else { return (id, false) };
                let Ok(payload) = convoy_codec::encode(&ForwardRequest::Ping) else {
                    return (id, false);
                };
                let ok = self
                    .endpoint
                    .request(id, addr, StreamKind::Forward, &payload, PING_TIMEOUT)
                    .await
                    .is_ok();
                (id, ok)
            }
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .collect()
    }

    /// This node's own Raft state.
    pub async fn node_status(&self) -> NodeStatus {
        let m = self.metrics();
        let state = if m.state == openraft::ServerState::Learner {
            "learner"
        } else {
            server_state(m.state)
        };
        NodeStatus {
            id: self.id,
            state: state.to_string(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: self.commit_index().await,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            log_appends: self
                .log_stats
                .appends
                .load(std::sync::atomic::Ordering::Relaxed),
            log_entries: self
                .log_stats
                .entries
                .load(std::sync::atomic::Ordering::Relaxed),
            log_fsyncs: self
                .log_stats
                .fsyncs
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The cluster as seen from here, with the leader's replication progress when the
    /// leader can be asked.
    pub async fn cluster_status(&self) -> ClusterStatus {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let members: BTreeMap<NodeId, NodeAddr> =
            membership.nodes().map(|(i, n)| (*i, n.clone())).collect();
        let reach = self.probe_members(&members).await;
        // A leader is only real while a majority of voters can be reached: openraft keeps
        // `current_leader` on a leader that lost its quorum (and on its followers), and
        // nothing can be committed then.
        let reachable_voters = voters
            .iter()
            .filter(|v| reach.get(*v).copied().unwrap_or(false))
            .count();
        let quorum = reachable_voters * 2 > voters.len();
        let stale_leader = m.current_leader.filter(|_| !quorum);
        let leader = m
            .current_leader
            .filter(|l| quorum && reach.get(l).copied().unwrap_or(false));
        let (matched, commit_index) = match leader {
            Some(l) if l == self.id => match self.progress_local().await {
                ForwardResponse::Progress {
                    matched,
                    commit_index,
                } => (matched, commit_index),
                _ => (Vec::new(), self.commit_index().await),
            },
            Some(l) => match self.forward(l, &ForwardRequest::Progress).await {
                Ok(ForwardResponse::Progress {
                    matched,
                    commit_index,
                }) => (matched, commit_index),
                _ => (Vec::new(), self.commit_index().await),
            },
            None => (Vec::new(), self.commit_index().await),
        };
        let matched: BTreeMap<NodeId, Option<u64>> = matched.into_iter().collect();
        let nodes: Vec<MemberStatus> = members
            .iter()
            .map(|(id, n)| {
                let voter = voters.contains(id);
                let role = if Some(*id) == leader {
                    "leader"
                } else if voter {
                    "follower"
                } else {
                    "learner"
                };
                MemberStatus {
                    id: *id,
                    role: role.into(),
                    voter,
                    raft_addr: n.raft_addr.clone(),
                    admin_addr: n.admin_addr.clone(),
                    reachable: reach.get(id).copied().unwrap_or(false),
                    matched_index: if Some(*id) == leader {
                        m.last_log_index.filter(|_| leader == Some(self.id))
                    } else {
                        matched.get(id).copied().flatten()
                    },
                }
            })
            .collect();
        let reachable = reach.values().filter(|ok| **ok).count();
        let initialized = !members.is_empty();
        let warning = if !initialized {
            Some("not initialized: run `convoy cluster init` on one node".to_string())
        } else if leader.is_none() {
            let was = stale_leader
                .map(|l| format!(" (node {l} led before; it cannot commit without a majority)"))
                .unwrap_or_default();
            Some(format!(
                "no leader: {reachable} of {} nodes reachable, {reachable_voters} of {} voters{was}",
                members.len(),
                voters.len()
            ))
        } else if reachable < members.len() {
            Some(format!(
                "{} of {} nodes unreachable",
                members.len() - reachable,
                members.len()
            ))
        } else {
            None
        };
        let disk_failures = self.disk_failures(&reach).await;
        let warning = warning.or_else(|| {
            (!disk_failures.is_empty()).then(|| {
                format!(
                    "{} disk(s) cannot be opened on their host (see disk_failures or `convoy vm show`)",
                    disk_failures.len()
                )
            })
        });
        ClusterStatus {
            answered_by: self.id,
            initialized,
            leader,
            term: m.current_term,
            voters,
            learners,
            nodes,
            commit_index,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            reachable,
            warning,
            disk_failures,
        }
    }

    /// Disks whose image a reachable host cannot open (or that failed since), asked of
    /// every such host at once; a host that does not answer in time reports none.
    async fn disk_failures(&self, reach: &BTreeMap<NodeId, bool>) -> Vec<DiskFailure> {
        let asks = reach
            .iter()
            .filter(|(_, up)| **up)
            .map(|(id, _)| async move {
                let asked =
                    tokio::time::timeout(PING_TIMEOUT, self.local(*id, LocalRequest::HostHealth));
                match asked.await {
                    Ok(Ok(LocalResponse::HostHealth(failed))) => failed
                        .into_iter()
                        .map(|(disk, reason)| DiskFailure {
                            node: *id,
                            disk,
                            reason,
                        })
                        .collect(),
                    _ => Vec::new(),
                }
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The data plane, once started.
    pub fn data(&self) -> Option<Arc<crate::data::DataPlane>> {
        self.data.get().cloned()
    }

    /// Runs a node-local request on node `node` (here, or forwarded to it) and returns
    /// its answer.
    pub async fn local(
        &self,
        node: NodeId,
        req: LocalRequest,
    ) -> Result<LocalResponse, ServiceError> {
        if node == self.id {
            return self.local_here(req).await;
        }
        self.local_remote(node, req).await
    }

    /// [`Self::local`] on another node (never this one).
    pub(crate) async fn local_remote(
        &self,
        node: NodeId,
        req: LocalRequest,
    ) -> Result<LocalResponse, ServiceError> {
        let addr = self
            .model
            .read(|m| m.hosts.get(&node).map(|h| h.raft_addr.clone()))
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| ServiceError::NotFound(format!("node {node} is not a known host")))?;
        // Copying disks and checking copies take as long as the disks are large; a live
        // migration's memory copy as long as the guest's memory is large and busy.
        let timeout = match req {
            LocalRequest::SyncTo { .. }
            | LocalRequest::QemuIncoming { .. }
            | LocalRequest::QemuMigrateOut { .. }
            | LocalRequest::Hypervisor { .. }
            | LocalRequest::Verify { .. }
            | LocalRequest::SnapshotCreate { .. }
            | LocalRequest::SnapshotRestore { .. }
            | LocalRequest::CopyRoots { .. }
            | LocalRequest::Storage { .. } => LONG_LOCAL_TIMEOUT,
            _ => LOCAL_TIMEOUT,
        };
        let payload = convoy_codec::encode(&ForwardRequest::Local(req))
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let reply = self
            .endpoint
            .request(node, addr, StreamKind::Forward, &payload, timeout)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("node {node} did not answer: {e}")))?;
        match convoy_codec::decode(&reply).map_err(|e| ServiceError::Internal(e.to_string()))? {
            ForwardResponse::Local(answer) => Ok(*answer),
            ForwardResponse::Failed(f) => Err(f.into()),
            other => Err(ServiceError::Internal(format!(
                "unexpected reply: {other:?}"
            ))),
        }
    }

    async fn local_here(&self, req: LocalRequest) -> Result<LocalResponse, ServiceError> {
        let plane = self.data().ok_or_else(|| {
            ServiceError::Unavailable("this node's data plane is still starting".into())
        })?;
        let joined = |e: tokio::task::JoinError| ServiceError::Internal(e.to_string());
        Ok(match req {
            LocalRequest::Uris { disks } => {
                LocalResponse::Uris(disks.into_iter().map(|d| (d, plane.disk_uris(d))).collect())
            }
            LocalRequest::Expose { disk, size } => {
                let plane2 = Arc::clone(&plane);
                let uris = tokio::task::spawn_blocking(move || plane2.expose_readonly(disk, size))
                    .await
                    .map_err(joined)?
                    .map_err(|e| ServiceError::NotFound(format!("{e:#}")))?;
                LocalResponse::Exposed(uris)
            }
            LocalRequest::GroupStatus { cg_id } => {
                LocalResponse::GroupStatus(plane.group_status(cg_id))
            }
            LocalRequest::GroupLagBytes { cg_id } => {
                LocalResponse::GroupLagBytes(plane.group_lag_bytes(cg_id))
            }
            LocalRequest::MeasureLink { to, bytes } => {
                if to == self.id {
                    return Err(ServiceError::Conflict(format!(
                        "node {to} cannot measure its link to itself"
                    )));
                }
                let bytes = bytes.clamp(1, MAX_LINK_PROBE);
                let probe = |len: u64| async move {
                    let data = bytes::Bytes::from(vec![0u8; len as usize]);
                    let started = std::time::Instant::now();
                    match self
                        .local_remote(to, LocalRequest::LinkProbe { data })
                        .await?
                    {
                        LocalResponse::LinkProbed(n) if n == len => Ok(started.elapsed()),
                        other => Err(ServiceError::Internal(format!(
                            "node {to} answered a link probe with {other:?}"
                        ))),
                    }
                };
                // The round trip alone first: the rate is what the data added to it.
                let round_trip = probe(0).await?;
                let with_data = probe(bytes).await?;
                let micros = with_data.saturating_sub(round_trip).as_micros().max(1) as u64;
                LocalResponse::LinkMeasured { bytes, micros }
            }
            LocalRequest::LinkProbe { data } => LocalResponse::LinkProbed(data.len() as u64),
            LocalRequest::GuestLog { vm, stay } => {
                let dir = plane.data_dir().to_path_buf();
                let records = tokio::task::spawn_blocking(move || {
                    crate::data::guests::read_log(&dir, &vm, stay)
                })
                .await
                .map_err(joined)?
                .map_err(|e| ServiceError::Internal(format!("{e:#}")))?;
                LocalResponse::GuestLog(records)
            }
            LocalRequest::QemuStatus { vm } => {
                LocalResponse::QemuStatus(self.qemu_here()?.status(&vm).await)
            }
            LocalRequest::QemuPreflight { paths } => {
                let problems = paths
                    .into_iter()
                    .filter_map(|(what, path)| match std::fs::File::open(&path) {
                        Ok(_) => None,
                        Err(e) => Some(format!(
                            "the {what} file {path} cannot be read on node {}: {e}",
                            self.id
                        )),
                    })
                    .collect();
                LocalResponse::Problems(problems)
            }
            LocalRequest::QemuIncoming { plan, from } => {
                let qemu = self.qemu_here()?;
                let disks: Vec<(u64, u64)> = plan.disks.iter().map(|d| (d.id, d.size)).collect();
                let p = Arc::clone(&plane);
                let d = disks.clone();
                let staged = tokio::task::spawn_blocking(move || p.stage_exports(&d))
                    .await
                    .map_err(joined)?
                    .map_err(|e| ServiceError::Conflict(format!("{e:#}")))?;
                if let Err(e) = qemu.prepare_incoming(&plan, &staged, from).await {
                    plane.unstage_exports(&disks);
                    return Err(ServiceError::Conflict(format!("{e:#}")));
                }
                LocalResponse::Done
            }
            LocalRequest::QemuMigrateOut { vm, to } => {
                let qemu = self.qemu_here()?;
                let addr = self
                    .peer_addr(to)
                    .ok_or_else(|| ServiceError::NotFound(format!("node {to} is not a member")))?;
                // `vm move`: the host's own parameters.
                let live = convoy_raft::model::LiveSettings::default();
                qemu.migrate_out(&vm, to, &self.endpoint, addr, &live)
                    .await
                    .map_err(|e| ServiceError::Conflict(format!("{e:#}")))?;
                // The device state travels while the coordinator commits the move.
                if let Err(e) = qemu.begin_switchover(&vm).await {
                    qemu.cancel_out(&vm).await;
                    return Err(ServiceError::Conflict(format!("{e:#}")));
                }
                LocalResponse::Done
            }
            LocalRequest::QemuSwitchover { vm } => {
                let report = self
                    .qemu_here()?
                    .switchover(&vm)
                    .await
                    .map_err(|e| ServiceError::Conflict(format!("{e:#}")))?;
                LocalResponse::QemuSwitchedOver(report)
            }
            LocalRequest::QemuCancelOut { vm } => {
                self.qemu_here()?.cancel_out(&vm).await;
                LocalResponse::Done
            }
            LocalRequest::QemuExportsReady { disks } => {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !plane.exported_at(&disks) {
                    if std::time::Instant::now() > deadline {
                        return Err(ServiceError::Unavailable(format!(
                            "node {}'s exports did not reach the disks' new epochs within 10 s",
                            self.id
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                LocalResponse::Done
            }
            LocalRequest::QemuFinishIncoming { vm } => {
                let (waited, resumed_at_unix_us) = self
                    .qemu_here()?
                    .finish_incoming(&vm, Duration::from_secs(30))
                    .await
                    .map_err(|e| ServiceError::Conflict(format!("{e:#}")))?;
                let disks: Vec<u64> = self.model.read(|m| {
                    m.vms
                        .get(&vm)
                        .map(|v| m.vm_disks(v).iter().map(|d| d.id).collect())
                        .unwrap_or_default()
                });
                plane.seal_exports(&disks);
                LocalResponse::QemuResumed {
                    waited_ms: (waited.as_micros() as u64).div_ceil(1000),
                    resumed_at_unix_us,
                }
            }
            LocalRequest::QemuAbortIncoming { vm, disks } => {
                self.qemu_here()?.abort_incoming(&vm).await;
                plane.unstage_exports(&disks);
                LocalResponse::Done
            }
            LocalRequest::GuestStatus { vm } => {
                let (stats, running, error) = plane.guest_status(&vm).await;
                LocalResponse::GuestStatus(crate::api::types::GuestStatusView {
                    stats,
                    running: running.is_some(),
                    running_secs: running.map_or(0.0, |d| d.as_secs_f64()),
                    error,
                })
            }
            LocalRequest::SnapshotCreate { cg, name } => {
                let plane2 = Arc::clone(&plane);
                let (cg2, name2) = (cg.clone(), name.clone());
                let last_seq =
                    tokio::task::spawn_blocking(move || plane2.snapshot_create(&cg2, &name2))
                        .await
                        .map_err(joined)?
                        .map_err(|e| ServiceError::Conflict(format!("{e:#}")))?;
                let cmd = Command::CreateSnapshot {
                    cg: cg.clone(),
                    name: name.clone(),
                    created_at_ms: now_ms(),
                };
                let cg_id = self.model.read(|m| m.cgs.get(&cg).map(|c| c.id));
                if let Err(e) = self.write(cmd, None).await {
                    // Not recorded: do not keep files nobody knows about.
                    if let Some(id) = cg_id {
                        let p = Arc::clone(&plane);
                        let n = name.clone();
                        let _ =
                            tokio::task::spawn_blocking(move || p.snapshot_delete_files(id, &n))
                                .await;
                    }
                    return Err(e);
                }
                if let Some(id) = cg_id {
                    plane.snapshot_recorded(id, &name);
                }
                LocalResponse::SnapshotTaken { last_seq }
            }
            LocalRequest::SnapshotRestore { cg, name } => {
                let chunks = plane
                    .snapshot_restore(&cg, &name)
                    .await
                    .map_err(|e| ServiceError::Conflict(format!("{e:#}")))?;
                LocalResponse::Restored { chunks }
            }
            LocalRequest::SyncTo { cg, to, compare } => {
                let report = plane
                    .sync_to(&cg, to, compare)
                    .await
                    .map_err(|e| ServiceError::Conflict(format!("{e:#}")))?;
                LocalResponse::Synced(report)
            }
            LocalRequest::Verify {
                vms,
                mode,
                freeze_cg,
            } => {
                // Logs first, then the copy: writes acknowledged in between show as
                // unacknowledged data, which the checker allows. A VM's log is the
                // segments of its stays, in order, from the hosts that kept them.
                let mut logs = Vec::new();
                for vm in &vms {
                    let mut records = Vec::new();
                    for (stay, host) in vm.stays.iter().enumerate() {
                        let answer = Box::pin(self.local(
                            *host,
                            LocalRequest::GuestLog {
                                vm: vm.name.clone(),
                                stay: stay as u64,
                            },
                        ))
                        .await?;
                        match answer {
                            LocalResponse::GuestLog(r) => records.extend(r),
                            other => {
                                return Err(ServiceError::Internal(format!(
                                    "unexpected answer to a log request: {other:?}"
                                )));
                            }
                        }
                    }
                    logs.push(records);
                }
                let plane2 = Arc::clone(&plane);
                let report = tokio::task::spawn_blocking(move || {
                    plane2.verify(&vms, &logs, mode, freeze_cg)
                })
                .await
                .map_err(joined)?
                .map_err(|e| ServiceError::Conflict(format!("{e:#}")))?;
                LocalResponse::Verified {
                    ok: report.ok(),
                    host: self.id,
                    text: report.to_string(),
                    report_json: serde_json::to_string(&report)
                        .map_err(|e| ServiceError::Internal(e.to_string()))?,
                }
            }
            LocalRequest::PauseGuest { vm } => LocalResponse::Paused {
                was_running: plane.pause_guest(&vm).await,
            },
            LocalRequest::ResumeGuest { vm } => {
                plane.resume_guest(&vm).await;
                LocalResponse::Done
            }
            LocalRequest::HandOver { cg, cg_id, to } => {
                let report = plane
                    .switch_primary(cg_id, &cg, to)
                    .await
                    .map_err(|e| ServiceError::Conflict(e.to_string()))?;
                LocalResponse::HandedOver(report)
            }
            LocalRequest::Storage { op } => LocalResponse::Storage(self.run_storage_here(op).await),
            LocalRequest::Hypervisor { op } => {
                LocalResponse::Hypervisor(self.run_hypervisor_here(op).await)
            }
            LocalRequest::VmState { vm } => LocalResponse::VmState(self.vm_state_here(&vm).await),
            LocalRequest::CopyRoots { cg_id } => {
                let plane2 = Arc::clone(&plane);
                let roots = tokio::task::spawn_blocking(move || plane2.copy_roots(cg_id))
                    .await
                    .map_err(joined)?
                    .map_err(|e| ServiceError::Internal(format!("{e:#}")))?;
                LocalResponse::Roots(roots)
            }
            LocalRequest::FenceBarrier { disks } => LocalResponse::Fenced {
                complete: plane.fence_barrier(&disks, Duration::from_secs(10)).await,
            },
            LocalRequest::HostHealth => LocalResponse::HostHealth(plane.disk_failures()),
            LocalRequest::Capacity { disks } => {
                let p = Arc::clone(&plane);
                let (free_bytes, used) =
                    tokio::task::spawn_blocking(move || (p.free_bytes(), p.copy_sizes(&disks)))
                        .await
                        .map_err(joined)?;
                LocalResponse::Capacity { free_bytes, used }
            }
            LocalRequest::MigrationLive { id } => {
                LocalResponse::MigrationLive(self.migrations.live(id))
            }
            LocalRequest::ProbeDisks { sizes } => {
                let p = Arc::clone(&plane);
                let probed = tokio::task::spawn_blocking(move || p.probe_disks(&sizes))
                    .await
                    .map_err(joined)?;
                LocalResponse::Probed(probed)
            }
        })
    }

    fn qemu_here(&self) -> Result<Arc<crate::qemu::QemuHost>, ServiceError> {
        self.qemu.get().cloned().ok_or_else(|| {
            ServiceError::Unavailable(format!("node {}'s QEMU driver is still starting", self.id))
        })
    }

    /// Proposer-side timestamp for commands that record one.
    pub fn now_ms(&self) -> u64 {
        now_ms()
    }
}

fn done_or_retry(resp: ForwardResponse) -> Result<Attempt<()>, ServiceError> {
    match resp {
        ForwardResponse::Done => Ok(Attempt::Done(())),
        ForwardResponse::NotLeader { leader } => Ok(Attempt::Retry(leader)),
        ForwardResponse::Failed(f) => Err(f.into()),
        other => Err(ServiceError::Internal(format!(
            "unexpected reply: {other:?}"
        ))),
    }
}

fn server_state(s: openraft::ServerState) -> &'static str {
    match s {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    }
}

trait AttemptMap<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Attempt<U>;
}

impl<T> AttemptMap<T> for Attempt<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Attempt<U> {
        match self {
            Attempt::Done(v) => Attempt::Done(f(v)),
            Attempt::Retry(l) => Attempt::Retry(l),
        }
    }
}
