//! The responder: accepts delta streams, checks sessions against what the caller expects,
//! and runs the role the caller agreed to.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use convoy_store::{Backend, DiskImage, FileBackend};
use convoy_transport::{FramedRecv, FramedSend, InboundStream, StreamKind};
use tokio::sync::mpsc;

use crate::config::DeltaConfig;
use crate::error::DeltaError;
use crate::local;
use crate::proto::{
    Binding, Expect, Hello, Mode, Msg, Refusal, RefusalCode, Role, Shape, check_hello, decode,
};
use crate::roles::{Ctx, run_dest, run_source, spawn_prep};
use crate::stats::{Counters, DeltaStats, ServerCounters, ServerStats};
use crate::wire::Sender;

/// What the responder agrees to for one disk: the expectation a session must meet, the
/// role this node plays, and its disk image.
pub struct Offer<B: Backend = FileBackend> {
    /// What the session's binding must satisfy.
    pub expect: Expect,
    /// [`Role::Destination`] accepts pushes into `image`; [`Role::Source`] serves pulls
    /// from it.
    pub role: Role,
    /// The local disk. As a destination, nobody else may write it during a session.
    pub image: Arc<DiskImage<B>>,
}

/// Looks up what this node expects for a session request. Called once per session, on
/// the async executor (keep it quick; no I/O).
pub trait Resolver<B: Backend = FileBackend>: Send + Sync + 'static {
    /// The offer for the disk a session from `peer` names in `binding` (its `cg` and
    /// `disk`), in which this node would play `role` (a push makes it the destination, a
    /// pull the source), or `None` if this node expects no such session. The offer's
    /// [`Expect`] and role are then checked against the session.
    fn resolve(&self, peer: u64, binding: &Binding, role: Role) -> Option<Offer<B>>;
}

impl<B: Backend, F> Resolver<B> for F
where
    F: Fn(u64, &Binding, Role) -> Option<Offer<B>> + Send + Sync + 'static,
{
    fn resolve(&self, peer: u64, binding: &Binding, role: Role) -> Option<Offer<B>> {
        self(peer, binding, role)
    }
}

/// What [`DeltaServer::serve`] did with a stream.
#[derive(Debug)]
pub enum Served {
    /// A data stream was handed to its session (reported by the session's own call).
    Attached,
    /// A session ran to completion: as a destination, its disk now equals the source's
    /// (see the crate documentation) and is durable.
    Completed(SessionReport),
    /// A session was refused at the handshake; nothing was read or written.
    Refused {
        /// The node that asked.
        peer: u64,
        /// What it asked for.
        binding: Binding,
        /// Why it was refused (also sent to it).
        refusal: Refusal,
    },
}

/// A completed session, seen from the responder.
#[derive(Clone, Debug)]
pub struct SessionReport {
    /// The initiator.
    pub peer: u64,
    /// The session binding.
    pub binding: Binding,
    /// The role this node played.
    pub role: Role,
    /// The session's mode.
    pub mode: Mode,
    /// This side's figures.
    pub stats: DeltaStats,
}

struct Attached {
    binding: Binding,
    index: u16,
    send: FramedSend,
    recv: FramedRecv,
    frame_len: usize,
}

/// Data streams that arrived for one session, possibly before its control stream.
struct Slot {
    tx: mpsc::UnboundedSender<Attached>,
    rx: Option<mpsc::UnboundedReceiver<Attached>>,
}

type SessionKey = (u64, u64);

struct Inner<B: Backend> {
    config: DeltaConfig,
    resolver: Box<dyn Resolver<B>>,
    slots: Mutex<HashMap<SessionKey, Slot>>,
    /// Disks `(cg, disk)` with a session running here.
    active: Mutex<HashSet<(u64, u64)>>,
    counters: Arc<ServerCounters>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only map insertions and removals happen under these locks.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The responding side of delta sessions, for all disks of this node.
///
/// The caller's accept loop hands every delta stream it accepts ([`StreamKind::Delta`]
/// streams whose first frame is a delta message) to [`DeltaServer::serve`], each in its
/// own task: a session consists of one control stream plus its data streams, which may
/// arrive in any order. Cheap to clone.
pub struct DeltaServer<B: Backend = FileBackend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for DeltaServer<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// Removes a session's slot and disk lock when the session ends, however it ends.
struct SessionGuard<B: Backend> {
    inner: Arc<Inner<B>>,
    key: SessionKey,
    disk: Option<(u64, u64)>,
}

impl<B: Backend> Drop for SessionGuard<B> {
    fn drop(&mut self) {
        lock(&self.inner.slots).remove(&self.key);
        if let Some(d) = self.disk {
            lock(&self.inner.active).remove(&d);
        }
    }
}

impl<B: Backend + 'static> DeltaServer<B> {
    /// A server that asks `resolver` what each session may do.
    pub fn new(config: DeltaConfig, resolver: impl Resolver<B>) -> Result<Self, DeltaError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                resolver: Box::new(resolver),
                slots: Mutex::new(HashMap::new()),
                active: Mutex::new(HashSet::new()),
                counters: Arc::new(ServerCounters::default()),
            }),
        })
    }

    /// Totals across sessions so far.
    pub fn stats(&self) -> ServerStats {
        self.inner.counters.snapshot()
    }

    /// Serves one accepted stream. For a session's control stream this returns when the
    /// session ends: [`Served::Completed`] once, as a destination, everything is written
    /// and flushed (durable) and the source has been told; [`Served::Refused`] if the
    /// session did not meet the [`Offer`]; an error if it failed midway (the destination
    /// then holds a mix of old and new chunks, none guaranteed durable; all writes of
    /// the session have returned). For a data stream it returns at once.
    pub async fn serve(&self, stream: InboundStream) -> Result<Served, DeltaError> {
        let InboundStream {
            peer,
            kind,
            send,
            mut recv,
        } = stream;
        let protocol = |detail: String| DeltaError::Protocol { peer, detail };
        if kind != StreamKind::Delta {
            return Err(protocol(format!("delta server got a {kind} stream")));
        }
        let timeout = self.inner.config.attach_timeout;
        let first = tokio::time::timeout(timeout, recv.recv_frame())
            .await
            .map_err(|_| DeltaError::Timeout {
                peer,
                what: "send the first frame of a delta stream",
                secs: timeout.as_secs_f64(),
            })??
            .ok_or_else(|| protocol("delta stream ended before its first frame".into()))?;
        let msg = decode(&first).map_err(|e| protocol(format!("undecodable message: {e}")))?;
        match msg {
            Msg::Hello(hello) => self.session(peer, hello, first.len(), send, recv).await,
            Msg::Attach { binding, stream } => {
                self.attach(
                    peer,
                    Attached {
                        binding,
                        index: stream,
                        send,
                        recv,
                        frame_len: first.len(),
                    },
                );
                Ok(Served::Attached)
            }
            other => Err(protocol(format!(
                "a delta stream must start with Hello or Attach, not {}",
                other.name()
            ))),
        }
    }

    fn attach(&self, peer: u64, attached: Attached) {
        let key = (peer, attached.binding.session);
        let mut slots = lock(&self.inner.slots);
        let fresh = !slots.contains_key(&key);
        let slot = slots.entry(key).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            Slot { tx, rx: Some(rx) }
        });
        // A send fails only once the session has ended; the stream is then dropped
        // (reset), which is what a late stream deserves.
        let _ = slot.tx.send(attached);
        if fresh {
            // Streams of a session whose control stream never comes are dropped.
            let inner = self.inner.clone();
            tokio::spawn(async move {
                tokio::time::sleep(inner.config.attach_timeout).await;
                let mut slots = lock(&inner.slots);
                if slots.get(&key).is_some_and(|s| s.rx.is_some()) {
                    slots.remove(&key);
                }
            });
        }
    }

    /// Takes the session's stream receiver; `None` if another Hello already took it.
    fn claim(&self, key: SessionKey) -> Option<mpsc::UnboundedReceiver<Attached>> {
        let mut slots = lock(&self.inner.slots);
        let slot = slots.entry(key).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            Slot { tx, rx: Some(rx) }
        });
        slot.rx.take()
    }

    async fn session(
        &self,
        peer: u64,
        hello: Hello,
        first_len: usize,
        send: FramedSend,
        recv: FramedRecv,
    ) -> Result<Served, DeltaError> {
        let started = Instant::now();
        let binding = hello.binding;
        let counters = Arc::new(Counters::default());
        counters.streams(1);
        counters.frame(first_len, None);
        let mut ctl = Sender::new(send, peer, counters.clone());
        let Some(rx) = self.claim((peer, binding.session)) else {
            return Err(DeltaError::Protocol {
                peer,
                detail: format!("second Hello for session {:#x}", binding.session),
            });
        };
        let mut guard = SessionGuard {
            inner: self.inner.clone(),
            key: (peer, binding.session),
            disk: None,
        };
        let offer = match self.admit(peer, &hello, &mut guard).await {
            Ok(offer) => offer,
            Err(refusal) => {
                self.inner.counters.refused.fetch_add(1, Relaxed);
                tracing::info!(peer, ?binding, ?refusal, "delta session refused");
                let _ = ctl
                    .msg(&Msg::Refused {
                        binding,
                        refusal: refusal.clone(),
                    })
                    .await;
                let _ = ctl.finish();
                return Ok(Served::Refused {
                    peer,
                    binding,
                    refusal,
                });
            }
        };
        let result = self
            .run(peer, hello, offer, ctl, recv, rx, counters, started)
            .await;
        drop(guard);
        match result {
            Ok(stats) => {
                self.inner.counters.completed.fetch_add(1, Relaxed);
                Ok(Served::Completed(SessionReport {
                    peer,
                    binding,
                    role: hello.direction.responder_role(),
                    mode: hello.mode,
                    stats,
                }))
            }
            Err(e) => {
                self.inner.counters.failed.fetch_add(1, Relaxed);
                tracing::warn!(peer, ?binding, error = %e, "delta session failed");
                Err(e)
            }
        }
    }

    /// Decides whether to accept the session; on success the disk is locked in `guard`.
    async fn admit(
        &self,
        peer: u64,
        hello: &Hello,
        guard: &mut SessionGuard<B>,
    ) -> Result<Offer<B>, Refusal> {
        let b = &hello.binding;
        let offer = self
            .inner
            .resolver
            .resolve(peer, b, hello.direction.responder_role());
        let local = offer
            .as_ref()
            .map_or(hello.shape, |o| Shape::of(o.image.geometry()));
        check_hello(hello, offer.as_ref().map(|o| (&o.expect, o.role)), &local)?;
        let Some(offer) = offer else {
            return Err(Refusal::new(RefusalCode::UnknownDisk, "no offer"));
        };
        if !lock(&self.inner.active).insert((b.cg, b.disk)) {
            return Err(Refusal::new(
                RefusalCode::SessionActive,
                format!(
                    "another delta session on disk {} is running on this node; retry when it ends",
                    b.disk
                ),
            ));
        }
        guard.disk = Some((b.cg, b.disk));
        if hello.mode == Mode::FullCopy && offer.role == Role::Destination {
            let image = offer.image.clone();
            let empty = tokio::task::spawn_blocking(move || local::is_empty(&image)).await;
            match empty {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    return Err(Refusal::new(
                        RefusalCode::NotEmpty,
                        format!(
                            "disk {} is not empty here, so a full copy cannot be applied; use compare-delta",
                            b.disk
                        ),
                    ));
                }
                Ok(Err(e)) => return Err(Refusal::new(RefusalCode::DiskError, e.to_string())),
                Err(e) => return Err(Refusal::new(RefusalCode::DiskError, e.to_string())),
            }
        }
        Ok(offer)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        peer: u64,
        hello: Hello,
        offer: Offer<B>,
        mut ctl: Sender,
        recv: FramedRecv,
        mut rx: mpsc::UnboundedReceiver<Attached>,
        counters: Arc<Counters>,
        started: Instant,
    ) -> Result<DeltaStats, DeltaError> {
        let binding = hello.binding;
        ctl.msg(&Msg::Accepted {
            binding,
            shape: Shape::of(offer.image.geometry()),
        })
        .await?;
        let prep = spawn_prep(offer.image.clone(), hello.mode, offer.role);
        let n = usize::from(hello.data_streams);
        let mut streams: Vec<Option<Attached>> = (0..n).map(|_| None).collect();
        let timeout = self.inner.config.attach_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut missing = n;
        while missing > 0 {
            let next = tokio::time::timeout_at(deadline, rx.recv()).await;
            let Ok(Some(a)) = next else {
                let e = DeltaError::Timeout {
                    peer,
                    what: "open all data streams of the session",
                    secs: timeout.as_secs_f64(),
                };
                ctl.abort(binding, &e).await;
                return Err(e);
            };
            let index = usize::from(a.index);
            if a.binding != binding || index >= n || streams[index].is_some() {
                let e = DeltaError::Protocol {
                    peer,
                    detail: format!("data stream {index} does not belong to the session"),
                };
                ctl.abort(binding, &e).await;
                return Err(e);
            }
            counters.streams(1);
            counters.frame(a.frame_len, None);
            streams[index] = Some(a);
            missing -= 1;
        }
        let streams: Vec<Attached> = streams.into_iter().flatten().collect();
        let ctx = Ctx {
            peer,
            binding,
            mode: hello.mode,
            image: offer.image,
            config: self.inner.config.clone(),
            counters,
            started,
            server: Some(self.inner.counters.clone()),
        };
        match offer.role {
            Role::Destination => {
                let mut recvs = Vec::with_capacity(n);
                for mut a in streams {
                    // Nothing flows back on a data stream.
                    a.send.finish()?;
                    recvs.push(a.recv);
                }
                run_dest(ctx, ctl.send, recv, recvs, prep).await
            }
            Role::Source => {
                let sends = streams.into_iter().map(|a| a.send).collect();
                run_source(ctx, ctl.send, recv, sends, prep).await
            }
        }
    }
}
