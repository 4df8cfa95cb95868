//! Node-to-node messages carried on QUIC streams, and the inbound dispatcher.
//!
//! Raft RPCs travel as openraft's own request/response types; everything an agent asks the
//! leader to do on its behalf travels as a [`ForwardRequest`]. All of it goes through
//! `convoy-codec`, so it carries the format version byte.

use std::collections::BTreeMap;
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

/// A request about the addressed node's own data plane, served by any node whatever its
/// Raft role. Typed both ways (see [`LocalResponse`]).
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
    /// Replication status of a group this node sequences. By id: a group deleted and
    /// created again under its name must not be answered with the old one's links.
    GroupStatus {
        /// Group id.
        cg_id: u64,
    },
    /// Bring another host's copy of a group (this node sequences it) up to date with
    /// delta sessions.
    SyncTo {
        /// Group name.
        cg: String,
        /// Destination host.
        to: u64,
        /// Compare-delta instead of a full copy.
        compare: bool,
    },
    /// Take a crash-consistent snapshot of a group this node sequences, and record it in
    /// the model.
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
    /// The acknowledged-write log segment of one stay of a simulated guest on this node.
    GuestLog {
        /// VM name.
        vm: String,
        /// The stay.
        stay: u64,
    },
    /// Stats and state of a simulated guest on this node.
    GuestStatus {
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
    /// Stop a VM's simulated guest for a move (drain its writes); not restarted until
    /// the move commits or [`LocalRequest::ResumeGuest`].
    PauseGuest {
        /// VM name.
        vm: String,
    },
    /// Undo [`LocalRequest::PauseGuest`].
    ResumeGuest {
        /// VM name.
        vm: String,
    },
    /// Hand the order of a group this node sequences to `to` (`cg switch-primary`).
    HandOver {
        /// Group name.
        cg: String,
        /// Group id.
        cg_id: u64,
        /// The new sequencer.
        to: u64,
    },
    /// Run a migration's storage-provider operation on this node (the one the operation
    /// names: the sequencer for a hand-over, the taking host for a take-over...).
    Storage {
        /// The operation.
        op: convoy_migrate::StorageOp,
    },
    /// Run a migration's hypervisor-driver operation on this node (the VM's host).
    Hypervisor {
        /// The operation.
        op: convoy_migrate::HypervisorOp,
    },
    /// How a VM runs on this node, for a migration's coordinator.
    VmState {
        /// VM name.
        vm: String,
    },
    /// Merkle roots of this node's copy of a group's disks.
    CopyRoots {
        /// Group id.
        cg_id: u64,
    },
    /// Fence disks at new epochs on this node's sequencer and wait until no write with an
    /// older epoch can still be acknowledged.
    FenceBarrier {
        /// (disk, new epoch).
        disks: Vec<(u64, u64)>,
    },
    /// This node's data-plane health: disks that cannot be opened.
    HostHealth,
    /// Free space in this node's data directory, and the space these disks' local
    /// copies take (0 for a disk it holds no copy of).
    Capacity {
        /// Disk ids.
        disks: Vec<u64>,
    },
    /// The live view this node's migration coordinator has of migration `id`.
    MigrationLive {
        /// Migration id.
        id: u64,
    },
    /// Whether this node's file system can hold disk images of these sizes (asked before
    /// a VM is created here).
    ProbeDisks {
        /// Disk sizes in bytes.
        sizes: Vec<u64>,
    },
    /// A QEMU guest's state on this node.
    QemuStatus {
        /// VM name.
        vm: String,
    },
    /// Whether these files (what, path) can be read on this node, before a QEMU VM that
    /// names them is created here.
    QemuPreflight {
        /// (what, absolute path).
        paths: Vec<(String, String)>,
    },
    /// Start a QEMU here that waits for `plan.vm`'s guest from `from` (live migration), on
    /// staged exports of its disks.
    QemuIncoming {
        /// The VM as it runs on the source.
        plan: Box<convoy_raft::model::QemuPlan>,
        /// The source host.
        from: u64,
    },
    /// Live-migrate a QEMU guest running here to `to`, up to QEMU's pause before the
    /// switchover (the guest paused, its disk requests drained).
    QemuMigrateOut {
        /// VM name.
        vm: String,
        /// The destination.
        to: u64,
    },
    /// Complete a migration paused before its switchover; answers
    /// [`LocalResponse::QemuMigrated`].
    QemuSwitchover {
        /// VM name.
        vm: String,
    },
    /// Cancel a migration before its switchover: the guest resumes here.
    QemuCancelOut {
        /// VM name.
        vm: String,
    },
    /// Wait until the disks (id, epoch) are exported here at those epochs.
    QemuExportsReady {
        /// (disk, epoch).
        disks: Vec<(u64, u64)>,
    },
    /// Wait until an arriving guest has all its state, then resume it here (its disks'
    /// exports must be at their new epochs: [`LocalRequest::QemuExportsReady`]).
    QemuFinishIncoming {
        /// VM name.
        vm: String,
    },
    /// Remove a QEMU waiting for a guest that will not come, and its staged exports.
    QemuAbortIncoming {
        /// VM name.
        vm: String,
        /// (disk, size) of its staged exports.
        disks: Vec<(u64, u64)>,
    },
    /// Bytes each replica of a group this node sequences lacks. A request of its own
    /// (appended), so agents of the previous build still decode every other message.
    GroupLagBytes {
        /// Group id.
        cg_id: u64,
    },
    /// Time sending `bytes` to node `to` over the cluster's QUIC (a `migrate plan`'s
    /// link rate, measured from the host that would send). Appended, as above.
    MeasureLink {
        /// The receiving node.
        to: NodeId,
        /// How much to send.
        bytes: u64,
    },
    /// Data sent only to be timed ([`LocalRequest::MeasureLink`]); answered with its
    /// length. Appended, as above.
    LinkProbe {
        /// Bytes to receive and drop.
        data: bytes::Bytes,
    },
}

/// The answer to a [`LocalRequest`], one variant per request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LocalResponse {
    /// Per disk, its URIs here (empty when not exported here).
    Uris(Vec<(u64, Vec<String>)>),
    /// URIs of the read-only export.
    Exposed(Vec<String>),
    /// The group's status, if this node sequences it.
    GroupStatus(Option<crate::data::GroupStatus>),
    /// What a sync moved.
    Synced(crate::data::delta::SyncReport),
    /// The last sequence number the snapshot contains.
    SnapshotTaken {
        /// Last sequence.
        last_seq: u64,
    },
    /// Chunks rewritten.
    Restored {
        /// Chunks.
        chunks: u64,
    },
    /// Log records.
    GuestLog(Vec<convoy_guest::LogRecord>),
    /// A guest's state.
    GuestStatus(crate::api::types::GuestStatusView),
    /// A verification (`report_json` is the checker's report as JSON: bincode cannot
    /// carry a free-form JSON value).
    Verified {
        /// No acknowledged write missing or wrong.
        ok: bool,
        /// The checked copy's host.
        host: u64,
        /// Human-readable report.
        text: String,
        /// The report as JSON.
        report_json: String,
    },
    /// Whether a guest was running when paused.
    Paused {
        /// It was running.
        was_running: bool,
    },
    /// Done, nothing to report.
    Done,
    /// What QEMU reported about a completed live migration.
    QemuMigrated(crate::qemu::migrate::QemuMigrationStats),
    /// What a hand-over did.
    HandedOver(crate::data::handover::HandOverReport),
    /// Roots per disk.
    Roots(Vec<(u64, [u8; 32])>),
    /// Whether the fence barrier completed.
    Fenced {
        /// No older-epoch write can be acknowledged any more.
        complete: bool,
    },
    /// Disks that cannot be opened here, with why.
    HostHealth(std::collections::BTreeMap<u64, String>),
    /// The result of a storage-provider operation.
    Storage(Result<convoy_migrate::StorageReply, convoy_migrate::StorageError>),
    /// The result of a hypervisor-driver operation.
    Hypervisor(Result<convoy_migrate::HypervisorReply, convoy_migrate::HypervisorError>),
    /// How a VM runs here.
    VmState(convoy_migrate::VmState),
    /// Free bytes, and bytes each disk's copy takes here.
    Capacity {
        /// Free bytes in the data directory's file system.
        free_bytes: u64,
        /// Per disk, bytes its local copy takes.
        used: Vec<(u64, u64)>,
    },
    /// A coordinator's live view of a migration, if it runs one here.
    MigrationLive(Option<super::migration::LiveStatus>),
    /// `Err` says why this node cannot hold one of the probed disks.
    Probed(Result<(), String>),
    /// A QEMU guest's state.
    QemuStatus(crate::qemu::QemuStatus),
    /// What is wrong (empty: nothing).
    Problems(Vec<String>),
    /// Per replica, the bytes it lacks if the sequencer's journal still holds them;
    /// `None` if this node does not sequence the group.
    GroupLagBytes(Option<BTreeMap<NodeId, Option<u64>>>),
    /// Bytes sent to the probed node and how long until it answered, microseconds.
    LinkMeasured {
        /// Bytes sent.
        bytes: u64,
        /// Send to answer, microseconds.
        micros: u64,
    },
    /// Bytes a [`LocalRequest::LinkProbe`] carried.
    LinkProbed(u64),
    /// An arrived QEMU guest runs here.
    QemuResumed {
        /// From its arrival to its resume, ms.
        waited_ms: u64,
        /// When it resumed, microseconds since the Unix epoch (this host's clock).
        resumed_at_unix_us: u64,
    },
    /// What the source of a QEMU live migration reports of its switchover (agents before
    /// this one answered [`LocalResponse::QemuMigrated`]).
    QemuSwitchedOver(crate::qemu::migrate::SwitchoverReport),
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
    /// Answer to a [`LocalRequest`].
    Local(Box<LocalResponse>),
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
        if matches!(
            stream.kind,
            StreamKind::QemuMigration | StreamKind::QemuMigrationAcked
        ) {
            match cluster.qemu.get().cloned() {
                Some(qemu) => {
                    tokio::spawn(async move { qemu.serve_stream(stream).await });
                }
                None => tracing::debug!(
                    peer = stream.peer,
                    "migration stream before the QEMU driver started"
                ),
            }
            continue;
        }
        if matches!(stream.kind, StreamKind::Data | StreamKind::Mirror) {
            match cluster.data() {
                Some(plane) if stream.kind == StreamKind::Data => {
                    tokio::spawn(plane.serve_stream(stream));
                }
                Some(plane) => {
                    tokio::spawn(plane.serve_mirror(stream));
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
