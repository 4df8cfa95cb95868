//! The groups this host keeps a replica copy of: their roles (from the host plan), one
//! stream at a time per group, how far each copy applied, and the lock checkers take to
//! read a copy between batches.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use convoy_raft::model::ReplicaPlan;
use tokio::sync::watch;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Replica-side state of one host.
#[derive(Default)]
pub struct Replicas {
    roles: RwLock<HashMap<u64, ReplicaPlan>>,
    turns: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    applied: Mutex<HashMap<u64, watch::Sender<u64>>>,
    apply_locks: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
    seeding: Mutex<HashSet<u64>>,
}

impl Replicas {
    /// This host's role for group `cg_id`, if it keeps a copy.
    pub fn role(&self, cg_id: u64) -> Option<ReplicaPlan> {
        self.roles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cg_id)
            .cloned()
    }

    /// Every role, by group id.
    pub fn roles(&self) -> HashMap<u64, ReplicaPlan> {
        self.roles.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the roles with the plan's.
    pub fn set_roles(&self, roles: HashMap<u64, ReplicaPlan>) {
        *self.roles.write().unwrap_or_else(|p| p.into_inner()) = roles;
    }

    /// Serialises streams of one group (and keeps files and sequencers off a copy while
    /// a stream writes it).
    pub fn turn(&self, cg_id: u64) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.turns).entry(cg_id).or_default())
    }

    fn applied_sender(&self, cg_id: u64) -> watch::Sender<u64> {
        lock(&self.applied)
            .entry(cg_id)
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }

    /// Records that this copy of group `cg_id` holds every write through `seq` durably.
    pub fn note_applied(&self, cg_id: u64, seq: u64) {
        self.applied_sender(cg_id).send_if_modified(|a| {
            let moved = seq > *a;
            *a = (*a).max(seq);
            moved
        });
    }

    /// How far this copy of group `cg_id` applied (0 if unknown).
    pub fn applied(&self, cg_id: u64) -> u64 {
        *self.applied_sender(cg_id).borrow()
    }

    /// Forgets what was applied (the host starts or stops ordering the group: its own
    /// sequence numbering takes over).
    pub fn reset_applied(&self, cg_id: u64) {
        lock(&self.applied).remove(&cg_id);
    }

    /// Held (write) while a batch of group `cg_id` is applied, and (read) while a checker
    /// reads the copy, so the checker sees a state between batches.
    pub fn apply_lock(&self, cg_id: u64) -> Arc<RwLock<()>> {
        Arc::clone(lock(&self.apply_locks).entry(cg_id).or_default())
    }

    /// Marks whether delta sessions may write group `cg_id`'s copy now (its stream asked
    /// for seeding by hashes and is waiting).
    pub fn set_seeding(&self, cg_id: u64, on: bool) {
        let mut s = lock(&self.seeding);
        if on {
            s.insert(cg_id);
        } else {
            s.remove(&cg_id);
        }
    }

    /// Whether delta sessions may write group `cg_id`'s copy now.
    pub fn seeding(&self, cg_id: u64) -> bool {
        lock(&self.seeding).contains(&cg_id)
    }
}
