//! The migration engine's shell: every agent runs a [`Coordinator`] for each undecided
//! migration, feeds it the committed model and what it observes, and carries out its
//! actions (Raft proposals, storage-provider and hypervisor-driver operations). Only the
//! agent holding a migration's claim acts; another claims it when the failure detector
//! reports the holder's host lost, and continues (or fails back) from the record alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoy_migrate::{
    ActionKind, ActionResult, Completion, Config, Coordinator, HostHealth, HypervisorDriver,
    Observations, ProposalResult, StorageProvider, VmState, run_hypervisor_op, run_storage_op,
};
use convoy_raft::model::NodeId;
use convoy_transport::StreamKind;
use tokio::sync::mpsc;

use super::provider::ClusterProvider;
use super::rpc::ForwardRequest;
use super::service::{Cluster, ServiceError};

/// How often each coordinator steps without news.
const TICK: Duration = Duration::from_millis(200);
/// How often the failure detector probes each host.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// A host whose probes have failed for this long (and [`LOST_ROUNDS`] of them) is lost.
const LOST_AFTER: Duration = Duration::from_millis(1200);
/// A host running a QEMU guest of the group is reported lost only after this long without
/// an answer: its QEMU outlives its agent, so a guest whose agent merely restarts must not
/// be started afresh elsewhere while it still runs there (a host-level lease that kills
/// such guests sooner is not built).
const QEMU_HOST_LOST_AFTER: Duration = Duration::from_secs(30);
/// How long a proposal may take before its outcome is reported unknown.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(3);

/// What the shell knows of a migration for `migrate status` (not replicated: the
/// coordinating agent's live view).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LiveStatus {
    /// The latest note of the engine.
    pub note: Option<String>,
    /// The destination link as last observed.
    pub link: Option<convoy_migrate::LinkStatus>,
    /// Whether this agent coordinates it now.
    pub coordinating: bool,
}

/// The shell's shared state, readable by the API.
#[derive(Default)]
pub struct Migrations {
    live: Mutex<HashMap<u64, LiveStatus>>,
}

impl Migrations {
    /// The live status of migration `id` on this agent.
    pub fn live(&self, id: u64) -> Option<LiveStatus> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut LiveStatus)) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        f(live.entry(id).or_default());
    }
}

/// The failure detector: which hosts answered a probe recently.
///
/// A host is lost only on fresh evidence: [`LOST_ROUNDS`] probes in a row unanswered over
/// at least [`LOST_AFTER`] (from the first of them). Time alone is not evidence: an agent
/// that was itself stopped (SIGSTOP, a frozen VM) wakes with every answer old and its
/// probes in flight timed out; judged by that it took its peers for lost, claimed their
/// migrations and failed one back to a snapshot, dropping writes acknowledged since (seen
/// after an 18 s SIGSTOP). So a probe round that spans such a stall, or follows one, wipes
/// the evidence gathered before it ([`STALL`]).
struct Detector {
    probes: Mutex<HashMap<NodeId, ProbeRecord>>,
    started: Instant,
}

/// What the probes of one host found.
#[derive(Clone, Copy, Debug, Default)]
struct ProbeRecord {
    /// Probes unanswered since the last answer (or this agent's last stall).
    failed_in_row: u32,
    /// When the first of those was sent.
    failing_since: Option<Instant>,
}

/// Unanswered probes in a row before a host can be reported lost.
const LOST_ROUNDS: u32 = 2;
/// How long one probe may wait for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// A probe round (at most [`PROBE_TIMEOUT`], then [`PROBE_EVERY`] until the next) that
/// took this much longer ran while this agent was stalled, not while its peers were
/// silent; CPU starvation on a loaded host stays well below it.
const STALL: Duration = Duration::from_secs(2);

impl Detector {
    fn new() -> Self {
        Detector {
            probes: Mutex::new(HashMap::new()),
            started: Instant::now(),
        }
    }

    /// Records a probe of `host` sent at `sent`.
    fn record(&self, host: NodeId, answered: bool, sent: Instant) {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        let r = probes.entry(host).or_default();
        if answered {
            r.failed_in_row = 0;
            r.failing_since = None;
        } else {
            r.failed_in_row = r.failed_in_row.saturating_add(1);
            r.failing_since.get_or_insert(sent);
        }
    }

    /// This agent was stalled: what its probes found before says nothing any more.
    fn stalled(&self) {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        for r in probes.values_mut() {
            *r = ProbeRecord::default();
        }
    }

    /// How long probes to `host` have been failing (zero while its last conclusive probe
    /// was answered).
    fn silent_for(&self, host: NodeId) -> Duration {
        let probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        match probes.get(&host) {
            Some(r) => r.failing_since.map_or(Duration::ZERO, |t| t.elapsed()),
            None => self.started.elapsed(),
        }
    }

    /// Health as seen by a coordinator watching since `watching_since`: a host is lost
    /// only once it went unanswered for [`LOST_AFTER`] while this coordinator watched, so
    /// a host that just came back (a probe not yet through) does not fail a fresh
    /// migration at its first step, and only after [`LOST_ROUNDS`] failed probes in a row.
    fn health(
        &self,
        hosts: &[NodeId],
        me: NodeId,
        watching_since: Instant,
    ) -> BTreeMap<NodeId, HostHealth> {
        let probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        let watched = self.started.max(watching_since).elapsed() > LOST_AFTER;
        hosts
            .iter()
            .map(|h| {
                let r = probes.get(h).copied().unwrap_or_default();
                let lost = *h != me
                    && watched
                    && r.failed_in_row >= LOST_ROUNDS
                    && r.failing_since.is_some_and(|t| t.elapsed() > LOST_AFTER);
                (
                    *h,
                    if lost {
                        HostHealth::Lost
                    } else {
                        HostHealth::Up
                    },
                )
            })
            .collect()
    }
}

async fn probe_loop(cluster: Arc<Cluster>, detector: Arc<Detector>) {
    let mut last_round = Instant::now();
    loop {
        if last_round.elapsed() > PROBE_TIMEOUT + PROBE_EVERY + STALL {
            detector.stalled();
        }
        last_round = Instant::now();
        let hosts: Vec<(NodeId, String)> = cluster.model.read(|m| {
            m.active_hosts()
                .filter(|h| h.id != cluster.id)
                .map(|h| (h.id, h.raft_addr.clone()))
                .collect()
        });
        let sent = Instant::now();
        let probes = hosts.into_iter().map(|(id, addr)| {
            let cluster = Arc::clone(&cluster);
            async move {
                let Ok(addr) = addr.parse() else {
                    return (id, false);
                };
                let Ok(payload) = convoy_codec::encode(&ForwardRequest::Ping) else {
                    return (id, false);
                };
                let ok = cluster
                    .endpoint
                    .request(id, addr, StreamKind::Forward, &payload, PROBE_TIMEOUT)
                    .await
                    .is_ok();
                (id, ok)
            }
        });
        let results = futures::future::join_all(probes).await;
        if sent.elapsed() > PROBE_TIMEOUT + STALL {
            // The round spanned a stall of this agent: its timeouts are its own.
            detector.stalled();
        } else {
            for (id, ok) in results {
                detector.record(id, ok, sent);
            }
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// A phase as a number for the `convoy_migration_phase` gauge: planned 0, preparing 1,
/// moving 2, cutting-over 3, verifying 4, rolling-forward 5, failing-back 6, done 7.
fn phase_number(phase: convoy_raft::model::Phase) -> f64 {
    use convoy_raft::model::Phase;
    match phase {
        Phase::Planned => 0.0,
        Phase::Preparing => 1.0,
        Phase::Moving => 2.0,
        Phase::CuttingOver => 3.0,
        Phase::Verifying => 4.0,
        Phase::RollingForward => 5.0,
        Phase::FailingBack(_) => 6.0,
        Phase::Done => 7.0,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One coordinator and what it waits for.
struct Runner {
    coordinator: Coordinator,
    completions: Vec<Completion>,
    in_flight: HashSet<u64>,
    /// When this agent began watching the migration (see [`Detector::health`]).
    watching_since: Instant,
}

/// Runs coordinators for every undecided migration until the agent stops.
pub async fn run(cluster: Arc<Cluster>, shared: Arc<Migrations>) {
    let detector = Arc::new(Detector::new());
    tokio::spawn(probe_loop(Arc::clone(&cluster), Arc::clone(&detector)));
    let provider = Arc::new(ClusterProvider::new(Arc::clone(&cluster)));
    let incarnation: u32 = rand::random();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, Completion)>();
    let mut runners: HashMap<u64, Runner> = HashMap::new();
    let mut applied = cluster.model.subscribe();
    loop {
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            Some((id, c)) = done_rx.recv() => {
                if let Some(r) = runners.get_mut(&id) {
                    r.in_flight.remove(&c.action);
                    r.completions.push(c);
                }
                while let Ok((id, c)) = done_rx.try_recv() {
                    if let Some(r) = runners.get_mut(&id) {
                        r.in_flight.remove(&c.action);
                        r.completions.push(c);
                    }
                }
            }
            _ = tokio::time::sleep(TICK) => {}
        }
        let model = cluster.model.read(|m| m.topology());
        let undecided: Vec<u64> = model
            .migrations
            .values()
            .filter(|m| m.decision.is_none())
            .map(|m| m.id)
            .collect();
        runners.retain(|id, _| {
            let keep = undecided.contains(id);
            if !keep {
                if let Some(m) = model.migrations.get(id) {
                    provider.forget(&m.cg);
                    // Counted once, by the agent that coordinated the decision.
                    if let (true, Some(d)) = (m.claim.node == cluster.id, &m.decision) {
                        metrics::counter!("convoy_migrations_decided_total", "decision" => d.decision.as_str())
                            .increment(1);
                        metrics::gauge!("convoy_migration_phase", "id" => id.to_string(), "cg" => m.cg.clone())
                            .set(phase_number(m.phase));
                    }
                }
            }
            keep
        });
        let hosts: Vec<NodeId> = model.active_hosts().map(|h| h.id).collect();
        for id in undecided {
            let runner = runners.entry(id).or_insert_with(|| Runner {
                coordinator: Coordinator::new(cluster.id, id, incarnation, Config::default()),
                completions: Vec::new(),
                in_flight: HashSet::new(),
                watching_since: Instant::now(),
            });
            let Some(m) = model.migrations.get(&id) else {
                continue;
            };
            let health = detector.health(&hosts, cluster.id, runner.watching_since);
            let holder_lost = health.get(&m.claim.node) == Some(&HostHealth::Lost);
            let acting = m.claim.node == cluster.id || holder_lost;
            shared.update(id, |l| l.coordinating = m.claim.node == cluster.id);
            let mut obs = Observations {
                completions: std::mem::take(&mut runner.completions),
                hosts: health.clone(),
                ..Observations::default()
            };
            if acting {
                let vms: Vec<String> = model
                    .cgs
                    .get(&m.cg)
                    .map(|c| c.vms.clone())
                    .unwrap_or_default();
                // Asked together: each may be a request to another host, and a step waits
                // for all of them (while a guest is paused for its switchover, too).
                let (links, states) = tokio::join!(
                    provider.link_status(&m.cg),
                    futures::future::join_all(vms.iter().map(|vm| provider.state(vm)))
                );
                if let Ok(links) = links {
                    shared.update(id, |l| l.link = links.get(&m.to).copied());
                    obs.links = links;
                }
                for (vm, mut state) in vms.into_iter().zip(states) {
                    // A QEMU guest on a host that does not answer may still run there:
                    // within the grace it counts as running (the engine waits to pause it)
                    // and its host as up.
                    let qemu_host = model
                        .vms
                        .get(&vm)
                        .filter(|v| v.qemu.is_some() && v.running)
                        .map(|v| v.host);
                    if let Some(h) = qemu_host {
                        let silent = detector.silent_for(h);
                        if h != cluster.id && silent < QEMU_HOST_LOST_AFTER {
                            if state == VmState::Unknown {
                                state = VmState::Running(h);
                            }
                            obs.hosts.insert(h, HostHealth::Up);
                        }
                    }
                    obs.vms.insert(vm, state);
                }
            }
            if m.claim.node == cluster.id {
                let labels = [("id", id.to_string()), ("cg", m.cg.clone())];
                metrics::gauge!("convoy_migration_phase", &labels).set(phase_number(m.phase));
                metrics::gauge!("convoy_migration_bytes_moved", &labels)
                    .set(m.stats.bytes_moved as f64);
                metrics::gauge!("convoy_migration_bytes_needed", &labels)
                    .set(m.stats.bytes_needed as f64);
            }
            for c in &obs.completions {
                if let ActionResult::Hypervisor(Ok(convoy_migrate::HypervisorReply::Resumed {
                    stun_ms: Some(ms),
                })) = &c.result
                {
                    metrics::histogram!("convoy_migration_stun_seconds")
                        .record(*ms as f64 / 1000.0);
                }
            }
            let actions = runner.coordinator.step(&model, &obs, now_ms());
            for action in actions {
                if let ActionKind::Note(note) = &action.kind {
                    tracing::info!(migration = id, "{note}");
                    let note = note.clone();
                    shared.update(id, |l| l.note = Some(note));
                    continue;
                }
                if !runner.in_flight.insert(action.id) {
                    continue;
                }
                let (cluster, provider, tx) =
                    (Arc::clone(&cluster), Arc::clone(&provider), done_tx.clone());
                tokio::spawn(async move {
                    let result = match &action.kind {
                        ActionKind::Propose {
                            request_id,
                            command,
                        } => {
                            let written = tokio::time::timeout(
                                PROPOSAL_TIMEOUT,
                                cluster.write(command.clone(), Some(*request_id)),
                            )
                            .await;
                            ActionResult::Proposal(match written {
                                Ok(Ok(o)) => ProposalResult::Applied(Ok(o)),
                                Ok(Err(ServiceError::Model(e))) => ProposalResult::Applied(Err(e)),
                                _ => ProposalResult::Unknown,
                            })
                        }
                        ActionKind::Storage(op) => {
                            ActionResult::Storage(run_storage_op(provider.as_ref(), op).await)
                        }
                        ActionKind::Hypervisor(op) => {
                            ActionResult::Hypervisor(run_hypervisor_op(provider.as_ref(), op).await)
                        }
                        ActionKind::Note(_) => return,
                    };
                    let _ = tx.send((
                        id,
                        Completion {
                            action: action.id,
                            result,
                        },
                    ));
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health_of(d: &Detector, host: NodeId) -> HostHealth {
        let long_ago = Instant::now() - Duration::from_secs(60);
        d.health(&[1, host], 1, long_ago)[&host]
    }

    /// A probe sent `ago` that failed.
    fn failed_probe_sent(d: &Detector, host: NodeId, ago: Duration) {
        d.record(host, false, Instant::now() - ago);
    }

    /// A probe that failed within its timeout, just now.
    fn failed_probe(d: &Detector, host: NodeId) {
        failed_probe_sent(d, host, PROBE_TIMEOUT);
    }

    #[test]
    fn a_host_whose_answers_are_merely_old_is_not_lost() {
        // As after this agent was stopped for a minute: the last answer is old, and the
        // round in flight across the stop timed out (a stall: its evidence is wiped).
        let mut d = Detector::new();
        d.started = Instant::now() - Duration::from_secs(120);
        let before = Instant::now() - Duration::from_secs(60);
        d.record(2, true, before);
        failed_probe_sent(&d, 2, Duration::from_secs(60));
        d.stalled();
        assert_eq!(health_of(&d, 2), HostHealth::Up);
        assert_eq!(d.silent_for(2), Duration::ZERO);
        // One fresh failure (a connection redialled) is not enough.
        failed_probe(&d, 2);
        assert_eq!(health_of(&d, 2), HostHealth::Up);
        // An answer clears it.
        d.record(2, true, Instant::now());
        failed_probe(&d, 2);
        failed_probe(&d, 2);
        assert_eq!(
            health_of(&d, 2),
            HostHealth::Up,
            "failing for under LOST_AFTER"
        );
    }

    #[test]
    fn a_host_that_fails_probes_in_a_row_for_long_enough_is_lost() {
        let mut d = Detector::new();
        d.started = Instant::now() - Duration::from_secs(120);
        d.record(2, true, Instant::now() - LOST_AFTER * 2);
        failed_probe_sent(&d, 2, LOST_AFTER + Duration::from_millis(100));
        for _ in 1..LOST_ROUNDS {
            failed_probe(&d, 2);
        }
        assert_eq!(health_of(&d, 2), HostHealth::Lost);
        assert!(d.silent_for(2) > LOST_AFTER);
        // Probes failing for less than LOST_AFTER are not yet a loss, however old the
        // last answer (an agent that just woke and redials).
        d.record(3, true, Instant::now() - Duration::from_secs(60));
        for _ in 0..LOST_ROUNDS + 2 {
            failed_probe(&d, 3);
        }
        assert_eq!(health_of(&d, 3), HostHealth::Up);
        // Nor is a host this coordinator has only just begun to watch.
        let just_now = d.health(&[1, 2], 1, Instant::now())[&2];
        assert_eq!(just_now, HostHealth::Up);
        // A host that never answered is lost once enough probes failed for long enough.
        failed_probe_sent(&d, 4, LOST_AFTER * 2);
        for _ in 1..LOST_ROUNDS {
            failed_probe(&d, 4);
        }
        assert_eq!(health_of(&d, 4), HostHealth::Lost);
    }
}
