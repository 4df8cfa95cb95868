//! Durable Raft log and vote storage on RocksDB, with group commit.
//!
//! Layout: column family `logs` maps the big-endian log index to the codec-encoded entry;
//! column family `meta` holds the vote, the last purged log id and the committed log id.
//!
//! Appends are written to RocksDB without sync (so they are readable at once, as openraft
//! requires) and their completion callbacks are handed to a flusher thread. The flusher takes
//! every callback queued so far, fsyncs the WAL once, and only then reports them flushed. The
//! WAL is a single ordered file, so one fsync makes every earlier write durable; that turns N
//! concurrent appends into one fsync instead of N.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, LogId, RaftLogReader, StorageIOError, Vote};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};

use crate::{NodeId, StorageError, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";

/// Errors opening the log store.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// RocksDB refused to open the database (locked by another agent, damaged, no space...).
    #[error("cannot open the raft log database: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// The flusher thread could not be started.
    #[error("cannot start the raft log flusher thread: {0}")]
    Thread(std::io::Error),
}

/// Counters describing how well group commit works (appends per WAL fsync).
#[derive(Debug, Default)]
pub struct LogStats {
    /// Append calls made by openraft.
    pub appends: AtomicU64,
    /// Entries appended (one append call may carry several).
    pub entries: AtomicU64,
    /// WAL fsyncs done by the flusher.
    pub fsyncs: AtomicU64,
}

/// Tells when a log store's database is closed: every clone of the store and of its
/// readers dropped, and the flusher thread (which drops the last handle once the others
/// are gone) ended. A process must not exit before: RocksDB's static destructors racing
/// with a database still closing on another thread end in SIGSEGV or SIGABRT.
pub struct LogStoreClosed {
    db: std::sync::Weak<DB>,
    flusher: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl LogStoreClosed {
    /// Waits (blocking) until the database is closed, up to `timeout`; false if it was
    /// still open then (a store or reader clone is still alive somewhere).
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut slot = self.flusher.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let thread_done = slot.as_ref().is_none_or(|t| t.is_finished());
            if thread_done && self.db.strong_count() == 0 {
                // Joining makes the flusher's drop of the database (if it held the last
                // handle) complete before we return.
                if let Some(t) = slot.take() {
                    let _ = t.join();
                }
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// The Raft log store. Cheap to clone; all clones share one database and flusher.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    flusher_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    stats: Arc<LogStats>,
    /// Serialises writers so that a vote or truncate never interleaves with an append's
    /// write (openraft requires write IO in submission order).
    write_lock: Arc<Mutex<()>>,
}

/// A read-only handle for openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    db: Arc<DB>,
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn logs_read_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn logs_write_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

/// Runs blocking RocksDB work on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, StorageError> {
    let entry: Entry = crate::upgrade::decode_entry(value).map_err(logs_read_err)?;
    if key != index_key(entry.log_id.index) {
        return Err(logs_read_err(std::io::Error::other(format!(
            "log entry stored under the wrong key: {} at key {key:?}",
            entry.log_id
        ))));
    }
    Ok(entry)
}

impl LogStore {
    /// Opens (or creates) the log store in `dir` and starts its flusher thread.
    pub fn open(dir: &Path) -> Result<Self, LogStoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Small, append-mostly data: keep RocksDB's background work and memory modest.
        opts.set_max_background_jobs(2);
        opts.set_write_buffer_size(16 << 20);
        let cfs =
            [CF_LOGS, CF_META].map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?);
        let stats = Arc::new(LogStats::default());
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let flush_db = Arc::clone(&db);
        let flush_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(flush_db, rx, flush_stats))
            .map_err(LogStoreError::Thread)?;
        Ok(Self {
            db,
            flusher: tx,
            flusher_thread: Arc::new(Mutex::new(Some(thread))),
            stats,
            write_lock: Arc::new(Mutex::new(())),
        })
    }

    /// What tells when the database is closed (see [`LogStoreClosed`]).
    pub fn closed(&self) -> LogStoreClosed {
        LogStoreClosed {
            db: Arc::downgrade(&self.db),
            flusher: Arc::clone(&self.flusher_thread),
        }
    }

    /// Group-commit counters.
    pub fn stats(&self) -> Arc<LogStats> {
        Arc::clone(&self.stats)
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StorageError> {
        cf(&self.db, name)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let subject = ErrorSubject::Store;
        let raw = self
            .db
            .get_cf(self.cf(CF_META)?, key)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?;
        raw.map(|bytes| {
            convoy_codec::decode(&bytes).map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))
        })
        .transpose()
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), rocksdb::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.db.write_opt(batch, &wo)
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(name).ok_or_else(|| {
        logs_read_err(std::io::Error::other(format!(
            "column family '{name}' missing: the raft database is damaged"
        )))
    })
}

/// Fsyncs the WAL once for every batch of queued callbacks, then reports them flushed.
fn flusher(db: Arc<DB>, rx: mpsc::Receiver<LogFlushed<TypeConfig>>, stats: Arc<LogStats>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = db.flush_wal(true);
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        for callback in batch {
            let r = result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(format!("WAL fsync failed: {e}")));
            callback.log_io_completed(r);
        }
    }
}

fn owned_bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

fn read_range(db: &DB, range: (Bound<u64>, Bound<u64>)) -> Result<Vec<Entry>, StorageError> {
    let start = match range.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let mut out = Vec::new();
    let key = index_key(start);
    for item in db.iterator_cf(
        cf(db, CF_LOGS)?,
        IteratorMode::From(&key, Direction::Forward),
    ) {
        let (k, v) = item.map_err(logs_read_err)?;
        let entry = decode_entry(&k, &v)?;
        if !range.contains(&entry.log_id.index) {
            break;
        }
        out.push(entry);
    }
    Ok(out)
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let db = Arc::clone(&self.db);
        let range = owned_bounds(&range);
        blocking(move || read_range(&db, range)).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let db = Arc::clone(&self.db);
        let range = owned_bounds(&range);
        blocking(move || read_range(&db, range)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let this = self.clone();
        blocking(move || {
            let last = match this
                .db
                .iterator_cf(this.cf(CF_LOGS)?, IteratorMode::End)
                .next()
            {
                Some(item) => {
                    let (k, v) = item.map_err(logs_read_err)?;
                    Some(decode_entry(&k, &v)?.log_id)
                }
                None => None,
            };
            let last_purged_log_id: Option<LogId<NodeId>> = this.get_meta(KEY_PURGED)?;
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last.or(last_purged_log_id),
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            db: Arc::clone(&self.db),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let this = self.clone();
        let bytes = convoy_codec::encode(vote)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.put_cf(this.cf(CF_META)?, KEY_VOTE, bytes);
            this.write(batch, true)
                .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let this = self.clone();
        blocking(move || this.get_meta(KEY_VOTE)).await
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        // Not synced: losing it only means re-applying a little later after a crash.
        let this = self.clone();
        let bytes = convoy_codec::encode(&committed).map_err(logs_write_err)?;
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.put_cf(this.cf(CF_META)?, KEY_COMMITTED, bytes);
            this.write(batch, false).map_err(logs_write_err)
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        let this = self.clone();
        blocking(move || {
            Ok(this
                .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
                .flatten())
        })
        .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            self.stats.entries.fetch_add(1, Ordering::Relaxed);
            let bytes = crate::upgrade::encode_entry(&entry).map_err(logs_write_err)?;
            encoded.push((index_key(entry.log_id.index), bytes));
        }
        let this = self.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            let logs = this.cf(CF_LOGS)?;
            for (k, v) in encoded {
                batch.put_cf(logs, k, v);
            }
            this.write(batch, false).map_err(logs_write_err)
        })
        .await?;
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        // Readable now; durable once the flusher has fsynced the WAL.
        self.flusher
            .send(callback)
            .map_err(|_| logs_write_err(std::io::Error::other("log flusher thread stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let this = self.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(
                this.cf(CF_LOGS)?,
                index_key(log_id.index),
                index_key(u64::MAX),
            );
            // Also delete the u64::MAX key, which the exclusive range end leaves.
            batch.delete_cf(this.cf(CF_LOGS)?, index_key(u64::MAX));
            this.write(batch, true).map_err(logs_write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let this = self.clone();
        let purged = convoy_codec::encode(&log_id).map_err(logs_write_err)?;
        blocking(move || {
            // One batch: the purge marker and the deletion land together.
            let mut batch = WriteBatch::default();
            batch.put_cf(this.cf(CF_META)?, KEY_PURGED, purged);
            batch.delete_range_cf(
                this.cf(CF_LOGS)?,
                index_key(0),
                index_key(log_id.index.saturating_add(1)),
            );
            this.write(batch, false).map_err(logs_write_err)
        })
        .await
    }
}
