//! JSON bodies of the admin API, shared by the server and the CLI. These shapes are what
//! `-o json` prints, so operators' scripts depend on them: add fields, never rename.

use serde::{Deserialize, Serialize};

/// Error body of every failed request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human message that says what to do next.
    pub error: String,
    /// Machine-readable class.
    pub code: ErrorCode,
}

/// Class of an API error; also decides the HTTP status and the CLI's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or invalid input (400).
    BadRequest,
    /// The named object does not exist (404).
    NotFound,
    /// Conflicts with existing state (409).
    Conflict,
    /// The certificate is not an admin certificate (403): node and NBD client
    /// certificates cannot drive the admin API.
    Forbidden,
    /// No leader could be reached in time (503).
    NoLeader,
    /// The cluster is not initialized yet (503).
    NotInitialized,
    /// Temporarily unable to serve (503).
    Unavailable,
    /// A bug or storage failure (500).
    Internal,
}

/// One member as seen by the node that answered `cluster status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node id.
    pub id: u64,
    /// `leader`, `follower` or `learner`.
    pub role: String,
    /// Whether it votes.
    pub voter: bool,
    /// QUIC address.
    pub raft_addr: String,
    /// Admin address.
    pub admin_addr: String,
    /// Whether the answering node reached it just now.
    pub reachable: bool,
    /// Last log index the leader knows it holds (leader's view), if known.
    pub matched_index: Option<u64>,
}

/// `GET /v1/cluster`: the cluster as seen from the answering node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Node that answered.
    pub answered_by: u64,
    /// Whether the cluster has been initialized.
    pub initialized: bool,
    /// Current leader, if one is known.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Voter ids.
    pub voters: Vec<u64>,
    /// Learner ids.
    pub learners: Vec<u64>,
    /// Every member.
    pub nodes: Vec<MemberStatus>,
    /// Committed log index (answering node's view).
    pub commit_index: u64,
    /// Applied log index of the answering node.
    pub applied_index: u64,
    /// Last log index of the answering node.
    pub last_log_index: u64,
    /// Members reachable from the answering node (itself included).
    pub reachable: usize,
    /// Set when something needs attention, e.g. "no leader: 1 of 3 nodes reachable".
    pub warning: Option<String>,
    /// Disks that a reachable host should hold but cannot open (or that failed since).
    #[serde(default)]
    pub disk_failures: Vec<DiskFailure>,
}

/// A disk whose image its host cannot use (`cluster status`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskFailure {
    /// The host.
    pub node: u64,
    /// The disk.
    pub disk: u64,
    /// Why, as the host reports it.
    pub reason: String,
}

/// `GET /v1/node`: this node's own Raft state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node id.
    pub id: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: String,
    /// Current term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<u64>,
    /// Last log index.
    pub last_log_index: u64,
    /// Committed index.
    pub commit_index: u64,
    /// Applied index.
    pub applied_index: u64,
    /// Index covered by the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Index up to which the log was purged.
    pub purged_index: Option<u64>,
    /// Append calls to the log.
    pub log_appends: u64,
    /// Entries appended to the log (entries/fsyncs = group commit factor).
    pub log_entries: u64,
    /// WAL fsyncs.
    pub log_fsyncs: u64,
}

/// `POST /v1/cluster/nodes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddNodeRequest {
    /// New node's id (from its certificate); never one used before.
    pub id: u64,
    /// Its QUIC address.
    pub raft_addr: String,
    /// Its admin address.
    pub admin_addr: String,
    /// How long the new node may take to catch up as a learner, 1 to 3600 s (default 60 s).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// `POST /v1/vms`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateVmRequest {
    /// Unique name.
    pub name: String,
    /// Host node id.
    pub host: u64,
    /// Disk sizes in bytes.
    pub disks: Vec<u64>,
    /// Synthetic workload spec.
    #[serde(default)]
    pub workload: Option<String>,
    /// Run it as a QEMU guest with this configuration.
    #[serde(default)]
    pub qemu: Option<QemuSpecView>,
    /// Client request id (hex, up to 32 digits) so a retried request applies once.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// How QEMU runs a VM, in API input and output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QemuSpecView {
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Kernel for direct boot (absolute path on the VM's host).
    #[serde(default)]
    pub kernel: Option<String>,
    /// Initial ramdisk (absolute path on the VM's host).
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub append: Option<String>,
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
}

/// A QEMU VM in API output: its configuration and, when its host answered, its state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QemuView {
    /// Its configuration.
    #[serde(flatten)]
    pub spec: QemuSpecView,
    /// Its QEMU on its host (pid, run state, QMP status).
    #[serde(default)]
    pub status: Option<crate::qemu::QemuStatus>,
}

/// A disk in API output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskView {
    /// Disk id.
    pub id: u64,
    /// Position among the VM's disks.
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Fencing epoch.
    pub epoch: u64,
    /// NBD URIs of its writable export on the VM's host (empty if the host did not answer).
    #[serde(default)]
    pub uris: Vec<String>,
}

/// A disk in `convoy disk list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Disk id.
    pub id: u64,
    /// Owning VM.
    pub vm: String,
    /// Position among the VM's disks.
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Fencing epoch.
    pub epoch: u64,
    /// Host the VM runs on (writes there).
    pub host: u64,
    /// Hosts holding a replica copy.
    pub replicas: Vec<u64>,
}

/// `POST /v1/disks/{id}/expose`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExposeRequest {
    /// Host whose copy to expose.
    pub on: u64,
}

/// Answer to an expose.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExposeResponse {
    /// Disk id.
    pub disk: u64,
    /// Host serving it.
    pub host: u64,
    /// NBD URIs of the read-only export.
    pub uris: Vec<String>,
}

/// `POST /v1/cgs/{name}/replicas`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicateRequest {
    /// Host for the copy.
    pub to: u64,
    /// Replication mode.
    pub mode: String,
}

/// `POST /v1/cgs/{name}/mode`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetModeRequest {
    /// New mode.
    pub mode: String,
}

/// A VM in API output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmView {
    /// VM id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Host it runs on.
    pub host: u64,
    /// Its disks.
    pub disks: Vec<DiskView>,
    /// Consistency group.
    pub cg: Option<String>,
    /// Whether the simulated guest runs.
    pub running: bool,
    /// Workload spec.
    pub workload: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// The host that orders the writes of the VM's group (its own host for a VM in no
    /// group); when it differs from `host`, the VM's writes are mirrored to it.
    #[serde(default)]
    pub sequencer: u64,
    /// Every host the VM ran on, one per stay, in order (the last is `host`).
    #[serde(default)]
    pub stays: Vec<u64>,
    /// The simulated guest on its host: `running`, `stopped`, `paused` (for a move) or
    /// `failed` (see `guest_error`), when the host answered.
    #[serde(default)]
    pub guest: Option<String>,
    /// Why the simulated guest could not start.
    #[serde(default)]
    pub guest_error: Option<String>,
    /// The simulated guest's counters on its host (acknowledged and failed writes, IOPS,
    /// latency), when the host answered.
    #[serde(default)]
    pub guest_stats: Option<convoy_guest::GuestStats>,
    /// Disks whose image cannot be opened on the VM's host, with why.
    #[serde(default)]
    pub disk_errors: Vec<(u64, String)>,
    /// The VM's disks on its host, when the host answered: `ready` (every disk exported),
    /// `creating` (not yet), or `failed` (see `disk_errors`).
    #[serde(default)]
    pub state: Option<String>,
    /// What runs the guest: `qemu`, `sim` (a simulated guest) or `none`.
    #[serde(default)]
    pub driver: String,
    /// The QEMU configuration and state, for a QEMU VM.
    #[serde(default)]
    pub qemu: Option<QemuView>,
}

/// `POST /v1/vms/{name}/move`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MoveVmRequest {
    /// Destination host.
    pub to: u64,
}

/// What `vm move` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MoveVmResponse {
    /// The VM after the move.
    pub vm: VmView,
    /// Where it ran.
    pub from: u64,
    /// Where it runs now.
    pub to: u64,
    /// Whether a simulated guest was paused (drained) on the source and resumed here.
    pub guest_moved: bool,
    /// Guest pause: from the pause on the source until the guest ran on the destination
    /// (ms); 0 without a simulated guest.
    pub stun_ms: f64,
    /// Whether the old epoch is fenced on the sequencer (no write with it can still be
    /// acknowledged).
    pub fenced: bool,
    /// What QEMU reported, when a running QEMU guest moved by live migration.
    #[serde(default)]
    pub live_migration: Option<crate::qemu::migrate::QemuMigrationStats>,
}

/// `POST /v1/cgs/{name}/switch-primary`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchPrimaryRequest {
    /// The new primary (sequencer): a host with a consistent copy.
    pub to: u64,
}

/// What `cg switch-primary` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchPrimaryResponse {
    /// The group after the hand-over.
    pub cg: CgView,
    /// The previous primary (now a replica).
    pub from: u64,
    /// The last sequence the previous primary assigned.
    pub last_seq: u64,
    /// How long writes were paused on the previous primary until the commit, ms.
    pub paused_ms: f64,
}

/// A simulated guest's state on one host.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GuestStatusView {
    /// Its stats (current, or last if it stopped here).
    pub stats: Option<convoy_guest::GuestStats>,
    /// Whether it runs on this host now.
    pub running: bool,
    /// For how long, seconds.
    pub running_secs: f64,
    /// Why it could not start.
    pub error: Option<String>,
}

/// `POST /v1/cgs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateCgRequest {
    /// Unique name.
    pub name: String,
    /// Member VMs.
    pub vms: Vec<String>,
    /// Client request id (hex).
    #[serde(default)]
    pub request_id: Option<String>,
}

/// A replica link in API output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaView {
    /// Host of the copy.
    pub host: u64,
    /// Replication mode.
    pub mode: String,
    /// `syncing`, `consistent`, `inconsistent` or `outdated` (committed in Raft).
    #[serde(default)]
    pub state: String,
    /// What the link is doing now, from the primary (`streaming`, `resync`...), if known.
    #[serde(default)]
    pub phase: Option<String>,
    /// Highest sequence the replica holds durably.
    #[serde(default)]
    pub acked_seq: Option<u64>,
    /// Writes the replica lacks (RPO in writes).
    #[serde(default)]
    pub lag_writes: Option<u64>,
    /// Seconds since the replica last held every write (RPO in seconds).
    #[serde(default)]
    pub lag_seconds: Option<f64>,
    /// Bytes sent on the link.
    #[serde(default)]
    pub bytes_sent: Option<u64>,
    /// Chunk resyncs run (initial sync included).
    #[serde(default)]
    pub resyncs: Option<u64>,
    /// Bytes of chunk data sent by resyncs and seeding.
    #[serde(default)]
    pub resync_bytes_sent: Option<u64>,
    /// Disk bytes the running (or last) resync has to cover (zero chunks included).
    #[serde(default)]
    pub resync_bytes_total: Option<u64>,
    /// Disk bytes of that resync covered so far.
    #[serde(default)]
    pub resync_bytes_done: Option<u64>,
    /// Last error on the link.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A consistency group in API output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CgView {
    /// Group id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Member VMs.
    pub vms: Vec<String>,
    /// Host ordering the group's writes (the same as `sequencer`).
    pub primary: u64,
    /// Host ordering the group's writes.
    pub sequencer: u64,
    /// Sequencer epoch: bumped by each hand-over and group fence.
    #[serde(default)]
    pub sequencer_epoch: u64,
    /// Where each member VM runs.
    #[serde(default)]
    pub vm_hosts: Vec<(String, u64)>,
    /// Each disk's fencing epoch: (disk, VM, epoch).
    #[serde(default)]
    pub disk_epochs: Vec<(u64, String, u64)>,
    /// Copies elsewhere.
    pub replicas: Vec<ReplicaView>,
    /// Fencing epoch.
    #[serde(default)]
    pub epoch: u64,
    /// Last sequence number assigned (from the primary, if it answered).
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// Writes refused for a stale epoch on the primary.
    #[serde(default)]
    pub stale_epoch_refused: Option<u64>,
    /// Times writers waited for a lagging replica (backpressure), on the primary.
    #[serde(default)]
    pub throttled: Option<u64>,
    /// A `convoy cg sync` running from the primary, if any.
    #[serde(default)]
    pub sync: Option<crate::data::delta::SyncProgressView>,
}

/// Query string of read endpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReadQuery {
    /// Answer from this node's applied state without a linearizable barrier (may be stale;
    /// works without a leader).
    #[serde(default)]
    pub local: bool,
}

/// `POST /v1/vms/{name}/verify` and `POST /v1/cgs/{name}/verify`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// Host whose copy to check (default: where the VM runs / the group's primary).
    #[serde(default)]
    pub on: Option<u64>,
    /// Check that the copy is a crash-consistent prefix instead of holding every
    /// acknowledged write.
    #[serde(default)]
    pub prefix: bool,
}

/// Result of a verification.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyResponse {
    /// True when no acknowledged write is missing or wrong (latest), or the copy is a
    /// prefix (prefix).
    pub ok: bool,
    /// Host whose copy was checked.
    pub host: u64,
    /// The checker's report.
    pub report: serde_json::Value,
    /// The report for people.
    pub text: String,
}

/// `POST /v1/cgs/{name}/sync`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Destination host.
    pub to: u64,
    /// Compare hashes and send only differing chunks (else a full copy to an empty copy).
    #[serde(default)]
    pub compare: bool,
}

/// `POST /v1/cgs/{name}/snapshots`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Snapshot name.
    pub name: String,
}

/// A group snapshot in API output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotView {
    /// Group.
    pub cg: String,
    /// Snapshot name.
    pub name: String,
    /// Host holding it.
    pub host: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Last group sequence number it contains (known right after creation).
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// Chunks rewritten (after a restore).
    #[serde(default)]
    pub chunks_restored: Option<u64>,
}

/// `POST /v1/migrations`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StartMigrationRequest {
    /// The group to move.
    pub cg: String,
    /// Destination host.
    pub to: u64,
    /// `reverse-replication`, `sync-switch`, `compare-delta` or `break-consistency`.
    pub strategy: String,
    /// For `sync-switch`: `active-active` (default) or `active-passive`.
    #[serde(default)]
    pub sync_mode: Option<String>,
    /// Fail back if not decided within this many seconds (default 600).
    #[serde(default)]
    pub deadline_secs: Option<u64>,
    /// How QEMU live-migrates running QEMU guests (unset: the source host's `[qemu]`).
    #[serde(default)]
    pub live: convoy_raft::model::LiveSettings,
}

/// `POST /v1/migrations/plan`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanMigrationRequest {
    /// The group to move.
    pub cg: String,
    /// Destination host.
    pub to: u64,
    /// Strategy (default `reverse-replication`).
    #[serde(default)]
    pub strategy: Option<String>,
}

/// What `migrate plan` found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationPlanView {
    /// The group.
    pub cg: String,
    /// Source (the group's primary).
    pub from: u64,
    /// Destination.
    pub to: u64,
    /// Strategy.
    pub strategy: String,
    /// Whether the migration can start.
    pub ok: bool,
    /// Why it cannot (empty when `ok`).
    pub problems: Vec<String>,
    /// What the destination holds of the group now: `none`, or its copy's state.
    pub destination_copy: String,
    /// Estimated bytes to move (what the destination lacks).
    pub bytes_to_move: u64,
    /// Guest writes per second measured on the group now.
    pub dirty_writes_per_sec: f64,
    /// Free bytes on the destination.
    pub destination_free_bytes: u64,
    /// Estimated seconds, at the measured link rate (the assumed one if none was).
    pub estimated_secs: f64,
    /// The link rate an estimate assumes when none could be measured, bytes per second.
    pub assumed_link_bytes_per_sec: u64,
    /// The source-to-destination rate measured for this plan (16 MiB sent over the
    /// cluster's QUIC), bytes per second; `None` when it could not be measured.
    #[serde(default)]
    pub measured_link_bytes_per_sec: Option<u64>,
}

/// One line of a migration's timeline.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TimelineView {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Seconds since the migration started.
    pub at_secs: f64,
    /// Phase.
    pub phase: String,
    /// The coordinator that wrote it.
    pub node: u64,
    /// What happened.
    pub note: String,
}

/// One disk's roots at the cut-over.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RootsView {
    /// Disk id.
    pub disk: u64,
    /// Source copy's root (hex), if it was there.
    pub source: Option<String>,
    /// Destination copy's root (hex).
    pub destination: String,
}

/// A migration in API output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationView {
    /// Id.
    pub id: u64,
    /// Group.
    pub cg: String,
    /// Source host.
    pub from: u64,
    /// Destination host.
    pub to: u64,
    /// Strategy.
    pub strategy: String,
    /// Phase (`planned`, `preparing`, `moving`, `cutting-over`, `verifying`,
    /// `failing-back`, `rolling-forward`, `done`).
    pub phase: String,
    /// Why it fails back, while failing back.
    pub failing_back_because: Option<String>,
    /// `committed` or `failed-back`, once decided.
    pub decision: Option<String>,
    /// The decision's reason.
    pub decision_reason: Option<String>,
    /// The agent coordinating it, and its claim number.
    pub coordinator: u64,
    /// Claim number (each takeover adds one).
    pub claim: u64,
    /// Start, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Deadline, ms since the Unix epoch.
    pub deadline_ms: u64,
    /// Seconds from start to the decision (or to now).
    pub elapsed_secs: f64,
    /// The group's VMs.
    pub vms: Vec<String>,
    /// VMs moved so far.
    pub moved: Vec<String>,
    /// Bytes the destination lacked (estimate).
    pub bytes_needed: u64,
    /// Bytes moved.
    pub bytes_moved: u64,
    /// Stun time per VM move, ms.
    pub stun_ms: Vec<(String, u64)>,
    /// Highest lag of the fail-back copy seen, writes.
    pub rpo_writes: u64,
    /// Per disk, both copies' Merkle roots at the cut-over.
    pub roots: Vec<RootsView>,
    /// What happened, in order.
    pub timeline: Vec<TimelineView>,
    /// The coordinator's latest note (live; not replicated).
    pub note: Option<String>,
    /// The destination link as the coordinator last saw it: acknowledged and last
    /// sequence (or chunks sent and total while seeding).
    pub link_progress: Option<(u64, u64)>,
    /// QEMU's migration parameters this migration set (unset: the source host's).
    #[serde(default)]
    pub live: convoy_raft::model::LiveSettings,
    /// Each running QEMU guest's live migration, as QEMU measured it.
    #[serde(default)]
    pub live_moves: Vec<convoy_raft::model::LiveMove>,
}
