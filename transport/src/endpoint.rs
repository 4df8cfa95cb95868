//! One QUIC endpoint per agent: accepts connections from other nodes and dials them,
//! keeping one cached connection per peer.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectError, ConnectionError, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::backoff::Health;
use crate::config::TransportConfig;
use crate::error::TransportError;
use crate::pki::{self, PeerIdentity, PkiError, TlsIdentity};
use crate::stream::{FramedRecv, FramedSend, StreamKind, connection_error};
use crate::{ALPN, codes};

/// A Convoy agent's QUIC endpoint: server and client on one UDP port.
///
/// Cheap to clone; clones share the socket, the connection cache and the peer states.
/// Dropping the last clone closes the endpoint (like [`close`](Self::close), without
/// waiting). Must be created and used inside a tokio runtime.
///
/// Guarantees:
/// - a dialed connection is used only if the server's certificate chains to the cluster
///   CA, names `node-<peer>`, and proves identity `Node(peer)`;
/// - at most one connection per peer is cached; concurrent calls share it and at most one
///   dial to a peer runs at a time;
/// - after a failed dial the peer is in backoff (50 ms doubling to 1 s by default) and
///   calls fail fast with [`TransportError::Unreachable`];
/// - a closed cached connection is dropped (a restarted peer resets it at once), so the
///   next call redials (a peer restarted at the same address is reached again);
/// - a node named in [`set_retired_peers`](Self::set_retired_peers) gets nothing: its TLS
///   handshakes fail, its open connections are closed, its streams are reset, and we
///   neither dial it nor use a connection to it (see there).
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

struct Inner {
    /// Taken out by `close`, so the socket is released once in-flight work ends even while
    /// callers still hold clones of the `Endpoint`.
    quinn: Mutex<Option<quinn::Endpoint>>,
    local_node: u64,
    local_addr: SocketAddr,
    cfg: TransportConfig,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    accept_task: JoinHandle<()>,
    closed: AtomicBool,
    refusals: Arc<Refusals>,
}

/// The nodes refused everywhere, shared by the TLS verifier, the accepting tasks and the
/// dialing side, and the count of what was refused.
struct Refusals {
    /// Watched, so connections accepted before a node was retired notice and close.
    retired: watch::Sender<Arc<BTreeSet<u64>>>,
    retired_count: AtomicU64,
    not_a_node_count: AtomicU64,
}

impl Refusals {
    fn is_retired(&self, node: u64) -> bool {
        self.retired.borrow().contains(&node)
    }

    /// Whether `node` is retired; counts a refusal if so.
    fn refuse_retired(&self, node: u64) -> bool {
        let refused = self.is_retired(node);
        if refused {
            self.retired_count.fetch_add(1, Ordering::Relaxed);
        }
        refused
    }
}

/// How many connections, streams and dials an [`Endpoint`] refused, by reason, since it
/// was bound. Counters only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusalCounts {
    /// Refused because the peer is a retired node: TLS handshakes, accepted connections
    /// closed, streams reset, and dials not made.
    pub retired: u64,
    /// Connections closed because the certificate was not a node's (an admin or NBD
    /// client certificate).
    pub not_a_node: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.accept_task.abort();
        if let Some(quinn) = lock(&self.quinn).take() {
            quinn.close(VarInt::from_u32(codes::SHUTDOWN), b"endpoint dropped");
        }
    }
}

/// Dial state of one peer.
struct Peer {
    /// Woken whenever a dial to this peer ends.
    dialed: tokio::sync::Notify,
    slot: Mutex<Slot>,
}

struct Slot {
    addr: SocketAddr,
    conn: Option<quinn::Connection>,
    health: Health,
    /// A dial task is running (at most one per peer).
    dialing: bool,
    /// Counts finished dials, so a waiter knows whether the outcome is news to it.
    dial_seq: u64,
    /// Why the last dial failed, replayed to the callers that waited for it.
    last_dial_failure: Option<DialFailure>,
}

/// A failed dial's error, kept so every caller waiting on that dial gets the same class.
#[derive(Clone)]
enum DialFailure {
    Unreachable(String),
    Refused(String),
    Tls(String),
    WrongPeer(PeerIdentity),
    Closed,
}

impl DialFailure {
    fn of(e: &TransportError) -> Self {
        match e {
            TransportError::Tls { reason, .. } => DialFailure::Tls(reason.clone()),
            TransportError::WrongPeer { found, .. } => DialFailure::WrongPeer(found.clone()),
            TransportError::Closed => DialFailure::Closed,
            TransportError::Refused { reason, .. } => DialFailure::Refused(reason.clone()),
            TransportError::Unreachable { reason, .. } => DialFailure::Unreachable(reason.clone()),
            other => DialFailure::Unreachable(other.to_string()),
        }
    }

    fn replay(&self, peer: u64, addr: SocketAddr) -> TransportError {
        match self.clone() {
            DialFailure::Unreachable(reason) => TransportError::Unreachable { peer, addr, reason },
            DialFailure::Tls(reason) => TransportError::Tls { peer, addr, reason },
            DialFailure::Refused(reason) => TransportError::Refused { peer, reason },
            DialFailure::WrongPeer(found) => TransportError::WrongPeer {
                expected: peer,
                addr,
                found,
            },
            DialFailure::Closed => TransportError::Closed,
        }
    }
}

/// A snapshot of what the endpoint knows about one dialed peer, for status output.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerState {
    /// The peer's node id.
    pub node: u64,
    /// The address last used to dial it.
    pub addr: SocketAddr,
    /// Whether a cached outbound connection is currently open.
    pub connected: bool,
    /// When a dial or request to it last succeeded.
    pub last_ok: Option<Instant>,
    /// The last error seen with it (kept after later successes).
    pub last_error: Option<String>,
    /// Failed dials since the last success.
    pub dial_failures: u32,
    /// While set and in the future, calls fail fast instead of redialing.
    pub backoff_until: Option<Instant>,
}

/// Streams opened to this endpoint by other nodes, in arrival order.
///
/// Yields `None` once the endpoint is closed or dropped and every accepted stream has been
/// delivered. If the `Inbound` is dropped, new streams are reset with
/// [`codes::NOT_ACCEPTING`].
pub struct Inbound {
    rx: mpsc::Receiver<InboundStream>,
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbound").finish_non_exhaustive()
    }
}

impl Inbound {
    /// The next accepted stream, or `None` when no more will arrive.
    pub async fn next(&mut self) -> Option<InboundStream> {
        self.rx.recv().await
    }
}

/// A stream another node opened to us, with its kind already read.
#[derive(Debug)]
pub struct InboundStream {
    /// The node that opened it, as proven by its certificate (not by anything it sent).
    pub peer: u64,
    /// What the stream carries, as declared by its first byte.
    pub kind: StreamKind,
    /// Our sending half (responses).
    pub send: FramedSend,
    /// Our receiving half (the peer's frames).
    pub recv: FramedRecv,
}

impl InboundStream {
    /// Reads the request frame of a request/response exchange (see
    /// [`Endpoint::request`]). Fails with [`TransportError::Protocol`] if the stream ends
    /// without a frame.
    pub async fn read_request(&mut self) -> Result<Bytes, TransportError> {
        match self.recv.recv_frame().await? {
            Some(frame) => Ok(frame),
            None => Err(TransportError::Protocol {
                peer: self.peer,
                detail: "stream ended without a request frame".into(),
            }),
        }
    }

    /// Sends `response` as the single response frame and finishes the stream.
    pub async fn respond(mut self, response: &[u8]) -> Result<(), TransportError> {
        self.send.send_frame(response).await?;
        self.send.finish()
    }

    /// Like [`respond`](Self::respond) without copying `response`.
    pub async fn respond_bytes(mut self, response: Bytes) -> Result<(), TransportError> {
        self.send.send_frame_bytes(response).await?;
        self.send.finish()
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_node", &self.inner.local_node)
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

/// Recovers the guard of a poisoned lock: the data behind these locks stays consistent
/// across a panic (every update is a single assignment), so carrying on is safe.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Endpoint {
    /// Binds a UDP socket at `addr` (port 0 picks a free port) and starts serving.
    ///
    /// `identity` must be node `local_node`'s own certificate, else
    /// [`TransportError::IdentityMismatch`]. Returns the endpoint and the receiver of
    /// streams other nodes open to it. Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        local_node: u64,
        identity: &TlsIdentity,
        cfg: TransportConfig,
    ) -> Result<(Endpoint, Inbound), TransportError> {
        match identity.identity() {
            PeerIdentity::Node(n) if *n == local_node => {}
            other => {
                return Err(TransportError::IdentityMismatch {
                    local_node,
                    found: other.clone(),
                });
            }
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TransportError::Config(
                "Endpoint::bind must be called inside a tokio runtime".into(),
            ));
        }
        let transport = Arc::new(cfg.quinn_transport()?);
        let tls_error = |e: quinn::crypto::rustls::NoInitialCipherSuite| {
            TransportError::Pki(PkiError::Tls(e.to_string()))
        };

        let refusals = Arc::new(Refusals {
            retired: watch::Sender::new(Arc::new(BTreeSet::new())),
            retired_count: AtomicU64::new(0),
            not_a_node_count: AtomicU64::new(0),
        });
        let admit_refusals = Arc::clone(&refusals);
        // Retired nodes fail the handshake itself; other kinds of certificate pass here
        // and are closed with a reason code once their identity is read.
        let admit: pki::Admit = Arc::new(move |id: &PeerIdentity| match id {
            PeerIdentity::Node(n) => !admit_refusals.refuse_retired(*n),
            _ => true,
        });
        let server_crypto =
            QuicServerConfig::try_from(pki::server_config_admitting(identity, &[ALPN], admit)?)
                .map_err(tls_error)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());

        let client_crypto = QuicClientConfig::try_from(pki::client_config(identity, &[ALPN])?)
            .map_err(tls_error)?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);

        let reset_key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &identity.stateless_reset_secret());
        let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(reset_key));
        // quinn's default CIDs carry a per-process signature, so a restarted agent would
        // drop packets for its old connections silently instead of answering with the
        // stateless reset that lets peers reconnect at once.
        endpoint_cfg.cid_generator(|| Box::new(RandomCids));
        endpoint_cfg
            .max_udp_payload_size(cfg.max_udp_payload_size)
            .map_err(|e| TransportError::Config(format!("max_udp_payload_size: {e}")))?;

        let socket = bind_socket(addr, &cfg)?;
        let mut quinn_ep = quinn::Endpoint::new(
            endpoint_cfg,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TransportError::Bind { addr, source })?;
        quinn_ep.set_default_client_config(client);
        let local_addr = quinn_ep
            .local_addr()
            .map_err(|source| TransportError::Bind { addr, source })?;

        let (tx, rx) = mpsc::channel(cfg.inbound_queue);
        let ctx = Arc::new(AcceptCtx {
            max_frame: cfg.max_frame_size,
            header_timeout: cfg.stream_header_timeout,
            tx,
            refusals: Arc::clone(&refusals),
        });
        let accept_task = tokio::spawn(accept_loop(quinn_ep.clone(), ctx));
        info!(node = local_node, %local_addr, "QUIC endpoint listening");

        let inner = Inner {
            quinn: Mutex::new(Some(quinn_ep)),
            local_node,
            local_addr,
            cfg,
            peers: Mutex::new(HashMap::new()),
            accept_task,
            closed: AtomicBool::new(false),
            refusals,
        };
        Ok((
            Endpoint {
                inner: Arc::new(inner),
            },
            Inbound { rx },
        ))
    }

    /// The node id this endpoint was bound as.
    pub fn local_node(&self) -> u64 {
        self.inner.local_node
    }

    /// The UDP address actually bound (with the real port if port 0 was requested).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Sends one request to node `peer` at `addr` and returns its single response frame.
    ///
    /// Opens a stream of `kind`, sends `payload` as one frame, finishes the stream, and
    /// reads one frame back; the whole exchange, including a dial if needed, is bounded by
    /// `timeout`. On [`TransportError::Timeout`] the request may or may not have been
    /// processed, and the cached connection is dropped so the next call redials.
    pub async fn request(
        &self,
        peer: u64,
        addr: SocketAddr,
        kind: StreamKind,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let deadline = Instant::now() + timeout;
        let conn = self.connection(peer, addr, deadline).await?;
        let exchange = async {
            let (mut send, mut recv) = self.open_on(&conn, peer, addr, kind).await?;
            send.send_frame(payload).await?;
            send.finish()?;
            match recv.recv_frame().await? {
                Some(response) => Ok(response),
                None => Err(TransportError::Protocol {
                    peer,
                    detail: format!(
                        "node {peer} ended the {kind} stream without a response; see its log"
                    ),
                }),
            }
        };
        let result = match tokio::time::timeout_at(deadline.into(), exchange).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                peer,
                after: timeout,
            }),
        };
        self.record(peer, &conn, &result);
        result
    }

    /// Opens a framed stream of `kind` to node `peer` at `addr`, dialing if needed (the
    /// dial is bounded by the connect timeout), for bulk transfers of many frames.
    ///
    /// Opening waits if the peer's concurrent-stream limit is reached. Finish the send half
    /// when done; dropping it unfinished resets the stream.
    pub async fn open_stream(
        &self,
        peer: u64,
        addr: SocketAddr,
        kind: StreamKind,
    ) -> Result<(FramedSend, FramedRecv), TransportError> {
        let deadline = Instant::now() + self.inner.cfg.connect_timeout;
        let conn = self.connection(peer, addr, deadline).await?;
        let result = self.open_on(&conn, peer, addr, kind).await;
        self.record(peer, &conn, &result);
        result
    }

    /// What the endpoint knows about every peer it has dialed, ordered by node id.
    pub fn peer_states(&self) -> Vec<PeerState> {
        let now = Instant::now();
        let peers: Vec<(u64, Arc<Peer>)> = lock(&self.inner.peers)
            .iter()
            .map(|(id, p)| (*id, p.clone()))
            .collect();
        let mut states: Vec<PeerState> = peers
            .into_iter()
            .map(|(node, peer)| {
                let slot = lock(&peer.slot);
                PeerState {
                    node,
                    addr: slot.addr,
                    connected: slot
                        .conn
                        .as_ref()
                        .is_some_and(|c| c.close_reason().is_none()),
                    last_ok: slot.health.last_ok,
                    last_error: slot.health.last_error.clone(),
                    dial_failures: slot.health.failures(),
                    backoff_until: slot.health.blocked_until(now),
                }
            })
            .collect();
        states.sort_by_key(|s| s.node);
        states
    }

    /// Sets the nodes this endpoint refuses (the cluster's retired nodes), replacing the
    /// previous set. Cheap when the set is unchanged, so callers may call it on every
    /// model change.
    ///
    /// From the moment it returns, for every node in `ids`: a TLS handshake presenting its
    /// certificate fails; every connection it has open to us is closed with
    /// [`codes::RETIRED`] and every new stream on one not yet closed is reset with it;
    /// [`request`](Self::request) and [`open_stream`](Self::open_stream) to it fail with
    /// [`TransportError::Refused`] without sending anything, and our cached connection to
    /// it is closed. Each refusal is counted in [`refusals`](Self::refusals). Removing an
    /// id from the set lets the node in again.
    pub fn set_retired_peers(&self, ids: impl IntoIterator<Item = u64>) {
        let new: BTreeSet<u64> = ids
            .into_iter()
            .filter(|&id| id != self.inner.local_node)
            .collect();
        let changed = self.inner.refusals.retired.send_if_modified(|set| {
            if **set == new {
                return false;
            }
            *set = Arc::new(new.clone());
            true
        });
        if !changed {
            return;
        }
        info!(retired = ?new, "refusing retired nodes on every connection and stream");
        let peers: Vec<(u64, Arc<Peer>)> = lock(&self.inner.peers)
            .iter()
            .filter(|(id, _)| new.contains(id))
            .map(|(id, p)| (*id, Arc::clone(p)))
            .collect();
        for (id, peer) in peers {
            if let Some(conn) = lock(&peer.slot).conn.take() {
                debug!(peer = id, "closing our connection to a retired node");
                conn.close(VarInt::from_u32(codes::RETIRED), b"node is retired");
            }
        }
    }

    /// How many connections, streams and dials this endpoint refused so far, by reason.
    pub fn refusals(&self) -> RefusalCounts {
        let r = &self.inner.refusals;
        RefusalCounts {
            retired: r.retired_count.load(Ordering::Relaxed),
            not_a_node: r.not_a_node_count.load(Ordering::Relaxed),
        }
    }

    /// Forgets a peer (for example one removed from the cluster): closes its cached
    /// connection and drops its state. Streams already open on it fail.
    pub fn remove_peer(&self, peer: u64) {
        if let Some(entry) = lock(&self.inner.peers).remove(&peer) {
            if let Some(conn) = lock(&entry.slot).conn.take() {
                conn.close(VarInt::from_u32(codes::SHUTDOWN), b"peer removed");
            }
        }
    }

    /// Closes the endpoint gracefully: peers are told the connections are closing, no new
    /// connections or streams are accepted, and later calls fail with
    /// [`TransportError::Closed`]. Returns once connections have drained or after the idle
    /// timeout, whichever is first; the UDP socket is released shortly after, even if
    /// clones of this `Endpoint` are still held. [`Inbound::next`] then returns `None` after
    /// delivering what was already accepted.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let Some(quinn) = lock(&self.inner.quinn).take() else {
            return;
        };
        quinn.close(VarInt::from_u32(codes::SHUTDOWN), b"agent shutting down");
        self.inner.accept_task.abort();
        for peer in lock(&self.inner.peers).values() {
            lock(&peer.slot).conn = None;
        }
        let _ = tokio::time::timeout(self.inner.cfg.idle_timeout, quinn.wait_idle()).await;
    }

    /// A handle on the quinn endpoint, unless the endpoint was closed.
    fn quinn(&self) -> Result<quinn::Endpoint, TransportError> {
        lock(&self.inner.quinn)
            .clone()
            .ok_or(TransportError::Closed)
    }

    async fn open_on(
        &self,
        conn: &quinn::Connection,
        peer: u64,
        addr: SocketAddr,
        kind: StreamKind,
    ) -> Result<(FramedSend, FramedRecv), TransportError> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| connection_error(peer, addr, &e))?;
        let max = self.inner.cfg.max_frame_size;
        let mut send = FramedSend::new(send, peer, addr, max);
        let recv = FramedRecv::new(recv, peer, addr, max);
        send.write(&[kind.as_u8()]).await?;
        Ok((send, recv))
    }

    /// Updates the peer's state after a call on `conn`.
    fn record<T>(&self, peer: u64, conn: &quinn::Connection, result: &Result<T, TransportError>) {
        let Some(entry) = lock(&self.inner.peers).get(&peer).cloned() else {
            return;
        };
        let mut slot = lock(&entry.slot);
        match result {
            Ok(_) => slot.health.succeeded(Instant::now()),
            Err(e) => {
                // A timeout alone does not condemn the connection: Raft's heartbeat RPCs
                // have TTLs of tens of milliseconds, and redialing on each would never let
                // a handshake finish. A dead peer is detected by the idle timeout, or at
                // once by its stateless reset when it restarts.
                let drop_conn = matches!(
                    e,
                    TransportError::ConnectionLost { .. }
                        | TransportError::Tls { .. }
                        | TransportError::Refused { .. }
                );
                if drop_conn
                    && slot
                        .conn
                        .as_ref()
                        .is_some_and(|c| c.stable_id() == conn.stable_id())
                {
                    debug!(peer, error = %e, "dropping cached connection");
                    slot.conn = None;
                }
                slot.health.failed(e.to_string());
            }
        }
    }

    fn peer_entry(&self, peer: u64, addr: SocketAddr) -> Arc<Peer> {
        let mut peers = lock(&self.inner.peers);
        let entry = peers
            .entry(peer)
            .or_insert_with(|| {
                Arc::new(Peer {
                    dialed: tokio::sync::Notify::new(),
                    slot: Mutex::new(Slot {
                        addr,
                        conn: None,
                        health: Health::default(),
                        dialing: false,
                        dial_seq: 0,
                        last_dial_failure: None,
                    }),
                })
            })
            .clone();
        drop(peers);
        let mut slot = lock(&entry.slot);
        if slot.addr != addr {
            info!(peer, old = %slot.addr, new = %addr, "peer address changed");
            slot.addr = addr;
            slot.conn = None;
            slot.health.address_changed();
        }
        drop(slot);
        entry
    }

    /// The cached connection if it is open; an error if the peer is in backoff; `None` if a
    /// dial is needed.
    fn cached(
        &self,
        entry: &Peer,
        peer: u64,
        addr: SocketAddr,
    ) -> Result<Option<quinn::Connection>, TransportError> {
        let now = Instant::now();
        let cfg = &self.inner.cfg;
        let mut slot = lock(&entry.slot);
        if let Some(conn) = &slot.conn {
            let Some(reason) = conn.close_reason() else {
                return Ok(Some(conn.clone()));
            };
            let err = connection_error(peer, addr, &reason);
            slot.conn = None;
            if matches!(
                err,
                TransportError::Tls { .. } | TransportError::Refused { .. }
            ) {
                // The peer refused our certificate right after the handshake: as bad as a
                // failed dial, so back off rather than redial on every call.
                slot.health
                    .dial_failed(now, err.to_string(), cfg.backoff_initial, cfg.backoff_max);
            } else {
                slot.health.failed(err.to_string());
            }
        }
        if let Some(until) = slot.health.blocked_until(now) {
            return Err(TransportError::Unreachable {
                peer,
                addr,
                reason: format!(
                    "not redialing for another {} ms after: {}",
                    (until - now).as_millis(),
                    slot.health.last_error.as_deref().unwrap_or("a failed dial")
                ),
            });
        }
        Ok(None)
    }

    async fn connection(
        &self,
        peer: u64,
        addr: SocketAddr,
        deadline: Instant,
    ) -> Result<quinn::Connection, TransportError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(TransportError::Closed);
        }
        if self.inner.refusals.refuse_retired(peer) {
            return Err(TransportError::Refused {
                peer,
                reason: format!("node {peer} is retired; its certificate opens nothing"),
            });
        }
        let entry = self.peer_entry(peer, addr);
        let started = Instant::now();
        loop {
            let notified = entry.dialed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(conn) = self.cached(&entry, peer, addr)? {
                return Ok(conn);
            }
            let seq = lock(&entry.slot).dial_seq;
            self.start_dial(&entry, peer, addr);
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(TransportError::Unreachable {
                    peer,
                    addr,
                    reason: format!(
                        "no QUIC handshake completed within {} ms (still dialing in the background)",
                        started.elapsed().as_millis()
                    ),
                });
            }
            let slot = lock(&entry.slot);
            if slot.dial_seq > seq {
                if let Some(failure) = &slot.last_dial_failure {
                    return Err(failure.replay(peer, addr));
                }
            }
        }
    }

    /// Starts a dial to `peer` unless one is running. The dial runs in its own task bounded
    /// only by the connect timeout, so a caller with a short deadline (a heartbeat) never
    /// cuts short, and backs off, a dial that would have succeeded.
    fn start_dial(&self, entry: &Arc<Peer>, peer: u64, addr: SocketAddr) {
        {
            let mut slot = lock(&entry.slot);
            if slot.dialing {
                return;
            }
            slot.dialing = true;
        }
        let this = self.clone();
        let entry = Arc::clone(entry);
        tokio::spawn(async move {
            let cfg = &this.inner.cfg;
            let result = this
                .dial(peer, addr, Instant::now() + cfg.connect_timeout)
                .await;
            let now = Instant::now();
            {
                let mut slot = lock(&entry.slot);
                slot.dialing = false;
                slot.dial_seq += 1;
                // If the address changed meanwhile, the outcome says nothing about the new one.
                if slot.addr == addr {
                    match result {
                        Ok(conn) => {
                            slot.conn = Some(conn);
                            slot.health.succeeded(now);
                            slot.last_dial_failure = None;
                            debug!(peer, %addr, "connected");
                        }
                        Err(e) => {
                            let reason = match &e {
                                TransportError::Unreachable { reason, .. } => reason.clone(),
                                other => other.to_string(),
                            };
                            debug!(peer, %addr, %reason, "dial failed");
                            slot.health.dial_failed(
                                now,
                                reason,
                                cfg.backoff_initial,
                                cfg.backoff_max,
                            );
                            slot.last_dial_failure = Some(DialFailure::of(&e));
                        }
                    }
                }
            }
            entry.dialed.notify_waiters();
        });
    }

    async fn dial(
        &self,
        peer: u64,
        addr: SocketAddr,
        deadline: Instant,
    ) -> Result<quinn::Connection, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable { peer, addr, reason };
        let connecting = self
            .quinn()?
            .connect(addr, &pki::node_server_name(peer))
            .map_err(|e| match e {
                ConnectError::EndpointStopping => TransportError::Closed,
                other => unreachable(format!("cannot start a connection: {other}")),
            })?;
        let started = Instant::now();
        let conn = match tokio::time::timeout_at(deadline.into(), connecting).await {
            Err(_) => {
                return Err(unreachable(format!(
                    "no QUIC handshake completed within {} ms",
                    started.elapsed().as_millis()
                )));
            }
            Ok(Err(ConnectionError::LocallyClosed)) => return Err(TransportError::Closed),
            Ok(Err(ConnectionError::TimedOut)) => {
                return Err(unreachable("QUIC handshake timed out".into()));
            }
            Ok(Err(e)) => {
                return Err(match connection_error(peer, addr, &e) {
                    tls @ TransportError::Tls { .. } => tls,
                    other => unreachable(other.to_string()),
                });
            }
            Ok(Ok(conn)) => conn,
        };
        match peer_identity(&conn) {
            Ok(PeerIdentity::Node(n)) if n == peer => Ok(conn),
            Ok(found) => {
                conn.close(VarInt::from_u32(codes::WRONG_PEER), b"wrong node identity");
                warn!(peer, %addr, %found, "dialed node presented another identity");
                Err(TransportError::WrongPeer {
                    expected: peer,
                    addr,
                    found,
                })
            }
            Err(reason) => {
                conn.close(VarInt::from_u32(codes::PROTOCOL), b"no usable identity");
                Err(TransportError::Tls { peer, addr, reason })
            }
        }
    }
}

/// Random 8-byte connection ids that any instance of this node accepts as its own.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Reads the identity proven by the certificate the peer presented on `conn`.
fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, String> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "peer identity is not an X.509 certificate chain".to_string())?;
    let leaf = certs
        .first()
        .ok_or_else(|| "peer presented an empty certificate chain".to_string())?;
    pki::identity_from_cert(leaf).map_err(|e| e.to_string())
}

fn bind_socket(
    addr: SocketAddr,
    cfg: &TransportConfig,
) -> Result<std::net::UdpSocket, TransportError> {
    let bind_err = |source| TransportError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(bind_err)?;
    // Larger socket buffers absorb bursts at high throughput; the kernel may cap them,
    // which costs speed, not correctness.
    if let Err(e) = state.set_send_buffer_size((&socket).into(), cfg.socket_send_buffer) {
        warn!(%addr, error = %e, "cannot set UDP send buffer size");
    }
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), cfg.socket_recv_buffer) {
        warn!(%addr, error = %e, "cannot set UDP receive buffer size");
    }
    if let Ok(actual) = state.recv_buffer_size((&socket).into()) {
        if actual < cfg.socket_recv_buffer {
            info!(
                %addr, requested = cfg.socket_recv_buffer, actual,
                "kernel capped the UDP receive buffer; raise net.core.rmem_max for bulk throughput"
            );
        }
    }
    Ok(socket)
}

/// What the accepting tasks share.
struct AcceptCtx {
    max_frame: usize,
    header_timeout: Duration,
    tx: mpsc::Sender<InboundStream>,
    refusals: Arc<Refusals>,
}

async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<AcceptCtx>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming, ctx.clone()));
    }
}

async fn serve_connection(incoming: quinn::Incoming, ctx: Arc<AcceptCtx>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            warn!(%remote, error = %e, "refused an incoming connection (handshake failed)");
            return;
        }
    };
    let node = match peer_identity(&conn) {
        Ok(PeerIdentity::Node(node)) => node,
        Ok(other) => {
            warn!(%remote, identity = %other, "refused a certificate that is not a node's on the node transport");
            ctx.refusals
                .not_a_node_count
                .fetch_add(1, Ordering::Relaxed);
            conn.close(
                VarInt::from_u32(codes::NOT_A_NODE),
                b"only node certificates may use the node transport; the CLI uses the admin API",
            );
            return;
        }
        Err(reason) => {
            warn!(%remote, %reason, "refused a connection without a usable identity");
            conn.close(VarInt::from_u32(codes::PROTOCOL), b"no usable identity");
            return;
        }
    };
    let mut retired = ctx.refusals.retired.subscribe();
    // Retired between its TLS handshake and here: the verifier let it in just before.
    if ctx.refusals.refuse_retired(node) {
        refuse_retired_connection(&conn, node, remote);
        return;
    }
    debug!(peer = node, %remote, "accepted connection");
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    tokio::spawn(serve_stream(node, remote, send, recv, ctx.clone()));
                }
                Err(e) => {
                    debug!(peer = node, %remote, error = %e, "connection ended");
                    return;
                }
            },
            changed = retired.changed() => {
                // The endpoint is gone: its accept task ends, and so does this.
                if changed.is_err() {
                    return;
                }
                if ctx.refusals.refuse_retired(node) {
                    refuse_retired_connection(&conn, node, remote);
                    return;
                }
            }
        }
    }
}

fn refuse_retired_connection(conn: &quinn::Connection, node: u64, remote: SocketAddr) {
    warn!(peer = node, %remote, "closed a connection from a retired node");
    conn.close(
        VarInt::from_u32(codes::RETIRED),
        b"this node is retired from the cluster; its certificate opens nothing",
    );
}

async fn serve_stream(
    node: u64,
    remote: SocketAddr,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    ctx: Arc<AcceptCtx>,
) {
    let mut send = FramedSend::new(send, node, remote, ctx.max_frame);
    let mut recv = FramedRecv::new(recv, node, remote, ctx.max_frame);
    let refuse = |send: &mut FramedSend, recv: &mut FramedRecv, code: u32| {
        send.reset(code);
        recv.stop(code);
    };
    // A stream opened in the instant between the node's retirement and its connection
    // closing: refused like the connection.
    if ctx.refusals.refuse_retired(node) {
        warn!(peer = node, "refused a stream from a retired node");
        refuse(&mut send, &mut recv, codes::RETIRED);
        return;
    }
    let kind = match tokio::time::timeout(ctx.header_timeout, recv.read_kind()).await {
        Ok(Ok(Some(byte))) => match StreamKind::from_u8(byte) {
            Some(kind) => kind,
            None => {
                warn!(peer = node, kind = byte, "refused a stream of unknown kind");
                refuse(&mut send, &mut recv, codes::UNKNOWN_STREAM_KIND);
                return;
            }
        },
        Ok(Ok(None)) => {
            debug!(peer = node, "stream ended before its kind byte");
            refuse(&mut send, &mut recv, codes::PROTOCOL);
            return;
        }
        Ok(Err(e)) => {
            debug!(peer = node, error = %e, "stream failed before its kind byte");
            return;
        }
        Err(_) => {
            warn!(peer = node, "stream sent no kind byte in time");
            refuse(&mut send, &mut recv, codes::PROTOCOL);
            return;
        }
    };
    let stream = InboundStream {
        peer: node,
        kind,
        send,
        recv,
    };
    if let Err(mpsc::error::SendError(mut stream)) = ctx.tx.send(stream).await {
        refuse(&mut stream.send, &mut stream.recv, codes::NOT_ACCEPTING);
    }
}
