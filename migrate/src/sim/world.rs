//! The simulated cluster: a Raft log over the model, hosts with per-group copies, the data
//! path of guest writes (ordering, mirroring, sync acknowledgement, fencing) and the
//! guests. Everything is driven by one seeded PRNG and a tick counter.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use convoy_model::{ClusterModel, Command, DiskId, LinkState, ModelError, NodeId, Outcome, Phase};

/// Simulated milliseconds per tick.
pub(crate) const TICK_MS: u64 = 10;

/// splitmix64: small, fast, and the same sequence for the same seed everywhere.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when empty).
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next() % (hi - lo)
        }
    }

    /// True with probability `per_mille`/1000.
    pub(crate) fn chance(&mut self, per_mille: u64) -> bool {
        self.next() % 1000 < per_mille
    }
}

/// Fault rates of the simulated Raft and message paths, per mille.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Faults {
    /// A proposal is lost before it commits.
    pub(crate) lose_proposal: u64,
    /// A proposal commits but its answer is lost.
    pub(crate) lose_answer: u64,
    /// A proposal or message is delayed a long time.
    pub(crate) long_delay: u64,
    /// An action's completion is lost on its way back.
    pub(crate) lose_completion: u64,
}

struct Proposal {
    ticket: u64,
    request_id: u128,
    cmd: Command,
    at: u64,
    lose_answer: bool,
}

/// A Raft log applying `ClusterModel::apply` in commit order, with proposals delayed,
/// lost before commit, or committed with their answer lost. Every live node sees the
/// committed model at once (followers do not lag in this simulation).
pub(crate) struct Raft {
    pub(crate) model: ClusterModel,
    queue: Vec<Proposal>,
    answers: BTreeMap<u64, Result<Outcome, ModelError>>,
    next_ticket: u64,
    /// Every command applied, with its answer, in order.
    pub(crate) log: Vec<(Command, Result<Outcome, ModelError>)>,
}

impl Raft {
    pub(crate) fn propose(
        &mut self,
        rng: &mut Rng,
        faults: &Faults,
        now: u64,
        request_id: u128,
        cmd: Command,
    ) -> u64 {
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        if rng.chance(faults.lose_proposal) {
            return ticket;
        }
        let delay = if rng.chance(faults.long_delay) {
            rng.range(20, 120)
        } else {
            rng.range(1, 4)
        };
        let lose_answer = rng.chance(faults.lose_answer);
        self.queue.push(Proposal {
            ticket,
            request_id,
            cmd,
            at: now + delay,
            lose_answer,
        });
        ticket
    }

    /// Applies every proposal due by `now`, in commit order; true if any applied.
    fn commit_due(&mut self, now: u64) -> bool {
        let mut due: Vec<Proposal> = Vec::new();
        let mut rest = Vec::new();
        for p in self.queue.drain(..) {
            if p.at <= now {
                due.push(p)
            } else {
                rest.push(p)
            }
        }
        self.queue = rest;
        due.sort_by_key(|p| (p.at, p.ticket));
        let any = !due.is_empty();
        for p in due {
            let answer = self.model.apply(p.request_id, &p.cmd);
            self.log.push((p.cmd.clone(), answer.clone()));
            if !p.lose_answer {
                self.answers.insert(p.ticket, answer);
            }
        }
        any
    }

    pub(crate) fn answer(&mut self, ticket: u64) -> Option<Result<Outcome, ModelError>> {
        self.answers.remove(&ticket)
    }

    /// Applies a setup command at once, with no faults.
    pub(crate) fn apply_now(&mut self, cmd: Command) -> Result<Outcome, ModelError> {
        let answer = self.model.apply(0, &cmd);
        self.log.push((cmd, answer.clone()));
        answer
    }
}

/// One write in the group's order.
#[derive(Clone, Debug)]
pub(crate) struct Write {
    pub(crate) id: u64,
    pub(crate) disk: DiskId,
    pub(crate) block: u32,
}

/// What a host holds of the group's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Copy {
    /// Exactly the first `n` writes of the current order.
    Prefix(usize),
    /// Some image, not known to be a prefix of the order (stale, seeding, or diverged).
    Image(BTreeMap<(DiskId, u32), u64>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InstState {
    Running,
    Paused {
        since: u64,
    },
    Dead,
    /// Its host was lost, but the guest process goes on writing (a host cut off or
    /// stopped and woken): every write it sends carries its old epochs.
    Zombie {
        writes_left: u32,
    },
}

/// One run of a guest on one host.
#[derive(Clone, Debug)]
pub(crate) struct Instance {
    pub(crate) vm: String,
    pub(crate) inc: u64,
    pub(crate) host: NodeId,
    pub(crate) epochs: BTreeMap<DiskId, u64>,
    pub(crate) state: InstState,
    pub(crate) inflight: u32,
    pub(crate) stopped_at: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WState {
    Sent,
    Ordered(usize),
}

#[derive(Clone, Debug)]
struct Inflight {
    id: u64,
    inst: usize,
    disk: DiskId,
    block: u32,
    epoch: u64,
    deliver_at: u64,
    state: WState,
}

/// A group snapshot kept by the storage.
#[derive(Clone, Debug)]
pub(crate) struct Snap {
    pub(crate) host: NodeId,
    /// Position in the order it was taken at.
    pub(crate) pos: usize,
    pub(crate) content: BTreeMap<(DiskId, u32), u64>,
}

/// Knobs of one simulated run.
#[derive(Clone, Debug)]
pub(crate) struct Rates {
    /// Order entries a link ships per tick.
    pub(crate) link: u64,
    /// Chunks a seeding moves per tick.
    pub(crate) seed: u64,
    /// Chance per VM per tick of a new write, per mille.
    pub(crate) write: u64,
    /// Blocks per disk.
    pub(crate) blocks: u32,
    /// Ticks before the failure detector reports a dead host lost.
    pub(crate) detect: u64,
}

pub(crate) struct World {
    pub(crate) rng: Rng,
    pub(crate) faults: Faults,
    pub(crate) rates: Rates,
    pub(crate) tick: u64,
    pub(crate) raft: Raft,
    pub(crate) cg: String,
    /// Hosts whose agent and data path run.
    pub(crate) alive: BTreeMap<NodeId, bool>,
    pub(crate) died_at: BTreeMap<NodeId, u64>,
    /// Hosts the failure detector wrongly reports lost until the given tick (cut off from
    /// the detector, still running).
    pub(crate) partitioned_until: BTreeMap<NodeId, u64>,
    pub(crate) order: Vec<Write>,
    pub(crate) copies: BTreeMap<NodeId, Copy>,
    /// The host the data path sends writes to (follows the committed model).
    pub(crate) seq_host: NodeId,
    /// A hand-over holding the sequencer's writes.
    pub(crate) paused_by: Option<u64>,
    inflight: Vec<Inflight>,
    pub(crate) instances: Vec<Instance>,
    pub(crate) current: BTreeMap<String, usize>,
    /// Acknowledged writes and their positions in the order.
    pub(crate) acked: BTreeMap<u64, usize>,
    pub(crate) snapshots: BTreeMap<String, Snap>,
    link_tickets: BTreeMap<NodeId, (u64, u128)>,
    pub(crate) seeded: BTreeMap<NodeId, (u64, u64)>,
    /// Chunks a seeding copy still lacks, as of the last tick.
    pub(crate) seed_remaining: BTreeMap<NodeId, u64>,
    pub(crate) next_request: u128,
    next_write: u64,
    last_writer: BTreeMap<DiskId, u64>,
    /// A restore of `break-consistency`'s snapshot to this order position is committing:
    /// writes it discards are the strategy's stated price, not a violation.
    pub(crate) restore_to: Option<usize>,
    pub(crate) violations: Vec<String>,
    pub(crate) stale_refused: u64,
    pub(crate) lost_by_contract: u64,
    pub(crate) busy: BTreeSet<String>,
}

impl World {
    pub(crate) fn new(seed: u64, faults: Faults, rates: Rates, cg: &str) -> Self {
        World {
            rng: Rng::new(seed),
            faults,
            rates,
            tick: 0,
            raft: Raft {
                model: ClusterModel::default(),
                queue: Vec::new(),
                answers: BTreeMap::new(),
                next_ticket: 0,
                log: Vec::new(),
            },
            cg: cg.into(),
            alive: BTreeMap::new(),
            died_at: BTreeMap::new(),
            partitioned_until: BTreeMap::new(),
            order: Vec::new(),
            copies: BTreeMap::new(),
            seq_host: 0,
            paused_by: None,
            inflight: Vec::new(),
            instances: Vec::new(),
            current: BTreeMap::new(),
            acked: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            link_tickets: BTreeMap::new(),
            seeded: BTreeMap::new(),
            seed_remaining: BTreeMap::new(),
            next_request: 1 << 120,
            next_write: 0,
            last_writer: BTreeMap::new(),
            restore_to: None,
            violations: Vec::new(),
            stale_refused: 0,
            lost_by_contract: 0,
            busy: BTreeSet::new(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.tick * TICK_MS
    }

    pub(crate) fn model(&self) -> &ClusterModel {
        &self.raft.model
    }

    pub(crate) fn is_alive(&self, host: NodeId) -> bool {
        self.alive.get(&host).copied().unwrap_or(false)
    }

    /// Whether the failure detector reports `host` lost.
    pub(crate) fn detected_lost(&self, host: NodeId) -> bool {
        let dead = !self.is_alive(host)
            && self
                .died_at
                .get(&host)
                .is_some_and(|t| self.tick >= t + self.rates.detect);
        let cut = self
            .partitioned_until
            .get(&host)
            .is_some_and(|t| self.tick < *t);
        dead || cut
    }

    pub(crate) fn violate(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!("tick {}: {what}", self.tick));
        }
    }

    pub(crate) fn request_id(&mut self) -> u128 {
        self.next_request += 1;
        self.next_request
    }

    pub(crate) fn propose(&mut self, request_id: u128, cmd: Command) -> u64 {
        let now = self.tick;
        let faults = self.faults;
        self.raft
            .propose(&mut self.rng, &faults, now, request_id, cmd)
    }

    /// The content of the first `n` writes of the order.
    pub(crate) fn prefix_content(&self, n: usize) -> BTreeMap<(DiskId, u32), u64> {
        let mut out = BTreeMap::new();
        for w in self.order.iter().take(n) {
            out.insert((w.disk, w.block), w.id);
        }
        out
    }

    pub(crate) fn content(&self, copy: &Copy) -> BTreeMap<(DiskId, u32), u64> {
        match copy {
            Copy::Prefix(n) => self.prefix_content(*n),
            Copy::Image(img) => img.clone(),
        }
    }

    /// Per disk, a root of `host`'s copy.
    pub(crate) fn roots(&self, host: NodeId) -> Vec<(DiskId, [u8; 32])> {
        let content = self
            .copies
            .get(&host)
            .map(|c| self.content(c))
            .unwrap_or_default();
        self.group_disks()
            .into_iter()
            .map(|d| {
                let mut h = DefaultHasher::new();
                for ((disk, block), id) in content.range((d, 0)..=(d, u32::MAX)) {
                    (disk, block, id).hash(&mut h);
                }
                let x = h.finish().to_le_bytes();
                let mut root = [0u8; 32];
                for (i, b) in root.iter_mut().enumerate() {
                    *b = x[i % 8] ^ (i as u8);
                }
                (d, root)
            })
            .collect()
    }

    pub(crate) fn group_disks(&self) -> Vec<DiskId> {
        let model = self.model();
        model
            .cgs
            .get(&self.cg)
            .map(|g| model.cg_disks(g).iter().map(|d| d.id).collect())
            .unwrap_or_default()
    }

    pub(crate) fn max_acked_pos(&self) -> Option<usize> {
        self.acked.values().copied().max()
    }

    /// The order position `host`'s copy is a prefix up to, if it is one.
    pub(crate) fn prefix_of(&self, host: NodeId) -> Option<usize> {
        match self.copies.get(&host) {
            Some(Copy::Prefix(n)) => Some(*n),
            _ => None,
        }
    }

    // ---- one tick ----

    pub(crate) fn step(&mut self) {
        self.tick += 1;
        if self.raft.commit_due(self.tick) {
            self.follow_sequencer();
        }
        self.guests_write();
        self.deliver_writes();
        self.replicate();
        self.acknowledge();
    }

    /// Makes the data path follow the committed model's sequencer. A sequencer that takes
    /// over from a copy shorter than the order discards the tail (those writes were never
    /// acknowledged, or the invariant is broken).
    pub(crate) fn follow_sequencer(&mut self) {
        let Some(g) = self.model().cgs.get(&self.cg) else {
            return;
        };
        let new = g.sequencer;
        if new == self.seq_host {
            return;
        }
        let len = self.order.len();
        let keep = match self.copies.get(&new) {
            Some(Copy::Prefix(n)) => *n,
            _ => {
                self.violate(format!(
                    "node {new} took the order over without a copy that is a prefix of it"
                ));
                0
            }
        };
        if keep < len {
            // Copies that hold the discarded tail diverge from the new order.
            let diverged: Vec<(NodeId, usize)> = self
                .copies
                .iter()
                .filter_map(|(h, c)| match c {
                    Copy::Prefix(n) if *n > keep => Some((*h, *n)),
                    _ => None,
                })
                .collect();
            for (h, n) in diverged {
                let img = self.prefix_content(n);
                self.copies.insert(h, Copy::Image(img));
            }
            let contract = self.restore_to == Some(keep);
            let discarded: Vec<u64> = self.order[keep..].iter().map(|w| w.id).collect();
            for id in discarded {
                if self.acked.remove(&id).is_some() {
                    if contract {
                        self.lost_by_contract += 1;
                    } else {
                        self.violate(format!(
                            "acknowledged write {id} discarded when node {new} took the order over at {keep} of {len}"
                        ));
                    }
                }
            }
            self.order.truncate(keep);
        }
        self.restore_to = None;
        self.seq_host = new;
        self.copies.insert(new, Copy::Prefix(self.order.len()));
    }

    fn guests_write(&mut self) {
        let blocks = self.rates.blocks;
        for i in 0..self.instances.len() {
            let (active, host, inflight, vm) = {
                let inst = &self.instances[i];
                let active = match inst.state {
                    InstState::Running => true,
                    InstState::Zombie { writes_left } => writes_left > 0,
                    _ => false,
                };
                (active, inst.host, inst.inflight, inst.vm.clone())
            };
            let zombie = matches!(self.instances[i].state, InstState::Zombie { .. });
            if !active || inflight >= 4 || (!zombie && !self.is_alive(host)) {
                continue;
            }
            if !self.rng.chance(self.rates.write) {
                continue;
            }
            let disks: Vec<DiskId> = self.instances[i].epochs.keys().copied().collect();
            if disks.is_empty() {
                continue;
            }
            let disk = disks[self.rng.range(0, disks.len() as u64) as usize];
            let block = self.rng.range(0, blocks as u64) as u32;
            let epoch = self.instances[i].epochs.get(&disk).copied().unwrap_or(0);
            self.next_write += 1;
            let local = host == self.seq_host;
            let delay = if local { 0 } else { self.rng.range(1, 4) };
            self.inflight.push(Inflight {
                id: self.next_write,
                inst: i,
                disk,
                block,
                epoch,
                deliver_at: self.tick + delay,
                state: WState::Sent,
            });
            let inst = &mut self.instances[i];
            inst.inflight += 1;
            if let InstState::Zombie { writes_left } = &mut inst.state {
                *writes_left -= 1;
            }
            let _ = vm;
        }
    }

    fn deliver_writes(&mut self) {
        let seq = self.seq_host;
        if !self.is_alive(seq) || self.paused_by.is_some() {
            return;
        }
        let mut refused = Vec::new();
        for k in 0..self.inflight.len() {
            let w = self.inflight[k].clone();
            if w.state != WState::Sent || w.deliver_at > self.tick {
                continue;
            }
            let inst = self.instances[w.inst].clone();
            // A write from an instance whose host is down never leaves it, unless the
            // instance is a zombie whose packets still get through.
            if !self.is_alive(inst.host) && !matches!(inst.state, InstState::Zombie { .. }) {
                continue;
            }
            let model_epoch = self.model().disks.get(&w.disk).map(|d| d.epoch);
            if model_epoch != Some(w.epoch) {
                self.stale_refused += 1;
                refused.push(k);
                continue;
            }
            let last = self.last_writer.get(&w.disk).copied().unwrap_or(0);
            if inst.inc < last {
                self.violate(format!(
                    "disk {}: instance {} of VM {} wrote after instance {last} had (two writers)",
                    w.disk, inst.inc, inst.vm
                ));
            }
            self.last_writer.insert(w.disk, inst.inc.max(last));
            let pos = self.order.len();
            match self.copies.get(&seq) {
                Some(Copy::Prefix(n)) if *n == pos => {}
                other => {
                    let other = other.cloned();
                    self.violate(format!(
                        "sequencer node {seq}'s copy is {other:?}, not the whole order ({pos})"
                    ));
                }
            }
            self.order.push(Write {
                id: w.id,
                disk: w.disk,
                block: w.block,
            });
            self.copies.insert(seq, Copy::Prefix(pos + 1));
            // A synchronous copy still being seeded gets new writes as they come (DRBD
            // mirrors new writes during a resync; only the old differences are seeded).
            let seeding: Vec<NodeId> = self
                .model()
                .cgs
                .get(&self.cg)
                .map(|g| {
                    g.replicas
                        .iter()
                        .filter(|l| l.mode.is_synchronous() && l.state != LinkState::Consistent)
                        .map(|l| l.to)
                        .collect()
                })
                .unwrap_or_default();
            for to in seeding {
                if !self.is_alive(to) {
                    continue;
                }
                let mut img = match self.copies.get(&to) {
                    Some(Copy::Image(img)) => img.clone(),
                    Some(Copy::Prefix(n)) => self.prefix_content(*n),
                    None => BTreeMap::new(),
                };
                img.insert((w.disk, w.block), w.id);
                self.copies.insert(to, Copy::Image(img));
            }
            self.inflight[k].state = WState::Ordered(pos);
        }
        for k in refused.into_iter().rev() {
            let w = self.inflight.remove(k);
            self.instances[w.inst].inflight = self.instances[w.inst].inflight.saturating_sub(1);
        }
    }

    fn replicate(&mut self) {
        let seq = self.seq_host;
        if !self.is_alive(seq) {
            return;
        }
        let Some(g) = self.model().cgs.get(&self.cg).cloned() else {
            return;
        };
        let len = self.order.len();
        for link in &g.replicas {
            if !self.is_alive(link.to) {
                continue;
            }
            let copy = self.copies.get(&link.to).cloned();
            match (link.state, copy) {
                (LinkState::Consistent, Some(Copy::Prefix(n))) if n <= len => {
                    let next = (n as u64 + self.rates.link).min(len as u64) as usize;
                    self.copies.insert(link.to, Copy::Prefix(next));
                }
                (state, copy) => {
                    // Seeding: send only the chunks that differ from the sequencer's.
                    let mut img = copy.map(|c| self.content(&c)).unwrap_or_default();
                    let want = self.prefix_content(len);
                    let mut diff: Vec<(DiskId, u32)> = want
                        .iter()
                        .filter(|(k, v)| img.get(*k) != Some(*v))
                        .map(|(k, _)| *k)
                        .collect();
                    diff.extend(img.keys().filter(|k| !want.contains_key(*k)).copied());
                    diff.sort();
                    diff.dedup();
                    let entry = self.seeded.entry(link.to).or_insert((0, 0));
                    if entry.0 == 0 {
                        entry.0 = diff.len() as u64 * 4096;
                    }
                    self.seed_remaining.insert(link.to, diff.len() as u64);
                    let n = (self.rates.seed as usize).min(diff.len());
                    for k in diff.iter().take(n) {
                        match want.get(k) {
                            Some(v) => img.insert(*k, *v),
                            None => img.remove(k),
                        };
                    }
                    entry.1 += n as u64 * 4096;
                    if n == diff.len() {
                        self.copies.insert(link.to, Copy::Prefix(len));
                        if state != LinkState::Consistent {
                            self.mark_link(link.to, LinkState::Consistent, state);
                        }
                    } else {
                        self.copies.insert(link.to, Copy::Image(img));
                    }
                }
            }
        }
    }

    /// The sequencer's agent records a link's new state (once at a time per link).
    fn mark_link(&mut self, to: NodeId, state: LinkState, expect: LinkState) {
        if let Some((ticket, rid)) = self.link_tickets.get(&to).copied() {
            match self.raft.answer(ticket) {
                Some(_) => {
                    self.link_tickets.remove(&to);
                }
                None => {
                    // Retry (same request id) until it is answered.
                    let cmd = Command::SetLinkState {
                        cg: self.cg.clone(),
                        to,
                        state,
                        expect: Some(expect),
                    };
                    if self.tick % 50 == 0 {
                        let t = self.propose(rid, cmd);
                        self.link_tickets.insert(to, (t, rid));
                    }
                }
            }
            return;
        }
        let rid = self.request_id();
        let cmd = Command::SetLinkState {
            cg: self.cg.clone(),
            to,
            state,
            expect: Some(expect),
        };
        let t = self.propose(rid, cmd);
        self.link_tickets.insert(to, (t, rid));
    }

    fn acknowledge(&mut self) {
        let seq = self.seq_host;
        let Some(g) = self.model().cgs.get(&self.cg).cloned() else {
            return;
        };
        let len = self.order.len();
        let mut done = Vec::new();
        let mut fence = BTreeSet::new();
        for (k, w) in self.inflight.iter().enumerate() {
            let WState::Ordered(pos) = w.state else {
                continue;
            };
            let inst = &self.instances[w.inst];
            if pos >= len || self.order.get(pos).map(|o| o.id) != Some(w.id) {
                // Discarded by a take-over: never acknowledged.
                done.push((k, false));
                continue;
            }
            let receiver_gone = match inst.state {
                InstState::Dead => true,
                InstState::Zombie { .. } => false,
                _ => !self.is_alive(inst.host),
            };
            if receiver_gone {
                done.push((k, false));
                continue;
            }
            if !self.is_alive(seq) {
                continue;
            }
            let mut ok = true;
            for l in &g.replicas {
                if !(l.mode.is_synchronous() && l.state == LinkState::Consistent) {
                    continue;
                }
                match self.copies.get(&l.to) {
                    Some(Copy::Prefix(n)) if *n > pos => {}
                    _ => {
                        ok = false;
                        if !self.is_alive(l.to) {
                            fence.insert(l.to);
                        }
                    }
                }
            }
            if ok {
                done.push((k, true));
            }
        }
        // DRBD's fencing: a synchronous replica that is gone is marked outdated through
        // Raft before any write it lacks is acknowledged.
        for to in fence {
            self.mark_link(to, LinkState::Outdated, LinkState::Consistent);
        }
        for (k, acked) in done.into_iter().rev() {
            let w = self.inflight.remove(k);
            if acked {
                if let WState::Ordered(pos) = w.state {
                    self.acked.insert(w.id, pos);
                }
            }
            let inst = &mut self.instances[w.inst];
            inst.inflight = inst.inflight.saturating_sub(1);
        }
        // Writes of dead instances that were never sent are dropped.
        let dead: Vec<usize> = self
            .inflight
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                w.state == WState::Sent && self.instances[w.inst].state == InstState::Dead
            })
            .map(|(k, _)| k)
            .collect();
        for k in dead.into_iter().rev() {
            let w = self.inflight.remove(k);
            let inst = &mut self.instances[w.inst];
            inst.inflight = inst.inflight.saturating_sub(1);
        }
    }

    // ---- faults and guests ----

    /// Host `host` dies: its agent, data path and guests stop (guests may linger as
    /// zombies that still reach the sequencer with their old epochs).
    pub(crate) fn kill_host(&mut self, host: NodeId, zombies: bool) {
        if !self.is_alive(host) {
            return;
        }
        self.alive.insert(host, false);
        self.died_at.insert(host, self.tick);
        for inst in self.instances.iter_mut().filter(|i| i.host == host) {
            match inst.state {
                InstState::Running | InstState::Paused { .. } => {
                    inst.stopped_at = self.tick;
                    inst.state = if zombies {
                        InstState::Zombie { writes_left: 5 }
                    } else {
                        InstState::Dead
                    };
                }
                _ => {}
            }
        }
    }

    /// Writes `n` acknowledged writes of the group's history before the migration.
    pub(crate) fn prefill(&mut self, n: usize) {
        let disks = self.group_disks();
        if disks.is_empty() {
            return;
        }
        for _ in 0..n {
            self.next_write += 1;
            let disk = disks[self.rng.range(0, disks.len() as u64) as usize];
            let block = self.rng.range(0, self.rates.blocks as u64) as u32;
            self.acked.insert(self.next_write, self.order.len());
            self.order.push(Write {
                id: self.next_write,
                disk,
                block,
            });
        }
    }

    /// Starts the first instance of every VM of the group where it runs.
    pub(crate) fn start_guests(&mut self) {
        let model = self.model().clone();
        let Some(g) = model.cgs.get(&self.cg) else {
            return;
        };
        for name in &g.vms {
            if let Some(vm) = model.vms.get(name) {
                self.spawn(name, vm.host);
            }
        }
    }

    pub(crate) fn spawn(&mut self, vm: &str, host: NodeId) -> usize {
        let model = self.model();
        let epochs: BTreeMap<DiskId, u64> = model
            .vms
            .get(vm)
            .map(|v| model.vm_disks(v).iter().map(|d| (d.id, d.epoch)).collect())
            .unwrap_or_default();
        let inc = self
            .current
            .get(vm)
            .map_or(1, |i| self.instances[*i].inc + 1);
        self.instances.push(Instance {
            vm: vm.into(),
            inc,
            host,
            epochs,
            state: InstState::Running,
            inflight: 0,
            stopped_at: self.tick,
        });
        let idx = self.instances.len() - 1;
        self.current.insert(vm.into(), idx);
        idx
    }

    /// The migration being simulated (there is one).
    pub(crate) fn migration(&self) -> Option<&convoy_model::Migration> {
        self.model().migrations.values().next()
    }

    /// Whether the migration is decided.
    pub(crate) fn decided(&self) -> bool {
        self.migration().is_some_and(|m| m.decision.is_some())
    }

    pub(crate) fn phase(&self) -> Option<Phase> {
        self.migration().map(|m| m.phase)
    }
}
