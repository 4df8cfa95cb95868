//! `/v1/migrations`: plan, start, list, show and abort migrations of consistency groups.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use convoy_raft::model::{ClusterModel, LinkState, Migration, Phase, Strategy};
use convoy_raft::{Command, Outcome};

use super::types::*;
use super::{ApiError, ApiResult, ApiState, read_model};
use crate::node::rpc::{LocalRequest, LocalResponse};

/// Default time a migration may take before it fails back.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);
/// The link rate a plan's estimate assumes when it cannot measure one (the full-copy rate
/// measured on a 2-core host).
const ASSUMED_LINK_RATE: u64 = 400 << 20;
/// What a plan sends from the source to the destination to measure their link.
const LINK_PROBE_BYTES: u64 = 16 << 20;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

/// Parses a strategy as the CLI spells it.
pub fn parse_strategy(text: &str, sync_mode: Option<&str>) -> ApiResult<Strategy> {
    let strategy = match text {
        "reverse-replication" => Strategy::ReverseReplication,
        "sync-switch" => {
            let active_active = match sync_mode.unwrap_or("active-active") {
                "active-active" => true,
                "active-passive" => false,
                other => {
                    return Err(bad(format!(
                        "--sync-mode '{other}': use active-active or active-passive"
                    )));
                }
            };
            Strategy::SyncSwitch { active_active }
        }
        "compare-delta" => Strategy::CompareDelta,
        "break-consistency" => Strategy::BreakConsistency,
        other => {
            return Err(bad(format!(
                "strategy '{other}': use reverse-replication, sync-switch, compare-delta or break-consistency"
            )));
        }
    };
    if sync_mode.is_some() && !matches!(strategy, Strategy::SyncSwitch { .. }) {
        return Err(bad("--sync-mode applies to the sync-switch strategy only"));
    }
    Ok(strategy)
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A migration's view from the model.
pub fn migration_view(model: &ClusterModel, m: &Migration) -> MigrationView {
    let end = m.decision.as_ref().map_or_else(now_ms, |d| d.at_ms);
    let failing = match m.phase {
        Phase::FailingBack(cause) => Some(cause.as_str().to_string()),
        _ => None,
    };
    MigrationView {
        id: m.id,
        cg: m.cg.clone(),
        from: m.from,
        to: m.to,
        strategy: m.strategy.as_str().to_string(),
        phase: m.phase.as_str().to_string(),
        failing_back_because: failing,
        decision: m.decision.as_ref().map(|d| d.decision.as_str().to_string()),
        decision_reason: m.decision.as_ref().map(|d| d.reason.clone()),
        coordinator: m.claim.node,
        claim: m.claim.number,
        started_at_ms: m.started_at_ms,
        deadline_ms: m.deadline_ms,
        elapsed_secs: end.saturating_sub(m.started_at_ms) as f64 / 1000.0,
        vms: model
            .cgs
            .get(&m.cg)
            .map(|c| c.vms.clone())
            .unwrap_or_else(|| m.moved.clone()),
        moved: m.moved.clone(),
        bytes_needed: m.stats.bytes_needed,
        bytes_moved: m.stats.bytes_moved,
        stun_ms: m.stats.stun_ms.clone(),
        rpo_writes: m.stats.rpo_writes,
        roots: m
            .decision
            .as_ref()
            .map_or(&m.stats.cutover_roots, |d| &d.roots)
            .iter()
            .map(|r| RootsView {
                disk: r.disk,
                source: r.source.as_ref().map(hex),
                destination: hex(&r.destination),
            })
            .collect(),
        timeline: m
            .timeline
            .iter()
            .map(|t| TimelineView {
                at_ms: t.at_ms,
                at_secs: t.at_ms.saturating_sub(m.started_at_ms) as f64 / 1000.0,
                phase: t.phase.as_str().to_string(),
                node: t.node,
                note: t.note.clone(),
            })
            .collect(),
        note: None,
        link_progress: None,
        live: m.live,
        live_moves: m.stats.live_moves.clone(),
    }
}

/// `POST /v1/migrations`: records the migration; this agent coordinates it first.
pub async fn start(
    State(s): State<ApiState>,
    body: Result<Json<StartMigrationRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<MigrationView>)> {
    let Json(req) = body?;
    let strategy = parse_strategy(&req.strategy, req.sync_mode.as_deref())?;
    let deadline = req.deadline_secs.map_or(Ok(DEFAULT_DEADLINE), |secs| {
        if (10..=7 * 86_400).contains(&secs) {
            Ok(Duration::from_secs(secs))
        } else {
            Err(bad("--deadline must be 10 s to 7 days"))
        }
    })?;
    req.live.validate().map_err(|e| bad(e.to_string()))?;
    let started = now_ms();
    let cmd = Command::StartMigrationWithSettings {
        cg: req.cg,
        to: req.to,
        strategy,
        coordinator: s.cluster.id,
        started_at_ms: started,
        deadline_ms: started + deadline.as_millis() as u64,
        live: req.live,
    };
    match s.cluster.write(cmd, None).await? {
        Outcome::Migration(m) => Ok((
            StatusCode::CREATED,
            Json(s.cluster.model.read(|model| migration_view(model, &m))),
        )),
        other => Err(super::unexpected(other)),
    }
}

/// `GET /v1/migrations`.
pub async fn list(
    State(s): State<ApiState>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Json<Vec<MigrationView>>> {
    Ok(Json(
        read_model(&s, &q, |m| {
            m.migrations
                .values()
                .map(|mig| migration_view(m, mig))
                .collect()
        })
        .await?,
    ))
}

/// How long `show` waits for the coordinator's live note before answering without it.
const LIVE_NOTE_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// `GET /v1/migrations/{id}`: the record, with the coordinator's live note.
pub async fn show(
    State(s): State<ApiState>,
    Path(id): Path<u64>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Json<MigrationView>> {
    let mut view = read_model(&s, &q, |m| {
        m.migrations.get(&id).map(|mig| migration_view(m, mig))
    })
    .await?
    .ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("migration {id} not found: list them with `convoy migrate list`"),
        )
    })?;
    if view.decision.is_none() {
        // The live note is a garnish: a dead coordinator must not make `show` hang while
        // the operator watches another agent take over.
        let live = tokio::time::timeout(
            LIVE_NOTE_WAIT,
            s.cluster
                .local(view.coordinator, LocalRequest::MigrationLive { id }),
        )
        .await;
        if let Ok(Ok(LocalResponse::MigrationLive(Some(live)))) = live {
            view.note = live.note;
            view.link_progress = live.link.map(|l| (l.acked_seq, l.last_seq));
        }
    }
    Ok(Json(view))
}

/// `POST /v1/migrations/{id}/abort`.
pub async fn abort(
    State(s): State<ApiState>,
    Path(id): Path<u64>,
) -> ApiResult<Json<MigrationView>> {
    let cmd = Command::AbortMigration {
        id,
        at_ms: now_ms(),
        reason: "an operator asked (`convoy migrate abort`)".into(),
    };
    match s.cluster.write(cmd, None).await? {
        Outcome::Migration(m) => Ok(Json(
            s.cluster.model.read(|model| migration_view(model, &m)),
        )),
        other => Err(super::unexpected(other)),
    }
}

/// `POST /v1/migrations/plan`: preflight and estimate; changes nothing.
pub async fn plan(
    State(s): State<ApiState>,
    body: Result<Json<PlanMigrationRequest>, JsonRejection>,
) -> ApiResult<Json<MigrationPlanView>> {
    let Json(req) = body?;
    let strategy_text = req
        .strategy
        .clone()
        .unwrap_or_else(|| "reverse-replication".into());
    let strategy = parse_strategy(&strategy_text, None)?;
    s.cluster.read_barrier().await?;
    let snapshot = s.cluster.model.read(|m| {
        let cg = m.cgs.get(&req.cg).cloned();
        let disks = cg.as_ref().map(|c| m.cg_disks(c)).unwrap_or_default();
        let running = m.running_migration(&req.cg).map(|x| x.id);
        let host_ok = m.is_active_host(req.to);
        let off_seq: Vec<String> = cg
            .as_ref()
            .map(|c| {
                c.vms
                    .iter()
                    .filter_map(|v| m.vms.get(v))
                    .filter(|v| v.host != c.sequencer)
                    .map(|v| v.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        (cg, disks, running, host_ok, off_seq)
    });
    let (cg, disks, running, host_ok, off_seq) = snapshot;
    let cg = cg.ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("cg '{}' not found: list them with `convoy cg list`", req.cg),
        )
    })?;
    let mut problems = Vec::new();
    if !host_ok {
        problems.push(format!("node {} is not an active host", req.to));
    }
    if cg.sequencer == req.to {
        problems.push(format!("node {} already is the group's primary", req.to));
    }
    if let Some(id) = running {
        problems.push(format!("migration {id} of this group is running"));
    }
    for vm in &off_seq {
        problems.push(format!(
            "VM '{vm}' runs away from the group's primary: move it back first"
        ));
    }
    let link = cg.link(req.to).cloned();
    let destination_copy = link.as_ref().map_or("none".to_string(), |l| {
        format!("{} ({})", l.state.as_str(), l.mode.as_str())
    });
    if strategy == Strategy::CompareDelta && link.is_some() {
        problems.push(format!(
            "node {} already holds a live copy: compare-delta is for a destination with no replication history (use reverse-replication)",
            req.to
        ));
    }
    let ids: Vec<u64> = disks.iter().map(|d| d.id).collect();
    let capacity = |host| {
        let s = s.clone();
        let ids = ids.clone();
        async move {
            match s
                .cluster
                .local(host, LocalRequest::Capacity { disks: ids })
                .await
            {
                Ok(LocalResponse::Capacity { free_bytes, used }) => Some((free_bytes, used)),
                _ => None,
            }
        }
    };
    let source = capacity(cg.sequencer).await;
    let destination = capacity(req.to).await;
    if destination.is_none() && host_ok {
        problems.push(format!("node {} does not answer", req.to));
    }
    let source_used: u64 = source
        .as_ref()
        .map_or(0, |(_, u)| u.iter().map(|(_, b)| b).sum());
    let destination_used: u64 = destination
        .as_ref()
        .map_or(0, |(_, u)| u.iter().map(|(_, b)| b).sum());
    let destination_free = destination.as_ref().map_or(0, |(f, _)| *f);
    // What the destination lacks: a consistent copy lacks its lag; any other copy (or
    // data left from an earlier copy) at most the difference; nothing, everything.
    let mut dirty = 0.0;
    let mut lag_bytes = 0;
    if let Ok(LocalResponse::GroupStatus(Some(g))) = s
        .cluster
        .local(cg.sequencer, LocalRequest::GroupStatus { cg_id: cg.id })
        .await
    {
        let before = g.last_seq;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(LocalResponse::GroupStatus(Some(g2))) = s
            .cluster
            .local(cg.sequencer, LocalRequest::GroupStatus { cg_id: cg.id })
            .await
        {
            dirty = g2.last_seq.saturating_sub(before) as f64 * 2.0;
        }
        if let Some(l) = g.links.get(&req.to) {
            let exact = match s
                .cluster
                .local(cg.sequencer, LocalRequest::GroupLagBytes { cg_id: cg.id })
                .await
            {
                Ok(LocalResponse::GroupLagBytes(Some(lags))) => {
                    lags.get(&req.to).copied().flatten()
                }
                _ => None,
            };
            lag_bytes = exact.unwrap_or(l.lag_writes * 4096);
        }
    }
    let bytes_to_move = match &link {
        Some(l) if l.state == LinkState::Consistent => lag_bytes,
        _ => source_used.saturating_sub(destination_used.min(source_used) / 2),
    };
    let total: u64 = disks.iter().map(|d| d.size).sum();
    if destination.is_some() && destination_free + destination_used < source_used.min(total) {
        problems.push(format!(
            "node {} has {} bytes free but the group's data takes {source_used}",
            req.to, destination_free
        ));
    }
    // The link as the data would travel it: from the source, over the cluster's QUIC.
    let measured_link = if destination.is_some() && cg.sequencer != req.to {
        match s
            .cluster
            .local(
                cg.sequencer,
                LocalRequest::MeasureLink {
                    to: req.to,
                    bytes: LINK_PROBE_BYTES,
                },
            )
            .await
        {
            Ok(LocalResponse::LinkMeasured { bytes, micros }) => {
                Some((bytes as u128 * 1_000_000 / micros.max(1) as u128) as u64)
            }
            _ => None,
        }
    } else {
        None
    };
    let link_rate = measured_link.unwrap_or(ASSUMED_LINK_RATE).max(1);
    let estimated_secs = bytes_to_move as f64 / link_rate as f64 + 0.05 * cg.vms.len() as f64 + 1.0;
    Ok(Json(MigrationPlanView {
        cg: cg.name.clone(),
        from: cg.sequencer,
        to: req.to,
        strategy: strategy.as_str().to_string(),
        ok: problems.is_empty(),
        problems,
        destination_copy,
        bytes_to_move,
        dirty_writes_per_sec: dirty,
        destination_free_bytes: destination_free,
        estimated_secs,
        assumed_link_bytes_per_sec: ASSUMED_LINK_RATE,
        measured_link_bytes_per_sec: measured_link,
    }))
}
