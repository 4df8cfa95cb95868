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
/// A host that has not answered a probe for this long is reported lost.
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
struct Detector {
    last_ok: Mutex<HashMap<NodeId, Instant>>,
    started: Instant,
}

impl Detector {
    /// How long `host` has gone without answering a probe (since this detector started,
    /// if it never answered).
    fn silent_for(&self, host: NodeId) -> Duration {
        let last = self.last_ok.lock().unwrap_or_else(|p| p.into_inner());
        last.get(&host)
            .map_or(self.started.elapsed(), |at| at.elapsed())
    }

    /// Health as seen by a coordinator watching since `watching_since`: a host is lost
    /// only once it went unanswered for [`LOST_AFTER`] while this coordinator watched, so
    /// a host that just came back (a probe not yet through) does not fail a fresh
    /// migration at its first step.
    fn health(
        &self,
        hosts: &[NodeId],
        me: NodeId,
        watching_since: Instant,
    ) -> BTreeMap<NodeId, HostHealth> {
        let last = self.last_ok.lock().unwrap_or_else(|p| p.into_inner());
        let watched = self.started.max(watching_since).elapsed() > LOST_AFTER;
        hosts
            .iter()
            .map(|h| {
                let lost =
                    *h != me && watched && last.get(h).is_none_or(|at| at.elapsed() > LOST_AFTER);
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
    loop {
        let hosts: Vec<(NodeId, String)> = cluster.model.read(|m| {
            m.active_hosts()
                .filter(|h| h.id != cluster.id)
                .map(|h| (h.id, h.raft_addr.clone()))
                .collect()
        });
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
                    .request(id, addr, StreamKind::Forward, &payload, PROBE_EVERY * 2)
                    .await
                    .is_ok();
                (id, ok)
            }
        });
        let results = futures::future::join_all(probes).await;
        {
            let mut last = detector.last_ok.lock().unwrap_or_else(|p| p.into_inner());
            for (id, ok) in results {
                if ok {
                    last.insert(id, Instant::now());
                }
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
    let detector = Arc::new(Detector {
        last_ok: Mutex::new(HashMap::new()),
        started: Instant::now(),
    });
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
                if let Ok(links) = provider.link_status(&m.cg).await {
                    shared.update(id, |l| l.link = links.get(&m.to).copied());
                    obs.links = links;
                }
                let vms: Vec<String> = model
                    .cgs
                    .get(&m.cg)
                    .map(|c| c.vms.clone())
                    .unwrap_or_default();
                for vm in vms {
                    let mut state = provider.state(&vm).await;
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
