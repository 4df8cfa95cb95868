//! The guest runner: a tokio task issuing verifiable writes at the configured rate.
//!
//! Decisions (placement, pacing, percentiles) live in [`crate::plan`]; this module only
//! drives the disks and the log.

use std::collections::HashSet;
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::content::{BlockTag, make_block};
use crate::error::GuestError;
use crate::log::{LogRecord, WriteLog};
use crate::plan::{FillPass, LatencyHistogram, Planner, TokenBucket};
use crate::workload::Workload;

/// How often the guest makes its log durable while running.
pub const LOG_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// A virtual disk as the guest sees it. The agent implements it on the volume that
/// writes through the same path as NBD writes.
pub trait GuestDisk: Send + Sync {
    /// Size in bytes; constant while the guest runs.
    fn size(&self) -> u64;

    /// Writes `data` at `offset`; `Ok(seq)` once acknowledged (same guarantee as an NBD
    /// WRITE reply), where `seq` is the consistency-group sequence number the write got.
    ///
    /// The implementer must guarantee: `seq` is unique within the group and orders the
    /// write after every write acknowledged before this one was issued. On `Err` the
    /// outcome is unknown (the data may or may not be on some copy); the guest counts it
    /// and never logs it. The guest never has two overlapping writes in flight and only
    /// issues sector-aligned writes inside `size()`.
    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<u64, String>>;

    /// Returns once every write acknowledged before the call is durable on every copy the
    /// replication mode promises (NBD FLUSH).
    fn flush(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Counters of a guest run, live (from [`GuestHandle::stats`]) or final (from
/// [`GuestHandle::stop`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Writes acknowledged (and logged).
    pub writes_acked: u64,
    /// Writes that failed (not logged; their outcome is unknown).
    pub writes_failed: u64,
    /// Bytes of acknowledged writes.
    pub bytes_acked: u64,
    /// Flushes that succeeded.
    pub flushes: u64,
    /// Flushes that failed.
    pub flushes_failed: u64,
    /// Writes in flight now.
    pub in_flight: u64,
    /// Seconds from start to now (or to the end of the run).
    pub elapsed_secs: f64,
    /// Acknowledged writes per second over `elapsed_secs`. The workload's `iops` paces
    /// issued writes, so with failures this is below the target.
    pub achieved_iops: f64,
    /// Median latency of acknowledged writes, microseconds (within ~6%).
    pub latency_p50_us: u64,
    /// 99th percentile latency of acknowledged writes, microseconds (within ~6%).
    pub latency_p99_us: u64,
    /// The most recent write or flush error.
    pub last_error: Option<String>,
    /// Why the guest stopped issuing writes on its own (its log could not be written):
    /// acknowledgements after this point could not be logged, so the run must not be
    /// verified as complete.
    pub halted: Option<String>,
    /// Whether the guest task is still running.
    pub running: bool,
}

#[derive(Debug)]
struct Counters {
    acked: u64,
    failed: u64,
    bytes: u64,
    flushes: u64,
    flushes_failed: u64,
    in_flight: u64,
    latency: LatencyHistogram,
    last_error: Option<String>,
    halted: Option<String>,
    started: Instant,
    finished: Option<Instant>,
}

impl Counters {
    fn snapshot(&self) -> GuestStats {
        let end = self.finished.unwrap_or_else(Instant::now);
        let elapsed = end.saturating_duration_since(self.started).as_secs_f64();
        GuestStats {
            writes_acked: self.acked,
            writes_failed: self.failed,
            bytes_acked: self.bytes,
            flushes: self.flushes,
            flushes_failed: self.flushes_failed,
            in_flight: self.in_flight,
            elapsed_secs: elapsed,
            achieved_iops: if elapsed > 0.0 {
                self.acked as f64 / elapsed
            } else {
                0.0
            },
            latency_p50_us: self.latency.quantile(0.50),
            latency_p99_us: self.latency.quantile(0.99),
            last_error: self.last_error.clone(),
            halted: self.halted.clone(),
            running: self.finished.is_none(),
        }
    }
}

type Shared = Arc<Mutex<Counters>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Counters> {
    // Counters stay meaningful even if a holder panicked.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts simulated guests.
pub struct Guest;

impl Guest {
    /// Starts a guest for VM `vm_id` writing `workload` to `disks` (index = disk index),
    /// logging every acknowledged write to `log`. Must be called inside a tokio runtime.
    /// The workload's fill pass runs only when `log` is fresh; a caller continuing a VM's
    /// earlier life in a new log (a stay on another host) clears `fill` itself.
    ///
    /// Fails if the workload is invalid or does not fit the disks, or if the log belongs
    /// to another VM. The task runs until [`GuestHandle::stop`] or until the handle is
    /// dropped (which stops it the same way, without waiting).
    pub fn start(
        vm_id: u64,
        disks: Vec<Arc<dyn GuestDisk>>,
        workload: Workload,
        log: WriteLog,
    ) -> Result<GuestHandle, GuestError> {
        workload.validate()?;
        if log.vm_id() != vm_id {
            return Err(GuestError::LogVmMismatch {
                path: log.path().to_path_buf(),
                expected: vm_id,
                found: log.vm_id(),
            });
        }
        let sizes: Vec<u64> = disks.iter().map(|d| d.size()).collect();
        let seed = workload.seed.unwrap_or_else(rand::random);
        let planner = Planner::new(&workload, &sizes, seed)?;
        let fill = workload
            .fill
            .filter(|_| log.is_fresh())
            .map(|size| FillPass::new(size, workload.span, &sizes));
        let now = Instant::now();
        let shared: Shared = Arc::new(Mutex::new(Counters {
            acked: 0,
            failed: 0,
            bytes: 0,
            flushes: 0,
            flushes_failed: 0,
            in_flight: 0,
            latency: LatencyHistogram::new(),
            last_error: None,
            halted: None,
            started: now,
            finished: None,
        }));
        let (stop_tx, stop_rx) = oneshot::channel();
        let bucket = workload.iops.map(|rate| {
            // Room for a few tokens so timer granularity does not eat into the rate.
            TokenBucket::new(rate, workload.depth.max(4).min(rate), now)
        });
        let runner = Runner {
            vm_id,
            disks,
            workload,
            sync_file: log.sync_handle(),
            log,
            planner,
            fill,
            bucket,
            shared: Arc::clone(&shared),
            busy: HashSet::new(),
            writes_in_flight: 0,
            acked_since_flush: 0,
            stopping: false,
        };
        let task = tokio::spawn(runner.run(stop_rx));
        Ok(GuestHandle {
            stop_tx: Some(stop_tx),
            task,
            shared,
        })
    }
}

/// A running guest.
#[derive(Debug)]
pub struct GuestHandle {
    stop_tx: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    shared: Shared,
}

impl GuestHandle {
    /// Current counters.
    pub fn stats(&self) -> GuestStats {
        lock(&self.shared).snapshot()
    }

    /// Stops issuing writes, waits for the writes in flight (so each acknowledged one is
    /// logged), syncs the log and returns the final counters. It waits as long as the
    /// disks take to answer; wrap it in a timeout if a disk may hang.
    pub async fn stop(mut self) -> GuestStats {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Err(e) = (&mut self.task).await {
            let mut c = lock(&self.shared);
            c.halted = Some(format!("guest task ended abnormally: {e}"));
            c.finished.get_or_insert_with(Instant::now);
        }
        lock(&self.shared).snapshot()
    }
}

enum Done {
    Write {
        disk: usize,
        /// The steady workload's block (marked busy while in flight); `None` for fills.
        block: Option<u64>,
        write_id: u64,
        offset: u64,
        len: u32,
        started: Instant,
        result: Result<u64, String>,
    },
    Flush(Result<(), String>),
}

struct Runner {
    vm_id: u64,
    disks: Vec<Arc<dyn GuestDisk>>,
    workload: Workload,
    log: WriteLog,
    sync_file: Arc<File>,
    planner: Planner,
    /// The fill pass while it runs; the steady workload starts once its writes are done.
    fill: Option<FillPass>,
    bucket: Option<TokenBucket>,
    shared: Shared,
    busy: HashSet<(usize, u64)>,
    writes_in_flight: u32,
    acked_since_flush: u32,
    stopping: bool,
}

impl Runner {
    async fn run(mut self, mut stop_rx: oneshot::Receiver<()>) {
        let mut inflight: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        let mut sync_tick = tokio::time::interval(LOG_SYNC_INTERVAL);
        sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut syncing: Option<JoinHandle<std::io::Result<()>>> = None;
        loop {
            // A disk that answers without ever touching tokio (in memory, say) would
            // otherwise keep this task ready forever and starve the runtime.
            tokio::task::coop::consume_budget().await;
            let wake_at = if self.stopping {
                None
            } else {
                self.issue(&mut inflight)
            };
            if self.stopping && inflight.is_empty() {
                break;
            }
            let sleep = async {
                match wake_at {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut stop_rx, if !self.stopping => self.stopping = true,
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    self.complete(done, &mut inflight);
                }
                _ = sync_tick.tick() => {
                    if syncing.as_ref().is_none_or(|h| h.is_finished()) {
                        let file = Arc::clone(&self.sync_file);
                        syncing = Some(tokio::task::spawn_blocking(move || file.sync_data()));
                    }
                }
                _ = sleep => {}
            }
        }
        if let Some(h) = syncing {
            let _ = h.await;
        }
        let file = Arc::clone(&self.sync_file);
        let synced = tokio::task::spawn_blocking(move || file.sync_data()).await;
        let mut c = lock(&self.shared);
        match synced {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                c.halted = Some(format!(
                    "write log {}: final sync failed: {e}",
                    self.log.path().display()
                ))
            }
            Err(e) => c.halted = Some(format!("write log final sync did not run: {e}")),
        }
        c.finished = Some(Instant::now());
    }

    /// Issues as many writes as the rate, depth and free blocks allow. Returns when the
    /// next token is due, if the bucket is what stopped it.
    fn issue(
        &mut self,
        inflight: &mut FuturesUnordered<BoxFuture<'static, Done>>,
    ) -> Option<Instant> {
        while self.writes_in_flight < self.workload.depth {
            if let Some(fill) = &mut self.fill {
                match fill.next() {
                    Some((disk, offset, len)) => {
                        if !self.start_write(disk, None, offset, len, inflight) {
                            return None;
                        }
                        continue;
                    }
                    // The steady workload may overlap the fill: wait for its last writes.
                    None if self.writes_in_flight > 0 => return None,
                    None => self.fill = None,
                }
            }
            if let Some(bucket) = &mut self.bucket
                && let Err(at) = bucket.try_take(Instant::now())
            {
                return Some(at);
            }
            let busy = &self.busy;
            let Some((disk, block)) = self.planner.next(|d, b| busy.contains(&(d, b))) else {
                // Every candidate block has a write in flight: wait for a completion.
                if let Some(bucket) = &mut self.bucket {
                    bucket.refund();
                }
                return None;
            };
            let offset = self.planner.offset(block);
            if !self.start_write(disk, Some(block), offset, self.workload.size, inflight) {
                return None;
            }
        }
        None
    }

    /// Issues one write; false if the guest halted instead.
    fn start_write(
        &mut self,
        disk: usize,
        block: Option<u64>,
        offset: u64,
        len: u32,
        inflight: &mut FuturesUnordered<BoxFuture<'static, Done>>,
    ) -> bool {
        let write_id = match self.log.allocate_write_id() {
            Ok(id) => id,
            Err(e) => {
                self.halt(format!("cannot reserve write ids: {e}"));
                return false;
            }
        };
        let tag = BlockTag {
            vm_id: self.vm_id,
            disk_index: disk as u32,
            offset,
            write_id,
        };
        let data = match make_block(tag, len as usize) {
            Ok(d) => d,
            Err(e) => {
                // Unreachable for a validated workload; stop rather than write junk.
                self.halt(format!("cannot build write content: {e}"));
                return false;
            }
        };
        if let Some(block) = block {
            self.busy.insert((disk, block));
        }
        self.writes_in_flight += 1;
        lock(&self.shared).in_flight += 1;
        let target = Arc::clone(&self.disks[disk]);
        inflight.push(Box::pin(async move {
            let started = Instant::now();
            let result = target.write(offset, data).await;
            Done::Write {
                disk,
                block,
                write_id,
                offset,
                len,
                started,
                result,
            }
        }));
        true
    }

    fn complete(&mut self, done: Done, inflight: &mut FuturesUnordered<BoxFuture<'static, Done>>) {
        match done {
            Done::Write {
                disk,
                block,
                write_id,
                offset,
                len,
                started,
                result,
            } => {
                if let Some(block) = block {
                    self.busy.remove(&(disk, block));
                }
                self.writes_in_flight -= 1;
                match result {
                    Ok(cg_seq) => {
                        // Log first: the record must exist before anything treats the
                        // write as acknowledged.
                        let rec = LogRecord {
                            write_id,
                            cg_seq,
                            disk_index: disk as u32,
                            offset,
                            len,
                        };
                        let logged = self.log.append(&rec);
                        let micros = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                        {
                            let mut c = lock(&self.shared);
                            c.in_flight -= 1;
                            c.acked += 1;
                            c.bytes += u64::from(len);
                            c.latency.record(micros);
                        }
                        if let Err(e) = logged {
                            self.halt(format!("cannot log acknowledged write {write_id}: {e}"));
                        }
                        self.acked_since_flush += 1;
                        let every = self.workload.flush_every;
                        if every > 0 && self.acked_since_flush >= every && !self.stopping {
                            self.acked_since_flush = 0;
                            inflight.push(self.flush_all());
                        }
                    }
                    Err(e) => {
                        tracing::debug!(vm = self.vm_id, write_id, disk, offset, error = %e, "guest write failed");
                        let mut c = lock(&self.shared);
                        c.in_flight -= 1;
                        c.failed += 1;
                        c.last_error = Some(e);
                    }
                }
            }
            Done::Flush(result) => {
                let mut c = lock(&self.shared);
                match result {
                    Ok(()) => c.flushes += 1,
                    Err(e) => {
                        c.flushes_failed += 1;
                        c.last_error = Some(e);
                    }
                }
            }
        }
    }

    fn flush_all(&self) -> BoxFuture<'static, Done> {
        let disks = self.disks.clone();
        Box::pin(async move {
            let results = futures::future::join_all(disks.iter().map(|d| d.flush())).await;
            Done::Flush(results.into_iter().collect())
        })
    }

    fn halt(&mut self, why: String) {
        tracing::error!(vm = self.vm_id, "simulated guest halted: {why}");
        self.stopping = true;
        lock(&self.shared).halted.get_or_insert(why);
    }
}
