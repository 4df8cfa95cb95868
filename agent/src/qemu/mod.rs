//! QEMU guests on this host: started with each disk on this host's Convoy NBD export,
//! driven over QMP ([`qmp`]), and outliving the agent.
//!
//! Each VM's files live in `<data_dir>/qemu/`: `<vm>.pid` (QEMU's pidfile), `<vm>.qmp`
//! (its QMP socket), `<vm>.serial.log` (the guest's serial console) and `<vm>.log`
//! (QEMU's own messages while it starts). QEMU is started with `-daemonize`: it calls
//! `setsid` and is re-parented away from the agent, so an agent restart, crash or upgrade
//! never stops a guest (where systemd runs, QEMU also gets a transient scope, so stopping
//! the agent's unit does not kill it with the unit's cgroup). An agent that starts finds its VMs through their pidfiles and QMP
//! sockets and re-attaches (libvirt's model); a VM whose QEMU runs is never started twice.
//!
//! Guests run with `-no-shutdown`: a guest that powers itself off leaves QEMU in the
//! `shutdown` state instead of exiting, so the agent does not restart it behind the
//! operator's back; `vm stop` (the model's `running = false`) sends an ACPI power-down
//! and, after the configured timeout, `quit`.

pub mod migrate;
pub mod qmp;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use convoy_raft::model::{Accel, QemuPlan};
use serde::{Deserialize, Serialize};

use crate::config::QemuConfig;
use qmp::Monitor;

/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU may take to daemonize (parse its options, open its disks).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the TCG run of the KVM probe may take to reach the firmware's end.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU holds a guest's disk requests while the agent serving its export is away
/// (restarting, upgrading) before it fails them: the guest's I/O stalls, it does not fail.
const NBD_RECONNECT_DELAY_SECS: u64 = 300;
/// How long a failed start waits before the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// A QEMU guest's state on this host, for `vm show`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuStatus {
    /// `running`, `paused`, `shutdown` (the guest powered off; QEMU waits), `stopping`,
    /// `stopped` or `failed` (see `error`).
    pub state: String,
    /// QEMU's process id, while it runs.
    pub pid: Option<u32>,
    /// `connected`, or why the QMP connection is not.
    pub qmp: String,
    /// QEMU's own run state from `query-status`, when QMP answered.
    pub qmp_status: Option<String>,
    /// The accelerator it was started with (`kvm` or `tcg`), when this agent knows.
    pub accel: Option<String>,
    /// Whether this agent re-attached to a QEMU started before it (by an earlier agent).
    pub adopted: bool,
    /// The guest's serial console.
    pub serial_log: String,
    /// Why it could not start or stop.
    pub error: Option<String>,
    /// Latest QMP events, oldest first.
    pub events: Vec<String>,
}

/// One QEMU this agent knows runs (or ran) here.
struct Running {
    pid: u32,
    monitor: Option<Monitor>,
    /// Why QMP could not be reached, if it could not.
    qmp_error: Option<String>,
    accel: Option<String>,
    adopted: bool,
    stopping: bool,
    /// A live migration this QEMU takes part in: while set, [`QemuHost::apply`] neither
    /// stops it (it is not, or no longer, planned here) nor starts another.
    migration: Option<migrate::Role>,
}

/// The QEMU guests of this host.
pub struct QemuHost {
    dir: PathBuf,
    cfg: QemuConfig,
    vms: tokio::sync::Mutex<HashMap<String, Running>>,
    /// Why a VM could not start or stop, and when it last tried.
    failures: Mutex<HashMap<String, (String, Instant)>>,
    /// Whether KVM works here (probed once, when first needed).
    kvm: tokio::sync::OnceCell<bool>,
}

/// What one planned VM's disk is attached to.
pub struct DiskExport {
    /// NBD export name.
    pub export: String,
    /// The export's Unix socket.
    pub socket: PathBuf,
}

/// Splits a `nbd+unix:///NAME?socket=PATH` URI.
pub fn unix_export(uri: &str) -> Option<DiskExport> {
    let rest = uri.strip_prefix("nbd+unix:///")?;
    let (export, socket) = rest.split_once("?socket=")?;
    Some(DiskExport {
        export: export.to_string(),
        socket: PathBuf::from(socket),
    })
}

impl QemuHost {
    /// The QEMU guests under `data_dir`; creates `<data_dir>/qemu/`.
    pub fn new(data_dir: &Path, cfg: QemuConfig) -> anyhow::Result<QemuHost> {
        let dir = data_dir.join("qemu");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // QEMU changes to `/` when it daemonizes: every path it gets is absolute.
        let dir = std::fs::canonicalize(&dir)
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        Ok(QemuHost {
            dir,
            cfg,
            vms: tokio::sync::Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            kvm: tokio::sync::OnceCell::new(),
        })
    }

    fn pidfile(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.pid"))
    }

    fn qmp_socket(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.qmp"))
    }

    /// The guest's serial console file.
    pub fn serial_log(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.serial.log"))
    }

    fn qemu_log(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.log"))
    }

    fn fail(&self, vm: &str, why: String) {
        tracing::warn!(vm, error = %why, "QEMU guest");
        lock(&self.failures).insert(vm.to_string(), (why, Instant::now()));
    }

    /// The pid of `vm`'s QEMU if its pidfile names a live process that is that VM's QEMU
    /// (its command line names the VM's QMP socket, so a reused pid is not taken for it).
    pub fn live_pid(&self, vm: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pidfile(vm))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z") {
            return None;
        }
        let socket = self.qmp_socket(vm).display().to_string();
        String::from_utf8_lossy(&cmdline)
            .contains(&socket)
            .then_some(pid)
    }

    /// Re-attaches to every QEMU a pidfile here names that still runs (after an agent
    /// restart). Call once at start, before the first [`Self::apply`].
    pub async fn adopt_running(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".pid").map(str::to_string)
            })
            .collect();
        for vm in names {
            if let Some(pid) = self.live_pid(&vm) {
                self.adopt(&vm, pid).await;
            }
        }
    }

    async fn adopt(&self, vm: &str, pid: u32) {
        let (monitor, qmp_error) = match Monitor::connect(&self.qmp_socket(vm), QMP_TIMEOUT).await {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e.to_string())),
        };
        tracing::info!(
            vm,
            pid,
            qmp = qmp_error.as_deref().unwrap_or("connected"),
            "re-attached to a running QEMU guest"
        );
        self.vms.lock().await.insert(
            vm.to_string(),
            Running {
                pid,
                monitor,
                qmp_error,
                accel: None,
                adopted: true,
                stopping: false,
                migration: None,
            },
        );
    }

    /// Brings this host's QEMU guests in line with `planned` (the host plan's, read after
    /// a read barrier): starts or re-attaches to planned ones whose disks are exported
    /// here (`exports` gives a disk's Unix-socket URI), stops the others. Stops run in
    /// the background (they wait for the guest to power off).
    pub async fn apply(
        self: &Arc<Self>,
        planned: &std::collections::BTreeMap<String, QemuPlan>,
        exports: impl Fn(u64) -> Option<DiskExport>,
    ) {
        let mut vms = self.vms.lock().await;
        // QEMUs that exited on their own are forgotten (a planned one starts again).
        vms.retain(|vm, r| {
            let alive = self.live_pid(vm) == Some(r.pid);
            if !alive && !r.stopping {
                tracing::warn!(vm, pid = r.pid, "QEMU guest exited");
            }
            alive || r.stopping
        });
        for (vm, r) in vms.iter_mut() {
            if r.migration.as_ref().is_some_and(|m| !m.abandoned()) {
                continue;
            }
            if !planned.contains_key(vm) && !r.stopping {
                r.stopping = true;
                let host = Arc::clone(self);
                let (vm, pid, monitor) = (vm.clone(), r.pid, r.monitor.clone());
                tokio::spawn(async move { host.stop(&vm, pid, monitor).await });
            }
        }
        lock(&self.failures).retain(|vm, _| planned.contains_key(vm));
        for (name, plan) in planned {
            if vms.contains_key(name) {
                continue;
            }
            if let Some(pid) = self.live_pid(name) {
                drop(vms);
                self.adopt(name, pid).await;
                vms = self.vms.lock().await;
                continue;
            }
            let recent_failure = lock(&self.failures)
                .get(name)
                .is_some_and(|(_, at)| at.elapsed() < RETRY_AFTER);
            if recent_failure {
                continue;
            }
            let disks: Option<Vec<DiskExport>> = plan.disks.iter().map(|d| exports(d.id)).collect();
            // Every disk's export must be up before QEMU opens it.
            let Some(disks) = disks.filter(|ds| ds.iter().all(|d| d.socket.exists())) else {
                continue;
            };
            match self.start(plan, &disks, false).await {
                Ok(running) => {
                    lock(&self.failures).remove(name);
                    vms.insert(name.clone(), running);
                }
                Err(e) => self.fail(name, format!("{e:#}")),
            }
        }
    }

    /// Whether KVM works here ([`probe_kvm`]; on some hosts KVM is present but guests
    /// stall: there QEMU is run with TCG).
    async fn kvm_works(&self) -> bool {
        *self
            .kvm
            .get_or_init(|| async {
                let works = probe_kvm(&self.cfg.binary, &self.dir).await;
                tracing::info!(
                    kvm = works,
                    "probed KVM: QEMU guests with accel auto use {}",
                    if works { "kvm" } else { "tcg" }
                );
                works
            })
            .await
    }

    /// Starts `plan`'s QEMU on `disks`; with `incoming`, waiting for a live migration
    /// (`-incoming defer`) instead of booting.
    async fn start(
        &self,
        plan: &QemuPlan,
        disks: &[DiskExport],
        incoming: bool,
    ) -> anyhow::Result<Running> {
        let spec = &plan.spec;
        let accel = match spec.accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
            Accel::Auto if self.kvm_works().await => "kvm",
            Accel::Auto => "tcg",
        };
        for (what, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
            if let Some(p) = path {
                std::fs::metadata(p)
                    .with_context(|| format!("the {what} {p} cannot be read on this host"))?;
            }
        }
        let vm = &plan.vm;
        let (pidfile, qmp, serial, log) = (
            self.pidfile(vm),
            self.qmp_socket(vm),
            self.serial_log(vm),
            self.qemu_log(vm),
        );
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&pidfile);
        // Where systemd runs, a restart of the agent's unit kills every process in its
        // cgroup, session or not: QEMU gets a transient scope of its own there.
        let mut cmd = if Path::new("/run/systemd/system").is_dir() {
            let mut c = tokio::process::Command::new("systemd-run");
            c.args(["--scope", "--quiet", "--collect"])
                .arg(format!("--unit=convoy-qemu-{vm}"))
                .arg(&self.cfg.binary);
            c
        } else {
            tokio::process::Command::new(&self.cfg.binary)
        };
        cmd.arg("-name")
            .arg(format!("{vm},debug-threads=on"))
            .args(["-machine", "pc", "-accel", accel])
            .args(["-cpu", if accel == "kvm" { "host" } else { "max" }])
            .arg("-m")
            .arg(spec.memory_mib.to_string())
            .arg("-smp")
            .arg(spec.cpus.to_string())
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-shutdown");
        if let Some(k) = &spec.kernel {
            cmd.arg("-kernel").arg(k);
        }
        if let Some(i) = &spec.initrd {
            cmd.arg("-initrd").arg(i);
        }
        if let Some(a) = &spec.append {
            cmd.arg("-append").arg(a);
        }
        for (i, d) in disks.iter().enumerate() {
            let blockdev = serde_json::json!({
                "driver": "raw",
                "node-name": format!("disk{i}"),
                "cache": { "direct": true },
                "file": {
                    "driver": "nbd",
                    "cache": { "direct": true },
                    "server": { "type": "unix", "path": d.socket.display().to_string() },
                    "export": d.export,
                    "reconnect-delay": NBD_RECONNECT_DELAY_SECS,
                },
            });
            cmd.arg("-blockdev")
                .arg(blockdev.to_string())
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=disk{i},id=vd{i}"));
        }
        cmd.arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-pidfile")
            .arg(&pidfile)
            .arg("-daemonize");
        if incoming {
            // `-S`: the arrived guest stays paused until its agent has the disks' new
            // epochs exported here and sends `cont` (see `migrate::QemuHost::resume_arrived`).
            cmd.args(["-incoming", "defer", "-S"]);
        }
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            // Its own process group as well: a signal to the agent's group (a terminal's
            // Ctrl-C) does not reach the guest.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "cannot run {} (install qemu-system-x86, or set qemu.binary)",
                self.cfg.binary
            )
        })?;
        // With -daemonize the process we started exits once the guest is set up.
        let status = match tokio::time::timeout(START_TIMEOUT, child.wait()).await {
            Ok(s) => s.context("waiting for QEMU to start")?,
            Err(_) => {
                let _ = child.kill().await;
                bail!("QEMU did not finish starting within {START_TIMEOUT:?}");
            }
        };
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("QEMU failed to start ({status}): {}", text.trim());
        }
        let pid = self.live_pid(vm).with_context(|| {
            format!(
                "QEMU started but {} names no running QEMU",
                pidfile.display()
            )
        })?;
        let (monitor, qmp_error) = match Monitor::connect(&qmp, QMP_TIMEOUT).await {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e.to_string())),
        };
        tracing::info!(vm, pid, accel, "QEMU guest started");
        Ok(Running {
            pid,
            monitor,
            qmp_error,
            accel: Some(accel.to_string()),
            adopted: false,
            stopping: false,
            migration: None,
        })
    }

    /// ACPI power-down, then `quit` after the configured timeout, then SIGKILL.
    async fn stop(&self, vm: &str, pid: u32, monitor: Option<Monitor>) {
        let timeout = Duration::from_millis(self.cfg.powerdown_timeout_ms);
        let gone = |host: &QemuHost| host.live_pid(vm) != Some(pid);
        let wait_gone = |limit: Duration| async move {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if gone(self) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            gone(self)
        };
        let monitor = match monitor {
            Some(m) if m.state().connected => Some(m),
            _ => Monitor::connect(&self.qmp_socket(vm), QMP_TIMEOUT)
                .await
                .ok(),
        };
        let mut how = "quit";
        if let Some(m) = &monitor {
            if !m.state().shut_down {
                match m.system_powerdown(QMP_TIMEOUT).await {
                    Ok(()) => {
                        // With -no-shutdown QEMU stays after the guest powers off; the
                        // SHUTDOWN event says it did.
                        let deadline = Instant::now() + timeout;
                        while Instant::now() < deadline && !m.state().shut_down && !gone(self) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        if m.state().shut_down {
                            how = "ACPI power-down";
                        } else {
                            tracing::info!(
                                vm,
                                ?timeout,
                                "the guest ignored the ACPI power-down; quitting QEMU"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(vm, error = %e, "system_powerdown failed"),
                }
            }
            if !gone(self) {
                if let Err(e) = m.quit(QMP_TIMEOUT).await {
                    tracing::warn!(vm, error = %e, "quit failed");
                }
            }
        }
        if !wait_gone(Duration::from_secs(5)).await {
            how = "SIGKILL";
            tracing::warn!(vm, pid, "QEMU did not quit; killing it");
            if self.live_pid(vm) == Some(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if !wait_gone(Duration::from_secs(5)).await {
                self.fail(vm, format!("QEMU (pid {pid}) did not exit after SIGKILL"));
                if let Some(r) = self.vms.lock().await.get_mut(vm) {
                    r.stopping = false;
                }
                return;
            }
        }
        // The files are the VM's, not this QEMU's: a QEMU of the VM started here since
        // (the guest coming back by live migration) owns them now.
        let named = std::fs::read_to_string(self.pidfile(vm))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if named.is_none() || named == Some(pid) {
            let _ = std::fs::remove_file(self.pidfile(vm));
            let _ = std::fs::remove_file(self.qmp_socket(vm));
        }
        tracing::info!(vm, pid, how, "QEMU guest stopped");
        let mut vms = self.vms.lock().await;
        if vms.get(vm).is_some_and(|r| r.pid == pid) {
            vms.remove(vm);
        }
    }

    /// `vm`'s state on this host.
    pub async fn status(&self, vm: &str) -> QemuStatus {
        let (pid, monitor, qmp_error, accel, adopted, stopping) = {
            let vms = self.vms.lock().await;
            match vms.get(vm) {
                Some(r) => (
                    Some(r.pid),
                    r.monitor.clone(),
                    r.qmp_error.clone(),
                    r.accel.clone(),
                    r.adopted,
                    r.stopping,
                ),
                None => (self.live_pid(vm), None, None, None, false, false),
            }
        };
        let error = lock(&self.failures).get(vm).map(|(e, _)| e.clone());
        let mut status = QemuStatus {
            pid,
            accel,
            adopted,
            serial_log: self.serial_log(vm).display().to_string(),
            error,
            qmp: "none".into(),
            ..QemuStatus::default()
        };
        if let Some(m) = &monitor {
            let s = m.state();
            status.events = s.events.iter().map(|e| e.describe()).collect();
            status.qmp = if s.connected {
                "connected".into()
            } else {
                format!("disconnected: {}", s.closed_because.unwrap_or_default())
            };
            if s.connected {
                if let Ok(info) = m.query_status(QMP_TIMEOUT).await {
                    status.qmp_status = Some(info.status);
                }
            }
        } else if let Some(e) = qmp_error {
            status.qmp = format!("disconnected: {e}");
        }
        status.state = match (&status.pid, stopping, status.qmp_status.as_deref()) {
            (Some(_), true, _) => "stopping",
            (Some(_), false, Some("running")) => "running",
            (Some(_), false, Some("shutdown")) => "shutdown",
            (Some(_), false, Some(_)) => "paused",
            (Some(_), false, None) => "running",
            (None, _, _) if status.error.is_some() => "failed",
            (None, _, _) => "stopped",
        }
        .to_string();
        status
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether KVM works here: `/dev/kvm` opens, and the firmware (SeaBIOS, with nothing to
/// boot) runs to its end under KVM no slower than twice its time under TCG (plus 200 ms of
/// start-up noise). `/dev/kvm` existing is not enough: on nested hosts where guests stall,
/// it opens and KVM even runs the firmware, 15-20 times slower than emulation (measured on
/// such a host: 2.1 s against 0.12 s).
async fn probe_kvm(binary: &str, dir: &Path) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Some(tcg) = firmware_run_time(binary, dir, "tcg", KVM_PROBE_TIMEOUT).await else {
        return false;
    };
    let limit = tcg * 2 + Duration::from_millis(200);
    let kvm = firmware_run_time(binary, dir, "kvm", limit).await;
    tracing::info!(?tcg, ?kvm, ?limit, "firmware run time under TCG and KVM");
    kvm.is_some()
}

/// How long QEMU with `accel` takes to start and run the firmware to "No bootable
/// device", if within `limit`.
async fn firmware_run_time(
    binary: &str,
    dir: &Path,
    accel: &str,
    limit: Duration,
) -> Option<Duration> {
    let out = dir.join(format!(".{accel}-probe.log"));
    let _ = std::fs::remove_file(&out);
    let started = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .args([
            "-accel",
            accel,
            "-cpu",
            if accel == "kvm" { "host" } else { "max" },
        ])
        .args([
            "-m",
            "64",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-chardev")
        .arg(format!("file,id=probe,path={}", out.display()))
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=probe"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let mut took = None;
    while started.elapsed() < limit {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("No bootable device") {
            took = Some(started.elapsed());
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&out);
    took
}

#[cfg(test)]
mod tests {
    use super::*;
    use qmp::QmpEvent;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A fake QEMU monitor: greets, accepts capabilities, answers `query-status` after
    /// sending a `STOP` event, refuses `bogus`, then sends `SHUTDOWN` and `MIGRATION`
    /// events and closes on `quit`.
    async fn fake_qemu(listener: tokio::net::UnixListener) {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .expect("greet");
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&line).expect("json");
            let reply = match v["execute"].as_str() {
                Some("qmp_capabilities") => "{\"return\": {}}\n".to_string(),
                Some("query-status") => "{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 250}}\n{\"return\": {\"running\": false, \"status\": \"paused\"}}\n".to_string(),
                Some("system_powerdown") => "{\"return\": {}}\n{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-shutdown\"}}\n{\"event\": \"MIGRATION\", \"data\": {\"status\": \"pre-switchover\"}}\n".to_string(),
                Some("quit") => {
                    let _ = write.write_all(b"{\"return\": {}}\n").await;
                    return;
                }
                _ => "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command bogus has not been found\"}}\n".to_string(),
            };
            write.write_all(reply.as_bytes()).await.expect("reply");
        }
    }

    #[tokio::test]
    async fn qmp_answers_come_in_order_and_events_update_the_monitor_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.qmp");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        tokio::spawn(fake_qemu(listener));
        let t = Duration::from_secs(5);
        let m = Monitor::connect(&path, t).await.expect("connect");
        let status = m.query_status(t).await.expect("query-status");
        assert!(!status.running);
        assert_eq!(status.status, "paused");
        assert!(m.state().stopped, "the STOP event was seen");
        assert_eq!(m.state().stopped_at_unix_us, Some(1_700_000_000_000_250));
        match m.execute("bogus", None, t).await {
            Err(qmp::QmpError::Refused { command, class, .. }) => {
                assert_eq!(
                    (command.as_str(), class.as_str()),
                    ("bogus", "CommandNotFound")
                );
            }
            other => panic!("{other:?}"),
        }
        m.system_powerdown(t).await.expect("powerdown");
        let deadline = Instant::now() + t;
        while m.state().migration.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let state = m.state();
        assert!(state.shut_down);
        assert_eq!(state.migration.as_deref(), Some("pre-switchover"));
        assert_eq!(
            state.events.iter().cloned().collect::<Vec<_>>(),
            vec![
                QmpEvent::Stop,
                QmpEvent::Shutdown {
                    guest: true,
                    reason: "guest-shutdown".into()
                },
                QmpEvent::Migration {
                    status: "pre-switchover".into()
                },
            ]
        );
        m.quit(t).await.expect("quit");
        assert!(m.wait_closed(t).await, "the connection closes after quit");
        assert!(matches!(
            m.query_status(t).await,
            Err(qmp::QmpError::Closed)
        ));
    }

    #[test]
    fn a_unix_export_uri_splits_into_export_and_socket() {
        let d =
            unix_export("nbd+unix:///disk-3?socket=/run/convoy/disk-3.sock").expect("a unix URI");
        assert_eq!(d.export, "disk-3");
        assert_eq!(d.socket, PathBuf::from("/run/convoy/disk-3.sock"));
        assert!(unix_export("nbds://127.0.0.1:1/disk-3").is_none());
    }
}
