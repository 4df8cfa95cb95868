//! QEMU VMs driven by Convoy (`vm create --driver qemu`): a real guest (the tiny test guest
//! of `common::qemu_guest`, under TCG) runs on its host's Convoy NBD export, outlives a
//! SIGKILLed agent, is re-attached (not started twice) by the restarted agent, and stops
//! with `vm stop`, and moves live to another host (`vm move`) while it writes.
//! `CONVOY_SKIP_QEMU=1` skips the tests that boot a guest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::data::{expose, vm_uri};
use common::qemu_guest::{self as guest, highest_reported, missing_writes, reported_failure};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Bound on booting the guest and seeing its first writes (a TCG boot takes ~3 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `vm stop` lets the guest react to the ACPI power-down (the test guest ignores
/// it, so this is the path taken).
const POWERDOWN_TIMEOUT_MS: &str = "1000";

/// SIGKILLs the VM's QEMU (if it still runs) when the test ends, however it ends: QEMU
/// outlives the agents by design, so dropping the cluster does not stop it.
struct QemuReaper {
    dir: PathBuf,
    vm: String,
}

/// Reapers for a cluster not started yet: declared before it, they are dropped after it,
/// when no agent is left to start a planned guest again.
#[derive(Default)]
struct Reapers(std::cell::RefCell<Vec<QemuReaper>>);

impl Reapers {
    fn watch(&self, dirs: &[&Path], vm: &str) {
        for d in dirs {
            self.0.borrow_mut().push(QemuReaper {
                dir: d.to_path_buf(),
                vm: vm.into(),
            });
        }
    }
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        // Every QEMU of the VM here, whatever its pidfile says.
        for pid in qemus_for(&self.dir.join(format!("{}.qmp", self.vm))) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The pid in `vm`'s pidfile, if that process runs and is that VM's QEMU.
fn qemu_pid(dir: &Path, vm: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(format!("{vm}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let socket = dir.join(format!("{vm}.qmp")).display().to_string();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    (String::from_utf8_lossy(&cmdline).contains(&socket) && !stat.contains(") Z")).then_some(pid)
}

/// Every QEMU process whose command line names this QMP socket.
fn qemus_for(socket: &Path) -> Vec<i32> {
    qemu_cmdlines(socket)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// [`qemus_for`] with each one's command line, read once: a QEMU that exits between two
/// reads shows an empty command line the second time.
fn qemu_cmdlines(socket: &Path) -> Vec<(i32, String)> {
    let needle = socket.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).into_owned();
            (cmd.contains("qemu-system") && cmd.contains(&needle) && !stat.contains(") Z"))
                .then_some((pid, cmd))
        })
        .collect()
}

fn vm_json(dev: &Dev, vm: &str) -> Value {
    let r = dev.cli(&["vm", "show", vm, "-o", "json"]);
    assert!(r.ok, "vm show {vm}: {}", r.stderr);
    r.json()
}

/// Waits until the serial console reports at least `n` writes; fails on a guest failure.
fn wait_writes(serial: &Path, n: u64, timeout: Duration, why: &str) -> u64 {
    wait_for(why, timeout, || {
        let log = std::fs::read_to_string(serial).unwrap_or_default();
        if let Some(f) = reported_failure(&log) {
            panic!("the guest reported a failure: {f}\n{log}");
        }
        highest_reported(&log).filter(|&w| w >= n)
    })
}

#[test]
fn qemu_vm_outlives_a_killed_agent_and_the_restarted_agent_reattaches() {
    if guest::skip() {
        eprintln!("SKIPPED: CONVOY_SKIP_QEMU=1");
        return;
    }
    let started = Instant::now();
    let g = guest::require();
    let dev = Dev::start(1, &["--qemu-powerdown-timeout-ms", POWERDOWN_TIMEOUT_MS]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    let qemu_dir = dev.node(1).data_dir.join("qemu");
    let _reaper = QemuReaper {
        dir: qemu_dir.clone(),
        vm: "real".into(),
    };

    let (kernel, initrd) = (g.kernel.to_str().unwrap(), g.initrd.to_str().unwrap());
    let r = dev.cli(&[
        "vm",
        "create",
        "real",
        "--host",
        "1",
        "--driver",
        "qemu",
        "--disk",
        "64MiB",
        "--memory",
        "256MiB",
        "--cpus",
        "1",
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--append",
        "console=ttyS0 panic=-1",
        "-o",
        "json",
    ]);
    assert!(r.ok, "vm create: {}{}", r.stdout, r.stderr);
    let created = r.json();
    assert_eq!(created["driver"], "qemu");
    assert_eq!(created["qemu"]["memory_mib"], 256);
    // No --accel: KVM where the host's probe shows it works, TCG otherwise (on machines
    // where /dev/kvm exists but guests stall, the probe must say TCG).
    assert_eq!(created["qemu"]["accel"], "auto");
    let r = dev.cli(&["vm", "start", "real"]);
    assert!(r.ok, "vm start: {}", r.stderr);

    let serial = qemu_dir.join("real.serial.log");
    let booted = Instant::now();
    let first = wait_writes(&serial, 100, BOOT_TIMEOUT, "the guest's first 100 writes");
    eprintln!(
        "guest writing after {:?} ({first} writes)",
        booted.elapsed()
    );
    let shown = vm_json(&dev, "real");
    let status = &shown["qemu"]["status"];
    assert_eq!(status["state"], "running", "{shown:#}");
    assert_eq!(status["qmp"], "connected", "{shown:#}");
    assert_eq!(status["qmp_status"], "running", "{shown:#}");
    let accel = status["accel"].as_str().unwrap_or("");
    assert!(accel == "kvm" || accel == "tcg", "{shown:#}");
    eprintln!("accel auto chose {accel}");
    let pid = status["pid"].as_i64().expect("vm show gives QEMU's pid") as i32;
    assert_eq!(Some(pid), qemu_pid(&qemu_dir, "real"));
    assert_eq!(status["serial_log"], serial.display().to_string());
    // The human view names the same.
    let text = dev.cli(&["vm", "show", "real"]).stdout;
    assert!(text.contains(&format!("pid: {pid}")), "{text}");
    assert!(text.contains("qmp: connected"), "{text}");

    // SIGKILL the agent: QEMU (its own session, re-parented away) keeps running.
    let before_kill = highest_reported(&std::fs::read_to_string(&serial).unwrap()).unwrap();
    dev.kill(1);
    let killed = Instant::now();
    wait_for("a second of agent downtime", Duration::from_secs(5), || {
        (killed.elapsed() >= Duration::from_secs(1)).then_some(())
    });
    assert_eq!(
        qemu_pid(&qemu_dir, "real"),
        Some(pid),
        "QEMU died with its agent"
    );
    dev.restart(1);
    // Its writes (stalled while the export was away) go on, with no failure.
    let after = wait_writes(
        &serial,
        before_kill + 100,
        Duration::from_secs(60),
        "the guest to write 100 more blocks after the agent restart",
    );
    eprintln!("agent down and back: writes {before_kill} -> {after}");
    let shown = wait_for(
        "vm show with the re-attached QEMU",
        Duration::from_secs(20),
        || {
            let v = vm_json(&dev, "real");
            (v["qemu"]["status"]["qmp"] == "connected").then_some(v)
        },
    );
    let status = &shown["qemu"]["status"];
    assert_eq!(status["pid"].as_i64(), Some(pid as i64), "{shown:#}");
    assert_eq!(status["state"], "running", "{shown:#}");
    assert_eq!(status["adopted"], true, "{shown:#}");
    assert_eq!(
        qemus_for(&qemu_dir.join("real.qmp")),
        vec![pid],
        "exactly the one QEMU runs for the VM"
    );

    // vm stop: the guest ignores the ACPI power-down, so QEMU is made to quit.
    let r = dev.cli(&["vm", "stop", "real"]);
    assert!(r.ok, "vm stop: {}", r.stderr);
    wait_for(
        "QEMU to exit after vm stop",
        Duration::from_secs(30),
        || {
            qemus_for(&qemu_dir.join("real.qmp"))
                .is_empty()
                .then_some(())
        },
    );
    let shown = wait_for("vm show to say stopped", Duration::from_secs(10), || {
        let v = vm_json(&dev, "real");
        (v["qemu"]["status"]["state"] == "stopped").then_some(v)
    });
    assert_eq!(shown["running"], false);
    assert!(shown["qemu"]["status"]["pid"].is_null(), "{shown:#}");
    let log = std::fs::read_to_string(dev.node(1).log.clone()).unwrap_or_default();
    assert!(
        log.contains("ignored the ACPI power-down"),
        "the stop took the power-down timeout path"
    );
    eprintln!("whole test {:?}", started.elapsed());
    dev.assert_no_panics();
}

/// Creates QEMU VM `vm` (the test guest, 256 MiB, TCG, one 64 MiB disk) on node 1 in
/// group `g` with a copy on node 2 in `mode`, starts it and waits for its first 100
/// writes; returns the writes seen.
fn guest_in_group(dev: &Dev, g: &guest::Guest, vm: &str, mode: &str) -> u64 {
    create_test_guest(dev, g, vm);
    assert!(dev.cli(&["cg", "create", "g", "--vm", vm]).ok);
    replicate_to_2(dev, mode);
    assert!(dev.cli(&["vm", "start", vm]).ok);
    let serial = dev.node(1).data_dir.join(format!("qemu/{vm}.serial.log"));
    wait_writes(&serial, 100, BOOT_TIMEOUT, "the guest's first 100 writes")
}

/// Creates QEMU VM `vm` (the test guest, 256 MiB, TCG, one 64 MiB disk) on node 1.
fn create_test_guest(dev: &Dev, g: &guest::Guest, vm: &str) {
    let (kernel, initrd) = (g.kernel.to_str().unwrap(), g.initrd.to_str().unwrap());
    let r = dev.cli(&[
        "vm",
        "create",
        vm,
        "--host",
        "1",
        "--driver",
        "qemu",
        "--disk",
        "64MiB",
        "--memory",
        "256MiB",
        "--accel",
        "tcg",
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--append",
        "console=ttyS0 panic=-1",
    ]);
    assert!(r.ok, "vm create: {}{}", r.stdout, r.stderr);
}

/// Gives group `g` a `mode` copy on node 2 and waits until it is consistent.
fn replicate_to_2(dev: &Dev, mode: &str) {
    let r = dev.cli(&[
        "cg",
        "replicate",
        "g",
        "--to",
        "2",
        "--mode",
        mode,
        "--wait",
        "--timeout",
        "60",
    ]);
    assert!(r.ok, "cg replicate: {}", r.stderr);
}

/// Copies an NBD export into `file` with `qemu-img convert` and returns its bytes.
fn read_export(uri: &str, file: &Path) -> Vec<u8> {
    let out = common::data::tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "qemu-img convert {uri}: {out:?}");
    std::fs::read(file).unwrap()
}

#[test]
fn a_running_qemu_guest_moves_live_to_another_host_and_keeps_every_write() {
    if guest::skip() {
        eprintln!("SKIPPED: CONVOY_SKIP_QEMU=1");
        return;
    }
    let started = Instant::now();
    let reapers = Reapers::default();
    let (dev, dir1, dir2, before) = two_host_guest(&reapers, "live", "sync");
    let serial1 = dir1.join("live.serial.log");

    let r = dev.cli(&["vm", "move", "live", "--to", "2", "-o", "json"]);
    assert!(r.ok, "vm move: {}{}", r.stdout, r.stderr);
    let moved = r.json();
    assert_eq!(moved["vm"]["host"], 2, "{moved:#}");
    assert_eq!(moved["fenced"], true, "{moved:#}");
    let live = &moved["live_migration"];
    let (downtime, total, ram) = (
        live["downtime_ms"].as_u64().expect("QEMU's downtime"),
        live["total_ms"].as_u64().expect("QEMU's total time"),
        live["ram_bytes"].as_u64().expect("memory sent"),
    );
    assert!(total > 0 && ram > 0, "{moved:#}");
    eprintln!(
        "moved live after {before}+ writes: downtime {downtime} ms, total {total} ms, {} MiB of memory",
        ram >> 20
    );

    // One QEMU runs the guest, on node 2; the source's quit.
    wait_for("the source's QEMU to quit", Duration::from_secs(10), || {
        qemus_for(&dir1.join("live.qmp")).is_empty().then_some(())
    });
    let pid2 = qemu_pid(&dir2, "live").expect("QEMU runs the guest on node 2");
    assert_eq!(qemus_for(&dir2.join("live.qmp")), vec![pid2]);
    // The same guest goes on writing there: its console (now node 2's) counts on.
    let serial2 = dir2.join("live.serial.log");
    let after = wait_writes(
        &serial2,
        before + 100,
        Duration::from_secs(60),
        "the guest to write 100 more blocks on node 2",
    );
    let log1 = std::fs::read_to_string(&serial1).unwrap_or_default();
    assert!(reported_failure(&log1).is_none(), "{log1}");
    let shown = vm_json(&dev, "live");
    assert_eq!(shown["host"], 2, "{shown:#}");
    assert_eq!(shown["qemu"]["status"]["state"], "running", "{shown:#}");
    assert_eq!(shown["qemu"]["status"]["pid"].as_i64(), Some(pid2 as i64));
    eprintln!("writes {before} before the move, {after} after it");

    // Stopped, every write it reported is on both copies: node 2's (where it runs) and
    // node 1's (the group's primary, which ordered its writes after the move).
    assert!(dev.cli(&["vm", "stop", "live"]).ok);
    wait_for(
        "QEMU to exit after vm stop",
        Duration::from_secs(30),
        || qemus_for(&dir2.join("live.qmp")).is_empty().then_some(()),
    );
    let acked = highest_reported(&std::fs::read_to_string(&serial2).unwrap()).unwrap();
    let here = read_export(&vm_uri(&dev, "live", 0), &dev.dir.path().join("on2.img"));
    let lost = missing_writes(&here, acked);
    assert!(
        lost.is_empty(),
        "{} of {acked} writes missing on node 2: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let primary = read_export(&expose(&dev, "live:0", 1), &dev.dir.path().join("on1.img"));
    let lost = missing_writes(&primary, acked);
    assert!(
        lost.is_empty(),
        "{} of {acked} writes missing on node 1: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    eprintln!(
        "{acked} writes on both copies; whole test {:?}",
        started.elapsed()
    );
    dev.assert_no_panics();
}

/// Starts migrating group `cg` to `to` with `strategy` and waits for the decision;
/// returns the migration's record.
fn migrate(dev: &Dev, cg: &str, to: u64, strategy: &str) -> Value {
    migrate_with(dev, cg, to, strategy, &[])
}

/// [`migrate`] with more `migrate start` flags.
fn migrate_with(dev: &Dev, cg: &str, to: u64, strategy: &str, extra: &[&str]) -> Value {
    let to = to.to_string();
    let mut args = vec![
        "migrate",
        "start",
        cg,
        "--to",
        &to,
        "--strategy",
        strategy,
        "--deadline",
        "2m",
        "-o",
        "json",
    ];
    args.extend_from_slice(extra);
    let r = dev.cli(&args);
    assert!(r.ok, "migrate start ({strategy}): {}{}", r.stdout, r.stderr);
    let id = r.json()["id"].as_u64().unwrap().to_string();
    wait_for(
        &format!("the {strategy} migration to be decided"),
        Duration::from_secs(150),
        || {
            let r = dev.cli(&["migrate", "show", &id, "-o", "json"]);
            let v = r.ok.then(|| r.json())?;
            v["decision"].is_string().then_some(v)
        },
    )
}

/// `line` without the terminal colour codes an agent's log may carry.
fn without_colours(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // An SGR sequence: ESC [ ... m.
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A 2-node cluster whose node 1 runs the test guest `vm` in group `g` with a `mode` copy
/// on node 2, after its first 100 writes, its QEMUs on both nodes watched by `reapers`
/// (declared by the caller before this, so they outlive the cluster). Returns the
/// cluster, the QEMU dirs of nodes 1 and 2, and the writes seen.
fn two_host_guest(reapers: &Reapers, vm: &str, mode: &str) -> (Dev, PathBuf, PathBuf, u64) {
    let g = guest::require();
    let dev = Dev::start(2, &["--qemu-powerdown-timeout-ms", POWERDOWN_TIMEOUT_MS]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    let (dir1, dir2) = (
        dev.node(1).data_dir.join("qemu"),
        dev.node(2).data_dir.join("qemu"),
    );
    reapers.watch(&[&dir1, &dir2], vm);
    let before = guest_in_group(&dev, &g, vm, mode);
    (dev, dir1, dir2, before)
}

/// The guest's QEMU runs on `host` only, and its console there counts past `after`.
fn runs_only_on(host_dir: &Path, other_dir: &Path, vm: &str, after: u64) -> u64 {
    wait_for(
        "the other host's QEMU to quit",
        Duration::from_secs(10),
        || {
            qemus_for(&other_dir.join(format!("{vm}.qmp")))
                .is_empty()
                .then_some(())
        },
    );
    let pid = qemu_pid(host_dir, vm).expect("QEMU runs the guest on its new host");
    assert_eq!(qemus_for(&host_dir.join(format!("{vm}.qmp"))), vec![pid]);
    wait_writes(
        &host_dir.join(format!("{vm}.serial.log")),
        after + 50,
        Duration::from_secs(60),
        "the guest to write on after the migration",
    )
}

#[test]
fn a_running_qemu_guest_migrates_with_its_group_there_and_back_under_every_strategy() {
    if guest::skip() {
        eprintln!("SKIPPED: CONVOY_SKIP_QEMU=1");
        return;
    }
    let started = Instant::now();
    let reapers = Reapers::default();
    let (dev, dir1, dir2, before) = two_host_guest(&reapers, "mig", "async");

    // There: VMs move one at a time, their writes mirrored back to the source's order.
    let m = migrate(&dev, "g", 2, "reverse-replication");
    assert_eq!(m["decision"], "committed", "{m:#}");
    eprintln!(
        "reverse-replication: {:.2} s, stun {}, moved {} bytes",
        m["elapsed_secs"].as_f64().unwrap_or(0.0),
        m["stun_ms"],
        m["bytes_moved"]
    );
    assert!(
        m["stun_ms"]
            .as_array()
            .is_some_and(|s| s.iter().any(|e| e[0] == "mig")),
        "the guest's stun is in the report: {m:#}"
    );
    // QEMU's own figures are in the report, taken with the source host's settings.
    let live_move = |m: &Value| {
        m["live_moves"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["vm"] == "mig").cloned())
            .unwrap_or_else(|| panic!("no live move of mig in the report: {m:#}"))
    };
    let l = live_move(&m);
    assert!(
        l["total_ms"].as_u64().unwrap_or(0) >= l["downtime_ms"].as_u64().unwrap_or(0)
            && l["total_ms"].as_u64().unwrap_or(0) > 0
            && l["ram_bytes"].as_u64().unwrap_or(0) > 0,
        "{l:#}"
    );
    assert!(m["live"]["downtime_limit_ms"].is_null(), "{m:#}");
    assert!(
        m["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["note"].as_str().is_some_and(
                |n| n.starts_with("mig arrived on node 2 by QEMU live migration: downtime")
            ))),
        "{m:#}"
    );
    let there = runs_only_on(&dir2, &dir1, "mig", before);
    let shown = vm_json(&dev, "mig");
    assert_eq!(shown["host"], 2, "{shown:#}");

    // And back: the group switches over at once, synchronously caught up first, with
    // QEMU parameters of this migration's own.
    let m = migrate_with(
        &dev,
        "g",
        1,
        "sync-switch",
        &["--downtime-limit-ms", "400", "--auto-converge", "false"],
    );
    assert_eq!(m["decision"], "committed", "{m:#}");
    assert_eq!(m["live"]["downtime_limit_ms"], 400, "{m:#}");
    assert_eq!(m["live"]["auto_converge"], false, "{m:#}");
    assert!(live_move(&m)["total_ms"].as_u64().unwrap_or(0) > 0);
    // The source (node 2) gave QEMU this migration's parameters, not its own.
    let log = std::fs::read_to_string(&dev.node(2).log).unwrap_or_default();
    let set = without_colours(
        log.lines()
            .rfind(|l| l.contains("live migration parameters"))
            .unwrap_or_default(),
    );
    assert!(
        set.contains("downtime_limit_ms=400") && set.contains("auto_converge=false"),
        "node 2 set: {set:?}"
    );
    eprintln!(
        "sync-switch: {:.2} s, stun {}, moved {} bytes",
        m["elapsed_secs"].as_f64().unwrap_or(0.0),
        m["stun_ms"],
        m["bytes_moved"]
    );
    let back = runs_only_on(&dir1, &dir2, "mig", there);

    // The other two strategies, there and back again: the destination's copy compared by
    // hashes first; then a snapshot as the fail-back point and every VM moved at once.
    let mut after = back;
    for (to, strategy) in [(2, "compare-delta"), (1, "break-consistency")] {
        let m = migrate(&dev, "g", to, strategy);
        assert_eq!(m["decision"], "committed", "{m:#}");
        eprintln!(
            "{strategy}: {:.2} s, stun {}, moved {} bytes",
            m["elapsed_secs"].as_f64().unwrap_or(0.0),
            m["stun_ms"],
            m["bytes_moved"]
        );
        assert!(live_move(&m)["total_ms"].as_u64().unwrap_or(0) > 0);
        assert!(
            m["stun_ms"]
                .as_array()
                .is_some_and(|s| s.iter().any(|e| e[0] == "mig")),
            "the guest's stun is in the report: {m:#}"
        );
        let (here, other) = if to == 2 {
            (&dir2, &dir1)
        } else {
            (&dir1, &dir2)
        };
        after = runs_only_on(here, other, "mig", after);
    }
    eprintln!(
        "writes: {before} before, {there} after the first move, {back} after the second, {after} after the fourth"
    );

    // Stopped, every write the guest reported is on both copies.
    assert!(dev.cli(&["vm", "stop", "mig"]).ok);
    wait_for(
        "QEMU to exit after vm stop",
        Duration::from_secs(30),
        || qemus_for(&dir1.join("mig.qmp")).is_empty().then_some(()),
    );
    let acked =
        highest_reported(&std::fs::read_to_string(dir1.join("mig.serial.log")).unwrap()).unwrap();
    let here = read_export(&vm_uri(&dev, "mig", 0), &dev.dir.path().join("on1.img"));
    let lost = missing_writes(&here, acked);
    assert!(
        lost.is_empty(),
        "{} of {acked} writes missing on node 1: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let r = dev.cli(&[
        "cg",
        "replicate",
        "g",
        "--to",
        "2",
        "--mode",
        "async",
        "--wait",
        "--timeout",
        "60",
    ]);
    assert!(r.ok || r.stderr.contains("already"), "{}", r.stderr);
    let replica = read_export(&expose(&dev, "mig:0", 2), &dev.dir.path().join("on2.img"));
    let lost = missing_writes(&replica, acked);
    assert!(
        lost.is_empty(),
        "{} of {acked} writes missing on node 2: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    eprintln!(
        "{acked} writes on both copies; whole test {:?}",
        started.elapsed()
    );
    dev.assert_no_panics();
}

/// Every QEMU of `vm` under `dir`, and whether each waits for (or came in by) a live
/// migration (`-incoming` on its command line) rather than having booted the guest.
fn qemus_of(dir: &Path, vm: &str) -> Vec<(i32, bool)> {
    qemu_cmdlines(&dir.join(format!("{vm}.qmp")))
        .into_iter()
        .map(|(pid, cmd)| (pid, cmd.contains("-incoming")))
        .collect()
}

/// A 3-node cluster whose QEMU migrations are slowed to 8 MiB/s (so the memory copy of
/// the guest below takes seconds), running QEMU VM `vm` on node 1 in group `g` with an
/// async copy on node 2, after its first 100 writes. Returns the cluster, the QEMU dirs
/// of nodes 1 and 2, and the writes seen.
fn slow_migration_setup(vm: &str) -> (Dev, PathBuf, PathBuf, u64) {
    let g = guest::require();
    let (dev, dir1, dir2) = slow_cluster();
    let before = guest_in_group(&dev, &g, vm, "async");
    (dev, dir1, dir2, before)
}

/// A 3-node cluster whose QEMU migrations are slowed to 8 MiB/s, with the QEMU dirs of
/// nodes 1 and 2.
fn slow_cluster() -> (Dev, PathBuf, PathBuf) {
    let dev = Dev::start(
        3,
        &[
            "--qemu-powerdown-timeout-ms",
            POWERDOWN_TIMEOUT_MS,
            "--qemu-migrate-bandwidth-mib",
            "8",
        ],
    );
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    let (dir1, dir2) = (
        dev.node(1).data_dir.join("qemu"),
        dev.node(2).data_dir.join("qemu"),
    );
    (dev, dir1, dir2)
}

/// Starts a reverse-replication migration of `g` to node 2 through node 3 (its
/// coordinator first); returns its id.
fn start_reverse_replication_via_3(dev: &Dev) -> String {
    let r = dev.cli_at(
        3,
        &[
            "migrate",
            "start",
            "g",
            "--to",
            "2",
            "--strategy",
            "reverse-replication",
            "--deadline",
            "2m",
            "-o",
            "json",
        ],
    );
    assert!(r.ok, "migrate start: {}{}", r.stdout, r.stderr);
    r.json()["id"].as_u64().unwrap().to_string()
}

/// [`start_reverse_replication_via_3`], then waits until node 2's QEMU waits for the
/// guest (the memory copy runs).
fn start_slow_migration(dev: &Dev, dir2: &Path, vm: &str) -> String {
    let id = start_reverse_replication_via_3(dev);
    wait_for(
        "node 2's QEMU to wait for the guest",
        Duration::from_secs(60),
        || {
            qemus_of(dir2, vm)
                .iter()
                .any(|(_, incoming)| *incoming)
                .then_some(())
        },
    );
    id
}

/// Watches both hosts every 10 ms until `done` says stop; fails if a QEMU that booted the
/// guest afresh ran on node 2 while node 1 still had a QEMU of it (the guest on two hosts).
fn never_on_two_hosts(dir1: &Path, dir2: &Path, vm: &str, mut done: impl FnMut() -> bool) {
    while !done() {
        let on1 = qemus_of(dir1, vm);
        let booted_on2: Vec<i32> = qemus_of(dir2, vm)
            .into_iter()
            .filter(|(_, incoming)| !incoming)
            .map(|(pid, _)| pid)
            .collect();
        assert!(
            on1.is_empty() || booted_on2.is_empty(),
            "the guest runs on two hosts: node 1 {on1:?}, node 2 booted it afresh {booted_on2:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Where the guest ends: waits until exactly one QEMU of it runs, on the host the model
/// says, and the guest writes on there; returns that host.
fn settles_on_one_host(dev: &Dev, dirs: [&Path; 2], vm: &str) -> u64 {
    let host = wait_for(
        "one QEMU of the guest, where the model says",
        Duration::from_secs(60),
        || {
            let host = vm_json(dev, vm)["host"].as_u64()?;
            let counts = dirs.map(|d| qemus_of(d, vm).len());
            let expect = if host == 1 { [1, 0] } else { [0, 1] };
            (counts == expect).then_some(host)
        },
    );
    let dir = dirs[(host - 1) as usize];
    let serial = dir.join(format!("{vm}.serial.log"));
    let now = highest_reported(&std::fs::read_to_string(&serial).unwrap_or_default()).unwrap_or(0);
    wait_writes(
        &serial,
        now + 50,
        Duration::from_secs(60),
        "the guest to write on where it settled",
    );
    host
}

#[test]
fn killing_the_coordinator_during_the_memory_copy_ends_in_one_decision_and_one_guest() {
    if guest::skip() {
        eprintln!("SKIPPED: CONVOY_SKIP_QEMU=1");
        return;
    }
    let started = Instant::now();
    let reapers = Reapers::default();
    let (dev, dir1, dir2, _) = slow_migration_setup("crash");
    reapers.watch(&[&dir1, &dir2], "crash");
    let id = start_slow_migration(&dev, &dir2, "crash");
    dev.kill(3);
    let killed = Instant::now();
    let mut decided = None;
    never_on_two_hosts(&dir1, &dir2, "crash", || {
        let r = dev.cli_at(1, &["migrate", "show", &id, "-o", "json"]);
        decided = r.ok.then(|| r.json()).filter(|v| v["decision"].is_string());
        assert!(
            killed.elapsed() < Duration::from_secs(150),
            "no decision after the coordinator died"
        );
        decided.is_some()
    });
    let m = decided.unwrap();
    eprintln!(
        "coordinator SIGKILLed during the memory copy: {} after {:?} ({})",
        m["decision"],
        killed.elapsed(),
        m["decision_reason"]
    );
    for node in [1, 2] {
        let r = dev.cli_at(node, &["migrate", "show", &id, "--local", "-o", "json"]);
        assert_eq!(
            r.json()["decision"],
            m["decision"],
            "node {node} decided otherwise"
        );
    }
    let host = settles_on_one_host(&dev, [&dir1, &dir2], "crash");
    let expected = if m["decision"] == "committed" { 2 } else { 1 };
    assert_eq!(host, expected, "{m:#}");
    eprintln!(
        "the guest runs on node {host} only; whole test {:?}",
        started.elapsed()
    );
    dev.restart(3);
    dev.assert_no_panics();
}

#[test]
fn killing_the_source_agent_mid_migration_never_runs_the_guest_on_two_hosts() {
    if guest::skip() {
        eprintln!("SKIPPED: CONVOY_SKIP_QEMU=1");
        return;
    }
    let started = Instant::now();
    let reapers = Reapers::default();
    let (dev, dir1, dir2, _) = slow_migration_setup("src");
    reapers.watch(&[&dir1, &dir2], "src");
    let id = start_slow_migration(&dev, &dir2, "src");
    // The source's agent dies (its QEMU does not): the stream it carried breaks.
    dev.kill(1);
    let killed = Instant::now();
    never_on_two_hosts(&dir1, &dir2, "src", || {
        killed.elapsed() > Duration::from_secs(5)
    });
    dev.restart(1);
    let mut decided = None;
    never_on_two_hosts(&dir1, &dir2, "src", || {
        let r = dev.cli_at(3, &["migrate", "show", &id, "-o", "json"]);
        decided = r.ok.then(|| r.json()).filter(|v| v["decision"].is_string());
        assert!(
            killed.elapsed() < Duration::from_secs(150),
            "no decision after the source's agent came back"
        );
        decided.is_some()
    });
    let m = decided.unwrap();
    eprintln!(
        "source agent SIGKILLed mid-migration, back after 5 s: {} after {:?} ({})",
        m["decision"],
        killed.elapsed(),
        m["decision_reason"]
    );
    let host = settles_on_one_host(&dev, [&dir1, &dir2], "src");
    eprintln!(
        "the guest runs on node {host} only; whole test {:?}",
        started.elapsed()
    );
    dev.assert_no_panics();
}

#[test]
fn aborting_during_the_memory_copy_fails_back_with_the_guest_running_on_its_source() {
    if guest::skip() {
        eprintln!("SKIPPED: CONVOY_SKIP_QEMU=1");
        return;
    }
    let started = Instant::now();
    let reapers = Reapers::default();
    let (dev, dir1, dir2, before) = slow_migration_setup("back");
    reapers.watch(&[&dir1, &dir2], "back");
    let id = start_slow_migration(&dev, &dir2, "back");
    let r = dev.cli(&["migrate", "abort", &id]);
    assert!(r.ok, "migrate abort: {}{}", r.stdout, r.stderr);
    let mut decided = None;
    never_on_two_hosts(&dir1, &dir2, "back", || {
        let r = dev.cli(&["migrate", "show", &id, "-o", "json"]);
        decided = r.ok.then(|| r.json()).filter(|v| v["decision"].is_string());
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no decision after the abort"
        );
        decided.is_some()
    });
    let m = decided.unwrap();
    assert_eq!(m["decision"], "failed-back", "{m:#}");
    // The same guest goes on on node 1 (its console counts on, no reboot), node 2's QEMU
    // is gone.
    let host = settles_on_one_host(&dev, [&dir1, &dir2], "back");
    assert_eq!(host, 1);
    let log = std::fs::read_to_string(dir1.join("back.serial.log")).unwrap();
    assert!(reported_failure(&log).is_none(), "{log}");
    assert!(highest_reported(&log).unwrap() > before + 50, "{log}");
    eprintln!(
        "aborted during the memory copy: failed back, the guest runs on node 1; whole test {:?}",
        started.elapsed()
    );
    dev.assert_no_panics();
}

/// Fail-back after a switchover: of a group's two guests, one has arrived on node 2 by
/// live migration when the operator aborts. The group fails back, and that guest comes
/// back to node 1 live (the same guest, writing on), never booted afresh anywhere.
#[test]
fn a_guest_that_moved_before_an_abort_comes_back_live_and_its_group_fails_back() {
    if guest::skip() {
        eprintln!("SKIPPED: CONVOY_SKIP_QEMU=1");
        return;
    }
    let started = Instant::now();
    let reapers = Reapers::default();
    let g = guest::require();
    let (dev, dir1, dir2) = slow_cluster();
    const VMS: [&str; 2] = ["a", "b"];
    for vm in VMS {
        reapers.watch(&[&dir1, &dir2], vm);
        create_test_guest(&dev, &g, vm);
    }
    assert!(dev.cli(&["cg", "create", "g", "--vm", "a", "--vm", "b"]).ok);
    replicate_to_2(&dev, "async");
    for vm in VMS {
        assert!(dev.cli(&["vm", "start", vm]).ok);
    }
    for vm in VMS {
        let serial = dir1.join(format!("{vm}.serial.log"));
        wait_writes(&serial, 100, BOOT_TIMEOUT, "each guest's first 100 writes");
    }
    let both_never_on_two_hosts = |done: &mut dyn FnMut() -> bool| {
        never_on_two_hosts(&dir1, &dir2, "a", || {
            let on1 = qemus_of(&dir1, "b");
            let booted_on2 = qemus_of(&dir2, "b").iter().any(|(_, incoming)| !incoming);
            assert!(
                on1.is_empty() || !booted_on2,
                "guest b runs on two hosts: node 1 {on1:?}, node 2 {:?}",
                qemus_of(&dir2, "b")
            );
            done()
        })
    };

    // Reverse-replication moves the guests one at a time: abort once the first is there.
    let id = start_reverse_replication_via_3(&dev);
    let mut moved = None;
    both_never_on_two_hosts(&mut || {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no guest arrived on node 2"
        );
        let on2: Vec<&str> = VMS
            .into_iter()
            .filter(|vm| vm_json(&dev, vm)["host"] == 2)
            .collect();
        assert!(on2.len() < 2, "both guests moved before the abort");
        moved = on2.first().copied();
        moved.is_some()
    });
    let moved = moved.unwrap();
    let stayed = VMS.into_iter().find(|vm| *vm != moved).unwrap();
    // At 8 MiB/s what the guest dirties per pass cannot fit the first limit (30 ms): the
    // source raised it pass by pass until the memory converged.
    let log = std::fs::read_to_string(&dev.node(1).log).unwrap_or_default();
    let raised: Vec<String> = log
        .lines()
        .filter(|l| l.contains("downtime limit raised"))
        .map(without_colours)
        .collect();
    assert!(
        raised.iter().any(|l| l.contains("downtime_limit_ms=60")),
        "node 1 raised: {raised:?}"
    );
    // It writes on node 2 before the abort (the second guest's memory copy takes seconds
    // at 8 MiB/s): aborted at once, under load it was moved back before it wrote there.
    let on2 = wait_writes(
        &dir2.join(format!("{moved}.serial.log")),
        1,
        Duration::from_secs(60),
        "the moved guest to write on node 2",
    );
    let r = dev.cli(&["migrate", "abort", &id]);
    assert!(r.ok, "migrate abort: {}{}", r.stdout, r.stderr);
    eprintln!("{moved} arrived on node 2 (writing, {on2} so far), {stayed} had not: aborted");

    let mut decided = None;
    both_never_on_two_hosts(&mut || {
        let r = dev.cli(&["migrate", "show", &id, "-o", "json"]);
        decided = r.ok.then(|| r.json()).filter(|v| v["decision"].is_string());
        assert!(
            started.elapsed() < Duration::from_secs(400),
            "no decision after the abort"
        );
        decided.is_some()
    });
    let m = decided.unwrap();
    for e in m["timeline"].as_array().into_iter().flatten() {
        eprintln!("  {}", e["note"].as_str().unwrap_or_default());
    }
    assert_eq!(m["decision"], "failed-back", "{m:#}");
    assert!(
        m["decision_reason"]
            .as_str()
            .is_some_and(|r| r.contains("aborted")),
        "{m:#}"
    );
    // The report keeps the move that happened: the guest's QEMU figures of its way there.
    assert!(
        m["live_moves"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["vm"] == moved)),
        "{m:#}"
    );
    // Both guests run on node 1 only; the one that moved came back live: its console
    // counts on past what it wrote on node 2, without a failure (a fresh boot would
    // count from 1 again).
    for vm in VMS {
        assert_eq!(settles_on_one_host(&dev, [&dir1, &dir2], vm), 1, "{vm}");
        assert!(
            qemus_of(&dir1, vm)
                .iter()
                .all(|(_, incoming)| *incoming == (vm == moved)),
            "{vm}: {:?}",
            qemus_of(&dir1, vm)
        );
    }
    let back = std::fs::read_to_string(dir1.join(format!("{moved}.serial.log"))).unwrap();
    assert!(reported_failure(&back).is_none(), "{back}");
    let first_back = back
        .lines()
        .find_map(highest_reported)
        .expect("the returned guest writes on node 1");
    assert!(
        first_back > on2,
        "{moved} counted from {first_back} on node 1 after {on2} on node 2: it did not come back live"
    );

    // Stopped, every write each guest reported is on node 1's copy.
    for vm in VMS {
        assert!(dev.cli(&["vm", "stop", vm]).ok);
    }
    for vm in VMS {
        wait_for(
            "QEMU to exit after vm stop",
            Duration::from_secs(30),
            || qemus_of(&dir1, vm).is_empty().then_some(()),
        );
        let acked = highest_reported(
            &std::fs::read_to_string(dir1.join(format!("{vm}.serial.log"))).unwrap(),
        )
        .unwrap();
        let image = read_export(
            &vm_uri(&dev, vm, 0),
            &dev.dir.path().join(format!("{vm}.img")),
        );
        let lost = missing_writes(&image, acked);
        assert!(
            lost.is_empty(),
            "{} of {acked} writes of {vm} missing on node 1: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        eprintln!("{vm}: {acked} writes on node 1's copy");
    }
    eprintln!(
        "failed back after a switchover: {}; whole test {:?}",
        m["decision_reason"],
        started.elapsed()
    );
    dev.assert_no_panics();
}

#[test]
fn qemu_vm_create_refuses_bad_input_with_clear_errors() {
    let dev = Dev::start(1, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    let kernel = dev.dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let kernel = kernel.to_str().unwrap();
    let cases: [(&[&str], &[&str]); 6] = [
        (&["--driver", "bogus"], &["bogus", "qemu"]),
        (
            &["--driver", "qemu", "--memory", "0"],
            &["--memory", "at least 1MiB"],
        ),
        (&["--driver", "qemu", "--cpus", "0"], &["--cpus"]),
        (
            &["--driver", "qemu", "--kernel", "/nonexistent/vmlinuz"],
            &["/nonexistent/vmlinuz", "cannot be read"],
        ),
        (&["--driver", "qemu", "--initrd", kernel], &["--kernel"]),
        (
            &["--memory", "256MiB", "--kernel", kernel],
            &["--driver qemu"],
        ),
    ];
    for (args, expect) in cases {
        let mut all = vec!["vm", "create", "bad", "--host", "1", "--disk", "64MiB"];
        all.extend_from_slice(args);
        let r = dev.cli(&all);
        assert!(!r.ok, "{args:?} was accepted: {}", r.stdout);
        for e in expect {
            assert!(
                r.stderr.contains(e),
                "{args:?}: error lacks {e:?}: {}",
                r.stderr
            );
        }
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
    // Nothing was created; a good one is.
    let r = dev.cli(&["vm", "list", "-o", "json"]);
    assert_eq!(r.json().as_array().map(Vec::len), Some(0), "{}", r.stdout);
    let r = dev.cli(&[
        "vm", "create", "good", "--host", "1", "--disk", "64MiB", "--driver", "qemu", "--kernel",
        kernel,
    ]);
    assert!(r.ok, "{}", r.stderr);

    dev.assert_no_panics();
}

#[test]
fn qemu_vm_image_is_imported_into_its_first_disk() {
    if guest::skip() {
        eprintln!("SKIPPED: CONVOY_SKIP_QEMU=1");
        return;
    }
    let dev = Dev::start(1, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    let image = dev.dir.path().join("image.qcow2");
    let image_str = image.to_str().unwrap();
    let made = common::data::tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", image_str, "8M"],
    );
    assert!(made.status.success(), "qemu-img create: {made:?}");
    let wrote = common::data::tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 1M", image_str],
    );
    assert!(wrote.status.success(), "qemu-io write: {wrote:?}");

    let r = dev.cli(&[
        "vm", "create", "imported", "--host", "1", "--disk", "64MiB", "--disk", "16MiB",
        "--driver", "qemu", "--image", image_str, "-o", "json",
    ]);
    assert!(r.ok, "vm create --image: {}{}", r.stdout, r.stderr);
    let uri = r.json()["disks"][0]["uris"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|u| u.starts_with("nbd+unix://"))
        .expect("the first disk's unix URI")
        .to_string();
    for (pattern, at) in [("0x5a", "1M"), ("0", "0"), ("0", "2M")] {
        let read = common::data::tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("read -P {pattern} {at} 1M"),
                &uri,
            ],
        );
        let out = String::from_utf8_lossy(&read.stdout);
        assert!(
            read.status.success() && !out.contains("Pattern verification failed"),
            "byte pattern {pattern} at {at} of the first disk: {out}"
        );
    }

    // An image larger than the first disk is refused, saying so.
    let big = dev.dir.path().join("big.raw");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let r = dev.cli(&[
        "vm",
        "create",
        "toobig",
        "--host",
        "1",
        "--disk",
        "64MiB",
        "--driver",
        "qemu",
        "--image",
        big.to_str().unwrap(),
    ]);
    assert!(!r.ok);
    assert!(r.stderr.contains("larger first --disk"), "{}", r.stderr);
    dev.assert_no_panics();
}
