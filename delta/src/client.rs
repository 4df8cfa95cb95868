//! The initiator: opens a session to a responder and plays the source (push) or the
//! destination (pull).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use convoy_store::{Backend, DiskImage};
use convoy_transport::{Endpoint, StreamKind};

use crate::config::DeltaConfig;
use crate::error::DeltaError;
use crate::local;
use crate::proto::{Binding, Direction, Hello, Mode, Msg, Role, Shape};
use crate::roles::{Ctx, run_dest, run_source, spawn_prep};
use crate::stats::{Counters, DeltaStats};
use crate::wire::{self, Sender};

/// What the caller binds a session to. The epoch must be the disk's current fencing
/// epoch; the responder refuses anything older than it expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// Consistency group.
    pub cg: u64,
    /// Disk within the group.
    pub disk: u64,
    /// Fencing epoch of the disk.
    pub epoch: u64,
}

/// Makes the disk of node `peer` (at `addr`) equal to the local `image`, sending only what
/// differs ([`Mode::CompareDelta`]) or every non-zero chunk to an empty disk
/// ([`Mode::FullCopy`]).
///
/// **When this returns `Ok`, the destination image equals the source as of the session's
/// snapshot point and is durable** (written and fdatasynced on the peer before it
/// confirmed). Snapshot point: if `image` is written during the session, every chunk of
/// the destination equals this source's content of that chunk at some moment during the
/// session (a chunk written concurrently may even arrive torn); the caller must resend
/// the chunks written since the session started, using a dirty tracker started *before*
/// calling this. If `image` is not written meanwhile, the two are byte-equal.
///
/// On error the destination may hold any mix of old and new chunks, none guaranteed
/// durable; a later session completes the sync.
pub async fn push<B: Backend + 'static>(
    endpoint: &Endpoint,
    peer: u64,
    addr: SocketAddr,
    session: Session,
    mode: Mode,
    image: Arc<DiskImage<B>>,
    config: &DeltaConfig,
) -> Result<DeltaStats, DeltaError> {
    initiate(
        endpoint,
        peer,
        addr,
        session,
        Direction::Push,
        mode,
        image,
        config,
    )
    .await
}

/// The reverse of [`push`]: makes the local `image` equal to node `peer`'s disk.
///
/// **When this returns `Ok`, `image` equals the peer's disk as of the session's snapshot
/// point and is durable** (fdatasynced here). The snapshot-point rules of [`push`] apply
/// with the roles swapped. Nobody else may write `image` during the session. For
/// [`Mode::FullCopy`], `image` must be entirely zero ([`DeltaError::NotEmpty`]
/// otherwise).
pub async fn pull<B: Backend + 'static>(
    endpoint: &Endpoint,
    peer: u64,
    addr: SocketAddr,
    session: Session,
    mode: Mode,
    image: Arc<DiskImage<B>>,
    config: &DeltaConfig,
) -> Result<DeltaStats, DeltaError> {
    initiate(
        endpoint,
        peer,
        addr,
        session,
        Direction::Pull,
        mode,
        image,
        config,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn initiate<B: Backend + 'static>(
    endpoint: &Endpoint,
    peer: u64,
    addr: SocketAddr,
    session: Session,
    direction: Direction,
    mode: Mode,
    image: Arc<DiskImage<B>>,
    config: &DeltaConfig,
) -> Result<DeltaStats, DeltaError> {
    config.validate()?;
    let started = Instant::now();
    let binding = Binding {
        cg: session.cg,
        disk: session.disk,
        epoch: session.epoch,
        session: rand::random(),
    };
    let role = match direction {
        Direction::Push => Role::Source,
        Direction::Pull => Role::Destination,
    };
    if role == Role::Destination && mode == Mode::FullCopy {
        let img = image.clone();
        let empty = tokio::task::spawn_blocking(move || local::is_empty(&img))
            .await
            .map_err(|e| DeltaError::Task(e.to_string()))??;
        if !empty {
            return Err(DeltaError::NotEmpty { disk: session.disk });
        }
    }
    // Hash the local disk while the streams open and the peer hashes its own.
    let prep = spawn_prep(image.clone(), mode, role);
    let counters = Arc::new(Counters::default());
    let (send, mut recv) = endpoint.open_stream(peer, addr, StreamKind::Delta).await?;
    counters.streams(1);
    let mut ctl = Sender::new(send, peer, counters.clone());
    let local_shape = Shape::of(image.geometry());
    ctl.msg(&Msg::Hello(Hello {
        binding,
        direction,
        mode,
        shape: local_shape,
        data_streams: config.data_streams,
    }))
    .await?;
    let mut data = Vec::with_capacity(usize::from(config.data_streams));
    for stream in 0..config.data_streams {
        let (send, recv) = endpoint.open_stream(peer, addr, StreamKind::Delta).await?;
        counters.streams(1);
        let mut s = Sender::new(send, peer, counters.clone());
        s.msg(&Msg::Attach { binding, stream }).await?;
        data.push((s.send, recv));
    }
    let reply = wire::recv(&mut recv, &binding, peer, &counters)
        .await?
        .ok_or_else(|| DeltaError::Protocol {
            peer,
            detail: "peer closed the session without answering its Hello".into(),
        })?;
    match reply {
        Msg::Accepted { shape, .. } => {
            if let Some(why) = local_shape.mismatch(&shape, role) {
                return Err(DeltaError::Protocol { peer, detail: why });
            }
        }
        Msg::Refused { refusal, .. } => return Err(DeltaError::Refused { peer, refusal }),
        other => {
            return Err(DeltaError::Protocol {
                peer,
                detail: format!("got {} in answer to Hello", other.name()),
            });
        }
    }
    let ctx = Ctx {
        peer,
        binding,
        mode,
        image,
        config: config.clone(),
        counters,
        started,
        server: None,
    };
    match role {
        Role::Source => {
            // The reverse directions of data streams stay unused.
            let sends = data.into_iter().map(|(s, _)| s).collect();
            run_source(ctx, ctl.send, recv, sends, prep).await
        }
        Role::Destination => {
            let mut recvs = Vec::with_capacity(data.len());
            for (mut s, r) in data {
                s.finish()?;
                recvs.push(r);
            }
            run_dest(ctx, ctl.send, recv, recvs, prep).await
        }
    }
}
