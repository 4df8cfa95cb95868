//! The simulated storage provider and hypervisor driver: the crate's two traits over the
//! simulated world. Their operations are futures that the simulated shell polls once per
//! tick, so faults land between their steps (a hand-over pauses writes, waits, commits
//! through the simulated Raft, and resumes, possibly ticks apart).

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use convoy_model::{Command, DiskId, DiskRoots, LinkState, NodeId, SequencerBasis};

use super::world::{Copy, InstState, TICK_MS, World};
use crate::{
    DeltaReport, Guard, HandOverRequest, HypervisorDriver, HypervisorError, LinkStatus,
    RestoreRequest, SequencerReport, StorageError, StorageProvider, TakeOverRequest, VmState,
};

pub(crate) type Shared = Arc<Mutex<World>>;

pub(crate) fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// A future that runs `f` against the world on every poll.
pub(crate) struct Poller<T, F> {
    world: Shared,
    f: F,
    _out: PhantomData<fn() -> T>,
}

impl<T, F: FnMut(&mut World) -> Poll<T> + Unpin> Future for Poller<T, F> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let mut w = lock(&this.world);
        (this.f)(&mut w)
    }
}

fn poller<T, F: FnMut(&mut World) -> Poll<T> + Unpin>(world: &Shared, f: F) -> Poller<T, F> {
    Poller {
        world: world.clone(),
        f,
        _out: PhantomData,
    }
}

/// Polls a future that is ready at once.
pub(crate) fn now<T>(fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(t) => Some(t),
        Poll::Pending => None,
    }
}

const SEQUENCER_OP: &str = "sequencer change";

/// Commits `cmd` through the simulated Raft, re-proposing the same request until a definite
/// answer comes (the trait's "resolved, never guessed" obligation).
struct Committer {
    request_id: u128,
    cmd: Command,
    ticket: u64,
    sent_at: u64,
}

impl Committer {
    fn start(w: &mut World, cmd: Command) -> Self {
        let request_id = w.request_id();
        let ticket = w.propose(request_id, cmd.clone());
        Committer {
            request_id,
            cmd,
            ticket,
            sent_at: w.tick,
        }
    }

    fn poll(&mut self, w: &mut World) -> Poll<Result<(), StorageError>> {
        match w.raft.answer(self.ticket) {
            Some(Ok(_)) => Poll::Ready(Ok(())),
            Some(Err(e)) => Poll::Ready(Err(StorageError::Refused(e))),
            None => {
                if w.tick >= self.sent_at + 60 {
                    self.ticket = w.propose(self.request_id, self.cmd.clone());
                    self.sent_at = w.tick;
                }
                Poll::Pending
            }
        }
    }
}

/// Whether the committed model still shows the guard's migration undecided, under its
/// claim, in its phase.
fn guard_holds(w: &World, guard: &Guard) -> bool {
    w.model().migrations.get(&guard.migration).is_some_and(|m| {
        m.decision.is_none() && m.claim.number == guard.claim && m.phase == guard.phase
    })
}

/// The simulated storage provider.
#[derive(Clone)]
pub(crate) struct SimStorage(pub(crate) Shared);

/// The simulated hypervisor driver.
#[derive(Clone)]
pub(crate) struct SimHypervisor(pub(crate) Shared);

fn disk_roots(w: &World, a: NodeId, b: NodeId) -> Vec<DiskRoots> {
    let ra: BTreeMap<DiskId, [u8; 32]> = w.roots(a).into_iter().collect();
    w.roots(b)
        .into_iter()
        .map(|(disk, root)| DiskRoots {
            disk,
            source: ra.get(&disk).copied(),
            destination: root,
        })
        .collect()
}

enum HandOverStage {
    Start,
    Wait {
        since: u64,
    },
    Commit {
        c: Box<Committer>,
        since: u64,
        roots: Vec<DiskRoots>,
        continue_at: u64,
    },
}

impl StorageProvider for SimStorage {
    fn link_status(
        &self,
        _cg: &str,
    ) -> impl Future<Output = Result<BTreeMap<NodeId, LinkStatus>, StorageError>> + Send {
        poller(&self.0, |w: &mut World| {
            let seq = w.seq_host;
            if !w.is_alive(seq) {
                return Poll::Ready(Err(StorageError::Unreachable(seq)));
            }
            let Some(g) = w.model().cgs.get(&w.cg).cloned() else {
                return Poll::Ready(Ok(BTreeMap::new()));
            };
            let len = w.order.len() as u64;
            let max_acked = w.max_acked_pos();
            let mut out = BTreeMap::new();
            for l in &g.replicas {
                // A seeding copy reports the chunks it still lacks as its lag.
                let acked = w.prefix_of(l.to).map_or_else(
                    || len.saturating_sub(w.seed_remaining.get(&l.to).copied().unwrap_or(len)),
                    |n| n as u64,
                );
                let holds_acked = max_acked.is_none_or(|p| acked > p as u64);
                let (needed, moved) = w.seeded.get(&l.to).copied().unwrap_or((0, 0));
                out.insert(
                    l.to,
                    LinkStatus {
                        acked_seq: acked,
                        last_seq: len,
                        up_to_date: l.mode.is_synchronous()
                            && l.state == LinkState::Consistent
                            && holds_acked,
                        bytes_needed: needed,
                        bytes_moved: moved,
                    },
                );
            }
            Poll::Ready(Ok(out))
        })
    }

    fn compare_delta(
        &self,
        _cg: &str,
        from: NodeId,
        to: NodeId,
    ) -> impl Future<Output = Result<DeltaReport, StorageError>> + Send {
        let mut done_at: Option<(u64, u64, u64)> = None;
        poller(&self.0, move |w: &mut World| {
            for h in [from, to] {
                if !w.is_alive(h) {
                    return Poll::Ready(Err(StorageError::Unreachable(h)));
                }
            }
            let Some((at, compared, sent)) = done_at else {
                if w.seq_host != from {
                    return Poll::Ready(Err(StorageError::Precondition(format!(
                        "node {from} does not order the group"
                    ))));
                }
                let src = w.prefix_content(w.order.len());
                let img = w.copies.get(&to).map(|c| w.content(c)).unwrap_or_default();
                let differ = src.iter().filter(|(k, v)| img.get(*k) != Some(*v)).count() as u64;
                let blocks = w.group_disks().len() as u64 * w.rates.blocks as u64;
                let ticks = differ.div_ceil(w.rates.seed.max(1)) + 1;
                done_at = Some((w.tick + ticks, blocks * 4096, differ * 4096));
                return Poll::Pending;
            };
            if w.tick < at {
                return Poll::Pending;
            }
            // The pass ends with the destination's image equal to the source's as it was
            // then: no order, no history (writes since are what seeding still sends).
            let src = w.prefix_content(w.order.len());
            w.copies.insert(to, Copy::Image(src));
            Poll::Ready(Ok(DeltaReport {
                bytes_compared: compared,
                bytes_sent: sent,
            }))
        })
    }

    fn snapshot(
        &self,
        _cg: &str,
        host: NodeId,
        name: &str,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        let name = name.to_string();
        poller(&self.0, move |w: &mut World| {
            if !w.is_alive(host) {
                return Poll::Ready(Err(StorageError::Unreachable(host)));
            }
            let seq = w.model().cgs.get(&w.cg).map(|g| g.sequencer);
            if seq != Some(host) || w.seq_host != host {
                return Poll::Ready(Err(StorageError::Precondition(format!(
                    "node {host} does not order the group"
                ))));
            }
            if w.model()
                .cgs
                .get(&w.cg)
                .is_some_and(|g| g.snapshots.iter().any(|s| s.name == name))
            {
                // Recorded already: it must never change again.
                return Poll::Ready(Ok(()));
            }
            let pos = w.order.len();
            let content = w.prefix_content(pos);
            w.snapshots
                .insert(name.clone(), super::world::Snap { host, pos, content });
            Poll::Ready(Ok(()))
        })
    }

    fn hand_over(
        &self,
        req: &HandOverRequest,
    ) -> impl Future<Output = Result<SequencerReport, StorageError>> + Send {
        let req = req.clone();
        let mut stage = HandOverStage::Start;
        poller(&self.0, move |w: &mut World| {
            let fail = |w: &mut World, e: StorageError| {
                w.paused_by = None;
                w.busy.remove(SEQUENCER_OP);
                Poll::Ready(Err(e))
            };
            match &mut stage {
                HandOverStage::Start => {
                    let Some(g) = w.model().cgs.get(&req.cg).cloned() else {
                        return Poll::Ready(Err(StorageError::Precondition("no group".into())));
                    };
                    if g.sequencer == req.to {
                        return Poll::Ready(Ok(SequencerReport {
                            continue_at: g.seq_start,
                            roots: Vec::new(),
                            pause_ms: 0,
                        }));
                    }
                    if g.sequencer != req.from || w.seq_host != req.from {
                        return Poll::Ready(Err(StorageError::Precondition(format!(
                            "node {} does not order the group",
                            req.from
                        ))));
                    }
                    for h in [req.from, req.to] {
                        if !w.is_alive(h) {
                            return Poll::Ready(Err(StorageError::Unreachable(h)));
                        }
                    }
                    if !g
                        .link(req.to)
                        .is_some_and(|l| l.state == LinkState::Consistent)
                    {
                        return Poll::Ready(Err(StorageError::Precondition(format!(
                            "node {}'s copy is not consistent",
                            req.to
                        ))));
                    }
                    if !w.busy.insert(SEQUENCER_OP.into()) {
                        return Poll::Ready(Err(StorageError::Busy(SEQUENCER_OP.into())));
                    }
                    w.paused_by = Some(w.tick);
                    stage = HandOverStage::Wait { since: w.tick };
                    Poll::Pending
                }
                HandOverStage::Wait { since } => {
                    let since = *since;
                    for h in [req.from, req.to] {
                        if !w.is_alive(h) {
                            return fail(w, StorageError::Unreachable(h));
                        }
                    }
                    let len = w.order.len();
                    if w.prefix_of(req.to) != Some(len) {
                        if w.tick > since + 300 {
                            let lag = len.saturating_sub(w.prefix_of(req.to).unwrap_or(0));
                            return fail(
                                w,
                                StorageError::NotCaughtUp {
                                    host: req.to,
                                    lag: lag as u64,
                                },
                            );
                        }
                        return Poll::Pending;
                    }
                    let roots = disk_roots(w, req.from, req.to);
                    if let Some(r) = roots.iter().find(|r| !r.matches()) {
                        return fail(w, StorageError::CopiesDiffer { disk: r.disk });
                    }
                    let continue_at = len as u64 + 1;
                    let cmd = req.guard.sequencer_command(
                        req.to,
                        continue_at,
                        SequencerBasis::HandOver {
                            roots: roots.clone(),
                            old_link_mode: req.old_link_mode,
                        },
                    );
                    let c = Box::new(Committer::start(w, cmd));
                    stage = HandOverStage::Commit {
                        c,
                        since,
                        roots,
                        continue_at,
                    };
                    Poll::Pending
                }
                HandOverStage::Commit {
                    c,
                    since,
                    roots,
                    continue_at,
                } => match c.poll(w) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => fail(w, e),
                    Poll::Ready(Ok(())) => {
                        w.follow_sequencer();
                        w.paused_by = None;
                        w.busy.remove(SEQUENCER_OP);
                        Poll::Ready(Ok(SequencerReport {
                            continue_at: *continue_at,
                            roots: std::mem::take(roots),
                            pause_ms: (w.tick - *since) * TICK_MS,
                        }))
                    }
                },
            }
        })
    }

    fn take_over(
        &self,
        req: &TakeOverRequest,
    ) -> impl Future<Output = Result<SequencerReport, StorageError>> + Send {
        let req = req.clone();
        let mut commit: Option<(Committer, u64)> = None;
        poller(&self.0, move |w: &mut World| {
            if let Some((c, continue_at)) = &mut commit {
                let continue_at = *continue_at;
                return match c.poll(w) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(r) => {
                        w.busy.remove(SEQUENCER_OP);
                        if r.is_ok() {
                            w.follow_sequencer();
                        }
                        Poll::Ready(r.map(|()| SequencerReport {
                            continue_at,
                            roots: Vec::new(),
                            pause_ms: 0,
                        }))
                    }
                };
            }
            let Some(g) = w.model().cgs.get(&req.cg).cloned() else {
                return Poll::Ready(Err(StorageError::Precondition("no group".into())));
            };
            if g.sequencer == req.to {
                return Poll::Ready(Ok(SequencerReport {
                    continue_at: g.seq_start,
                    roots: Vec::new(),
                    pause_ms: 0,
                }));
            }
            if g.sequencer != req.lost {
                return Poll::Ready(Err(StorageError::Precondition(format!(
                    "node {} does not order the group",
                    req.lost
                ))));
            }
            if !w.is_alive(req.to) {
                return Poll::Ready(Err(StorageError::Unreachable(req.to)));
            }
            let Some(applied) = w.prefix_of(req.to) else {
                return Poll::Ready(Err(StorageError::Precondition(format!(
                    "node {}'s copy is not a prefix of the order",
                    req.to
                ))));
            };
            if !w.busy.insert(SEQUENCER_OP.into()) {
                return Poll::Ready(Err(StorageError::Busy(SEQUENCER_OP.into())));
            }
            let continue_at = applied as u64 + 1;
            let cmd = req
                .guard
                .sequencer_command(req.to, continue_at, SequencerBasis::TakeOver);
            commit = Some((Committer::start(w, cmd), continue_at));
            Poll::Pending
        })
    }

    fn restore_snapshot(
        &self,
        req: &RestoreRequest,
    ) -> impl Future<Output = Result<SequencerReport, StorageError>> + Send {
        let req = req.clone();
        let mut commit: Option<(Committer, u64)> = None;
        poller(&self.0, move |w: &mut World| {
            if let Some((c, continue_at)) = &mut commit {
                let continue_at = *continue_at;
                return match c.poll(w) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(r) => {
                        w.busy.remove(SEQUENCER_OP);
                        if r.is_ok() {
                            w.follow_sequencer();
                        }
                        w.restore_to = None;
                        Poll::Ready(r.map(|()| SequencerReport {
                            continue_at,
                            roots: Vec::new(),
                            pause_ms: 0,
                        }))
                    }
                };
            }
            let Some(g) = w.model().cgs.get(&req.cg).cloned() else {
                return Poll::Ready(Err(StorageError::Precondition("no group".into())));
            };
            if g.sequencer == req.host {
                return Poll::Ready(Ok(SequencerReport {
                    continue_at: g.seq_start,
                    roots: Vec::new(),
                    pause_ms: 0,
                }));
            }
            if !w.is_alive(req.host) {
                return Poll::Ready(Err(StorageError::Unreachable(req.host)));
            }
            let Some(snap) = w.snapshots.get(&req.snapshot).cloned() else {
                return Poll::Ready(Err(StorageError::Precondition(format!(
                    "no snapshot {} on node {}",
                    req.snapshot, req.host
                ))));
            };
            if snap.host != req.host {
                return Poll::Ready(Err(StorageError::Precondition(format!(
                    "snapshot {} is on node {}",
                    req.snapshot, snap.host
                ))));
            }
            if !w.busy.insert(SEQUENCER_OP.into()) {
                return Poll::Ready(Err(StorageError::Busy(SEQUENCER_OP.into())));
            }
            let rolled = if w.prefix_content(snap.pos) == snap.content && snap.pos <= w.order.len()
            {
                Copy::Prefix(snap.pos)
            } else {
                Copy::Image(snap.content.clone())
            };
            w.copies.insert(req.host, rolled);
            w.restore_to = Some(snap.pos);
            let continue_at = snap.pos as u64 + 1;
            let cmd = req.guard.sequencer_command(
                req.host,
                continue_at,
                SequencerBasis::Snapshot {
                    name: req.snapshot.clone(),
                },
            );
            commit = Some((Committer::start(w, cmd), continue_at));
            Poll::Pending
        })
    }

    fn roots(
        &self,
        _cg: &str,
        host: NodeId,
    ) -> impl Future<Output = Result<Vec<(DiskId, [u8; 32])>, StorageError>> + Send {
        poller(&self.0, move |w: &mut World| {
            if !w.is_alive(host) {
                return Poll::Ready(Err(StorageError::Unreachable(host)));
            }
            Poll::Ready(Ok(w.roots(host)))
        })
    }
}

impl HypervisorDriver for SimHypervisor {
    fn pause_and_drain(
        &self,
        vm: &str,
        host: NodeId,
        guard: &Guard,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send {
        let vm = vm.to_string();
        let guard = *guard;
        let mut since: Option<u64> = None;
        poller(&self.0, move |w: &mut World| {
            if !w.is_alive(host) {
                return Poll::Ready(Err(HypervisorError::Unreachable(host)));
            }
            if since.is_none() && !guard_holds(w, &guard) {
                return Poll::Ready(Err(HypervisorError::Stale(vm.clone())));
            }
            let Some(&i) = w.current.get(&vm) else {
                return Poll::Ready(Ok(()));
            };
            let tick = w.tick;
            let inst = &mut w.instances[i];
            if inst.host != host {
                return Poll::Ready(Ok(()));
            }
            match (inst.state, since) {
                (InstState::Running, None) => inst.state = InstState::Paused { since: tick },
                (InstState::Paused { .. }, _) => {}
                // Resumed by someone else while draining: the pause is over, and must
                // not be taken again behind their back.
                (InstState::Running, Some(_)) => return Poll::Ready(Ok(())),
                _ => return Poll::Ready(Ok(())),
            }
            let started = *since.get_or_insert(tick);
            if inst.inflight == 0 {
                Poll::Ready(Ok(()))
            } else if tick > started + 300 {
                Poll::Ready(Err(HypervisorError::DrainTimeout(vm.clone())))
            } else {
                Poll::Pending
            }
        })
    }

    fn resume(
        &self,
        vm: &str,
        host: NodeId,
        guard: &Guard,
    ) -> impl Future<Output = Result<Option<u64>, HypervisorError>> + Send {
        let vm = vm.to_string();
        let guard = *guard;
        poller(&self.0, move |w: &mut World| {
            if !w.is_alive(host) {
                return Poll::Ready(Err(HypervisorError::Unreachable(host)));
            }
            if !guard_holds(w, &guard) {
                return Poll::Ready(Err(HypervisorError::Stale(vm.clone())));
            }
            if w.model().vms.get(&vm).map(|v| v.host) != Some(host) {
                return Poll::Ready(Err(HypervisorError::NotThere {
                    vm: vm.clone(),
                    host,
                }));
            }
            let tick = w.tick;
            let cur = w.current.get(&vm).copied();
            if let Some(i) = cur {
                let inst = w.instances[i].clone();
                if inst.host == host {
                    match inst.state {
                        InstState::Running => return Poll::Ready(Ok(None)),
                        InstState::Paused { since } => {
                            w.instances[i].state = InstState::Running;
                            return Poll::Ready(Ok(Some((tick - since) * TICK_MS)));
                        }
                        _ => {}
                    }
                }
            }
            let stun_from = match cur.map(|i| w.instances[i].clone()) {
                Some(old) => {
                    let from = match old.state {
                        InstState::Paused { since } => since,
                        _ => old.stopped_at,
                    };
                    if w.is_alive(old.host) {
                        // An instance left on a live host (its agent was cut off when the
                        // VM was moved away) is stopped; whatever it still sent carries
                        // the old epochs and is refused.
                        if let Some(i) = cur {
                            w.instances[i].state = InstState::Dead;
                            w.instances[i].stopped_at = tick;
                        }
                    }
                    from
                }
                None => tick,
            };
            w.spawn(&vm, host);
            Poll::Ready(Ok(Some((tick - stun_from.min(tick)) * TICK_MS)))
        })
    }

    fn state(&self, vm: &str) -> impl Future<Output = VmState> + Send {
        let vm = vm.to_string();
        poller(&self.0, move |w: &mut World| {
            let Some(&i) = w.current.get(&vm) else {
                return Poll::Ready(VmState::Unknown);
            };
            let inst = &w.instances[i];
            if !w.is_alive(inst.host) {
                return Poll::Ready(VmState::Unknown);
            }
            Poll::Ready(match inst.state {
                InstState::Running => VmState::Running(inst.host),
                InstState::Paused { .. } => VmState::Paused(inst.host),
                _ => VmState::Unknown,
            })
        })
    }
}
