//! Listening, accepting, and running connections.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::error::Error;
use crate::export::{Export, ExportRegistry};
use crate::handshake::{self, Opened};
use crate::transmission;

/// Tunables of a [`Server`]. `Default` gives the values documented on each field.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests of one connection that may be read and not yet answered (default 128).
    /// When reached, the server stops reading from that client until a reply has been
    /// written. Values below 1 count as 1.
    pub max_in_flight: usize,
    /// READ and WRITE payload bytes one connection may hold in memory at once (default
    /// 128 MiB); like `max_in_flight`, a full budget pauses reading. Values below
    /// [`MAX_PAYLOAD`](crate::MAX_PAYLOAD) count as `MAX_PAYLOAD`.
    pub max_in_flight_bytes: u32,
    /// Time a client has from connecting to finishing option negotiation, TLS handshake
    /// included (default 30 s).
    pub handshake_timeout: Duration,
    /// When set, every connection must upgrade to TLS with `NBD_OPT_STARTTLS` before
    /// anything else (the spec's 'FORCEDTLS' mode): other options get
    /// `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME` before TLS closes the connection, and
    /// a client whose TLS handshake fails or that presents no client certificate is
    /// closed. The configuration decides which certificates are accepted; it must ask for
    /// client certificates (Convoy's is `pki::nbd_server_config`). Default `None`: no TLS,
    /// for Unix sockets and explicitly insecure TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 128,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// An NBD server for the exports of an [`ExportRegistry`].
///
/// Cloning is cheap; clones share the registry and the configuration.
///
/// Every connection runs in its own task. Within a connection, requests run
/// concurrently (up to [`ServerConfig::max_in_flight`]) and their replies may come back
/// in any order, as NBD allows. A reply is written only after the device call it
/// answers has returned, so the durability a client gets is exactly what the
/// [`BlockDevice`](crate::BlockDevice) contract promises: data acknowledged by a WRITE
/// reply is durable after a later FLUSH reply (on any connection to the same export)
/// or at once with FUA.
#[derive(Clone, Debug)]
pub struct Server {
    exports: ExportRegistry,
    config: Arc<ServerConfig>,
}

impl Server {
    /// A server with the default [`ServerConfig`].
    pub fn new(exports: ExportRegistry) -> Self {
        Self::with_config(exports, ServerConfig::default())
    }

    /// A server with the given configuration.
    pub fn with_config(exports: ExportRegistry, config: ServerConfig) -> Self {
        Self {
            exports,
            config: Arc::new(config),
        }
    }

    /// The registry this server serves.
    pub fn exports(&self) -> &ExportRegistry {
        &self.exports
    }

    /// Accepts clients on a Unix socket until `shutdown` resolves; see [`Server::serve_tcp`]
    /// for what happens then.
    pub async fn serve_unix(&self, listener: UnixListener, shutdown: impl Future<Output = ()>) {
        self.accept_loop(listener, shutdown).await;
    }

    /// Accepts clients on a TCP socket (with `TCP_NODELAY`) until `shutdown` resolves.
    ///
    /// Then it stops accepting, tells every connection to stop reading requests, and
    /// returns once every connection has answered the requests it had already read and
    /// closed. A client stuck in the handshake is dropped at once. Failed accepts (e.g.
    /// out of file descriptors) are logged and retried after 100 ms. Dropping the returned
    /// future instead aborts all connections at once; writes already passed to the device
    /// still complete, but their replies are lost.
    pub async fn serve_tcp(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.accept_loop(listener, shutdown).await;
    }

    /// Serves one already-connected client (any byte stream) until it disconnects or
    /// the export it opened is removed.
    ///
    /// Returns `Ok` when the client ended the session (NBD_CMD_DISC, NBD_OPT_ABORT or
    /// closing the socket between messages) or the export was removed, and `Err` when it
    /// broke the protocol or the socket failed. In every case, the requests already read
    /// have been executed before this returns.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // No server-wide shutdown for a lone connection: keep the sender alive.
        let (_keep, never) = watch::channel(false);
        self.run_connection(stream, never).await
    }

    async fn run_connection<S>(
        &self,
        stream: S,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let opened = tokio::select! {
            r = tokio::time::timeout(
                self.config.handshake_timeout,
                handshake::handshake(stream, &self.exports, self.config.tls.as_ref()),
            ) => r.map_err(|_| Error::HandshakeTimeout)??,
            () = stopping(&mut shutdown) => return Ok(()),
        };
        match opened {
            Opened::Plain(stream, export) => self.transmit(stream, export, shutdown, false).await,
            Opened::Tls(stream, export) => self.transmit(*stream, export, shutdown, true).await,
            Opened::Closed => {
                debug!("client ended the negotiation");
                Ok(())
            }
        }
    }

    async fn transmit<S>(
        &self,
        stream: S,
        export: Export,
        mut shutdown: watch::Receiver<bool>,
        tls: bool,
    ) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        info!(export = %export.name, size = export.limits.size, read_only = export.limits.read_only, tls, "client opened export");
        // Moved, not cloned: the registry counts these receivers as open connections.
        let mut removed = export.removed;
        let stop = async move {
            tokio::select! {
                () = stopping(&mut shutdown) => {}
                () = async { while removed.changed().await.is_ok() {} } => {}
            }
        };
        let (reader, writer) = tokio::io::split(stream);
        let target = transmission::Target {
            name: &export.name,
            device: export.device,
            limits: export.limits,
            export_bytes: export.budget,
        };
        let result = transmission::serve(reader, writer, target, &self.config, stop).await;
        // Held until here: the connection counts against the export's limit until it ends.
        drop(export.slot);
        result
    }

    async fn accept_loop<L: Listen>(&self, listener: L, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = done {
                        warn!(error = %e, "NBD connection task failed");
                    }
                }
                accepted = listener.accept_stream() => match accepted {
                    Ok((stream, peer)) => {
                        let server = self.clone();
                        let stop = stop_rx.clone();
                        let span = info_span!("nbd", %peer);
                        connections.spawn(
                            async move {
                                debug!("connected");
                                match server.run_connection(stream, stop).await {
                                    Ok(()) => debug!("closed"),
                                    // A vanished client is routine; a protocol breach is worth a warning.
                                    Err(Error::Io(e)) => debug!(error = %e, "closed on I/O error"),
                                    Err(e) => warn!(error = %e, "closed"),
                                }
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => {
                        warn!(error = %e, "accepting an NBD client failed; retrying in 100 ms");
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                },
            }
        }
        drop(listener);
        // Receivers only fail if this sender is gone, which it is not.
        let _ = stop_tx.send(true);
        while let Some(done) = connections.join_next().await {
            if let Err(e) = done {
                warn!(error = %e, "NBD connection task failed");
            }
        }
    }
}

/// Resolves when the server-wide shutdown flag is set. A dropped sender means the server
/// itself is gone (its task set then aborts the connection), so it never resolves then.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Serves `exports` on a Unix socket until `shutdown` resolves, with the default
/// configuration; shorthand for [`Server::serve_unix`].
pub async fn serve_unix(
    listener: UnixListener,
    exports: ExportRegistry,
    shutdown: impl Future<Output = ()>,
) {
    Server::new(exports).serve_unix(listener, shutdown).await;
}

/// Serves `exports` on a TCP socket until `shutdown` resolves, with the default
/// configuration; shorthand for [`Server::serve_tcp`].
pub async fn serve_tcp(
    listener: TcpListener,
    exports: ExportRegistry,
    shutdown: impl Future<Output = ()>,
) {
    Server::new(exports).serve_tcp(listener, shutdown).await;
}

/// The listeners the server can accept from.
trait Listen {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next client and a printable peer address.
    fn accept_stream(&self) -> impl Future<Output = io::Result<(Self::Stream, String)>>;
}

impl Listen for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "unix".to_owned()))
    }
}

impl Listen for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.accept().await?;
        // Replies are small and latency-bound; do not let Nagle hold them back. Without
        // it the connection still works, only slower.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "could not set TCP_NODELAY");
        }
        Ok((stream, peer.to_string()))
    }
}
