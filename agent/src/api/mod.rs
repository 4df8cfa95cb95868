//! The admin API: HTTP/JSON over TLS, client certificate required, on every agent.
//!
//! Any node answers any request: writes go through [`Cluster::write`] (forwarded to the
//! leader), and reads pass a linearizable barrier first unless `?local=true` asks for this
//! node's possibly stale view.

pub mod migrations;
pub mod types;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use convoy_raft::model::{ClusterModel, ModelError, ReplicationMode};
use convoy_raft::{Command, Outcome};
use convoy_transport::pki::PeerIdentity;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::node::rpc::{LocalRequest, LocalResponse};
use crate::node::service::{Cluster, ServiceError};
use types::*;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The cluster service.
    pub cluster: Arc<Cluster>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// An API error: status plus JSON body.
pub struct ApiError(StatusCode, ErrorBody);

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status = match code {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NoLeader | ErrorCode::NotInitialized | ErrorCode::Unavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(
            status,
            ErrorBody {
                error: message.into(),
                code,
            },
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let code = match &e {
            ServiceError::Model(ModelError::Invalid { .. }) | ServiceError::BadRequest(_) => {
                ErrorCode::BadRequest
            }
            ServiceError::Model(ModelError::NotFound { .. }) | ServiceError::NotFound(_) => {
                ErrorCode::NotFound
            }
            ServiceError::Model(_) | ServiceError::Conflict(_) => ErrorCode::Conflict,
            ServiceError::NoLeader { .. } => ErrorCode::NoLeader,
            ServiceError::NotInitialized => ErrorCode::NotInitialized,
            ServiceError::Internal(_) => ErrorCode::Internal,
            ServiceError::Unavailable(_) => ErrorCode::Unavailable,
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("invalid request body: {}", e.body_text()),
        )
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// The state machine answered a command with an outcome of another kind: a bug.
pub(crate) fn unexpected(outcome: Outcome) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("unexpected outcome {outcome:?}"),
    )
}

/// A node answered a local request with the wrong kind of answer: a bug.
fn bad_answer(node: u64, answer: LocalResponse) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("unexpected answer from node {node}: {answer:?}"),
    )
}

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/node", get(node_status))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/init", post(cluster_init))
        .route("/v1/cluster/nodes", post(add_node))
        .route("/v1/cluster/nodes/{id}", delete(remove_node))
        .route("/v1/vms", post(create_vm).get(list_vms))
        .route("/v1/vms/{name}", get(show_vm).delete(delete_vm))
        .route("/v1/cgs", post(create_cg).get(list_cgs))
        .route("/v1/cgs/{name}", get(show_cg).delete(delete_cg))
        .route("/v1/cgs/{name}/replicas", post(add_replica))
        .route("/v1/cgs/{name}/replicas/{host}", delete(remove_replica))
        .route("/v1/cgs/{name}/mode", post(set_mode))
        .route("/v1/cgs/{name}/fence", post(fence_cg))
        .route("/v1/cgs/{name}/switch-primary", post(switch_primary))
        .route("/v1/vms/{name}/move", post(move_vm))
        .route(
            "/v1/migrations",
            post(migrations::start).get(migrations::list),
        )
        .route("/v1/migrations/plan", post(migrations::plan))
        .route("/v1/migrations/{id}", get(migrations::show))
        .route("/v1/migrations/{id}/abort", post(migrations::abort))
        .route("/v1/vms/{name}/fence", post(fence_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/verify", post(verify_vm))
        .route("/v1/cgs/{name}/verify", post(verify_cg))
        .route("/v1/cgs/{name}/sync", post(sync_cg))
        .route(
            "/v1/cgs/{name}/snapshots",
            post(create_snapshot).get(list_snapshots),
        )
        .route("/v1/cgs/{name}/snapshots/{snap}", delete(delete_snapshot))
        .route(
            "/v1/cgs/{name}/snapshots/{snap}/restore",
            post(restore_snapshot),
        )
        .route("/v1/disks", get(list_disks))
        .route("/v1/disks/{id}/expose", post(expose_disk))
        .with_state(state)
}

/// The subset served on the optional plain-HTTP metrics address.
pub fn metrics_router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(s): State<ApiState>) -> String {
    let mut text = s.metrics.render();
    let plane = s
        .cluster
        .data
        .get()
        .map(|d| d.metrics())
        .unwrap_or_default();
    crate::metrics::render_data_plane(&plane, &mut text);
    text
}

async fn node_status(State(s): State<ApiState>) -> Json<NodeStatus> {
    Json(s.cluster.node_status().await)
}

async fn cluster_status(State(s): State<ApiState>) -> Json<ClusterStatus> {
    Json(s.cluster.cluster_status().await)
}

async fn cluster_init(State(s): State<ApiState>) -> ApiResult<Json<ClusterStatus>> {
    s.cluster.init().await?;
    Ok(Json(s.cluster.cluster_status().await))
}

async fn add_node(
    State(s): State<ApiState>,
    body: Result<Json<AddNodeRequest>, JsonRejection>,
) -> ApiResult<Json<ClusterStatus>> {
    let Json(req) = body?;
    let catch_up = catch_up(req.timeout_secs)?;
    s.cluster
        .add_node(req.id, req.raft_addr, req.admin_addr, catch_up)
        .await?;
    Ok(Json(s.cluster.cluster_status().await))
}

async fn remove_node(State(s): State<ApiState>, Path(id): Path<u64>) -> ApiResult<StatusCode> {
    s.cluster.remove_node(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The learner catch-up time a request asked for, bounded: a huge value would overflow
/// the deadline computed from it.
fn catch_up(timeout_secs: Option<u64>) -> ApiResult<Duration> {
    match timeout_secs {
        None => Ok(crate::node::service::LEARNER_CATCH_UP),
        Some(secs) if (1..=MAX_CATCH_UP_SECS).contains(&secs) => Ok(Duration::from_secs(secs)),
        Some(secs) => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("timeout_secs {secs} is out of range: give 1 to {MAX_CATCH_UP_SECS}"),
        )),
    }
}

/// Checks a workload spec when the VM is created, not when its guest starts, so its
/// numbers (rate, size, depth, span) are bounded before they enter the log.
fn check_workload(spec: &str, disk_sizes: &[u64]) -> ApiResult<()> {
    spec.parse::<convoy_guest::Workload>()
        .and_then(|w| w.validate_for_disks(disk_sizes))
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("workload: {e}")))
}

/// How long `vm create` waits for the host to create the disks, and `vm start` for the
/// guest to start, before answering with what the host reports so far.
const HOST_SETTLE: Duration = Duration::from_secs(5);

fn parse_request_id(text: Option<&str>) -> ApiResult<Option<u128>> {
    text.map(|t| {
        u128::from_str_radix(t, 16).map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("request_id '{t}' must be up to 32 hex digits"),
            )
        })
    })
    .transpose()
}

/// Waits for a linearizable view unless the caller asked for the local one.
pub(crate) async fn read_model<T>(
    s: &ApiState,
    q: &ReadQuery,
    f: impl FnOnce(&ClusterModel) -> T,
) -> ApiResult<T> {
    if !q.local {
        s.cluster.read_barrier().await?;
    }
    Ok(s.cluster.model.read(f))
}

fn vm_view(model: &ClusterModel, vm: &convoy_raft::model::Vm) -> VmView {
    vm_view_in(model, vm, model.vm_disks(vm))
}

fn vm_view_with(vm: &convoy_raft::model::Vm, disks: Vec<convoy_raft::model::Disk>) -> VmView {
    VmView {
        id: vm.id,
        name: vm.name.clone(),
        host: vm.host,
        disks: disks.into_iter().map(disk_view).collect(),
        cg: vm.cg.clone(),
        running: vm.running,
        workload: vm.workload.clone(),
        created_at_ms: vm.created_at_ms,
        sequencer: vm.host,
        stays: vm.stays.clone(),
        guest: None,
        guest_error: None,
        guest_stats: None,
        disk_errors: Vec::new(),
        state: None,
        driver: if vm.qemu.is_some() {
            "qemu"
        } else if vm.workload.is_some() {
            "sim"
        } else {
            "none"
        }
        .to_string(),
        qemu: vm.qemu.as_ref().map(|q| QemuView {
            spec: QemuSpecView {
                memory_mib: q.memory_mib,
                cpus: q.cpus,
                kernel: q.kernel.clone(),
                initrd: q.initrd.clone(),
                append: q.append.clone(),
                accel: q.accel.as_str().to_string(),
            },
            status: None,
        }),
    }
}

/// A VM's view with its group's sequencer filled in from the model.
fn vm_view_in(
    model: &ClusterModel,
    vm: &convoy_raft::model::Vm,
    disks: Vec<convoy_raft::model::Disk>,
) -> VmView {
    let mut view = vm_view_with(vm, disks);
    if let Some(cg) = vm.cg.as_ref().and_then(|c| model.cgs.get(c)) {
        view.sequencer = cg.sequencer;
    }
    view
}

fn disk_view(d: convoy_raft::model::Disk) -> DiskView {
    DiskView {
        id: d.id,
        index: d.index,
        size: d.size,
        epoch: d.epoch,
        uris: Vec::new(),
    }
}

fn cg_view(model: &ClusterModel, cg: &convoy_raft::model::Cg) -> CgView {
    CgView {
        id: cg.id,
        name: cg.name.clone(),
        vms: cg.vms.clone(),
        primary: cg.sequencer,
        sequencer: cg.sequencer,
        sequencer_epoch: cg.sequencer_epoch,
        vm_hosts: cg
            .vms
            .iter()
            .filter_map(|v| model.vms.get(v))
            .map(|v| (v.name.clone(), v.host))
            .collect(),
        disk_epochs: model
            .cg_disks(cg)
            .into_iter()
            .map(|d| (d.id, d.vm, d.epoch))
            .collect(),
        replicas: cg
            .replicas
            .iter()
            .map(|r| ReplicaView {
                host: r.to,
                mode: r.mode.as_str().to_string(),
                state: r.state.as_str().to_string(),
                phase: None,
                acked_seq: None,
                lag_writes: None,
                lag_seconds: None,
                bytes_sent: None,
                resyncs: None,
                resync_bytes_sent: None,
                resync_bytes_total: None,
                resync_bytes_done: None,
                last_error: None,
            })
            .collect(),
        epoch: model.cg_max_disk_epoch(cg),
        last_seq: None,
        stale_epoch_refused: None,
        throttled: None,
        sync: None,
    }
}

fn not_found(kind: &str, name: &str) -> ApiError {
    // The model's message names the command that lists each kind: not every kind has a
    // list command of its own (snapshots are listed per group).
    let e = ModelError::NotFound {
        kind: kind.into(),
        name: name.into(),
    };
    ApiError::new(ErrorCode::NotFound, e.to_string())
}

async fn create_vm(
    State(s): State<ApiState>,
    body: Result<Json<CreateVmRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<VmView>)> {
    let Json(req) = body?;
    let request_id = parse_request_id(req.request_id.as_deref())?;
    if let Some(spec) = &req.workload {
        check_workload(spec, &req.disks)?;
    }
    // The host's file system has the last word on what it can hold (the model's limit is
    // the largest any supported file system takes). A host that does not answer cannot
    // say: the create goes ahead and `vm show` reports what the host does with it.
    let probe = LocalRequest::ProbeDisks {
        sizes: req.disks.clone(),
    };
    let probed = tokio::time::timeout(HOST_SETTLE, s.cluster.local(req.host, probe)).await;
    if let Ok(Ok(LocalResponse::Probed(Err(why)))) = probed {
        return Err(ApiError::new(ErrorCode::BadRequest, why));
    }
    let cmd = match req.qemu {
        Some(q) => {
            if req.workload.is_some() {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    "a VM runs either a simulated guest (--workload) or QEMU (--driver qemu), not both",
                ));
            }
            let spec = convoy_raft::model::QemuSpec {
                memory_mib: q.memory_mib,
                cpus: q.cpus,
                kernel: q.kernel,
                initrd: q.initrd,
                append: q.append,
                accel: convoy_raft::model::Accel::parse(&q.accel)
                    .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?,
            };
            spec.validate()
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
            qemu_preflight(&s, req.host, &spec).await?;
            Command::CreateQemuVm {
                name: req.name,
                host: req.host,
                disk_sizes: req.disks,
                qemu: spec,
                created_at_ms: s.cluster.now_ms(),
            }
        }
        None => Command::CreateVm {
            name: req.name,
            host: req.host,
            disk_sizes: req.disks,
            workload: req.workload,
            created_at_ms: s.cluster.now_ms(),
        },
    };
    match s.cluster.write(cmd, request_id).await? {
        Outcome::Vm(vm, disks) => {
            let mut view = vm_view_with(&vm, disks);
            // Until the host created every disk or failed to: a failure is not a success.
            let deadline = tokio::time::Instant::now() + HOST_SETTLE;
            loop {
                let asked = tokio::time::timeout_at(deadline, host_disk_state(&s, &mut view));
                if asked.await.is_err()
                    || view.state.as_deref() != Some("creating")
                    || tokio::time::Instant::now() >= deadline
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok((StatusCode::CREATED, Json(view)))
        }
        other => Err(unexpected(other)),
    }
}

/// Fills `view` with what the VM's host reports about its disks: URIs, failures and the
/// resulting state. Left unknown when the host does not answer.
async fn host_disk_state(s: &ApiState, view: &mut VmView) {
    let req = LocalRequest::Uris {
        disks: view.disks.iter().map(|d| d.id).collect(),
    };
    let Ok(LocalResponse::Uris(uris)) = s.cluster.local(view.host, req).await else {
        return;
    };
    for d in &mut view.disks {
        if let Some((_, u)) = uris.iter().find(|(id, _)| *id == d.id) {
            d.uris = u.clone();
        }
    }
    let Ok(LocalResponse::HostHealth(failed)) =
        s.cluster.local(view.host, LocalRequest::HostHealth).await
    else {
        return;
    };
    view.disk_errors = view
        .disks
        .iter()
        .filter_map(|d| failed.get(&d.id).map(|why| (d.id, why.clone())))
        .collect();
    view.state = Some(
        if !view.disk_errors.is_empty() {
            "failed"
        } else if view.disks.iter().all(|d| !d.uris.is_empty()) {
            "ready"
        } else {
            "creating"
        }
        .to_string(),
    );
}

/// Fills `view` with its simulated guest's state on the VM's host, when it has a
/// workload and the host answers.
async fn host_guest_state(s: &ApiState, view: &mut VmView) {
    if view.workload.is_none() {
        return;
    }
    let req = LocalRequest::GuestStatus {
        vm: view.name.clone(),
    };
    if let Ok(LocalResponse::GuestStatus(g)) = s.cluster.local(view.host, req).await {
        view.guest = Some(
            if g.running {
                "running"
            } else if g.error.is_some() {
                "failed"
            } else {
                "stopped"
            }
            .to_string(),
        );
        view.guest_error = g.error;
        view.guest_stats = g.stats;
    }
}

/// Refuses a QEMU VM whose kernel or initrd its host cannot read (a host that does not
/// answer is not asked: the VM then reports the problem when it starts).
async fn qemu_preflight(
    s: &ApiState,
    host: u64,
    spec: &convoy_raft::model::QemuSpec,
) -> ApiResult<()> {
    let paths: Vec<(String, String)> = [("kernel", &spec.kernel), ("initrd", &spec.initrd)]
        .into_iter()
        .filter_map(|(what, p)| p.clone().map(|p| (what.to_string(), p)))
        .collect();
    if paths.is_empty() {
        return Ok(());
    }
    if let Ok(LocalResponse::Problems(problems)) = s
        .cluster
        .local(host, LocalRequest::QemuPreflight { paths })
        .await
    {
        if !problems.is_empty() {
            return Err(ApiError::new(ErrorCode::BadRequest, problems.join("; ")));
        }
    }
    Ok(())
}

async fn list_vms(
    State(s): State<ApiState>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Json<Vec<VmView>>> {
    let vms = read_model(&s, &q, |m| {
        m.vms.values().map(|vm| vm_view(m, vm)).collect()
    })
    .await?;
    Ok(Json(vms))
}

async fn show_vm(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Json<VmView>> {
    let mut view = read_model(&s, &q, |m| m.vms.get(&name).map(|vm| vm_view(m, vm)))
        .await?
        .ok_or_else(|| not_found("vm", &name))?;
    // URIs, guest state and disk health live on the VM's host; without an answer the
    // view is still useful.
    host_disk_state(&s, &mut view).await;
    host_guest_state(&s, &mut view).await;
    if let Some(q) = &mut view.qemu {
        let req = LocalRequest::QemuStatus {
            vm: view.name.clone(),
        };
        if let Ok(LocalResponse::QemuStatus(st)) = s.cluster.local(view.host, req).await {
            q.status = Some(st);
        }
    }
    Ok(Json(view))
}

async fn delete_vm(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    s.cluster.write(Command::DeleteVm { name }, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_cg(
    State(s): State<ApiState>,
    body: Result<Json<CreateCgRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CgView>)> {
    let Json(req) = body?;
    let request_id = parse_request_id(req.request_id.as_deref())?;
    match s
        .cluster
        .write(
            Command::CreateCg {
                name: req.name,
                vms: req.vms,
            },
            request_id,
        )
        .await?
    {
        Outcome::Cg(cg) => Ok((
            StatusCode::CREATED,
            Json(s.cluster.model.read(|m| cg_view(m, &cg))),
        )),
        other => Err(unexpected(other)),
    }
}

async fn list_cgs(
    State(s): State<ApiState>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Json<Vec<CgView>>> {
    Ok(Json(
        read_model(&s, &q, |m| m.cgs.values().map(|c| cg_view(m, c)).collect()).await?,
    ))
}

async fn show_cg(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Json<CgView>> {
    let mut view = read_model(&s, &q, |m| m.cgs.get(&name).map(|c| cg_view(m, c)))
        .await?
        .ok_or_else(|| not_found("cg", &name))?;
    // Live replication status comes from the primary, which runs the pipeline.
    let req = LocalRequest::GroupStatus { cg_id: view.id };
    if let Ok(LocalResponse::GroupStatus(Some(status))) = s.cluster.local(view.primary, req).await {
        view.last_seq = Some(status.last_seq);
        view.stale_epoch_refused = Some(status.stale_epoch_refused);
        view.throttled = Some(status.throttled);
        view.sync = status.sync;
        for r in &mut view.replicas {
            if let Some(l) = status.links.get(&r.host) {
                r.phase = Some(l.phase.clone());
                r.acked_seq = Some(l.acked_seq);
                r.lag_writes = Some(l.lag_writes);
                r.lag_seconds = Some(l.lag_seconds);
                r.bytes_sent = Some(l.bytes_sent);
                r.resyncs = Some(l.resyncs);
                r.resync_bytes_sent = Some(l.resync_bytes_sent);
                r.resync_bytes_total = Some(l.resync_bytes_total);
                r.resync_bytes_done = Some(l.resync_bytes_done);
                r.last_error = l.last_error.clone();
            }
        }
    }
    Ok(Json(view))
}

async fn write_cg(s: &ApiState, cmd: Command) -> ApiResult<Json<CgView>> {
    match s.cluster.write(cmd, None).await? {
        Outcome::Cg(cg) => Ok(Json(s.cluster.model.read(|m| cg_view(m, &cg)))),
        other => Err(unexpected(other)),
    }
}

fn parse_mode(text: &str) -> ApiResult<ReplicationMode> {
    ReplicationMode::parse(text).map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))
}

async fn add_replica(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<ReplicateRequest>, JsonRejection>,
) -> ApiResult<Json<CgView>> {
    let Json(req) = body?;
    let mode = parse_mode(&req.mode)?;
    write_cg(
        &s,
        Command::AddReplica {
            cg: name,
            to: req.to,
            mode,
        },
    )
    .await
}

async fn remove_replica(
    State(s): State<ApiState>,
    Path((name, host)): Path<(String, u64)>,
) -> ApiResult<Json<CgView>> {
    write_cg(&s, Command::RemoveReplica { cg: name, to: host }).await
}

async fn set_mode(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<SetModeRequest>, JsonRejection>,
) -> ApiResult<Json<CgView>> {
    let Json(req) = body?;
    let mode = parse_mode(&req.mode)?;
    write_cg(&s, Command::SetMode { cg: name, mode }).await
}

async fn fence_cg(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<CgView>> {
    let (cg, fenced) = s.cluster.fence_group(&name).await?;
    if !fenced {
        tracing::warn!(cg = %name, "fence committed; the sequencer did not confirm it drained older writes");
    }
    Ok(Json(s.cluster.model.read(|m| cg_view(m, &cg))))
}

async fn fence_vm(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<VmView>> {
    let (vm, disks, _) = s.cluster.fence_vm(&name).await?;
    Ok(Json(s.cluster.model.read(|m| vm_view_in(m, &vm, disks))))
}

async fn move_vm(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<MoveVmRequest>, JsonRejection>,
) -> ApiResult<Json<MoveVmResponse>> {
    let Json(req) = body?;
    let moved = s.cluster.move_vm(&name, req.to).await?;
    let vm = s
        .cluster
        .model
        .read(|m| vm_view_in(m, &moved.vm, moved.disks.clone()));
    Ok(Json(MoveVmResponse {
        vm,
        from: moved.from,
        to: req.to,
        guest_moved: moved.guest_moved,
        stun_ms: moved.stun.as_secs_f64() * 1000.0,
        fenced: moved.fenced,
        live_migration: moved.qemu,
    }))
}

async fn switch_primary(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<SwitchPrimaryRequest>, JsonRejection>,
) -> ApiResult<Json<SwitchPrimaryResponse>> {
    let Json(req) = body?;
    let (report, from) = s.cluster.switch_primary(&name, req.to).await?;
    s.cluster.read_barrier().await?;
    let cg = s
        .cluster
        .model
        .read(|m| m.cgs.get(&name).map(|c| cg_view(m, c)))
        .ok_or_else(|| not_found("cg", &name))?;
    Ok(Json(SwitchPrimaryResponse {
        cg,
        from,
        last_seq: report.last_seq,
        paused_ms: report.paused_ms,
    }))
}

async fn set_running(s: &ApiState, name: String, running: bool) -> ApiResult<Json<VmView>> {
    match s
        .cluster
        .write(Command::SetVmRunning { name, running }, None)
        .await?
    {
        Outcome::Vm(vm, disks) => Ok(Json(s.cluster.model.read(|m| vm_view_in(m, &vm, disks)))),
        other => Err(unexpected(other)),
    }
}

async fn start_vm(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<VmView>> {
    let Json(mut view) = set_running(&s, name, true).await?;
    if view.workload.is_none() {
        return Ok(Json(view));
    }
    // The guest starts on its host once the host applied the start: wait for it to run or
    // to fail, so a guest that cannot start is an error here rather than only in a log.
    let deadline = tokio::time::Instant::now() + HOST_SETTLE;
    loop {
        let asked = tokio::time::timeout_at(deadline, host_guest_state(&s, &mut view));
        if asked.await.is_err() {
            return Ok(Json(view));
        }
        match view.guest.as_deref() {
            Some("running") => break,
            Some("failed") => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "VM '{}' is marked running but its guest cannot start on node {}: {}; fix the cause and start it again, or `convoy vm stop {}`",
                        view.name,
                        view.host,
                        view.guest_error.as_deref().unwrap_or("no reason given"),
                        view.name
                    ),
                ));
            }
            _ if tokio::time::Instant::now() >= deadline => break,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    host_disk_state(&s, &mut view).await;
    Ok(Json(view))
}

async fn stop_vm(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<VmView>> {
    set_running(&s, name, false).await
}

fn disk_info(model: &ClusterModel, d: &convoy_raft::model::Disk) -> Option<DiskInfo> {
    let vm = model.vms.get(&d.vm)?;
    let replicas = vm
        .cg
        .as_ref()
        .and_then(|c| model.cgs.get(c))
        .map(|c| c.replicas.iter().map(|r| r.to).collect())
        .unwrap_or_default();
    Some(DiskInfo {
        id: d.id,
        vm: d.vm.clone(),
        index: d.index,
        size: d.size,
        epoch: d.epoch,
        host: vm.host,
        replicas,
    })
}

async fn list_disks(
    State(s): State<ApiState>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Json<Vec<DiskInfo>>> {
    Ok(Json(
        read_model(&s, &q, |m| {
            m.disks.values().filter_map(|d| disk_info(m, d)).collect()
        })
        .await?,
    ))
}

async fn expose_disk(
    State(s): State<ApiState>,
    Path(id): Path<u64>,
    body: Result<Json<ExposeRequest>, JsonRejection>,
) -> ApiResult<Json<ExposeResponse>> {
    let Json(req) = body?;
    let info = read_model(&s, &ReadQuery::default(), |m| {
        m.disks.get(&id).and_then(|d| disk_info(m, d))
    })
    .await?
    .ok_or_else(|| not_found("disk", &id.to_string()))?;
    // Any host may hold a copy (a replica, or one made by `cg sync`); it answers if not.
    let answer = s
        .cluster
        .local(
            req.on,
            LocalRequest::Expose {
                disk: id,
                size: info.size,
            },
        )
        .await?;
    let LocalResponse::Exposed(uris) = answer else {
        return Err(bad_answer(req.on, answer));
    };
    Ok(Json(ExposeResponse {
        disk: id,
        host: req.on,
        uris,
    }))
}

async fn delete_cg(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    s.cluster.write(Command::DeleteCg { name }, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Longest learner catch-up a client may ask for in `POST /v1/cluster/nodes`.
pub const MAX_CATCH_UP_SECS: u64 = 3600;

/// Serves `app` over TLS on `listener`; the TLS config must require client certificates.
///
/// Only admin client certificates (`urn:convoy:client:<name>`, `convoy cert issue-client`)
/// drive the API. A node certificate or an NBD client certificate completes TLS (it comes
/// from the cluster CA) but every request on that connection gets 403 `forbidden`, so a
/// compromised hypervisor or a stolen node key cannot change the cluster through it.
pub async fn serve_tls(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    app: Router,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, peer) = listener.accept().await.context("admin API accept failed")?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "admin API: TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(convoy_transport::pki::identity_from_cert);
            match identity {
                Some(Ok(PeerIdentity::Client(_))) => serve_connection(stream, peer, app).await,
                other => {
                    let who = match other {
                        Some(Ok(id)) => id.to_string(),
                        Some(Err(e)) => format!("a certificate without a usable identity ({e})"),
                        None => "no certificate".to_string(),
                    };
                    tracing::warn!(%peer, identity = %who, "admin API: refused a certificate that is not an admin's");
                    serve_connection(stream, peer, forbidden(who)).await;
                }
            }
        });
    }
}

/// Answers every request with 403, naming the certificate it came with.
fn forbidden(who: String) -> Router {
    let message = format!(
        "this connection presented {who}: only admin certificates may use the admin API; issue one with `convoy cert issue-client` and pass it with --cert/--key"
    );
    Router::new().fallback(move || {
        let message = message.clone();
        async move { ApiError::new(ErrorCode::Forbidden, message) }
    })
}

/// Serves `app` over plain HTTP (metrics only).
pub async fn serve_plain(listener: TcpListener, app: Router) -> anyhow::Result<()> {
    loop {
        let (tcp, peer) = listener.accept().await.context("metrics accept failed")?;
        let app = app.clone();
        tokio::spawn(serve_connection(tcp, peer, app));
    }
}

async fn serve_connection<S>(stream: S, peer: SocketAddr, app: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "admin API connection ended with an error");
    }
}

fn to_verify(m: &ClusterModel, vm: &convoy_raft::model::Vm) -> crate::data::guests::VmToVerify {
    crate::data::guests::VmToVerify {
        name: vm.name.clone(),
        vm_id: vm.id,
        stays: vm.stays.clone(),
        disks: m.vm_disks(vm).iter().map(|d| (d.id, d.size)).collect(),
    }
}

async fn run_verify(
    s: &ApiState,
    host: u64,
    vms: Vec<crate::data::guests::VmToVerify>,
    prefix: bool,
    freeze_cg: Option<u64>,
) -> ApiResult<Json<VerifyResponse>> {
    let mode = if prefix {
        convoy_guest::VerifyMode::Prefix
    } else {
        convoy_guest::VerifyMode::Latest
    };
    let answer = s
        .cluster
        .local(
            host,
            LocalRequest::Verify {
                vms,
                mode,
                freeze_cg,
            },
        )
        .await?;
    match answer {
        LocalResponse::Verified {
            ok,
            host,
            text,
            report_json,
        } => Ok(Json(VerifyResponse {
            ok,
            host,
            text,
            report: serde_json::from_str(&report_json).map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!("bad report from node {host}: {e}"),
                )
            })?,
        })),
        other => Err(bad_answer(host, other)),
    }
}

async fn verify_vm(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<VerifyRequest>, JsonRejection>,
) -> ApiResult<Json<VerifyResponse>> {
    let Json(req) = body?;
    let (vm, host, freeze) = read_model(&s, &ReadQuery::default(), |m| {
        m.vms.get(&name).map(|vm| {
            let cg = vm.cg.as_ref().and_then(|c| m.cgs.get(c));
            // By default the copy that orders the VM's writes: its group's sequencer.
            let host = req.on.unwrap_or(cg.map_or(vm.host, |c| c.sequencer));
            // Any other copy is a replica: pause its applier while reading.
            let freeze = cg.filter(|c| c.sequencer != host).map(|c| c.id);
            (to_verify(m, vm), host, freeze)
        })
    })
    .await?
    .ok_or_else(|| not_found("vm", &name))?;
    run_verify(&s, host, vec![vm], req.prefix, freeze).await
}

async fn verify_cg(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<VerifyRequest>, JsonRejection>,
) -> ApiResult<Json<VerifyResponse>> {
    let Json(req) = body?;
    let (vms, host, freeze) = read_model(&s, &ReadQuery::default(), |m| {
        m.cgs.get(&name).map(|cg| {
            let host = req.on.unwrap_or(cg.sequencer);
            let vms: Vec<_> = cg
                .vms
                .iter()
                .filter_map(|v| m.vms.get(v))
                .map(|vm| to_verify(m, vm))
                .collect();
            let freeze = (host != cg.sequencer).then_some(cg.id);
            (vms, host, freeze)
        })
    })
    .await?
    .ok_or_else(|| not_found("cg", &name))?;
    run_verify(&s, host, vms, req.prefix, freeze).await
}

async fn sync_cg(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<SyncRequest>, JsonRejection>,
) -> ApiResult<Json<crate::data::delta::SyncReport>> {
    let Json(req) = body?;
    let primary = read_model(&s, &ReadQuery::default(), |m| {
        m.cgs.get(&name).map(|c| c.sequencer)
    })
    .await?
    .ok_or_else(|| not_found("cg", &name))?;
    let answer = s
        .cluster
        .local(
            primary,
            LocalRequest::SyncTo {
                cg: name,
                to: req.to,
                compare: req.compare,
            },
        )
        .await?;
    match answer {
        LocalResponse::Synced(report) => Ok(Json(report)),
        other => Err(bad_answer(primary, other)),
    }
}

fn snapshot_views(cg: &convoy_raft::model::Cg) -> Vec<SnapshotView> {
    cg.snapshots
        .iter()
        .map(|s| SnapshotView {
            cg: cg.name.clone(),
            name: s.name.clone(),
            host: s.host,
            created_at_ms: s.created_at_ms,
            last_seq: None,
            chunks_restored: None,
        })
        .collect()
}

async fn create_snapshot(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<SnapshotRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<SnapshotView>)> {
    let Json(req) = body?;
    let primary = read_model(&s, &ReadQuery::default(), |m| {
        m.cgs.get(&name).map(|c| c.sequencer)
    })
    .await?
    .ok_or_else(|| not_found("cg", &name))?;
    let answer = s
        .cluster
        .local(
            primary,
            LocalRequest::SnapshotCreate {
                cg: name.clone(),
                name: req.name.clone(),
            },
        )
        .await?;
    let LocalResponse::SnapshotTaken { last_seq } = answer else {
        return Err(bad_answer(primary, answer));
    };
    let mut view = read_model(&s, &ReadQuery::default(), |m| {
        m.cgs
            .get(&name)
            .and_then(|c| snapshot_views(c).into_iter().find(|v| v.name == req.name))
    })
    .await?
    .ok_or_else(|| ApiError::new(ErrorCode::Internal, "snapshot recorded but not found"))?;
    view.last_seq = Some(last_seq);
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list_snapshots(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Json<Vec<SnapshotView>>> {
    read_model(&s, &q, |m| m.cgs.get(&name).map(snapshot_views))
        .await?
        .map(Json)
        .ok_or_else(|| not_found("cg", &name))
}

async fn delete_snapshot(
    State(s): State<ApiState>,
    Path((name, snap)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.cluster
        .write(
            Command::DeleteSnapshot {
                cg: name,
                name: snap,
            },
            None,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restore_snapshot(
    State(s): State<ApiState>,
    Path((name, snap)): Path<(String, String)>,
) -> ApiResult<Json<SnapshotView>> {
    let (view, running, primary) = read_model(&s, &ReadQuery::default(), |m| {
        m.cgs.get(&name).map(|c| {
            let running: Vec<String> = c
                .vms
                .iter()
                .filter(|v| m.vms.get(*v).is_some_and(|vm| vm.running))
                .cloned()
                .collect();
            (
                snapshot_views(c).into_iter().find(|v| v.name == snap),
                running,
                c.sequencer,
            )
        })
    })
    .await?
    .ok_or_else(|| not_found("cg", &name))?;
    let mut view = view.ok_or_else(|| not_found("snapshot", &format!("{name}/{snap}")))?;
    if !running.is_empty() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "stop the group's guests first (`convoy vm stop`): running: {}",
                running.join(", ")
            ),
        ));
    }
    if view.host != primary {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "snapshot '{snap}' is on node {} but the group now runs on node {primary}",
                view.host
            ),
        ));
    }
    let answer = s
        .cluster
        .local(
            primary,
            LocalRequest::SnapshotRestore {
                cg: name,
                name: snap,
            },
        )
        .await?;
    let LocalResponse::Restored { chunks } = answer else {
        return Err(bad_answer(primary, answer));
    };
    view.chunks_restored = Some(chunks);
    Ok(Json(view))
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_transport::pki::{self, TlsIdentity};

    fn status(r: ApiResult<impl Sized>) -> Option<StatusCode> {
        r.err().map(|e| e.0)
    }

    #[test]
    fn catch_up_timeout_is_bounded() {
        assert_eq!(
            catch_up(None).ok(),
            Some(crate::node::service::LEARNER_CATCH_UP)
        );
        assert_eq!(catch_up(Some(5)).ok(), Some(Duration::from_secs(5)));
        assert_eq!(
            catch_up(Some(MAX_CATCH_UP_SECS)).ok(),
            Some(Duration::from_secs(MAX_CATCH_UP_SECS))
        );
        for bad in [0, MAX_CATCH_UP_SECS + 1, u64::MAX] {
            assert_eq!(status(catch_up(Some(bad))), Some(StatusCode::BAD_REQUEST));
        }
    }

    #[test]
    fn workload_numbers_are_checked_when_the_vm_is_created() {
        let disks = [64 << 20, 1 << 20];
        assert!(check_workload("iops=200,size=4k,pattern=random", &disks).is_ok());
        for bad in [
            "iops=0",
            "iops=abc",
            "iops=99999999999",
            "size=3",
            "size=1t",
            "size=4m",
            "depth=0",
            "depth=4294967296",
            "span=1",
            "nonsense",
        ] {
            assert_eq!(
                status(check_workload(bad, &disks)),
                Some(StatusCode::BAD_REQUEST),
                "{bad}"
            );
        }
    }

    /// The admin API answers admin certificates and forbids node and NBD client ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_admin_certificates_drive_the_admin_api() {
        let ca = pki::generate_ca("api test").unwrap();
        let node = pki::issue_node_cert(&ca, 1, &["127.0.0.1".into()]).unwrap();
        let server_id = TlsIdentity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
        let tls = pki::server_config(&server_id, &[b"http/1.1"]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/v1/node",
            get(|| async { Json(serde_json::json!({"ok": true})) }),
        );
        let server = tokio::spawn(serve_tls(listener, tls, app));

        let client = |pem: &pki::CertAndKeyPem| {
            let id = TlsIdentity::from_pem(&ca.cert_pem, &pem.cert_pem, &pem.key_pem).unwrap();
            crate::client::AdminClient::new(vec![addr], &id).unwrap()
        };
        let admin = client(&pki::issue_client_cert(&ca, "admin").unwrap());
        let answer: serde_json::Value = admin.get("/v1/node").await.unwrap();
        assert_eq!(answer["ok"], true);

        let other_node = pki::issue_node_cert(&ca, 2, &[]).unwrap();
        let hypervisor =
            pki::issue_nbd_client_cert(&ca, "hv", Duration::from_secs(86_400)).unwrap();
        for (what, pem) in [("node", other_node), ("nbd", hypervisor)] {
            let err = client(&pem)
                .get::<serde_json::Value>("/v1/node")
                .await
                .unwrap_err();
            let failure = err
                .downcast_ref::<crate::client::ApiFailure>()
                .unwrap_or_else(|| panic!("{what}: not an API answer: {err:#}"));
            assert_eq!(failure.status, StatusCode::FORBIDDEN, "{what}");
            assert!(matches!(failure.body.code, ErrorCode::Forbidden), "{what}");
            assert!(
                failure.body.error.contains("issue-client"),
                "{what}: {}",
                failure.body.error
            );
            // Writes too, not only reads.
            let err = client(&pem)
                .post::<_, serde_json::Value>("/v1/cluster/init", &serde_json::json!({}))
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("only admin certificates"),
                "{what}: {err:#}"
            );
        }
        server.abort();
    }
}
