//! A sequencer back from a crash takes its synchronous replica's data first.
//!
//! Under `sync` (and `active-active-sync`) a write is acknowledged once the replica holds
//! it durably, while the sequencer's own copy holds it durably only after a FLUSH. After a
//! power cut the sequencer's copy may therefore lack acknowledged writes that its
//! `consistent` synchronous replica holds. Were the sequencer to take writes at once, its
//! activity-log resync would copy its older chunks over the replica's and lose them from
//! both copies (DRBD's primary behaves so). Instead, before this host opens the sequencer
//! of a group whose images it reopened after an unclean stop, it pulls every chunk that
//! differs from such a replica (a compare-delta session; hashes first, so only differing
//! chunks move). The exports of the group wait meanwhile, reads included.
//!
//! The decision is made on a linearizable read of the model: a local model that lags
//! could still call `consistent` a replica that Raft has since marked `outdated`. If no
//! replica answers within [`DataConfig::crash_pull_wait`](super::DataConfig), the
//! sequencer goes on with its own copy and says so (an error in the log and
//! `convoy_crash_pulls_total{outcome="gave_up"}`): writes no FLUSH covered may then be
//! lost, as without this step. An operator who knows the replica's host stays down ends
//! the wait at once with `convoy cg set-mode GROUP async`: every attempt re-reads the
//! model, and the next one finds no synchronous replica to take data from.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use convoy_raft::model::{Cg, DiskId, DomainId, HostPlan, LinkState, NodeId, SequencerPlan};

use super::{DataPlane, lock};

/// Where a group's settling after a crash stands, in this process.
#[derive(Clone, Debug)]
enum Settling {
    /// The pull task runs.
    Running,
    /// Done: the sequencer may open.
    Done,
}

/// What this host settled since it started.
#[derive(Default)]
pub(crate) struct Settlement {
    groups: std::sync::Mutex<HashMap<DomainId, Settling>>,
    /// Disks whose copy was settled (pulled, or found to need nothing): never again in
    /// this process, whose own writes since are the newest.
    disks: std::sync::Mutex<HashSet<DiskId>>,
}

/// The replica a sequencer back from a crash takes data from: one whose mode promises
/// every acknowledged write (synchronous) and that Raft still calls `consistent`. `None`
/// when `here` is not the group's sequencer or no replica promises that.
pub(crate) fn crash_pull_source(cg: &Cg, here: NodeId) -> Option<NodeId> {
    if cg.sequencer != here {
        return None;
    }
    cg.replicas
        .iter()
        .find(|l| l.mode.is_synchronous() && l.state == LinkState::Consistent)
        .map(|l| l.to)
}

/// What one attempt found.
enum Attempt {
    /// Every unsettled disk now equals the replica's copy.
    Pulled {
        from: NodeId,
        chunks: u64,
        bytes: u64,
    },
    /// Nothing to take (no such replica, or not this host's group any more).
    Nothing(&'static str),
}

impl DataPlane {
    /// Copies this host keeps as a replica need no settling: their sequencer resyncs them.
    /// Noted so that a host that becomes a group's sequencer later (a hand-over) does not
    /// take its former copy's unclean start for its own crash.
    pub(crate) fn settle_replicas(&self, plan: &HostPlan) {
        let mut settled = lock(&self.settlement.disks);
        for r in plan.replicas.values() {
            settled.extend(r.disks.iter().map(|d| d.id));
        }
    }

    /// Whether the sequencer of `sp` may open: yes when none of its disks was reopened
    /// after an unclean stop, or their copies are settled; not while a pull from the
    /// group's synchronous replica runs (it starts one the first time; the reconcile it
    /// asks for when done opens the sequencer). Blocking.
    pub(crate) fn settle_crash(self: &Arc<Self>, sp: &SequencerPlan) -> anyhow::Result<bool> {
        let DomainId::Cg(cg_id) = sp.domain else {
            return Ok(true);
        };
        let mut unsettled = Vec::new();
        {
            let settled = lock(&self.settlement.disks);
            for d in sp.disks.iter().filter(|d| !settled.contains(&d.id)) {
                if !self.images.open(d.id, d.size)?.recovery().clean {
                    unsettled.push(d.id);
                }
            }
        }
        let mut groups = lock(&self.settlement.groups);
        if unsettled.is_empty() {
            groups.remove(&sp.domain);
            return Ok(true);
        }
        // Only a synchronous replica can hold acknowledged writes this copy lacks. Whether
        // it is still `consistent` is decided on a linearizable read (this model may lag);
        // a group without one goes on at once.
        if !sp.links.iter().any(|l| l.mode.is_synchronous()) {
            lock(&self.settlement.disks).extend(unsettled);
            groups.remove(&sp.domain);
            return Ok(true);
        }
        match groups.get(&sp.domain) {
            Some(Settling::Done) => {
                lock(&self.settlement.disks).extend(unsettled);
                groups.remove(&sp.domain);
                Ok(true)
            }
            Some(Settling::Running) => Ok(false),
            None => {
                tracing::info!(group = %sp.name, "back from an unclean stop: taking what the synchronous replica holds before taking writes");
                groups.insert(sp.domain, Settling::Running);
                tokio::spawn(settle(
                    Arc::downgrade(self),
                    sp.domain,
                    cg_id,
                    sp.name.clone(),
                    unsettled,
                ));
                Ok(false)
            }
        }
    }

    /// One try: decide on a linearizable model, then pull each disk.
    async fn settle_once(&self, cg_id: u64, disks: &[DiskId]) -> anyhow::Result<Attempt> {
        let model = self
            .writer
            .current_model()
            .await
            .map_err(|e| anyhow::anyhow!("no linearizable read of the model: {e}"))?;
        let Some(cg) = model.cg_by_id(cg_id) else {
            return Ok(Attempt::Nothing("the group is gone"));
        };
        let Some(from) = crash_pull_source(cg, self.node) else {
            return Ok(Attempt::Nothing(
                "no consistent synchronous replica (or not this host's group any more)",
            ));
        };
        let addr = self
            .peer_addr(from)
            .with_context(|| format!("no address of node {from}"))?;
        let (mut chunks, mut bytes) = (0, 0);
        for disk in model.cg_disks(cg).iter().filter(|d| disks.contains(&d.id)) {
            let image = self
                .images
                .get(disk.id)
                .with_context(|| format!("disk {} is not open", disk.id))?;
            let session = convoy_delta::Session {
                cg: cg_id,
                disk: disk.id,
                epoch: cg.sequencer_epoch,
            };
            let stats = convoy_delta::pull(
                &self.endpoint,
                from,
                addr,
                session,
                convoy_delta::Mode::CompareDelta,
                image,
                &convoy_delta::DeltaConfig::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("disk {} from node {from}: {e}", disk.id))?;
            chunks += stats.chunks_sent;
            bytes += stats.data_bytes_sent;
        }
        Ok(Attempt::Pulled {
            from,
            chunks,
            bytes,
        })
    }
}

/// Pulls until done or [`DataConfig::crash_pull_wait`](super::DataConfig) has passed,
/// then lets the sequencer open.
async fn settle(
    plane: Weak<DataPlane>,
    domain: DomainId,
    cg_id: u64,
    name: String,
    disks: Vec<DiskId>,
) {
    let started = Instant::now();
    let mut last_said = None::<Instant>;
    loop {
        let Some(p) = plane.upgrade() else {
            return;
        };
        let outcome = match p.settle_once(cg_id, &disks).await {
            Ok(Attempt::Pulled {
                from,
                chunks,
                bytes,
            }) => {
                tracing::info!(group = %name, from, chunks, bytes, seconds = started.elapsed().as_secs_f64(), "back from an unclean stop: took what the synchronous replica held");
                "pulled"
            }
            Ok(Attempt::Nothing(why)) => {
                tracing::info!(group = %name, why, "back from an unclean stop: nothing to take from a replica");
                "nothing"
            }
            Err(e) if started.elapsed() >= p.cfg.crash_pull_wait => {
                tracing::error!(group = %name, error = format!("{e:#}"), waited_secs = started.elapsed().as_secs(), "back from an unclean stop: no synchronous replica answered; going on with this host's copy, which may lack acknowledged writes no FLUSH covered (key `replication.crash_pull_wait_secs`)");
                "gave_up"
            }
            Err(e) => {
                if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    let left = p.cfg.crash_pull_wait.saturating_sub(started.elapsed());
                    tracing::warn!(group = %name, error = format!("{e:#}"), left_secs = left.as_secs(), "back from an unclean stop: waiting for the synchronous replica's data before taking writes; to go on now with this host's copy, which may lack acknowledged writes no FLUSH covered: convoy cg set-mode {name} async");
                    last_said = Some(Instant::now());
                }
                drop(p);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        metrics::counter!("convoy_crash_pulls_total", "outcome" => outcome).increment(1);
        lock(&p.settlement.groups).insert(domain, Settling::Done);
        p.reconcile_soon.notify_one();
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_raft::model::{ReplicationLink, ReplicationMode};

    fn cg(links: &[(NodeId, ReplicationMode, LinkState)]) -> Cg {
        Cg {
            id: 7,
            name: "g".into(),
            vms: vec![],
            sequencer: 1,
            sequencer_epoch: 3,
            seq_start: 0,
            replicas: links
                .iter()
                .map(|&(to, mode, state)| ReplicationLink { to, mode, state })
                .collect(),
            snapshots: vec![],
        }
    }

    #[test]
    fn a_crashed_sequencer_takes_data_only_from_a_consistent_synchronous_replica() {
        use LinkState::*;
        use ReplicationMode::*;
        assert_eq!(crash_pull_source(&cg(&[(2, Sync, Consistent)]), 1), Some(2));
        assert_eq!(
            crash_pull_source(&cg(&[(2, ActiveActiveSync, Consistent)]), 1),
            Some(2)
        );
        // Async copies are prefixes: they may lack acknowledged writes.
        assert_eq!(crash_pull_source(&cg(&[(2, Async, Consistent)]), 1), None);
        assert_eq!(
            crash_pull_source(&cg(&[(2, ActiveActiveAsync, Consistent)]), 1),
            None
        );
        // A copy Raft marked outdated, or one still being filled, lacks writes.
        for state in [Outdated, Inconsistent, Syncing] {
            assert_eq!(crash_pull_source(&cg(&[(2, Sync, state)]), 1), None);
        }
        assert_eq!(
            crash_pull_source(&cg(&[(2, Sync, Outdated), (3, Sync, Consistent)]), 1),
            Some(3)
        );
        // Only the group's sequencer pulls.
        assert_eq!(crash_pull_source(&cg(&[(2, Sync, Consistent)]), 2), None);
    }
}
