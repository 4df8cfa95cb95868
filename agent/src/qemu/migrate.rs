//! Live migration of a QEMU guest between two hosts' agents.
//!
//! The destination starts QEMU with `-incoming defer` on its staged exports and lets it
//! listen on a local Unix socket (`migrate-incoming`); the source's QEMU migrates to a
//! Unix socket of the source agent (`migrate`), and the two agents carry the bytes over a
//! QUIC stream of their own ([`StreamKind::QemuMigration`]), mutually authenticated like
//! every Convoy stream: guest memory never crosses the network in plaintext.
//!
//! The source runs with QEMU's `pause-before-switchover`: when the memory has converged,
//! QEMU stops the guest (draining and flushing its disk requests) and waits in
//! `pre-switchover`. [`QemuHost::migrate_out`] returns there, and
//! [`QemuHost::begin_switchover`] lets the device state and last pages follow while the
//! caller does the storage step (the VM's move commits, its epochs fence the source). The
//! destination QEMU runs with `-S` and `late-block-activate`: the arrived guest waits
//! paused, its disks untouched, until [`QemuHost::finish_incoming`] (or
//! [`QemuHost::resume_arrived`]) resumes it once its exports are at the new epochs;
//! [`QemuHost::switchover`] collects the source's figures and quits its QEMU. Until the
//! destination resumes the guest, [`QemuHost::cancel_out`] resumes it on the source (also
//! after a completed transfer: QEMU re-activates the disks on `cont`) and
//! [`QemuHost::abort_incoming`] removes the destination QEMU: the guest never runs on two
//! hosts. The guest's downtime is measured from its pause on the source to its resume on
//! the destination ([`guest_pause_ms`]).
//!
//! The relay acknowledges what it hands to the arriving QEMU and the source keeps at most
//! `RELAY_WINDOW` (2 MiB) beyond that in flight, so QEMU sizes the paused part by the rate the
//! stream really delivers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use convoy_raft::model::{LiveSettings, QemuPlan};
use convoy_transport::{Endpoint, FramedRecv, FramedSend, InboundStream, StreamKind};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::qmp::Monitor;
use super::{DiskExport, QMP_TIMEOUT, QemuHost};

/// How long an arriving QEMU may wait for its migration before the agent that started it
/// gives up on it (its coordinator died).
const INCOMING_ABANDONED_AFTER: Duration = Duration::from_secs(600);
/// How long the memory copy may take to reach `pre-switchover`.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the switchover (device state, final pages) may take.
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes read from QEMU per frame.
const PIPE_CHUNK: usize = 64 * 1024;
/// Bytes the source's relay sends beyond what the destination has handed to its QEMU.
/// QEMU sizes the last part of the migration, sent with the guest paused, by the rate it
/// can write at: a relay that buffered more would let it write faster than the stream
/// delivers, and the backlog would drain during the pause (20-60 ms were seen with the
/// stream's 16 MiB window). A few frames keep the stream busy.
const RELAY_WINDOW: u64 = 2 * 1024 * 1024;

/// A QEMU's part in a live migration.
#[derive(Clone, Debug)]
pub enum Role {
    /// Waiting for a guest from `from` since `since`.
    Incoming {
        /// The source host.
        from: u64,
        /// When it was started.
        since: Instant,
    },
    /// Sending its guest to `to`.
    Outgoing {
        /// The destination host.
        to: u64,
    },
}

impl Role {
    /// Whether an arriving QEMU waited so long that its migration is surely over.
    pub fn abandoned(&self) -> bool {
        matches!(self, Role::Incoming { since, .. } if since.elapsed() > INCOMING_ABANDONED_AFTER)
    }
}

/// The first frame of a migration stream: which guest it carries.
#[derive(Debug, Serialize, Deserialize)]
struct StreamHeader {
    vm: String,
}

/// What QEMU reported about a finished migration (`query-migrate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuMigrationStats {
    /// The guest's downtime as QEMU measured it, ms.
    pub downtime_ms: u64,
    /// From `migrate` to completion, ms.
    pub total_ms: u64,
    /// Guest memory bytes sent.
    pub ram_bytes: u64,
}

/// What the source reports of a switchover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverReport {
    /// QEMU's figures.
    pub stats: QemuMigrationStats,
    /// When QEMU paused the guest here (its `STOP` event's stamp: wall clock, microseconds
    /// since the Unix epoch), if seen.
    pub paused_at_unix_us: Option<u64>,
}

/// How far apart two hosts' clocks may seem before [`guest_pause_ms`] stops trusting them.
const CLOCKS_TRUSTED_MS: u64 = 10_000;

/// How long a migrated guest was paused, ms: from its pause on the source to its resume
/// on the destination by the two hosts' wall clocks (as libvirt measures downtime), which
/// counts the stream's tail in the agents' relay and the destination's loading of it.
/// Never less than what is known without comparing clocks, QEMU's downtime on the source
/// (up to the source's last byte) plus the arrived guest's wait at the destination; that
/// figure alone when the clocks disagree (the pause would be shorter than it, or longer
/// by more than `CLOCKS_TRUSTED_MS`, 10 s).
pub fn guest_pause_ms(
    qemu_downtime_ms: u64,
    waited_ms: u64,
    paused_at_unix_us: Option<u64>,
    resumed_at_unix_us: u64,
) -> u64 {
    let known = qemu_downtime_ms.saturating_add(waited_ms);
    let by_clocks = paused_at_unix_us
        .and_then(|paused| resumed_at_unix_us.checked_sub(paused))
        .map(|us| us.div_ceil(1000));
    match by_clocks {
        Some(ms) if ms >= known && ms - known <= CLOCKS_TRUSTED_MS => ms,
        _ => known,
    }
}

/// Microseconds since the Unix epoch, by this host's clock.
pub fn unix_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// QEMU's migration parameters (from the source host's `[qemu]` configuration).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct MigrationParams {
    /// QEMU's `downtime-limit`, ms: the most it is raised to.
    pub downtime_limit_ms: u64,
    /// QEMU's first `downtime-limit`, ms (see [`MigrationParams::next_downtime_limit`]).
    pub downtime_start_ms: u64,
    /// QEMU's `max-bandwidth`, bytes/s (0: QEMU's default).
    pub max_bandwidth: u64,
    /// QEMU's `auto-converge` capability.
    pub auto_converge: bool,
}

impl MigrationParams {
    /// The `downtime-limit` QEMU starts with: the start, or the limit if that is lower.
    pub fn first_downtime_limit(&self) -> u64 {
        self.downtime_start_ms.min(self.downtime_limit_ms).max(1)
    }

    /// The `downtime-limit` after a pass over the memory ended without converging at
    /// `current`: twice as long, up to the limit.
    pub fn next_downtime_limit(&self, current: u64) -> u64 {
        current
            .saturating_mul(2)
            .min(self.downtime_limit_ms)
            .max(current)
    }

    /// These parameters with a migration's own settings in place of the host's.
    pub fn with(self, live: &LiveSettings) -> Self {
        MigrationParams {
            downtime_limit_ms: live.downtime_limit_ms.unwrap_or(self.downtime_limit_ms),
            downtime_start_ms: self.downtime_start_ms,
            max_bandwidth: live
                .max_bandwidth_mib
                .map_or(self.max_bandwidth, |mib| mib << 20),
            auto_converge: live.auto_converge.unwrap_or(self.auto_converge),
        }
    }
}

impl QemuHost {
    fn incoming_socket(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.in.sock"))
    }

    fn outgoing_socket(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.out.sock"))
    }

    async fn monitor_of(&self, vm: &str) -> anyhow::Result<Monitor> {
        let vms = self.vms.lock().await;
        let r = vms
            .get(vm)
            .with_context(|| format!("no QEMU runs VM '{vm}' here"))?;
        match &r.monitor {
            Some(m) if m.state().connected => Ok(m.clone()),
            _ => {
                drop(vms);
                Ok(Monitor::connect(&self.qmp_socket(vm), QMP_TIMEOUT).await?)
            }
        }
    }

    async fn set_role(&self, vm: &str, role: Option<Role>) {
        if let Some(r) = self.vms.lock().await.get_mut(vm) {
            r.migration = role;
        }
    }

    /// Starts `plan`'s QEMU waiting for its guest from `from`, on `disks` (this host's
    /// staged exports), listening on a local socket for the stream.
    pub async fn prepare_incoming(
        &self,
        plan: &QemuPlan,
        disks: &[DiskExport],
        from: u64,
    ) -> anyhow::Result<()> {
        let vm = &plan.vm;
        // Held until the new QEMU is recorded, as `apply` holds it around its starts: a
        // second request for the same VM (a retry) or a reconcile must not start another
        // QEMU meanwhile, and starting one removes the VM's pidfile and QMP socket.
        let mut vms = self.vms.lock().await;
        if let Some(r) = vms.get(vm) {
            if self.live_pid(vm) != Some(r.pid) {
                // An earlier attempt's QEMU, gone since (its stream broke).
                vms.remove(vm);
            } else if matches!(r.migration, Some(Role::Incoming { .. })) {
                return Ok(());
            } else {
                bail!("a QEMU (pid {}) already runs VM '{vm}' on this host", r.pid);
            }
        }
        if let Some(pid) = self.live_pid(vm) {
            bail!("a QEMU (pid {pid}) already runs VM '{vm}' on this host");
        }
        let mut running = self.start(plan, disks, true).await?;
        running.migration = Some(Role::Incoming {
            from,
            since: Instant::now(),
        });
        let monitor = running.monitor.clone();
        let pid = running.pid;
        vms.insert(vm.clone(), running);
        drop(vms);
        let socket = self.incoming_socket(vm);
        let _ = std::fs::remove_file(&socket);
        let listen = async {
            let m = monitor.context("the arriving QEMU's QMP socket did not answer")?;
            // `late-block-activate`: the arrived QEMU leaves its disks alone until `cont`,
            // so nothing touches them before their new epochs are exported here. `events`:
            // its MIGRATION event says when the guest has arrived.
            let capabilities = json!({ "capabilities": [
                { "capability": "late-block-activate", "state": true },
                { "capability": "events", "state": true },
            ]});
            m.execute("migrate-set-capabilities", Some(capabilities), QMP_TIMEOUT)
                .await?;
            m.execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("unix:{}", socket.display()) })),
                QMP_TIMEOUT,
            )
            .await?;
            anyhow::Ok(())
        };
        if let Err(e) = listen.await {
            self.abort_incoming(vm).await;
            return Err(e.context(format!("QEMU (pid {pid}) cannot wait for VM '{vm}'")));
        }
        tracing::info!(vm, pid, from, "QEMU waits for a live migration");
        Ok(())
    }

    /// Serves a migration stream another agent opened: relays it into the arriving QEMU's
    /// socket.
    pub async fn serve_stream(&self, mut stream: InboundStream) {
        let peer = stream.peer;
        let header = match stream.read_request().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(peer, error = %e, "migration stream without a header");
                return;
            }
        };
        let header: StreamHeader = match convoy_codec::decode(&header) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(peer, error = %e, "bad migration stream header");
                return;
            }
        };
        let expected = self
            .vms
            .lock()
            .await
            .get(&header.vm)
            .and_then(|r| match r.migration {
                Some(Role::Incoming { from, .. }) => Some(from),
                _ => None,
            });
        if expected != Some(peer) {
            tracing::warn!(
                peer,
                vm = header.vm,
                "refused a migration stream: no QEMU here waits for this VM from that node"
            );
            return;
        }
        let socket = self.incoming_socket(&header.vm);
        let unix = match UnixStream::connect(&socket).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(vm = header.vm, error = %e, "cannot reach the arriving QEMU");
                return;
            }
        };
        // A source agent from before acknowledged streams sends unpaced and reads nothing
        // back (the arriving QEMU sends nothing: Convoy does not enable a return path).
        let acknowledge = stream.kind == StreamKind::QemuMigrationAcked;
        let received = relay_in(unix, stream.send, stream.recv, acknowledge).await;
        tracing::info!(vm = header.vm, peer, received, "migration stream ended");
    }

    /// Migrates `vm`'s guest to `to` (reached through `endpoint` at `addr`) until QEMU
    /// pauses it before the switchover: the guest is stopped, its disk requests drained
    /// and flushed. On failure the guest keeps running here.
    pub async fn migrate_out(
        self: &Arc<Self>,
        vm: &str,
        to: u64,
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        live: &LiveSettings,
    ) -> anyhow::Result<()> {
        let params = self.cfg.migration_params().with(live);
        tracing::info!(
            vm,
            to,
            downtime_limit_ms = params.downtime_limit_ms,
            downtime_start_ms = params.first_downtime_limit(),
            max_bandwidth = params.max_bandwidth,
            auto_converge = params.auto_converge,
            "live migration parameters"
        );
        let m = self.monitor_of(vm).await?;
        {
            let mut vms = self.vms.lock().await;
            let r = vms
                .get_mut(vm)
                .with_context(|| format!("no QEMU runs VM '{vm}' here"))?;
            if r.stopping {
                bail!("VM '{vm}' is stopping here");
            }
            r.migration = Some(Role::Outgoing { to });
        }
        let result = self
            .start_migration(vm, to, &m, endpoint, addr, params)
            .await;
        if let Err(e) = &result {
            tracing::warn!(vm, to, error = format!("{e:#}"), "live migration failed");
            self.cancel_out(vm).await;
        }
        result
    }

    async fn start_migration(
        &self,
        vm: &str,
        to: u64,
        m: &Monitor,
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        params: MigrationParams,
    ) -> anyhow::Result<()> {
        let capabilities = json!({ "capabilities": [
            { "capability": "pause-before-switchover", "state": true },
            { "capability": "events", "state": true },
            { "capability": "auto-converge", "state": params.auto_converge },
        ]});
        m.execute("migrate-set-capabilities", Some(capabilities), QMP_TIMEOUT)
            .await?;
        let mut downtime_limit = params.first_downtime_limit();
        let mut parameters = json!({ "downtime-limit": downtime_limit });
        if params.max_bandwidth > 0 {
            parameters["max-bandwidth"] = json!(params.max_bandwidth);
        }
        m.execute("migrate-set-parameters", Some(parameters), QMP_TIMEOUT)
            .await?;
        let socket = self.outgoing_socket(vm);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        let (send, recv) = endpoint
            .open_stream(to, addr, StreamKind::QemuMigrationAcked)
            .await
            .with_context(|| format!("cannot open a migration stream to node {to}"))?;
        let vm_name = vm.to_string();
        let path = socket.clone();
        let carry = tokio::spawn(async move {
            let accepted = listener.accept().await;
            let _ = std::fs::remove_file(&path);
            let (unix, _) = accepted?;
            let mut send = send;
            let header = convoy_codec::encode(&StreamHeader {
                vm: vm_name.clone(),
            })?;
            send.send_frame(&header).await?;
            let sent = relay_out(unix, send, recv).await;
            tracing::info!(vm = vm_name, to, sent, "migration stream ended");
            anyhow::Ok(())
        });
        let started = m
            .execute(
                "migrate",
                Some(json!({ "uri": format!("unix:{}", socket.display()) })),
                QMP_TIMEOUT,
            )
            .await;
        if let Err(e) = started {
            carry.abort();
            let _ = std::fs::remove_file(&socket);
            return Err(e.into());
        }
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        // QEMU syncs its dirty bitmap once at the start, then whenever the pages left of a
        // pass fit the limit, and right after such a sync decides whether the rest does: a
        // sync seen with the migration still active is a pass that did not converge.
        let mut syncs_seen = 1;
        loop {
            // Watched before asking, so an event between the answer and the wait wakes it.
            let mut events = m.events();
            let info = m.execute("query-migrate", None, QMP_TIMEOUT).await?;
            let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
            let next = params.next_downtime_limit(downtime_limit);
            if syncs > syncs_seen && info["status"] == "active" && next != downtime_limit {
                syncs_seen = syncs;
                // The guest still runs after the sync: another pass began, as the last one
                // did not converge at this limit. (A guest stopping is QEMU converging; a
                // raise that races that decision only applies to a next one.)
                if m.query_status(QMP_TIMEOUT).await?.running {
                    downtime_limit = next;
                    m.execute(
                        "migrate-set-parameters",
                        Some(json!({ "downtime-limit": downtime_limit })),
                        QMP_TIMEOUT,
                    )
                    .await?;
                    tracing::info!(
                        vm,
                        to,
                        passes = syncs - 1,
                        downtime_limit_ms = downtime_limit,
                        "the guest's memory has not converged yet: downtime limit raised"
                    );
                }
            }
            match info["status"].as_str().unwrap_or("") {
                "pre-switchover" => return Ok(()),
                s @ ("failed" | "cancelled" | "cancelling") => {
                    let why = info["error-desc"].as_str().unwrap_or("no reason given");
                    bail!("QEMU's migration to node {to} {s}: {why}");
                }
                "completed" => bail!("QEMU completed the migration without pausing first"),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest's memory did not converge within {CONVERGE_TIMEOUT:?} (raise the downtime limit or the bandwidth)"
                );
            }
            // The guest is paused from the moment QEMU reaches `pre-switchover` until the
            // storage step is done: its MIGRATION event ends the wait at once.
            events.next(Duration::from_millis(10)).await;
        }
    }

    /// Undoes [`Self::migrate_out`] before the switchover: cancels QEMU's migration and
    /// resumes the guest here.
    pub async fn cancel_out(&self, vm: &str) {
        if let Ok(m) = self.monitor_of(vm).await {
            let _ = m.execute("migrate_cancel", None, QMP_TIMEOUT).await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match m.execute("query-migrate", None, QMP_TIMEOUT).await {
                    Ok(info)
                        if matches!(
                            info["status"].as_str(),
                            Some("cancelling" | "active" | "pre-switchover" | "device")
                        ) => {}
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Ok(s) = m.query_status(QMP_TIMEOUT).await {
                if !s.running {
                    if let Err(e) = m.cont(QMP_TIMEOUT).await {
                        tracing::warn!(vm, error = %e, "cannot resume the guest after a cancelled migration");
                    }
                }
            }
        }
        self.set_role(vm, None).await;
        tracing::info!(vm, "live migration cancelled; the guest runs here");
    }

    /// Lets a migration paused by [`Self::migrate_out`] send the device state and last
    /// pages (`migrate-continue`) while the caller does the storage step: the destination
    /// QEMU waits paused (`-S`) until [`Self::resume_arrived`], so the guest still runs on
    /// one host only, and the transfer no longer adds to the pause after the storage step.
    /// Until the destination resumes it, [`Self::cancel_out`] still resumes the guest here
    /// (QEMU re-activates its disks on `cont` after a completed migration).
    pub async fn begin_switchover(&self, vm: &str) -> anyhow::Result<()> {
        let m = self.monitor_of(vm).await?;
        m.execute(
            "migrate-continue",
            Some(json!({ "state": "pre-switchover" })),
            QMP_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// Waits until the guest arriving here has all its state (QEMU's incoming migration
    /// completed; the guest stays paused); returns when this agent learnt it (from QEMU's
    /// event, which may have come before this call).
    pub async fn wait_arrived(&self, vm: &str, timeout: Duration) -> anyhow::Result<Instant> {
        let m = self.monitor_of(vm).await?;
        let pid = self.live_pid(vm);
        let deadline = Instant::now() + timeout;
        // The MIGRATION event ends the wait; QEMU's monitor answers slowly while it loads
        // the stream, so it is asked again only now and then.
        let mut asked_at: Option<Instant> = None;
        loop {
            let mut events = m.events();
            let mut status = m.state().migration;
            if asked_at.is_none_or(|at| at.elapsed() > Duration::from_millis(200)) {
                asked_at = Some(Instant::now());
                let info = m.execute("query-migrate", None, QMP_TIMEOUT).await?;
                status = info["status"].as_str().map(str::to_string).or(status);
            }
            match status.as_deref() {
                Some("completed") => {
                    let state = m.state();
                    let seen = state
                        .migration_since
                        .filter(|_| state.migration.as_deref() == Some("completed"));
                    return Ok(seen.unwrap_or_else(Instant::now));
                }
                Some(s @ ("failed" | "cancelled")) => {
                    bail!("the guest's incoming migration {s}")
                }
                _ => {}
            }
            if pid.is_none() || self.live_pid(vm) != pid {
                bail!("the arriving QEMU exited (its migration stream broke)");
            }
            if Instant::now() > deadline {
                bail!("the guest did not arrive within {timeout:?}");
            }
            events.next(Duration::from_millis(20)).await;
        }
    }

    /// Resumes a guest that arrived here (after [`Self::wait_arrived`]), once its disks
    /// are exported here at their new epochs; from then on its QEMU is treated as any
    /// other. Returns when it resumed (after QEMU confirmed it), microseconds since the
    /// Unix epoch.
    pub async fn resume_arrived(&self, vm: &str) -> anyhow::Result<u64> {
        let m = self.monitor_of(vm).await?;
        m.cont(QMP_TIMEOUT).await?;
        let resumed_at = unix_now_us();
        self.set_role(vm, None).await;
        Ok(resumed_at)
    }

    /// Completes a migration paused by [`Self::migrate_out`]: the device state follows
    /// (if [`Self::begin_switchover`] has not sent it on already), and this host's QEMU
    /// quits once it has sent everything.
    /// If it fails, this host's QEMU quits all the same: its disks are fenced, and a
    /// guest resumed here could only fail its writes.
    pub async fn switchover(&self, vm: &str) -> anyhow::Result<SwitchoverReport> {
        // Only a guest this host is migrating out is handed over (and its QEMU quit): a
        // request for any other (a stale coordinator's) changes nothing.
        if !matches!(self.role(vm).await, Some(Role::Outgoing { .. })) {
            bail!("VM '{vm}' is not being migrated out of this host");
        }
        let result = self.continue_to_completion(vm).await;
        // Once the guest runs on the destination, this QEMU holds nothing anyone needs
        // (QEMU flushed and released its disks when the migration completed), so it is
        // killed rather than asked to quit: a quit closes its disks with a flush, which
        // hangs on a disk whose export here went away with the move (break-consistency
        // leaves this host no copy), its NBD client reconnecting until the quit gives up
        // and kills it 10 s later, while the destination waits for this answer.
        self.quit_here(vm, result.is_err()).await;
        result
    }

    async fn continue_to_completion(&self, vm: &str) -> anyhow::Result<SwitchoverReport> {
        let m = self.monitor_of(vm).await?;
        let info = m.execute("query-migrate", None, QMP_TIMEOUT).await?;
        if info["status"] == "pre-switchover" {
            m.execute(
                "migrate-continue",
                Some(json!({ "state": "pre-switchover" })),
                QMP_TIMEOUT,
            )
            .await?;
        }
        let deadline = Instant::now() + SWITCHOVER_TIMEOUT;
        let mut completed_at = None;
        let info = loop {
            let mut events = m.events();
            let info = m.execute("query-migrate", None, QMP_TIMEOUT).await?;
            match info["status"].as_str().unwrap_or("") {
                // QEMU says `completed` a moment before it has computed the times.
                "completed" if info["total-time"].as_u64().unwrap_or(0) > 0 => break info,
                "completed"
                    if completed_at.get_or_insert_with(Instant::now).elapsed()
                        > Duration::from_millis(500) =>
                {
                    break info;
                }
                s @ ("failed" | "cancelled") => {
                    let why = info["error-desc"].as_str().unwrap_or("no reason given");
                    bail!("QEMU's switchover {s}: {why}");
                }
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("the switchover did not complete within {SWITCHOVER_TIMEOUT:?}");
            }
            events.next(Duration::from_millis(5)).await;
        };
        let stats = QemuMigrationStats {
            downtime_ms: info["downtime"].as_u64().unwrap_or(0),
            total_ms: info["total-time"].as_u64().unwrap_or(0),
            ram_bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
        };
        Ok(SwitchoverReport {
            stats,
            paused_at_unix_us: m.state().stopped_at_unix_us,
        })
    }

    /// Quits `vm`'s QEMU here at once (its guest runs elsewhere, or is given up): with
    /// `orderly`, by QMP `quit` and then SIGKILL if it has not exited within 5 s; without,
    /// by SIGKILL at once.
    async fn quit_here(&self, vm: &str, orderly: bool) {
        let running = self.vms.lock().await.remove(vm);
        let pid = running
            .as_ref()
            .map(|r| r.pid)
            .or_else(|| self.live_pid(vm));
        if let Some(m) = running.and_then(|r| r.monitor).filter(|_| orderly) {
            let _ = m.quit(QMP_TIMEOUT).await;
        }
        if let Some(pid) = pid {
            let grace = if orderly {
                Duration::from_secs(5)
            } else {
                Duration::ZERO
            };
            let deadline = Instant::now() + grace;
            while self.live_pid(vm) == Some(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if self.live_pid(vm) == Some(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // The files are the VM's, not this QEMU's: another QEMU of the VM (started here
        // since) may own them now.
        let named = std::fs::read_to_string(self.pidfile(vm))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if named.is_none() || named == pid {
            let _ = std::fs::remove_file(self.pidfile(vm));
            let _ = std::fs::remove_file(self.qmp_socket(vm));
        }
        let _ = std::fs::remove_file(self.incoming_socket(vm));
    }

    /// Removes a QEMU that waits for a guest that will not come.
    pub async fn abort_incoming(&self, vm: &str) {
        let waiting = matches!(
            self.vms.lock().await.get(vm).map(|r| &r.migration),
            Some(Some(Role::Incoming { .. }))
        );
        if waiting {
            self.quit_here(vm, true).await;
            tracing::info!(vm, "removed the QEMU that waited for a live migration");
        }
    }

    /// `vm`'s QEMU run state here (QMP's `query-status`, or `unknown`) and its migration
    /// role, if a QEMU of it is known here.
    pub async fn run_state(&self, vm: &str) -> Option<(String, Option<Role>)> {
        let (monitor, role) = {
            let vms = self.vms.lock().await;
            let r = vms.get(vm)?;
            (r.monitor.clone(), r.migration.clone())
        };
        // An arriving QEMU is known to wait for its guest (`inmigrate`; the resume that
        // ends its migration clears the role). Its monitor answers slowly while it loads
        // the incoming stream (24 ms seen), and a coordinator asks right at the
        // switchover, with the guest paused.
        if matches!(role, Some(Role::Incoming { .. })) {
            return Some(("inmigrate".to_string(), role));
        }
        let status = match monitor {
            Some(m) => match m.query_status(QMP_TIMEOUT).await {
                Ok(s) => s.status,
                Err(_) => "unknown".to_string(),
            },
            None => "unknown".to_string(),
        };
        Some((status, role))
    }

    /// `vm`'s migration role here, if its QEMU still runs.
    pub async fn role(&self, vm: &str) -> Option<Role> {
        let mut vms = self.vms.lock().await;
        let r = vms.get(vm)?;
        if self.live_pid(vm) != Some(r.pid) {
            // An arriving QEMU whose stream broke exits: it waits for nothing any more.
            if matches!(r.migration, Some(Role::Incoming { .. })) {
                vms.remove(vm);
            }
            return None;
        }
        r.migration.clone()
    }

    /// Waits until the guest arriving here has all its state, resumes it and treats its
    /// QEMU as any other from then on; returns how long the arrived guest waited paused
    /// and when it resumed ([`Self::resume_arrived`]), for [`guest_pause_ms`].
    pub async fn finish_incoming(
        &self,
        vm: &str,
        timeout: Duration,
    ) -> anyhow::Result<(Duration, u64)> {
        let arrived = self.wait_arrived(vm, timeout).await?;
        let resumed_at = self.resume_arrived(vm).await?;
        Ok((arrived.elapsed(), resumed_at))
    }
}

/// The source's relay: copies the QEMU stream `unix` → `send` (as frames) until QEMU
/// closes it, at most [`RELAY_WINDOW`] ahead of the destination's acknowledgements on
/// `recv` (each an 8-byte little-endian count of the bytes handed to its QEMU; QEMU's
/// return path is not carried: Convoy does not enable it). Returns the bytes sent.
async fn relay_out(unix: UnixStream, mut send: FramedSend, mut recv: FramedRecv) -> u64 {
    let (acked_tx, mut acked) = tokio::sync::watch::channel(0u64);
    let acks = async move {
        while let Ok(Some(frame)) = recv.recv_frame().await {
            let Ok(count) = <[u8; 8]>::try_from(&frame[..]) else {
                tracing::warn!(
                    len = frame.len(),
                    "bad acknowledgement on a migration stream"
                );
                break;
            };
            acked_tx.send_replace(u64::from_le_bytes(count));
        }
    };
    let outbound = async move {
        let mut read = unix;
        let mut total = 0u64;
        let mut buf = vec![0u8; PIPE_CHUNK];
        'relay: loop {
            while total.saturating_sub(*acked.borrow_and_update()) > RELAY_WINDOW {
                if acked.changed().await.is_err() {
                    // The destination stopped acknowledging: its side is gone.
                    break 'relay;
                }
            }
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if send
                        .send_frame_bytes(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    total += n as u64;
                }
            }
        }
        let _ = send.finish();
        total
    };
    let ((), sent) = tokio::join!(acks, outbound);
    sent
}

/// The destination's relay: copies the frames of `recv` into the arriving QEMU's stream
/// `unix`; with `acknowledge`, sends on `send` the bytes handed over so far after each
/// frame (see [`relay_out`]). Returns the bytes received.
async fn relay_in(
    unix: UnixStream,
    mut send: FramedSend,
    mut recv: FramedRecv,
    acknowledge: bool,
) -> u64 {
    let mut write = unix;
    let mut total = 0u64;
    while let Ok(Some(frame)) = recv.recv_frame().await {
        if write.write_all(&frame).await.is_err() {
            break;
        }
        total += frame.len() as u64;
        if acknowledge && send.send_frame(&total.to_le_bytes()).await.is_err() {
            break;
        }
    }
    let _ = write.shutdown().await;
    let _ = send.finish();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(start: u64, limit: u64) -> MigrationParams {
        MigrationParams {
            downtime_limit_ms: limit,
            downtime_start_ms: start,
            max_bandwidth: 0,
            auto_converge: true,
        }
    }

    #[test]
    fn the_downtime_limit_starts_low_and_doubles_up_to_the_limit_per_unconverged_pass() {
        let p = params(30, 300);
        let mut steps = vec![p.first_downtime_limit()];
        for _ in 0..6 {
            steps.push(p.next_downtime_limit(*steps.last().unwrap()));
        }
        assert_eq!(steps, [30, 60, 120, 240, 300, 300, 300]);
        // A migration's own limit below the start is used from the first pass on.
        let low = params(30, 20);
        assert_eq!(low.first_downtime_limit(), 20);
        assert_eq!(low.next_downtime_limit(20), 20);
        // A start of 0 still starts somewhere and rises.
        assert_eq!(params(0, 300).first_downtime_limit(), 1);
        assert_eq!(params(0, 300).next_downtime_limit(1), 2);
    }

    #[test]
    fn the_guest_pause_runs_from_the_source_stop_to_the_destination_resume_unless_clocks_disagree()
    {
        let stop = 1_700_000_000_000_000;
        // By the clocks: 37.2 ms, more than QEMU's 23 ms plus the 5 ms wait here.
        assert_eq!(guest_pause_ms(23, 5, Some(stop), stop + 37_200), 38);
        // The destination's clock behind: the pause cannot be shorter than what is known.
        assert_eq!(guest_pause_ms(23, 5, Some(stop), stop + 10_000), 28);
        assert_eq!(guest_pause_ms(23, 5, Some(stop), stop - 1_000), 28);
        // Far ahead: not believed.
        assert_eq!(guest_pause_ms(23, 5, Some(stop), stop + 60_000_000), 28);
        // No pause stamp from the source.
        assert_eq!(guest_pause_ms(23, 5, None, stop), 28);
    }
}
