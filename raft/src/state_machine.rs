//! The state machine: the in-memory [`ClusterModel`] plus crash-safe snapshot files.
//!
//! Applying an entry only changes memory; durability comes from the Raft log (committed
//! entries are on a quorum's disks) and from snapshots. A snapshot is one file,
//! `<dir>/current.snap`, replaced with write-fsync-rename-fsync(dir). On start the store
//! loads that file, reports its last applied log id to openraft, and openraft re-applies the
//! log from there.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use convoy_codec::file::{FileError, read_record, write_record};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{NodeAddr, NodeId, Response, Responses, StorageError, TypeConfig};
use convoy_model::ClusterModel;

type Entry = openraft::Entry<TypeConfig>;

const SNAPSHOT_FILE: &str = "current.snap";

/// Everything the state machine holds; also the body of a snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SmState {
    /// Last log entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// Last membership config applied.
    pub last_membership: StoredMembership<NodeId, NodeAddr>,
    /// The cluster model.
    pub model: ClusterModel,
}

/// A snapshot file: openraft's metadata plus the encoded [`SmState`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeAddr>,
    data: Vec<u8>,
}

/// Shared read access to the applied model, for the agent's API and reconcilers.
#[derive(Clone)]
pub struct ModelReader {
    state: Arc<RwLock<SmState>>,
    applied: watch::Receiver<u64>,
}

impl ModelReader {
    /// Runs `f` on the current model. The model may be behind the leader; callers that make
    /// decisions first wait for a linearizable read index (see the agent's API).
    pub fn read<T>(&self, f: impl FnOnce(&ClusterModel) -> T) -> T {
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&guard.model)
    }

    /// Index of the last applied entry (0 before anything).
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// A receiver that changes whenever an entry is applied or a snapshot installed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }
}

/// openraft state machine backed by memory and snapshot files.
pub struct StateMachineStore {
    state: Arc<RwLock<SmState>>,
    dir: PathBuf,
    applied_tx: watch::Sender<u64>,
    /// Last log id of the snapshot file on disk; held while the file is replaced.
    on_disk: SnapshotOnDisk,
}

/// The last log id the snapshot file covers, shared by the builder and installs. openraft
/// builds snapshots in their own task, concurrently with installs: holding this while
/// replacing the file, and refusing to go backwards, means an older snapshot never
/// replaces a newer one (the log below the newer one may already be purged).
type SnapshotOnDisk = Arc<Mutex<Option<LogId<NodeId>>>>;

/// Durably replaces the snapshot file with `stored` unless the file already covers a
/// later log id; returns whether it was written. Blocking.
fn store_snapshot(
    dir: &Path,
    on_disk: &SnapshotOnDisk,
    stored: &StoredSnapshot,
) -> Result<bool, StorageError> {
    let mut current = on_disk.lock().unwrap_or_else(|p| p.into_inner());
    if *current > stored.meta.last_log_id {
        return Ok(false);
    }
    write_record(&dir.join(SNAPSHOT_FILE), stored)
        .map_err(|e| snapshot_err(Some(&stored.meta), ErrorVerb::Write, e))?;
    *current = stored.meta.last_log_id;
    Ok(true)
}

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::new(&e)).into()
}

fn snapshot_err(
    meta: Option<&SnapshotMeta<NodeId, NodeAddr>>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    let subject = ErrorSubject::Snapshot(meta.map(|m| m.signature()));
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| sm_err(ErrorVerb::Write, e))?
}

impl StateMachineStore {
    /// Opens the store in `dir` (created if missing) and restores the latest snapshot.
    ///
    /// A snapshot file that exists but does not decode is an error, never an empty state:
    /// the log before it may already be purged, so starting empty would lose data.
    pub fn open(dir: &Path) -> Result<Self, FileError> {
        std::fs::create_dir_all(dir).map_err(|source| FileError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        convoy_codec::file::remove_stale_temps(dir, SNAPSHOT_FILE);
        let state = match read_record::<StoredSnapshot>(&dir.join(SNAPSHOT_FILE))? {
            Some(snap) => {
                crate::upgrade::decode_state(&snap.data).map_err(|source| FileError::Codec {
                    path: dir.join(SNAPSHOT_FILE).display().to_string(),
                    source,
                })?
            }
            None => SmState::default(),
        };
        let on_disk = Arc::new(Mutex::new(state.last_applied));
        let applied = state.last_applied.map_or(0, |l| l.index);
        let (applied_tx, _) = watch::channel(applied);
        Ok(Self {
            state: Arc::new(RwLock::new(state)),
            dir: dir.to_path_buf(),
            applied_tx,
            on_disk,
        })
    }

    /// A reader for the agent.
    pub fn reader(&self) -> ModelReader {
        ModelReader {
            state: Arc::clone(&self.state),
            applied: self.applied_tx.subscribe(),
        }
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, SmState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds snapshots from a copy of the state taken when openraft asked for a builder.
pub struct SnapshotBuilder {
    state: SmState,
    dir: PathBuf,
    on_disk: SnapshotOnDisk,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let state = std::mem::take(&mut self.state);
        let dir = self.dir.clone();
        let on_disk = Arc::clone(&self.on_disk);
        blocking(move || {
            let data = crate::upgrade::encode_state(&state)
                .map_err(|e| snapshot_err(None, ErrorVerb::Write, e))?;
            let snapshot_id = match state.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
                None => "empty".to_string(),
            };
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.last_membership,
                snapshot_id,
            };
            let stored = StoredSnapshot { meta, data };
            if !store_snapshot(&dir, &on_disk, &stored)? {
                tracing::debug!(snapshot = %stored.meta.snapshot_id, "a newer snapshot was installed meanwhile; this one is not kept");
            }
            Ok(Snapshot {
                meta: stored.meta,
                snapshot: Box::new(Cursor::new(stored.data)),
            })
        })
        .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeAddr>), StorageError> {
        let s = self.read_state();
        Ok((s.last_applied, s.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Responses>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let last_index = {
            let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                s.last_applied = Some(entry.log_id);
                let answers = match entry.payload {
                    EntryPayload::Blank => Vec::new(),
                    EntryPayload::Normal(proposal) => proposal
                        .requests
                        .iter()
                        .map(|req| Response {
                            result: s.model.apply(req.request_id, &req.command),
                        })
                        .collect(),
                    EntryPayload::Membership(m) => {
                        s.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Vec::new()
                    }
                };
                responses.push(Responses(answers));
            }
            s.last_applied.map_or(0, |l| l.index)
        };
        self.applied_tx.send_replace(last_index);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            state: self.read_state().clone(),
            dir: self.dir.clone(),
            on_disk: Arc::clone(&self.on_disk),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let mut state: SmState = crate::upgrade::decode_state(&data)
            .map_err(|e| snapshot_err(Some(meta), ErrorVerb::Read, e))?;
        // The metadata is authoritative for what the snapshot covers.
        state.last_applied = meta.last_log_id;
        state.last_membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let dir = self.dir.clone();
        let on_disk = Arc::clone(&self.on_disk);
        // Durable before the in-memory state moves on: openraft may purge logs after this.
        blocking(move || store_snapshot(&dir, &on_disk, &stored)).await?;
        let index = state.last_applied.map_or(0, |l| l.index);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let stored = blocking(move || {
            read_record::<StoredSnapshot>(&path).map_err(|e| snapshot_err(None, ErrorVerb::Read, e))
        })
        .await?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
