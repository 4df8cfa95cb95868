//! The two roles of a session once the handshake is done: the I/O shell around the pure
//! [`Walk`], [`Batcher`] and frame checks. Who dialed does not matter here.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_store::{Backend, ChunkHash, DiskImage, StoreError};
use convoy_transport::{FramedRecv, FramedSend};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::{JoinError, JoinHandle, JoinSet};

use crate::config::{DeltaConfig, MAX_FRAME_PAYLOAD};
use crate::error::DeltaError;
use crate::local::{self, LocalTree};
use crate::proto::{
    Binding, ChunkHeader, DestState, HashList, MAX_HASHES_PER_MESSAGE, MAX_RUNS_PER_FRAME, Mode,
    Msg, Role, Totals, TreeShape, plan_frame,
};
use crate::stats::{Counters, DeltaStats, ServerCounters};
use crate::walk::{Batch, Batcher, Walk};
use crate::wire::{self, ControlReader, Sender};

/// How long a failing side waits for the peer's own `Abort` reason.
const ABORT_GRACE: Duration = Duration::from_millis(500);

/// What a side computed about its own disk before the exchange.
#[derive(Debug)]
pub(crate) enum Prep {
    /// Compare-delta: the interior of our hash tree.
    Tree(LocalTree),
    /// Full copy: nothing to prepare (a destination checked emptiness before accepting).
    Nothing,
}

/// Starts preparing the local disk on the blocking pool: for compare-delta, hash it (the
/// store's pass, which skips holes) and take its tree; for a full copy into this (empty)
/// disk, pre-admit it.
pub(crate) fn spawn_prep<B: Backend + 'static>(
    image: Arc<DiskImage<B>>,
    mode: Mode,
    role: Role,
) -> JoinHandle<Result<Prep, StoreError>> {
    tokio::task::spawn_blocking(move || match (mode, role) {
        (Mode::CompareDelta, _) => {
            let shape = TreeShape::of(image.geometry());
            local::snapshot(&image, &shape).map(Prep::Tree)
        }
        (Mode::FullCopy, Role::Destination) => {
            local::preadmit_empty(&image)?;
            Ok(Prep::Nothing)
        }
        (Mode::FullCopy, Role::Source) => Ok(Prep::Nothing),
    })
}

/// Everything a role needs besides its streams.
pub(crate) struct Ctx<B: Backend> {
    pub(crate) peer: u64,
    pub(crate) binding: Binding,
    pub(crate) mode: Mode,
    pub(crate) image: Arc<DiskImage<B>>,
    pub(crate) config: DeltaConfig,
    pub(crate) counters: Arc<Counters>,
    pub(crate) started: Instant,
    /// The responder's totals, when this side is a server.
    pub(crate) server: Option<Arc<ServerCounters>>,
}

impl<B: Backend> Ctx<B> {
    fn protocol(&self, detail: impl Into<String>) -> DeltaError {
        DeltaError::Protocol {
            peer: self.peer,
            detail: detail.into(),
        }
    }

    fn unexpected(&self, msg: &Msg, waiting_for: &str) -> DeltaError {
        self.protocol(format!(
            "got {} while waiting for {waiting_for}",
            msg.name()
        ))
    }

    fn stats(&self, totals: &Totals) -> DeltaStats {
        DeltaStats {
            chunks_total: self.image.chunk_count(),
            chunks_compared: self.counters.hash_nodes(),
            hash_bytes: self.counters.hash_bytes(),
            chunks_sent: totals.chunks,
            zero_chunks_sent: totals.zero_chunks,
            data_bytes_sent: totals.data_bytes,
            wire_bytes: self.counters.wire_bytes(),
            elapsed: self.started.elapsed(),
        }
    }
}

fn task_error(e: JoinError) -> DeltaError {
    DeltaError::Task(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, DeltaError> {
    Ok(tokio::task::spawn_blocking(f).await.map_err(task_error)??)
}

async fn join_prep(prep: JoinHandle<Result<Prep, StoreError>>) -> Result<Prep, DeltaError> {
    Ok(prep.await.map_err(task_error)??)
}

fn joined(j: Result<Result<Totals, DeltaError>, JoinError>) -> Result<Totals, DeltaError> {
    j.map_err(task_error)?
}

/// After a local failure, prefer the reason the peer gave (its `Abort`) over the broken
/// stream that its abort caused here; then tell the peer our reason.
async fn fail(
    err: DeltaError,
    binding: Binding,
    ctl: &mut Sender,
    reader: &mut ControlReader,
) -> DeltaError {
    let err = match err {
        DeltaError::Transport(_) | DeltaError::Cancelled => {
            reader.peer_abort(ABORT_GRACE).await.unwrap_or(err)
        }
        e => e,
    };
    ctl.abort(binding, &err).await;
    err
}

// ---- source --------------------------------------------------------------------------

/// Runs the source side: answers nothing, asks for hashes, sends chunks.
pub(crate) async fn run_source<B: Backend + 'static>(
    ctx: Ctx<B>,
    ctl_send: FramedSend,
    ctl_recv: FramedRecv,
    data: Vec<FramedSend>,
    prep: JoinHandle<Result<Prep, StoreError>>,
) -> Result<DeltaStats, DeltaError> {
    let mut ctl = Sender::new(ctl_send, ctx.peer, ctx.counters.clone());
    let mut reader = ControlReader::spawn(ctl_recv, ctx.binding, ctx.peer, ctx.counters.clone());
    match source_inner(&ctx, &mut ctl, &mut reader, data, prep).await {
        Ok(stats) => Ok(stats),
        Err(e) => Err(fail(e, ctx.binding, &mut ctl, &mut reader).await),
    }
}

async fn source_inner<B: Backend + 'static>(
    ctx: &Ctx<B>,
    ctl: &mut Sender,
    reader: &mut ControlReader,
    data: Vec<FramedSend>,
    prep: JoinHandle<Result<Prep, StoreError>>,
) -> Result<DeltaStats, DeltaError> {
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(2 * data.len());
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    let buffers = Arc::new(local::BufferPool::default());
    let mut workers = JoinSet::new();
    for (i, send) in data.into_iter().enumerate() {
        workers.spawn(source_worker(
            i as u16,
            Sender::new(send, ctx.peer, ctx.counters.clone()),
            batch_rx.clone(),
            WorkerShared {
                image: ctx.image.clone(),
                binding: ctx.binding,
                omit_zero: ctx.mode == Mode::FullCopy,
                buffers: buffers.clone(),
                progress: ctx.config.progress.clone(),
            },
        ));
    }
    drop(batch_rx);

    let mut totals = Totals::default();
    let produced = {
        let produce = produce(ctx, ctl, reader, batch_tx, prep);
        tokio::pin!(produce);
        loop {
            tokio::select! {
                r = &mut produce => break r,
                // A worker only ends early by failing (or all ended: the batch channel
                // is then closed and `produce` notices).
                Some(j) = workers.join_next() => totals.add(&joined(j)?),
            }
        }
    };
    if let Err(e) = produced {
        if matches!(e, DeltaError::Cancelled) {
            // The workers went away first; their error is the real one.
            while let Some(j) = workers.join_next().await {
                joined(j)?;
            }
        }
        return Err(e);
    }
    while let Some(j) = workers.join_next().await {
        totals.add(&joined(j)?);
    }
    ctl.msg(&Msg::Finish {
        binding: ctx.binding,
        totals,
    })
    .await?;
    match reader.next().await? {
        Msg::Complete { .. } => {}
        other => return Err(ctx.unexpected(&other, "Complete")),
    }
    ctl.finish()?;
    Ok(ctx.stats(&totals))
}

/// Decides what to send and queues it for the data workers.
async fn produce<B: Backend + 'static>(
    ctx: &Ctx<B>,
    ctl: &mut Sender,
    reader: &mut ControlReader,
    batch_tx: mpsc::Sender<Batch>,
    prep: JoinHandle<Result<Prep, StoreError>>,
) -> Result<(), DeltaError> {
    let g = *ctx.image.geometry();
    let state = match reader.next().await? {
        Msg::Ready { state, .. } => state,
        other => return Err(ctx.unexpected(&other, "Ready")),
    };
    let prep = join_prep(prep).await?;
    let batcher = Batcher::new(g, ctx.config.frame_bytes as u64, MAX_RUNS_PER_FRAME);
    match (ctx.mode, state, prep) {
        (Mode::CompareDelta, DestState::Tree(_) | DestState::LeavesOnly, Prep::Tree(tree)) => {
            let remote_root = match state {
                DestState::Tree(r) => Some(r),
                _ => None,
            };
            compare(ctx, ctl, reader, &batch_tx, batcher, &tree, remote_root).await
        }
        (Mode::FullCopy, DestState::Empty, _) => {
            let image = ctx.image.clone();
            tokio::task::spawn_blocking(move || local::enumerate_full(image, batcher, batch_tx))
                .await
                .map_err(task_error)?
        }
        (mode, state, _) => Err(ctx.protocol(format!(
            "destination announced {state:?} for a {mode:?} session"
        ))),
    }
}

async fn queue(tx: &mpsc::Sender<Batch>, batch: Option<Batch>) -> Result<(), DeltaError> {
    match batch {
        Some(b) => tx.send(b).await.map_err(|_| DeltaError::Cancelled),
        None => Ok(()),
    }
}

/// The compare-delta walk: requests hashes, compares, queues differing chunks.
async fn compare<B: Backend + 'static>(
    ctx: &Ctx<B>,
    ctl: &mut Sender,
    reader: &mut ControlReader,
    batch_tx: &mpsc::Sender<Batch>,
    mut batcher: Batcher,
    tree: &LocalTree,
    remote_root: Option<ChunkHash>,
) -> Result<(), DeltaError> {
    let mut walk = Walk::new(TreeShape::of(ctx.image.geometry()));
    for d in walk.start(tree.root, remote_root) {
        queue(batch_tx, batcher.push_differing(d)).await?;
    }
    queue(batch_tx, batcher.take()).await?;
    loop {
        while walk.in_flight() < ctx.config.requests_in_flight {
            let Some(want) = walk.next_want(ctx.config.hashes_per_request) else {
                break;
            };
            ctl.msg(&Msg::Want {
                binding: ctx.binding,
                level: want.level,
                nodes: want.nodes,
            })
            .await?;
        }
        if walk.is_done() {
            return Ok(());
        }
        let (level, hashes) = match reader.next().await? {
            Msg::Nodes { level, hashes, .. } => (level, hashes),
            other => return Err(ctx.unexpected(&other, "Nodes")),
        };
        let Some(expected) = walk.expected().cloned() else {
            return Err(ctx.protocol("node hashes arrived that were not requested"));
        };
        let local = if expected.child_level == 0 {
            let image = ctx.image.clone();
            let ranges = expected.children.clone();
            Some(blocking(move || local::leaves(&image, &ranges)).await?)
        } else {
            tree.interior(expected.child_level, &expected.children)
        };
        let found = walk
            .on_nodes(level, &hashes.0, local.as_deref())
            .map_err(|e| ctx.protocol(e))?;
        for d in found {
            queue(batch_tx, batcher.push_differing(d)).await?;
        }
        queue(batch_tx, batcher.take()).await?;
    }
}

/// What every data-stream worker of a source shares.
struct WorkerShared<B: Backend> {
    image: Arc<DiskImage<B>>,
    binding: Binding,
    /// Full copy to an empty disk: zero chunks are left out.
    omit_zero: bool,
    buffers: Arc<local::BufferPool>,
    progress: Option<Arc<crate::stats::DeltaProgress>>,
}

/// Reads batches and sends them on one data stream until the queue closes.
async fn source_worker<B: Backend + 'static>(
    stream: u16,
    mut out: Sender,
    batches: Arc<Mutex<mpsc::Receiver<Batch>>>,
    shared: WorkerShared<B>,
) -> Result<Totals, DeltaError> {
    let WorkerShared {
        image,
        binding,
        omit_zero,
        buffers,
        progress,
    } = shared;
    let mut totals = Totals::default();
    loop {
        let batch = batches.lock().await.recv().await;
        let Some(batch) = batch else { break };
        let img = image.clone();
        let pool = buffers.clone();
        let (runs, payload) =
            blocking(move || local::read_batch(&img, &batch, omit_zero, &pool)).await?;
        if runs.is_empty() {
            continue;
        }
        for r in &runs {
            totals.chunks += u64::from(r.count);
            if r.zero {
                totals.zero_chunks += u64::from(r.count);
            }
        }
        let header = ChunkHeader {
            binding,
            stream,
            seq: totals.frames,
            runs,
            payload_len: payload.len() as u64,
        };
        totals.frames += 1;
        totals.data_bytes += header.payload_len;
        let (chunks, bytes) = (
            header.runs.iter().map(|r| u64::from(r.count)).sum(),
            header.payload_len,
        );
        out.msg(&Msg::Chunks(header)).await?;
        if !payload.is_empty() {
            out.payload(payload).await?;
        }
        if let Some(p) = &progress {
            p.sent(chunks, bytes);
        }
    }
    out.msg(&Msg::StreamEnd {
        binding,
        stream,
        totals,
    })
    .await?;
    out.finish()?;
    Ok(totals)
}

// ---- destination ---------------------------------------------------------------------

/// Runs the destination side: serves its hashes, writes what arrives, flushes, confirms.
/// The send halves of the data streams must already be finished by the caller.
pub(crate) async fn run_dest<B: Backend + 'static>(
    ctx: Ctx<B>,
    ctl_send: FramedSend,
    ctl_recv: FramedRecv,
    data: Vec<FramedRecv>,
    prep: JoinHandle<Result<Prep, StoreError>>,
) -> Result<DeltaStats, DeltaError> {
    let mut ctl = Sender::new(ctl_send, ctx.peer, ctx.counters.clone());
    let mut reader = ControlReader::spawn(ctl_recv, ctx.binding, ctx.peer, ctx.counters.clone());
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let mut receivers = JoinSet::new();
    for (i, recv) in data.into_iter().enumerate() {
        receivers.spawn(dest_receiver(
            i as u16,
            recv,
            ctx.image.clone(),
            ctx.binding,
            ctx.peer,
            ctx.counters.clone(),
            cancel_rx.clone(),
            ctx.server.clone(),
        ));
    }
    match dest_inner(&ctx, &mut ctl, &mut reader, &mut receivers, prep).await {
        Ok(stats) => Ok(stats),
        Err(e) => {
            // Let writes in flight finish before returning, so a next session never races
            // with a write of this one.
            let _ = cancel_tx.send(true);
            while receivers.join_next().await.is_some() {}
            Err(fail(e, ctx.binding, &mut ctl, &mut reader).await)
        }
    }
}

async fn dest_inner<B: Backend + 'static>(
    ctx: &Ctx<B>,
    ctl: &mut Sender,
    reader: &mut ControlReader,
    receivers: &mut JoinSet<Result<Totals, DeltaError>>,
    prep: JoinHandle<Result<Prep, StoreError>>,
) -> Result<DeltaStats, DeltaError> {
    let shape = TreeShape::of(ctx.image.geometry());
    let tree = match (ctx.mode, join_prep(prep).await?) {
        (Mode::CompareDelta, Prep::Tree(t)) => Some(t),
        _ => None,
    };
    let state = match &tree {
        Some(t) => t.root.map_or(DestState::LeavesOnly, DestState::Tree),
        None => DestState::Empty,
    };
    ctl.msg(&Msg::Ready {
        binding: ctx.binding,
        state,
    })
    .await?;
    let mut totals = Totals::default();
    let announced = loop {
        tokio::select! {
            m = reader.next() => match m? {
                Msg::Want { level, nodes, .. } => {
                    let Some(tree) = &tree else {
                        return Err(ctx.protocol("hash request in a full-copy session"));
                    };
                    let kids = shape
                        .want_children(level, &nodes, MAX_HASHES_PER_MESSAGE)
                        .map_err(|e| ctx.protocol(e))?;
                    let child_level = level as usize - 1;
                    let hashes = if child_level == 0 {
                        let image = ctx.image.clone();
                        blocking(move || local::leaves(&image, &kids)).await?
                    } else {
                        tree.interior(child_level, &kids).ok_or_else(|| {
                            ctx.protocol("request for interior nodes, but only leaves were offered")
                        })?
                    };
                    ctl.msg(&Msg::Nodes {
                        binding: ctx.binding,
                        level: child_level as u32,
                        hashes: HashList(hashes),
                    })
                    .await?;
                }
                Msg::Finish { totals, .. } => break totals,
                other => return Err(ctx.unexpected(&other, "Want or Finish")),
            },
            Some(j) = receivers.join_next() => totals.add(&joined(j)?),
        }
    };
    while let Some(j) = receivers.join_next().await {
        totals.add(&joined(j)?);
    }
    if totals != announced {
        return Err(ctx.protocol(format!(
            "source announced {announced:?} but {totals:?} arrived"
        )));
    }
    let image = ctx.image.clone();
    blocking(move || image.flush()).await?;
    ctl.msg(&Msg::Complete {
        binding: ctx.binding,
    })
    .await?;
    ctl.finish()?;
    Ok(ctx.stats(&totals))
}

/// Waits for `received` unless the session is cancelled first.
async fn unless_cancelled<T>(
    cancel: &mut watch::Receiver<bool>,
    received: impl std::future::Future<Output = Result<T, convoy_transport::TransportError>>,
) -> Result<T, DeltaError> {
    tokio::select! {
        biased;
        _ = cancel.wait_for(|c| *c) => Err(DeltaError::Cancelled),
        f = received => Ok(f?),
    }
}

async fn next_frame(
    recv: &mut FramedRecv,
    cancel: &mut watch::Receiver<bool>,
) -> Result<Option<Bytes>, DeltaError> {
    unless_cancelled(cancel, recv.recv_frame()).await
}

/// Receives one data stream and writes what it carries.
#[allow(clippy::too_many_arguments)]
async fn dest_receiver<B: Backend + 'static>(
    stream: u16,
    mut recv: FramedRecv,
    image: Arc<DiskImage<B>>,
    binding: Binding,
    peer: u64,
    counters: Arc<Counters>,
    mut cancel: watch::Receiver<bool>,
    server: Option<Arc<ServerCounters>>,
) -> Result<Totals, DeltaError> {
    let g = *image.geometry();
    let protocol = |detail: String| DeltaError::Protocol { peer, detail };
    let mut totals = Totals::default();
    loop {
        let Some(frame) = next_frame(&mut recv, &mut cancel).await? else {
            return Err(protocol(format!(
                "data stream {stream} ended without its end marker"
            )));
        };
        counters.frame(frame.len(), None);
        match wire::check(&frame, &binding, peer)? {
            Msg::Chunks(h) => {
                if h.stream != stream || h.seq != totals.frames {
                    return Err(protocol(format!(
                        "frame {} of stream {} arrived as frame {} of stream {stream}",
                        h.seq, h.stream, totals.frames
                    )));
                }
                let plan = plan_frame(&g, &h, MAX_FRAME_PAYLOAD as u64).map_err(protocol)?;
                // The payload stays in the pieces QUIC delivered: written with one
                // pwritev per run instead of being joined into one buffer first.
                let payload = if h.payload_len > 0 {
                    let p = unless_cancelled(&mut cancel, recv.recv_frame_parts())
                        .await?
                        .ok_or_else(|| {
                            protocol(format!("data stream {stream} ended before a payload"))
                        })?;
                    let len: usize = p.iter().map(Bytes::len).sum();
                    counters.frame(len, None);
                    if len as u64 != h.payload_len {
                        return Err(protocol(format!(
                            "payload of {len} bytes, header announced {}",
                            h.payload_len
                        )));
                    }
                    p
                } else {
                    Vec::new()
                };
                let img = image.clone();
                let ops = plan.ops;
                blocking(move || local::apply(&img, &ops, &payload)).await?;
                totals.add(&plan.totals);
                if let Some(s) = &server {
                    s.chunks_written.fetch_add(plan.totals.chunks, Relaxed);
                    s.bytes_written.fetch_add(plan.totals.data_bytes, Relaxed);
                }
            }
            Msg::StreamEnd {
                stream: s,
                totals: theirs,
                ..
            } => {
                if s != stream || theirs != totals {
                    return Err(protocol(format!(
                        "stream {s} ended claiming {theirs:?}; stream {stream} received {totals:?}"
                    )));
                }
                return match next_frame(&mut recv, &mut cancel).await? {
                    None => Ok(totals),
                    Some(_) => Err(protocol(format!(
                        "frames after the end marker of data stream {stream}"
                    ))),
                };
            }
            other => {
                return Err(protocol(format!(
                    "got {} on data stream {stream}",
                    other.name()
                )));
            }
        }
    }
}
