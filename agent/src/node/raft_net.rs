//! openraft's network, over the QUIC transport.
//!
//! Each RPC is one request/response exchange on its own stream. Transport failures map to
//! openraft's error classes: a peer that cannot be dialed is `Unreachable` (openraft backs
//! off), anything else on the way is a `NetworkError` (openraft retries at once), and an
//! error produced by the remote Raft is a `RemoteError`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::logging::FailureLog;
use convoy_raft::{NodeAddr, NodeId, TypeConfig};
use convoy_transport::{Endpoint, StreamKind, TransportError};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Creates one [`PeerClient`] per replication target.
#[derive(Clone)]
pub struct Network {
    endpoint: Endpoint,
    rpc_timeout: Duration,
    /// Failed appends per peer, shared by every client openraft makes for it (it makes a
    /// new one after each failure).
    failures: Arc<Mutex<HashMap<NodeId, FailureLog>>>,
}

impl Network {
    /// A network over `endpoint`; `rpc_timeout` caps every RPC (openraft's own TTL may be
    /// shorter).
    pub fn new(endpoint: Endpoint, rpc_timeout: Duration) -> Self {
        Self {
            endpoint,
            rpc_timeout,
            failures: Arc::default(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerClient {
        PeerClient {
            endpoint: self.endpoint.clone(),
            target,
            addr: node
                .raft_addr
                .parse()
                .map_err(|e| format!("bad raft address '{}': {e}", node.raft_addr)),
            rpc_timeout: self.rpc_timeout,
            failures: Arc::clone(&self.failures),
        }
    }
}

/// RPC client to one peer.
pub struct PeerClient {
    endpoint: Endpoint,
    target: NodeId,
    addr: Result<SocketAddr, String>,
    rpc_timeout: Duration,
    /// Failed appends and heartbeats, logged once per interval (openraft's own lines
    /// about them are rate-limited, see [`crate::logging`]).
    failures: Arc<Mutex<HashMap<NodeId, FailureLog>>>,
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot encode or decode a Raft message: {0}")]
    Codec(#[from] convoy_codec::CodecError),
    #[error("{0}")]
    BadAddress(String),
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        kind: StreamKind,
        label: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        RaftError<NodeId, E>: std::error::Error,
    {
        let started = Instant::now();
        let timeout = option.hard_ttl().min(self.rpc_timeout);
        let result = self
            .exchange::<Req, Result<Resp, RaftError<NodeId, E>>>(kind, req, timeout)
            .await;
        crate::metrics::record_rpc(
            label,
            started.elapsed(),
            result.as_ref().err().map(error_class),
        );
        match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(CallError::Transport(e @ TransportError::Unreachable { .. })) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(CallError::BadAddress(e)) => Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(e),
            ))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: StreamKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let addr = self.addr.clone().map_err(CallError::BadAddress)?;
        let payload = convoy_codec::encode(req)?;
        let reply = self
            .endpoint
            .request(self.target, addr, kind, &payload, timeout)
            .await?;
        Ok(convoy_codec::decode(&reply)?)
    }
}

fn error_class(e: &CallError) -> &'static str {
    match e {
        CallError::Transport(TransportError::Unreachable { .. }) => "unreachable",
        CallError::Transport(TransportError::Timeout { .. }) => "timeout",
        CallError::Transport(_) => "transport",
        CallError::Codec(_) => "codec",
        CallError::BadAddress(_) => "address",
    }
}

impl PeerClient {
    fn log_failure(&self, error: &str) {
        let logged = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(self.target)
            .or_default()
            .failed(crate::logging::RAFT_LOG_INTERVAL);
        if let Some(suppressed) = logged {
            tracing::warn!(
                peer = self.target,
                error,
                failed_since_last_report = suppressed,
                "Raft cannot replicate to node {} (unreachable); retrying, reported once every {} s",
                self.target,
                crate::logging::RAFT_LOG_INTERVAL.as_secs()
            );
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        let result = self
            .call(StreamKind::RaftAppend, "append", &rpc, &option)
            .await;
        match &result {
            Err(RPCError::Unreachable(e)) => self.log_failure(&e.to_string()),
            Err(RPCError::Network(e)) => self.log_failure(&e.to_string()),
            _ => {
                let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
                if failures
                    .remove(&self.target)
                    .is_some_and(|mut f| f.succeeded())
                {
                    tracing::info!(peer = self.target, "Raft peer reachable again");
                }
            }
        }
        result
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeAddr, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(StreamKind::RaftSnapshot, "snapshot", &rpc, &option)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        self.call(StreamKind::RaftVote, "vote", &rpc, &option).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // Retry an unreachable peer soon: a restarted agent should rejoin within a second.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
