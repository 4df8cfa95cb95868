//! The agent daemon: wires storage, transport, Raft and the admin API together.

pub mod migration;
pub mod ops;
pub mod proposer;
pub mod provider;
pub mod raft_net;
pub mod rpc;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use convoy_raft::log_store::LogStats;
use convoy_raft::state_machine::ModelReader;
use convoy_raft::{LogStore, NodeAddr, Raft, StateMachineStore};
use convoy_transport::pki::{self, PeerIdentity, TlsIdentity};
use convoy_transport::{Endpoint, Inbound, TransportConfig};
use openraft::SnapshotPolicy;
use tokio::net::TcpListener;

use crate::api::{self, ApiState};
use crate::config::AgentConfig;
use crate::data::sequencer::LinkReporter;
use crate::data::{DataConfig, DataPlane, ModelWriter};
use convoy_raft::Command;
use convoy_raft::model::{ClusterModel, LinkState, NodeId};
use service::Cluster;

/// How long an exiting agent waits for the Raft log's database to close.
const LOG_CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Runs the agent until SIGTERM or SIGINT. On every way out (a startup error included)
/// the data plane, Raft and the endpoint stop in order and the Raft log's RocksDB is
/// closed before this returns: a database still closing on another thread while the
/// process exits crashes it (SIGSEGV, or SIGABRT from C++ static destructors).
pub async fn run(cfg: AgentConfig) -> Result<()> {
    let identity = TlsIdentity::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)
        .context("cannot load the agent's TLS files (keys `tls.ca`, `tls.cert`, `tls.key`)")?;
    match identity.identity() {
        PeerIdentity::Node(id) if *id == cfg.node_id => {}
        other => bail!(
            "certificate {} identifies {other}, but `node_id` is {}: issue a certificate for node {} (`convoy cert issue-node --id {}`)",
            cfg.tls.cert.display(),
            cfg.node_id,
            cfg.node_id,
            cfg.node_id
        ),
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
    let log_store = LogStore::open(&cfg.data_dir.join("raft-log")).with_context(|| {
        format!(
            "cannot open the Raft log in {} (is another agent using this data_dir?)",
            cfg.data_dir.display()
        )
    })?;
    let log_closed = log_store.closed();
    let outcome = run_with_log(&cfg, &identity, log_store).await;
    let closed = tokio::task::spawn_blocking(move || log_closed.wait(LOG_CLOSE_WAIT))
        .await
        .unwrap_or(false);
    if !closed {
        tracing::warn!("the Raft log database did not close within {LOG_CLOSE_WAIT:?}");
    }
    outcome
}

/// The agent once its Raft log is open.
async fn run_with_log(
    cfg: &AgentConfig,
    identity: &TlsIdentity,
    log_store: LogStore,
) -> Result<()> {
    let log_stats = log_store.stats();
    let state_machine = StateMachineStore::open(&cfg.data_dir.join("raft-sm"))
        .context("cannot open the state machine")?;
    let model = state_machine.reader();

    let (endpoint, inbound) = Endpoint::bind(
        cfg.listen.raft,
        cfg.node_id,
        identity,
        TransportConfig::default(),
    )
    .with_context(|| {
        format!(
            "cannot bind the QUIC endpoint on {} (key `listen.raft`)",
            cfg.listen.raft
        )
    })?;

    let r = &cfg.raft;
    let raft_config = openraft::Config {
        cluster_name: "convoy".into(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_every),
        max_in_snapshot_log_to_keep: r.keep_after_snapshot,
        install_snapshot_timeout: r.rpc_timeout_ms.max(2_000),
        ..Default::default()
    }
    .validate()
    .context("invalid [raft] settings")?;
    let network = raft_net::Network::new(endpoint.clone(), Duration::from_millis(r.rpc_timeout_ms));
    let raft = Raft::new(
        cfg.node_id,
        Arc::new(raft_config),
        network,
        log_store,
        state_machine,
    )
    .await
    .context("cannot start Raft")?;

    // From here on Raft runs: whatever `serve` returns, stop in order.
    let mut plane = None;
    let outcome = serve(
        cfg, identity, &raft, &endpoint, inbound, model, log_stats, &mut plane,
    )
    .await;
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    if let Some(plane) = plane {
        let _ = tokio::task::spawn_blocking(move || plane.shutdown()).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), raft.shutdown()).await;
    endpoint.close().await;
    outcome
}

/// Starts the data plane, the admin API and the background loops, then serves until a
/// signal or a server error. The data plane is left in `plane` for the caller to stop.
#[allow(clippy::too_many_arguments)]
async fn serve(
    cfg: &AgentConfig,
    identity: &TlsIdentity,
    raft: &Raft,
    endpoint: &Endpoint,
    inbound: Inbound,
    model: ModelReader,
    log_stats: Arc<LogStats>,
    plane_slot: &mut Option<Arc<DataPlane>>,
) -> Result<()> {
    let addr = NodeAddr {
        raft_addr: cfg.advertised_raft().to_string(),
        admin_addr: cfg.advertised_admin().to_string(),
    };
    let cluster = Arc::new(Cluster {
        id: cfg.node_id,
        raft: raft.clone(),
        model,
        endpoint: endpoint.clone(),
        addr,
        log_stats,
        proposer: proposer::Proposer::spawn(raft.clone()),
        data: std::sync::OnceLock::new(),
        qemu: std::sync::OnceLock::new(),
        migrations: Arc::new(migration::Migrations::default()),
    });
    // Before any stream is served: a retired node must not get in while the first
    // reconcile is pending.
    refuse_retired(&cluster);
    tokio::spawn(rpc::serve_inbound(inbound, Arc::clone(&cluster)));

    let data_cfg = DataConfig {
        data_dir: cfg.data_dir.clone(),
        socket_dir: cfg.nbd.socket_dir.clone(),
        nbd_tcp: cfg.nbd.tcp,
        nbd_tcp_server: nbd_tcp_server(cfg, identity)?,
        nbd_limits: cfg.nbd.export_limits(),
        nbd_socket_group: cfg
            .nbd
            .socket_group
            .as_deref()
            .map(convoy_nbd::resolve_group)
            .transpose()
            .context("key `nbd.socket_group`")?,
        journal_limit: cfg.replication.journal_limit_mib << 20,
        sync_timeout: Duration::from_millis(cfg.replication.sync_timeout_ms),
        keep_former_copies: Duration::from_secs(cfg.replication.keep_former_copies_secs),
        crash_pull_wait: Duration::from_secs(cfg.replication.crash_pull_wait_secs),
    };
    // Before the data plane starts: handles taken before the recorder exists record
    // nothing.
    let metrics = crate::metrics::install()?;
    let writer = Arc::new(RaftModelWriter(Arc::downgrade(&cluster)));
    let plane = DataPlane::start(cfg.node_id, data_cfg, endpoint.clone(), writer)
        .await
        .context("cannot start the data plane")?;
    *plane_slot = Some(Arc::clone(&plane));
    let _ = cluster.data.set(Arc::clone(&plane));
    tokio::spawn(reconcile_loop(Arc::clone(&cluster), Arc::clone(&plane)));
    tokio::spawn(gc_loop(Arc::clone(&cluster), Arc::clone(&plane)));
    let qemu = Arc::new(
        crate::qemu::QemuHost::new(&cfg.data_dir, cfg.qemu.clone())
            .context("cannot set up the QEMU driver")?,
    );
    let _ = cluster.qemu.set(Arc::clone(&qemu));
    tokio::spawn(qemu_loop(Arc::clone(&cluster), Arc::clone(&plane), qemu));
    tokio::spawn(migration::run(
        Arc::clone(&cluster),
        Arc::clone(&cluster.migrations),
    ));

    note_cert_expiry(cfg, identity);
    crate::metrics::spawn_sampler(Arc::clone(&cluster), metrics.clone());
    let state = ApiState {
        cluster: Arc::clone(&cluster),
        metrics,
    };

    let tls = pki::server_config(identity, &[b"http/1.1"])
        .context("cannot build the admin TLS config")?;
    let admin = TcpListener::bind(cfg.listen.admin)
        .await
        .with_context(|| format!("cannot listen on {} (key `listen.admin`)", cfg.listen.admin))?;
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(api::serve_tls(admin, tls, api::router(state.clone())));
    if let Some(maddr) = cfg.listen.metrics {
        let l = TcpListener::bind(maddr)
            .await
            .with_context(|| format!("cannot listen on {maddr} (key `listen.metrics`)"))?;
        servers.spawn(api::serve_plain(l, api::metrics_router(state.clone())));
        tracing::info!(
            addr = %maddr,
            "serving /metrics and /healthz over plain HTTP, without TLS or client certificates (key `listen.metrics`)"
        );
    }

    tracing::info!(
        node = cfg.node_id,
        raft = %cfg.listen.raft,
        admin = %cfg.listen.admin,
        metrics = %cfg.listen.metrics.map_or("admin API only".to_string(), |a| a.to_string()),
        data_dir = %cfg.data_dir.display(),
        "agent ready"
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let watchdog = watchdog_interval();
    if let Some(every) = watchdog {
        tracing::info!(every = ?every, "pinging the systemd watchdog (WATCHDOG_USEC)");
    }
    // Pinged from this loop: a runtime too wedged to run it lets systemd restart the agent.
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
            _ = term.recv() => break Ok(()),
            r = tokio::signal::ctrl_c() => break r.context("cannot wait for SIGINT"),
            Some(r) = servers.join_next() => break match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("server task failed: {e}")),
            },
            _ = hup.recv() => reload_certificate(cfg, identity),
        }
    }
}

/// How often to ping the systemd watchdog: half of `WATCHDOG_USEC`, as systemd advises;
/// None when it is unset, zero or unreadable, or when `WATCHDOG_PID` names another process
/// (libsystemd's `sd_watchdog_enabled` rules).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec) / 2)
}

/// The NBD TCP listener's settings: TLS with NBD client certificates from the cluster CA,
/// unless `nbd.tcp_insecure` asks for plaintext.
fn nbd_tcp_server(cfg: &AgentConfig, identity: &TlsIdentity) -> Result<convoy_nbd::ServerConfig> {
    let mut server = convoy_nbd::ServerConfig::default();
    let Some(addr) = cfg.nbd.tcp else {
        return Ok(server);
    };
    if cfg.nbd.tcp_insecure {
        tracing::warn!(
            %addr,
            "NBD over TCP without TLS (nbd.tcp_insecure): anyone who reaches this port can read and write every disk"
        );
        return Ok(server);
    }
    let tls = pki::nbd_server_config(identity).context("cannot build the NBD TLS config")?;
    server.tls = Some(Arc::new(tls));
    Ok(server)
}

/// SIGHUP: reads `tls.cert` and `tls.key` again and, if they hold a valid certificate for
/// this node from the same CA, presents it on every new handshake (QUIC, admin API, NBD)
/// from now on. On any error the running certificate stays and the error is logged.
fn reload_certificate(cfg: &AgentConfig, identity: &TlsIdentity) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
    let outcome = TlsIdentity::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)
        .context("cannot load the new certificate")
        .and_then(|new| {
            identity
                .replace_certificate(&new)
                .context("cannot switch to the new certificate")?;
            Ok(new)
        });
    match outcome {
        Ok(new) => {
            tracing::info!(cert = %cfg.tls.cert.display(), "SIGHUP: now presenting the reloaded certificate");
            note_cert_expiry(cfg, &new);
        }
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "SIGHUP: certificate not reloaded; still presenting the previous one"
        ),
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// Logs when this agent's certificate expires (a warning within 30 days) and exports it
/// as a gauge, so rotation is not discovered by an outage.
fn note_cert_expiry(cfg: &AgentConfig, identity: &TlsIdentity) {
    let Ok(not_after) = pki::not_after_der(identity.certificate()) else {
        return;
    };
    let at = not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    metrics::gauge!("convoy_tls_cert_not_after_seconds").set(at as f64);
    let days = not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
        .as_secs()
        / 86_400;
    if days < 30 {
        tracing::warn!(cert = %cfg.tls.cert.display(), days, "this agent's certificate expires soon: issue a new one, then reload (SIGHUP) or restart the agent (README: rotating certificates)");
    } else {
        tracing::info!(cert = %cfg.tls.cert.display(), days, "certificate valid");
    }
}

/// Tells the transport which nodes the model says are retired, so their certificates
/// open no connection and no stream, in either direction.
fn refuse_retired(cluster: &Cluster) {
    let retired: Vec<NodeId> = cluster.model.read(|m| {
        m.hosts
            .values()
            .filter(|h| h.retired)
            .map(|h| h.id)
            .collect()
    });
    cluster.endpoint.set_retired_peers(retired);
}

/// Proposes commands (link states, hand-overs) through Raft on behalf of the data plane.
struct RaftModelWriter(std::sync::Weak<Cluster>);

impl LinkReporter for RaftModelWriter {
    fn report(
        &self,
        cg: String,
        cg_id: u64,
        sequencer_epoch: u64,
        to: NodeId,
        state: LinkState,
        expect: Option<LinkState>,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let Some(from) = self.0.upgrade().map(|c| c.id) else {
            return Box::pin(async { Err("the agent is shutting down".to_string()) });
        };
        // Bound to this host's tenure (a sequencer that missed a hand-over is refused) and
        // to the group's id (a sender of a deleted group is refused by its namesake).
        let fut = self.propose(
            rand::random(),
            Command::ReportGroupLinkState {
                cg,
                cg_id,
                from,
                sequencer_epoch,
                to,
                state,
                expect,
            },
        );
        Box::pin(async move {
            match fut.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(unknown) => Err(unknown),
            }
        })
    }
}

impl ModelWriter for RaftModelWriter {
    fn propose(
        &self,
        request_id: u128,
        cmd: Command,
    ) -> futures::future::BoxFuture<
        'static,
        Result<Result<convoy_raft::Outcome, convoy_raft::ModelError>, String>,
    > {
        let cluster = self.0.upgrade();
        Box::pin(async move {
            let cluster = cluster.ok_or("the agent is shutting down")?;
            match cluster.write(cmd, Some(request_id)).await {
                Ok(o) => Ok(Ok(o)),
                Err(service::ServiceError::Model(e)) => Ok(Err(e)),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn current_model(&self) -> futures::future::BoxFuture<'static, Result<ClusterModel, String>> {
        let cluster = self.0.upgrade();
        Box::pin(async move {
            let cluster = cluster.ok_or("the agent is shutting down")?;
            cluster.read_barrier().await.map_err(|e| e.to_string())?;
            Ok(cluster.model.read(|m| m.clone()))
        })
    }
}

/// How often a host looks for local copies the cluster no longer gives it.
const GC_EVERY: Duration = Duration::from_secs(10);

/// Every [`GC_EVERY`], deletes local copies the model no longer gives this host. Its own
/// task: a read barrier can wait out a leader election, which must not delay reconciles.
async fn gc_loop(cluster: Arc<Cluster>, plane: Arc<DataPlane>) {
    loop {
        tokio::time::sleep(GC_EVERY).await;
        collect_garbage(&cluster, &plane).await;
    }
}

/// Deletes local copies the model no longer gives this host, deciding on a model read
/// after a read barrier (never on a lagging one). Skipped while there is no leader.
async fn collect_garbage(cluster: &Arc<Cluster>, plane: &Arc<DataPlane>) {
    let barrier_started = std::time::Instant::now();
    if let Err(e) = cluster.read_barrier().await {
        tracing::debug!(error = %e, "no read barrier: local garbage collection skipped");
        return;
    }
    let model = cluster.model.read(|m| m.topology());
    let p = Arc::clone(plane);
    match tokio::task::spawn_blocking(move || p.collect_garbage(&model, barrier_started)).await {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(removed = ?removed, "removed local copies the cluster no longer uses");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "local garbage collection panicked"),
    }
}

/// Runs this host's QEMU guests as the model says: first re-attaches to every QEMU that
/// outlived an earlier agent, then, whenever the model changes (and every second while
/// something is pending), starts and stops guests. Decisions are taken on a model read
/// after a read barrier: a lagging model (an agent that just started) must never stop a
/// guest that a newer entry started. Its own task, so a barrier waiting out an election
/// delays no other reconcile.
async fn qemu_loop(cluster: Arc<Cluster>, plane: Arc<DataPlane>, qemu: Arc<crate::qemu::QemuHost>) {
    qemu.adopt_running().await;
    let mut applied = cluster.model.subscribe();
    loop {
        if cluster.read_barrier().await.is_ok() {
            let plan = cluster
                .model
                .read(|m| convoy_raft::model::host_plan(m, cluster.id).qemu);
            qemu.apply(&plan, |disk| {
                plane
                    .disk_uris(disk)
                    .iter()
                    .find_map(|u| crate::qemu::unix_export(u))
            })
            .await;
        }
        tokio::select! {
            r = applied.changed() => {
                if r.is_err() {
                    return;
                }
                applied.borrow_and_update();
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Reconciles the data plane whenever the applied model changes (and every few seconds,
/// to retry what failed).
async fn reconcile_loop(cluster: Arc<Cluster>, plane: Arc<DataPlane>) {
    let mut applied = cluster.model.subscribe();
    loop {
        refuse_retired(&cluster);
        let model = cluster.model.read(|m| m.topology());
        let p = Arc::clone(&plane);
        let m = model.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || p.reconcile(&m)).await {
            tracing::warn!(error = %e, "data plane reconcile panicked");
        }
        plane.reconcile_guests().await;
        tokio::select! {
            r = applied.changed() => {
                if r.is_err() {
                    return;
                }
                // Let a burst of entries land before looking again (short: a hand-over
                // waits on this host's reconcile).
                tokio::time::sleep(Duration::from_millis(2)).await;
                applied.borrow_and_update();
            }
            _ = plane.reconcile_soon.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
