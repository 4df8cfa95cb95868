//! This host's NBD exports: one Unix socket per export, served from one registry (and the
//! optional TCP listener serving every export).
//!
//! A writable export is bound to the disk's epoch when it was made: when the epoch moves,
//! new connections get a device at the new epoch while connections opened before keep the
//! old one, whose writes are refused (that is the fence).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use convoy_nbd::{BlockDevice, DeviceFuture, ExportRegistry, Server};
use tokio::sync::watch;

use crate::metrics::{ExportMetrics, NbdOp};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One served export.
struct Export {
    socket: PathBuf,
    stop: watch::Sender<bool>,
    /// Epoch of the writable device (0 for read-only copies).
    epoch: u64,
    /// Its metric handles, shared by every device it serves.
    metrics: Arc<ExportMetrics>,
}

/// A device that records each request's latency, outcome and bytes in its export's
/// metrics before answering.
struct Metered {
    inner: Arc<dyn BlockDevice>,
    metrics: Arc<ExportMetrics>,
}

impl Metered {
    fn wrap(inner: Arc<dyn BlockDevice>, metrics: &Arc<ExportMetrics>) -> Arc<dyn BlockDevice> {
        Arc::new(Self {
            inner,
            metrics: Arc::clone(metrics),
        })
    }

    fn timed<'a, T: Send + 'a>(
        &'a self,
        op: NbdOp,
        bytes: u64,
        request: DeviceFuture<'a, T>,
    ) -> DeviceFuture<'a, T> {
        Box::pin(async move {
            let started = Instant::now();
            let outcome = request.await;
            self.metrics
                .record(op, bytes, started.elapsed(), outcome.is_ok());
            outcome
        })
    }
}

impl BlockDevice for Metered {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn min_block_size(&self) -> u32 {
        self.inner.min_block_size()
    }

    fn read(&self, offset: u64, len: u32) -> DeviceFuture<'_, Bytes> {
        self.timed(NbdOp::Read, u64::from(len), self.inner.read(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceFuture<'_, ()> {
        let len = data.len() as u64;
        self.timed(NbdOp::Write, len, self.inner.write(offset, data, fua))
    }

    fn flush(&self) -> DeviceFuture<'_, ()> {
        self.timed(NbdOp::Flush, 0, self.inner.flush())
    }

    fn trim(&self, offset: u64, len: u32) -> DeviceFuture<'_, ()> {
        self.timed(NbdOp::Trim, u64::from(len), self.inner.trim(offset, len))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> DeviceFuture<'_, ()> {
        self.timed(
            NbdOp::WriteZeroes,
            u64::from(len),
            self.inner.write_zeroes(offset, len, fua, may_trim),
        )
    }
}

/// The exports of one host.
pub struct Exports {
    socket_dir: PathBuf,
    /// The TCP listener's address, and whether it requires TLS (`nbds://`).
    tcp: Option<(std::net::SocketAddr, bool)>,
    socket_group: Option<u32>,
    registry: ExportRegistry,
    map: Mutex<HashMap<String, Export>>,
}

impl Exports {
    /// Exports with sockets (mode 0660, group `socket_group` or the agent's) in
    /// `socket_dir`, each capped by `limits`.
    pub fn new(
        socket_dir: PathBuf,
        tcp: Option<(std::net::SocketAddr, bool)>,
        limits: convoy_nbd::ExportLimits,
        socket_group: Option<u32>,
    ) -> Self {
        Self {
            socket_dir,
            tcp,
            socket_group,
            registry: ExportRegistry::with_limits(limits),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The registry (the TCP listener serves it).
    pub fn registry(&self) -> &ExportRegistry {
        &self.registry
    }

    /// Where sockets are created.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The NBD URIs of an export on this host.
    pub fn uris(&self, name: &str) -> Vec<String> {
        let socket = self.socket_dir.join(format!("{name}.sock"));
        let mut out = vec![format!("nbd+unix:///{name}?socket={}", socket.display())];
        if let Some((tcp, tls)) = self.tcp {
            let scheme = if tls { "nbds" } else { "nbd" };
            out.push(format!("{scheme}://{tcp}/{name}"));
        }
        out
    }

    /// The epoch of export `name`, if it exists.
    pub fn epoch(&self, name: &str) -> Option<u64> {
        lock(&self.map).get(name).map(|e| e.epoch)
    }

    /// Names of the exports.
    pub fn names(&self) -> Vec<String> {
        lock(&self.map).keys().cloned().collect()
    }

    /// Serves `device` as `name`, or replaces the device of an existing export (new
    /// connections get the new one; open ones keep theirs).
    pub fn put(
        &self,
        name: &str,
        device: Arc<dyn convoy_nbd::BlockDevice>,
        description: &str,
        epoch: u64,
    ) -> anyhow::Result<()> {
        if let Some(e) = lock(&self.map).get_mut(name) {
            self.registry
                .replace(name, Metered::wrap(device, &e.metrics));
            e.epoch = epoch;
            return Ok(());
        }
        let socket = self.socket_dir.join(format!("{name}.sock"));
        let listener = convoy_nbd::bind_unix(&socket, 0o660, self.socket_group)
            .with_context(|| format!("cannot create NBD socket {}", socket.display()))?;
        let metrics = Arc::new(ExportMetrics::new(name));
        self.registry
            .add(name, Metered::wrap(device, &metrics), description)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (stop, mut stopped) = watch::channel(false);
        let server = Server::new(self.registry.clone());
        tokio::spawn(async move {
            server
                .serve_unix(listener, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        });
        lock(&self.map).insert(
            name.to_string(),
            Export {
                socket,
                stop,
                epoch,
                metrics,
            },
        );
        Ok(())
    }

    /// Stops serving `name` and removes its socket.
    pub fn remove(&self, name: &str) {
        if let Some(e) = lock(&self.map).remove(name) {
            self.registry.remove(name);
            let _ = e.stop.send(true);
            let _ = std::fs::remove_file(&e.socket);
        }
    }
}
