//! This host's NBD exports: one Unix socket per export, served from one registry (and the
//! optional TCP listener serving every export).
//!
//! A writable export is bound to the disk's epoch when it was made: when the epoch moves,
//! new connections get a device at the new epoch while connections opened before keep the
//! old one, whose writes are refused (that is the fence).
//!
//! An export can also be *staged* for a VM arriving by live migration ([`Exports::stage`]):
//! the incoming QEMU opens it before the VM's epoch is here, its writes wait, and each
//! [`Exports::put`] until [`Exports::seal`] becomes the device of those open connections
//! too, so the guest never reconnects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::{Duration, Instant};

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
    /// The device new connections get.
    device: Arc<dyn BlockDevice>,
    /// While staged: the waiting device, and what was served before (restored by
    /// [`Exports::unstage`]; `None` when the export did not exist).
    staged: Option<Staging>,
}

/// A staged export's waiting device, and the device and epoch it served before (`None`
/// when the export did not exist).
type Staging = (Arc<Staged>, Option<(Arc<dyn BlockDevice>, u64)>);

/// How long a request to a staged export waits for the VM's device before it fails.
const STAGED_WAIT: Duration = Duration::from_secs(120);

/// The device of a staged export: every request waits until [`Staged::fill`] gives the
/// real device (then is passed to it), or fails with `ESHUTDOWN` when the staging is
/// abandoned or [`STAGED_WAIT`] passes. Reads before that are served from `early_reads`
/// (this host's copy): QEMU reads the first sector while it sets its disks up, before any
/// migration, and must not block there.
pub(crate) struct Staged {
    size: u64,
    early_reads: Arc<dyn BlockDevice>,
    device: watch::Sender<Option<Result<Arc<dyn BlockDevice>, ()>>>,
}

impl Staged {
    fn new(size: u64, early_reads: Arc<dyn BlockDevice>) -> Self {
        Self {
            size,
            early_reads,
            device: watch::channel(None).0,
        }
    }

    fn filled(&self) -> Option<Arc<dyn BlockDevice>> {
        match self.device.borrow().as_ref() {
            Some(Ok(d)) => Some(Arc::clone(d)),
            _ => None,
        }
    }

    fn fill(&self, device: Arc<dyn BlockDevice>) {
        self.device.send_replace(Some(Ok(device)));
    }

    fn abandon(&self) {
        self.device.send_replace(Some(Err(())));
    }

    async fn device(&self) -> Result<Arc<dyn BlockDevice>, convoy_nbd::DeviceError> {
        let mut rx = self.device.subscribe();
        let got = tokio::time::timeout(STAGED_WAIT, rx.wait_for(Option::is_some)).await;
        match got {
            Ok(Ok(d)) => match d.as_ref() {
                Some(Ok(d)) => Ok(Arc::clone(d)),
                _ => Err(convoy_nbd::DeviceError::ShuttingDown),
            },
            _ => Err(convoy_nbd::DeviceError::ShuttingDown),
        }
    }
}

impl BlockDevice for Staged {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: u32) -> DeviceFuture<'_, Bytes> {
        Box::pin(async move {
            match self.filled() {
                Some(d) => d.read(offset, len).await,
                None => self.early_reads.read(offset, len).await,
            }
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async move { self.device().await?.write(offset, data, fua).await })
    }

    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(async move { self.device().await?.flush().await })
    }

    fn trim(&self, offset: u64, len: u32) -> DeviceFuture<'_, ()> {
        Box::pin(async move { self.device().await?.trim(offset, len).await })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            self.device()
                .await?
                .write_zeroes(offset, len, fua, may_trim)
                .await
        })
    }
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
    /// connections get the new one; open ones keep theirs, except that connections to a
    /// staged export get it too).
    pub fn put(
        &self,
        name: &str,
        device: Arc<dyn convoy_nbd::BlockDevice>,
        description: &str,
        epoch: u64,
    ) -> anyhow::Result<()> {
        if let Some(e) = lock(&self.map).get_mut(name) {
            // A disk's epoch only grows: a device for an older one comes from a plan
            // computed before a newer one was applied, and must not replace it.
            if epoch < e.epoch {
                return Ok(());
            }
            let device = Metered::wrap(device, &e.metrics);
            // Until sealed, a staged export keeps serving its staged device, and its
            // connections follow every new device: the disk may be exported here at an
            // older epoch (an active-active copy) before the move's epoch arrives.
            match &e.staged {
                Some((staged, _)) => staged.fill(Arc::clone(&device)),
                None => {
                    self.registry.replace(name, Arc::clone(&device));
                }
            }
            e.device = device;
            e.epoch = epoch;
            return Ok(());
        }
        let metrics = Arc::new(ExportMetrics::new(name));
        let device = Metered::wrap(device, &metrics);
        self.serve(name, device, description, epoch, metrics, None)
    }

    fn serve(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        description: &str,
        epoch: u64,
        metrics: Arc<ExportMetrics>,
        staged: Option<Staging>,
    ) -> anyhow::Result<()> {
        let socket = self.socket_dir.join(format!("{name}.sock"));
        let listener = convoy_nbd::bind_unix(&socket, 0o660, self.socket_group)
            .with_context(|| format!("cannot create NBD socket {}", socket.display()))?;
        self.registry
            .add(name, Arc::clone(&device), description)
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
                device,
                staged,
            },
        );
        Ok(())
    }

    /// Stages export `name` (a disk of `size` bytes) for a VM arriving here: connections
    /// opened from now on get a device whose writes wait for the next [`Self::put`] and
    /// whose reads until then go to `early_reads`. Returns the export's socket. Staging an
    /// export already staged changes nothing.
    pub fn stage(
        &self,
        name: &str,
        size: u64,
        early_reads: Arc<dyn BlockDevice>,
    ) -> anyhow::Result<PathBuf> {
        let socket = self.socket_dir.join(format!("{name}.sock"));
        let staged = Arc::new(Staged::new(size, early_reads));
        if let Some(e) = lock(&self.map).get_mut(name) {
            if e.staged.is_none() {
                // Not metered itself: it passes each request to the metered device.
                let device: Arc<dyn BlockDevice> = staged.clone();
                self.registry.replace(name, Arc::clone(&device));
                let before = std::mem::replace(&mut e.device, device);
                e.staged = Some((staged, Some((before, e.epoch))));
                e.epoch = 0;
            }
            return Ok(socket);
        }
        let metrics = Arc::new(ExportMetrics::new(name));
        let device: Arc<dyn BlockDevice> = staged.clone();
        let what = format!("{name} (staged for an arriving VM)");
        self.serve(name, device, &what, 0, metrics, Some((staged, None)))?;
        Ok(socket)
    }

    /// Ends the staging of `name` once its VM runs here: its connections keep the device
    /// they have, and later epochs fence them like any other.
    pub fn seal(&self, name: &str) {
        if let Some(e) = lock(&self.map).get_mut(name) {
            if e.staged.take().is_some() {
                // New connections get the device itself from now on.
                self.registry.replace(name, Arc::clone(&e.device));
            }
        }
    }

    /// Undoes [`Self::stage`]: the connections opened meanwhile fail, and the export
    /// serves the device that came meanwhile, else what it served before (or goes away).
    pub fn unstage(&self, name: &str) {
        let mut map = lock(&self.map);
        let Some(e) = map.get_mut(name) else {
            return;
        };
        let Some((staged, before)) = e.staged.take() else {
            return;
        };
        staged.abandon();
        if e.epoch > 0 {
            // A device came meanwhile (the disk is exported here for another reason):
            // new connections get it.
            self.registry.replace(name, Arc::clone(&e.device));
            return;
        }
        match before {
            Some((device, epoch)) => {
                self.registry.replace(name, Arc::clone(&device));
                e.device = device;
                e.epoch = epoch;
            }
            None => {
                drop(map);
                self.remove(name);
            }
        }
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
