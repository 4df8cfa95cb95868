//! The coordinator: one migration's state machine. Committed model and observations in,
//! actions out; no I/O, no clock (the shell passes `now_ms`), no randomness.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use convoy_model::{
    Cg, ClusterModel, Command, Decision, DecisionRecord, DiskId, DiskRoots, FailBackCause,
    LinkState, Migration, ModelError, NodeId, Outcome, Phase, Progress, ReplicationMode, Strategy,
};

use crate::{
    Action, ActionId, ActionKind, ActionResult, Guard, HandOverRequest, HypervisorOp,
    HypervisorReply, Observations, ProposalResult, RestoreRequest, StorageError, StorageOp,
    StorageReply, TakeOverRequest, VmState,
};

/// Tunables of the engine. The defaults suit the agent; tests may shrink them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// A copy whose lag is at most this many writes counts as caught up.
    pub converged_lag: u64,
    /// If a copy's lag has not shrunk over this long, the migration escalates to
    /// synchronous mirroring instead of waiting (guests dirty faster than it moves).
    pub convergence_window_ms: u64,
    /// A proposal with no answer is emitted again (same request id) after this long.
    pub proposal_timeout_ms: u64,
    /// A storage operation with no answer is emitted again after this long.
    pub storage_timeout_ms: u64,
    /// A hypervisor operation with no answer is emitted again after this long.
    pub hypervisor_timeout_ms: u64,
    /// After a failed operation, the same one is not asked again for this long.
    pub backoff_ms: u64,
    /// Consecutive failures of one forward step after which the migration fails back.
    pub max_failures: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            converged_lag: 32,
            convergence_window_ms: 3_000,
            proposal_timeout_ms: 2_000,
            storage_timeout_ms: 30_000,
            hypervisor_timeout_ms: 10_000,
            backoff_ms: 200,
            max_failures: 8,
        }
    }
}

/// What one pending action is for; at most one action per key is outstanding.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Claim,
    Advance,
    Decide,
    AddReplica(NodeId),
    SetMode,
    RecordSnapshot(String),
    Move(String),
    Pause(String),
    Resume(String),
    TakeSnapshot(String),
    Sequencer,
    Roots,
}

#[derive(Clone, Debug)]
struct Pending {
    action: Action,
    issued_ms: u64,
    /// Its outcome came back unknown: emit it again at the next chance.
    retry: bool,
}

/// Coordinates one migration from one agent. Every agent runs one per undecided
/// migration: the one whose node holds the claim acts; the others stand by and claim the
/// migration when the failure detector reports the holder's host lost. A new `Coordinator`
/// (an agent restart) always claims anew before acting, so it never reuses a previous
/// incarnation's request ids, and everything it needs it reads from the committed model:
/// what it keeps in memory only avoids asking twice.
#[derive(Clone, Debug)]
pub struct Coordinator {
    node: NodeId,
    migration: u64,
    incarnation: u32,
    config: Config,
    claim: Option<u64>,
    seen_phase: Option<Phase>,
    next_action: ActionId,
    pending: BTreeMap<Key, Pending>,
    by_id: BTreeMap<ActionId, Key>,
    failures: BTreeMap<Key, u32>,
    backoff: BTreeMap<Key, u64>,
    give_up: Option<FailBackCause>,
    lag_samples: VecDeque<(u64, u64)>,
    max_lag: u64,
    stuns: Vec<(String, u64)>,
    snapshots_taken: BTreeSet<String>,
    dest_roots: Option<Vec<(DiskId, [u8; 32])>>,
    stopped: BTreeSet<String>,
    last_note: String,
}

/// What one step looks at.
struct Ctx<'a> {
    m: &'a Migration,
    model: &'a ClusterModel,
    group: &'a Cg,
    obs: &'a Observations,
    now: u64,
    claim: u64,
}

impl Coordinator {
    /// A coordinator for migration `migration` on agent `node`. `incarnation` must differ
    /// between the coordinators one node creates for one migration over its lifetime (an
    /// agent start counter, or random bits): it keeps their request ids apart.
    pub fn new(node: NodeId, migration: u64, incarnation: u32, config: Config) -> Self {
        Coordinator {
            node,
            migration,
            incarnation,
            config,
            claim: None,
            seen_phase: None,
            next_action: 0,
            pending: BTreeMap::new(),
            by_id: BTreeMap::new(),
            failures: BTreeMap::new(),
            backoff: BTreeMap::new(),
            give_up: None,
            lag_samples: VecDeque::new(),
            max_lag: 0,
            stuns: Vec::new(),
            snapshots_taken: BTreeSet::new(),
            dest_roots: None,
            stopped: BTreeSet::new(),
            last_note: String::new(),
        }
    }

    /// The migration this coordinator drives.
    pub fn migration(&self) -> u64 {
        self.migration
    }

    /// The claim number this coordinator acts under, once its claim committed.
    pub fn claim(&self) -> Option<u64> {
        self.claim
    }

    /// Whether the migration is decided in `model`: nothing is left to do.
    pub fn finished(&self, model: &ClusterModel) -> bool {
        model
            .migrations
            .get(&self.migration)
            .is_none_or(|m| m.decision.is_some())
    }

    /// One step: absorb `obs` (results of earlier actions, host, link and VM state), read
    /// the migration's record and group from `model` (the committed model, as fresh as the
    /// shell has it) and return what to do now. Call it whenever something changed (a
    /// completion, a model change) and on a timer (a few times a second); calling it more
    /// often is harmless, since an action already outstanding is not emitted again until
    /// its timeout.
    pub fn step(&mut self, model: &ClusterModel, obs: &Observations, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.absorb(obs, now_ms);
        let Some(m) = model.migrations.get(&self.migration) else {
            return out;
        };
        if m.decision.is_some() {
            self.pending.clear();
            self.by_id.clear();
            return out;
        }
        if self.seen_phase != Some(m.phase) {
            // A new phase: what was asked for the old one is moot (its guarded commands
            // will be refused), and failures counted there do not carry over. Storage and
            // hypervisor operations stay outstanding: they must answer before the same
            // kind is asked again.
            self.pending
                .retain(|_, p| !matches!(p.action.kind, ActionKind::Propose { .. }));
            let live: BTreeSet<ActionId> = self.pending.values().map(|p| p.action.id).collect();
            self.by_id.retain(|id, _| live.contains(id));
            self.failures.clear();
            self.backoff.clear();
            self.give_up = None;
            self.lag_samples.clear();
            self.seen_phase = Some(m.phase);
        }
        match self.claim {
            Some(c) if m.claim.number == c && m.claim.node == self.node => {}
            Some(_) => {
                // Someone else claimed it: stand by, and forget what this claim asked.
                self.claim = None;
                self.pending.clear();
                self.by_id.clear();
            }
            None => {}
        }
        let Some(claim) = self.claim else {
            let holder_gone = m.claim.node == self.node || obs.lost(m.claim.node);
            if holder_gone && !obs.lost(self.node) {
                let cmd = Command::ClaimMigration {
                    id: self.migration,
                    node: self.node,
                    expect_claim: m.claim.number,
                    at_ms: now_ms,
                };
                self.propose(Key::Claim, cmd, now_ms, &mut out);
            }
            return out;
        };
        let Some(group) = model.cgs.get(&m.cg) else {
            self.note(
                format!("group {} is gone; nothing to coordinate", m.cg),
                &mut out,
            );
            return out;
        };
        let cx = Ctx {
            m,
            model,
            group,
            obs,
            now: now_ms,
            claim,
        };
        self.drive(&cx, &mut out);
        out
    }

    // ---- completions ----

    fn absorb(&mut self, obs: &Observations, now: u64) {
        for c in &obs.completions {
            let Some(key) = self.by_id.get(&c.action).cloned() else {
                continue;
            };
            if self.pending.get(&key).map(|p| p.action.id) != Some(c.action) {
                continue;
            }
            if c.result == ActionResult::Proposal(ProposalResult::Unknown) {
                // Ask again at once with the same request id: the model answers a
                // repeated id with its first answer, so nothing applies twice.
                if let Some(p) = self.pending.get_mut(&key) {
                    p.retry = true;
                }
                continue;
            }
            self.pending.remove(&key);
            self.by_id.remove(&c.action);
            match &c.result {
                ActionResult::Proposal(ProposalResult::Applied(answer)) => {
                    self.on_answer(&key, answer, now);
                }
                ActionResult::Proposal(ProposalResult::Unknown) => {}
                ActionResult::Storage(r) => self.on_storage(&key, r, now),
                ActionResult::Hypervisor(r) => match r {
                    Ok(HypervisorReply::Resumed { stun_ms }) => {
                        self.failures.remove(&key);
                        if let (Key::Resume(vm), Some(s)) = (&key, stun_ms) {
                            self.stuns.push((vm.clone(), *s));
                        }
                    }
                    Ok(HypervisorReply::Drained) => {
                        self.failures.remove(&key);
                    }
                    Err(_) => self.failed(&key, now),
                },
            }
        }
    }

    fn on_answer(&mut self, key: &Key, answer: &Result<Outcome, ModelError>, now: u64) {
        match (key, answer) {
            (Key::Claim, Ok(Outcome::Migration(m))) if m.claim.node == self.node => {
                self.claim = Some(m.claim.number);
            }
            (_, Ok(_)) => {
                self.failures.remove(key);
            }
            // Someone changed the record first (another coordinator, an abort, the
            // storage provider): the next step reads the model again.
            (_, Err(ModelError::Stale(_))) => {}
            (_, Err(_)) => self.failed(key, now),
        }
    }

    fn on_storage(&mut self, key: &Key, r: &Result<StorageReply, StorageError>, now: u64) {
        match r {
            Ok(reply) => {
                self.failures.remove(key);
                match reply {
                    // Migrations compare through the new replica's seeding (below).
                    StorageReply::Delta(_) => {}
                    StorageReply::Snapshot => {
                        if let Key::TakeSnapshot(name) = key {
                            self.snapshots_taken.insert(name.clone());
                        }
                    }
                    StorageReply::Sequencer(_) => {}
                    StorageReply::Roots(r) => self.dest_roots = Some(r.clone()),
                }
            }
            Err(StorageError::CopiesDiffer { .. }) => {
                self.give_up = Some(FailBackCause::CopiesDiffer);
            }
            Err(StorageError::Busy(_)) | Err(StorageError::Refused(ModelError::Stale(_))) => {
                self.backoff
                    .insert(key.clone(), now + self.config.backoff_ms);
            }
            Err(_) => self.failed(key, now),
        }
    }

    fn failed(&mut self, key: &Key, now: u64) {
        let n = self.failures.entry(key.clone()).or_insert(0);
        *n += 1;
        if *n >= self.config.max_failures {
            self.give_up
                .get_or_insert(FailBackCause::DestinationUnusable);
        }
        self.backoff
            .insert(key.clone(), now + self.config.backoff_ms);
    }

    // ---- emitting ----

    fn issue(&mut self, key: Key, kind: ActionKind, now: u64, out: &mut Vec<Action>) {
        let timeout = self
            .pending
            .get(&key)
            .map_or(0, |p| self.timeout(&p.action.kind));
        if let Some(p) = self.pending.get_mut(&key) {
            if p.retry || now >= p.issued_ms.saturating_add(timeout) {
                p.issued_ms = now;
                p.retry = false;
                out.push(p.action.clone());
            }
            return;
        }
        if self.backoff.get(&key).is_some_and(|until| now < *until) {
            return;
        }
        self.next_action += 1;
        let action = Action {
            id: self.next_action,
            kind,
        };
        self.by_id.insert(action.id, key.clone());
        self.pending.insert(
            key,
            Pending {
                action: action.clone(),
                issued_ms: now,
                retry: false,
            },
        );
        out.push(action);
    }

    fn timeout(&self, kind: &ActionKind) -> u64 {
        match kind {
            ActionKind::Propose { .. } => self.config.proposal_timeout_ms,
            ActionKind::Storage(_) => self.config.storage_timeout_ms,
            ActionKind::Hypervisor(_) => self.config.hypervisor_timeout_ms,
            ActionKind::Note(_) => 0,
        }
    }

    /// Whether an action for `key` is outstanding and not timed out; a timed-out one is
    /// forgotten (its answer is not coming).
    fn outstanding(&mut self, key: &Key, now: u64) -> bool {
        let Some(p) = self.pending.get(key) else {
            return false;
        };
        if now < p.issued_ms.saturating_add(self.timeout(&p.action.kind)) {
            return true;
        }
        self.forget(key);
        false
    }

    fn forget(&mut self, key: &Key) {
        if let Some(p) = self.pending.remove(key) {
            self.by_id.remove(&p.action.id);
        }
    }

    fn request_id(&self, action: ActionId) -> u128 {
        ((self.node as u128) << 96)
            | ((self.incarnation as u128) << 64)
            | (((self.migration & 0xffff_ffff) as u128) << 32)
            | (action & 0xffff_ffff) as u128
    }

    fn propose(&mut self, key: Key, command: Command, now: u64, out: &mut Vec<Action>) {
        let request_id = self.request_id(self.next_action + 1);
        self.issue(
            key,
            ActionKind::Propose {
                request_id,
                command,
            },
            now,
            out,
        );
    }

    fn step_cmd(&mut self, cx: &Ctx, key: Key, command: Command, out: &mut Vec<Action>) {
        let cmd = Command::MigrationStep {
            id: cx.m.id,
            claim: cx.claim,
            phase: cx.m.phase,
            at_ms: cx.now,
            command: Box::new(command),
        };
        self.propose(key, cmd, cx.now, out);
    }

    fn storage(&mut self, cx: &Ctx, key: Key, op: StorageOp, out: &mut Vec<Action>) {
        self.issue(key, ActionKind::Storage(op), cx.now, out);
    }

    fn hypervisor(&mut self, cx: &Ctx, key: Key, op: HypervisorOp, out: &mut Vec<Action>) {
        self.issue(key, ActionKind::Hypervisor(op), cx.now, out);
    }

    fn note(&mut self, text: String, out: &mut Vec<Action>) {
        if text != self.last_note {
            self.last_note = text.clone();
            out.push(Action {
                id: 0,
                kind: ActionKind::Note(text),
            });
        }
    }

    fn guard(&self, cx: &Ctx) -> Guard {
        Guard {
            migration: cx.m.id,
            claim: cx.claim,
            phase: cx.m.phase,
            at_ms: cx.now,
        }
    }

    fn advance(
        &mut self,
        cx: &Ctx,
        to: Phase,
        note: String,
        mut progress: Progress,
        out: &mut Vec<Action>,
    ) {
        progress.stun_ms.extend(self.stuns.iter().cloned());
        progress.rpo_writes = Some(self.max_lag);
        if let Some(st) = cx.obs.links.get(&cx.m.to) {
            progress.bytes_needed = Some(st.bytes_needed);
            progress.bytes_moved = Some(st.bytes_moved);
        }
        let cmd = Command::AdvanceMigration {
            id: cx.m.id,
            claim: cx.claim,
            from: cx.m.phase,
            to,
            at_ms: cx.now,
            note,
            progress,
        };
        let before = self.pending.contains_key(&Key::Advance);
        self.propose(Key::Advance, cmd, cx.now, out);
        if !before && self.pending.contains_key(&Key::Advance) {
            // The stuns ride on this entry; if it is refused they are only lost from the
            // report, never from the migration's correctness.
            self.stuns.clear();
        }
    }

    fn decide(
        &mut self,
        cx: &Ctx,
        decision: Decision,
        reason: String,
        roots: Vec<DiskRoots>,
        out: &mut Vec<Action>,
    ) {
        let cmd = Command::DecideMigration {
            id: cx.m.id,
            claim: cx.claim,
            record: DecisionRecord {
                decision,
                at_ms: cx.now,
                reason,
                roots,
            },
        };
        self.propose(Key::Decide, cmd, cx.now, out);
    }

    // ---- the phases ----

    fn drive(&mut self, cx: &Ctx, out: &mut Vec<Action>) {
        let m = cx.m;
        let src_lost = cx.obs.lost(m.from);
        let dst_lost = cx.obs.lost(m.to);
        match m.phase {
            Phase::Done => {}
            Phase::RollingForward => self.roll_forward(cx, out),
            Phase::FailingBack(cause) => {
                if src_lost {
                    self.source_lost(cx, out);
                } else {
                    self.fail_back(cx, cause, out);
                }
            }
            _ if src_lost => self.source_lost(cx, out),
            _ => {
                let back = |c| Phase::FailingBack(c);
                let outdated = cx.group.sequencer == m.from
                    && cx
                        .group
                        .link(m.to)
                        .is_some_and(|l| l.state == LinkState::Outdated);
                if dst_lost {
                    let note = format!(
                        "destination node {} lost during {}: failing back to node {}",
                        m.to,
                        m.phase.as_str(),
                        m.from
                    );
                    self.advance(
                        cx,
                        back(FailBackCause::DestinationLost),
                        note,
                        Progress::default(),
                        out,
                    );
                } else if cx.now >= m.deadline_ms {
                    let note = format!(
                        "deadline passed during {} (lag of node {}'s copy: {} writes): failing back to node {}",
                        m.phase.as_str(),
                        m.to,
                        cx.obs.links.get(&m.to).map_or(0, |l| l.lag()),
                        m.from
                    );
                    self.advance(
                        cx,
                        back(FailBackCause::Deadline),
                        note,
                        Progress::default(),
                        out,
                    );
                } else if let Some(cause) = self
                    .give_up
                    .or(outdated.then_some(FailBackCause::DestinationUnusable))
                {
                    let note = format!(
                        "{} during {}: failing back to node {}",
                        cause_text(m, cause),
                        m.phase.as_str(),
                        m.from
                    );
                    self.advance(cx, back(cause), note, Progress::default(), out);
                } else {
                    self.forward(cx, out);
                }
            }
        }
    }

    /// Whether the destination holds every acknowledged write and can take the group on
    /// its own.
    fn can_roll_forward(&self, cx: &Ctx) -> bool {
        let m = cx.m;
        !cx.obs.lost(m.to)
            && (cx.group.sequencer == m.to
                || (m.stats.destination_complete_at_ms.is_some()
                    && cx.group.link(m.to).is_some_and(|l| {
                        l.state == LinkState::Consistent && l.mode.is_synchronous()
                    })))
    }

    fn source_lost(&mut self, cx: &Ctx, out: &mut Vec<Action>) {
        let m = cx.m;
        if self.can_roll_forward(cx) {
            let note = format!(
                "source node {} lost during {}; node {} holds every acknowledged write: rolling forward",
                m.from,
                m.phase.as_str(),
                m.to
            );
            self.advance(cx, Phase::RollingForward, note, Progress::default(), out);
        } else {
            self.note(
                format!(
                    "source node {} lost during {} while node {}'s copy may lack acknowledged writes: waiting for node {} to return",
                    m.from,
                    m.phase.as_str(),
                    m.to,
                    m.from
                ),
                out,
            );
        }
    }

    fn forward(&mut self, cx: &Ctx, out: &mut Vec<Action>) {
        let m = cx.m;
        match m.phase {
            Phase::Planned => {
                let note = format!("preparing {}: {}", m.strategy.as_str(), plan_text(m));
                self.advance(cx, Phase::Preparing, note, Progress::default(), out);
            }
            Phase::Preparing => {
                self.heal_paused(cx, out);
                self.prepare(cx, out);
            }
            Phase::Moving => self.move_all(cx, m.strategy == Strategy::BreakConsistency, out),
            Phase::CuttingOver => {
                self.heal_paused(cx, out);
                self.cut_over(cx, out);
            }
            Phase::Verifying => self.verify(cx, out),
            _ => {}
        }
    }

    /// Resumes VMs that are paused where the model says they run (a stale coordinator's
    /// pause, or a move this coordinator did not finish before a phase change).
    fn heal_paused(&mut self, cx: &Ctx, out: &mut Vec<Action>) {
        for name in &cx.group.vms {
            if self.in_transit(name) {
                // Its move is proposed: resuming it now would let the move commit under
                // a running guest, whose writes in flight the new epochs then refuse.
                continue;
            }
            if let Some(vm) = cx.model.vms.get(name) {
                if cx.obs.vm(name) == VmState::Paused(vm.host) {
                    self.ensure_on(cx, name, vm.host, out);
                }
            }
        }
    }

    /// Whether a pause or a move of `vm` is outstanding.
    fn in_transit(&self, vm: &str) -> bool {
        self.pending.contains_key(&Key::Move(vm.into()))
            || self.pending.contains_key(&Key::Pause(vm.into()))
    }

    fn sample(&mut self, now: u64, lag: u64) {
        self.max_lag = self.max_lag.max(lag);
        self.lag_samples.push_back((now, lag));
        let window = self.config.convergence_window_ms;
        // Keep the newest sample that is at least a window old at the front.
        while self.lag_samples.len() > 1
            && self
                .lag_samples
                .get(1)
                .is_some_and(|(t, _)| now.saturating_sub(*t) >= window)
        {
            self.lag_samples.pop_front();
        }
    }

    fn not_converging(&self, now: u64, lag: u64) -> bool {
        lag > self.config.converged_lag
            && self.lag_samples.front().is_some_and(|(t, l)| {
                now.saturating_sub(*t) >= self.config.convergence_window_ms && lag >= *l
            })
    }

    fn prepare(&mut self, cx: &Ctx, out: &mut Vec<Action>) {
        let (m, g) = (cx.m, cx.group);
        if m.strategy == Strategy::BreakConsistency {
            let name = m.failback_snapshot();
            if !g.snapshots.iter().any(|s| s.name == name) {
                if self.snapshots_taken.contains(&name) {
                    let cmd = Command::CreateSnapshot {
                        cg: m.cg.clone(),
                        name: name.clone(),
                        created_at_ms: cx.now,
                    };
                    self.step_cmd(cx, Key::RecordSnapshot(name), cmd, out);
                } else {
                    let op = StorageOp::Snapshot {
                        cg: m.cg.clone(),
                        host: g.sequencer,
                        name: name.clone(),
                    };
                    self.storage(cx, Key::TakeSnapshot(name), op, out);
                }
                return;
            }
        }
        let Some(link) = g.link(m.to) else {
            // compare-delta included: a new replica whose destination holds data is
            // seeded by comparing chunk hashes, sending only what differs, while the
            // journal keeps the writes made meanwhile (4 KiB each, not the chunk they
            // dirtied). A separate comparison first would leave those writes to be
            // caught up chunk by chunk.
            // Every copy of a group shares one mode; a new copy takes the group's.
            let mode = g
                .replicas
                .first()
                .map(|l| l.mode)
                .unwrap_or(match m.strategy {
                    Strategy::SyncSwitch { active_active } => sync_mode(active_active),
                    _ => ReplicationMode::Async,
                });
            let cmd = Command::AddReplica {
                cg: m.cg.clone(),
                to: m.to,
                mode,
            };
            self.step_cmd(cx, Key::AddReplica(m.to), cmd, out);
            return;
        };
        let Some(st) = cx.obs.links.get(&m.to).copied() else {
            self.note(format!("no status yet for node {}'s link", m.to), out);
            return;
        };
        let lag = st.lag();
        self.sample(cx.now, lag);
        let escalated = m.stats.escalated_at_ms.is_some();
        if let Strategy::SyncSwitch { active_active } = m.strategy {
            let want = sync_mode(active_active);
            if link.mode != want {
                // An asynchronous copy far behind catches up first: switched at once,
                // every guest write would wait for it to drain its backlog, and past
                // the sync timeout the link is outdated and the migration fails back.
                let behind = link.state == LinkState::Consistent
                    && !link.mode.is_synchronous()
                    && lag > self.config.converged_lag
                    && !escalated;
                if behind && self.not_converging(cx.now, lag) {
                    self.escalate(cx, lag, out);
                } else if behind {
                    self.note(
                        format!(
                            "node {} catching up asynchronously before the group goes {}: lag {lag} writes",
                            m.to,
                            want.as_str()
                        ),
                        out,
                    );
                } else {
                    let cmd = Command::SetMode {
                        cg: m.cg.clone(),
                        mode: want,
                    };
                    self.step_cmd(cx, Key::SetMode, cmd, out);
                }
                return;
            }
        }
        let to_sync = Command::SetMode {
            cg: m.cg.clone(),
            mode: ReplicationMode::Sync,
        };
        if link.state != LinkState::Consistent {
            // Seeding: it converges only if it sends faster than guests dirty; if not,
            // mirror new writes synchronously so only the old differences remain.
            if !link.mode.is_synchronous() && escalated {
                self.step_cmd(cx, Key::SetMode, to_sync, out);
            } else if !link.mode.is_synchronous() && self.not_converging(cx.now, lag) {
                self.escalate(cx, lag, out);
            } else {
                self.note(
                    format!(
                        "node {}'s copy is {}: seeding, {lag} chunks to go",
                        m.to,
                        link.state.as_str()
                    ),
                    out,
                );
            }
            return;
        }
        match m.strategy {
            Strategy::SyncSwitch { .. } => {
                if st.up_to_date {
                    let note = format!(
                        "node {} holds every acknowledged write ({} synchronous): moving VMs one at a time",
                        m.to,
                        link.mode.as_str()
                    );
                    let p = Progress {
                        destination_complete: true,
                        ..Progress::default()
                    };
                    self.advance(cx, Phase::Moving, note, p, out);
                } else {
                    self.note(
                        format!("synchronous catch-up of node {}: lag {lag} writes", m.to),
                        out,
                    );
                }
            }
            Strategy::ReverseReplication | Strategy::CompareDelta => {
                if link.mode.is_synchronous() {
                    if st.up_to_date {
                        let note = format!(
                            "node {} holds every acknowledged write (synchronous, caught up): moving VMs one at a time, their writes mirrored back to node {}",
                            m.to, m.from
                        );
                        let p = Progress {
                            destination_complete: true,
                            ..Progress::default()
                        };
                        self.advance(cx, Phase::Moving, note, p, out);
                    } else {
                        self.note(
                            format!(
                                "node {} draining its backlog under sync: lag {lag} writes",
                                m.to
                            ),
                            out,
                        );
                    }
                } else if lag <= self.config.converged_lag || escalated {
                    // Caught up asynchronously (only the lag moved); from here the copy
                    // follows synchronously, so once VMs depend on it, it holds every
                    // acknowledged write (the condition for rolling forward).
                    self.step_cmd(cx, Key::SetMode, to_sync, out);
                } else if self.not_converging(cx.now, lag) {
                    self.escalate(cx, lag, out);
                } else {
                    self.note(
                        format!("node {} catching up asynchronously: lag {lag} writes", m.to),
                        out,
                    );
                }
            }
            Strategy::BreakConsistency => {
                if lag <= self.config.converged_lag || st.up_to_date {
                    let note = format!(
                        "node {} caught up (lag {lag} writes); snapshot {} on node {} is the fail-back point: handing the order over, then moving every VM at once",
                        m.to,
                        m.failback_snapshot(),
                        m.from
                    );
                    self.advance(cx, Phase::CuttingOver, note, Progress::default(), out);
                } else if link.mode.is_synchronous() {
                    self.note(
                        format!(
                            "node {} draining its backlog under sync: lag {lag} writes",
                            m.to
                        ),
                        out,
                    );
                } else if escalated {
                    self.step_cmd(cx, Key::SetMode, to_sync, out);
                } else if self.not_converging(cx.now, lag) {
                    self.escalate(cx, lag, out);
                } else {
                    self.note(format!("node {} catching up: lag {lag} writes", m.to), out);
                }
            }
        }
    }

    fn escalate(&mut self, cx: &Ctx, lag: u64, out: &mut Vec<Action>) {
        let first = self.lag_samples.front().map_or(lag, |(_, l)| *l);
        let note = format!(
            "not converging: node {}'s lag went from {first} to {lag} writes over {} ms (guests write faster than the link moves): escalating to synchronous mirroring, so guest writes wait for node {}",
            cx.m.to, self.config.convergence_window_ms, cx.m.to
        );
        let p = Progress {
            escalated: true,
            ..Progress::default()
        };
        self.advance(cx, cx.m.phase, note, p, out);
        self.lag_samples.clear();
    }

    /// Makes `vm` run on `target`; true once it does.
    fn ensure_on(&mut self, cx: &Ctx, vm: &str, target: NodeId, out: &mut Vec<Action>) -> bool {
        let Some(v) = cx.model.vms.get(vm) else {
            return true;
        };
        let state = cx.obs.vm(vm);
        if v.host == target {
            let pause = Key::Pause(vm.into());
            if matches!(state, VmState::Paused(_)) {
                // Our pause landed (its answer may be lost): resume from here.
                self.forget(&pause);
            } else if self.outstanding(&pause, cx.now) {
                // A pause of ours may still land: wait for it, or the VM would stay
                // paused after we moved on.
                return false;
            }
            return match state {
                // Running there, and our resume (if we asked for one) has answered, so its
                // stun time is recorded before the phase moves on.
                VmState::Running(h) if h == target => {
                    !self.outstanding(&Key::Resume(vm.into()), cx.now)
                }
                VmState::Stopped if self.stopped.contains(vm) => true,
                _ => {
                    if !cx.obs.lost(target) {
                        let op = HypervisorOp::Resume {
                            vm: vm.into(),
                            host: target,
                            guard: self.guard(cx),
                        };
                        self.hypervisor(cx, Key::Resume(vm.into()), op, out);
                    }
                    false
                }
            };
        }
        let from = v.host;
        if state == VmState::Stopped {
            self.stopped.insert(vm.into());
        }
        // A VM moves once no instance of it runs: drained (paused wherever its instance
        // is, which after an interrupted move may be the host it left), stopped, or on a
        // lost host. An instance that survives somewhere unseen is refused by the epochs
        // the move bumps.
        let running_on = match state {
            VmState::Running(h) if !cx.obs.lost(h) && !cx.obs.lost(from) => Some(h),
            _ => None,
        };
        if let Some(h) = running_on {
            let op = HypervisorOp::PauseAndDrain {
                vm: vm.into(),
                host: h,
                guard: self.guard(cx),
            };
            self.hypervisor(cx, Key::Pause(vm.into()), op, out);
        } else {
            let cmd = Command::MoveVm {
                name: vm.into(),
                to: target,
                expect_host: Some(from),
            };
            self.step_cmd(cx, Key::Move(vm.into()), cmd, out);
        }
        false
    }

    /// Makes every VM run on `target` (one in transit at a time unless `parallel`); true
    /// once all do.
    fn all_on(&mut self, cx: &Ctx, target: NodeId, parallel: bool, out: &mut Vec<Action>) -> bool {
        let mut done = true;
        let mut away = Vec::new();
        for name in &cx.group.vms {
            match cx.model.vms.get(name) {
                Some(v) if v.host == target => {
                    done &= self.ensure_on(cx, name, target, out);
                }
                Some(_) => away.push(name.clone()),
                None => {}
            }
        }
        if away.is_empty() {
            return done;
        }
        if parallel {
            for name in &away {
                self.ensure_on(cx, name, target, out);
            }
        } else if done {
            self.ensure_on(cx, &away[0], target, out);
        }
        // Otherwise one at a time: the next VM starts only when the last one runs again.
        false
    }

    fn move_all(&mut self, cx: &Ctx, parallel: bool, out: &mut Vec<Action>) {
        let m = cx.m;
        if !parallel {
            // VMs not in transit that a stale coordinator paused get resumed.
            let in_transit = cx
                .group
                .vms
                .iter()
                .find(|v| cx.model.vms.get(*v).is_some_and(|vm| vm.host != m.to))
                .cloned();
            for name in &cx.group.vms {
                if Some(name) != in_transit.as_ref() && !self.in_transit(name) {
                    if let Some(vm) = cx.model.vms.get(name) {
                        if vm.host != m.to && cx.obs.vm(name) == VmState::Paused(vm.host) {
                            self.ensure_on(cx, name, vm.host, out);
                        }
                    }
                }
            }
        }
        if self.all_on(cx, m.to, parallel, out) {
            let Some(next) = m.strategy.next(Phase::Moving) else {
                return;
            };
            let note = match next {
                Phase::CuttingOver => format!(
                    "every VM runs on node {}: handing the order over at a consistent point",
                    m.to
                ),
                _ => format!(
                    "every VM runs on node {}: recording a fresh consistent point there",
                    m.to
                ),
            };
            let p = Progress {
                moved: cx.group.vms.clone(),
                ..Progress::default()
            };
            self.advance(cx, next, note, p, out);
        }
    }

    fn cut_over(&mut self, cx: &Ctx, out: &mut Vec<Action>) {
        let m = cx.m;
        if cx.group.sequencer != m.from {
            // The cut-over entry moves the phase itself; nothing to do until it shows.
            return;
        }
        // break-consistency sends nothing back to the source (its snapshot is the
        // fail-back point); the others keep the source a synchronous copy until the
        // decision, so it stays complete, and the decision restores the previous mode.
        let old_link_mode = match m.strategy {
            Strategy::BreakConsistency => None,
            _ => Some(ReplicationMode::Sync),
        };
        let op = StorageOp::HandOver(HandOverRequest {
            cg: m.cg.clone(),
            from: m.from,
            to: m.to,
            old_link_mode,
            guard: self.guard(cx),
        });
        self.storage(cx, Key::Sequencer, op, out);
    }

    fn verify(&mut self, cx: &Ctx, out: &mut Vec<Action>) {
        let (m, g) = (cx.m, cx.group);
        if !self.all_on(cx, m.to, true, out) {
            return;
        }
        if m.strategy == Strategy::BreakConsistency {
            let name = m.final_snapshot();
            if !g.snapshots.iter().any(|s| s.name == name) {
                if self.snapshots_taken.contains(&name) {
                    let cmd = Command::CreateSnapshot {
                        cg: m.cg.clone(),
                        name: name.clone(),
                        created_at_ms: cx.now,
                    };
                    self.step_cmd(cx, Key::RecordSnapshot(name), cmd, out);
                } else {
                    let op = StorageOp::Snapshot {
                        cg: m.cg.clone(),
                        host: g.sequencer,
                        name: name.clone(),
                    };
                    self.storage(cx, Key::TakeSnapshot(name), op, out);
                }
                return;
            }
        }
        if m.stats.cutover_roots.is_empty() {
            self.note("no cut-over roots recorded; cannot commit".into(), out);
            return;
        }
        let reason = format!(
            "every VM runs on node {}, which orders the group; both copies' roots were equal on all {} disks at the cut-over",
            m.to,
            m.stats.cutover_roots.len()
        );
        self.decide(
            cx,
            Decision::Committed,
            reason,
            m.stats.cutover_roots.clone(),
            out,
        );
    }

    fn fail_back(&mut self, cx: &Ctx, cause: FailBackCause, out: &mut Vec<Action>) {
        let (m, g) = (cx.m, cx.group);
        if g.sequencer == m.to {
            if !cx.obs.lost(m.to) {
                match g.link(m.from) {
                    None => {
                        let mode = g
                            .replicas
                            .first()
                            .map(|l| l.mode)
                            .unwrap_or(ReplicationMode::Sync);
                        let cmd = Command::AddReplica {
                            cg: m.cg.clone(),
                            to: m.from,
                            mode,
                        };
                        self.step_cmd(cx, Key::AddReplica(m.from), cmd, out);
                    }
                    Some(l) if l.state != LinkState::Consistent => {
                        let lag = cx.obs.links.get(&m.from).map_or(0, |s| s.lag());
                        self.sample(cx.now, lag);
                        if !l.mode.is_synchronous()
                            && (m.stats.escalated_at_ms.is_some()
                                || self.not_converging(cx.now, lag))
                        {
                            // The source's copy is seeded back; a link that cannot keep
                            // up goes synchronous (new writes mirrored as they come).
                            let cmd = Command::SetMode {
                                cg: m.cg.clone(),
                                mode: ReplicationMode::Sync,
                            };
                            self.step_cmd(cx, Key::SetMode, cmd, out);
                        } else {
                            self.note(
                                format!(
                                    "failing back: node {}'s copy is {}, {lag} behind",
                                    m.from,
                                    l.state.as_str()
                                ),
                                out,
                            );
                        }
                    }
                    Some(l) => {
                        let op = StorageOp::HandOver(HandOverRequest {
                            cg: m.cg.clone(),
                            from: m.to,
                            to: m.from,
                            old_link_mode: Some(l.mode),
                            guard: self.guard(cx),
                        });
                        self.storage(cx, Key::Sequencer, op, out);
                    }
                }
            } else if g
                .link(m.from)
                .is_some_and(|l| l.state == LinkState::Consistent && l.mode.is_synchronous())
            {
                let op = StorageOp::TakeOver(TakeOverRequest {
                    cg: m.cg.clone(),
                    lost: m.to,
                    to: m.from,
                    guard: self.guard(cx),
                });
                self.storage(cx, Key::Sequencer, op, out);
            } else if m.strategy == Strategy::BreakConsistency
                && g.snapshots
                    .iter()
                    .any(|s| s.name == m.failback_snapshot() && s.host == m.from)
            {
                let op = StorageOp::RestoreSnapshot(RestoreRequest {
                    cg: m.cg.clone(),
                    host: m.from,
                    snapshot: m.failback_snapshot(),
                    lost: m.to,
                    guard: self.guard(cx),
                });
                self.storage(cx, Key::Sequencer, op, out);
            } else {
                self.note(
                    format!(
                        "node {} holds the order and is lost, and node {} holds no complete copy: waiting for node {}",
                        m.to, m.from, m.to
                    ),
                    out,
                );
            }
            return;
        }
        if self.all_on(cx, m.from, true, out) {
            let reason = cause_text(m, cause);
            self.decide(cx, Decision::FailedBack, reason, Vec::new(), out);
        }
    }

    fn roll_forward(&mut self, cx: &Ctx, out: &mut Vec<Action>) {
        let (m, g) = (cx.m, cx.group);
        if g.sequencer == m.from {
            let op = StorageOp::TakeOver(TakeOverRequest {
                cg: m.cg.clone(),
                lost: m.from,
                to: m.to,
                guard: self.guard(cx),
            });
            self.storage(cx, Key::Sequencer, op, out);
            return;
        }
        if !self.all_on(cx, m.to, true, out) {
            return;
        }
        let roots = if !m.stats.cutover_roots.is_empty() {
            m.stats.cutover_roots.clone()
        } else if let Some(r) = &self.dest_roots {
            r.iter()
                .map(|(disk, root)| DiskRoots {
                    disk: *disk,
                    source: None,
                    destination: *root,
                })
                .collect()
        } else {
            let op = StorageOp::Roots {
                cg: m.cg.clone(),
                host: m.to,
            };
            self.storage(cx, Key::Roots, op, out);
            return;
        };
        let reason = format!(
            "source node {} was lost; node {} held every acknowledged write and took the group over",
            m.from, m.to
        );
        self.decide(cx, Decision::Committed, reason, roots, out);
    }
}

/// The mode `sync-switch` runs in.
fn sync_mode(active_active: bool) -> ReplicationMode {
    if active_active {
        ReplicationMode::ActiveActiveSync
    } else {
        ReplicationMode::Sync
    }
}

fn plan_text(m: &Migration) -> String {
    match m.strategy {
        Strategy::ReverseReplication => format!(
            "catch node {}'s copy up with only what it lacks, switch it to sync, move VMs one at a time (writes mirrored back to node {}), hand the order over",
            m.to, m.from
        ),
        Strategy::SyncSwitch { active_active } => format!(
            "switch the group to {}, move VMs one at a time, hand the order over, restore the previous mode with roles swapped",
            sync_mode(active_active).as_str()
        ),
        Strategy::CompareDelta => format!(
            "compare node {}'s image by chunk hashes and send what differs, then as reverse-replication",
            m.to
        ),
        Strategy::BreakConsistency => format!(
            "snapshot the group on node {} as the fail-back point, catch node {} up, hand the order over, move every VM at once, record a fresh consistent point",
            m.from, m.to
        ),
    }
}

fn cause_text(m: &Migration, cause: FailBackCause) -> String {
    match cause {
        FailBackCause::Abort => "aborted by an operator".into(),
        FailBackCause::Deadline => format!("not decided by the deadline ({} ms)", m.deadline_ms),
        FailBackCause::DestinationLost => format!("destination node {} was lost", m.to),
        FailBackCause::DestinationUnusable => {
            format!(
                "destination node {}'s copy or operations kept failing",
                m.to
            )
        }
        FailBackCause::CopiesDiffer => {
            "the copies' Merkle roots differed at the consistent point".into()
        }
    }
}
