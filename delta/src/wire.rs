//! Thin framing over the transport: encode, count, check the session binding.

use std::sync::Arc;

use bytes::Bytes;
use convoy_transport::{FramedRecv, FramedSend};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::DeltaError;
use crate::proto::{Binding, Msg, decode, encode};
use crate::stats::Counters;

/// Messages buffered from the control stream before the reader waits for the session.
const CONTROL_QUEUE: usize = 64;

/// The sending half of a session stream.
pub(crate) struct Sender {
    pub(crate) send: FramedSend,
    pub(crate) peer: u64,
    pub(crate) counters: Arc<Counters>,
}

impl Sender {
    pub(crate) fn new(send: FramedSend, peer: u64, counters: Arc<Counters>) -> Self {
        Self {
            send,
            peer,
            counters,
        }
    }

    /// Sends one message as one frame.
    pub(crate) async fn msg(&mut self, msg: &Msg) -> Result<(), DeltaError> {
        let bytes = encode(msg).map_err(|e| DeltaError::Protocol {
            peer: self.peer,
            detail: format!("cannot encode {}: {e}", msg.name()),
        })?;
        self.counters.frame(bytes.len(), msg.hash_nodes());
        self.send.send_frame_bytes(Bytes::from(bytes)).await?;
        Ok(())
    }

    /// Sends raw chunk bytes as one frame, without copying them.
    pub(crate) async fn payload(&mut self, payload: Bytes) -> Result<(), DeltaError> {
        self.counters.frame(payload.len(), None);
        self.send.send_frame_bytes(payload).await?;
        Ok(())
    }

    /// Ends this direction cleanly.
    pub(crate) fn finish(&mut self) -> Result<(), DeltaError> {
        self.send.finish()?;
        Ok(())
    }

    /// Best effort: tells the peer why the session failed.
    pub(crate) async fn abort(&mut self, binding: Binding, err: &DeltaError) {
        let message = err.to_string();
        let _ = self.msg(&Msg::Abort { binding, message }).await;
        let _ = self.send.finish();
    }
}

/// Decodes a frame and checks that it belongs to the session.
pub(crate) fn check(frame: &[u8], binding: &Binding, peer: u64) -> Result<Msg, DeltaError> {
    let msg = decode(frame).map_err(|e| DeltaError::Protocol {
        peer,
        detail: format!("undecodable message: {e}"),
    })?;
    if msg.binding() != binding {
        return Err(DeltaError::Protocol {
            peer,
            detail: format!(
                "{} bound to cg {} disk {} epoch {} session {:#x} arrived on the session of cg {} disk {} epoch {} session {:#x}; refused",
                msg.name(),
                msg.binding().cg,
                msg.binding().disk,
                msg.binding().epoch,
                msg.binding().session,
                binding.cg,
                binding.disk,
                binding.epoch,
                binding.session
            ),
        });
    }
    if let Msg::Abort { message, .. } = msg {
        return Err(DeltaError::Remote { peer, message });
    }
    Ok(msg)
}

/// Receives the next message of a session stream; `None` on a clean end.
pub(crate) async fn recv(
    recv: &mut FramedRecv,
    binding: &Binding,
    peer: u64,
    counters: &Counters,
) -> Result<Option<Msg>, DeltaError> {
    let Some(frame) = recv.recv_frame().await? else {
        return Ok(None);
    };
    let msg = check(&frame, binding, peer);
    counters.frame(frame.len(), msg.as_ref().ok().and_then(Msg::hash_nodes));
    msg.map(Some)
}

/// Reads the control stream in its own task, so the session can wait on it and on its
/// data tasks at once (a frame read is not safe to cancel half-way).
pub(crate) struct ControlReader {
    rx: mpsc::Receiver<Result<Msg, DeltaError>>,
    task: JoinHandle<()>,
    peer: u64,
}

impl ControlReader {
    pub(crate) fn spawn(
        mut stream: FramedRecv,
        binding: Binding,
        peer: u64,
        counters: Arc<Counters>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let task = tokio::spawn(async move {
            loop {
                let next = recv(&mut stream, &binding, peer, &counters).await;
                let stop = !matches!(next, Ok(Some(_)));
                let item = match next {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(DeltaError::Protocol {
                        peer,
                        detail: "control stream ended before the session completed".into(),
                    }),
                    Err(e) => Err(e),
                };
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        Self { rx, task, peer }
    }

    /// The next control message; an `Abort` from the peer arrives as
    /// [`DeltaError::Remote`].
    pub(crate) async fn next(&mut self) -> Result<Msg, DeltaError> {
        match self.rx.recv().await {
            Some(item) => item,
            None => Err(DeltaError::Protocol {
                peer: self.peer,
                detail: "control stream closed".into(),
            }),
        }
    }

    /// An `Abort` the peer sent, if one arrives within `wait` (used after a local
    /// failure, to report the peer's reason rather than the broken stream it caused).
    pub(crate) async fn peer_abort(&mut self, wait: std::time::Duration) -> Option<DeltaError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Err(e @ DeltaError::Remote { .. }))) => return Some(e),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }
}

impl Drop for ControlReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn binding(session: u64, epoch: u64) -> Binding {
        Binding {
            cg: 1,
            disk: 2,
            epoch,
            session,
        }
    }

    #[test]
    fn messages_of_another_session_or_epoch_are_refused() {
        let ours = binding(10, 5);
        let msg = |b| {
            encode(&Msg::StreamEnd {
                binding: b,
                stream: 0,
                totals: Default::default(),
            })
            .unwrap()
        };
        assert!(check(&msg(ours), &ours, 9).is_ok());
        for other in [binding(11, 5), binding(10, 4)] {
            let e = check(&msg(other), &ours, 9).unwrap_err();
            assert!(
                matches!(&e, DeltaError::Protocol { peer: 9, detail } if detail.contains("refused")),
                "{e:?}"
            );
        }
        let abort = encode(&Msg::Abort {
            binding: ours,
            message: "disk full".into(),
        })
        .unwrap();
        assert!(matches!(
            check(&abort, &ours, 9),
            Err(DeltaError::Remote { peer: 9, message }) if message == "disk full"
        ));
        assert!(check(&[1, 2, 3], &ours, 9).is_err());
    }
}
