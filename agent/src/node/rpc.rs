//! Node-to-node messages carried on QUIC streams, and the inbound dispatcher.
//!
//! Raft RPCs travel as openraft's own request/response types; everything an agent asks the
//! leader to do on its behalf travels as a [`ForwardRequest`]. All of it goes through
//! `convoy-codec`, so it carries the format version byte.

use std::sync::Arc;
use std::time::Duration;

use convoy_raft::{NodeId, Request, Response, TypeConfig};
use convoy_transport::{Inbound, InboundStream, StreamKind};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::service::Cluster;

/// What a follower asks the leader to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    /// Propose a command.
    Write(Request),
    /// Confirm leadership and return the index a linearizable read must wait for.
    ReadIndex,
    /// Register a host and add it as learner, then voter.
    AddNode {
        /// Its id.
        id: NodeId,
        /// QUIC address.
        raft_addr: String,
        /// Admin address.
        admin_addr: String,
        /// Learner catch-up limit.
        catch_up: Duration,
    },
    /// Remove a node from the membership and retire its id.
    RemoveNode {
        /// Its id.
        id: NodeId,
    },
    /// The leader's replication progress, for `cluster status`.
    Progress,
    /// Liveness probe.
    Ping,
    /// Something only the addressed node can do (its disks, its exports); served by any
    /// node whatever its Raft role.
    Local(LocalRequest),
}

/// A request about the addressed node's own data plane.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LocalRequest {
    /// NBD URIs of these local disks' writable exports.
    Uris {
        /// Disk ids.
        disks: Vec<u64>,
    },
    /// Expose the local copy of a disk read-only.
    Expose {
        /// Disk id.
        disk: u64,
        /// Its size.
        size: u64,
    },
    /// Replication status of a group this node is primary of.
    GroupStatus {
        /// Group name.
        cg: String,
    },
    /// Bring another host's copy of a group (this node is primary) up to date with delta
    /// sessions.
    SyncTo {
        /// Group name.
        cg: String,
        /// Destination host.
        to: u64,
        /// Compare-delta instead of a full copy.
        compare: bool,
    },
    /// A write made on an active-active copy, to be ordered by this node (the group's
    /// sequencer).
    MirroredWrite {
        /// Disk written.
        disk: u64,
        /// Byte offset.
        offset: u64,
        /// What was written.
        payload: crate::data::wire::Payload,
        /// Durable locally when acknowledged.
        fua: bool,
        /// Epoch of the writer's volume.
        epoch: u64,
    },
    /// Take a crash-consistent snapshot of a group this node is primary of.
    SnapshotCreate {
        /// Group name.
        cg: String,
        /// Snapshot name.
        name: String,
    },
    /// Rewrite a group's disks with a snapshot's content.
    SnapshotRestore {
        /// Group name.
        cg: String,
        /// Snapshot name.
        name: String,
    },
    /// The acknowledged-write log of a simulated guest on this node.
    GuestLog {
        /// VM name.
        vm: String,
    },
    /// Stats of a simulated guest on this node.
    GuestStats {
        /// VM name.
        vm: String,
    },
    /// Verify this node's copies of these VMs against their guests' logs.
    Verify {
        /// The VMs (one group is checked for one common cut).
        vms: Vec<crate::data::guests::VmToVerify>,
        /// Latest or prefix.
        mode: convoy_guest::VerifyMode,
        /// Pause this group's replica applier while reading (a replica copy).
        freeze_cg: Option<u64>,
    },
}

/// The leader's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardResponse {
    /// Result of a proposed command.
    Written(Response),
    /// The read index.
    ReadIndex(u64),
    /// Done.
    Done,
    /// Replication progress: (node, matched index) and the commit index.
    Progress {
        /// Matched index per member.
        matched: Vec<(NodeId, Option<u64>)>,
        /// Leader's commit index.
        commit_index: u64,
    },
    /// The receiver is not the leader; `leader` is its best guess.
    NotLeader {
        /// Known leader, if any.
        leader: Option<NodeId>,
    },
    /// The request failed on the leader.
    Failed(ForwardFailure),
    /// Answer to a [`LocalRequest`], as JSON (its shape depends on the request).
    Local(String),
}

/// Why a forwarded request failed, keeping the class so the API maps it to the same status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardFailure {
    /// Invalid input.
    BadRequest(String),
    /// Conflicts with existing state.
    Conflict(String),
    /// Unknown object.
    NotFound(String),
    /// Anything else.
    Other(String),
}

type AppendResult = Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>;
type VoteResult = Result<VoteResponse<NodeId>, RaftError<NodeId>>;
type SnapshotResult =
    Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;

/// Accepts inbound streams until the endpoint closes, serving each on its own task.
pub async fn serve_inbound(mut inbound: Inbound, cluster: Arc<Cluster>) {
    while let Some(stream) = inbound.next().await {
        let cluster = Arc::clone(&cluster);
        if stream.kind == StreamKind::Delta {
            if let Some(plane) = cluster.data() {
                tokio::spawn(plane.serve_delta(stream));
            }
            continue;
        }
        if stream.kind == StreamKind::Data {
            match cluster.data() {
                Some(plane) => {
                    tokio::spawn(plane.serve_stream(stream));
                }
                None => tracing::debug!(
                    peer = stream.peer,
                    "data stream before the data plane started"
                ),
            }
            continue;
        }
        tokio::spawn(async move {
            let peer = stream.peer;
            let kind = stream.kind;
            if let Err(e) = serve_stream(stream, &cluster).await {
                tracing::debug!(peer, ?kind, error = %e, "inbound stream failed");
            }
        });
    }
}

/// Refuses a Raft message whose claimed sender differs from the certificate's node id:
/// a node must not speak for another.
fn check_sender(peer: NodeId, claimed: NodeId, what: &str) -> anyhow::Result<()> {
    if peer != claimed {
        anyhow::bail!(
            "{what} claims to come from node {claimed} but the connection is authenticated as node {peer}"
        );
    }
    Ok(())
}

async fn serve_stream(mut stream: InboundStream, cluster: &Cluster) -> anyhow::Result<()> {
    let peer = stream.peer;
    let request = stream.read_request().await?;
    let reply: Vec<u8> = match stream.kind {
        StreamKind::RaftAppend => {
            let rpc: AppendEntriesRequest<TypeConfig> = convoy_codec::decode(&request)?;
            check_sender(
                peer,
                rpc.vote.leader_id().voted_for().unwrap_or_default(),
                "append-entries",
            )?;
            let res: AppendResult = cluster.raft.append_entries(rpc).await;
            convoy_codec::encode(&res)?
        }
        StreamKind::RaftVote => {
            let rpc: VoteRequest<NodeId> = convoy_codec::decode(&request)?;
            check_sender(
                peer,
                rpc.vote.leader_id().voted_for().unwrap_or_default(),
                "vote request",
            )?;
            let res: VoteResult = cluster.raft.vote(rpc).await;
            convoy_codec::encode(&res)?
        }
        StreamKind::RaftSnapshot => {
            let rpc: InstallSnapshotRequest<TypeConfig> = convoy_codec::decode(&request)?;
            check_sender(
                peer,
                rpc.vote.leader_id().voted_for().unwrap_or_default(),
                "install-snapshot",
            )?;
            let res: SnapshotResult = cluster.raft.install_snapshot(rpc).await;
            convoy_codec::encode(&res)?
        }
        StreamKind::Forward => {
            let req: ForwardRequest = convoy_codec::decode(&request)?;
            let res = cluster.handle_forward(peer, req).await;
            convoy_codec::encode(&res)?
        }
        other => anyhow::bail!("stream kind {other:?} is not served by this agent yet"),
    };
    stream.respond(&reply).await?;
    Ok(())
}
